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
    // Every merge the transform decided is logged at HQ once per merged-away record; a
    // survivor change (a registration date fixed after a merge) is one more merge decision
    // that moves the log to the new loser, so there can be more decisions than logs.
    assert!(s["identity_merges"].as_u64().unwrap() as i64 >= s["hq_merges_logged"].as_i64().unwrap(), "{s}");
    assert_eq!(s["dead_letters"], J::from(0));
    assert_eq!(s["pending"], J::from(0));
    let p50 = s["e2e_latency_p50_s"].as_f64().unwrap();
    let p99 = s["e2e_latency_p99_s"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "latency p50 {p50} p99 {p99}");
    assert!(s["e2e_latency_observations"].as_u64().unwrap() > 0);
    // The latency probe wrote at a clinic without an offline window, about every 100 ms of
    // the 30 s workload, and saw each change at HQ.
    assert_eq!(s["probe_site"], J::from("site-a"), "{s}");
    let probe = &s["probe_hq"];
    assert!(probe["samples"].as_u64().is_some_and(|n| (100..=400).contains(&n)), "{probe}");
    let (pp50, pp99) = (probe["p50_s"].as_f64().unwrap(), probe["p99_s"].as_f64().unwrap());
    assert!(pp50 > 0.0 && pp99 >= pp50 && pp99 < 30.0, "{probe}");
    assert!(stdout.contains("probe to HQ"), "{stdout}");
    assert_eq!(s["queries"].as_array().unwrap().len(), 2);
    assert!(s["queries"][0]["output"].as_str().unwrap().contains("site-a"), "{}", s["queries"][0]);
    assert!(s["queries"][1]["output"].as_str().unwrap().contains("kg"), "{}", s["queries"][1]);
    assert!(s["hq_url"].as_str().unwrap().ends_with(&format!("/{hq_db}")));
    assert_eq!(s["metrics_endpoints"]["transform"], J::from("http://127.0.0.1:19464/metrics"));
    assert_eq!(s["metrics_endpoints"]["ingest-site-c"], J::from("http://127.0.0.1:19469/metrics"));
    let manifest: J = serde_json::from_slice(&std::fs::read(s["manifest"].as_str().unwrap()).unwrap()).unwrap();
    // HQ's merges (omrs_sync_merge: one per merged-away record, site merges included), by the
    // simulator's own count: every record of a human but its survivor.
    let merged_away: u64 = manifest["humans"].as_array().unwrap().iter().map(|h| h["records"].as_array().map_or(0, |r| r.len() as u64).saturating_sub(1)).sum();
    assert_eq!(s["hq_merges_logged"].as_u64(), Some(merged_away), "records merged away at HQ, by the simulator's own count");
    assert_eq!(s["hq_active_patients"].as_u64(), manifest["expected_hq"]["active_patients"].as_u64());
    assert_eq!(manifest["offline"].as_array().unwrap().len(), 1);
    // The review queue (issue #23): every merge HQ made is there; the summary says how many
    // wait for a person and how to list them, and that command works as printed.
    let merge_reviews = s["reviews_total"].as_i64().unwrap() - s["reviews_open"].as_i64().unwrap();
    assert!(merge_reviews >= s["hq_merges_logged"].as_i64().unwrap(), "{s}");
    let line = stdout.lines().find(|l| l.contains("identity reviews")).unwrap_or_else(|| panic!("no review line:\n{stdout}"));
    assert!(line.contains(&format!("{} open of {}", s["reviews_open"], s["reviews_total"])) && line.contains("identity list --status open"), "{line}");
    let listed = bin().args(["--config", s["config"].as_str().unwrap(), "identity", "list", "--json"]).output().unwrap();
    assert!(listed.status.success(), "identity list on the demo: {}", String::from_utf8_lossy(&listed.stderr));
    let listed: J = serde_json::from_slice(&listed.stdout).unwrap();
    let total: i64 = listed["counts"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(total, s["reviews_total"].as_i64().unwrap(), "{listed}");
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

    aggregates_match_sql_over_hq_and_the_lake(&mut hq, &config, &lake, &s).await;

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

    // 5. A data manager undoes a merge on the demo, as a new user would (issue #23 §4): `show`
    // explains it, `split` undoes it, the stages apply it, HQ and the lake agree after.
    let (loser, winner): (String, String) = hq
        .query_first(
            "SELECT m.loser_uuid, m.winner_uuid FROM omrs_sync_merge m WHERE m.reason = 'identifier' AND m.applied = 1
               AND NOT EXISTS (SELECT 1 FROM omrs_sync_merge s WHERE s.winner_uuid = m.winner_uuid AND s.reason = 'site_merge') ORDER BY m.loser_uuid LIMIT 1",
        )
        .await
        .unwrap()
        .expect("a merge made on an identifier");
    let cli = |args: &[&str]| {
        let out = bin().arg("--config").arg(&config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shown = cli(&["identity", "show", &loser]);
    assert!(shown.contains(&loser) && shown.contains(&winner) && shown.contains("same identifier"), "identity show:\n{shown}");

    // Every `omrs-stream` example of the README, as a user runs it after the demo: in bash,
    // `omrs-stream` on PATH, OMRS_CONFIG set to the run's config as the summary prints it, the
    // placeholders filled in. `confirm` and `split` get `--wait 0` (the stages run below).
    let printed = format!("export OMRS_CONFIG={}", config.display());
    assert!(stdout.contains(&printed), "the summary prints `{printed}`:\n{stdout}");
    let listed: J = serde_json::from_str(&cli(&["identity", "list", "--json", "--status", "merged", "--limit", "500"])).unwrap();
    let review = listed["reviews"]
        .as_array()
        .and_then(|r| r.iter().find(|r| !r.to_string().contains(&loser) && !r.to_string().contains(&winner)))
        .and_then(|r| r["review_id"].as_str())
        .unwrap_or_else(|| panic!("a merge review apart from {loser}'s: {listed}"))
        .to_string();
    let examples = readme_examples();
    assert!(examples.len() >= 11, "the README's examples: {examples:?}");
    let mut said = String::new();
    for example in &examples {
        let line = example.replace("<review id or person uuid>", &loser).replace("<review id>", &review).replace("<record uuid>", &loser);
        if line.contains("--serve") {
            readme_serve(&line, &config, &lake);
            continue;
        }
        let decides = line.contains("identity confirm") || line.contains("identity split");
        let line = if decides { format!("{line} --by dm-demo --wait 0") } else { line };
        let out = run_readme(&line, &config);
        let (text, err) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        // `status` exits 1 when a clinic is offline: the demo's agents have stopped, and a
        // clinic not heard from for idle_timeout_s is offline by then.
        let offline_ok = line.starts_with("omrs-stream status") && out.status.code() == Some(1) && text.contains("offline");
        assert!(out.status.success() || offline_ok, "README example `{line}`: exit {:?}\n{text}\n{err}", out.status.code());
        let expect: &[&str] = match () {
            _ if line.contains("--tables") => &["changes.obs", "obs_flat", "aggregates.hourly_encounters"],
            _ if line.contains("FROM changes.obs GROUP BY site") => &["site-a", "site-b", "site-c"],
            _ if line.contains("--format csv") => &["concept_name"],
            _ if line.contains("aggregates.hourly_encounters") => &["window_start", "is_final"],
            _ if line.starts_with("omrs-stream verify") => &["verify: OK"],
            _ if line.starts_with("omrs-stream status") => &["site-a", "site-b", "site-c"],
            _ if line.contains("identity list") => &["Identity reviews at HQ:", " open"],
            _ if line.contains("identity show") => &[loser.as_str(), winner.as_str()],
            _ if line.contains("identity confirm") => &[review.as_str()],
            _ if line.contains("identity split") => &["sent"],
            _ => panic!("a README example this test does not know: {line}"),
        };
        for want in expect {
            assert!(text.contains(want), "README example `{line}` printed no `{want}`:\n{text}");
        }
        if line.contains("identity split") {
            said = text;
        }
    }
    assert!(said.contains("sent"), "the README's split example ran: {said}");
    for stage in [&["transform", "--until-idle", "--metrics-port", "0"][..], &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"], &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]] {
        cli(stage);
    }
    let alive: Option<i64> = hq.exec_first("SELECT voided FROM person WHERE uuid = ?", (loser.as_str(),)).await.unwrap();
    assert_eq!(alive, Some(0), "{loser} is a patient of its own again");
    let alone: J = serde_json::from_str(&cli(&["identity", "show", &loser, "--json"])).unwrap();
    assert_eq!(alone["members"].as_array().map(Vec::len), Some(1), "{alone}");
    assert!(cli(&["identity", "list", "--status", "split"]).contains("split"));
    let confirmed: Option<String> = hq.exec_first("SELECT status FROM omrs_sync_identity_review WHERE review_id = ?", (review.as_str(),)).await.unwrap();
    assert_eq!(confirmed.as_deref(), Some("confirmed"), "the README's confirm example, applied");
    let (code, r) = verify(&config, &lake);
    assert_eq!(code, 0, "after the split: {r}");

    // Tidy the databases of this run.
    hq.query_drop(format!("DROP DATABASE `{hq_db}`")).await.unwrap();
    for port in [3311, 3312, 3313] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{site_db}`")).await.unwrap();
    }
}

/// The README's `omrs-stream …` examples: every such line of its ```sh blocks, comment removed.
fn readme_examples() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if in_sh && line.starts_with("omrs-stream ") {
            let command = line.find("  # ").map_or(line, |i| &line[..i]);
            out.push(command.trim_end().to_string());
        }
    }
    out
}

/// A README line as a user runs it: bash, `omrs-stream` on PATH, OMRS_CONFIG = `config`.
fn readme_command(line: &str, config: &Path) -> std::process::Command {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_omrs-stream")).parent().unwrap().to_path_buf();
    let mut c = std::process::Command::new("bash");
    c.args(["-c", line])
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("OMRS_CONFIG", config)
        .env("RUST_LOG", "warn")
        .current_dir(root());
    c
}

fn run_readme(line: &str, config: &Path) -> std::process::Output {
    readme_command(line, config).output().unwrap()
}

/// The README's `query --serve` line: it serves the demo's lake, and psql reads what `query`
/// reads.
fn readme_serve(line: &str, config: &Path, lake: &Path) {
    let addr = line.split_whitespace().skip_while(|w| *w != "--serve").nth(1).unwrap_or_else(|| panic!("{line}"));
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut server = readme_command(&format!("exec {line}"), config).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for(60, &format!("`{line}` to accept connections"), || std::net::TcpStream::connect((host, port.parse::<u16>().unwrap())).ok().map(|_| ()));
    let sql = "SELECT site, COUNT(*) AS n FROM changes.obs GROUP BY site ORDER BY site";
    let psql = std::process::Command::new("psql")
        .arg(format!("host={host} port={port} user=analyst dbname=datafusion sslmode=disable"))
        .args(["-X", "-A", "-t", "-F", ",", "-c", sql])
        .output()
        .unwrap();
    kill9(&mut server);
    assert!(psql.status.success(), "psql against `{line}`: {}", String::from_utf8_lossy(&psql.stderr));
    let direct = bin().arg("--config").arg(config).args(["query", "--format", "csv", "--lake"]).arg(lake).arg(sql).output().unwrap();
    let direct: Vec<String> = String::from_utf8_lossy(&direct.stdout).lines().skip(1).map(str::to_string).collect();
    let served: Vec<String> = String::from_utf8_lossy(&psql.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    assert!(served.len() == 3 && served == direct, "`{line}` serves {served:?}, query gives {direct:?}");
}

/// One aggregate window: (site, window start in epoch seconds, dim).
type WinKey = (String, i64, String);

/// `FROM_UNIXTIME(…)` of the demo's 10 s window of a DATETIME column (session time zone UTC).
fn win(col: &str) -> String {
    format!("UNIX_TIMESTAMP(FROM_UNIXTIME(FLOOR(UNIX_TIMESTAMP({col}) / 10) * 10))")
}

async fn rows(hq: &mut mysql_async::Conn, sql: String) -> std::collections::BTreeMap<WinKey, i64> {
    let r: Vec<(String, i64, String, i64)> = hq.query(sql.as_str()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    r.into_iter().map(|(s, w, d, v)| ((s, w, d), v)).collect()
}

/// Issue #9: every aggregate window at HQ (`omrs_dash_*`) equals a plain SQL recomputation over
/// HQ's OpenMRS tables; the lake's `aggregates.*` equal HQ's, version for version; the windows
/// the watermark passed are final; and site-b's late events corrected windows already final.
async fn aggregates_match_sql_over_hq_and_the_lake(hq: &mut mysql_async::Conn, config: &Path, lake: &Path, summary: &J) {
    hq.query_drop("SET time_zone = '+00:00'").await.unwrap();
    let rv = |t: &str, a: &str| format!("JOIN omrs_sync_row_version v ON v.tbl = '{t}' AND v.row_key = {a}.uuid");
    let recompute = [
        (
            "daily_registrations",
            format!("SELECT v.site, {w}, '', COUNT(*) FROM patient p JOIN person pe ON pe.person_id = p.patient_id {rv} GROUP BY 1, 2, 3", w = win("p.date_created"), rv = rv("patient", "pe")),
        ),
        (
            "hourly_encounters",
            format!(
                "SELECT v.site, {w}, et.uuid, COUNT(*) FROM encounter e JOIN encounter_type et ON et.encounter_type_id = e.encounter_type {rv} WHERE e.voided = 0 GROUP BY 1, 2, 3",
                w = win("e.date_created"),
                rv = rv("encounter", "e")
            ),
        ),
        (
            "monthly_active_patients",
            format!("SELECT v.site, {w}, '', COUNT(DISTINCT e.patient_id) FROM encounter e {rv} WHERE e.voided = 0 GROUP BY 1, 2, 3", w = win("e.date_created"), rv = rv("encounter", "e")),
        ),
        (
            "daily_obs_by_class",
            format!(
                "SELECT v.site, {w}, cc.uuid, COUNT(*) FROM obs o JOIN concept c ON c.concept_id = o.concept_id JOIN concept_class cc ON cc.concept_class_id = c.class_id {rv} WHERE o.voided = 0 GROUP BY 1, 2, 3",
                w = win("o.date_created"),
                rv = rv("obs", "o")
            ),
        ),
    ];
    let mut corrected_b = 0;
    for (name, sql) in recompute {
        let def = omrs_core::hq::AGGREGATES.iter().find(|a| a.name == name).unwrap();
        let dim = def.dim_column.unwrap_or("''");
        type DashRow = (String, i64, String, i64, i64, i64, i64, i64);
        let dash: Vec<DashRow> = hq
            .query(format!(
                "SELECT site, UNIX_TIMESTAMP(window_start), {dim}, value, is_final, revision, UNIX_TIMESTAMP(window_end) * 1000, watermark_ms FROM {}",
                def.hq_table
            ))
            .await
            .unwrap();
        assert!(!dash.is_empty(), "{} is empty", def.hq_table);
        let at_hq: std::collections::BTreeMap<WinKey, i64> = dash.iter().filter(|r| r.3 != 0).map(|r| ((r.0.clone(), r.1, r.2.clone()), r.3)).collect();
        let expected = rows(hq, sql).await;
        assert_eq!(at_hq, expected, "{name}: omrs_dash vs SQL over HQ");
        // Every window the watermark passed is final.
        let wm = dash.iter().map(|r| r.7).max().unwrap();
        for r in &dash {
            assert!(r.6 > wm || (r.4 == 1 && r.5 >= 1), "{name}: window {r:?} ended before the watermark {wm} but is not final");
            assert!(r.4 == 1 || r.5 == 0, "{name}: a provisional window has no revision: {r:?}");
        }
        corrected_b += dash.iter().filter(|r| r.0 == "site-b" && r.5 >= 2).count();
        // The lake's latest versions are HQ's rows.
        let q = format!(
            "SELECT site, CAST(to_unixtime(window_start) AS BIGINT) AS w, {dim} AS dim, value, CAST(is_final AS INT) AS f, revision FROM aggregates.{name} ORDER BY 1, 2, 3"
        );
        let out = bin().arg("--config").arg(config).args(["query", "--format", "json", "--lake"]).arg(lake).arg(&q).output().unwrap();
        assert!(out.status.success(), "{q}: {}", String::from_utf8_lossy(&out.stderr));
        let lake_rows: Vec<J> = serde_json::from_slice(&out.stdout).unwrap();
        let in_lake: std::collections::BTreeMap<WinKey, (i64, i64, i64)> = lake_rows
            .iter()
            .map(|r| ((r["site"].as_str().unwrap().to_string(), r["w"].as_i64().unwrap(), r["dim"].as_str().unwrap().to_string()), (r["value"].as_i64().unwrap(), r["f"].as_i64().unwrap(), r["revision"].as_i64().unwrap())))
            .collect();
        let hq_all: std::collections::BTreeMap<WinKey, (i64, i64, i64)> = dash.iter().map(|r| ((r.0.clone(), r.1, r.2.clone()), (r.3, r.4, r.5))).collect();
        assert_eq!(in_lake, hq_all, "{name}: lake aggregates.{name} vs HQ {}", def.hq_table);
    }
    assert!(corrected_b > 0, "site-b's late events corrected no final window");
    let aggs = summary["aggregates"].as_array().unwrap();
    assert_eq!(aggs.len(), 4);
    assert!(aggs.iter().any(|a| a["corrected_windows"].as_i64().unwrap() > 0), "{aggs:?}");
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

/// `omrs-stream status` on a running 5-clinic demo while one clinic's agent is stopped (issue
/// #27): that clinic offline since its last record, its agent's endpoint named as unreachable,
/// the other four live with their agents running, their watermarks seconds behind and their
/// servers' binlog retention (mariadb-up sets `expire_logs_days=14`) read from the agents.
#[tokio::test(flavor = "multi_thread")]
async fn status_sees_a_five_clinic_demo_with_one_clinic_offline() {
    let tag = unique("demostat");
    let state = tempfile::tempdir().unwrap();
    let site_db = format!("openmrs_{tag}");
    let hq_db = format!("openmrs_hq_{tag}");
    let base = 20464u16;
    let out_path = state.path().join("demo.out");
    let err_path = state.path().join("demo.err");
    // site-c is offline for 75 s of a 100 s workload: in one CI run (three demos at once, debug
    // builds) the demo ended without a status call finding site-c offline and the four others
    // live in a 45 s window. Why is not known; an early end now fails with the demo's output.
    let mut demo = bin()
        .args(["demo", "--sites", "5", "--patients", "40", "--duration", "100", "--rate", "100", "--offline", "site-c:5:75", "--metrics-port", &base.to_string(), "--quiet"])
        .args(["--site-database", &site_db, "--hq-database", &hq_db])
        .arg("--state-dir")
        .arg(state.path())
        .env("OMRS_DEMO_DUMP", dump())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let demo_output = || {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("demo stdout:\n{}\ndemo stderr (last 40 lines):\n{tail}", std::fs::read_to_string(&out_path).unwrap_or_default())
    };
    let config = state.path().join("latest").join("omrs-stream.toml");
    let mut urls: Vec<String> = (0..5).map(|i| format!("http://127.0.0.1:{}/metrics", base + 3 + i)).collect();
    urls.push(format!("http://127.0.0.1:{base}/metrics"));
    let status = || -> Option<J> {
        let mut c = bin();
        c.arg("--config").arg(&config).args(["status", "--json"]);
        for u in &urls {
            c.args(["--metrics", u]);
        }
        serde_json::from_slice(&c.output().ok()?.stdout).ok()
    };
    let site = |s: &J, name: &str| s["sites"].as_array().unwrap().iter().find(|x| x["site"] == name).cloned().unwrap();
    // While site-c's agent is stopped: its records stop, and after the transform's idle time
    // (5 s in the demo) status calls it offline; the others keep heartbeating. The text form
    // (no --metrics) is taken in the same window: the offline window ends, so a text taken
    // after the JSON's checks could find site-c live again.
    let text_status = || -> String {
        let mut c = bin();
        c.arg("--config").arg(&config).arg("status");
        String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
    };
    let last_seen = std::cell::RefCell::new(None);
    let (s, text) = wait_for_or(300, "status (JSON and text) to show site-c offline and the other four live", || format!("last status: {:?}\n{}", last_seen.borrow(), demo_output()), || {
        if let Some(end) = demo.try_wait().unwrap() {
            panic!("the demo ended ({end}) before its offline window was seen; last status: {:?}\n{}", last_seen.borrow(), demo_output());
        }
        let s = status()?;
        *last_seen.borrow_mut() = Some(s.clone());
        let live = ["site-a", "site-b", "site-d", "site-e"].iter().all(|n| site(&s, n)["state"] == "live" && site(&s, n)["agent"] == "running");
        if !(site(&s, "site-c")["state"] == "offline" && live) {
            return None;
        }
        let text = text_status();
        text.lines().any(|l| l.starts_with("site-c") && l.contains("offline")).then_some((s, text))
    });
    let c = site(&s, "site-c");
    assert!(c["last_heard_age_s"].as_i64().unwrap() >= 5, "{c}");
    assert_eq!(c["offline_since"], c["last_heard"], "{c}");
    assert_eq!(c["agent"], J::Null, "site-c's agent is stopped, so no endpoint reports it: {c}");
    assert!(c["watermark_delay_s"].as_i64().unwrap() >= 5, "site-c's watermark stands still: {c}");
    let problems: Vec<&str> = s["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(problems.iter().any(|p| p.starts_with("site-c offline since")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains(&format!("127.0.0.1:{}", base + 3 + 2))), "site-c's agent endpoint is named as unreachable: {problems:?}");
    assert!(!problems.iter().any(|p| ["site-a", "site-b", "site-d", "site-e"].iter().any(|n| p.starts_with(n))), "{problems:?}");
    for n in ["site-a", "site-b", "site-d", "site-e"] {
        let x = site(&s, n);
        assert_eq!(x["binlog_retention_s"], J::from(14 * 86_400), "{x}");
        let margin = x["retention_margin_s"].as_i64().unwrap();
        assert!((14 * 86_400 - 60..=14 * 86_400).contains(&margin), "{x}");
        assert!(x["watermark_delay_s"].as_i64().unwrap() < 30, "{x}");
        assert!(x["captured"].as_i64().unwrap() > 0 && x["hq_behind"].is_i64(), "{x}");
        assert!(x["binlog_margin_files"].is_i64(), "{x}");
    }
    // The Parquet sink's row from the config's lake (the run's `sinks.parquet.path`).
    let stages: Vec<&str> = s["stages"].as_array().unwrap().iter().map(|x| x["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["transform", "hq_mysql", "parquet"]);
    assert!(s["stages"].as_array().unwrap().iter().all(|x| x["behind"].is_i64()), "{}", s["stages"]);
    // The text form has a row per clinic, site-c's offline (taken with the JSON above).
    assert_eq!(text.lines().filter(|l| l.starts_with("site-")).count(), 5, "{text}");
    // --watch clears the screen and draws the table again every SECONDS, until stopped.
    let mut watch = bin().arg("--config").arg(&config).args(["status", "--watch", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let screens = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut out, screens) = (watch.stdout.take().unwrap(), screens.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                screens.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // Three screens drawn in full: the third clear proves the second screen was complete.
    let drawn = wait_for(60, "status --watch to draw the table three times", || {
        let all = screens.lock().unwrap().clone();
        (all.matches("\x1b[2J\x1b[H").count() >= 3).then_some(all)
    });
    assert!(watch.try_wait().unwrap().is_none(), "status --watch exited by itself");
    watch.kill().unwrap();
    watch.wait().unwrap();
    reader.join().unwrap();
    for screen in drawn.split("\x1b[2J\x1b[H").skip(1).take(2) {
        assert_eq!(screen.lines().filter(|l| l.starts_with("site-")).count(), 5, "{screen}");
    }
    // A bad endpoint is refused before anything connects.
    let out = bin().arg("--config").arg(&config).args(["status", "--metrics", "127.0.0.1:9"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://HOST:PORT"), "{}", String::from_utf8_lossy(&out.stderr));
    // The demo goes on to its end and verifies.
    let out = wait_for(600, "the demo to finish", || demo.try_wait().unwrap());
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    assert!(out.success() && stdout.contains("verify: OK"), "{}", demo_output());
    for port in [3311, 3312, 3313, 3314, 3315] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{site_db}`")).await.unwrap();
    }
    admin(3310, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
}
