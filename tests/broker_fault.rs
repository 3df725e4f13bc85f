//! Service fault (issue #10): the Kafka broker is SIGKILLed in the middle of a live workload and
//! started again 15 s later, while every stage runs. No stage may exit; after the drain,
//! `verify --manifest` (sites vs HQ vs lake, identities, lags) passes: nothing lost or doubled.
//! Its own test binary: the broker is shared, and cargo runs test binaries one at a time.

mod common;

use std::time::Duration;

use common::hq::*;
use common::pipeline::*;
use common::*;

fn broker_pid() -> Option<i32> {
    let state = std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into());
    std::fs::read_to_string(format!("{state}/kafka/kafka.pid")).ok()?.trim().parse().ok()
}

/// Starts the broker again even if the test fails midway.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(root().join("deploy/kafka/kafka-up")).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_mid_stream_loses_and_doubles_nothing() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tbroker")), database: unique("brk") };
    let hq_db = unique("openmrs_hq_brk");
    let Live { config: cfg_path, cfg, lake, manifest: manifest_path, args } = live(&p, &hq_db, 250, 5, Some(500.0)).await;
    let reference = Reference::start(&p.database);
    p.run(&cfg_path, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let mut procs = start_all(&cfg_path, p.dir.path());
    let workload = tokio::spawn({
        let cfg = cfg.clone();
        let args = omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() };
        async move { omrs_simulate::run(&cfg, &args).await }
    });

    // SIGKILL the broker mid-stream, start it again 15 s later. Mid-stream means: every stage
    // runs and HQ has committed its first batch, with the snapshots and the workload in flight.
    // Waiting for more while the clinics still write is a race a slow machine loses (the ~30 s
    // workload ends first), so whether they were still writing is printed, not required.
    let base = hq_offset(&hq_db).await;
    wait_for(180, "HQ to commit its first batch", || (block_on(hq_offset(&hq_db)) > base).then_some(()));
    eprintln!("HQ has committed offsets; the clinics {} writing", if workload.is_finished() { "had stopped" } else { "were still" });
    let _back = BrokerBack;
    let pid = broker_pid().expect("the broker's pid file (scripts/dev-up starts it)");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "killing the broker (pid {pid})");
    eprintln!("broker (pid {pid}) SIGKILLed");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_alive(&mut procs, p.dir.path(), "while the broker was down");
    let up = std::process::Command::new(root().join("deploy/kafka/kafka-up")).status().unwrap();
    assert!(up.success(), "kafka-up");
    eprintln!("broker back");

    let manifest = workload.await.unwrap().unwrap();
    let report = drain_until_verified(&cfg_path, Some(&manifest_path), &lake, &mut procs, p.dir.path(), 420, "a broker SIGKILL").await;
    assert_eq!(report["ok"], true);
    drop(procs);
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "the broker's SIGKILL").await;
    eprintln!("broker fault: {} row changes, lost={lost} duplicated={doubled}", manifest.row_changes);
    assert_eq!((lost, doubled), (0, 0));

    drop_databases(&[&hq_db], &p.database).await;
}

