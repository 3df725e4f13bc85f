//! An OpenMRS upgrade while streaming (issue #25 §3). The simulator writes at three clinics
//! while site-a runs an upgrade script (Liquibase-style ALTER TABLEs: columns added, one with a
//! default, a wider identifier; a module's new table with foreign keys to `patient` and
//! `encounter`) and writes rows that use it; later site-b runs the same script. No stage is
//! restarted. At the end `verify` (sites vs HQ vs lake, by value) passes; HQ has the columns and
//! the module table with the sites' values; the lake's `changes` and `current` carry them; HQ's
//! log says which site's change it applied and that the second was already in step.
//! Its own test binary: it runs a whole pipeline.

mod common;

use std::collections::BTreeSet;

use common::hq::*;
use common::pipeline::*;
use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value as J;

const UPGRADE: &[&str] = &[
    "ALTER TABLE person_name ADD COLUMN name_origin VARCHAR(64) NULL AFTER family_name",
    "ALTER TABLE visit ADD COLUMN visit_channel VARCHAR(16) NOT NULL DEFAULT 'in_person'",
    "ALTER TABLE patient_identifier MODIFY COLUMN identifier VARCHAR(100) NOT NULL DEFAULT ''",
    "CREATE INDEX person_name_origin ON person_name (name_origin)",
    "ALTER TABLE visit ADD INDEX visit_channel_started (visit_channel, date_started)",
    "CREATE TABLE hivcare_enrollment (
        hivcare_enrollment_id INT(11) NOT NULL AUTO_INCREMENT,
        patient_id INT(11) NOT NULL,
        encounter_id INT(11) NULL,
        art_start_date DATE NULL,
        who_stage TINYINT(4) NULL,
        uuid CHAR(38) NOT NULL,
        date_created DATETIME NOT NULL,
        PRIMARY KEY (hivcare_enrollment_id),
        UNIQUE KEY hivcare_enrollment_uuid (uuid),
        KEY hivcare_enrollment_art_start (art_start_date),
        CONSTRAINT hivcare_enrollment_patient FOREIGN KEY (patient_id) REFERENCES patient (patient_id),
        CONSTRAINT hivcare_enrollment_encounter FOREIGN KEY (encounter_id) REFERENCES encounter (encounter_id)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
];

/// The upgrade at one clinic, then rows that use it: an enrollment for five patients with an
/// encounter, a name origin for their names, a telehealth visit channel. Returns the
/// enrollments' uuids.
async fn upgrade(port: u16, db: &str, site: &str) -> Vec<String> {
    let mut c = admin(port, Some(db)).await;
    for ddl in UPGRADE {
        c.query_drop(*ddl).await.unwrap_or_else(|e| panic!("{site}: {ddl}: {e}"));
    }
    // The first five patients with an encounter: at site-a the demo dump's, which the
    // simulator's workload leaves alone; at site-b (no demo patients) the workload's first,
    // which it may still be writing: on a fast machine site-b upgrades before it has five.
    let patients: Vec<(i64, i64)> = wait_for(180, &format!("five patients with an encounter at {site}, for the upgrade's rows"), || {
        let found: Vec<(i64, i64)> = block_on(c.query(
            "SELECT e.patient_id, MIN(e.encounter_id) FROM encounter e JOIN patient p ON p.patient_id = e.patient_id WHERE e.voided = 0 GROUP BY e.patient_id ORDER BY e.patient_id LIMIT 5",
        ))
        .unwrap();
        (found.len() == 5).then_some(found)
    });
    let mut uuids = Vec::new();
    for (i, (pid, eid)) in patients.iter().enumerate() {
        let uuid = format!("{:08x}-0000-4000-8000-{:012x}", 0x4ec0_0000u32 + i as u32, port as u64);
        c.exec_drop(
            "INSERT INTO hivcare_enrollment (patient_id, encounter_id, art_start_date, who_stage, uuid, date_created) VALUES (?, ?, ?, ?, ?, NOW())",
            (pid, eid, format!("2026-0{}-1{i}", 1 + i % 9), (i % 4 + 1) as i64, &uuid),
        )
        .await
        .unwrap();
        c.exec_drop("UPDATE person_name SET name_origin = ?, date_changed = NOW() WHERE person_id = ? AND voided = 0", (format!("{site} registry {i}"), pid)).await.unwrap();
        c.exec_drop("UPDATE visit SET visit_channel = 'telehealth', date_changed = NOW() WHERE patient_id = ? AND voided = 0", (pid,)).await.unwrap();
        uuids.push(uuid);
    }
    uuids
}

