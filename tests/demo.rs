//! `omrs-stream demo` end to end on the real services (3 sites, 20 % duplicates, one offline
//! window), then `omrs-stream verify` on what it left: exit 0, and exit 1 naming each of a row
//! deleted at HQ, a duplicate unvoided patient, an orphaned obs and a row missing from the lake,
//! each undone before the next.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value as J;

fn verify(config: &Path, lake: &Path) -> (i32, J) {
    let out = bin().arg("--config").arg(config).args(["verify", "--json", "--lake"]).arg(lake).output().unwrap();
    let report: J = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("verify --json: {e}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}


#[tokio::test(flavor = "multi_thread")]
async fn demo_verifies_and_verify_catches_tampering() {
    let tag = unique("demo");
    let state = tempfile::tempdir().unwrap();
    let site_db = format!("openmrs_{tag}");
    let hq_db = format!("openmrs_hq_{tag}");
    let summary_path = state.path().join("summary.json");
    let out = bin()
        .args(["demo", "--patients", "60", "--duration", "30", "--rate", "200", "--offline", "site-b:5:15", "--metrics-port", "19464"])
        .args(["--site-database", &site_db, "--hq-database", &hq_db, "--quiet", "--summary-json"])
        .arg(&summary_path)
        .arg("--state-dir")
        .arg(state.path())
        .env("OMRS_DEMO_DUMP", dump())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo exited {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let s: J = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    assert_eq!(s["ok"], J::Bool(true));
    assert_eq!(s["drained"], J::Bool(true));
    assert!(stdout.contains("VERIFIED") && stdout.contains("verify: OK"), "{stdout}");

    // What the must-show asks: late events, merges, no dead letters, nothing pending.
    let sites = s["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 3);
    let site_b = sites.iter().find(|x| x["name"] == "site-b").unwrap();
    assert!(site_b["late_events"].as_u64().unwrap() > 0, "site-b came back with late events: {site_b}");
    assert!(site_b["max_watermark_delay_s"].as_f64().unwrap() >= 14.0, "site-b's watermark stood still while it was away: {site_b}");
    for x in sites {
        assert!(x["rows_written"].as_u64().unwrap() > 500, "{x}");
        assert!(x["events_captured"].as_u64().unwrap() > x["rows_written"].as_u64().unwrap(), "snapshot plus changes: {x}");
        assert_eq!(x["final_lag_messages"], J::from(0), "{x}");
    }
    assert!(s["identity_merges"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["identity_merges"].as_u64().unwrap() as i64, s["hq_merges_logged"].as_i64().unwrap());
    assert_eq!(s["dead_letters"], J::from(0));
    assert_eq!(s["pending"], J::from(0));
    let p50 = s["e2e_latency_p50_s"].as_f64().unwrap();
    let p99 = s["e2e_latency_p99_s"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "latency p50 {p50} p99 {p99}");
    assert!(s["e2e_latency_observations"].as_u64().unwrap() > 0);
    assert_eq!(s["queries"].as_array().unwrap().len(), 2);
    assert!(s["queries"][0]["output"].as_str().unwrap().contains("site-a"), "{}", s["queries"][0]);
    assert!(s["queries"][1]["output"].as_str().unwrap().contains("kg"), "{}", s["queries"][1]);
    assert!(s["hq_url"].as_str().unwrap().ends_with(&format!("/{hq_db}")));
    assert_eq!(s["metrics_endpoints"]["transform"], J::from("http://127.0.0.1:19464/metrics"));
    assert_eq!(s["metrics_endpoints"]["ingest-site-c"], J::from("http://127.0.0.1:19469/metrics"));
    let manifest: J = serde_json::from_slice(&std::fs::read(s["manifest"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(s["hq_active_patients"].as_u64(), manifest["expected_hq"]["active_patients"].as_u64());
    assert_eq!(manifest["offline"].as_array().unwrap().len(), 1);
    let logs = PathBuf::from(s["logs"].as_str().unwrap());
    for name in ["ingest-site-a", "ingest-site-b", "transform", "sink-hq-mysql", "sink-parquet"] {
        assert!(logs.join(format!("{name}.log")).is_file(), "log of {name}");
    }

    // verify on the demo's result.
    let config = PathBuf::from(s["config"].as_str().unwrap());
    let lake = PathBuf::from(s["lake"].as_str().unwrap());
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 0, "{r}");
    let mut hq = admin(3310, Some(&hq_db)).await;

    // 1. A row deleted at HQ by hand.
    let (obs_id, obs_uuid): (i64, String) = hq
        .query_first("SELECT obs_id, uuid FROM obs o WHERE NOT EXISTS (SELECT 1 FROM obs c WHERE c.obs_group_id = o.obs_id OR c.previous_version = o.obs_id) ORDER BY obs_id LIMIT 1")
        .await
        .unwrap()
        .unwrap();
    hq.query_drop(format!("CREATE TEMPORARY TABLE gone AS SELECT * FROM obs WHERE obs_id = {obs_id}")).await.unwrap();
    hq.query_drop(format!("DELETE FROM obs WHERE obs_id = {obs_id}")).await.unwrap();
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 1, "a deleted HQ row must fail verify");
    let obs = r["tables"].as_array().unwrap().iter().find(|t| t["table"] == "obs").unwrap();
    assert!(obs["sample_missing"].as_array().unwrap().iter().any(|u| u.as_str().is_some_and(|u| u.ends_with(&obs_uuid))), "{obs}");
    hq.query_drop("INSERT INTO obs SELECT * FROM gone").await.unwrap();
    assert_eq!(verify(&config, &lake).0, 0, "restored");

    // 2. A duplicate unvoided patient: a new person with the National ID of a live patient.
    let nid = omrs_simulate::NATIONAL_ID_TYPE_UUID;
    let (identifier, type_id, location): (String, i64, Option<i64>) = hq
        .exec_first(
            "SELECT pi.identifier, pi.identifier_type, pi.location_id FROM patient_identifier pi JOIN patient_identifier_type t ON t.patient_identifier_type_id = pi.identifier_type
             JOIN patient p ON p.patient_id = pi.patient_id WHERE t.uuid = ? AND pi.voided = 0 AND p.voided = 0 LIMIT 1",
            (nid,),
        )
        .await
        .unwrap()
        .unwrap();
    hq.query_drop("INSERT INTO person (gender, birthdate, creator, date_created, voided, uuid) VALUES ('F', '1990-01-01', 1, NOW(), 0, UUID())").await.unwrap();
    let person_id: i64 = hq.query_first("SELECT LAST_INSERT_ID()").await.unwrap().unwrap();
    let dup_uuid: String = hq.query_first(format!("SELECT uuid FROM person WHERE person_id = {person_id}")).await.unwrap().unwrap();
    hq.query_drop(format!("INSERT INTO patient (patient_id, creator, date_created, voided) VALUES ({person_id}, 1, NOW(), 0)")).await.unwrap();
    hq.exec_drop(
        "INSERT INTO patient_identifier (patient_id, identifier, identifier_type, preferred, location_id, creator, date_created, voided, uuid) VALUES (?, ?, ?, 1, ?, 1, NOW(), 0, UUID())",
        (person_id, &identifier, type_id, location),
    )
    .await
    .unwrap();
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 1, "a duplicate patient must fail verify");
    let dups = r["identity_duplicates"].as_array().unwrap();
    assert!(dups.iter().any(|d| d["patients"].as_array().unwrap().iter().any(|p| p == &J::from(dup_uuid.clone()))), "{dups:?}");
    hq.query_drop(format!("DELETE FROM patient_identifier WHERE patient_id = {person_id}")).await.unwrap();
    hq.query_drop(format!("DELETE FROM patient WHERE patient_id = {person_id}")).await.unwrap();
    hq.query_drop(format!("DELETE FROM person WHERE person_id = {person_id}")).await.unwrap();
    assert_eq!(verify(&config, &lake).0, 0, "restored");

    // 3. An orphaned obs: its encounter is gone (foreign key checks off, as a careless script would).
    let (obs_id, encounter_id): (i64, i64) = hq.query_first("SELECT obs_id, encounter_id FROM obs WHERE encounter_id IS NOT NULL ORDER BY obs_id LIMIT 1").await.unwrap().unwrap();
    hq.query_drop(format!("SET FOREIGN_KEY_CHECKS = 0; UPDATE obs SET encounter_id = 987654321 WHERE obs_id = {obs_id}; SET FOREIGN_KEY_CHECKS = 1")).await.unwrap();
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 1, "an orphaned obs must fail verify");
    let orphans = r["orphans"].as_array().unwrap();
    assert!(orphans.iter().any(|o| o["table"] == "obs" && o["column"] == "encounter_id" && o["rows"] == 1), "{orphans:?}");
    hq.query_drop(format!("UPDATE obs SET encounter_id = {encounter_id} WHERE obs_id = {obs_id}")).await.unwrap();
    assert_eq!(verify(&config, &lake).0, 0, "restored");

    // 4. A row missing from the lake: one person_name row taken out of current/person_name.
    let name_uuid: String = hq.query_first("SELECT uuid FROM person_name ORDER BY person_name_id LIMIT 1").await.unwrap().unwrap();
    let dir = std::fs::canonicalize(lake.join("current/person_name")).unwrap();
    let backup = state.path().join("person_name-backup");
    std::fs::create_dir_all(&backup).unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, backup.join(f.file_name().unwrap())).unwrap();
    }
    let py = std::process::Command::new(python())
        .arg("-c")
        .arg(
            "import sys, os, glob, pyarrow.parquet as pq, pyarrow.compute as pc\n\
             d, u = sys.argv[1], sys.argv[2]\n\
             hit = 0\n\
             for f in glob.glob(os.path.join(d, '*.parquet')):\n\
             \x20   t = pq.read_table(f)\n\
             \x20   keep = pc.invert(pc.equal(t['uuid'], u))\n\
             \x20   if pc.sum(pc.cast(pc.invert(keep), 'int64')).as_py():\n\
             \x20       pq.write_table(t.filter(keep), f + '.tmp'); os.replace(f + '.tmp', f); hit += 1\n\
             sys.exit(0 if hit == 1 else 3)\n",
        )
        .arg(&dir)
        .arg(&name_uuid)
        .output()
        .unwrap();
    assert!(py.status.success(), "taking the row out: {}", String::from_utf8_lossy(&py.stderr));
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 1, "a row missing from the lake must fail verify");
    let pn = r["lake"].as_array().unwrap().iter().find(|t| t["table"] == "person_name").unwrap();
    assert_eq!(pn["missing"], J::from(1), "{pn}");
    assert!(pn["sample"].as_array().unwrap().iter().any(|u| u.as_str().is_some_and(|u| u.contains(&name_uuid))), "{pn}");
    for f in std::fs::read_dir(&backup).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(verify(&config, &lake).0, 0, "restored");

    // Tidy the databases of this run.
    hq.query_drop(format!("DROP DATABASE `{hq_db}`")).await.unwrap();
    for port in [3311, 3312, 3313] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{site_db}`")).await.unwrap();
    }
}

/// Ctrl-C (SIGINT) while the stages run: the demo stops every child and exits 130.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_every_stage() {
    let tag = unique("demoint");
    let state = tempfile::tempdir().unwrap();
    let site_db = format!("openmrs_{tag}");
    let hq_db = format!("openmrs_hq_{tag}");
    let mut demo = bin()
        .args(["demo", "--patients", "30", "--duration", "60", "--metrics-port", "19964", "--quiet"])
        .args(["--site-database", &site_db, "--hq-database", &hq_db])
        .arg("--state-dir")
        .arg(state.path())
        .env("OMRS_DEMO_DUMP", dump())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Running once the transform answers on its metrics port.
    wait_for(180, "the demo's transform to serve /metrics", || std::net::TcpStream::connect(("127.0.0.1", 19964)).ok().map(|_| ()));
    // The stages' command lines name the run's config, under the state directory.
    let children = || {
        let out = std::process::Command::new("pgrep").args(["-f", &state.path().display().to_string()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert!(children() > 3, "the stages run as child processes");
    let status = std::process::Command::new("kill").args(["-INT", &demo.id().to_string()]).status().unwrap();
    assert!(status.success());
    let code = wait_for(30, "the demo to exit after SIGINT", || demo.try_wait().unwrap()).code();
    let mut err = String::new();
    std::io::Read::read_to_string(demo.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    wait_for(10, "every stage to be gone", || (children() == 0).then_some(()));
    for port in [3311, 3312, 3313] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{site_db}`")).await.unwrap();
    }
    admin(3310, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}
