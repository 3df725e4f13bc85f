//! The HQ sink's per-record failure behaviour, on real Kafka and MariaDB, with hand-made
//! `omrs.hq.changes` records: a row HQ rejects (data too long) and a record that is not JSON go
//! to `omrs.dlq` with their reasons while the rows around them commit; a row whose parent is
//! not at HQ waits in `omrs_sync_pending` and is applied when the parent lands; one whose parent
//! never comes is dead-lettered after `fk_wait_timeout_s`, and one past the pending store's bound
//! at once; with HQ stopped under it, the sink
//! retries without exiting and applies what arrived once HQ is back.

mod common;

use std::time::Duration;

use common::*;
use mysql_async::prelude::Queryable;
use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::hq::HqEvent;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Map, Value as J};

fn obj(v: J) -> Map<String, J> {
    match v {
        J::Object(m) => m,
        _ => Map::new(),
    }
}

fn change(table: &str, uuid: &str, after: J, refs: J, pos: u64) -> Vec<u8> {
    HqEvent::Change {
        late: false,
        person: None,
        origin_refs: Map::new(),
        event: ChangeEvent {
            op: Op::Create,
            site: "site-a".into(),
            table: Some(table.into()),
            key: Some(obj(json!({ format!("{table}_id"): after.get(format!("{table}_id")).cloned().unwrap_or(J::Null) }))),
            uuid: Some(uuid.into()),
            before: None,
            after: Some(obj(after)),
            refs: obj(refs),
            source: Source { server_id: 11, gtid: None, file: "binlog.000001".into(), pos, row: 0, ts_ms: 1_790_000_000_000 + pos as i64, snapshot: false },
            ts_ms: 1_790_000_000_000,
            oversize: None,
            schema: None,
        },
    }
    .to_json()
}

