//! The bad-input corpus (issue #10): `tests/corpus/*.jsonl`, over a thousand records that are
//! broken in the ways records break (invalid JSON, truncation, invalid UTF-8, unknown op, table
//! or site, missing fields and uuids, wrong types, impossible dates, strings over their column,
//! a 7 MB row, references to rows nobody has, duplicates), with good records between them. They
//! are fed straight into a site topic and into `omrs.hq.changes` while the transform and both
//! sinks run on the real broker and HQ. Then:
//! - no process exited;
//! - every bad record is in `omrs.dlq` with a reason that names its problem;
//! - every good record is at HQ (once) and in the lake, and has no dead letter;
//! - a summary counts the cases by outcome and by the stage that dead-lettered them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine as _;
use common::pipeline::*;
use common::*;
use mysql_async::prelude::Queryable;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value as J;

#[derive(serde::Deserialize)]
struct Case {
    id: String,
    topic: String,
    expect: String,
    #[serde(default)]
    reason: Vec<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
    category: String,
}

const BAD_UUID: &str = "deadbeef-0000-4000-8000-00000000dead";

fn load_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for f in ["hand.jsonl", "generated.jsonl"] {
        let path = root().join("tests/corpus").join(f);
        for (i, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            v.push(serde_json::from_str::<Case>(line).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1)));
        }
    }
    v
}

