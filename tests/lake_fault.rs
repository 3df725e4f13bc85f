//! Service fault (issue #10): the file system under the lake turns read-only for 25 s while the
//! whole pipeline runs and a live workload keeps coming. The Parquet sink must retry, not exit
//! and not corrupt: once the disk is writable again it goes on from its last commit, and
//! `verify --manifest --lake` (sites vs HQ vs lake, row by row, every stage's lag) passes with
//! nothing lost or doubled.
//! The lake is its own tmpfs, remounted read-only and back (`mount -o remount,ro`), so the
//! sink sees the real EROFS from the kernel. That needs root, as the services here do.
//! Its own test binary: it holds the shared services for a while.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::hq::*;
use common::pipeline::*;
use common::*;

/// The lake's tmpfs, unmounted even if the test fails midway.
struct LakeMount(PathBuf);

impl LakeMount {
    fn new(dir: &Path) -> LakeMount {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2g", "omrs-lake-fault"]).arg(dir).output().unwrap();
        assert!(out.status.success(), "mounting a tmpfs for the lake (this test needs root): {}", String::from_utf8_lossy(&out.stderr));
        LakeMount(dir.to_path_buf())
    }

    /// Remounts with `mode`. Linux refuses a read-only remount while a file on the disk is open
    /// for writing ("mount point is busy"), which the live sink does for a moment per file: retry
    /// until the disk is between two writes, with a deadline.
    fn remount(&self, mode: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("mount").args(["-o", &format!("remount,{mode}")]).arg(&self.0).output().unwrap();
            if out.status.success() {
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(err.contains("busy") && Instant::now() < deadline, "remount {mode}: {err}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LakeMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_lake_disk_makes_the_sink_retry_and_loses_nothing() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tlake")), database: unique("lkro") };
    let hq_db = unique("openmrs_hq_lkro");
    let mount = LakeMount::new(&p.dir.path().join("lake"));
    let l = live(&p, &hq_db, 150, 12, Some(250.0)).await;
    let reference = Reference::start(&p.database);
    assert_eq!(l.lake, mount.0);
    // The live workload runs while the disk goes read-only and comes back.
    let (mut procs, workload) = start_with_workload(&p, &l);
    let Live { config: cfg_path, lake, manifest: manifest_path, .. } = l;
    // Wait for the lake to have taken part of it (a committed manifest entry).
    let deadline = Instant::now() + Duration::from_secs(180);
    while !lake.join("_manifest").is_dir() || std::fs::read_dir(lake.join("_manifest")).map(|d| d.count()).unwrap_or(0) < 2 {
        assert_alive(&mut procs, p.dir.path(), "before the fault");
        assert!(Instant::now() < deadline, "the Parquet sink committed nothing in 180 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mount.remount("ro");
    eprintln!("lake read-only");
    let ro_since = Instant::now();
    // Hold it read-only 25 s, checking that no stage exits meanwhile.
    while ro_since.elapsed() < Duration::from_secs(25) {
        assert_alive(&mut procs, p.dir.path(), "while the lake was read-only");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mount.remount("rw");
    eprintln!("lake writable again");
    let sink_log = std::fs::read_to_string(p.dir.path().join("sink-parquet.log")).unwrap_or_default();
    assert!(sink_log.contains("Read-only file system") && sink_log.contains("transient error"), "the Parquet sink said nothing of the read-only disk:\n{sink_log}");

    let manifest = workload.await.unwrap().unwrap();
    let report = drain_until_verified(&cfg_path, Some(&manifest_path), &lake, &mut procs, p.dir.path(), 300, "the read-only lake").await;
    assert_eq!(report["ok"], true);
    // The lake still answers SQL after the fault, and agrees with HQ on the patients.
    let out = bin().arg("--config").arg(&cfg_path).args(["query", "--format", "csv", "SELECT COUNT(*) AS n FROM current.patient"]).output().unwrap();
    assert!(out.status.success(), "query after the fault: {}", String::from_utf8_lossy(&out.stderr));
    let lake_patients: i64 = String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(-1);
    let mut h = hq(&hq_db).await;
    assert_eq!(lake_patients, count(&mut h, "SELECT COUNT(*) FROM patient").await, "patients in the lake vs HQ");
    drop(procs);
    drop(mount);
    // HQ against an uninterrupted reference; the lake equals HQ value for value (verify above).
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "the read-only lake").await;
    eprintln!("lake fault: {} row changes, lost={lost} duplicated={doubled}", manifest.row_changes);
    assert_eq!((lost, doubled), (0, 0));
    drop_databases(&[&hq_db], &p.database).await;
}
