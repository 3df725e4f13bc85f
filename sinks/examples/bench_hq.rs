//! Benchmark of the HQ MySQL sink (run by `scripts/bench-hq`, release build).
//!
//! 1. A fresh HQ database (`--init` from the OpenMRS demo dump).
//! 2. `omrs.hq.changes` pre-filled with an obs-heavy OpenMRS mix in uuid space: per patient a
//!    person, a name, a patient, a visit, 2 encounters and 24 obs, all referencing HQ metadata.
//! 3. The sink applies the topic to its end: rows/s.
//! 4. Raw: the same number of obs-shaped rows through 1000-row multi-row prepared INSERTs into a
//!    copy of `obs` on the same server — the ceiling — once before the sink's run and once
//!    after it; the ratio is against their mean.
//!    Then the same rows through `LOAD DATA LOCAL INFILE` (5,000-row files), against the
//!    second INSERT run: which way is faster for rows new to HQ.
//! 5. CPU seconds of this process, HQ's mariadbd and the broker during the sink run and the raw
//!    INSERTs (from /proc), to see which side bounds the rate.
//! 6. Latency: events produced at a steady 2,000/s for 20 s, with the site commit time set to
//!    the produce time; p50/p99 site commit → HQ commit from the sink's histogram.
//!
//! Prints `BENCH <name> <value> <unit>` lines last.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Value};
use omrs_core::config::{Config, TopicsFile};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

mod bench_common;
use bench_common::patient;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `rows` obs-shaped rows through 1000-row prepared multi-row INSERTs into a copy of `obs`
/// (its indexes, not its foreign keys), committed every 5,000 rows: rows/s.
async fn raw_inserts(c: &mut Conn, rows: u64) -> f64 {
    c.query_drop("DROP TABLE IF EXISTS bench_obs_raw; CREATE TABLE bench_obs_raw LIKE obs").await.unwrap();
    let cols = ["obs_id", "person_id", "concept_id", "encounter_id", "obs_datetime", "location_id", "value_numeric", "creator", "date_created", "voided", "uuid"];
    let per = 1000usize;
    let sql = format!("INSERT INTO bench_obs_raw ({}) VALUES {}", cols.join(","), vec![format!("({})", vec!["?"; cols.len()].join(",")); per].join(","));
    let stmt = c.prep(sql).await.unwrap();
    let t0 = Instant::now();
    let cpu1 = cpu_now();
    let mut written = 0u64;
    let mut id = 1i64;
    c.query_drop("START TRANSACTION").await.unwrap();
    while written < rows {
        let mut params: Vec<Value> = Vec::with_capacity(per * cols.len());
        for _ in 0..per {
            params.extend([Value::from(id), Value::from(1), Value::from(5089), Value::NULL, Value::from("2026-11-26 10:00:00"), Value::from(1), Value::from(36.6), Value::from(1), Value::from("2026-11-26 10:00:00"), Value::from(0), Value::from(uuid::Uuid::new_v4().to_string())]);
            id += 1;
        }
        c.exec_drop(&stmt, params).await.unwrap();
        written += per as u64;
        if written.is_multiple_of(5000) {
            c.query_drop("COMMIT; START TRANSACTION").await.unwrap();
        }
    }
    c.query_drop("COMMIT").await.unwrap();
    let cpu2 = cpu_now();
    let rate = written as f64 / t0.elapsed().as_secs_f64();
    eprintln!("raw INSERTs: {rate:.0} rows/s; CPU: this process {:.2} s, HQ mariadbd {:.2} s", cpu2.0 - cpu1.0, cpu2.1 - cpu1.1);
    c.query_drop("DROP TABLE bench_obs_raw").await.unwrap();
    rate
}

