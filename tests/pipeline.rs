//! The pipeline so far, end to end on real services: the simulator writes three sites (with
//! cross-site duplicates, late National IDs and site merges), one ingest agent per site streams
//! them into Kafka (transactionally), and the transform merges them. Every human of the
//! manifest ends up as exactly one canonical person.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;

use common::*;
use omrs_transform::engine::HqEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_transform_resolve_every_manifest_identity() {
    let database = unique("e2e");
    let prefix = format!("{}.", unique("te2e"));
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"))
        .replace("database = \"openmrs\"\n", &format!("database = \"{database}\"\n"))
        .replace("idle_timeout_s = 180", "idle_timeout_s = 5");
    let config = dir.path().join("omrs-stream.toml");
    std::fs::write(&config, &text).unwrap();
    let cfg = omrs_core::config::Config::load(&config).unwrap();
    assert!(bin().arg("--config").arg(&config).args(["topics", "apply"]).output().unwrap().status.success());

    let manifest_path = dir.path().join("manifest.json");
    let args = omrs_simulate::SimulateArgs {
        patients: 150,
        dup_fraction: 0.3,
        seed: 42,
        burst: true,
        manifest: manifest_path.clone(),
        database: Some(database.clone()),
        dump: dump(),
        quiet: true,
        ..Default::default()
    };
    let manifest = omrs_simulate::run(&cfg, &args).await.unwrap();

    let agents: Vec<_> = ["site-a", "site-b", "site-c"]
        .iter()
        .map(|site| {
            bin().arg("--config")
                .arg(&config)
                .args(["ingest", "--site", site, "--until-caught-up", "--quiet", "--metrics-port", "0"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for a in agents {
        let out = a.wait_with_output().unwrap();
        assert!(out.status.success(), "ingest: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = bin()
        .arg("--config")
        .arg(&config)
        .args(["transform", "--until-idle", "--metrics-port", "0"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "transform: {}", String::from_utf8_lossy(&out.stderr));

    let events: Vec<HqEvent> = read_json(&format!("{prefix}omrs.hq.changes"));

    // Final assignment: follow merges loser → winner.
    let mut parent: HashMap<String, String> = HashMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        if let HqEvent::Merge { winner, loser, reason, .. } = e {
            parent.insert(loser.clone(), winner.clone());
            *reasons.entry(reason.clone()).or_default() += 1;
        }
    }
    let canon = |u: &str| {
        let mut cur = u.to_string();
        for _ in 0..50 {
            match parent.get(&cur) {
                Some(n) if *n != cur => cur = n.clone(),
                _ => break,
            }
        }
        cur
    };
    let mut survivors = BTreeSet::new();
    let mut multi = 0;
    for h in &manifest.humans {
        let ids: BTreeSet<String> = h.records.iter().map(|r| canon(&r.person_uuid)).collect();
        assert_eq!(ids.len(), 1, "human {:?} is split across {ids:?}", h.national_id);
        let s = ids.into_iter().next().unwrap();
        assert!(survivors.insert(s.clone()), "two humans merged into {s}");
        if h.records.len() > 1 {
            multi += 1;
        }
    }
    assert!(multi > 30, "{multi} multi-record humans");
    assert_eq!(reasons.get("site_merge").copied().unwrap_or(0), manifest.site_merges.len(), "{reasons:?}");
    let change_count = events.iter().filter(|e| matches!(e, HqEvent::Change { .. })).count();
    assert!(change_count as u64 > manifest.row_changes / 2, "{change_count} changes for {} row changes", manifest.row_changes);

    for port in [3311, 3312, 3313] {
        use mysql_async::prelude::Queryable;
        let mut c = admin(port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{database}`")).await.unwrap();
    }
}
