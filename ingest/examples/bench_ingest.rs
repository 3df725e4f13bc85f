//! Catch-up benchmark of the ingest agent (run by `scripts/bench-ingest`, release build).
//!
//! 1. A fresh site database from the OpenMRS demo dump, snapshotted by the agent.
//! 2. The simulator writes an obs-heavy OpenMRS workload into it (burst) while the agent is
//!    stopped, so the work sits in the binlog.
//! 3. Raw decode: mysql_async reads the same binlog range and decodes every row of the database
//!    (no conversion, no Kafka) — the ceiling.
//! 4. The agent catches up: binlog → change events → committed Kafka transactions.
//!
//! 5. With `--debezium` (a Kafka Connect worker from `deploy/debezium/debezium-up
//!    --worker-only` on 127.0.0.1:8083): Debezium's MariaDB connector snapshots the database
//!    before the workload (paused meanwhile), then reads the same binlog range into its topics
//!    (timed), and `ingest --from-debezium` turns them into committed change events (timed), to
//!    set the Debezium path beside the agent.
//!
//! Prints `BENCH <name> <value> <unit>` lines last.
//!
//! With `--check` after the patient count, the rows of the range are also encoded both ways
//! (mysql_common rows → `convert::binlog_value` maps → serde_json, and `encode::TablePlan`
//! straight from the event), untimed, and every image must come out byte for byte the same.

use std::time::Instant;

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, OptsBuilder};
use mysql_common::binlog::events::{EventData, RowsEventData, TableMapEvent};
use omrs_core::config::{Config, TopicsFile};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn admin(port: u16, db: Option<&str>) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("omrs"))
        .pass(Some("omrs"))
        .db_name(db.map(str::to_string))
        .prefer_socket(false)
}

