//! Service fault (issue #10): one clinic's MariaDB is stopped for 60 s while the whole pipeline
//! runs, then started again. Its agent must retry, not exit (nor may any other stage), and pick
//! up where its checkpoint was; the clinic's later changes must arrive too. After the drain,
//! `verify` (sites vs HQ vs lake, every stage's lag) passes: nothing lost or doubled. (The
//! second workload's manifest knows only its own people, so identities are checked against the
//! first one, before the outage.)
//! Its own test binary: the site server is shared, and cargo runs test binaries one at a time.

mod common;

use std::time::Duration;

use common::hq::*;
use common::pipeline::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_database_down_for_60_s_loses_and_doubles_nothing() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tsite")), database: unique("sdown") };
    let hq_db = unique("openmrs_hq_sdown");
    let Live { config: cfg_path, cfg, lake, manifest: manifest_path, args: first } = live(&p, &hq_db, 120, 8, None).await;
    let reference = Reference::start(&p.database);
    let manifest1 = omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..first.clone() }).await.unwrap();
    p.run(&cfg_path, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let mut procs = start_all(&cfg_path, p.dir.path());
    // The first workload through, then site-b goes away for 60 s.
    drain_until_verified(&cfg_path, Some(&manifest_path), &lake, &mut procs, p.dir.path(), 300, "the first workload").await;
    let deploy = root().join("deploy/mariadb");
    let _back = ServiceBack("site-b");
    assert!(std::process::Command::new(deploy.join("mariadb-down")).arg("site-b").status().unwrap().success());
    eprintln!("site-b's MariaDB stopped");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_alive(&mut procs, p.dir.path(), "while site-b's MariaDB was down");
    let agent_log = std::fs::read_to_string(p.dir.path().join("ingest-site-b.log")).unwrap_or_default();
    assert!(agent_log.contains("transient error"), "site-b's agent said nothing of the outage:\n{agent_log}");
    assert!(std::process::Command::new(deploy.join("mariadb-up")).arg("site-b").status().unwrap().success());
    eprintln!("site-b's MariaDB back");

    // More clinic work everywhere, site-b included, after the outage.
    let second = omrs_simulate::SimulateArgs { patients: 60, seed: 9, no_provision: true, manifest: p.dir.path().join("manifest2.json"), ..first.clone() };
    let manifest2 = omrs_simulate::run(&cfg, &second).await.unwrap();
    let b_rows = manifest2.sites.iter().find(|s| s.name == "site-b").map(|s| s.row_changes).unwrap_or(0);
    assert!(b_rows > 0, "the second workload wrote at site-b");
    let report = drain_until_verified(&cfg_path, None, &lake, &mut procs, p.dir.path(), 300, "site-b's outage").await;
    assert_eq!(report["ok"], true);
    drop(procs);
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "site-b's outage").await;
    eprintln!("site fault: {} row changes before the outage, {} after, lost={lost} duplicated={doubled}", manifest1.row_changes, manifest2.row_changes);
    assert_eq!((lost, doubled), (0, 0));

    drop_databases(&[&hq_db], &p.database).await;
}
