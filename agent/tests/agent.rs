//! `omrs-agent`, the clinic-sized binary, against real MariaDB (the OpenMRS demo dump) and real
//! Kafka: it snapshots and streams a clinic by value as `omrs-stream ingest` does (the same
//! code), resumes from its checkpoint, refuses an unknown site before connecting, and carries
//! none of the transform, the sinks or the lake's query engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::{Config, KafkaConfig, TopicsFile};
use omrs_core::envelope::{ChangeEvent, Op};

/// The workspace root (cargo sets `CARGO_MANIFEST_DIR` to agent/ at run time).
fn root() -> PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(manifest).join("..")
}

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_omrs-agent"));
    c.current_dir(root()).env("RUST_LOG", "warn,omrs_ingest=info");
    c
}

fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("{tag}_{}_{}", std::process::id(), n % 1_000_000_000)
}

async fn site_a(db: Option<&str>) -> Conn {
    let opts = OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(3311)
        .user(Some("omrs"))
        .pass(Some("omrs"))
        .db_name(db.map(str::to_string))
        .prefer_socket(false);
    Conn::new(opts).await.expect("connect to site-a (is scripts/dev-up running?)")
}

fn read_topic(topic: &str) -> Vec<ChangeEvent> {
    let mut out = Vec::new();
    omrs_core::kafka::read_to_end(&KafkaConfig::default(), topic, |_, payload, offset| {
        out.push(serde_json::from_slice(payload).map_err(|e| format!("bad record at {topic}@{offset}: {e}"))?);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    out
}

fn run_to_caught_up(config: &std::path::Path) -> Output {
    let out = agent()
        .arg("--config")
        .arg(config)
        .args(["--site", "site-a", "--until-caught-up", "--quiet", "--metrics-port", "0"])
        .output()
        .expect("run omrs-agent");
    assert!(out.status.success(), "omrs-agent failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn help_explains_the_agent() {
    let out = agent().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--site", "--all-sites", "--config", "--until-caught-up", "--from-debezium", "--log-format", "exactly once"] {
        assert!(help.contains(word), "--help lacks `{word}`:\n{help}");
    }
}

#[test]
fn an_unknown_site_is_refused_before_connecting() {
    // The repository's config points at 127.0.0.1; a site that is not in it is named, with the
    // sites that are, and nothing is contacted (no Kafka or MariaDB is needed for this).
    let out = agent().args(["--config", "omrs-stream.toml", "--site", "no-such-clinic", "--metrics-port", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site `no-such-clinic` is not in the config (sites: site-a"), "{err}");
}

#[test]
fn the_agent_carries_no_transform_sink_or_query_engine() {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["tree", "--offline", "--locked", "-p", "omrs-agent", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains(&"omrs-ingest") && crates.contains(&"rdkafka"), "{tree}");
    for heavy in ["omrs-transform", "omrs-sinks", "omrs-simulate", "datafusion", "parquet", "arrow", "arrow-array", "arrow-compute"] {
        assert!(!crates.contains(&heavy), "omrs-agent depends on {heavy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_snapshots_and_streams_a_clinic_by_value() {
    let database = unique("agent");
    let prefix = format!("{}.", unique("tagent"));
    let dump = omrs_core::openmrs::default_dump();
    omrs_simulate::provision::provision(&mut site_a(None).await, "site-a", &database, &dump, true).await.expect("provision the demo dump");
    let mut text = std::fs::read_to_string(root().join("omrs-stream.toml")).unwrap();
    text = text.replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"));
    text = text.replace("database = \"openmrs\"\n", &format!("database = \"{database}\"\n"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("omrs-stream.toml");
    std::fs::write(&config, &text).unwrap();
    let cfg = Config::load(&config).unwrap();
    let want = TopicsFile::load(&root().join("topics.toml")).unwrap().resolve(&cfg.site_names(), &prefix);
    omrs_core::topics::apply(&cfg.kafka, &want).await.expect("topics apply");
    let topic = format!("{prefix}omrs.cdc.site-a");

    // The snapshot: every table's rows, and the people's values as the clinic holds them.
    run_to_caught_up(&config);
    let events = read_topic(&topic);
    let mut per_table: BTreeMap<String, i64> = BTreeMap::new();
    for ev in events.iter().filter(|e| e.op == Op::Read) {
        *per_table.entry(ev.table.clone().unwrap_or_default()).or_default() += 1;
    }
    let mut db = site_a(Some(&database)).await;
    let tables: Vec<String> = db
        .query(format!("SELECT table_name FROM information_schema.tables WHERE table_schema = '{database}' AND table_type = 'BASE TABLE'"))
        .await
        .unwrap();
    let mut compared = 0;
    for t in tables.iter().filter(|t| !cfg.ingest.exclude.contains(t)) {
        let n: i64 = db.query_first(format!("SELECT COUNT(*) FROM `{t}`")).await.unwrap().unwrap();
        assert_eq!(per_table.get(t).copied().unwrap_or(0), n, "snapshot of {t}");
        compared += 1;
    }
    assert_eq!(compared, 138, "148 tables minus 10 excluded");
    let people: Vec<(String, Option<String>, Option<String>)> =
        db.query("SELECT uuid, gender, DATE_FORMAT(birthdate, '%Y-%m-%d') FROM person").await.unwrap();
    let sent: BTreeMap<String, (Option<String>, Option<String>)> = events
        .iter()
        .filter(|e| e.op == Op::Read && e.table.as_deref() == Some("person"))
        .map(|e| {
            let after = e.after.clone().unwrap_or_default();
            let text = |k: &str| after.get(k).and_then(|v| v.as_str()).map(str::to_string);
            (text("uuid").unwrap_or_default(), (text("gender"), text("birthdate")))
        })
        .collect();
    assert_eq!(sent.len(), people.len());
    for (uuid, gender, birthdate) in &people {
        assert_eq!(sent.get(uuid), Some(&(gender.clone(), birthdate.clone())), "person {uuid}");
    }

    // A change at the clinic, then a second run: it resumes from the checkpoint, sends the one
    // update with its values, and re-sends nothing of the snapshot.
    let (uuid, _, _) = people.iter().find(|(_, g, _)| g.as_deref() == Some("M")).cloned().expect("a man in the demo dump");
    db.query_drop(format!("UPDATE person SET gender = 'F', birthdate = '1971-02-03' WHERE uuid = '{uuid}'")).await.unwrap();
    run_to_caught_up(&config);
    let again = read_topic(&topic);
    let new: Vec<&ChangeEvent> = again[events.len()..].iter().filter(|e| e.op != Op::Heartbeat).collect();
    assert_eq!(new.len(), 1, "one change after the restart: {new:?}");
    let ev = new[0];
    assert_eq!((ev.op, ev.table.as_deref(), ev.uuid.as_deref()), (Op::Update, Some("person"), Some(uuid.as_str())));
    let after = ev.after.clone().unwrap_or_default();
    assert_eq!(after.get("gender").and_then(|v| v.as_str()), Some("F"));
    assert_eq!(after.get("birthdate").and_then(|v| v.as_str()), Some("1971-02-03"));
    assert_eq!(ev.before.as_ref().and_then(|b| b.get("gender")).and_then(|v| v.as_str()), Some("M"));

    db.query_drop(format!("DROP DATABASE `{database}`")).await.unwrap();
    let names: Vec<String> = want.iter().map(|t| t.name.clone()).collect();
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;
}
