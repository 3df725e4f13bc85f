//! Benchmark of the Parquet sink and the query layer (run by `scripts/bench-parquet`, release).
//!
//! 1. A fresh HQ database (the lake reads its table model there once).
//! 2. `omrs.hq.changes` pre-filled with the obs-heavy OpenMRS mix of the HQ bench: per patient
//!    a person, a name, a patient, a visit, 2 encounters and 24 obs (80 % obs).
//! 3. `sink parquet --until-idle --no-compact` into an empty lake: rows/s from the pre-filled
//!    topic to committed Parquet (manifest entries written).
//! 4. One compaction (`--compact`): current state of every table and the three views.
//! 5. The two queries of the lake test (encounters per site per month; latest weight per
//!    patient from obs_flat), each run 3 times: median latency.
//!
//! Prints `BENCH <name> <value> <unit>` lines last.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::{Config, TopicsFile};
use rdkafka::producer::{FutureProducer, Producer};

mod bench_common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ENCOUNTERS_PER_MONTH: &str =
    "SELECT site, to_char(date_trunc('month', encounter_datetime), '%Y-%m') AS month, COUNT(*) AS n FROM encounters_flat GROUP BY 1, 2";

fn latest_weight(concept: &str) -> String {
    format!(
        "SELECT COUNT(*) AS patients, AVG(value_numeric) AS avg_latest FROM (SELECT patient_uuid, value_numeric,
           ROW_NUMBER() OVER (PARTITION BY patient_uuid ORDER BY obs_datetime DESC, obs_uuid DESC) AS rn
           FROM obs_flat WHERE concept_uuid = '{concept}') w WHERE rn = 1"
    )
}

