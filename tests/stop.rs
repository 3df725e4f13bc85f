//! SIGTERM stops every stage cleanly (issue #26): while a live workload streams through the
//! whole pipeline, each of the six processes in turn gets SIGTERM in the middle of its work. It
//! must exit by itself with status 0 within the 10 s a container runtime waits before SIGKILL,
//! after saying that it is stopping, and then starts again. Afterwards `verify --manifest`
//! passes and HQ equals an uninterrupted reference run of the same site changes, value for
//! value: a clean stop commits nothing half done, and loses or doubles nothing.

mod common;

use std::time::{Duration, Instant};

use common::hq::*;
use common::pipeline::*;
use common::*;

/// The grace period of `docker stop` and Kubernetes' default is 10 s and 30 s: a stage must be
/// gone well within the first.
const GRACE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_each_stage_cleanly_and_nothing_is_lost_or_doubled() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tstop")), database: unique("stop") };
    let hq_db = unique("openmrs_hq_stop");
    let l = live(&p, &hq_db, 400, 23, Some(1200.0)).await;
    let reference = Reference::start(&p.database);
    // The stages log their stop at info; the rest of their logs stay at warn.
    let env = [("RUST_LOG".to_string(), "warn,omrs_core::stop=info".to_string())];
    let (mut procs, workload) = start_with_workload_env(&p, &l, &env);
    let log = |name: &str| p.dir.path().join(format!("{name}.log"));

    let mut stops = Vec::new();
    for i in 0..procs.len() {
        // Work is flowing: HQ has committed more since the last stop (the stage restarted
        // before it is working again, whatever it is).
        let before = hq_offset(&hq_db).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while hq_offset(&hq_db).await <= before {
            assert!(Instant::now() < deadline, "HQ committed nothing for 120 s before stopping {}", procs[i].name);
            assert_alive(&mut procs, p.dir.path(), "before a stop");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let pr = &mut procs[i];
        let pid = pr.child.id().to_string();
        let sent = Instant::now();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success(), "kill -TERM {pid}");
        let status = loop {
            if let Some(s) = pr.child.try_wait().unwrap() {
                break s;
            }
            assert!(sent.elapsed() < GRACE, "{} still running {GRACE:?} after SIGTERM; its log:\n{}", pr.name, std::fs::read_to_string(log(&pr.name)).unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let took = sent.elapsed();
        let text = std::fs::read_to_string(log(&pr.name)).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "{} exited with {status} on SIGTERM; its log:\n{text}", pr.name);
        assert!(text.contains("stopping: finishing the open batch"), "{} did not say it was stopping; its log:\n{text}", pr.name);
        stops.push(format!("{} in {} ms", pr.name, took.as_millis()));
        pr.child = start_env(&l.config, &pr.args, &log(&pr.name), &env);
        pr.starts += 1;
    }
    let manifest = workload.await.unwrap().unwrap();
    eprintln!("stop: workload done ({} row changes); stopped cleanly: {}", manifest.row_changes, stops.join(", "));

    let report = drain_until_verified(&l.config, Some(&l.manifest), &l.lake, &mut procs, p.dir.path(), 600, "SIGTERM to every stage").await;
    assert_eq!(report["ok"], true);
    for pr in procs.iter_mut() {
        kill9(&mut pr.child);
    }
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "SIGTERM to every stage").await;
    assert_eq!((lost, doubled), (0, 0));
    drop_databases(&[&hq_db], &p.database).await;
}