/// The same rows through `LOAD DATA LOCAL INFILE` (issue #24 §3: "measure both"), 5,000 rows
/// a statement and a transaction, the file formatted and written inside the timed loop (as the
/// INSERTs' parameters are built inside theirs): rows/s.
async fn raw_load_data(database: &str, rows: u64) -> f64 {
    let dir = std::env::temp_dir().join(format!("omrs-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let per = 5000u64;
    let files: Vec<std::path::PathBuf> = (0..rows.div_ceil(per)).map(|i| dir.join(format!("obs-{i}.tsv"))).collect();
    let opts = admin(Some(database)).local_infile_handler(Some(mysql_async::WhiteListFsHandler::new(files.clone())));
    let mut c = Conn::new(opts).await.expect("HQ");
    c.query_drop("DROP TABLE IF EXISTS bench_obs_raw; CREATE TABLE bench_obs_raw LIKE obs").await.unwrap();
    let cols = "obs_id,person_id,concept_id,encounter_id,obs_datetime,location_id,value_numeric,creator,date_created,voided,uuid";
    let t0 = Instant::now();
    let cpu1 = cpu_now();
    let mut id = 1u64;
    for f in &files {
        let mut tsv = String::with_capacity(per as usize * 120);
        for _ in 0..per.min(rows + 1 - id) {
            tsv.push_str(&format!("{id}\t1\t5089\t\\N\t2026-11-26 10:00:00\t1\t36.6\t1\t2026-11-26 10:00:00\t0\t{}\n", uuid::Uuid::new_v4()));
            id += 1;
        }
        std::fs::write(f, tsv).unwrap();
        c.query_drop(format!("LOAD DATA LOCAL INFILE '{}' INTO TABLE bench_obs_raw ({cols})", f.display())).await.unwrap();
        let _ = std::fs::remove_file(f);
    }
    let cpu2 = cpu_now();
    let rate = (id - 1) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("raw LOAD DATA: {rate:.0} rows/s; CPU: this process {:.2} s, HQ mariadbd {:.2} s", cpu2.0 - cpu1.0, cpu2.1 - cpu1.1);
    let n: i64 = c.query_first("SELECT COUNT(*) FROM bench_obs_raw").await.unwrap().unwrap_or(0);
    assert_eq!(n as u64, id - 1, "LOAD DATA loaded every row");
    c.query_drop("DROP TABLE bench_obs_raw").await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn admin(db: Option<&str>) -> OptsBuilder {
    OptsBuilder::default().ip_or_hostname("127.0.0.1").tcp_port(3310).user(Some("omrs")).pass(Some("omrs")).db_name(db.map(str::to_string)).prefer_socket(false)
}

fn quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> f64 {
    let target = (count as f64 * q).ceil() as u64;
    let mut prev = (0.0, 0u64);
    for &(le, c) in buckets {
        if c >= target {
            let span = (c - prev.1).max(1) as f64;
            return prev.0 + (le - prev.0) * ((target - prev.1) as f64 / span);
        }
        prev = (le, c);
    }
    f64::INFINITY
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    omrs_core::runtime::disable_transparent_huge_pages();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))).with_writer(std::io::stderr).init();
    let patients: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4000);
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let dump = omrs_core::openmrs::default_dump();
    let dump = if dump.is_absolute() { dump } else { root.join(dump) };
    let prefix = format!("bench.{}.", std::process::id());
    let database = "openmrs_hq_bench";

    let mut cfg = Config::load(&root.join("omrs-stream.toml")).expect("omrs-stream.toml");
    cfg.kafka.topic_prefix = prefix.clone();
    cfg.hq.database.database = database.into();
    cfg.hq.database.user = "omrs".into();
    cfg.hq.database.password = "omrs".into();
    let topics = TopicsFile::load(&root.join("topics.toml")).expect("topics.toml").resolve(&cfg.site_names(), &prefix);
    omrs_core::topics::apply(&cfg.kafka, &topics).await.expect("topics apply");

    let init = omrs_sinks::hq_mysql::HqSinkArgs { init: true, force: true, dump, schema_from: None, until_idle: false, metrics_port: None, batch_rows: None, quiet: true };
    omrs_sinks::hq_mysql::run(&cfg, &init).await.expect("HQ --init");
    let mut c = Conn::new(admin(Some(database))).await.expect("HQ");
    let one = |sql: &'static str| sql;
    let meta = bench_common::meta(&mut c).await;

    // Pre-fill.
    let topic = format!("{prefix}omrs.hq.changes");
    let producer: FutureProducer = omrs_core::kafka::client_config(&cfg.kafka).set("linger.ms", "20").set("compression.type", "lz4").set("queue.buffering.max.messages", "1000000").create().unwrap();
    let mut seq = 0;
    let ts = chrono::Utc::now().timestamp_millis();
    let rows = bench_common::prefill(&producer, &topic, "site-a", &meta, patients, 100_000, &mut seq, ts).await;
    producer.flush(Duration::from_secs(60)).unwrap();
    eprintln!("pre-filled {rows} events ({patients} patients)");

    let raw_before = raw_inserts(&mut c, rows).await;

    // The sink, to the end of the topic.
    // BENCH_BATCH_ROWS overrides sinks.hq_mysql.batch_max_rows, to compare batch sizes.
    let batch_rows = std::env::var("BENCH_BATCH_ROWS").ok().and_then(|v| v.parse().ok());
    let args = omrs_sinks::hq_mysql::HqSinkArgs { init: false, force: false, dump: Default::default(), schema_from: None, until_idle: true, metrics_port: None, batch_rows, quiet: true };
    let cpu0 = cpu_now();
    let t0 = Instant::now();
    omrs_sinks::hq_mysql::run(&cfg, &args).await.expect("sink");
    let secs = t0.elapsed().as_secs_f64();

    let cpu1 = cpu_now();
    eprintln!(
        "CPU during the sink run: this process {:.2} s, HQ mariadbd {:.2} s, Kafka {:.2} s",
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        cpu1.2 - cpu0.2
    );
    let obs: i64 = c.query_first(one("SELECT COUNT(*) FROM obs")).await.unwrap().unwrap();
    assert!(obs as u64 >= patients * 24, "only {obs} obs at HQ");
    let sink_rate = rows as f64 / secs;
    eprintln!("sink: {rows} rows in {secs:.1} s = {sink_rate:.0} rows/s");

    // Raw multi-row INSERT ceiling on the same server, measured before the sink's run and
    // after it: the mean of the two, so that a slow spell of the (shared) machine during one
    // phase does not tilt the ratio.
    let raw_after = raw_inserts(&mut c, rows).await;
    let raw_rate = (raw_before + raw_after) / 2.0;
    eprintln!("raw multi-row INSERT: {raw_before:.0} rows/s before the sink, {raw_after:.0} after; mean {raw_rate:.0} rows/s");
    // LOAD DATA right after the second INSERT run: compared with that one, the nearest in time.
    let load_rate = raw_load_data(database, rows).await;

    // Latency at a steady 2,000 events/s.
    let live = tokio::spawn({
        let cfg = cfg.clone();
        let args = omrs_sinks::hq_mysql::HqSinkArgs { until_idle: false, ..args.clone() };
        async move { omrs_sinks::hq_mysql::run(&cfg, &args).await }
    });
    // The live phase's events come from "site-b": its histogram holds only them.
    let h = omrs_core::metrics::metrics().hq_e2e_latency.with_label_values(&["site-b"]);
    let rate = 2000.0;
    let secs_live = 20.0;
    let start = Instant::now();
    let live_partition = bench_common::site_partition(&producer, &topic, "site-b");
    let mut sent = 0u64;
    let mut i = 1_000_000u64;
    while start.elapsed().as_secs_f64() < secs_live {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            for ev in patient("site-b", &meta, i, &mut seq, chrono::Utc::now().timestamp_millis()) {
                let payload = ev.to_json();
                let _ = producer.send_result(FutureRecord::to(&topic).partition(live_partition).key(&ev.key()).payload(&payload));
                sent += 1;
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.get_sample_count() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live.abort();
    let mf = omrs_core::metrics::metrics().registry.gather();
    let fam = mf.iter().find(|f| f.name() == omrs_core::metrics::HQ_E2E_LATENCY).expect("latency histogram");
    let metric = fam
        .get_metric()
        .iter()
        .find(|m| m.get_label().iter().any(|l| l.value() == "site-b"))
        .expect("site-b latency");
    let hist = metric.get_histogram();
    let total = hist.get_sample_count();
    let buckets: Vec<(f64, u64)> = hist.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
    let p50 = quantile(&buckets, total, 0.5);
    let p99 = quantile(&buckets, total, 0.99);

    let admin_conn = Conn::new(admin(None)).await;
    if let Ok(mut a) = admin_conn {
        let _ = a.query_drop(format!("DROP DATABASE IF EXISTS `{database}`")).await;
    }
    let adm: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = omrs_core::kafka::client_config(&cfg.kafka).create().unwrap();
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = adm.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;

    println!("BENCH hq_sink_rows_per_s {sink_rate:.0} rows/s");
    println!("BENCH hq_raw_insert_rows_per_s {raw_rate:.0} rows/s");
    println!("BENCH hq_sink_vs_raw_ratio {:.2} ratio", sink_rate / raw_rate);
    println!("BENCH hq_raw_load_data_rows_per_s {load_rate:.0} rows/s");
    println!("BENCH hq_load_data_vs_insert_ratio {:.2} ratio", load_rate / raw_after);

    println!("BENCH hq_latency_p50_at_2000_eps {p50:.3} s");
    println!("BENCH hq_latency_p99_at_2000_eps {p99:.3} s");
}

/// CPU seconds (user + system) used so far by process `pid` ("self" for this one), from
/// /proc; 0 when it cannot be read.
fn cpu_of(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// The pid of the first process whose command line matches `pattern` (the dev services'
/// layout: `scripts/dev-up`), or "0".
fn pid_of(pattern: &str) -> String {
    std::process::Command::new("pgrep")
        .arg("-f")
        .arg(pattern)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "0".into())
}

/// CPU seconds of (this process, HQ's mariadbd, the Kafka broker).
fn cpu_now() -> (f64, f64, f64) {
    (cpu_of("self"), cpu_of(&pid_of("mariadb/hq/my.cnf")), cpu_of(&pid_of("kafka.Kafka")))
}