async fn master_status(c: &mut Conn) -> (String, u64) {
    let r: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    (r.get(0).unwrap(), r.get(1).unwrap())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    omrs_core::runtime::disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let patients: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(6000);
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let dump = std::env::var("OMRS_DEMO_DUMP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("../shared/openmrs-demo/openmrs-standalone-demo-db-2.6.0.sql.gz"));
    let database = "bench_ingest";
    let prefix = format!("bench.{}.", std::process::id());

    let mut cfg = Config::load(&root.join("omrs-stream.toml")).unwrap();
    cfg.kafka.topic_prefix = prefix.clone();
    cfg.sites.truncate(1);
    cfg.sites[0].database.database = database.into();
    let site = cfg.sites[0].clone();
    let port = site.database.port;
    let topics = TopicsFile::load(&root.join("topics.toml")).unwrap().resolve(&cfg.site_names(), &prefix);
    omrs_core::topics::apply(&cfg.kafka, &topics).await.unwrap();

    let mut c = Conn::new(admin(port, None)).await.unwrap();
    omrs_simulate::provision::provision(&mut c, &site.name, database, &dump, true).await.unwrap();
    let args = omrs_ingest::IngestArgs { sites: vec![site.name.clone()], all_sites: false, until_caught_up: true, resnapshot: false, from_debezium: false, metrics_port: None, quiet: true };
    let t = Instant::now();
    omrs_ingest::run(&cfg, &args).await.unwrap();
    let snapshot_secs = t.elapsed().as_secs_f64();
    eprintln!("snapshot of the demo dump: {snapshot_secs:.1} s");
    // Debezium's snapshot of the same database, then its connector paused for the workload; the
    // input takes the snapshot's records untimed.
    let dbz = std::env::args().any(|a| a == "--debezium").then(|| dbz::Bench::start(&cfg, database, port, &prefix));
    if let Some(d) = &dbz {
        d.catch_up(&root).await;
    }

    // The workload, written while the agent is stopped.
    let (from_file, from_pos) = master_status(&mut c).await;
    let sim = omrs_simulate::SimulateArgs {
        sites: 1,
        patients,
        dup_fraction: 0.0,
        seed: 11,
        burst: true,
        manifest: std::env::temp_dir().join("bench-ingest-manifest.json"),
        database: Some(database.into()),
        no_provision: true,
        dump: dump.clone(),
        demo_site: "none".into(),
        quiet: true,
        ..Default::default()
    };
    let m = omrs_simulate::run(&cfg, &sim).await.unwrap();
    let (to_file, to_pos) = master_status(&mut c).await;
    eprintln!("workload: {} row changes in the binlog ({from_file}:{from_pos} .. {to_file}:{to_pos})", m.row_changes);

    // Raw decode of the same range.
    let mut raw_rows = 0u64;
    let raw_secs = each_rows_event(port, database, (&from_file, from_pos), (&to_file, to_pos), |tme, re, _, _| {
        for row in re.rows(tme) {
            row.unwrap();
            raw_rows += 1;
        }
    })
    .await;
    if std::env::args().any(|a| a == "--check") {
        check_encode(port, database, (&from_file, from_pos), (&to_file, to_pos)).await;
    }

    // The agent catches up.
    let rss0 = rss_kib();
    let t = Instant::now();
    omrs_ingest::run(&cfg, &args).await.unwrap();
    let agent_secs = t.elapsed().as_secs_f64();
    let rss1 = rss_kib();
    let tracked = omrs_core::metrics::metrics().ref_cache_entries.with_label_values(&[&site.name]).get().max(1) as u64;
    let events_out: u64 = omrs_core::metrics::metrics().kafka_transactions.with_label_values(&["ingest", &site.name]).get();
    // The Debezium path over the same range: the connector, then the input.
    let dbz_secs = match &dbz {
        Some(d) => {
            let connector = d.resume_and_time(raw_rows);
            Some((connector, d.catch_up(&root).await))
        }
        None => None,
    };
    if let Some(d) = &dbz {
        d.stop(&cfg).await;
    }

    // Clean up.
    let _ = c.query_drop(format!("DROP DATABASE `{database}`")).await;
    let admin_client: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        omrs_core::kafka::client_config(&cfg.kafka).create().unwrap();
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    let _ = admin_client.delete_topics(&names, &rdkafka::admin::AdminOptions::new()).await;

    let raw_rate = raw_rows as f64 / raw_secs;
    let agent_rate = raw_rows as f64 / agent_secs;
    let commit = omrs_core::metrics::metrics().batch_latency.with_label_values(&["ingest"]);
    eprintln!("time waiting for the producer task: {:.1} s over {} batches", commit.get_sample_sum(), commit.get_sample_count());
    println!("BENCH snapshot_demo_dump_seconds {snapshot_secs:.1} s");
    println!("BENCH ingest_rows {raw_rows} rows");
    println!("BENCH raw_decode_rate {raw_rate:.0} rows/s");
    println!("BENCH ingest_catchup_rate {agent_rate:.0} rows/s");
    println!("BENCH ingest_vs_raw {:.2} ratio", agent_rate / raw_rate);
    println!("BENCH ingest_kafka_transactions {events_out} txns");
    println!("BENCH ref_cache_entries {tracked} rows");
    println!("BENCH memory_per_tracked_row {:.0} bytes", (rss1.saturating_sub(rss0) * 1024) as f64 / tracked as f64);
    if let Some((connector, input)) = dbz_secs {
        println!("BENCH debezium_connector_rate {:.0} rows/s", raw_rows as f64 / connector);
        println!("BENCH debezium_input_rate {:.0} rows/s", raw_rows as f64 / input);
        println!("BENCH debezium_path_rate {:.0} rows/s", raw_rows as f64 / (connector + input));
        println!("BENCH debezium_path_vs_agent {:.2} ratio", (raw_rows as f64 / (connector + input)) / agent_rate);
    }
}

/// The Debezium side of the benchmark (module docs, step 5).
mod dbz {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use omrs_core::config::{Config, DebeziumConfig, ModelSource, TopicsFile};
    use rdkafka::consumer::{BaseConsumer, Consumer};

    const REST: &str = "http://127.0.0.1:8083";

    pub struct Bench {
        name: String,
        topic_prefix: String,
        database: String,
        /// The input's own pipeline prefix (its omrs.cdc and checkpoint topics).
        cfg: Config,
    }

    fn curl(args: &[&str]) -> String {
        let out = Command::new("curl").args(["-sS", "--max-time", "30"]).args(args).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    impl Bench {
        /// The connector, registered; back once its snapshot is in its topics, paused.
        pub fn start(cfg: &Config, database: &str, port: u16, prefix: &str) -> Bench {
            let name = format!("{prefix}bench");
            let topic_prefix = format!("{prefix}dbz");
            let body = serde_json::json!({"name": name, "config": {
                "connector.class": "io.debezium.connector.mariadb.MariaDbConnector", "tasks.max": "1",
                "database.hostname": "127.0.0.1", "database.port": port.to_string(), "database.user": "cdc", "database.password": "cdc",
                "database.server.id": (5300 + std::process::id() % 90).to_string(), "database.include.list": database,
                "topic.prefix": topic_prefix, "snapshot.mode": "initial", "include.schema.changes": "true",
                "decimal.handling.mode": "string", "heartbeat.interval.ms": "1000", "connect.keep.alive.interval.ms": "2500",
                "schema.history.internal.kafka.bootstrap.servers": cfg.kafka.bootstrap_servers, "schema.history.internal.kafka.topic": format!("{topic_prefix}.schema-history"),
                "topic.creation.default.replication.factor": "1", "topic.creation.default.partitions": "1",
                "value.converter": "org.apache.kafka.connect.json.JsonConverter", "value.converter.schemas.enable": "false",
                "value.converter.replace.null.with.default": "false",
                "key.converter": "org.apache.kafka.connect.json.JsonConverter", "key.converter.schemas.enable": "false"}});
            let out = curl(&["-X", "POST", "-H", "Content-Type: application/json", "--data", &body.to_string(), &format!("{REST}/connectors")]);
            assert!(!out.contains("error_code") && !out.is_empty(), "registering the connector (is deploy/debezium/debezium-up --worker-only running?): {out}");
            let mut input = cfg.clone();
            input.kafka.topic_prefix = format!("{prefix}dbzin.");
            let mut site = input.sites[0].clone();
            site.debezium = Some(DebeziumConfig {
                topic_prefix: topic_prefix.clone(),
                database: None,
                schemas: false,
                model: ModelSource::Site,
                heartbeat_topic: None,
                order_grace_ms: 500,
                ref_wait_ms: 30_000,
                kafka: None,
            });
            input.sites = vec![site];
            let b = Bench { name, topic_prefix, database: database.into(), cfg: input };
            // The snapshot is in once the topics stop growing.
            let mut last = (0, Instant::now());
            wait("Debezium's snapshot", 600, || {
                let n = b.records();
                if n != last.0 {
                    last = (n, Instant::now());
                }
                n > 0 && last.1.elapsed() > Duration::from_secs(3)
            });
            curl(&["-X", "PUT", &format!("{REST}/connectors/{}/pause", b.name)]);
            wait("the connector paused", 60, || curl(&[&format!("{REST}/connectors/{}/status", b.name)]).matches("PAUSED").count() >= 2);
            eprintln!("Debezium snapshot: {} records; connector paused", b.records());
            b
        }

        /// Records in the connector's table topics (tombstones included).
        fn records(&self) -> i64 {
            let Ok(c) = omrs_core::kafka::client_config(&self.cfg.kafka).create::<BaseConsumer>() else { return 0 };
            let Ok(md) = c.fetch_metadata(None, Duration::from_secs(10)) else { return 0 };
            let tables = format!("{}.{}.", self.topic_prefix, self.database);
            md.topics()
                .iter()
                .filter(|t| t.name().starts_with(&tables))
                .filter_map(|t| c.fetch_watermarks(t.name(), 0, Duration::from_secs(10)).ok())
                .map(|(_, high)| high)
                .sum()
        }

        /// Resumes the connector; seconds until `rows` more row records are in its topics and
        /// they stop growing (the growth's end, not the wait after it).
        pub fn resume_and_time(&self, rows: u64) -> f64 {
            let base = self.records();
            curl(&["-X", "PUT", &format!("{REST}/connectors/{}/resume", self.name)]);
            let t = Instant::now();
            let mut last = (base, t.elapsed());
            wait("Debezium over the workload's binlog range", 1800, || {
                let n = self.records();
                if n != last.0 {
                    last = (n, t.elapsed());
                }
                n >= base + rows as i64 && t.elapsed() - last.1 > Duration::from_secs(2)
            });
            eprintln!("Debezium: {} records in {:.1} s", last.0 - base, last.1.as_secs_f64());
            last.1.as_secs_f64()
        }

        /// `ingest --from-debezium --until-caught-up`; its seconds.
        pub async fn catch_up(&self, root: &std::path::Path) -> f64 {
            let topics = TopicsFile::load(&root.join("topics.toml")).unwrap().resolve(&self.cfg.site_names(), &self.cfg.kafka.topic_prefix);
            omrs_core::topics::apply(&self.cfg.kafka, &topics).await.unwrap();
            let args = omrs_ingest::IngestArgs { sites: vec![self.cfg.sites[0].name.clone()], all_sites: false, until_caught_up: true, resnapshot: false, from_debezium: true, metrics_port: None, quiet: true };
            let t = Instant::now();
            omrs_ingest::run(&self.cfg, &args).await.unwrap();
            t.elapsed().as_secs_f64()
        }

        /// The connector and every topic of this run.
        pub async fn stop(&self, cfg: &Config) {
            curl(&["-X", "DELETE", &format!("{REST}/connectors/{}", self.name)]);
            let Ok(c) = omrs_core::kafka::client_config(&cfg.kafka).create::<BaseConsumer>() else { return };
            let Ok(md) = c.fetch_metadata(None, Duration::from_secs(10)) else { return };
            let heartbeat = format!("__debezium-heartbeat.{}", self.topic_prefix);
            let names: Vec<String> = md
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .filter(|n| n.starts_with(&self.topic_prefix) || n.starts_with(&self.cfg.kafka.topic_prefix) || *n == heartbeat)
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = omrs_core::kafka::client_config(&cfg.kafka).create().unwrap();
            let _ = admin.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;
        }
    }
}

/// Reads the binlog range from `from` to `to` and hands every rows event of `database` to `f`,
/// with its table map, file and end position. Returns the seconds it took once the stream was
/// open.
async fn each_rows_event(
    port: u16,
    database: &str,
    from: (&str, u64),
    to: (&str, u64),
    mut f: impl FnMut(&TableMapEvent<'_>, &RowsEventData<'_>, &str, u32),
) -> f64 {
    let mut conn = Conn::new(admin(port, None)).await.unwrap();
    conn.query_drop("SET @mariadb_slave_capability = 4").await.unwrap();
    let fb = from.0.to_string().into_bytes();
    let mut stream = conn
        .get_binlog_stream(BinlogStreamRequest::new(1_999_999_999).with_filename(&fb).with_pos(from.1))
        .await
        .unwrap();
    let t = Instant::now();
    let mut cur_file = from.0.to_string();
    let mut first = true;
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        let h = ev.header();
        if h.event_type_raw() == 4 {
            if !first {
                if let Ok(Some(EventData::RotateEvent(r))) = ev.read_data() {
                    cur_file = r.name().trim_end_matches('\0').to_string();
                }
            }
            first = false;
            continue;
        } else if let Ok(Some(EventData::RowsEvent(re))) = ev.read_data() {
            if let Some(tme) = stream.get_tme(re.table_id()) {
                if tme.database_name() == database {
                    f(tme, &re, &cur_file, h.log_pos());
                }
            }
        }
        first = false;
        if (cur_file.as_str(), h.log_pos() as u64) >= to {
            break;
        }
    }
    t.elapsed().as_secs_f64()
}

/// Both encodings of every row image in the range agree (see the module docs).
async fn check_encode(port: u16, database: &str, from: (&str, u64), to: (&str, u64)) {
    use omrs_ingest::convert::binlog_value;
    let mut q = Conn::new(admin(port, Some(database))).await.unwrap();
    let model = omrs_core::model::Model::load(&mut q, database, &[], &[]).await.unwrap();
    let mut resolver = omrs_ingest::refs::Resolver::new(16);
    let mut enc = omrs_ingest::encode::RowEncoder::default();
    let mut rows_checked = 0u64;
    each_rows_event(port, database, from, to, |tme, re, file, pos| {
        let Some(table) = model.table(&tme.table_name()) else { return };
        let plan = omrs_ingest::encode::TablePlan::new(tme, table.clone(), &[], "s", &model, &mut resolver).unwrap();
        let bb: Option<Vec<bool>> = re.columns_before_image().map(|b| b.iter().by_vals().collect());
        let ab: Option<Vec<bool>> = re.columns_after_image().map(|b| b.iter().by_vals().collect());
        let mut buf = mysql_common::io::ParseBuf(re.rows_data());
        for row in re.rows(tme) {
            let (b, a) = row.unwrap();
            plan.decode_row(&mut buf, bb.as_deref(), ab.as_deref(), &mut enc).unwrap();
            for (old, after) in [(b, false), (a, true)] {
                let want = old.map(|r| {
                    let mut m = serde_json::Map::new();
                    for (i, col) in r.columns_ref().iter().enumerate() {
                        let name = col.name_str();
                        let v = r.as_ref(i).map(|v| binlog_value(v, col, table.enums.get(name.as_ref()))).unwrap_or(serde_json::Value::Null);
                        m.insert(name.into_owned(), v);
                    }
                    serde_json::to_vec(&m).unwrap()
                });
                assert_eq!(
                    want.as_deref().map(String::from_utf8_lossy),
                    enc.image_json(after).map(String::from_utf8_lossy),
                    "{} row at {file}:{pos}",
                    table.name
                );
            }
            rows_checked += 1;
        }
        assert!(buf.is_empty(), "rows left over");
    })
    .await;
    eprintln!("encode check: {rows_checked} rows, every image identical in both encodings");
}