/// The `key` object of a record that parses, compact: how a dead letter of a later stage
/// (whose payload is the transform's output) is traced back to its case.
fn key_marker(payload: &[u8]) -> Option<String> {
    let v: J = serde_json::from_slice(payload).ok()?;
    let ev = v.get("event").unwrap_or(&v);
    let key = ev.get("key")?;
    key.is_object().then(|| serde_json::to_string(key).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_record_is_dead_lettered_with_its_reason_and_the_good_ones_land() {
    let p = hq::Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tcorp")), database: unique("corpus") };
    let (prefix, dir) = (p.prefix.clone(), &p.dir);
    let hq_db = unique("openmrs_hq_c");
    let lake = dir.path().join("lake");
    let lake_line = format!("path = \"{}\"", lake.display());
    let config = p.config(
        &hq_db,
        &[
            ("idle_timeout_s = 5", "idle_timeout_s = 2"),
            ("fk_wait_timeout_s = 600", "fk_wait_timeout_s = 2"),
            ("path = \"${OMRS_LAKE:-/var/lib/omrs-stream/lake}\"", &lake_line),
            ("roll_interval_ms = 10000", "roll_interval_ms = 500"),
            // Records produced by hand carry no table shapes: the lake's schema is HQ's.
            ("schema_from_hq = false", "schema_from_hq = true"),
        ],
    );
    let run = |args: &[&str]| {
        let out = bin().arg("--config").arg(&config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["topics", "apply"]);
    run(&["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let mut hq = admin(3310, Some(&hq_db)).await;
    let user: String = hq.query_first("SELECT uuid FROM users ORDER BY user_id LIMIT 1").await.unwrap().unwrap();

    // Feed every case, in file order, recording where each landed.
    let cases = load_cases();
    assert!(cases.len() >= 1000, "the corpus has {} cases", cases.len());
    let big = "x".repeat(7_000_000);
    let huge = "y".repeat(8_340_000);
    let fill = |s: &str| s.replace("{USER}", &user).replace("{BAD_UUID}", BAD_UUID).replace("{BIG_TEXT}", &big).replace("{HUGE_TEXT}", &huge);
    let cdc_topic = format!("{prefix}omrs.cdc.site-a");
    let hq_topic = format!("{prefix}omrs.hq.changes");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .set("message.max.bytes", "9000000")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let mut at: Vec<(String, i32, i64, Option<String>)> = Vec::with_capacity(cases.len());
    for c in &cases {
        let bytes = match (&c.payload, &c.payload_b64) {
            (Some(p), _) => fill(p).into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
            _ => panic!("{}: no payload", c.id),
        };
        let topic = if c.topic == "cdc" { &cdc_topic } else { &hq_topic };
        let delivery = producer
            .send(FutureRecord::<(), _>::to(topic).partition(0).payload(&bytes), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("{}: producing {} bytes: {e}", c.id, bytes.len()));
        at.push((topic.clone(), delivery.partition, delivery.offset, key_marker(&bytes)));
    }

    // The pipeline, as long-running processes.
    let mut procs: Vec<Proc> = [("transform", &["transform"][..]), ("sink-hq-mysql", &["sink", "hq-mysql", "--quiet"]), ("sink-parquet", &["sink", "parquet", "--quiet"])]
        .into_iter()
        .map(|(name, a)| {
            let args: Vec<String> = a.iter().map(|s| s.to_string()).chain(["--metrics-port".into(), "0".into()]).collect();
            let child = start(&config, &args, &dir.path().join(format!("{name}.log")));
            Proc { name: name.to_string(), args, child, starts: 1 }
        })
        .collect();
    let logs = || {
        ["transform.log", "sink-hq-mysql.log", "sink-parquet.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains("record dead-lettered")).collect();
                format!("--- {f}\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Dead letters per case: by source position, or (past the transform) by the record's key.
    let dlq_topic = format!("{prefix}omrs.dlq");
    let match_dlq = |dlq: &[J]| -> Vec<Vec<(String, String)>> {
        let mut by_pos: HashMap<(String, i32, i64), Vec<(String, String)>> = HashMap::new();
        let mut later: Vec<(String, String, String)> = Vec::new();
        for d in dlq {
            let stage = d["stage"].as_str().unwrap_or("").to_string();
            let reason = d["reason"].as_str().unwrap_or("").to_string();
            let topic = d["topic"].as_str().unwrap_or("").to_string();
            let partition = d["partition"].as_i64().unwrap_or(-1) as i32;
            by_pos.entry((topic, partition, d["offset"].as_i64().unwrap_or(-1))).or_default().push((stage.clone(), reason.clone()));
            later.push((stage, reason, d["payload_text"].as_str().unwrap_or("").to_string()));
        }
        at.iter()
            .enumerate()
            .map(|(i, (topic, partition, offset, marker))| {
                let mut v = by_pos.get(&(topic.clone(), *partition, *offset)).cloned().unwrap_or_default();
                if cases[i].topic == "cdc" {
                    if let Some(m) = marker {
                        let needle = format!("\"key\":{m}");
                        v.extend(later.iter().filter(|(s, _, p)| s != "transform" && p.contains(&needle)).map(|(s, r, _)| (s.clone(), r.clone())));
                    }
                }
                v
            })
            .collect()
    };
    let mut good: Vec<String> = cases.iter().filter(|c| c.expect == "applied").filter_map(|c| c.uuid.clone()).collect();
    good.sort();
    good.dedup();
    let in_list = good.iter().map(|u| format!("'{u}'")).collect::<Vec<_>>().join(",");
    let at_hq_sql = format!("SELECT uuid FROM location WHERE uuid IN ({in_list}) UNION ALL SELECT uuid FROM person WHERE uuid IN ({in_list})");
    let missing = std::cell::RefCell::new(String::new());
    let found = wait_for_or(240, "every bad case dead-lettered and every good one at HQ", || format!("{}\n{}", missing.borrow(), logs()), || {
        for pr in procs.iter_mut() {
            assert!(pr.child.try_wait().unwrap().is_none(), "{} exited\n{}", pr.name, logs());
        }
        let dlq: Vec<J> = read_json(&dlq_topic);
        let found = match_dlq(&dlq);
        let bad_done = cases.iter().zip(&found).all(|(c, f)| c.expect != "dlq" || !f.is_empty());
        let at_hq: Vec<String> = block_on(async { admin(3310, Some(&hq_db)).await.query(at_hq_sql.as_str()).await.unwrap() });
        let mut distinct = at_hq.clone();
        distinct.sort();
        distinct.dedup();
        let good_done = good.iter().all(|u| distinct.contains(u));
        let no_dlq: Vec<&str> = cases.iter().zip(&found).filter(|(c, f)| c.expect == "dlq" && f.is_empty()).map(|(c, _)| c.id.as_str()).collect();
        let not_at_hq: Vec<&String> = good.iter().filter(|u| !distinct.contains(u)).collect();
        *missing.borrow_mut() = format!(
            "{} bad cases without a dead letter (first: {:?}); {} good records not at HQ (first: {:?})",
            no_dlq.len(),
            &no_dlq[..no_dlq.len().min(25)],
            not_at_hq.len(),
            &not_at_hq[..not_at_hq.len().min(10)]
        );
        (bad_done && good_done).then_some((found, at_hq))
    });
    let (found, at_hq) = found;

    // Reasons name the problem; good records have no dead letter and are there once.
    let mut wrong = Vec::new();
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_category: BTreeMap<String, usize> = BTreeMap::new();
    for (c, f) in cases.iter().zip(&found) {
        *by_category.entry(c.category.clone()).or_default() += 1;
        match c.expect.as_str() {
            "dlq" => {
                let wants: Vec<String> = c.reason.iter().map(|r| fill(r).to_lowercase()).collect();
                if !wants.is_empty() && !f.iter().any(|(_, r)| wants.iter().any(|w| r.to_lowercase().contains(w))) {
                    wrong.push(format!("{}: dead-lettered as {f:?}, expected a reason with one of {wants:?}", c.id));
                }
                let mut stages: Vec<&str> = f.iter().map(|(s, _)| s.as_str()).collect();
                stages.sort();
                stages.dedup();
                *by_outcome.entry(format!("dead-lettered by {}", stages.join("+"))).or_default() += 1;
            }
            _ => {
                if !f.is_empty() {
                    wrong.push(format!("{}: a good record was dead-lettered: {f:?}", c.id));
                }
                let n = at_hq.iter().filter(|u| Some(*u) == c.uuid.as_ref()).count();
                if n != 1 {
                    wrong.push(format!("{}: {n} rows at HQ", c.id));
                }
                *by_outcome.entry("applied".into()).or_default() += 1;
            }
        }
    }
    assert!(wrong.is_empty(), "{} cases went wrong:\n{}", wrong.len(), wrong.join("\n"));

    // The good records are in the lake too (once the sink has committed them).
    let lake_sql = format!("SELECT COUNT(DISTINCT uuid) AS n FROM (SELECT uuid FROM changes.location WHERE uuid IN ({in_list}) UNION ALL SELECT uuid FROM changes.person WHERE uuid IN ({in_list}))");
    let last = std::cell::RefCell::new(String::new());
    wait_for_or(120, "the good records in the lake", || format!("last query: {}\n{}", last.borrow(), logs()), || {
        let out = bin().arg("--config").arg(&config).args(["query", "--format", "csv", &lake_sql]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        *last.borrow_mut() = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.success() && text.lines().nth(1).and_then(|l| l.trim().parse::<usize>().ok()) == Some(good.len())).then_some(())
    });
    for pr in procs.iter_mut() {
        assert!(pr.child.try_wait().unwrap().is_none(), "{} exited\n{}", pr.name, logs());
    }
    drop(procs);

    let total = cases.len();
    let n_good = cases.iter().filter(|c| c.expect == "applied").count();
    eprintln!("CORPUS cases={total} bad={} good={n_good} (distinct good rows {})", total - n_good, good.len());
    for (k, n) in &by_outcome {
        eprintln!("  {n:>5}  {k}");
    }
    for (k, n) in &by_category {
        eprintln!("  {n:>5}  category: {k}");
    }
    drop(hq);
    admin(3310, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}