async fn median_query(lake: &std::path::Path, sql: &str) -> f64 {
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let ctx = omrs_sinks::query::context(lake).await.expect("lake");
        let rows: usize = omrs_sinks::query::sql(&ctx, sql).await.expect("query").iter().map(|b| b.num_rows()).sum();
        assert!(rows > 0, "{sql}: no rows");
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    omrs_core::runtime::disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let patients: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(41_667);
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let dump = omrs_core::openmrs::default_dump();
    let dump = if dump.is_absolute() { dump } else { root.join(dump) };
    let prefix = format!("benchpq.{}.", std::process::id());
    let database = "openmrs_hq_bench";
    let lake_dir = tempfile::tempdir_in(std::env::var("BENCH_LAKE_DIR").unwrap_or_else(|_| "/var/tmp".into())).expect("lake dir");
    let lake = lake_dir.path().join("lake");

    let mut cfg = Config::load(&root.join("omrs-stream.toml")).expect("omrs-stream.toml");
    cfg.kafka.topic_prefix = prefix.clone();
    cfg.hq.database.database = database.into();
    cfg.hq.database.user = "omrs".into();
    cfg.hq.database.password = "omrs".into();
    cfg.sinks.parquet.path = lake.clone();
    // The pre-filled records carry no table shapes: the lake's schema is HQ's.
    cfg.sinks.parquet.schema_from_hq = true;
    // BENCH_ROLL_BYTES overrides sinks.parquet.roll_max_bytes, to compare file-set sizes.
    if let Some(b) = std::env::var("BENCH_ROLL_BYTES").ok().and_then(|v| v.parse().ok()) {
        cfg.sinks.parquet.roll_max_bytes = b;
    }
    let topics = TopicsFile::load(&root.join("topics.toml")).expect("topics.toml").resolve(&cfg.site_names(), &prefix);
    omrs_core::topics::apply(&cfg.kafka, &topics).await.expect("topics apply");
    let init = omrs_sinks::hq_mysql::HqSinkArgs { init: true, force: true, dump, schema_from: None, until_idle: false, metrics_port: None, batch_rows: None, quiet: true };
    omrs_sinks::hq_mysql::run(&cfg, &init).await.expect("HQ --init");
    let opts = OptsBuilder::default().ip_or_hostname("127.0.0.1").tcp_port(3310).user(Some("omrs")).pass(Some("omrs")).db_name(Some(database)).prefer_socket(false);
    let mut c = Conn::new(opts).await.expect("HQ");
    let meta = bench_common::meta(&mut c).await;
    let weight: String = meta.concept[0].clone();

    let topic = format!("{prefix}omrs.hq.changes");
    let producer: FutureProducer = omrs_core::kafka::client_config(&cfg.kafka)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let mut seq = 0;
    let t0 = Instant::now();
    // Three sites, so that the lake has several site partitions.
    let per = patients / 3;
    let ts = chrono::Utc::now().timestamp_millis();
    let mut rows = 0;
    for (i, site) in ["site-a", "site-b", "site-c"].iter().enumerate() {
        let n = if i == 2 { patients - 2 * per } else { per };
        rows += bench_common::prefill(&producer, &topic, site, &meta, n, 100_000 + i as u64 * 10_000_000, &mut seq, ts).await;
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    eprintln!("pre-filled {rows} events ({patients} patients, {} obs) in {:.1} s", patients * 24, t0.elapsed().as_secs_f64());

    let args = omrs_sinks::parquet::ParquetSinkArgs { until_idle: true, compact: false, no_compact: true, lake: None, metrics_port: None, quiet: true };
    let t0 = Instant::now();
    omrs_sinks::parquet::run(&cfg, &args).await.expect("sink");
    let secs = t0.elapsed().as_secs_f64();
    let rate = rows as f64 / secs;
    let bytes: u64 = walk(&lake.join("changes"));
    eprintln!("sink: {rows} rows in {secs:.1} s = {rate:.0} rows/s, {:.1} MiB of Parquet", bytes as f64 / 1048576.0);

    // The process's peak RSS is reset (clear_refs 5) so that VmHWM afterwards is the
    // compaction's peak; the RSS before it is what the sink's run left mapped.
    let rss_before = status_mib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t0 = Instant::now();
    omrs_sinks::parquet::run(&cfg, &omrs_sinks::parquet::ParquetSinkArgs { compact: true, until_idle: false, ..args.clone() }).await.expect("compact");
    let compact_s = t0.elapsed().as_secs_f64();
    let compact_peak = status_mib("VmHWM:");
    let ctx = omrs_sinks::query::context(&lake).await.expect("lake");
    let obs: i64 = omrs_sinks::query::sql(&ctx, "SELECT COUNT(*) AS n FROM current.obs").await.expect("count")[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .map(|a| a.value(0))
        .unwrap_or(0);
    assert_eq!(obs as u64, patients * 24, "current.obs");
    eprintln!("compaction: {obs} obs in current, {compact_s:.1} s, peak RSS {compact_peak:.0} MiB (RSS before it {rss_before:.0} MiB)");

    let q1 = median_query(&lake, ENCOUNTERS_PER_MONTH).await;
    let q2 = median_query(&lake, &latest_weight(&weight)).await;
    eprintln!("queries: encounters per site per month {q1:.3} s, latest weight per patient {q2:.3} s");

    c.query_drop(format!("DROP DATABASE IF EXISTS {database}")).await.ok();
    println!("BENCH parquet_sink_rows_per_s {rate:.0} rows/s");
    println!("BENCH parquet_bytes_per_row {:.1} B", bytes as f64 / rows as f64);
    println!("BENCH parquet_compaction_{}k_obs {compact_s:.2} s", obs / 1000);
    println!("BENCH parquet_compaction_peak_rss {compact_peak:.0} MiB");
    println!("BENCH query_encounters_per_site_month {:.0} ms", q1 * 1000.0);
    println!("BENCH query_latest_weight_per_patient {:.0} ms", q2 * 1000.0);
}

/// A `/proc/self/status` figure (`VmRSS:`, `VmHWM:`) in MiB; 0 where there is none.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    kb / 1024.0
}

fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum())
        .unwrap_or(0)
}
