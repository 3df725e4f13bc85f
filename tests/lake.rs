//! The Parquet lake end to end on real services, after the same kind of simulator run as the HQ
//! sink's test (three sites, 150 people, cross-site duplicates, updates, voids, deletes, site
//! merges, a cross-site conflict), plus a custom module table (`omrs_probe`, at the sites and
//! at HQ) that carries a DECIMAL, a DATETIME(6), a boolean, a NULL and a non-ASCII name.
//!
//! - `current.<table>` equals the HQ table in uuid space for the core tables (rows and values);
//! - the probe's values round-trip site → Parquet → `query` exactly, with their Arrow types;
//! - SIGKILLs of the sink during writes (at each step of a commit, and at random) and during
//!   compaction (before, between and after the pointer swaps) leave `changes.*` with the same
//!   records as an uninterrupted run, no duplicates, and `current.*` still equal to HQ;
//! - a site that was offline lands in an already-complete date partition: an extra file appears
//!   and the `_COMPLETE` marker's revision moves;
//! - `omrs-stream query` answers encounters per site per month and the latest weight per patient
//!   as HQ's SQL does;
//! - DuckDB and pyarrow (Python) read `current/` and `views/obs_flat` without our binary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::hq::*;
use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value as J;

const WEIGHT: &str = "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const CORE: &[&str] = &["person", "patient", "person_name", "person_address", "patient_identifier", "visit", "encounter", "encounter_provider", "obs", "location"];
const PROBE_DDL: &str = "CREATE TABLE omrs_probe (
    probe_id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    amount DECIMAL(12,4) NULL,
    measured_at DATETIME(6) NULL,
    flag TINYINT(1) NOT NULL DEFAULT 0,
    label VARCHAR(100) NULL,
    note TEXT NULL,
    uuid CHAR(38) NOT NULL UNIQUE)";

type Rows = Vec<serde_json::Map<String, J>>;

