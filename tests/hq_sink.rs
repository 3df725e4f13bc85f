//! The HQ MySQL sink end to end on real services: the simulator writes three sites (300 people,
//! 20 % registered at several sites, updates, voids, deletes and site merges), one ingest agent
//! per site, the transform, then `sink hq-mysql` into a fresh HQ database. After the drain:
//! one unvoided patient per human, the manifest's table counts, no FK orphans, a cross-site
//! conflict decided by the rule and logged, and the same HQ (in uuid space) after SIGKILLs,
//! other batch sizes, and a second pipeline run with the sites started in another order. And a
//! clinic's backlog in its partition of `omrs.hq.changes` does not hold back another clinic's
//! change (issue #24). And the uuid filter: created rows new to HQ go in without a lookup, and
//! one whose uuid another writer put at HQ meanwhile rolls its batch back and is applied as an
//! update of the row there, after one restart, with nothing dead-lettered or written twice.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::hq::*;
use common::*;
use mysql_async::prelude::Queryable;

const LOC_UUID_SQL: &str = "SELECT uuid FROM location WHERE retired = 0 ORDER BY location_id LIMIT 1";

async fn offsets(db: &str) -> i64 {
    let mut c = hq(db).await;
    c.query_first::<i64, _>("SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM omrs_sync_offsets").await.unwrap_or(None).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hq_sink_consolidates_three_sites_exactly_once() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("thq")), database: unique("hqs") };
    let hq1 = unique("openmrs_hq_a");
    let cfg1 = p.config(&hq1, &[]);
    p.run(&cfg1, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&cfg1).unwrap();

    // The sites are provisioned and both pipelines snapshot them; the workload then reaches
    // both through the binlog.
    let manifest_path = p.dir.path().join("manifest.json");
    let args = omrs_simulate::SimulateArgs {
        patients: 300,
        dup_fraction: 0.2,
        seed: 7,
        burst: true,
        manifest: manifest_path.clone(),
        database: Some(p.database.clone()),
        dump: dump_path(),
        quiet: true,
        ..Default::default()
    };
    omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { provision_only: true, ..args.clone() }).await.unwrap();
    let p2 = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("thq2")), database: p.database.clone() };
    let hq4 = unique("openmrs_hq_o");
    let cfg4 = p2.config(&hq4, &[]);
    p2.run(&cfg4, &["topics", "apply"]);
    p.ingest(&cfg1, &["site-a", "site-b", "site-c"], true);
    p2.ingest(&cfg4, &["site-a", "site-b", "site-c"], true);

    let manifest = omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() }).await.unwrap();
    assert!(!manifest.site_merges.is_empty(), "the workload has site merges");

    // A conflict: the same location edited at two sites; site-a's edit is later.
    let mut a = admin(3311, Some(&p.database)).await;
    let loc: String = a.query_first(LOC_UUID_SQL).await.unwrap().unwrap();
    a.exec_drop("UPDATE location SET description = 'edited at site-a', date_changed = '2031-01-02 00:00:00' WHERE uuid = ?", (&loc,)).await.unwrap();
    let mut b = admin(3312, Some(&p.database)).await;
    b.exec_drop("UPDATE location SET description = 'edited at site-b', date_changed = '2031-01-01 00:00:00' WHERE uuid = ?", (&loc,)).await.unwrap();
    // Deletes too: one leaf obs per site.
    let mut deletes = 0;
    for port in [3311, 3312, 3313] {
        let mut c = admin(port, Some(&p.database)).await;
        c.query_drop("DELETE FROM obs WHERE obs_id = (SELECT * FROM (SELECT MAX(obs_id) FROM obs WHERE obs_group_id IS NULL AND obs_id NOT IN (SELECT obs_group_id FROM obs WHERE obs_group_id IS NOT NULL)) x)").await.unwrap();
        deletes += c.affected_rows();
    }
    assert_eq!(deletes, 3);

    p.ingest(&cfg1, &["site-a", "site-b", "site-c"], true);
    p.run(&cfg1, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg1, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    p.run(&cfg1, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);

    let mut c = hq(&hq1).await;
    // One unvoided patient per human; every other record voided with a merge log row.
    for h in &manifest.humans {
        let mut alive = 0;
        for r in &h.records {
            let row: Option<(i64, i64)> = c.exec_first("SELECT person_id, voided FROM person WHERE uuid = ?", (&r.person_uuid,)).await.unwrap();
            let (id, voided) = row.unwrap_or_else(|| panic!("person {} of human {:?} is not at HQ", r.person_uuid, h.national_id));
            if voided == 0 {
                alive += 1;
            } else {
                // Merged at HQ, or at its site (where HQ's survivor rule may have picked the
                // site's loser as the survivor: the site's log row then names both).
                let logs = count(&mut c, &format!("SELECT COUNT(*) FROM person_merge_log WHERE loser_person_id = {id} OR winner_person_id = {id}")).await;
                assert!(logs >= 1, "voided {} has no person_merge_log row", r.person_uuid);
            }
        }
        assert_eq!(alive, 1, "human {:?}: {alive} unvoided records of {:#?}", h.national_id, h.records);
    }
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM patient WHERE voided = 0").await as u64, manifest.expected_hq.active_patients, "active patients");

    // Per-table counts equal the manifest's (minus the obs deleted above).
    for (table, expected) in &manifest.expected_hq.tables {
        let expected = if table == "obs" { *expected - deletes as i64 } else { *expected };
        assert_eq!(count(&mut c, &format!("SELECT COUNT(*) FROM `{table}`")).await, expected, "rows in {table}");
    }
    // No FK orphans among the core tables.
    let fks: Vec<(String, String, String, String)> = c
        .exec(
            "SELECT table_name, column_name, referenced_table_name, referenced_column_name FROM information_schema.key_column_usage
             WHERE table_schema = ? AND referenced_table_name IS NOT NULL
               AND table_name IN ('person','person_name','person_address','patient','patient_identifier','visit','encounter','encounter_provider','obs','person_merge_log')",
            (&hq1,),
        )
        .await
        .unwrap();
    assert!(fks.len() > 20, "{} FKs", fks.len());
    for (t, col, rt, rc) in fks {
        let orphans = count(
            &mut c,
            &format!("SELECT COUNT(*) FROM `{t}` c LEFT JOIN `{rt}` p ON c.`{col}` = p.`{rc}` WHERE c.`{col}` IS NOT NULL AND p.`{rc}` IS NULL"),
        )
        .await;
        assert_eq!(orphans, 0, "{t}.{col} → {rt}.{rc}");
    }
    // The conflict: the later edit holds, the other is logged.
    let desc: String = c.exec_first("SELECT description FROM location WHERE uuid = ?", (&loc,)).await.unwrap().unwrap();
    assert_eq!(desc, "edited at site-a");
    // Site-b's edit lost to site-a's and is logged with its values; site-a's never lost. (Site-b's
    // unedited snapshot copy is logged too when it reaches HQ after site-a's edit: each site's
    // changes are in order, but nothing orders one site's against another's.)
    let logged = count(&mut c, &format!("SELECT COUNT(*) FROM omrs_sync_conflict WHERE tbl = 'location' AND row_key = '{loc}' AND loser_site = 'site-b' AND winner_site = 'site-a' AND loser_values LIKE '%edited at site-b%'")).await;
    assert_eq!(logged, 1, "site-b's edit logged as the conflict's loser");
    let a_lost = count(&mut c, &format!("SELECT COUNT(*) FROM omrs_sync_conflict WHERE tbl = 'location' AND row_key = '{loc}' AND loser_site = 'site-a' AND loser_values LIKE '%edited at site-a%'")).await;
    assert_eq!(a_lost, 0, "site-a's later edit never lost");
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM omrs_sync_pending").await, 0, "nothing left pending");
    let reference = hq_dump(&hq1).await;
    let end = offsets(&hq1).await;
    assert!(end > 1000, "offsets stored: {end}");

    // SIGKILL at several points, then a clean finish: the same HQ.
    let hq2 = unique("openmrs_hq_k");
    let cfg2 = p.config(&hq2, &[("batch_max_rows = 5000", "batch_max_rows = 300")]);
    p.run(&cfg2, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    for (i, frac) in [0.15, 0.4, 0.7].iter().enumerate() {
        let mut child = p.sink(&cfg2, &[]);
        let target = (end as f64 * frac) as i64;
        wait_for(120, &format!("sink progress past offset {target}"), || {
            let now = futures_lite_block(offsets(&hq2));
            (now >= target).then_some(())
        });
        kill9(&mut child);
        eprintln!("kill {} at offset >= {target}", i + 1);
    }
    p.run(&cfg2, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    assert_same(&reference, &hq_dump(&hq2).await, "after 3 SIGKILLs");

    // Kills timed inside the pipelined commit (issue #22 §0): while batch n+1 is planned (its
    // version packs stored ahead) and batch n is written but not committed.
    let hq5 = unique("openmrs_hq_f");
    let cfg5 = p.config(&hq5, &[("batch_max_rows = 5000", "batch_max_rows = 300")]);
    p.run(&cfg5, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    for (point, skip) in [("hq:planned-during-write", "2"), ("hq:written-uncommitted", "3"), ("hq:planned-during-write", "5"), ("hq:written-uncommitted", "1")] {
        let before = offsets(&hq5).await;
        let mut child = bin()
            .arg("--config")
            .arg(&cfg5)
            .args(["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"])
            .env("RUST_LOG", "warn")
            .env("OMRS_FAILPOINT", point)
            .env("OMRS_FAILPOINT_SKIP", skip)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = wait_for(120, &format!("the sink to reach {point} (skip {skip})"), || child.try_wait().unwrap());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "the sink died at {point} (skip {skip}), not otherwise: {status}");
        eprintln!("killed at {point} after {skip} passes; offsets {before} -> {}", offsets(&hq5).await);
    }
    p.run(&cfg5, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    assert_same(&reference, &hq_dump(&hq5).await, "after kills inside the write/plan overlap");

    // Other batch sizes and restart points.
    let hq3 = unique("openmrs_hq_b");
    let cfg3 = p.config(&hq3, &[("batch_max_rows = 5000", "batch_max_rows = 37")]);
    p.run(&cfg3, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    p.run(&cfg3, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    assert_same(&reference, &hq_dump(&hq3).await, "batches of 37");

    // The second pipeline read the same site changes: its agents catch up one after another
    // in reverse order, and its transform is SIGKILLed midway and restarted.
    p2.ingest(&cfg4, &["site-c"], false);
    let mut t = bin()
        .arg("--config")
        .arg(&cfg4)
        .args(["transform", "--metrics-port", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    p2.ingest(&cfg4, &["site-b"], false);
    kill9(&mut t);
    p2.ingest(&cfg4, &["site-a"], false);
    p2.run(&cfg4, &["transform", "--until-idle", "--metrics-port", "0"]);
    p2.run(&cfg4, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    p2.run(&cfg4, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet", "--batch-rows", "1000"]);
    assert_same(&reference, &hq_dump(&hq4).await, "sites read in another order, transform restarted");

    // Clean up.
    let mut admin_hq = admin(HQ_PORT, None).await;
    for db in [&hq1, &hq2, &hq3, &hq4, &hq5] {
        admin_hq.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await.unwrap();
    }
    for port in [3311, 3312, 3313] {
        let mut c = admin(port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}

/// A person created at `site`, as an `omrs.hq.changes` record.
fn person_at(site: &str, i: usize, uuid: &str, creator: &str) -> Vec<u8> {
    let obj = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    omrs_core::hq::HqEvent::Change {
        late: false,
        person: None,
        origin_refs: serde_json::Map::new(),
        event: omrs_core::envelope::ChangeEvent {
            op: omrs_core::envelope::Op::Create,
            site: site.into(),
            table: Some("person".into()),
            key: Some(obj(serde_json::json!({ "person_id": i }))),
            uuid: Some(uuid.into()),
            before: None,
            after: Some(obj(serde_json::json!({"person_id": i, "gender": "F", "dead": 0, "creator": 1, "date_created": "2026-01-01 10:00:00", "voided": 0, "uuid": uuid}))),
            refs: obj(serde_json::json!({ "creator": creator })),
            source: omrs_core::envelope::Source { server_id: 11, gtid: None, file: "binlog.000001".into(), pos: i as u64, row: 0, ts_ms: 1_790_000_000_000 + i as i64, snapshot: false },
            ts_ms: 1_790_000_000_000 + i as i64,
            oversize: None,
            schema: None,
        },
    }
    .to_json()
}

/// A sink killed however the test ends: a failed assertion must not leave it running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test's topics and a fresh HQ database from the dump: a connection to it, a user's uuid
/// (the records' creator), `omrs.hq.changes`' name and its partition count.
async fn fresh_hq(config: &std::path::Path, prefix: &str, hq_db: &str) -> (mysql_async::Conn, String, String, i32) {
    let run = |args: &[&str]| {
        let out = bin().arg("--config").arg(config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["topics", "apply"]);
    run(&["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let mut c = admin(3310, Some(hq_db)).await;
    let user: String = c.query_first("SELECT uuid FROM users ORDER BY user_id LIMIT 1").await.unwrap().unwrap();
    let topic = format!("{prefix}omrs.hq.changes");
    let reader: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let n = omrs_core::kafka::topic_partitions(rdkafka::consumer::Consumer::client(&reader), &topic, std::time::Duration::from_secs(10)).unwrap().len() as i32;
    (c, user, topic, n)
}

/// A test's own config (its topic prefix and HQ database), from the repository's.
fn sink_config(dir: &std::path::Path, prefix: &str, hq_db: &str, edits: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"))
        .replace("database = \"openmrs_hq\"\n", &format!("database = \"{hq_db}\"\n"))
        .replace("user = \"hq\"", "user = \"omrs\"")
        .replace("${OMRS_HQ_PASSWORD:-hq}", "omrs");
    for (from, to) in edits {
        assert!(text.contains(from), "omrs-stream.toml has no `{from}`");
        text = text.replace(from, to);
    }
    let config = dir.join("omrs-stream.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// A clinic back from a long time offline has thousands of changes in its partition of
/// omrs.hq.changes; another clinic's change, written after all of them, reaches HQ within the
/// first batches, not after the backlog (issue #24 §2). Then everything lands, and the offsets
/// stored for each partition are its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinics_backlog_does_not_hold_back_another_clinics_change() {
    const BACKLOG: usize = 20_000;
    let prefix = format!("{}.", unique("thqb"));
    let hq_db = unique("openmrs_hq_b");
    let dir = tempfile::tempdir().unwrap();
    let config = sink_config(dir.path(), &prefix, &hq_db, &[("batch_max_rows = 5000", "batch_max_rows = 400")]);
    let (mut c, user, topic, n) = fresh_hq(&config, &prefix, &hq_db).await;
    // Each clinic's records in its own partition, as the transform writes them.
    let (pa, pb) = (omrs_core::topics::hq_partition("site-a", n), omrs_core::topics::hq_partition("site-b", n));
    assert_ne!(pa, pb, "site-a and site-b share a partition of {n}");
    let person = |site: &str, i: usize, u: &str| person_at(site, i, u, &user);
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").set("linger.ms", "20").create().unwrap();
    // Enqueued 2,000 at a time, then every delivery confirmed.
    let mut sent = Vec::with_capacity(2_000);
    for i in 1..=BACKLOG {
        let u = format!("aaaaaaaa-0000-4000-8000-{i:012}");
        let bytes = person("site-a", i, &u);
        sent.push(producer.send_result(rdkafka::producer::FutureRecord::<(), _>::to(&topic).partition(pa).payload(&bytes)).map_err(|(e, _)| e).unwrap());
        if sent.len() == 2_000 || i == BACKLOG {
            for d in sent.drain(..) {
                d.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    let marker = "bbbbbbbb-0000-4000-8000-000000000001";
    producer.send(rdkafka::producer::FutureRecord::<(), _>::to(&topic).partition(pb).payload(&person("site-b", 1, marker)), std::time::Duration::from_secs(60)).await.unwrap();

    let log = dir.path().join("sink.log");
    let args: Vec<String> = ["sink", "hq-mysql", "--metrics-port", "0", "--quiet"].iter().map(|s| s.to_string()).collect();
    let mut sink = Killed(common::pipeline::start(&config, &args, &log));
    let count = |sql: &str| {
        let mut c2 = block_on(admin(3310, Some(&hq_db)));
        let sql = sql.to_string();
        block_on(async move { c2.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0) })
    };
    // In one transaction with its batch: when the marker is at HQ, so is the rest of its batch.
    let backlog_then = wait_for_or(120, "site-b's change at HQ", || std::fs::read_to_string(&log).unwrap_or_default(), || {
        (count(&format!("SELECT COUNT(*) FROM person WHERE uuid = '{marker}'")) == 1).then(|| count("SELECT COUNT(*) FROM person WHERE uuid LIKE 'aaaaaaaa-%'"))
    });
    eprintln!("site-b's change landed with {backlog_then} of site-a's {BACKLOG} backlog rows at HQ");
    assert!(backlog_then < (BACKLOG / 4) as i64, "site-b's change waited for {backlog_then} of site-a's {BACKLOG} backlog rows");
    wait_for(180, "site-a's whole backlog at HQ", || (count("SELECT COUNT(*) FROM person WHERE uuid LIKE 'aaaaaaaa-%'") == BACKLOG as i64).then_some(()));
    kill9(&mut sink.0);
    let stored: std::collections::BTreeMap<i32, i64> = c.query::<(i32, i64), _>("SELECT kafka_partition, next_offset FROM omrs_sync_offsets").await.unwrap().into_iter().collect();
    assert_eq!(stored.get(&pa).copied(), Some(BACKLOG as i64), "site-a's partition's stored offset");
    assert_eq!(stored.get(&pb).copied(), Some(1), "site-b's partition's stored offset");
    assert_eq!(count("SELECT COUNT(*) FROM omrs_sync_pending"), 0);
    drop(c);
    let mut a = admin(3310, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}

/// `sinks.hq_mysql.uuid_filter` (on by default): persons created at a clinic, new to HQ, go in
/// without a lookup (the sink's counter of skipped lookups says so). A person that another
/// writer put at HQ after the filter loaded, then created with the same uuid at a clinic, is
/// refused by HQ's unique index: the batch rolls back, the sink starts again with `person` looked
/// up, and the clinic's row updates the one at HQ (its id kept, its values the clinic's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_the_uuid_filter_took_for_new_updates_the_row_hq_holds() {
    let prefix = format!("{}.", unique("thqu"));
    let hq_db = unique("openmrs_hq_u");
    let dir = tempfile::tempdir().unwrap();
    let config = sink_config(dir.path(), &prefix, &hq_db, &[]);
    let (mut c, user, topic, n) = fresh_hq(&config, &prefix, &hq_db).await;
    let pa = omrs_core::topics::hq_partition("site-a", n);
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let send = |records: Vec<Vec<u8>>| {
        let producer = producer.clone();
        let topic = topic.clone();
        block_on(async move {
            for r in records {
                producer.send(rdkafka::producer::FutureRecord::<(), _>::to(&topic).partition(pa).payload(&r), std::time::Duration::from_secs(60)).await.unwrap();
            }
        })
    };
    let new_uuid = |i: usize| format!("cccccccc-0000-4000-8000-{i:012}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("sink.log");
    let args: Vec<String> = ["sink", "hq-mysql", "--quiet", "--metrics-port", &port.to_string()].iter().map(|s| s.to_string()).collect();
    let _sink = Killed(common::pipeline::start_env(&config, &args, &log, &[("RUST_LOG".into(), "omrs_sinks=info,warn".into())]));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for_or(60, "the sink to load HQ's uuids", read_log, || read_log().contains("HQ's uuids loaded").then_some(()));
    let metric = |name: &str| -> Option<i64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as i64)
    };
    let count = |sql: String| block_on(async { admin(3310, Some(&hq_db)).await.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0) });

    // Five persons new to HQ: no lookup for any of them.
    send((1..=5).map(|i| person_at("site-a", i, &new_uuid(i), &user)).collect());
    wait_for_or(60, "five new persons at HQ", read_log, || (count("SELECT COUNT(*) FROM person WHERE uuid LIKE 'cccccccc-%'".into()) == 5).then_some(()));
    assert_eq!(metric("omrs_stream_hq_lookups_skipped_total"), Some(5), "each of the five persons went in without a lookup");

    // Another writer puts a person at HQ; then a clinic creates a person with that uuid.
    let taken = "dddddddd-0000-4000-8000-000000000001";
    c.query_drop(format!(
        "INSERT INTO person (person_id, gender, dead, creator, date_created, voided, uuid) VALUES (900001, 'M', 0, 1, '2026-01-01 09:00:00', 0, '{taken}')"
    ))
    .await
    .unwrap();
    let mut records: Vec<Vec<u8>> = (6..=7).map(|i| person_at("site-a", i, &new_uuid(i), &user)).collect();
    records.push(person_at("site-a", 8, taken, &user));
    send(records);
    wait_for_or(90, "the clinic's person applied over the one at HQ", read_log, || {
        (count(format!("SELECT COUNT(*) FROM person WHERE uuid = '{taken}' AND gender = 'F'")) == 1 && count("SELECT COUNT(*) FROM person WHERE uuid LIKE 'cccccccc-%'".into()) == 7)
            .then_some(())
    });
    let rows: Vec<(i64, String)> = c.exec("SELECT person_id, gender FROM person WHERE uuid = ?", (taken,)).await.unwrap();
    assert_eq!(rows, vec![(900001, "F".to_string())], "one row for the uuid, HQ's id kept, the clinic's values");
    let refused = read_log().matches("HQ holds a uuid the sink took for new").count();
    assert_eq!(refused, 1, "one rolled-back batch and restart:\n{}", read_log());
    assert_eq!(metric("omrs_stream_sink_errors_total{kind=\"uuid_taken\",sink=\"hq_mysql\"}"), Some(1));
    let stored: i64 = c.exec_first("SELECT next_offset FROM omrs_sync_offsets WHERE kafka_partition = ?", (pa,)).await.unwrap().unwrap_or(0);
    assert_eq!(stored, 8, "every record applied once");
    assert_eq!(count("SELECT COUNT(*) FROM omrs_sync_pending".into()), 0);
    let dead: Vec<serde_json::Value> = read_json(&format!("{prefix}omrs.dlq"));
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    drop(c);
    let mut a = admin(3310, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}

fn dump_path() -> PathBuf {
    common::dump()
}

/// Runs a future to completion from synchronous polling code.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
