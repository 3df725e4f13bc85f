//! A whole pipeline as long-running, restartable processes (three agents, the transform, both
//! sinks) over a simulator workload, for the chaos and service-fault tests, and how to judge it
//! afterwards (`verify --manifest`, HQ in uuid space against an uninterrupted reference).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use mysql_async::prelude::Queryable;
use serde_json::Value as J;

use super::*;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One long-running pipeline process, restartable.
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    pub child: Child,
    pub starts: u32,
}

impl Drop for Proc {
    /// A failing run leaves nothing running.
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

pub fn start(config: &Path, args: &[String], log: &Path) -> Child {
    start_env(config, args, log, &[])
}

/// As [`start`], with extra environment variables (they win over `RUST_LOG=warn`).
pub fn start_env(config: &Path, args: &[String], log: &Path, env: &[(String, String)]) -> Child {
    bin()
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// `verify --json --lake`, with `--manifest` when given.
pub fn verify(config: &Path, manifest: Option<&Path>, lake: &Path) -> (i32, J) {
    let mut cmd = bin();
    cmd.arg("--config").arg(config).args(["verify", "--json"]);
    if let Some(m) = manifest {
        cmd.arg("--manifest").arg(m);
    }
    let out = cmd.arg("--lake").arg(lake).output().unwrap();
    let report: J = serde_json::from_slice(&out.stdout).unwrap_or(J::Null);
    (out.status.code().unwrap_or(-1), report)
}

/// The six processes of a pipeline on `config`, started; logs in `dir/<name>.log`.
pub fn start_all(config: &Path, dir: &Path) -> Vec<Proc> {
    start_all_env(config, dir, &[])
}

/// As [`start_all`], with extra environment variables for every process.
pub fn start_all_env(config: &Path, dir: &Path, env: &[(String, String)]) -> Vec<Proc> {
    let specs: Vec<(&str, Vec<&str>)> = vec![
        ("ingest-site-a", vec!["ingest", "--site", "site-a", "--quiet"]),
        ("ingest-site-b", vec!["ingest", "--site", "site-b", "--quiet"]),
        ("ingest-site-c", vec!["ingest", "--site", "site-c", "--quiet"]),
        ("transform", vec!["transform"]),
        ("sink-hq-mysql", vec!["sink", "hq-mysql", "--quiet"]),
        ("sink-parquet", vec!["sink", "parquet", "--quiet"]),
    ];
    specs
        .into_iter()
        .map(|(name, a)| {
            let args: Vec<String> = a.iter().map(|s| s.to_string()).chain(["--metrics-port".to_string(), "0".to_string()]).collect();
            let child = start_env(config, &args, &dir.join(format!("{name}.log")), env);
            Proc { name: name.to_string(), args, child, starts: 1 }
        })
        .collect()
}

/// Panics, naming the process and showing its log, if one exited by itself.
pub fn assert_alive(procs: &mut [Proc], dir: &Path, when: &str) {
    for pr in procs.iter_mut() {
        if let Some(status) = pr.child.try_wait().unwrap() {
            panic!("{} exited by itself ({status}) {when}; its log:\n{}", pr.name, std::fs::read_to_string(dir.join(format!("{}.log", pr.name))).unwrap_or_default());
        }
    }
}

/// Polls verify until it passes; on timeout, keeps the logs, config and manifest in a directory
/// of the system's temp dir and panics with the report.
pub async fn drain_until_verified(config: &Path, manifest: Option<&Path>, lake: &Path, procs: &mut [Proc], dir: &Path, secs: u64, what: &str) -> J {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        assert_alive(procs, dir, "while draining");
        let (code, r) = verify(config, manifest, lake);
        if code == 0 {
            return r;
        }
        if std::time::Instant::now() >= deadline {
            let keep = std::env::temp_dir().join(format!("omrs-test-logs-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            for pr in procs.iter() {
                let _ = std::fs::copy(dir.join(format!("{}.log", pr.name)), keep.join(format!("{}.log", pr.name)));
            }
            if let Some(m) = manifest {
                let _ = std::fs::copy(m, keep.join("manifest.json"));
            }
            let _ = std::fs::copy(config, keep.join("omrs-stream.toml"));
            panic!("verify did not pass after {what} (logs, config and manifest kept in {}):\n{}", keep.display(), serde_json::to_string_pretty(&r).unwrap_or_default());
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
}

/// A live pipeline's setup: its config (its own lake under the test dir, 1 s rolls, 5 s
/// compactions), its topics, and the simulator's arguments (20 % duplicates, at `rate` row
/// changes/s, or as fast as the sites take them), with the sites provisioned.
pub struct Live {
    pub config: PathBuf,
    pub cfg: omrs_core::config::Config,
    pub lake: PathBuf,
    pub manifest: PathBuf,
    pub args: omrs_simulate::SimulateArgs,
}

pub async fn live(p: &hq::Pipeline, hq_db: &str, patients: usize, seed: u64, rate: Option<f64>) -> Live {
    live_with(p, hq_db, patients, seed, rate, &[]).await
}

/// As [`live`], with more config tweaks (`(from, to)`, as [`hq::Pipeline::config`] takes them).
pub async fn live_with(p: &hq::Pipeline, hq_db: &str, patients: usize, seed: u64, rate: Option<f64>, tweaks: &[(&str, &str)]) -> Live {
    let lake = p.dir.path().join("lake");
    let lake_line = format!("path = \"{}\"", lake.display());
    let mut all = vec![
        ("path = \"${OMRS_LAKE:-/var/lib/omrs-stream/lake}\"", lake_line.as_str()),
        ("roll_interval_ms = 10000", "roll_interval_ms = 1000"),
        ("compact_interval_s = 60", "compact_interval_s = 5"),
    ];
    all.extend_from_slice(tweaks);
    let config = p.config(hq_db, &all);
    p.run(&config, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&config).unwrap();
    let manifest = p.dir.path().join("manifest.json");
    let args = omrs_simulate::SimulateArgs {
        patients,
        dup_fraction: 0.2,
        seed,
        rate,
        burst: rate.is_none(),
        manifest: manifest.clone(),
        database: Some(p.database.clone()),
        dump: dump(),
        quiet: true,
        ..Default::default()
    };
    omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { provision_only: true, ..args.clone() }).await.unwrap();
    Live { config, cfg, lake, manifest, args }
}

/// Drops the HQ databases and the pipeline's site database at every site.
pub async fn drop_databases(hq_dbs: &[&str], site_db: &str) {
    let mut a = admin(hq::HQ_PORT, None).await;
    for db in hq_dbs {
        a.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await.unwrap();
    }
    for port in [3311, 3312, 3313] {
        admin(port, None).await.query_drop(format!("DROP DATABASE IF EXISTS `{site_db}`")).await.unwrap();
    }
}

/// The HQ sink's stored offsets, summed over the partitions (0 before its first batch): it
/// grows with every batch the sink commits.
pub async fn hq_offset(hq_db: &str) -> i64 {
    let mut c = hq::hq(hq_db).await;
    c.query_first::<Option<i64>, _>("SELECT CAST(SUM(next_offset) AS SIGNED) FROM omrs_sync_offsets").await.unwrap().flatten().unwrap_or(0)
}

/// HQ initialised, the six stages started, and the live workload of `l` running in a task.
pub fn start_with_workload(p: &hq::Pipeline, l: &Live) -> (Vec<Proc>, tokio::task::JoinHandle<Result<omrs_simulate::manifest::Manifest, omrs_simulate::SimError>>) {
    start_with_workload_env(p, l, &[])
}

/// As [`start_with_workload`], with extra environment variables for every process.
pub fn start_with_workload_env(
    p: &hq::Pipeline,
    l: &Live,
    env: &[(String, String)],
) -> (Vec<Proc>, tokio::task::JoinHandle<Result<omrs_simulate::manifest::Manifest, omrs_simulate::SimError>>) {
    p.run(&l.config, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let procs = start_all_env(&l.config, p.dir.path(), env);
    let cfg = l.cfg.clone();
    let args = omrs_simulate::SimulateArgs { no_provision: true, ..l.args.clone() };
    (procs, tokio::spawn(async move { omrs_simulate::run(&cfg, &args).await }))
}

/// Starts a service of `deploy/mariadb` again when dropped, even if the test fails midway.
pub struct ServiceBack(pub &'static str);

impl Drop for ServiceBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(root().join("deploy/mariadb/mariadb-up")).arg(self.0).status();
    }
}

/// An uninterrupted pipeline over the same site changes as a faulted one, to compare with it
/// value for value: it snapshots the sites when started (before the workload, so that it sees
/// every later change through the binlogs as the faulted one does) and runs every stage to the
/// end, one after another, when finished.
pub struct Reference {
    pub p: hq::Pipeline,
    pub config: PathBuf,
    pub hq_db: String,
}

impl Reference {
    pub fn start(site_db: &str) -> Reference {
        let p = hq::Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tref")), database: site_db.to_string() };
        let hq_db = unique("openmrs_hq_ref");
        let config = p.config(&hq_db, &[]);
        p.run(&config, &["topics", "apply"]);
        p.ingest(&config, &["site-a", "site-b", "site-c"], true);
        Reference { p, config, hq_db }
    }

    /// The reference HQ in uuid space, once every site change is through.
    pub async fn finish(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.p.ingest(&self.config, &["site-a", "site-b", "site-c"], true);
        self.p.run(&self.config, &["transform", "--until-idle", "--metrics-port", "0"]);
        self.p.run(&self.config, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
        self.p.run(&self.config, &["sink", "hq-mysql", "--until-idle", "--metrics-port", "0", "--quiet"]);
        hq::hq_dump(&self.hq_db).await
    }
}

/// Rows of the reference HQ that `got` lacks (lost), and rows of `got` the reference lacks
/// (doubled or wrong), over every table, as multisets of rows in uuid space: a row whose value
/// differs counts once in each.
pub fn lost_and_doubled_vs(reference: &std::collections::BTreeMap<String, Vec<String>>, got: &std::collections::BTreeMap<String, Vec<String>>) -> (u64, u64) {
    let mut lost = 0u64;
    let mut doubled = 0u64;
    let empty = Vec::new();
    let tables: std::collections::BTreeSet<&String> = reference.keys().chain(got.keys()).collect();
    for t in tables {
        let mut counts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for r in reference.get(t).unwrap_or(&empty) {
            *counts.entry(r.as_str()).or_default() += 1;
        }
        for r in got.get(t).unwrap_or(&empty) {
            *counts.entry(r.as_str()).or_default() -= 1;
        }
        lost += counts.values().filter(|c| **c > 0).map(|c| *c as u64).sum::<u64>();
        doubled += counts.values().filter(|c| **c < 0).map(|c| c.unsigned_abs()).sum::<u64>();
    }
    (lost, doubled)
}

/// Compares a faulted run's HQ with its reference: prints the figures, panics with the rows that
/// differ, drops the reference's HQ database.
pub async fn assert_as_reference(reference: &Reference, hq_db: &str, what: &str) -> (u64, u64) {
    let want = reference.finish().await;
    let got = hq::hq_dump(hq_db).await;
    let (lost, doubled) = lost_and_doubled_vs(&want, &got);
    eprintln!("{what}: against the uninterrupted reference, lost={lost} doubled={doubled}");
    if (lost, doubled) != (0, 0) {
        hq::assert_same(&want, &got, &format!("HQ after {what} vs the uninterrupted reference"));
    }
    let mut a = admin(hq::HQ_PORT, None).await;
    a.query_drop(format!("DROP DATABASE IF EXISTS `{}`", reference.hq_db)).await.unwrap();
    (lost, doubled)
}
