//! The simulator's adversarial identity mode at a high rate (issue #22 §3), through the whole
//! pipeline on real services: National IDs pasted with Unicode dashes, full-width forms and
//! invisible spaces must still join a person's registrations; people with another's name, sex
//! and birthdate, and National IDs one digit apart from another's, must stay apart. Judged by
//! `verify --manifest --lake` (presence, values, and every human exactly one unvoided patient
//! by the simulator's own truth), and by what HQ holds.

mod common;

use common::hq::*;
use common::*;
use mysql_async::prelude::Queryable;
use serde_json::Value as J;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pasted_ids_join_and_near_misses_stay_apart() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tadv")), database: unique("adv") };
    let hq_db = unique("openmrs_hq_adv");
    let lake = p.dir.path().join("lake");
    let lake_line = format!("path = \"{}\"", lake.display());
    let cfg_path = p.config(&hq_db, &[("path = \"${OMRS_LAKE:-/var/lib/omrs-stream/lake}\"", &lake_line)]);
    p.run(&cfg_path, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&cfg_path).unwrap();
    let args = omrs_simulate::SimulateArgs { adversarial: 0.5, dup_fraction: 0.4, ..workload(&p, 200, 23) };
    let manifest = omrs_simulate::run(&cfg, &args).await.unwrap();

    p.ingest(&cfg_path, &["site-a", "site-b", "site-c"], true);
    p.run(&cfg_path, &["transform", "--until-idle", "--metrics-port", "0"]);
    p.run(&cfg_path, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    p.run(&cfg_path, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    p.run(&cfg_path, &["sink", "parquet", "--until-idle", "--metrics-port", "0", "--quiet"]);

    // The workload is adversarial, by the simulator's own record: pasted identifiers at the
    // sites, numbers one digit apart, and (at HQ) different people sharing name and birthdate.
    let pasted = manifest.humans.iter().flat_map(|h| &h.records).filter(|r| r.national_id_raw.as_deref().is_some_and(|s| !s.is_ascii())).count();
    assert!(pasted >= 20, "{pasted} pasted identifiers");
    let ids: Vec<&String> = manifest.humans.iter().filter_map(|h| h.national_id.as_ref()).collect();
    let one_apart = ids.windows(2).filter(|w| w[0].len() == w[1].len() && w[0].chars().zip(w[1].chars()).filter(|(a, b)| a != b).count() == 1).count();
    assert!(one_apart >= 10, "{one_apart} identifier pairs one digit apart");
    let mut h = hq(&hq_db).await;
    let twins: i64 = count(
        &mut h,
        "SELECT COUNT(*) FROM (SELECT n.given_name, n.family_name, p.birthdate, p.gender FROM person p JOIN patient pa ON pa.patient_id = p.person_id AND pa.voided = 0
           JOIN person_name n ON n.person_id = p.person_id AND n.voided = 0 AND n.preferred = 1 WHERE p.voided = 0
           GROUP BY 1, 2, 3, 4 HAVING COUNT(DISTINCT p.person_id) > 1) t",
    )
    .await;
    assert!(twins >= 10, "{twins} groups of unvoided patients sharing name, sex and birthdate");

    // Every human exactly one unvoided patient; values and the lake consistent.
    let manifest_path = p.dir.path().join("manifest.json");
    let v = bin().arg("--config").arg(&cfg_path).args(["verify", "--json", "--lake"]).arg(&lake).arg("--manifest").arg(&manifest_path).output().unwrap();
    let report: J = serde_json::from_slice(&v.stdout).unwrap_or(J::Null);
    assert!(v.status.success() && report["ok"] == J::Bool(true), "verify: {}\n{}", String::from_utf8_lossy(&v.stderr), serde_json::to_string_pretty(&report).unwrap_or_default());
    assert_eq!(report["manifest"]["wrong"], 0);
    assert_eq!(report["manifest"]["humans"].as_u64(), Some(manifest.humans.len() as u64));
    assert_eq!(report["manifest"]["active_patients"].as_u64(), Some(manifest.expected_hq.active_patients));

    let mut a = admin(HQ_PORT, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
    for port in [3311, 3312, 3313] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}