/// The module's next release widens a column its rows already use, then needs the room: the
/// lake's files before hold it as Int8, after as Int16.
async fn widen_stage(port: u16, db: &str, uuid: &str) {
    let mut c = admin(port, Some(db)).await;
    c.query_drop("ALTER TABLE hivcare_enrollment MODIFY COLUMN who_stage SMALLINT(6) NULL").await.unwrap();
    c.exec_drop("UPDATE hivcare_enrollment SET who_stage = ? WHERE uuid = ?", (1000 + port as i64 % 100, uuid)).await.unwrap();
}

/// `(uuid, patient uuid, encounter uuid, art_start_date, who_stage)` of the enrollments in `db`
/// on `port`.
async fn enrollments(port: u16, db: &str) -> BTreeSet<String> {
    let mut c = admin(port, Some(db)).await;
    type Enrollment = (String, String, Option<String>, Option<String>, Option<i64>);
    let rows: Vec<Enrollment> = c
        .query(
            "SELECT h.uuid, pe.uuid, e.uuid, DATE_FORMAT(h.art_start_date, '%Y-%m-%d'), h.who_stage FROM hivcare_enrollment h
             JOIN person pe ON pe.person_id = h.patient_id LEFT JOIN encounter e ON e.encounter_id = h.encounter_id",
        )
        .await
        .unwrap();
    rows.into_iter().map(|r| format!("{r:?}")).collect()
}

