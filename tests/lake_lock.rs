//! Issue 22 §4.4 on real services: `sink parquet --compact` next to a running Parquet sink on
//! the same lake. The sink is paused in the middle of a commit (failpoint `lake:after-data-tmp`
//! with a gate file): its file set is written and fsynced under `_tmp/`, the manifest entry is
//! not written yet. `--compact` must then fail at once, naming the lake and the running sink,
//! and leave those temp files alone; the sink commits them once it goes on. A second sink on
//! the lake is refused the same way. After a SIGKILL of the sink the kernel has released its
//! lock (no stale lock file to clean): `--compact` runs, and `current.person` holds the row.
//! Its own test binary: it holds a paused sink for a while.

mod common;

use std::path::{Path, PathBuf};

use common::hq::*;
use common::pipeline::*;
use common::*;
use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::hq::HqEvent;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Map, Value as J};

const PERSON: &str = "44444444-0000-4000-8000-000000000001";

fn person_change() -> Vec<u8> {
    let obj = |v: J| match v {
        J::Object(m) => m,
        _ => Map::new(),
    };
    HqEvent::Change {
        late: false,
        person: Some(PERSON.into()),
        origin_refs: Map::new(),
        event: ChangeEvent {
            op: Op::Create,
            site: "site-a".into(),
            table: Some("person".into()),
            key: Some(obj(json!({ "person_id": 900 }))),
            uuid: Some(PERSON.into()),
            before: None,
            after: Some(obj(json!({"person_id": 900, "gender": "F", "dead": 0, "creator": 1, "date_created": "2026-01-01 10:00:00", "voided": 0, "uuid": PERSON}))),
            refs: obj(json!({ "creator": "55555555-0000-4000-8000-000000000001" })),
            source: Source { server_id: 11, gtid: None, file: "binlog.000001".into(), pos: 4, row: 0, ts_ms: 1_790_000_000_000, snapshot: false },
            ts_ms: 1_790_000_000_000,
            oversize: None,
            schema: None,
        },
    }
    .to_json()
}

/// Every `.parquet` file under `dir`.
fn parquet_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_next_to_a_running_sink_is_refused_and_the_sinks_commit_survives() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tlock")), database: unique("lklock") };
    let hq_db = unique("openmrs_hq_lock");
    let lake = p.dir.path().join("lake");
    let lake_text = path_str(&lake);
    let cfg = p.config(
        &hq_db,
        &[
            ("${OMRS_LAKE:-/var/lib/omrs-stream/lake}", lake_text.as_str()),
            ("roll_interval_ms = 10000", "roll_interval_ms = 300"),
            ("compact_interval_s = 60", "compact_interval_s = 0"),
            ("schema_from_hq = false", "schema_from_hq = true"),
        ],
    );
    p.run(&cfg, &["topics", "apply"]);
    // A record produced by hand carries no table shape: the lake's table model comes from HQ.
    p.run(&cfg, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);

    // The sink, paused inside its first commit.
    let gate = p.dir.path().join("gate");
    std::fs::write(&gate, b"").unwrap();
    let log = p.dir.path().join("sink-parquet.log");
    let args: Vec<String> = ["sink", "parquet", "--metrics-port", "0", "--quiet"].map(String::from).to_vec();
    let env = [("OMRS_FAILPOINT".to_string(), "lake:after-data-tmp".to_string()), ("OMRS_FAILPOINT_GATE".to_string(), path_str(&gate))];
    let mut sink = Proc { name: "sink-parquet".into(), child: start_env(&cfg, &args, &log, &env), args, starts: 1 };
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    producer
        .send(FutureRecord::<(), _>::to(&format!("{}omrs.hq.changes", p.prefix)).partition(0).payload(&person_change()), std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_or(120, "the sink to pause inside its commit", read_log, || read_log().contains("failpoint reached: paused").then_some(()));
    assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", read_log());
    let pending = parquet_under(&lake.join("_tmp"));
    assert!(!pending.is_empty(), "the paused sink has its file set in _tmp/");
    assert!(parquet_under(&lake.join("changes")).is_empty(), "nothing committed yet");

    // --compact on the same lake, now.
    let out = bin().arg("--config").arg(&cfg).args(["sink", "parquet", "--compact"]).env("RUST_LOG", "warn").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let left = pending.iter().filter(|f| f.exists()).count();
    // The paused sink goes on: its file lands under its final name, or it dies.
    std::fs::remove_file(&gate).unwrap();
    let landed = wait_for_or(120, "the sink to commit its file set or exit", read_log, || {
        if let Some(status) = sink.child.try_wait().unwrap() {
            return Some(Err(status));
        }
        let files = parquet_under(&lake.join("changes").join("person"));
        (!files.is_empty()).then_some(Ok(files))
    });
    eprintln!("--compact next to the sink: exit {:?}, {}; temp files left {left}/{}; the sink after: {landed:?}", out.status.code(), err.trim(), pending.len());

    assert_eq!(out.status.code(), Some(1), "--compact next to a running sink must fail; stderr:\n{err}");
    assert!(err.contains(&format!("{} is in use: a Parquet sink is running there", lake.display())), "{err}");
    assert!(err.contains(&format!("pid {}, sink parquet, since ", sink.child.id())), "names the sink's pid: {err}");
    assert!(err.contains("Stop it first") && err.contains("compact_interval_s"), "{err}");
    assert_eq!(left, pending.len(), "the running sink's fsynced, uncommitted files are still in _tmp/");
    let landed = landed.unwrap_or_else(|status| panic!("the sink died ({status}) after --compact ran next to it:\n{}", read_log()));
    assert_eq!(landed.len(), 1, "{landed:?}");
    assert!(sink.child.try_wait().unwrap().is_none(), "the sink still runs:\n{}", read_log());

    // A second sink on the lake is refused too.
    let second = bin().arg("--config").arg(&cfg).args(["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]).env("RUST_LOG", "warn").output().unwrap();
    let second_err = String::from_utf8_lossy(&second.stderr).to_string();
    assert_eq!(second.status.code(), Some(1), "a second sink on the lake must fail; stderr:\n{second_err}");
    assert!(second_err.contains("is in use: a Parquet sink is running there") && second_err.contains("one writer"), "{second_err}");

    // A crash releases the lock: no stale lock to remove by hand.
    kill9(&mut sink.child);
    let out = bin().arg("--config").arg(&cfg).args(["sink", "parquet", "--compact"]).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "--compact after the sink died: {}", String::from_utf8_lossy(&out.stderr));
    assert!(parquet_under(&lake.join("_tmp")).is_empty(), "nothing left in _tmp/");
    let q = bin().arg("--config").arg(&cfg).args(["query", "--format", "csv", "SELECT uuid, gender FROM current.person"]).output().unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert_eq!(String::from_utf8_lossy(&q.stdout).trim(), format!("uuid,gender\n{PERSON},F"));

    drop(sink);
    drop_databases(&[&hq_db], &p.database).await;
}