async fn produce(topic: &str, records: Vec<Vec<u8>>) {
    let p: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for r in records {
        p.send(FutureRecord::<(), _>::to(topic).partition(0).payload(&r), Duration::from_secs(10)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_dead_lettered_and_rows_wait_for_their_parents() {
    let prefix = format!("{}.", unique("thqf"));
    let hq_db = unique("openmrs_hq_f");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"))
        .replace("database = \"openmrs_hq\"\n", &format!("database = \"{hq_db}\"\n"))
        .replace("user = \"hq\"", "user = \"omrs\"")
        .replace("${OMRS_HQ_PASSWORD:-hq}", "omrs")
        .replace("fk_wait_timeout_s = 600", "fk_wait_timeout_s = 2")
        .replace("max_pending_rows = 100000", "max_pending_rows = 1");
    let config = dir.path().join("omrs-stream.toml");
    std::fs::write(&config, text).unwrap();
    let run = |args: &[&str]| {
        let out = bin().arg("--config").arg(&config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["topics", "apply"]);
    run(&["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let drain = || run(&["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);

    let mut c = admin(3310, Some(&hq_db)).await;
    let user: String = c.query_first("SELECT uuid FROM users ORDER BY user_id LIMIT 1").await.unwrap().unwrap();
    let location: String = c.query_first("SELECT uuid FROM location ORDER BY location_id LIMIT 1").await.unwrap().unwrap();
    let etype: String = c.query_first("SELECT uuid FROM encounter_type ORDER BY encounter_type_id LIMIT 1").await.unwrap().unwrap();
    let topic = format!("{prefix}omrs.hq.changes");
    let person = |u: &str, pos| change("person", u, json!({"person_id": 900, "gender": "F", "dead": 0, "creator": 1, "date_created": "2026-01-01 10:00:00", "voided": 0, "uuid": u}), json!({"creator": user}), pos);
    let patient = |u: &str, pos| change("patient", u, json!({"patient_id": 900, "creator": 1, "date_created": "2026-01-01 10:00:00", "voided": 0, "allergy_status": "Unknown"}), json!({"patient_id": u, "creator": user}), pos);
    let name = |u: &str, p: &str, given: &str, pos| {
        change("person_name", u, json!({"person_name_id": 5, "preferred": 1, "person_id": 900, "given_name": given, "family_name": "Okello", "creator": 1, "date_created": "2026-01-01 10:00:00", "voided": 0, "uuid": u}), json!({"person_id": p, "creator": user}), pos)
    };
    let encounter = |u: &str, p: &str, pos| {
        change("encounter", u, json!({"encounter_id": 7, "encounter_type": 1, "patient_id": 900, "location_id": 1, "encounter_datetime": "2026-01-02 09:00:00", "creator": 1, "date_created": "2026-01-02 09:00:00", "voided": 0, "uuid": u}), json!({"encounter_type": etype, "patient_id": p, "location_id": location, "creator": user}), pos)
    };
    let (p1, p2, p3) = ("11111111-0000-4000-8000-000000000001", "11111111-0000-4000-8000-000000000002", "11111111-0000-4000-8000-000000000003");
    let (n_bad, n_ok, e1, e3) = (
        "22222222-0000-4000-8000-000000000001",
        "22222222-0000-4000-8000-000000000002",
        "33333333-0000-4000-8000-000000000001",
        "33333333-0000-4000-8000-000000000003",
    );

    // Batch 1: a good person, a name HQ rejects (given_name is varchar(50)), a good name, a
    // record that is not JSON, an encounter for a patient HQ has not seen, the person's patient.
    produce(
        &topic,
        vec![
            person(p1, 1),
            name(n_bad, p1, &"x".repeat(300), 2),
            name(n_ok, p1, "Amina", 3),
            b"{not json".to_vec(),
            encounter(e1, p2, 4),
            patient(p1, 5),
        ],
    )
    .await;
    drain();
    let count = |sql: String| {
        let mut c2 = block_on(admin(3310, Some(&hq_db)));
        block_on(async move { c2.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0) })
    };
    assert_eq!(count(format!("SELECT COUNT(*) FROM person WHERE uuid = '{p1}'")), 1);
    assert_eq!(count(format!("SELECT COUNT(*) FROM patient p JOIN person x ON x.person_id = p.patient_id WHERE x.uuid = '{p1}'")), 1);
    assert_eq!(count(format!("SELECT COUNT(*) FROM person_name WHERE uuid = '{n_ok}' AND given_name = 'Amina'")), 1);
    assert_eq!(count(format!("SELECT COUNT(*) FROM person_name WHERE uuid = '{n_bad}'")), 0);
    assert_eq!(count(format!("SELECT COUNT(*) FROM omrs_sync_pending WHERE row_key = '{e1}' AND waits_for_key = '{p2}'")), 1, "the encounter waits for its patient");
    let dlq: Vec<J> = read_json(&format!("{prefix}omrs.dlq"));
    assert_eq!(dlq.len(), 2, "{dlq:#?}");
    assert!(dlq.iter().any(|d| d["kind"] == "row_rejected" && d["reason"].as_str().unwrap_or("").contains("given_name")), "{dlq:#?}");
    assert!(dlq.iter().any(|d| d["kind"] == "invalid_record" && d["offset"] == 3), "{dlq:#?}");

    // Batch 2: the parent lands; the waiting encounter follows in the same transaction.
    produce(&topic, vec![person(p2, 6), patient(p2, 7)]).await;
    drain();
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM encounter e JOIN person x ON x.person_id = e.patient_id WHERE e.uuid = '{e1}' AND x.uuid = '{p2}'")),
        1,
        "the parked encounter is applied once its patient is at HQ"
    );
    assert_eq!(count("SELECT COUNT(*) FROM omrs_sync_pending".into()), 0);

    // A parent that never comes: dead-lettered after fk_wait_timeout_s (2 s here). The pending
    // store is bounded (max_pending_rows = 1 here): a second orphan is dead-lettered at once.
    let e5 = "33333333-0000-4000-8000-000000000005";
    produce(&topic, vec![encounter(e3, p3, 8), encounter(e5, "11111111-0000-4000-8000-000000000005", 9)]).await;
    drain();
    assert_eq!(count("SELECT COUNT(*) FROM omrs_sync_pending".into()), 1);
    let dlq: Vec<J> = read_json(&format!("{prefix}omrs.dlq"));
    assert!(dlq.iter().any(|d| d["kind"] == "pending_full" && d["offset"] == 9), "{dlq:#?}");
    wait_for(60, "the orphan encounter to be dead-lettered", || {
        drain();
        let dlq: Vec<J> = read_json(&format!("{prefix}omrs.dlq"));
        dlq.iter().any(|d| d["kind"] == "fk_wait_timeout" && d["reason"].as_str().unwrap_or("").contains(p3)).then_some(())
    });
    assert_eq!(count("SELECT COUNT(*) FROM omrs_sync_pending".into()), 0);
    assert_eq!(count(format!("SELECT COUNT(*) FROM encounter WHERE uuid = '{e3}'")), 0);
    // The offsets are stored with the rows: everything consumed.
    assert_eq!(count("SELECT MAX(next_offset) FROM omrs_sync_offsets".into()), 10);

    // `dlq list` shows what is there and why; once the missing patient arrives, `dlq replay`
    // puts the timed-out encounter back into omrs.hq.changes, and it lands.
    let dlq_cli = |args: &[&str]| {
        let out = bin().arg("--config").arg(&config).arg("dlq").args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "dlq {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let listed = dlq_cli(&["list"]);
    assert!(listed.contains("row_rejected") && listed.contains("fk_wait_timeout") && listed.contains("invalid_record"), "{listed}");
    let timed_out: Vec<J> = dlq_cli(&["list", "--kind", "fk_wait_timeout", "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(timed_out.len(), 1, "{timed_out:?}");
    assert_eq!(timed_out[0]["offset"], 8);
    produce(&topic, vec![person(p3, 11), patient(p3, 12)]).await;
    drain();
    assert!(dlq_cli(&["replay", "--kind", "fk_wait_timeout", "--dry-run"]).contains("would replay 1 of 1"));
    assert_eq!(count(format!("SELECT COUNT(*) FROM encounter WHERE uuid = '{e3}'")), 0, "a dry run replays nothing");
    assert!(dlq_cli(&["replay", "--kind", "fk_wait_timeout"]).contains("replayed 1 of 1"));
    drain();
    assert_eq!(
        count(format!("SELECT COUNT(*) FROM encounter e JOIN person x ON x.person_id = e.patient_id WHERE e.uuid = '{e3}' AND x.uuid = '{p3}'")),
        1,
        "the replayed encounter is at HQ with its patient"
    );
    assert_eq!(count("SELECT MAX(next_offset) FROM omrs_sync_offsets".into()), 13);

    // HQ down while the sink runs: it retries with back-off, does not exit, and applies what
    // arrived once HQ is back.
    let p4 = "11111111-0000-4000-8000-000000000004";
    let log = dir.path().join("sink.log");
    let mut sink = bin()
        .arg("--config")
        .arg(&config)
        .args(["sink", "hq-mysql", "--metrics-port", "0", "--quiet"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop(c);
    let deploy = root().join("deploy/mariadb");
    // HQ comes back even if an assertion below fails.
    struct Restart(std::path::PathBuf);
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = std::process::Command::new(self.0.join("mariadb-up")).arg("hq").status();
        }
    }
    let _restart = Restart(deploy.clone());
    assert!(std::process::Command::new(deploy.join("mariadb-down")).arg("hq").status().unwrap().success());
    produce(&topic, vec![person(p4, 13)]).await;
    let sink_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_or(60, "the sink to report HQ unavailable", || format!("its log:\n{}", sink_log()), || {
        sink_log().contains("retrying from the last committed batch").then_some(())
    });
    assert!(sink.try_wait().unwrap().is_none(), "the sink exited while HQ was down");
    assert!(std::process::Command::new(deploy.join("mariadb-up")).arg("hq").status().unwrap().success());
    wait_for(90, "the person produced while HQ was down to reach HQ", || {
        let n = count(format!("SELECT COUNT(*) FROM person WHERE uuid = '{p4}'"));
        (n == 1).then_some(())
    });
    assert_eq!(count("SELECT MAX(next_offset) FROM omrs_sync_offsets".into()), 14);
    kill9(&mut sink);

    let mut a = admin(3310, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}

