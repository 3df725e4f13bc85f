//! Service fault (issue #10): HQ's MariaDB is stopped for 60 s while the whole pipeline runs and
//! a live workload keeps coming. The HQ sink must retry, not exit (nor may any other stage: the
//! lake goes on meanwhile), and apply everything once HQ is back. After the drain, `verify
//! --manifest --lake` (sites vs HQ vs lake, every stage's lag) passes: nothing lost or doubled.
//! Its own test binary: the HQ server is shared, and cargo runs test binaries one at a time.

mod common;

use std::time::{Duration, Instant};

use common::hq::*;
use common::pipeline::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hq_down_for_60_s_under_a_live_workload_loses_and_doubles_nothing() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("thq")), database: unique("hqdown") };
    let hq_db = unique("openmrs_hq_hqdown");
    let l = live(&p, &hq_db, 150, 14, Some(150.0)).await;
    let reference = Reference::start(&p.database);
    let (mut procs, workload) = start_with_workload(&p, &l);
    let Live { config: cfg_path, lake, manifest: manifest_path, .. } = l;
    // HQ goes away once it has applied part of the workload.
    let deadline = Instant::now() + Duration::from_secs(180);
    while hq_offset(&hq_db).await < 2 {
        assert_alive(&mut procs, p.dir.path(), "before the fault");
        assert!(Instant::now() < deadline, "HQ applied nothing in 180 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deploy = root().join("deploy/mariadb");
    let _back = ServiceBack("hq");
    assert!(std::process::Command::new(deploy.join("mariadb-down")).arg("hq").status().unwrap().success());
    eprintln!("HQ's MariaDB stopped");
    let down_since = Instant::now();
    let lake_before = std::fs::read_dir(lake.join("_manifest")).map(|d| d.count()).unwrap_or(0);
    while down_since.elapsed() < Duration::from_secs(60) {
        assert_alive(&mut procs, p.dir.path(), "while HQ's MariaDB was down");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sink_log = std::fs::read_to_string(p.dir.path().join("sink-hq-mysql.log")).unwrap_or_default();
    assert!(sink_log.contains("retrying from the last committed batch"), "the HQ sink said nothing of the outage:\n{sink_log}");
    // The lake is not held up by HQ: it committed while HQ was down.
    let lake_during = std::fs::read_dir(lake.join("_manifest")).map(|d| d.count()).unwrap_or(0);
    assert!(lake_during > lake_before, "the lake committed nothing while HQ was down ({lake_before} → {lake_during} manifest entries)");
    assert!(std::process::Command::new(deploy.join("mariadb-up")).arg("hq").status().unwrap().success());
    eprintln!("HQ's MariaDB back");

    let manifest = workload.await.unwrap().unwrap();
    let report = drain_until_verified(&cfg_path, Some(&manifest_path), &lake, &mut procs, p.dir.path(), 300, "HQ's outage").await;
    assert_eq!(report["ok"], true);
    drop(procs);
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "HQ's outage").await;
    eprintln!("HQ fault: {} row changes, lost={lost} duplicated={doubled}", manifest.row_changes);
    assert_eq!((lost, doubled), (0, 0));
    drop_databases(&[&hq_db], &p.database).await;
}
