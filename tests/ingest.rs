//! The ingest agent end to end against real MariaDB (the OpenMRS demo dump) and real Kafka:
//! snapshot counts and scrubbing, streaming in commit order with refs, exactly once across
//! SIGKILLs (also inside a site transaction committed in parts), heartbeats, and DDL mid-stream.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::*;
use mysql_async::prelude::Queryable;
use omrs_core::envelope::{ChangeEvent, Op};
use rdkafka::consumer::{BaseConsumer, Consumer};

async fn site_counts(env: &Env) -> BTreeMap<String, i64> {
    let mut c = env.db().await;
    let tables: Vec<String> = c
        .query(format!("SELECT table_name FROM information_schema.tables WHERE table_schema = '{}' AND table_type = 'BASE TABLE'", env.database))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        if env.cfg.ingest.exclude.contains(&t) {
            continue;
        }
        let n: i64 = c.query_first(format!("SELECT COUNT(*) FROM `{t}`")).await.unwrap().unwrap();
        out.insert(t, n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_counts_match_and_scrubbed_columns_never_leave() {
    let env = Env::new("snap", "site-a", &[]).await;
    let out = env.catch_up();
    if mysql_mode() {
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("global read lock held"), "the MySQL snapshot path holds FLUSH TABLES WITH READ LOCK: {log}");
    }
    let events = env.events();
    let mut per_table: BTreeMap<String, i64> = BTreeMap::new();
    for ev in events.iter().filter(|e| e.op == Op::Read) {
        assert!(ev.source.snapshot);
        *per_table.entry(ev.table.clone().unwrap()).or_default() += 1;
    }
    let counts = site_counts(&env).await;
    assert_eq!(counts.len(), 138, "148 tables minus 10 excluded");
    for (t, n) in &counts {
        assert_eq!(per_table.get(t).copied().unwrap_or(0), *n, "snapshot of {t}");
    }
    assert_eq!(per_table.get("obs"), Some(&9927));
    // Every captured table's shape went ahead of its rows (the lake's schema), scrubbed columns
    // left out.
    let shapes: BTreeMap<String, (usize, omrs_core::shape::TableShape)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.op == Op::Schema)
        .map(|(i, e)| {
            let s = e.schema.clone().expect("a schema event carries its shape");
            (s.table.clone(), (i, s))
        })
        .collect();
    assert_eq!(shapes.keys().collect::<Vec<_>>(), counts.keys().collect::<Vec<_>>(), "one shape per captured table");
    let first_row = events.iter().position(|e| e.op == Op::Read).unwrap();
    assert!(shapes.values().all(|(i, s)| *i < first_row && s.base && s.ddl.is_none()), "base shapes, before the first row");
    let users_shape: Vec<&str> = shapes["users"].1.columns.iter().map(|c| c.name.as_str()).collect();
    assert!(users_shape.contains(&"username") && !users_shape.contains(&"password") && !users_shape.contains(&"salt"), "{users_shape:?}");
    assert_eq!(shapes["patient"].1.shared_parent.as_deref(), Some("person"));
    let obs_value = shapes["obs"].1.columns.iter().find(|c| c.name == "value_numeric").unwrap();
    assert_eq!(obs_value.column_type, "double");
    let users: Vec<_> = events.iter().filter(|e| e.table.as_deref() == Some("users") && e.op == Op::Read).collect();
    assert_eq!(users.len(), 7);
    for u in users {
        let after = u.after.as_ref().unwrap();
        assert!(after.contains_key("username"));
        for secret in ["password", "salt", "secret_question", "secret_answer"] {
            assert!(!after.contains_key(secret), "users.{secret} left the site");
        }
    }
    // Shared keys and refs on snapshot rows.
    let patient = events.iter().find(|e| e.table.as_deref() == Some("patient") && e.op == Op::Read).unwrap();
    let pid = patient.key.as_ref().unwrap()["patient_id"].as_i64().unwrap();
    let person_uuid = events
        .iter()
        .find(|e| e.table.as_deref() == Some("person") && e.op == Op::Read && e.key.as_ref().unwrap()["person_id"].as_i64() == Some(pid))
        .and_then(|e| e.uuid.clone())
        .unwrap();
    assert_eq!(patient.uuid.as_deref(), Some(person_uuid.as_str()), "patient takes its person's uuid");
    assert_eq!(patient.refs["patient_id"], serde_json::Value::String(person_uuid));
    // A second run changes nothing: the checkpoint says the snapshot is done.
    let before = events.len();
    env.catch_up();
    let again = env.events();
    assert!(again.iter().skip(before).all(|e| e.op == Op::Heartbeat), "a restart re-sent data");
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_in_commit_order_with_refs() {
    let env = Env::new("stream", "site-b", &[]).await;
    env.catch_up();
    let n0 = env.events().len();
    let mut c = env.db().await;
    // One multi-row transaction: a registration.
    c.query_drop(
        "START TRANSACTION;
         INSERT INTO person (gender, birthdate, birthdate_estimated, dead, creator, date_created, voided, uuid, deathdate_estimated)
           VALUES ('F', '1990-01-02', 0, 0, 1, NOW(), 0, 'aaaaaaaa-0000-4000-8000-000000000001', 0);
         SET @p = LAST_INSERT_ID();
         INSERT INTO person_name (preferred, person_id, given_name, family_name, creator, date_created, voided, uuid)
           VALUES (1, @p, 'Achieng', 'Otieno', 1, NOW(), 0, 'aaaaaaaa-0000-4000-8000-000000000002');
         INSERT INTO patient (patient_id, creator, date_created, voided, allergy_status) VALUES (@p, 1, NOW(), 0, 'Unknown');
         INSERT INTO patient_identifier (patient_id, identifier, identifier_type, preferred, location_id, creator, date_created, voided, uuid)
           VALUES (@p, 'NID-123', 1, 1, 1, 1, NOW(), 0, 'aaaaaaaa-0000-4000-8000-000000000003');
         COMMIT;",
    )
    .await
    .unwrap();
    let person_id: i64 = c.query_first("SELECT person_id FROM person WHERE uuid = 'aaaaaaaa-0000-4000-8000-000000000001'").await.unwrap().unwrap();
    c.query_drop(format!(
        "START TRANSACTION;
         INSERT INTO visit (patient_id, visit_type_id, date_started, location_id, creator, date_created, voided, uuid)
           VALUES ({person_id}, 1, NOW(), 1, 1, NOW(), 0, 'aaaaaaaa-0000-4000-8000-000000000004');
         SET @v = LAST_INSERT_ID();
         INSERT INTO encounter (encounter_type, patient_id, location_id, encounter_datetime, creator, date_created, voided, visit_id, uuid)
           VALUES (2, {person_id}, 1, NOW(), 1, NOW(), 0, @v, 'aaaaaaaa-0000-4000-8000-000000000005');
         SET @e = LAST_INSERT_ID();
         INSERT INTO obs (person_id, concept_id, encounter_id, obs_datetime, location_id, value_numeric, creator, date_created, voided, uuid)
           VALUES ({person_id}, 5089, @e, NOW(), 1, 71.5, 1, NOW(), 0, 'aaaaaaaa-0000-4000-8000-000000000006');
         COMMIT;"
    ))
    .await
    .unwrap();
    c.query_drop("UPDATE person_name SET given_name = 'Akinyi', changed_by = 1, date_changed = NOW() WHERE uuid = 'aaaaaaaa-0000-4000-8000-000000000002'").await.unwrap();
    c.query_drop("DELETE FROM obs WHERE uuid = 'aaaaaaaa-0000-4000-8000-000000000006'").await.unwrap();

    env.catch_up();
    let events: Vec<_> = env.events().into_iter().skip(n0).filter(|e| e.op != Op::Heartbeat).collect();
    let got: Vec<(Op, String)> = events.iter().map(|e| (e.op, e.table.clone().unwrap())).collect();
    let want: Vec<(Op, String)> = [
        (Op::Create, "person"),
        (Op::Create, "person_name"),
        (Op::Create, "patient"),
        (Op::Create, "patient_identifier"),
        (Op::Create, "visit"),
        (Op::Create, "encounter"),
        (Op::Create, "obs"),
        (Op::Update, "person_name"),
        (Op::Delete, "obs"),
    ]
    .iter()
    .map(|(o, t)| (*o, t.to_string()))
    .collect();
    assert_eq!(got, want);
    // Commit order is binlog order: positions strictly increase, one GTID per site transaction.
    for w in events.windows(2) {
        assert!((&w[0].source.file, w[0].source.pos, w[0].source.row) < (&w[1].source.file, w[1].source.pos, w[1].source.row));
    }
    let gtids: Vec<_> = events.iter().map(|e| e.source.gtid.clone().unwrap()).collect();
    assert!(gtids[..4].iter().all(|g| *g == gtids[0]), "the registration is one transaction: {gtids:?}");
    assert_ne!(gtids[4], gtids[0]);

    let person = "aaaaaaaa-0000-4000-8000-000000000001";
    let by = |t: &str, op: Op| events.iter().find(|e| e.table.as_deref() == Some(t) && e.op == op).unwrap();
    assert_eq!(by("person_name", Op::Create).refs["person_id"], person);
    assert_eq!(by("patient", Op::Create).uuid.as_deref(), Some(person));
    assert_eq!(by("patient_identifier", Op::Create).refs["patient_id"], person);
    assert_eq!(by("patient_identifier", Op::Create).refs["identifier_type"], "8d793bee-c2cc-11de-8d13-0010c6dffd0f");
    assert_eq!(by("visit", Op::Create).refs["patient_id"], person);
    let enc = by("encounter", Op::Create);
    assert_eq!(enc.refs["patient_id"], person);
    assert_eq!(enc.refs["visit_id"], "aaaaaaaa-0000-4000-8000-000000000004");
    assert_eq!(enc.refs["encounter_type"], "67a71486-1a54-468f-ac3e-7091a9a79584");
    let obs = by("obs", Op::Create);
    assert_eq!(obs.refs["encounter_id"], "aaaaaaaa-0000-4000-8000-000000000005");
    assert_eq!(obs.refs["person_id"], person);
    assert_eq!(obs.refs["concept_id"], "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(obs.after.as_ref().unwrap()["value_numeric"], 71.5);
    let upd = by("person_name", Op::Update);
    assert_eq!(upd.before.as_ref().unwrap()["given_name"], "Achieng");
    assert_eq!(upd.after.as_ref().unwrap()["given_name"], "Akinyi");
    assert!(upd.after.as_ref().unwrap()["date_changed"].is_string());
    let del = by("obs", Op::Delete);
    assert!(del.after.is_none());
    assert_eq!(del.before.as_ref().unwrap()["uuid"], "aaaaaaaa-0000-4000-8000-000000000006");

    // The checkpoint now carries a GTID: the next run resumes by GTID, exactly after it.
    c.query_drop("UPDATE person_name SET given_name = 'Aoko' WHERE uuid = 'aaaaaaaa-0000-4000-8000-000000000002'").await.unwrap();
    let out = env.catch_up();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gtid=Some("), "did not resume by GTID: {log}");
    let after: Vec<_> = env.events().into_iter().skip(n0).filter(|e| e.op != Op::Heartbeat).collect();
    assert_eq!(after.len(), events.len() + 1, "exactly one more event after a GTID resume");
    assert_eq!(after.last().unwrap().after.as_ref().unwrap()["given_name"], "Aoko");
    env.drop().await;
}

fn high_watermark(topic: &str) -> i64 {
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    c.fetch_watermarks(topic, 0, std::time::Duration::from_secs(10)).map(|(_, h)| h).unwrap_or(0)
}

/// Starts the agent and SIGKILLs it once the topic has grown past `target` records.
fn kill_after(env: &Env, target: i64) {
    let mut agent = env.agent(&[]);
    wait_for(120, &format!("{} to reach {target} records", env.topic()), || {
        if let Ok(Some(status)) = agent.try_wait() {
            panic!("agent exited early: {status}");
        }
        (high_watermark(&env.topic()) >= target).then_some(())
    });
    kill9(&mut agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshot_and_streaming_loses_and_doubles_nothing() {
    let env = Env::new("kill", "site-c", &[("snapshot_chunk_rows = 5000", "snapshot_chunk_rows = 400")]).await;
    // Kill during the snapshot, at three points.
    for target in [1_500, 6_000, 14_000] {
        kill_after(&env, target);
    }
    // Streaming, with a workload running at the site, killed twice more.
    let workload = workload(&env, 3);
    let base = high_watermark(&env.topic());
    for step in [400, 1_500] {
        kill_after(&env, base + step);
    }
    workload.await.unwrap().expect("workload ran");
    env.catch_up();

    let events = env.events();
    // Exactly once: no (table, key, op, position) twice.
    let mut seen = HashSet::new();
    for e in events.iter().filter(|e| !matches!(e.op, Op::Heartbeat | Op::Schema)) {
        let id = (
            e.table.clone().unwrap(),
            serde_json::to_string(e.key.as_ref().unwrap()).unwrap(),
            e.op,
            e.source.file.clone(),
            e.source.pos,
            e.source.row,
        );
        assert!(seen.insert(id.clone()), "duplicate event {id:?}");
    }
    assert_replay_is_the_site(&env, &events).await;
    env.drop().await;
}

/// Nothing lost: replaying the topic gives the site's current state (row counts per table,
/// every name's given name, every obs's voided flag).
async fn assert_replay_is_the_site(env: &Env, events: &[ChangeEvent]) {
    let state = replay(events);
    let counts = site_counts(env).await;
    for (t, n) in &counts {
        assert_eq!(state.get(t).map(|m| m.len() as i64).unwrap_or(0), *n, "replayed {t}");
    }
    let mut c = env.db().await;
    let names: Vec<(i64, String)> = c.query("SELECT person_name_id, given_name FROM person_name").await.unwrap();
    let replayed: HashMap<i64, String> = state["person_name"]
        .values()
        .map(|r| (r["person_name_id"].as_i64().unwrap(), r["given_name"].as_str().unwrap_or("").to_string()))
        .collect();
    for (id, name) in names {
        assert_eq!(replayed.get(&id), Some(&name), "person_name {id}");
    }
    let voided: Vec<(i64, i64)> = c.query("SELECT obs_id, voided FROM obs").await.unwrap();
    let obs = &state["obs"];
    let replayed: HashMap<i64, i64> = obs.values().map(|r| (r["obs_id"].as_i64().unwrap(), r["voided"].as_i64().unwrap())).collect();
    for (id, v) in voided {
        assert_eq!(replayed.get(&id), Some(&v), "obs {id} voided flag");
    }
}

/// The simulator's workload at the env's site: 120 patients at 1,500 row changes/s.
fn workload(env: &Env, seed: u64) -> tokio::task::JoinHandle<Result<(), String>> {
    let mut cfg = env.cfg.clone();
    cfg.sites.retain(|s| s.name == env.site);
    let args = omrs_simulate::SimulateArgs {
        sites: 1,
        patients: 120,
        dup_fraction: 0.0,
        seed,
        rate: Some(1500.0),
        manifest: env.dir.path().join(format!("manifest-{seed}.json")),
        database: Some(env.database.clone()),
        no_provision: true,
        dump: dump(),
        demo_site: "none".into(),
        batch: 4,
        quiet: true,
        ..Default::default()
    };
    tokio::spawn(async move { omrs_simulate::run(&cfg, &args).await.map(|_| ()).map_err(|e| e.to_string()) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_site_sends_heartbeats_and_its_position_advances() {
    let env = Env::new("hb", "site-a", &[("heartbeat_interval_ms = 1000", "heartbeat_interval_ms = 300")]).await;
    let mut agent = env.agent(&[]);
    let first = wait_for(120, "a first heartbeat", || env.events().into_iter().find(|e| e.op == Op::Heartbeat));
    // Another database on the same server writes: the binlog moves, our site stays quiet.
    let other = unique("hb_other");
    let mut c = admin(env.port, None).await;
    c.query_drop(format!("CREATE DATABASE `{other}`; CREATE TABLE `{other}`.t (id INT PRIMARY KEY); INSERT INTO `{other}`.t VALUES (1),(2),(3)"))
        .await
        .unwrap();
    let later = wait_for(60, "a heartbeat at a later position", || {
        env.events()
            .into_iter()
            .filter(|e| e.op == Op::Heartbeat)
            .find(|e| (&e.source.file, e.source.pos) > (&first.source.file, first.source.pos))
    });
    assert!(later.source.ts_ms >= first.source.ts_ms);
    assert!(env.events().iter().filter(|e| !matches!(e.op, Op::Read | Op::Schema)).all(|e| e.op == Op::Heartbeat), "no data events for a quiet site");
    assert!(agent.try_wait().unwrap().is_none(), "agent still running");
    kill9(&mut agent);
    c.query_drop(format!("DROP DATABASE `{other}`")).await.unwrap();
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_is_picked_up() {
    let env = Env::new("ddl", "site-b", &[]).await;
    let mut agent = env.agent(&[]);
    wait_for(120, "the snapshot", || env.events().iter().any(|e| e.op == Op::Heartbeat).then_some(()));
    let mut c = env.db().await;
    c.query_drop("ALTER TABLE person_name ADD COLUMN nickname VARCHAR(50) NULL").await.unwrap();
    c.query_drop("UPDATE person_name SET nickname = 'Jo' WHERE person_name_id = 1").await.unwrap();
    c.query_drop(
        "INSERT INTO person_name (preferred, person_id, given_name, family_name, nickname, creator, date_created, voided, uuid)
         VALUES (0, 1, 'Super', 'User', 'Admin', 1, NOW(), 0, 'bbbbbbbb-0000-4000-8000-000000000001')",
    )
    .await
    .unwrap();
    let ins = wait_for(60, "the insert after the ALTER", || {
        env.events().into_iter().find(|e| e.op == Op::Create && e.uuid.as_deref() == Some("bbbbbbbb-0000-4000-8000-000000000001"))
    });
    assert_eq!(ins.after.as_ref().unwrap()["nickname"], "Admin");
    assert_eq!(ins.refs["person_id"], "1ac26e04-2f3b-11e7-8ccb-28d2440db56c", "refs still resolve after the DDL");
    let upd = env.events().into_iter().find(|e| e.op == Op::Update && e.table.as_deref() == Some("person_name")).unwrap();
    assert_eq!(upd.after.as_ref().unwrap()["nickname"], "Jo");
    assert!(upd.before.as_ref().unwrap()["nickname"].is_null());
    assert!(agent.try_wait().unwrap().is_none(), "the agent kept running");
    kill9(&mut agent);
    env.drop().await;
}

/// A restart in the middle of a DDL sequence: the agent reads rows written under three
/// different shapes of `person_name` while information_schema already shows the last one. Each
/// row must carry its own columns, by name. With `binlog_row_metadata=MINIMAL` the binlog names
/// no column, so this holds only through the schema history (the third shape has as many
/// columns as the first, in another order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_ddl_sequence_decodes_each_row_with_its_own_columns() {
    let env = Env::new("ddlseq", "site-c", &[]).await;
    env.catch_up();
    let mut c = env.db().await;
    c.query_drop("ALTER TABLE person_name ADD COLUMN nickname VARCHAR(50) NULL AFTER given_name").await.unwrap();
    c.query_drop("UPDATE person_name SET nickname = 'Jo', date_changed = NOW() WHERE person_name_id = 1").await.unwrap();
    // The agent reads that far and stops.
    env.catch_up();
    c.query_drop("ALTER TABLE person_name ADD COLUMN title VARCHAR(20) NULL FIRST").await.unwrap();
    c.query_drop("UPDATE person_name SET title = 'Dr', nickname = 'Joe' WHERE person_name_id = 1").await.unwrap();
    c.query_drop("ALTER TABLE person_name DROP COLUMN nickname").await.unwrap();
    c.query_drop("UPDATE person_name SET title = 'Prof', given_name = 'Super2' WHERE person_name_id = 1").await.unwrap();
    let out = env.catch_up();
    let ups: Vec<_> = env
        .events()
        .into_iter()
        .filter(|e| e.op == Op::Update && e.table.as_deref() == Some("person_name") && e.key.as_ref().is_some_and(|k| k["person_name_id"] == 1))
        .map(|e| e.after.unwrap())
        .collect();
    assert_eq!(ups.len(), 3, "three updates of person_name 1: {ups:?}\n{}", String::from_utf8_lossy(&out.stderr));
    let get = |i: usize, k: &str| ups[i].get(k).cloned();
    assert_eq!((get(0, "nickname"), get(0, "given_name"), get(0, "title")), (Some("Jo".into()), Some("Super".into()), None));
    assert_eq!((get(1, "title"), get(1, "nickname"), get(1, "given_name")), (Some("Dr".into()), Some("Joe".into()), Some("Super".into())));
    assert_eq!((get(2, "title"), get(2, "given_name"), get(2, "nickname")), (Some("Prof".into()), Some("Super2".into()), None));
    assert_eq!(ups[2]["uuid"], ups[0]["uuid"], "the same row throughout");
    env.drop().await;
}

/// The grants the agent needs, by path: MariaDB's snapshot takes no lock, so a user without
/// RELOAD snapshots there; the MySQL path needs RELOAD for FLUSH TABLES WITH READ LOCK and says
/// so, naming the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_reload_is_told_which_grant_the_mysql_path_needs() {
    let user = format!("cdc_nr{}", std::process::id());
    let env = Env::new("grants", "site-a", &[("user = \"cdc\"", &format!("user = \"{user}\""))]).await;
    let mut c = env.db().await;
    c.query_drop(format!(
        "CREATE USER IF NOT EXISTS '{user}'@'127.0.0.1' IDENTIFIED BY 'cdc'; GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'127.0.0.1'; GRANT BINLOG MONITOR ON *.* TO '{user}'@'127.0.0.1'"
    ))
    .await
    .unwrap();
    let out = env.agent(&["--until-caught-up"]).wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    if mysql_mode() {
        assert!(!out.status.success(), "the MySQL path cannot lock without RELOAD or LOCK TABLES");
        assert!(log.contains("needs RELOAD") && log.contains("or LOCK TABLES on the OpenMRS database") && log.contains("GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT"), "the error names the grants: {log}");
        assert!(env.events().is_empty(), "nothing was sent");
        // LOCK TABLES on the database (what a managed server grants): table locks instead, and
        // the snapshot under a writing clinic is still the site's state, value for value.
        c.query_drop(format!("GRANT LOCK TABLES ON `{}`.* TO '{user}'@'127.0.0.1'", env.database)).await.unwrap();
        let before = site_counts(&env).await;
        let writes = workload(&env, 5);
        wait_for(60, "the workload's first writes", || (block_on(site_counts(&env)) != before).then_some(()));
        assert!(!writes.is_finished(), "the clinic is writing when the snapshot starts");
        let out = env.agent(&["--until-caught-up"]).wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "table locks: {log}");
        let held = log.lines().find(|l| l.contains("table locks held while the snapshot view opened")).unwrap_or_else(|| panic!("{log}"));
        eprintln!("{held}");
        writes.await.unwrap().expect("workload ran");
        env.catch_up();
        assert_replay_is_the_site(&env, &env.events()).await;
    } else {
        assert!(out.status.success(), "MariaDB's snapshot needs no RELOAD: {log}");
        assert!(env.events().iter().any(|e| e.op == Op::Read));
    }
    c.query_drop(format!("DROP USER '{user}'@'127.0.0.1'")).await.unwrap();
    env.drop().await;
}

/// One process for several sites (issue #24 §4): each site has its own topic and checkpoint
/// and takes its whole snapshot; a site whose agent cannot log in stops alone, and the process
/// says which; a site not in the config is refused before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_runs_several_sites_and_a_failing_one_stops_only_itself() {
    let env = Env::new("multi", "site-a", &[]).await;
    let b_port = if mysql_mode() { env.port } else { 3312 };
    if b_port != env.port {
        let mut b = admin(b_port, None).await;
        omrs_simulate::provision::provision(&mut b, "site-b", &env.database, &dump(), true).await.expect("provision site-b");
    }
    // site-c's agent cannot log in: a definite error of that site alone.
    let text = std::fs::read_to_string(&env.config).unwrap();
    let at = text.find("name = \"site-c\"").unwrap();
    let pw = at + text[at..].find("password = ").unwrap();
    let end = pw + text[pw..].find('\n').unwrap();
    std::fs::write(&env.config, format!("{}password = \"not-the-password\"{}", &text[..pw], &text[end..])).unwrap();
    let agent = |sites: &[&str]| {
        let mut c = bin();
        c.arg("--config").arg(&env.config).args(["ingest", "--until-caught-up", "--metrics-port", "0"]).env("RUST_LOG", "warn,omrs_ingest=info");
        for s in sites {
            c.args(["--site", s]);
        }
        c.output().unwrap()
    };
    let refused = agent(&["site-a", "nowhere"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("site `nowhere` is not in the config"));
    assert!(read_topic(&format!("{}omrs.cdc.site-a", env.prefix)).is_empty(), "nothing connected before the config was checked");
    let out = agent(&["site-a", "site-b", "site-c"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stopped site makes the process exit 1");
    assert!(log.contains("1 site(s) stopped: site-c"), "{log}");
    let rows: i64 = site_counts(&env).await.values().sum();
    for site in ["site-a", "site-b"] {
        let events = read_topic(&format!("{}omrs.cdc.{site}", env.prefix));
        let reads = events.iter().filter(|e| e.op == Op::Read).count() as i64;
        assert_eq!(reads, rows, "{site}'s whole snapshot on its own topic");
        assert!(events.iter().all(|e| e.site == site));
        let cps = read_json::<serde_json::Value>(&format!("{}omrs.ingest.offsets.{site}", env.prefix));
        assert_eq!(cps.last().map(|c| c["phase"].clone()), Some(serde_json::json!("streaming")), "{site} has its own checkpoint");
    }
    assert!(read_topic(&format!("{}omrs.cdc.site-c", env.prefix)).is_empty());
    if b_port != env.port {
        admin(b_port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{}`", env.database)).await.unwrap();
    }
    env.drop().await;
}

/// A row whose change event would exceed a site event's limit (a 9 MB LONGTEXT) does not stop
/// the site's stream: it goes as a stand-in without its images, with its size, which the
/// transform dead-letters naming the row; the rows after it arrive as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_an_event_goes_as_a_stand_in_and_the_stream_goes_on() {
    let env = Env::new("oversize", "site-a", &[]).await;
    env.catch_up();
    let mut db = env.db().await;
    let big_uuid = "0b5e5a1e-0000-4000-8000-00000000b161";
    let small_uuid = "0b5e5a1e-0000-4000-8000-0000000005aa";
    db.query_drop(format!("INSERT INTO clob_datatype_storage (uuid, value) VALUES ('{big_uuid}', REPEAT('x', 9000000))")).await.unwrap();
    db.query_drop(format!("INSERT INTO clob_datatype_storage (uuid, value) VALUES ('{small_uuid}', 'small')")).await.unwrap();
    let out = env.catch_up();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("row change too large for a site event"), "the agent did not say so:\n{log}");
    let events = env.events();
    let big = events.iter().find(|e| e.uuid.as_deref() == Some(big_uuid)).expect("the big row's stand-in is on the site topic");
    assert_eq!(big.op, Op::Create);
    assert!(big.oversize.is_some_and(|n| n > 9_000_000), "its size: {:?}", big.oversize);
    assert!(big.after.is_none() && big.before.is_none() && big.refs.is_empty(), "a stand-in carries no row images");
    let reason = big.validate().unwrap_err().to_string();
    assert!(reason.contains("row too large") && reason.contains(big_uuid) && reason.contains("clob_datatype_storage"), "{reason}");
    let small = events.iter().find(|e| e.uuid.as_deref() == Some(small_uuid)).expect("the row after the big one arrived");
    assert_eq!(small.after.as_ref().unwrap()["value"], serde_json::json!("small"));
    env.drop().await;
}

/// The latest committed checkpoint of the env's agent, as JSON.
fn last_checkpoint(env: &Env) -> Option<serde_json::Value> {
    read_json::<serde_json::Value>(&format!("{}omrs.ingest.offsets.{}", env.prefix, env.site)).pop()
}

fn skip_rows(cp: &serde_json::Value) -> u64 {
    cp.get("skip_rows").and_then(|v| v.as_u64()).unwrap_or(0)
}

/// A site transaction larger than `ingest.max_txn_events` is committed to Kafka in parts, each
/// with a checkpoint inside the transaction (`skip_rows`); SIGKILLed between two parts, the
/// agent resumes inside it, and every row change is on the topic once, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_site_transaction_is_committed_in_parts_and_a_kill_inside_it_loses_and_doubles_nothing() {
    let env = Env::new("split", "site-a", &[("max_txn_events = 50000", "max_txn_events = 400")]).await;
    env.catch_up();
    let mut c = env.db().await;
    let n: i64 = c.query_first("SELECT COUNT(*) FROM obs").await.unwrap().unwrap();
    assert!(n > 5_000, "the demo dump has {n} obs");
    let mut resumed_inside = 0;
    for round in 0..3 {
        let mut agent = env.agent(&[]);
        // Two full-table UPDATEs in one site transaction: 2 × n row changes.
        let (a, b) = (format!("split{round}-a-"), format!("split{round}-b-"));
        c.query_drop(format!("BEGIN; UPDATE obs SET comments = CONCAT('{a}', obs_id); UPDATE obs SET comments = CONCAT('{b}', obs_id); COMMIT")).await.unwrap();
        // Killed as soon as a checkpoint inside the transaction is committed.
        wait_for(120, "a checkpoint inside the site transaction", || {
            if let Ok(Some(status)) = agent.try_wait() {
                panic!("agent exited early: {status}");
            }
            last_checkpoint(&env).filter(|cp| skip_rows(cp) > 0)
        });
        kill9(&mut agent);
        if last_checkpoint(&env).is_some_and(|cp| skip_rows(&cp) > 0) {
            resumed_inside += 1;
        }
        env.catch_up();
        let events = env.events();
        for prefix in [&a, &b] {
            let mut seen = HashSet::new();
            for e in events.iter().filter(|e| e.table.as_deref() == Some("obs") && e.op == Op::Update) {
                let after = e.after.as_ref().unwrap();
                let Some(text) = after.get("comments").and_then(|v| v.as_str()).filter(|t| t.starts_with(prefix.as_str())) else { continue };
                let id = after["obs_id"].as_i64().unwrap();
                assert_eq!(text, format!("{prefix}{id}"), "obs {id}");
                assert!(seen.insert(id), "obs {id}'s `{prefix}` change is on the topic twice");
            }
            assert_eq!(seen.len() as i64, n, "every obs row's `{prefix}` change, once");
        }
        if resumed_inside > 0 {
            break;
        }
    }
    assert!(resumed_inside > 0, "no kill landed inside the site transaction in 3 rounds");
    env.drop().await;
}