fn lake_query(config: &std::path::Path, lake: &std::path::Path, sql: &str) -> Vec<serde_json::Map<String, J>> {
    let out = bin().arg("--config").arg(config).args(["query", "--format", "json", "--lake"]).arg(lake).arg(sql).output().unwrap();
    assert!(out.status.success(), "query {sql}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openmrs_upgrade_at_two_clinics_flows_to_hq_and_the_lake_without_a_restart() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tupg")), database: unique("upg") };
    let hq_db = unique("openmrs_hq_upg");
    let l = live(&p, &hq_db, 60, 31, Some(150.0)).await;
    let (mut procs, sim) = start_with_workload(&p, &l);
    let mut hq = hq(&hq_db).await;
    // The clinics' work is reaching HQ when site-a upgrades.
    wait_for(240, "the first rows at HQ", || {
        let n: i64 = futures_count(&hq_db, "SELECT COUNT(*) FROM obs");
        (n > 0).then_some(())
    });
    assert!(!sim.is_finished(), "the workload is still writing when site-a upgrades");
    let a_uuids = upgrade(3311, &p.database, "site-a").await;
    // site-a's enrollments at HQ (the table was created there on the way) while the others
    // have not upgraded.
    wait_for(240, "site-a's module rows at HQ", || {
        let n = futures_count(&hq_db, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'hivcare_enrollment'");
        (n == 1 && futures_count(&hq_db, "SELECT COUNT(*) FROM hivcare_enrollment") == 5).then_some(())
    });
    // Widened once the table and its rows have gone on (the agent reads a DDL's shape when it
    // reaches it, so a widening read with the CREATE would be no widening downstream).
    widen_stage(3311, &p.database, &a_uuids[0]).await;
    assert_alive(&mut procs, p.dir.path(), "after site-a's upgrade");
    assert!(!sim.is_finished(), "the workload is still writing when site-b upgrades");
    let b_uuids = upgrade(3312, &p.database, "site-b").await;
    widen_stage(3312, &p.database, &b_uuids[0]).await;
    let manifest = sim.await.unwrap().unwrap();
    eprintln!("upgrade: {} row changes by the simulator", manifest.row_changes);
    let report = drain_until_verified(&l.config, Some(&l.manifest), &l.lake, &mut procs, p.dir.path(), 420, "the upgrades").await;
    assert_eq!(report["ok"], true);

    // HQ has the new columns, the widened identifier and the module table with its keys.
    let cols: Vec<(String, String, String, String, Option<String>)> = hq
        .query(
            "SELECT table_name, column_name, column_type, is_nullable, column_default FROM information_schema.columns WHERE table_schema = DATABASE()
             AND ((table_name = 'person_name' AND column_name = 'name_origin') OR (table_name = 'visit' AND column_name = 'visit_channel')
                  OR (table_name = 'patient_identifier' AND column_name = 'identifier')) ORDER BY table_name",
        )
        .await
        .unwrap();
    assert_eq!(cols.len(), 3, "{cols:?}");
    assert_eq!((cols[0].1.as_str(), cols[0].2.as_str()), ("identifier", "varchar(100)"));
    assert_eq!((cols[1].1.as_str(), cols[1].2.as_str(), cols[1].3.as_str()), ("name_origin", "varchar(64)", "YES"));
    assert_eq!((cols[2].1.as_str(), cols[2].4.as_deref()), ("visit_channel", Some("'in_person'")));
    let fks: Vec<String> = hq
        .query("SELECT referenced_table_name FROM information_schema.key_column_usage WHERE table_schema = DATABASE() AND table_name = 'hivcare_enrollment' AND referenced_table_name IS NOT NULL ORDER BY 1")
        .await
        .unwrap();
    assert_eq!(fks, ["encounter", "patient"]);
    // The clinics' new indexes, once each however many clinics sent them; the module table's
    // uuid key stays unique, its other keys are plain (values unique at one clinic may repeat
    // across clinics).
    let indexes: Vec<(String, String, String, i64)> = hq
        .query(
            "SELECT table_name, index_name, GROUP_CONCAT(column_name ORDER BY seq_in_index), MIN(non_unique) FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND ((table_name = 'person_name' AND index_name LIKE 'person_name_origin%')
                  OR (table_name = 'visit' AND index_name LIKE 'visit_channel%') OR (table_name = 'hivcare_enrollment' AND index_name <> 'PRIMARY'))
             GROUP BY table_name, index_name ORDER BY table_name, index_name",
        )
        .await
        .unwrap();
    let indexes: Vec<(&str, &str, &str, i64)> = indexes.iter().map(|(t, i, c, n)| (t.as_str(), i.as_str(), c.as_str(), *n)).collect();
    let fk_keys = indexes.iter().filter(|i| i.0 == "hivcare_enrollment" && (i.2 == "patient_id" || i.2 == "encounter_id")).count();
    let indexes: Vec<_> = indexes.into_iter().filter(|i| !(i.0 == "hivcare_enrollment" && (i.2 == "patient_id" || i.2 == "encounter_id"))).collect();
    assert_eq!(
        indexes,
        [
            ("hivcare_enrollment", "hivcare_enrollment_art_start", "art_start_date", 1),
            ("hivcare_enrollment", "hivcare_enrollment_uuid", "uuid", 0),
            ("person_name", "person_name_origin", "name_origin", 1),
            ("visit", "visit_channel_started", "visit_channel,date_started", 1),
        ],
        "HQ's indexes from the clinics' upgrades"
    );
    assert!(fk_keys <= 2, "the foreign keys' own indexes: {fk_keys}");
    // The module's rows at HQ, by value and with their references, are the clinics'.
    let mut want = enrollments(3311, &p.database).await;
    want.extend(enrollments(3312, &p.database).await);
    assert_eq!(want.len(), 10);
    assert_eq!(enrollments(HQ_PORT, &hq_db).await, want, "HQ's enrollments are the clinics'");
    // Columns added at the clinics hold the clinics' values at HQ (the name origins written,
    // and the default the ALTER gave every existing visit).
    let origins: Vec<(String, String)> = hq.query("SELECT uuid, name_origin FROM person_name WHERE name_origin IS NOT NULL ORDER BY uuid").await.unwrap();
    assert_eq!(origins.len(), origins.iter().filter(|(_, o)| o.starts_with("site-a") || o.starts_with("site-b")).count());
    assert!(origins.len() >= 10, "name origins at HQ: {origins:?}");
    let channels: Vec<(String, i64)> = hq.query("SELECT visit_channel, COUNT(*) FROM visit GROUP BY visit_channel ORDER BY 1").await.unwrap();
    assert!(channels.iter().any(|(c, n)| c == "telehealth" && *n >= 10), "{channels:?}");
    // HQ's log: site-a's change applied, site-b's found HQ in step; nothing blocked.
    let log: Vec<(String, String, String)> = hq.query("SELECT site, tbl, status FROM omrs_sync_schema_change ORDER BY id").await.unwrap();
    for t in ["person_name", "visit", "patient_identifier", "hivcare_enrollment"] {
        assert!(log.contains(&("site-a".into(), t.into(), "applied".into())), "site-a's {t}: {log:?}");
        assert!(log.contains(&("site-b".into(), t.into(), "in_step".into())), "site-b's {t}: {log:?}");
    }
    assert!(!log.iter().any(|(_, _, s)| s == "blocked"), "{log:?}");

    // The lake: the module's dataset, and the new column in changes and current.
    let lake_enr = lake_query(&l.config, &l.lake, "SELECT uuid, who_stage, patient_id_uuid FROM current.hivcare_enrollment ORDER BY uuid");
    let lake_uuids: Vec<&str> = lake_enr.iter().filter_map(|r| r["uuid"].as_str()).collect();
    let mut all: Vec<String> = a_uuids.iter().chain(&b_uuids).cloned().collect();
    all.sort();
    assert_eq!(lake_uuids, all.iter().map(String::as_str).collect::<Vec<_>>());
    // The widened column: one type for the table, older files cast to it, the clinics' values.
    let stages = lake_query(&l.config, &l.lake, "SELECT uuid, who_stage FROM current.hivcare_enrollment ORDER BY uuid");
    let lake_stages: BTreeSet<(String, i64)> = stages.iter().map(|r| (r["uuid"].as_str().unwrap_or("").to_string(), r["who_stage"].as_i64().unwrap_or(-1))).collect();
    let mut site_stages = BTreeSet::new();
    for port in [3311u16, 3312] {
        let mut c = admin(port, Some(&p.database)).await;
        let rows: Vec<(String, i64)> = c.query("SELECT uuid, who_stage FROM hivcare_enrollment").await.unwrap();
        site_stages.extend(rows);
    }
    assert_eq!(lake_stages, site_stages, "the lake's current enrollments hold the widened values");
    assert_eq!(site_stages.iter().filter(|(_, s)| *s >= 1000).count(), 2, "{site_stages:?}");
    let history = lake_query(&l.config, &l.lake, "SELECT COUNT(*) AS n, MAX(who_stage) AS top, arrow_typeof(MAX(who_stage)) AS t FROM changes.hivcare_enrollment");
    assert!(history[0]["n"].as_i64().unwrap_or(0) >= 12, "inserts and the two updates: {history:?}");
    assert_eq!(history[0]["top"].as_i64(), site_stages.iter().map(|(_, s)| *s).max(), "{history:?}");
    assert_eq!(history[0]["t"].as_str(), Some("Int16"), "{history:?}");
    let changed = lake_query(&l.config, &l.lake, "SELECT COUNT(*) AS n FROM changes.person_name WHERE name_origin IS NOT NULL");
    assert!(changed[0]["n"].as_i64().unwrap_or(0) >= 10, "{changed:?}");
    let current = lake_query(&l.config, &l.lake, "SELECT uuid, name_origin FROM current.person_name WHERE name_origin IS NOT NULL ORDER BY uuid");
    let lake_origins: Vec<(String, String)> = current.iter().map(|r| (r["uuid"].as_str().unwrap_or("").to_string(), r["name_origin"].as_str().unwrap_or("").to_string())).collect();
    assert_eq!(lake_origins, origins, "the lake's current names carry the clinics' origins");

    // A change HQ will not follow alone: site-c renames a column. Its changes of that table stop
    // (dead-lettered with the reason, logged as blocked); its other tables keep flowing.
    let mut c = admin(3313, Some(&p.database)).await;
    c.query_drop("ALTER TABLE location_tag CHANGE COLUMN description tag_description VARCHAR(255) NULL").await.unwrap();
    c.query_drop("UPDATE location_tag SET tag_description = 'renamed at site-c', date_changed = NOW() WHERE location_tag_id = 1").await.unwrap();
    c.query_drop("UPDATE location SET description = 'after the rename', date_changed = NOW() WHERE location_id = 1").await.unwrap();
    wait_for(120, "site-c's location change at HQ", || {
        let n = futures_count(&hq_db, "SELECT COUNT(*) FROM location WHERE location_id = 1 AND description = 'after the rename'");
        (n == 1).then_some(())
    });
    let blocked: Vec<(String, String, String)> = hq.query("SELECT tbl, site_ddl, reason FROM omrs_sync_schema_change WHERE status = 'blocked' AND site = 'site-c'").await.unwrap();
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0].0, "location_tag");
    assert!(blocked[0].1.contains("CHANGE COLUMN description tag_description"), "{blocked:?}");
    assert!(blocked[0].2.contains("`description` is gone at the site"), "{blocked:?}");
    let dead = wait_for(60, "the blocked change in the dead-letter topic", || {
        let out = bin().arg("--config").arg(&l.config).args(["dlq", "list", "--kind", "schema_blocked"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("location_tag").then_some(text)
    });
    assert!(dead.contains("site-c"), "the dead letter names the site: {dead}");
    let hq_tag: Option<String> = hq.query_first("SELECT description FROM location_tag WHERE uuid = (SELECT uuid FROM location_tag WHERE location_tag_id = 1)").await.unwrap().flatten();
    assert_ne!(hq_tag.as_deref(), Some("renamed at site-c"), "HQ did not guess where the renamed column's value goes");
    assert_alive(&mut procs, p.dir.path(), "after a blocked schema change");
    drop(procs);
    drop(hq);
    drop_databases(&[&hq_db], &p.database).await;
}

/// `sink hq-mysql --init --schema-from site-a`: HQ's tables are the site's own (its OpenMRS
/// version and its modules), with their keys and foreign keys, and no rows; the bookkeeping is
/// there. An HQ that exists is kept without --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hq_is_built_from_a_live_sites_schema() {
    let hq_db = unique("openmrs_hq_from");
    let env = Env::new("schemafrom", "site-a", &[("database = \"openmrs_hq\"", &format!("database = \"{hq_db}\""))]).await;
    let mut site = env.db().await;
    let module = UPGRADE.iter().find(|d| d.starts_with("CREATE TABLE hivcare_enrollment")).expect("the module's table");
    site.query_drop(*module).await.unwrap();
    let at_site = base_tables(&mut site, &env.database).await;
    let out = bin().arg("--config").arg(&env.config).args(["sink", "hq-mysql", "--init", "--schema-from", "site-a"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut hq = hq(&hq_db).await;
    assert_eq!(base_tables(&mut hq, &hq_db).await, at_site, "HQ has the site's tables");
    assert!(at_site.contains(&"hivcare_enrollment".to_string()));
    let fks: Vec<String> = hq
        .query(format!("SELECT referenced_table_name FROM information_schema.key_column_usage WHERE table_schema = '{hq_db}' AND table_name = 'hivcare_enrollment' AND referenced_table_name IS NOT NULL ORDER BY 1"))
        .await
        .unwrap();
    assert_eq!(fks, ["encounter", "patient"]);
    let rows: i64 = hq.query_first("SELECT (SELECT COUNT(*) FROM obs) + (SELECT COUNT(*) FROM person) + (SELECT COUNT(*) FROM concept)").await.unwrap().unwrap();
    assert_eq!(rows, 0, "no rows: the snapshots bring them");
    let offsets: i64 = hq.query_first("SELECT COUNT(*) FROM omrs_sync_offsets").await.unwrap().unwrap();
    assert_eq!(offsets, 0);
    // Kept without --force; an unknown site is named.
    let again = bin().arg("--config").arg(&env.config).args(["sink", "hq-mysql", "--init", "--schema-from", "site-a"]).output().unwrap();
    assert!(again.status.success() && String::from_utf8_lossy(&again.stderr).contains("kept it"), "{}", String::from_utf8_lossy(&again.stderr));
    let unknown = bin().arg("--config").arg(&env.config).args(["sink", "hq-mysql", "--init", "--schema-from", "site-z"]).output().unwrap();
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("site `site-z` is not in the config"));
    hq.query_drop(format!("DROP DATABASE `{hq_db}`")).await.unwrap();
    env.drop().await;
}

/// The OpenMRS base tables of `db` (the sink's own left out).
async fn base_tables(c: &mut mysql_async::Conn, db: &str) -> Vec<String> {
    c.query(format!("SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' AND table_type = 'BASE TABLE' AND table_name NOT LIKE 'omrs\\_%' ORDER BY 1")).await.unwrap()
}

/// A count at HQ, from a synchronous poll.
fn futures_count(hq_db: &str, sql: &str) -> i64 {
    block_on(async {
        let mut c = hq(hq_db).await;
        c.query_first::<i64, _>(sql).await.ok().flatten().unwrap_or(0)
    })
}