fn query_out(cfg: &Path, lake: &Path, format: &str, sql: &str) -> String {
    let out = bin().arg("--config").arg(cfg).args(["query", "--lake"]).arg(lake).args(["--format", format, sql]).output().unwrap();
    assert!(out.status.success(), "query {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn query(cfg: &Path, lake: &Path, sql: &str) -> Rows {
    serde_json::from_str(&query_out(cfg, lake, "json", sql)).unwrap()
}

fn text(v: Option<&J>) -> String {
    match v {
        None | Some(J::Null) => "NULL".into(),
        Some(J::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The lake's current tables as lines in the HQ dump's form (see `common::hq::dump`): every
/// HQ column but the table's own id, references by uuid, values normalised.
async fn lake_dump(cfg: &Path, lake: &Path, db: &str, tables: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut c = hq(db).await;
    let mut out = BTreeMap::new();
    for t in tables {
        let (cols, own, fks) = layout(&mut c, db, t).await;
        let rows = query(cfg, lake, &format!("SELECT * FROM current.{t}"));
        let mut lines: Vec<String> = rows
            .iter()
            .map(|r| {
                cols.iter()
                    .filter(|c| Some(*c) != own.as_ref())
                    .map(|col| {
                        let v = if fks.contains(col) { text(r.get(&format!("{col}_uuid"))) } else { text(r.get(col)) };
                        format!("{col}={}", norm(&v))
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        lines.sort();
        out.insert(t.to_string(), lines);
    }
    out
}

/// The manifest's committed offsets, summed over the partitions (entries and checkpoints):
/// it grows with every file set committed.
fn committed(lake: &Path) -> i64 {
    let mut per: BTreeMap<String, i64> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(lake.join("_manifest")) {
        for e in rd.flatten() {
            if let Ok(v) = serde_json::from_slice::<J>(&std::fs::read(e.path()).unwrap_or_default()) {
                for (p, o) in v["offsets"].as_object().into_iter().flatten() {
                    let at = per.entry(p.clone()).or_default();
                    *at = (*at).max(o.as_i64().unwrap_or(0));
                }
            }
        }
    }
    per.values().sum()
}

/// The data files the manifest entries name.
fn committed_files(lake: &Path) -> usize {
    let entries = std::fs::read_dir(lake.join("_manifest")).map(|rd| rd.flatten().collect::<Vec<_>>()).unwrap_or_default();
    entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<J>(&std::fs::read(e.path()).unwrap_or_default()).ok())
        .map(|v| v["files"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Per change table: (rows, distinct (partition, offset)s, sum of offsets).
fn change_counts(cfg: &Path, lake: &Path) -> BTreeMap<String, (i64, i64, i64)> {
    let tables: Vec<String> = std::fs::read_dir(lake.join("changes")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let sql = tables
        .iter()
        .map(|t| format!("SELECT '{t}' AS t, COUNT(*) AS n, COUNT(DISTINCT _kafka_partition * 4294967296 + _kafka_offset) AS d, SUM(_kafka_offset) AS s FROM changes.{t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    query(cfg, lake, &sql)
        .into_iter()
        .map(|r| (text(r.get("t")), (r["n"].as_i64().unwrap(), r["d"].as_i64().unwrap(), r["s"].as_i64().unwrap_or(0))))
        .collect()
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet")).collect()).unwrap_or_default();
    v.sort();
    v
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_is_exact_typed_and_equal_to_hq() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tlk")), database: unique("lks") };
    let hq_db = unique("openmrs_hq_l");
    let lake_a = p.dir.path().join("lake-a");
    let lake_b = p.dir.path().join("lake-b");
    let tweaks = |lake: &Path| -> Vec<(String, String)> {
        vec![
            ("${OMRS_LAKE:-/var/lib/omrs-stream/lake}".into(), path_str(lake)),
            ("roll_max_bytes = 134217728".into(), "roll_max_bytes = 2097152".into()),
            ("roll_interval_ms = 10000".into(), "roll_interval_ms = 300".into()),
            ("compact_interval_s = 60".into(), "compact_interval_s = 2".into()),
        ]
    };
    let ta = tweaks(&lake_a);
    let tb = tweaks(&lake_b);
    let as_refs = |t: &[(String, String)]| t.iter().map(|(a, b)| (a.clone(), b.clone())).collect::<Vec<_>>();
    let (ta, tb) = (as_refs(&ta), as_refs(&tb));
    // Lake B's sink is given an HQ database that does not exist: the lake's schema comes from
    // the stream (the agents' table shapes), never from HQ.
    let cfg_b = {
        let path = p.config("omrs_hq_absent", &tb.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>());
        let renamed = p.dir.path().join("b.toml");
        std::fs::rename(&path, &renamed).unwrap();
        renamed
    };
    let cfg_a = p.config(&hq_db, &ta.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>());
    p.run(&cfg_a, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&cfg_a).unwrap();

    // The sites, a custom module table at site-a (and HQ below), the workload.
    let args = workload(&p, 150, 11);
    omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { provision_only: true, ..args.clone() }).await.unwrap();
    let mut a = admin(3311, Some(&p.database)).await;
    a.query_drop(PROBE_DDL).await.unwrap();
    a.query_drop(
        "INSERT INTO omrs_probe (amount, measured_at, flag, label, note, uuid) VALUES
           (12345.6789, '2024-03-05 10:11:12.345678', 1, 'Zoë Ñúñez 李小龍', NULL, 'probe-0001-0000-0000-000000000001'),
           (-0.0001, '1999-12-31 23:59:59.000001', 0, 'plain', 'a note', 'probe-0002-0000-0000-000000000002')",
    )
    .await
    .unwrap();
    omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() }).await.unwrap();
    // A conflict (the same location edited at two sites) and deletes.
    let loc: String = a.query_first("SELECT uuid FROM location WHERE retired = 0 ORDER BY location_id LIMIT 1").await.unwrap().unwrap();
    a.exec_drop("UPDATE location SET description = 'edited at site-a', date_changed = '2031-01-02 00:00:00' WHERE uuid = ?", (&loc,)).await.unwrap();
    let mut b = admin(3312, Some(&p.database)).await;
    b.exec_drop("UPDATE location SET description = 'edited at site-b', date_changed = '2031-01-01 00:00:00' WHERE uuid = ?", (&loc,)).await.unwrap();
    for port in [3311, 3312] {
        let mut c = admin(port, Some(&p.database)).await;
        c.query_drop("DELETE FROM obs WHERE obs_id = (SELECT * FROM (SELECT MAX(obs_id) FROM obs WHERE obs_group_id IS NULL AND obs_id NOT IN (SELECT obs_group_id FROM obs WHERE obs_group_id IS NOT NULL)) x)").await.unwrap();
    }
    p.ingest(&cfg_a, &["site-a", "site-b", "site-c"], true);
    p.run(&cfg_a, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_a, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let mut h = hq(&hq_db).await;
    h.query_drop(PROBE_DDL).await.unwrap();
    p.run(&cfg_a, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);

    // Lake A: one uninterrupted run.
    p.run(&cfg_a, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    let reference = hq_dump(&hq_db).await;
    let hq_core: BTreeMap<String, Vec<String>> = CORE.iter().map(|t| (t.to_string(), reference[*t].clone())).collect();
    assert!(hq_core["obs"].len() > 1000, "{} obs", hq_core["obs"].len());
    assert_same(&hq_core, &lake_dump(&cfg_a, &lake_a, &hq_db, CORE).await, "lake A current vs HQ");
    let counts_a = change_counts(&cfg_a, &lake_a);
    for (t, (n, d, _)) in &counts_a {
        assert_eq!(n, d, "changes.{t}: {n} rows but {d} distinct offsets");
    }

    // Type fidelity: the probe's values, as written at the site.
    let csv = query_out(&cfg_a, &lake_a, "csv", "SELECT amount, measured_at, flag, label, note FROM current.omrs_probe ORDER BY uuid");
    assert_eq!(
        csv.trim(),
        "amount,measured_at,flag,label,note\n12345.6789,2024-03-05T10:11:12.345678,true,Zoë Ñúñez 李小龍,\n-0.0001,1999-12-31T23:59:59.000001,false,plain,a note",
        "probe values"
    );
    let null_note = query(&cfg_a, &lake_a, "SELECT note IS NULL AS n FROM current.omrs_probe WHERE uuid LIKE 'probe-0001%'");
    assert_eq!(null_note[0]["n"], J::Bool(true), "NULL stays NULL (not an empty string)");
    let tables = bin().arg("--config").arg(&cfg_a).args(["query", "--lake"]).arg(&lake_a).arg("--tables").output().unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout).to_string();
    let probe = tables.split("\ncurrent.omrs_probe\n").nth(1).expect("current.omrs_probe listed").split("\n\n").next().unwrap().to_string();
    for (col, ty) in [("amount", "Decimal128(12, 4)"), ("measured_at", "Timestamp(µs)"), ("flag", "Boolean"), ("label", "Utf8"), ("probe_id", "Int32")] {
        let line = probe.lines().find(|l| l.trim_start().starts_with(&format!("{col} "))).unwrap_or_else(|| panic!("{col} in {probe}"));
        assert!(line.contains(ty), "{col}: {line}");
    }

    // Lake B: the same records, with the sink killed at each step of a commit, at random
    // points, and during compaction.
    let log = p.dir.path().join("parquet-b.log");
    let run_b = |args: &[&str], failpoint: Option<&str>| {
        let mut c = bin();
        c.arg("--config").arg(&cfg_b).args(["sink", "parquet", "--metrics-port", "0", "--quiet"]).args(args).env("RUST_LOG", "warn");
        if let Some(f) = failpoint {
            c.env("OMRS_FAILPOINT", f);
        }
        c.stdout(Stdio::null()).stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap()).status().unwrap()
    };
    let end = committed(&lake_a);
    let mut kills = 0;
    for f in ["lake:after-data-tmp", "lake:after-manifest", "lake:after-first-rename"] {
        let before = committed(&lake_b);
        let st = run_b(&["--until-idle", "--no-compact"], Some(f));
        assert!(!st.success(), "the sink should have died at {f}");
        kills += 1;
        let after = committed(&lake_b);
        if f == "lake:after-data-tmp" {
            // Only file sets of table shapes (no data files) can have committed before it.
            assert!(after < end, "the crash came before the end: {after} of {end}");
            assert_eq!(committed_files(&lake_b), 0, "no data file committed before the manifest entry");
            assert!(std::fs::read_dir(lake_b.join("_tmp")).unwrap().count() > 0, "temp files left by the crash");
        } else {
            assert!(after > before, "{f}: the entry committed");
        }
    }
    for frac in [0.3, 0.6] {
        let mut child = bin()
            .arg("--config")
            .arg(&cfg_b)
            .args(["sink", "parquet", "--metrics-port", "0", "--quiet"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let target = (end as f64 * frac) as i64;
        wait_for(180, &format!("lake B past offset {target}"), || (committed(&lake_b) >= target).then_some(()));
        kill9(&mut child);
        kills += 1;
    }
    assert!(run_b(&["--until-idle", "--no-compact"], None).success(), "a clean drain");
    assert_eq!(committed(&lake_b), end, "everything committed before the compactions");
    for f in ["compact:before-swap", "compact:after-tables", "compact:between-swaps"] {
        assert!(!run_b(&["--compact"], Some(f)).success(), "killed at {f}");
        kills += 1;
        // Readers still get a consistent snapshot: current and views name one snapshot or the
        // views lag by one, never a half-written directory.
        let cur = std::fs::read_link(lake_b.join("current")).ok();
        if let Some(cur) = cur {
            assert!(lake_b.join(&cur).parent().unwrap().join("snapshot.json").exists(), "current points at a complete snapshot");
        }
    }
    assert!(run_b(&["--compact"], None).success(), "compaction after the kills:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(run_b(&["--until-idle"], None).success(), "a clean finish");
    assert!(kills >= 7, "{kills} kills");
    assert_eq!(std::fs::read_dir(lake_b.join("_tmp")).unwrap().count(), 0, "no temp files left");
    assert_eq!(change_counts(&cfg_b, &lake_b), counts_a, "changes.* after the kills equal the uninterrupted run");
    for lake in [&lake_a, &lake_b] {
        let schema: J = serde_json::from_slice(&std::fs::read(lake.join("_schema.json")).unwrap()).unwrap();
        assert_eq!(schema["source"], "stream", "{}", lake.display());
        let probe = &schema["tables"]["omrs_probe"];
        let amount = probe["columns"].as_array().unwrap().iter().find(|c| c["name"] == "amount").unwrap_or_else(|| panic!("omrs_probe.amount in {probe}"));
        assert_eq!(amount["mysql_type"], "decimal(12,4)", "the site's type of the module table's column");
        assert_eq!(schema["tables"]["patient"]["shared_parent"], "person", "patient is keyed by its person");
        assert!(schema["tables"].as_object().unwrap().len() >= 100, "every OpenMRS table the sites capture");
    }
    assert_same(&hq_core, &lake_dump(&cfg_b, &lake_b, &hq_db, CORE).await, "lake B current vs HQ");
    let views_b = std::fs::read_link(lake_b.join("views")).unwrap();
    let cur_b = std::fs::read_link(lake_b.join("current")).unwrap();
    assert_eq!(views_b.parent(), cur_b.parent(), "current and views name the same snapshot");

    // Bad SQL: DataFusion's message and the tables, exit 1.
    let bad = bin().arg("--config").arg(&cfg_a).args(["query", "--lake"]).arg(&lake_a).arg("SELECT * FROM current.nope").output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("nope") && err.contains("not found") && err.contains("current.obs") && err.contains("obs_flat"), "{err}");

    // encounters per site per month, and the latest weight per patient, against HQ.
    let lake_enc: BTreeSet<(String, String, i64)> = query(
        &cfg_a,
        &lake_a,
        "SELECT site, to_char(date_trunc('month', encounter_datetime), '%Y-%m') AS month, COUNT(*) AS n FROM encounters_flat GROUP BY 1, 2",
    )
    .into_iter()
    .map(|r| (text(r.get("site")), text(r.get("month")), r["n"].as_i64().unwrap()))
    .collect();
    let hq_enc: Vec<(String, String, i64)> = h
        .query(
            "SELECT v.site, DATE_FORMAT(e.encounter_datetime, '%Y-%m'), COUNT(*) FROM encounter e
             JOIN omrs_sync_row_version v ON v.tbl = 'encounter' AND v.row_key = e.uuid
             WHERE e.voided = 0 GROUP BY 1, 2",
        )
        .await
        .unwrap();
    assert!(lake_enc.len() > 3, "{lake_enc:?}");
    assert_eq!(lake_enc, hq_enc.into_iter().collect::<BTreeSet<_>>(), "encounters per site per month");
    let lake_w: HashMap<String, String> = query(
        &cfg_a,
        &lake_a,
        &format!(
            "SELECT patient_uuid, value_numeric FROM (SELECT patient_uuid, value_numeric,
               ROW_NUMBER() OVER (PARTITION BY patient_uuid ORDER BY obs_datetime DESC, obs_uuid DESC) AS rn
               FROM obs_flat WHERE concept_uuid = '{WEIGHT}') w WHERE rn = 1"
        ),
    )
    .into_iter()
    .map(|r| (text(r.get("patient_uuid")), norm(&text(r.get("value_numeric")))))
    .collect();
    let hq_w: Vec<(String, String)> = h
        .query(format!(
            "SELECT uuid, CAST(value_numeric AS CHAR) FROM (SELECT p.uuid, o.value_numeric,
               ROW_NUMBER() OVER (PARTITION BY p.uuid ORDER BY o.obs_datetime DESC, o.uuid DESC) AS rn
               FROM obs o JOIN person p ON p.person_id = o.person_id JOIN concept c ON c.concept_id = o.concept_id
               WHERE o.voided = 0 AND c.uuid = '{WEIGHT}') w WHERE rn = 1"
        ))
        .await
        .unwrap();
    let hq_w: HashMap<String, String> = hq_w.into_iter().map(|(u, v)| (u, norm(&v))).collect();
    assert!(hq_w.len() > 20, "{} patients with a weight", hq_w.len());
    assert_eq!(lake_w, hq_w, "latest weight per patient");

    // Without our binary: DuckDB and pyarrow read current/ and views/obs_flat.
    let n_obs = query(&cfg_a, &lake_a, "SELECT COUNT(*) AS n FROM current.obs")[0]["n"].as_i64().unwrap();
    let n_flat = query(&cfg_a, &lake_a, "SELECT COUNT(*) AS n FROM obs_flat")[0]["n"].as_i64().unwrap();
    let py = std::process::Command::new(python())
        .arg(root().join("tests/lake_check.py"))
        .arg(&lake_a)
        .arg(n_obs.to_string())
        .arg(n_flat.to_string())
        .arg(WEIGHT)
        .output()
        .unwrap();
    assert!(py.status.success(), "python check: {}{}", String::from_utf8_lossy(&py.stdout), String::from_utf8_lossy(&py.stderr));

    // BI access: `query --serve` over the PostgreSQL wire protocol, read with psql; the two
    // example queries give what `query` gives.
    let pg_port = 15433 + (std::process::id() % 1000) as u16;
    let mut server = bin()
        .arg("--config")
        .arg(&cfg_a)
        .args(["query", "--lake"])
        .arg(&lake_a)
        .args(["--serve", &format!("127.0.0.1:{pg_port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(60, "query --serve to accept connections", || std::net::TcpStream::connect(("127.0.0.1", pg_port)).ok().map(|_| ()));
    let psql = |sql: &str| -> Vec<String> {
        let out = std::process::Command::new("psql")
            .arg(format!("host=127.0.0.1 port={pg_port} user=analyst dbname=datafusion sslmode=disable"))
            .args(["-X", "-A", "-t", "-F", ",", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
        rows.sort();
        rows
    };
    let csv = |sql: &str| -> Vec<String> {
        let out = bin().arg("--config").arg(&cfg_a).args(["query", "--format", "csv", "--lake"]).arg(&lake_a).arg(sql).output().unwrap();
        assert!(out.status.success(), "query {sql}: {}", String::from_utf8_lossy(&out.stderr));
        let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().skip(1).filter(|l| !l.is_empty()).map(str::to_string).collect();
        rows.sort();
        rows
    };
    let per_site = "SELECT site, COUNT(*) AS encounters FROM encounters_flat GROUP BY site ORDER BY site";
    let over_pg = psql(per_site);
    assert_eq!(over_pg.len(), 3, "{over_pg:?}");
    assert_eq!(over_pg, csv(per_site), "encounters per site over psql");
    let latest = format!(
        "SELECT patient_uuid, CAST(value_numeric AS VARCHAR) AS kg FROM (SELECT patient_uuid, value_numeric,
           ROW_NUMBER() OVER (PARTITION BY patient_uuid ORDER BY obs_datetime DESC, obs_uuid DESC) AS rn
           FROM obs_flat WHERE concept_uuid = '{WEIGHT}') w WHERE rn = 1"
    );
    let over_pg = psql(&latest);
    assert_eq!(over_pg.len(), hq_w.len(), "latest weights over psql");
    assert_eq!(over_pg, csv(&latest), "latest weight per patient over psql");
    let schemas = psql("SELECT DISTINCT table_schema FROM information_schema.tables ORDER BY 1");
    assert!(schemas.contains(&"changes".to_string()) && schemas.contains(&"current".to_string()), "{schemas:?}");
    kill9(&mut server);

    // As a deployment serves it (docker-compose's `query` service): TLS only, one user with a
    // password from a file, SCRAM-SHA-256. The right password over TLS reads the same rows,
    // the server's certificate checked against the CA; a wrong password, another user, or a
    // client that does not ask for TLS is refused.
    let tls = PathBuf::from(std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into())).join("tls");
    let secret = p.dir.path().join("query-password");
    std::fs::write(&secret, "clinic data 42\n").unwrap();
    let tls_port = pg_port + 1000;
    let mut server = bin()
        .arg("--config")
        .arg(&cfg_a)
        .args(["query", "--lake"])
        .arg(&lake_a)
        .args(["--serve", &format!("127.0.0.1:{tls_port}"), "--user", "dashboards", "--password-file"])
        .arg(&secret)
        .arg("--tls-cert")
        .arg(tls.join("server.pem"))
        .arg("--tls-key")
        .arg(tls.join("server.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(60, "query --serve with TLS to accept connections", || std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok().map(|_| ()));
    let login = |user: &str, password: &str, ssl: &str, sql: &str| {
        std::process::Command::new("psql")
            .arg(format!("host=localhost port={tls_port} user={user} dbname=datafusion {ssl}"))
            .args(["-X", "-A", "-t", "-F", ",", "-c", sql])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    };
    let verify_full = format!("sslmode=verify-full sslrootcert={}", tls.join("ca.pem").display());
    let out = login("dashboards", "clinic data 42", &verify_full, per_site);
    assert!(out.status.success(), "psql over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    rows.sort();
    assert_eq!(rows, csv(per_site), "encounters per site over TLS with a password");
    for (user, password, ssl, why) in [
        ("dashboards", "clinic data 41", verify_full.as_str(), "authentication failed"),
        ("analyst", "clinic data 42", verify_full.as_str(), "password authentication failed for user \"analyst\""),
        ("dashboards", "clinic data 42", "sslmode=disable", "accepts TLS connections only"),
    ] {
        let out = login(user, password, ssl, per_site);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.to_lowercase().contains(&why.to_lowercase()), "{user}/{ssl}: expected `{why}`: {err}");
        assert!(out.stdout.is_empty(), "{user}/{ssl} read rows: {}", String::from_utf8_lossy(&out.stdout));
    }
    kill9(&mut server);

    // verify: everything reconciles; then a row removed behind HQ's back is reported.
    let manifest_path = p.dir.path().join("manifest.json");
    let v = bin().arg("--config").arg(&cfg_a).args(["verify", "--json", "--lake"]).arg(&lake_a).arg("--manifest").arg(&manifest_path).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify: {}\n{}", String::from_utf8_lossy(&v.stderr), serde_json::to_string_pretty(&report).unwrap_or_default());
    assert!(report["tables"].as_array().is_some_and(|t| t.len() > 50), "uuid tables compared");
    assert!(report["lake"].as_array().is_some_and(|t| t.len() > 20), "lake tables compared");
    assert_eq!(report["manifest"]["wrong"], 0);
    // Values were compared, not only keys: every obs, the conflict's location, every person.
    let compared = |what: &str, t: &str| report[what].as_array().and_then(|a| a.iter().find(|v| v["table"] == t)).map(|v| v["compared"].as_u64().unwrap_or(0)).unwrap_or(0);
    let hq_obs = count(&mut h, "SELECT COUNT(*) FROM obs").await as u64;
    assert_eq!(compared("values", "obs"), hq_obs, "every HQ obs compared with its site row");
    assert_eq!(compared("lake_values", "obs"), hq_obs, "every lake obs compared with HQ's");
    assert!(compared("values", "person") > 150 && compared("values", "location") > 0, "{}", report["values"]);
    assert_eq!(report["lake_history_duplicates"], J::Array(vec![]));
    let gone: String = h.query_first("SELECT uuid FROM obs WHERE obs_group_id IS NULL AND obs_id NOT IN (SELECT obs_group_id FROM obs WHERE obs_group_id IS NOT NULL)
           AND obs_id NOT IN (SELECT previous_version FROM obs WHERE previous_version IS NOT NULL) ORDER BY obs_id DESC LIMIT 1").await.unwrap().unwrap();
    h.exec_drop("DELETE FROM obs WHERE uuid = ?", (&gone,)).await.unwrap();
    let v = bin().arg("--config").arg(&cfg_a).args(["verify", "--lake"]).arg(&lake_a).output().unwrap();
    let text = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(1), "{text}");
    assert!(text.contains("verify: DISCREPANCIES") && text.contains(&gone) && text.contains("obs: 1 site rows missing at HQ"), "{text}");

    // A site that was offline for days lands in an already-complete date partition.
    let mut c3 = admin(3313, Some(&p.database)).await;
    c3.query_drop(PROBE_DDL).await.unwrap();
    // (A session's timestamp stays where SET put it: reset it before each use.)
    let three_days_ago = "SET timestamp = DEFAULT; SET timestamp = UNIX_TIMESTAMP() - 3 * 86400";
    c3.query_drop(three_days_ago).await.unwrap();
    c3.query_drop("INSERT INTO omrs_probe (amount, label, uuid) VALUES (1.5, 'before the outage', 'probe-0003-0000-0000-000000000003')").await.unwrap();
    p.ingest(&cfg_a, &["site-c"], false);
    p.run(&cfg_a, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_a, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    let date = chrono::Utc::now().date_naive() - chrono::Duration::days(3);
    let part = lake_a.join("changes/omrs_probe/site=site-c").join(format!("date={date}"));
    let marker = |part: &Path| -> J { serde_json::from_slice(&std::fs::read(part.join("_COMPLETE")).unwrap_or_default()).unwrap_or(J::Null) };
    assert_eq!(parquet_files(&part).len(), 1, "one file in {}", part.display());
    let m1 = marker(&part);
    assert_eq!(m1["revision"], 1, "complete: {m1}");
    // The clinic goes offline: its agent is not running while it writes more rows dated that
    // day; then it comes back.
    c3.query_drop(three_days_ago).await.unwrap();
    c3.query_drop("INSERT INTO omrs_probe (amount, label, uuid) VALUES (2.5, 'written offline', 'probe-0004-0000-0000-000000000004')").await.unwrap();
    p.ingest(&cfg_a, &["site-c"], false);
    p.run(&cfg_a, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_a, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);
    assert_eq!(parquet_files(&part).len(), 2, "an extra file for the late data");
    let m2 = marker(&part);
    assert_eq!(m2["revision"], 2, "the marker moved: {m2}");
    assert_eq!(m2["late_files"], 1, "{m2}");
    assert!(m2["watermark_ms"].as_i64() >= m1["watermark_ms"].as_i64(), "{m1} → {m2}");
    let late = query(&cfg_a, &lake_a, &format!("SELECT label FROM changes.omrs_probe WHERE site = 'site-c' AND date = '{date}' ORDER BY label"));
    assert_eq!(late.len(), 2, "{late:?}");
    let parts = query(&cfg_a, &lake_a, &format!("SELECT final, revision, files FROM lake_partitions WHERE table_name = 'omrs_probe' AND site = 'site-c' AND date = '{date}'"));
    assert_eq!(parts[0]["final"], J::Bool(true));
    assert_eq!(parts[0]["revision"], 2);

    value_faults_are_reported(&cfg_a, &lake_a, &mut h).await;

    // Clean up.
    let mut admin_hq = admin(HQ_PORT, None).await;
    admin_hq.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
    for port in [3311, 3312, 3313] {
        let mut c = admin(port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}

/// `verify` reports, each by table, key and column: a corrupted HQ value, an obs moved to
/// another person at HQ, a lake value that differs from HQ, and a repeated lake history row.
async fn value_faults_are_reported(cfg: &Path, lake: &Path, h: &mut mysql_async::Conn) {
    let verify = || -> J {
        let v = bin().arg("--config").arg(cfg).args(["verify", "--json", "--lake"]).arg(lake).output().unwrap();
        assert_eq!(v.status.code(), Some(1), "{}", String::from_utf8_lossy(&v.stderr));
        serde_json::from_slice(&v.stdout).unwrap()
    };
    let diffs = |r: &J, what: &str, table: &str| -> Vec<(String, String)> {
        r[what]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["table"] == table))
            .map(|v| v["examples"].as_array().unwrap().iter().map(|e| (text(e.get("key")), text(e.get("column")))).collect())
            .unwrap_or_default()
    };
    // Nothing differs by value before the faults.
    let before = verify();
    for what in ["values", "lake_values"] {
        assert!(before[what].as_array().unwrap().iter().all(|t| t["differing"] == 0), "{what}: {}", before[what]);
    }
    // 1. An HQ value changed behind the sink's back: HQ differs from the site and from the lake.
    let (bumped, moved): (String, String) = {
        let v: Vec<String> = h.query("SELECT uuid FROM obs WHERE value_numeric IS NOT NULL AND voided = 0 ORDER BY uuid LIMIT 2").await.unwrap();
        (v[0].clone(), v[1].clone())
    };
    h.exec_drop("UPDATE obs SET value_numeric = value_numeric + 1 WHERE uuid = ?", (&bumped,)).await.unwrap();
    // 2. An obs moved to another person at HQ.
    h.exec_drop("UPDATE obs SET person_id = (SELECT MIN(person_id) FROM person WHERE person_id <> obs.person_id AND person_id IN (SELECT patient_id FROM patient)) WHERE uuid = ?", (&moved,))
        .await
        .unwrap();
    let r = verify();
    let at_hq = diffs(&r, "values", "obs");
    assert!(at_hq.contains(&(bumped.clone(), "value_numeric".into())) && at_hq.contains(&(moved.clone(), "person_id".into())), "{at_hq:?}");
    let in_lake = diffs(&r, "lake_values", "obs");
    assert!(in_lake.contains(&(bumped.clone(), "value_numeric".into())) && in_lake.contains(&(moved.clone(), "person_id".into())), "{in_lake:?}");
    let text_report = String::from_utf8_lossy(&bin().arg("--config").arg(cfg).args(["verify", "--lake"]).arg(lake).output().unwrap().stdout).into_owned();
    assert!(text_report.contains(&format!("{bumped} value_numeric")) && text_report.contains("obs: 2 of "), "{text_report}");
    // 3. A lake value that differs from HQ: one location's description rewritten in current/.
    let dir = std::fs::canonicalize(lake.join("current/location")).unwrap();
    let file = parquet_files(&dir).into_iter().next().expect("a current/location file");
    let loc = rewrite_first_description(&file, "changed in the lake");
    // 4. A change-history file written twice.
    let part = std::fs::read_dir(lake.join("changes/location")).unwrap().flatten().next().unwrap().path();
    let part = std::fs::read_dir(&part).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
    let src = parquet_files(&part).into_iter().next().unwrap();
    std::fs::copy(&src, part.join("zz-repeated.parquet")).unwrap();
    let r = verify();
    let in_lake = diffs(&r, "lake_values", "location");
    assert!(in_lake.contains(&(loc.clone(), "description".into())), "{in_lake:?}");
    assert!(diffs(&r, "values", "location").iter().all(|(k, _)| *k != loc), "HQ still equals the sites");
    let dups = r["lake_history_duplicates"].as_array().unwrap();
    assert!(dups.iter().any(|d| d["table"] == "location" && d["by"] == "site+position" && d["rows"].as_i64() > Some(0)), "{dups:?}");
    assert!(dups.iter().any(|d| d["table"] == "location" && d["by"] == "kafka_offset"), "{dups:?}");
    std::fs::remove_file(part.join("zz-repeated.parquet")).unwrap();
}

/// Rewrites the `description` of the first row of a Parquet file in place; returns its `_row_key`.
fn rewrite_first_description(file: &Path, to: &str) -> String {
    use arrow::array::{Array, ArrayRef, StringArray};
    use std::sync::Arc;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap()).unwrap().build().unwrap();
    let batches: Vec<arrow::record_batch::RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let di = schema.index_of("description").unwrap();
    let ki = schema.index_of("_row_key").unwrap();
    let key = batches[0].column(ki).as_any().downcast_ref::<StringArray>().unwrap().value(0).to_string();
    let mut out = Vec::new();
    for (n, b) in batches.iter().enumerate() {
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        if n == 0 {
            let d = b.column(di).as_any().downcast_ref::<StringArray>().unwrap();
            let v: StringArray = (0..d.len()).map(|i| if i == 0 { Some(to) } else if d.is_null(i) { None } else { Some(d.value(i)) }).collect();
            cols[di] = Arc::new(v);
        }
        out.push(arrow::record_batch::RecordBatch::try_new(schema.clone(), cols).unwrap());
    }
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(file).unwrap(), schema.clone(), None).unwrap();
    for b in &out {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    key
}
