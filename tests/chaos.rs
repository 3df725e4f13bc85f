//! SIGKILL chaos over the whole pipeline (issue #10): three sites take a simulator workload
//! (duplicates, updates, voids, deletes, site merges) while a random pipeline process — an ingest
//! agent, the transform, the HQ sink or the Parquet sink — is killed with SIGKILL at random times
//! and started again. After the drain, `verify --manifest` (sites vs HQ vs lake, identities
//! against the simulator's ground truth) must pass, and HQ, in uuid space, must equal the HQ of an
//! uninterrupted pipeline over the same site changes.
//!
//! The test command runs the short version (≥ 5 kills, about 30 k row changes);
//! `scripts/chaos` runs the full one (CHAOS_PATIENTS, CHAOS_KILLS, CHAOS_RATE, CHAOS_SEED).
//! Prints `CHAOS kills=<n> lost=<n> duplicated=<n> hq_equal=<true|false>` last.

mod common;

use std::time::{Duration, Instant};

use common::hq::*;
use common::pipeline::*;
use common::*;

/// xorshift64*: the kill schedule, reproducible from CHAOS_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(lo + (hi - lo) * (self.next() % 10_000) as f64 / 10_000.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_chaos_loses_and_doubles_nothing() {
    let patients: usize = env_or("CHAOS_PATIENTS", 500);
    let min_kills: u32 = env_or("CHAOS_KILLS", 5);
    let rate: f64 = env_or("CHAOS_RATE", 1500.0);
    let seed: u64 = env_or("CHAOS_SEED", 11);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tchaos")), database: unique("chaos") };
    let hq_chaos = unique("openmrs_hq_chaos");
    let Live { config: cfg_chaos, cfg, lake, manifest: manifest_path, args } = live(&p, &hq_chaos, patients, seed, Some(rate)).await;

    // The reference pipeline snapshots the sites now and reads the workload later, untouched.
    let p_ref = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tchref")), database: p.database.clone() };
    let hq_ref = unique("openmrs_hq_cref");
    let cfg_ref = p_ref.config(&hq_ref, &[]);
    p_ref.run(&cfg_ref, &["topics", "apply"]);
    p_ref.ingest(&cfg_ref, &["site-a", "site-b", "site-c"], true);

    // The chaos pipeline: every stage a long-running process.
    p.run(&cfg_chaos, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let log = |name: &str| p.dir.path().join(format!("{name}.log"));
    let mut procs = start_all(&cfg_chaos, p.dir.path());

    // The workload, while processes die.
    let workload = tokio::spawn({
        let cfg = cfg.clone();
        let args = omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() };
        async move { omrs_simulate::run(&cfg, &args).await }
    });
    let expected_secs = (patients as f64 * 55.0 / rate).max(10.0);
    let interval = expected_secs / (min_kills as f64 + 1.0);
    eprintln!("chaos: {patients} people at {rate} rows/s (about {expected_secs:.0} s), a kill every ~{interval:.1} s, seed {seed}");
    let kinds = ["ingest", "transform", "sink-hq-mysql", "sink-parquet"];
    let mut order: Vec<&str> = Vec::new();
    let mut kills = 0u32;
    let mut kill_log = Vec::new();
    let t0 = Instant::now();
    loop {
        let done = workload.is_finished();
        if done && kills >= min_kills {
            break;
        }
        tokio::time::sleep(rng.secs(interval * 0.5, interval * 1.5)).await;
        if order.is_empty() {
            order = kinds.to_vec();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let kind = order.pop().unwrap();
        let candidates: Vec<usize> = (0..procs.len()).filter(|i| procs[*i].name.starts_with(kind)).collect();
        let i = candidates[rng.below(candidates.len() as u64) as usize];
        let pr = &mut procs[i];
        if let Some(status) = pr.child.try_wait().unwrap() {
            panic!("{} exited by itself ({status}) before kill {}; its log:\n{}", pr.name, kills + 1, std::fs::read_to_string(log(&pr.name)).unwrap_or_default());
        }
        kill9(&mut pr.child);
        kills += 1;
        kill_log.push(format!("{:.1}s {}", t0.elapsed().as_secs_f64(), pr.name));
        tokio::time::sleep(rng.secs(0.2, 1.5)).await;
        pr.child = start(&cfg_chaos, &pr.args, &log(&pr.name));
        pr.starts += 1;
    }
    let manifest = workload.await.unwrap().unwrap();
    eprintln!("chaos: workload done ({} row changes in {:.0} s); {kills} kills: {}", manifest.row_changes, t0.elapsed().as_secs_f64(), kill_log.join(", "));

    // Drain: verify (sites vs HQ vs lake, identities vs the manifest) until it passes.
    let report = drain_until_verified(&cfg_chaos, Some(&manifest_path), &lake, &mut procs, p.dir.path(), env_or("CHAOS_DRAIN_SECS", 600), &format!("the chaos run (kills: {})", kill_log.join(", "))).await;
    assert_eq!(report["ok"], true);
    let compared: u64 = report["values"].as_array().map(|a| a.iter().filter_map(|t| t["compared"].as_u64()).sum()).unwrap_or(0);
    let lake_compared: u64 = report["lake_values"].as_array().map(|a| a.iter().filter_map(|t| t["compared"].as_u64()).sum()).unwrap_or(0);
    eprintln!("BENCH verify_values_ms {} ms ({compared} HQ rows and {lake_compared} lake rows compared by value)", report["values_ms"]);
    for pr in procs.iter_mut() {
        kill9(&mut pr.child);
    }

    // The uninterrupted reference over the same site changes.
    p_ref.ingest(&cfg_ref, &["site-a", "site-b", "site-c"], true);
    p_ref.run(&cfg_ref, &["transform", "--until-idle", "--metrics-port", "0"]);
    p_ref.run(&cfg_ref, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    p_ref.run(&cfg_ref, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
    let a = hq_dump(&hq_chaos).await;
    let b = hq_dump(&hq_ref).await;
    let hq_equal = a == b;
    let (lost, doubled) = lost_and_doubled_vs(&b, &a);
    let restarts: u32 = procs.iter().map(|p| p.starts - 1).sum();
    assert_eq!(restarts, kills);
    println!("CHAOS kills={kills} lost={lost} duplicated={doubled} hq_equal={hq_equal} row_changes={} seed={seed}", manifest.row_changes);
    eprintln!("CHAOS kills={kills} lost={lost} duplicated={doubled} hq_equal={hq_equal} row_changes={} seed={seed}", manifest.row_changes);
    if !hq_equal {
        assert_same(&b, &a, "HQ after chaos vs the uninterrupted pipeline");
    }
    assert!(kills >= min_kills);
    assert_eq!((lost, doubled), (0, 0));

    // Clean up.
    drop_databases(&[&hq_chaos, &hq_ref], &p.database).await;
}
