//! The HQ MySQL sink end to end on real services: the simulator writes three sites (300 people,
//! 20 % registered at several sites, updates, voids, deletes and site merges), one ingest agent
//! per site, the transform, then `sink hq-mysql` into a fresh HQ database. After the drain:
//! one unvoided patient per human, the manifest's table counts, no FK orphans, a cross-site
//! conflict decided by the rule and logged, and the same HQ (in uuid space) after SIGKILLs,
//! other batch sizes, and a second pipeline run with the sites started in another order.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use common::*;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

const HQ_PORT: u16 = 3310;
const LOC_UUID_SQL: &str = "SELECT uuid FROM location WHERE retired = 0 ORDER BY location_id LIMIT 1";

struct Pipeline {
    dir: tempfile::TempDir,
    prefix: String,
    database: String,
}

impl Pipeline {
    fn config(&self, hq_db: &str, tweaks: &[(&str, &str)]) -> PathBuf {
        let mut text = std::fs::read_to_string(root().join("omrs-stream.toml"))
            .unwrap()
            .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{}\"\n", self.prefix))
            .replace("database = \"openmrs\"\n", &format!("database = \"{}\"\n", self.database))
            .replace("database = \"openmrs_hq\"\n", &format!("database = \"{hq_db}\"\n"))
            .replace("idle_timeout_s = 180", "idle_timeout_s = 5")
            .replace("user = \"hq\"", "user = \"omrs\"")
            .replace("${OMRS_HQ_PASSWORD:-hq}", "omrs");
        for (from, to) in tweaks {
            assert!(text.contains(from), "tweak `{from}` does not apply");
            text = text.replacen(from, to, 1);
        }
        let path = self.dir.path().join(format!("{hq_db}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn run(&self, config: &Path, args: &[&str]) -> std::process::Output {
        let out = bin().arg("--config").arg(config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn sink(&self, config: &Path, extra: &[&str]) -> Child {
        bin()
            .arg("--config")
            .arg(config)
            .args(["sink", "hq-mysql", "--metrics-port", "0", "--quiet"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("sink.log")).unwrap())
            .spawn()
            .unwrap()
    }

    /// Ingest agents started in `order` (together, or each to completion), caught up.
    fn ingest(&self, config: &Path, order: &[&str], concurrent: bool) {
        let mut agents = Vec::new();
        for site in order {
            let child = bin()
                .arg("--config")
                .arg(config)
                .args(["ingest", "--site", site, "--until-caught-up", "--quiet", "--metrics-port", "0"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // (stderr is read by wait_with_output below)
            if concurrent {
                agents.push(child);
            } else {
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success(), "ingest {site}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        for a in agents {
            let out = a.wait_with_output().unwrap();
            assert!(out.status.success(), "ingest: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

async fn hq(db: &str) -> Conn {
    admin(HQ_PORT, Some(db)).await
}

async fn count(c: &mut Conn, sql: &str) -> i64 {
    c.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0)
}

/// The HQ database in uuid space: every OpenMRS table's rows, with HQ's own integer ids left out
/// and every reference replaced by the uuid of the row it points to; sorted.
async fn dump(db: &str) -> BTreeMap<String, Vec<String>> {
    let mut c = hq(db).await;
    let cols: Vec<(String, String, String)> = c
        .exec(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name NOT LIKE 'omrs\\_sync\\_%' ORDER BY table_name, ordinal_position",
            (db,),
        )
        .await
        .unwrap();
    let keys: Vec<(String, String, String, Option<String>, Option<String>)> = c
        .exec(
            "SELECT table_name, column_name, constraint_name, referenced_table_name, referenced_column_name FROM information_schema.key_column_usage WHERE table_schema = ?",
            (db,),
        )
        .await
        .unwrap();
    let mut pk: HashMap<String, Vec<String>> = HashMap::new();
    let mut fks: HashMap<(String, String), String> = HashMap::new();
    for (t, col, cons, rt, _) in &keys {
        if cons == "PRIMARY" {
            pk.entry(t.clone()).or_default().push(col.clone());
        } else if let Some(rt) = rt {
            fks.insert((t.clone(), col.clone()), rt.clone());
        }
    }
    let mut by_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, col, _) in &cols {
        by_table.entry(t.clone()).or_default().push(col.clone());
    }
    // id → uuid per table (shared-key tables through their parent).
    let mut uuid_of: HashMap<String, HashMap<String, String>> = HashMap::new();
    for (t, cs) in &by_table {
        let Some(p) = pk.get(t).filter(|p| p.len() == 1) else { continue };
        if cs.iter().any(|c| c == "uuid") {
            let rows: Vec<(String, Option<String>)> = c.query(format!("SELECT CAST(`{}` AS CHAR), uuid FROM `{t}`", p[0])).await.unwrap();
            uuid_of.insert(t.clone(), rows.into_iter().filter_map(|(i, u)| Some((i, u?))).collect());
        }
    }
    for (t, _) in &by_table {
        let Some(p) = pk.get(t).filter(|p| p.len() == 1) else { continue };
        if uuid_of.contains_key(t) {
            continue;
        }
        if let Some(parent) = fks.get(&(t.clone(), p[0].clone())) {
            if let Some(m) = uuid_of.get(parent).cloned() {
                uuid_of.insert(t.clone(), m);
            }
        }
    }
    let merged = regex_lite_merged();
    let mut out = BTreeMap::new();
    for (t, cs) in &by_table {
        let p = pk.get(t).cloned().unwrap_or_default();
        let select = cs.iter().map(|c| format!("CAST(`{c}` AS CHAR)")).collect::<Vec<_>>().join(",");
        let rows: Vec<mysql_async::Row> = c.query(format!("SELECT {select} FROM `{t}`")).await.unwrap();
        let person_uuids = uuid_of.get("person").cloned().unwrap_or_default();
        let mut lines = Vec::new();
        for r in rows {
            let mut fields = Vec::new();
            for (i, col) in cs.iter().enumerate() {
                let v: Option<String> = r.get(i).unwrap_or(None);
                let own_id = p.len() == 1 && p[0] == *col && uuid_of.contains_key(t);
                if own_id {
                    continue;
                }
                let v = match (fks.get(&(t.clone(), col.clone())), &v) {
                    (Some(rt), Some(id)) => uuid_of.get(rt).and_then(|m| m.get(id)).cloned().unwrap_or_else(|| format!("#{id}")),
                    _ => v.unwrap_or_else(|| "NULL".into()),
                };
                let v = merged(&v, &person_uuids);
                fields.push(format!("{col}={v}"));
            }
            lines.push(fields.join("|"));
        }
        lines.sort();
        out.insert(t.clone(), lines);
    }
    out
}

/// "Merged with patient #12" names HQ's id: map it to the person's uuid.
fn regex_lite_merged() -> impl Fn(&str, &HashMap<String, String>) -> String {
    |v: &str, persons: &HashMap<String, String>| {
        if let Some(id) = v.strip_prefix("Merged with patient #") {
            if let Some(u) = persons.get(id) {
                return format!("Merged with patient {u}");
            }
        }
        v.to_string()
    }
}

fn assert_same(a: &BTreeMap<String, Vec<String>>, b: &BTreeMap<String, Vec<String>>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: tables differ");
    for (t, rows) in a {
        let other = &b[t];
        if rows != other {
            let only_a: Vec<_> = rows.iter().filter(|r| !other.contains(r)).take(3).collect();
            let only_b: Vec<_> = other.iter().filter(|r| !rows.contains(r)).take(3).collect();
            panic!("{what}: table {t} differs ({} vs {} rows)\n  only in first: {only_a:#?}\n  only in second: {only_b:#?}", rows.len(), other.len());
        }
    }
}

async fn offsets(db: &str) -> i64 {
    let mut c = hq(db).await;
    c.query_first::<i64, _>("SELECT COALESCE(MAX(next_offset), 0) FROM omrs_sync_offsets").await.unwrap_or(None).unwrap_or(0)
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
    let logged = count(&mut c, &format!("SELECT COUNT(*) FROM omrs_sync_conflict WHERE tbl = 'location' AND row_key = '{loc}' AND loser_site = 'site-b' AND winner_site = 'site-a'")).await;
    assert_eq!(logged, 1, "conflict logged");
    assert_eq!(count(&mut c, "SELECT COUNT(*) FROM omrs_sync_pending").await, 0, "nothing left pending");
    let reference = dump(&hq1).await;
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
    assert_same(&reference, &dump(&hq2).await, "after 3 SIGKILLs");

    // Other batch sizes and restart points.
    let hq3 = unique("openmrs_hq_b");
    let cfg3 = p.config(&hq3, &[("batch_max_rows = 5000", "batch_max_rows = 37")]);
    p.run(&cfg3, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump_path())]);
    p.run(&cfg3, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    assert_same(&reference, &dump(&hq3).await, "batches of 37");

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
    assert_same(&reference, &dump(&hq4).await, "sites read in another order, transform restarted");

    // Clean up.
    let mut admin_hq = admin(HQ_PORT, None).await;
    for db in [&hq1, &hq2, &hq3, &hq4] {
        admin_hq.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await.unwrap();
    }
    for port in [3311, 3312, 3313] {
        let mut c = admin(port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}

fn dump_path() -> PathBuf {
    common::dump()
}

/// Runs a future to completion from synchronous polling code.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
