//! `omrs-stream demo`: the whole product on one machine, from nothing to a verified HQ and lake.
//!
//! Delivery guarantee: the demo is not a stage; it runs the real stages (this binary's
//! `ingest`, `transform`, `sink hq-mysql` and `sink parquet`) as child processes, each with its
//! own exactly-once contract, and proves the result with `verify`. Its exit code is 0 only if
//! `verify` passed.
//!
//! Steps: local services (scripts/dev-up) → a run directory with its own config and topic
//! prefix → topics → sites provisioned from the OpenMRS demo dump, HQ created → agents,
//! transform and sinks started → a live workload at `--rate` for `--duration` seconds (with
//! `--offline` windows in which a site's agent is really stopped) → drain → compaction →
//! verify → summary. `--backlog` writes the workload first with the pipeline stopped and times
//! the catch-up instead (the cold-replay benchmark).

mod procs;
pub mod prom;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mysql_async::prelude::Queryable;
use omrs_core::clock::now_ms;
use omrs_core::config::{Config, TopicsFile};
use omrs_core::metrics as m;

use procs::Procs;
pub use summary::{render, Summary};

/// `omrs-stream demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Clinics to simulate (site-a, site-b, …; one MariaDB server each, ports 3311, 3312, …).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=26))]
    pub sites: u16,
    /// People in the workload plan (the seed site also keeps the dump's 100 demo patients).
    #[arg(long, default_value_t = 300)]
    pub patients: usize,
    /// Fraction of people registered at two or more sites with the same National ID.
    #[arg(long, default_value_t = 0.2)]
    pub dup_fraction: f64,
    /// The simulator's adversarial identity mode, at this rate: National IDs pasted with
    /// Unicode dashes, full-width forms and invisible spaces; near misses (another person's
    /// name and birthdate, a National ID one digit apart) that must not merge; misprinted
    /// cards corrected later; registration dates fixed after the fact.
    #[arg(long, default_value_t = 0.05)]
    pub adversarial: f64,
    /// Seed of the workload: the same seed gives the same people and values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds of live workload (the pipeline runs during it).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Row changes per second across all sites during the live workload.
    #[arg(long, default_value_t = 300.0)]
    pub rate: f64,
    /// SITE:START:SECS: stop SITE's ingest agent START seconds into the workload for SECS
    /// seconds. The clinic keeps writing, so it comes back with a backlog whose events are late
    /// (the other sites' watermark moved on). Repeatable.
    #[arg(long, value_name = "SITE:START:SECS")]
    pub offline: Vec<String>,
    /// Write the whole workload first, as fast as the sites take it, with the pipeline stopped;
    /// then start the pipeline and time how long it takes to catch up (the cold replay).
    #[arg(long, conflicts_with = "offline")]
    pub backlog: bool,
    /// Where runs keep their config, logs, lake, manifest and summary (one directory per run;
    /// `latest` points at the last one).
    #[arg(long, env = "OMRS_DEMO_STATE")]
    pub state_dir: Option<PathBuf>,
    /// Database name of the OpenMRS database at every site (recreated).
    #[arg(long, default_value = "openmrs")]
    pub site_database: String,
    /// Database name of the HQ OpenMRS database (recreated). The `hq` user writes `openmrs_hq*`.
    #[arg(long, default_value = "openmrs_hq")]
    pub hq_database: String,
    /// First metrics port: the transform gets it, the HQ sink +1, the Parquet sink +2, and the
    /// agent of the i-th site +3+i (deploy/prometheus/prometheus.local.yml scrapes these).
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// Also write the summary (with the HQ and site connection URLs and the lake path) as JSON.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Do not run scripts/dev-up: Kafka and the MariaDB servers are already up.
    #[arg(long)]
    pub no_services: bool,
    /// Give up waiting for the pipeline to drain after this many seconds (verify then reports
    /// what is missing).
    #[arg(long, default_value_t = 600)]
    pub drain_timeout: u64,
    /// The OpenMRS demo dump (gzip SQL) the sites and HQ are created from.
    #[arg(long, env = "OMRS_DEMO_DUMP", default_value_os_t = omrs_core::openmrs::default_dump())]
    pub dump: PathBuf,
    /// No progress line (a log line every few seconds instead).
    #[arg(long)]
    pub quiet: bool,
    /// Width in seconds of every dashboard aggregate window in this demo, so that windows close
    /// (final), and late events correct them, while you watch. 0 keeps the production windows
    /// (daily registrations, hourly encounters, monthly active patients, daily obs).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub agg_window: u32,
}

/// SITE:START:SECS, checked against the simulated sites.
#[derive(Debug, Clone)]
struct Window {
    site: String,
    start: f64,
    secs: f64,
    state: WindowState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowState {
    Ahead,
    Down,
    Over,
}

fn parse_window(spec: &str, sites: &[String], duration: f64) -> anyhow::Result<Window> {
    let bad = |why: String| anyhow::anyhow!("--offline {spec}: {why} (expected SITE:START:SECS, e.g. site-b:20:25)");
    let parts: Vec<&str> = spec.split(':').collect();
    if parts.len() != 3 {
        return Err(bad("three fields separated by `:`".into()));
    }
    if !sites.iter().any(|s| s == parts[0]) {
        return Err(bad(format!("`{}` is not one of the demo's sites {sites:?}", parts[0])));
    }
    let start: f64 = parts[1].parse().map_err(|_| bad("START is not a number of seconds".into()))?;
    let secs: f64 = parts[2].parse().map_err(|_| bad("SECS is not a number of seconds".into()))?;
    if start < 0.0 || secs <= 0.0 {
        return Err(bad("START must be >= 0 and SECS > 0".into()));
    }
    if start >= duration {
        return Err(bad(format!("START is not inside the {duration} s workload (--duration)")));
    }
    if secs <= IDLE_TIMEOUT_S as f64 {
        return Err(bad(format!(
            "a site must stay away longer than the transform's idle timeout ({IDLE_TIMEOUT_S} s) for the others' watermark to move on without it"
        )));
    }
    Ok(Window { site: parts[0].to_string(), start, secs, state: WindowState::Ahead })
}

/// The demo's idle timeout: a stopped agent is given up on after this, so its backlog is late.
const IDLE_TIMEOUT_S: u64 = 5;

fn site_names(n: u16) -> Vec<String> {
    (0..n).map(|i| format!("site-{}", (b'a' + i as u8) as char)).collect()
}

/// The run's config: the local services of scripts/dev-up, the run's topic prefix, databases
/// and lake, a short idle timeout and roll interval so a short demo shows everything.
fn config_text(args: &DemoArgs, prefix: &str, lake: &Path, metrics_port: u16) -> String {
    let mut t = format!(
        r#"# Written by `omrs-stream demo` for one run; see omrs-stream.toml for every setting.
[kafka]
bootstrap_servers = "${{OMRS_KAFKA:-127.0.0.1:9092}}"
topic_prefix = "{prefix}"

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#
    );
    let names = site_names(args.sites);
    for (i, name) in names.iter().enumerate() {
        t.push_str(&format!(
            r#"
[[sites]]
name = "{name}"
priority = {priority}
[sites.database]
host = "127.0.0.1"
port = {port}
user = "cdc"
password = "${{OMRS_CDC_PASSWORD:-cdc}}"
database = "{db}"
"#,
            priority = names.len() - i,
            port = 3311 + i,
            db = args.site_database,
        ));
    }
    t.push_str(&format!(
        r#"
[hq.database]
host = "127.0.0.1"
port = 3310
user = "hq"
password = "${{OMRS_HQ_PASSWORD:-hq}}"
database = "{hq}"

[[identity.identifiers]]
name = "National ID"
identifier_type_uuid = "{nid}"
normalize = ["fold", "trim", "strip_separators", "upper"]

[ingest]
scrub = ["users.password", "users.salt", "users.secret_question", "users.secret_answer"]
snapshot_chunk_rows = 5000
heartbeat_interval_ms = 1000

[transform]
out_of_orderness_ms = 2000
idle_timeout_s = {IDLE_TIMEOUT_S}
max_buffered_events = 200000

{aggregates}
[sinks.hq_mysql]
fk_wait_timeout_s = 600
max_pending_rows = 100000
batch_max_rows = 5000
batch_max_ms = 200

[sinks.parquet]
path = "{lake}"
roll_max_bytes = 134217728
roll_interval_ms = 2000
compact_interval_s = 30
row_group_rows = 131072
"#,
        hq = args.hq_database,
        aggregates = if args.agg_window == 0 {
            String::new()
        } else {
            let w = args.agg_window;
            format!(
                "[aggregates]\nregistrations_window = \"{w}s\"\nencounters_window = \"{w}s\"\nactive_patients_window = \"{w}s\"\nobs_window = \"{w}s\"\nprovisional_interval_ms = 1000\n"
            )
        },
        nid = omrs_simulate::NATIONAL_ID_TYPE_UUID,
        lake = lake.display(),
    ));
    t
}

/// `scripts/<name>`, from the working directory or from the checkout the binary was built in.
fn find_script(name: &str) -> Option<PathBuf> {
    let mut candidates = vec![Path::new("scripts").join(name)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            candidates.push(dir.join("scripts").join(name));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn find_dev_up() -> Option<PathBuf> {
    find_script("dev-up")
}

/// The demo dump is not at `missing`: `scripts/fetch-demo-dump` puts it in place (a local copy,
/// or the pinned download) and says where.
fn fetch_dump(missing: &Path) -> anyhow::Result<PathBuf> {
    let Some(script) = find_script("fetch-demo-dump") else { bail!("{}", omrs_core::openmrs::missing_dump(missing)) };
    eprintln!("omrs-stream demo: the OpenMRS demo dump is not at {}; fetching it ({})", missing.display(), script.display());
    let out = std::process::Command::new(&script).arg("--quiet").stderr(std::process::Stdio::inherit()).output().with_context(|| format!("running {}", script.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.is_file() {
        bail!("{}", omrs_core::openmrs::missing_dump(missing));
    }
    Ok(path)
}

/// A counter read from a process that may restart: its total across restarts.
#[derive(Debug, Default, Clone, Copy)]
struct Carry {
    base: f64,
    last: f64,
}

impl Carry {
    fn see(&mut self, v: f64) {
        if v < self.last {
            self.base += self.last;
        }
        self.last = v;
    }
    fn total(&self) -> f64 {
        self.base + self.last
    }
}

/// What the demo has seen of the stages so far.
#[derive(Default)]
struct Board {
    transform: Vec<prom::Sample>,
    hq: Vec<prom::Sample>,
    parquet: Vec<prom::Sample>,
    captured: BTreeMap<String, Carry>,
    max_delay_ms: BTreeMap<String, i64>,
}

impl Board {
    async fn scrape(&mut self, procs: &Procs, sites: &[String], offline: &[Window]) {
        if let Some(s) = procs.port("transform").map(prom::scrape) {
            if let Some(s) = s.await {
                let now = now_ms();
                for site in sites {
                    let wm = prom::sum(&s, m::SITE_WATERMARK, &[("site", site)]);
                    if wm > 0.0 {
                        let d = self.max_delay_ms.entry(site.clone()).or_insert(0);
                        *d = (*d).max(now - wm as i64);
                    }
                }
                self.transform = s;
            }
        }
        if let Some(s) = procs.port("sink-hq-mysql").map(prom::scrape) {
            if let Some(s) = s.await {
                self.hq = s;
            }
        }
        if let Some(s) = procs.port("sink-parquet").map(prom::scrape) {
            if let Some(s) = s.await {
                self.parquet = s;
            }
        }
        for site in sites {
            if offline.iter().any(|w| &w.site == site && w.state == WindowState::Down) {
                continue;
            }
            if let Some(port) = procs.port(&format!("ingest-{site}")) {
                if let Some(s) = prom::scrape(port).await {
                    let v = prom::sum(&s, m::EVENTS_OUT, &[("stage", "ingest")]) - prom::sum(&s, m::EVENTS_OUT, &[("stage", "ingest"), ("op", "heartbeat")]);
                    self.captured.entry(site.clone()).or_default().see(v);
                }
            }
        }
    }

    fn captured(&self) -> f64 {
        self.captured.values().map(Carry::total).sum()
    }

    fn transform_out(&self) -> f64 {
        prom::sum(&self.transform, m::EVENTS_OUT, &[("stage", "transform")])
    }

    fn hq_rows(&self) -> f64 {
        prom::sum(&self.hq, m::HQ_ROWS_APPLIED, &[])
    }

    fn lake_rows(&self) -> f64 {
        prom::sum(&self.parquet, m::LAKE_ROWS_WRITTEN, &[])
    }

    fn line(&self) -> String {
        format!(
            "captured {} · transform {} · HQ {} · lake {}",
            fmt_n(self.captured()),
            fmt_n(self.transform_out()),
            fmt_n(self.hq_rows()),
            fmt_n(self.lake_rows())
        )
    }
}

pub fn fmt_n(v: f64) -> String {
    let s = if v >= 0.5 { format!("{v:.0}") } else { "0".into() };
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The progress line: a spinner on a terminal, a log line every 5 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_log: Instant,
    started: Instant,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        });
        Progress { bar, last_log: Instant::now() - Duration::from_secs(60), started: Instant::now() }
    }

    fn set(&mut self, msg: String) {
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => {
                if self.last_log.elapsed() >= Duration::from_secs(5) {
                    self.last_log = Instant::now();
                    eprintln!("[demo {:>4}s] {msg}", self.started.elapsed().as_secs());
                }
            }
        }
    }

    /// A step that is done, printed above the progress line.
    fn step(&mut self, msg: impl AsRef<str>) {
        let line = format!("[demo {:>4}s] {}", self.started.elapsed().as_secs(), msg.as_ref());
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A task aborted when dropped (Ctrl-C drops the whole demo future).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the demo. `topics` is the topics file (topics.toml).
pub async fn run(args: &DemoArgs, topics_file: &Path) -> anyhow::Result<Summary> {
    // Everything that can be wrong with the arguments, before anything starts.
    let sites = site_names(args.sites);
    if !(0.0..=1.0).contains(&args.dup_fraction) {
        bail!("--dup-fraction {} must be between 0 and 1", args.dup_fraction);
    }
    if !(0.0..=1.0).contains(&args.adversarial) {
        bail!("--adversarial {} must be between 0 and 1", args.adversarial);
    }
    if args.rate <= 0.0 || args.duration <= 0.0 {
        bail!("--rate and --duration must be positive");
    }
    if args.agg_window != 0 && 86_400 % args.agg_window != 0 {
        bail!("--agg-window {}: the width must divide a day (10, 15, 30, 60, …), or be 0 for the production windows", args.agg_window);
    }
    let mut windows: Vec<Window> = args.offline.iter().map(|o| parse_window(o, &sites, args.duration)).collect::<Result<_, _>>()?;
    // Only the default place is filled by fetching: a dump named by --dump or OMRS_DEMO_DUMP that
    // is not there is a mistake to report.
    let default_place = std::env::var_os("OMRS_DEMO_DUMP").is_none() && args.dump == omrs_core::openmrs::default_dump();
    let dump = match (args.dump.is_file(), default_place) {
        (true, _) => args.dump.clone(),
        (false, true) => fetch_dump(&args.dump)?,
        (false, false) => bail!("{}", omrs_core::openmrs::missing_dump(&args.dump)),
    };
    let dump = std::fs::canonicalize(&dump).with_context(|| format!("resolving {}", dump.display()))?;
    let topics_file = std::fs::canonicalize(topics_file).with_context(|| format!("the topics file {} (run the demo from the omrs-stream checkout, or pass --topics)", topics_file.display()))?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let state_root = args.state_dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into())).join("demo")
    });
    let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let run_dir = state_root.join(&run_id);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let run_dir = std::fs::canonicalize(&run_dir).context("resolving the run directory")?;
    let logs = run_dir.join("logs");
    let latest = state_root.join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&run_id, &latest);
    let lake = run_dir.join("lake");
    let prefix = format!("demo-{run_id}.");
    let config_path = run_dir.join("omrs-stream.toml");
    std::fs::write(&config_path, config_text(args, &prefix, &lake, args.metrics_port)).with_context(|| format!("writing {}", config_path.display()))?;
    let cfg = Config::load(&config_path).context("the demo's generated config")?;
    let manifest_path = run_dir.join("manifest.json");
    let t0 = Instant::now();
    let mut progress = Progress::new(args.quiet);
    progress.step(format!("run {run_id}: {} sites, {} people, {:.0} % duplicates, seed {}; everything in {}", args.sites, args.patients, args.dup_fraction * 100.0, args.seed, run_dir.display()));

    // 1. Services.
    if !args.no_services {
        let script = find_dev_up().context("scripts/dev-up not found: run the demo from the omrs-stream checkout, or start Kafka and MariaDB yourself and pass --no-services")?;
        progress.set(format!("starting Kafka and MariaDB (hq, {}) with {}", sites.join(", "), script.display()));
        let log = std::fs::File::create(logs.join("services.log")).context("creating services.log")?;
        let status = tokio::process::Command::new(&script)
            .arg("hq")
            .args(&sites)
            .stdout(log.try_clone().context("log handle")?)
            .stderr(log)
            .status()
            .await
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status}); the end of {}:\n{}", script.display(), logs.join("services.log").display(), procs::tail(&logs.join("services.log"), 15));
        }
        progress.step("services up: Kafka 127.0.0.1:9092, MariaDB hq 3310 and one server per site");
    }

    // 2. Topics.
    progress.set("creating topics".into());
    let tf = TopicsFile::load(&topics_file)?;
    let want = tf.resolve(&cfg.site_names(), &cfg.kafka.topic_prefix);
    let report = omrs_core::topics::apply(&cfg.kafka, &want).await.context("creating the demo's topics")?;
    progress.step(format!("topics: {} created with prefix {prefix}", report.created.len()));

    // 3. Sites and HQ, side by side.
    progress.set(format!("provisioning {} sites from the OpenMRS demo dump and creating HQ {}", sites.len(), args.hq_database));
    let mut procs = Procs::new(exe, config_path.clone(), topics_file.clone(), logs.clone());
    let sim = omrs_simulate::SimulateArgs {
        sites: sites.len(),
        patients: args.patients,
        dup_fraction: args.dup_fraction,
        seed: args.seed,
        adversarial: args.adversarial,
        manifest: manifest_path.clone(),
        database: Some(args.site_database.clone()),
        dump: dump.clone(),
        quiet: true,
        ..Default::default()
    };
    let provision_args = omrs_simulate::SimulateArgs { provision_only: true, ..sim.clone() };
    let provision = omrs_simulate::run(&cfg, &provision_args);
    let init_args: Vec<String> = vec!["sink".into(), "hq-mysql".into(), "--init".into(), "--force".into(), "--dump".into(), dump.display().to_string()];
    let init = procs.run_to_end("sink-hq-mysql-init", &init_args);
    let (p, i) = tokio::join!(provision, init);
    p.context("provisioning the sites")?;
    i.context("creating the HQ database")?;
    progress.step(format!("sites provisioned ({}); HQ {} created", sites.iter().map(|s| format!("{s}/{}", args.site_database)).collect::<Vec<_>>().join(", "), args.hq_database));

    // 4. The workload first, in backlog mode.
    let mut sim_rows = 0u64;
    let mut t_end_ms = 0;
    let start_agents_etc = |procs: &mut Procs| -> anyhow::Result<()> {
        for site in &sites {
            start_agent(procs, &sites, site, args.metrics_port)?;
        }
        procs.spawn("transform", &["transform".into(), "--metrics-port".into(), args.metrics_port.to_string()], Some(args.metrics_port))?;
        let p = args.metrics_port + 1;
        procs.spawn("sink-hq-mysql", &["sink".into(), "hq-mysql".into(), "--quiet".into(), "--metrics-port".into(), p.to_string()], Some(p))?;
        let p = args.metrics_port + 2;
        procs.spawn("sink-parquet", &["sink".into(), "parquet".into(), "--quiet".into(), "--metrics-port".into(), p.to_string()], Some(p))?;
        Ok(())
    };
    let mut board = Board::default();
    if args.backlog {
        progress.set(format!("writing the backlog: {} people at {} sites, as fast as they take it (pipeline stopped)", args.patients, sites.len()));
        let sim_task = Task(tokio::spawn({
            let cfg = cfg.clone();
            let sim = omrs_simulate::SimulateArgs { no_provision: true, burst: true, ..sim.clone() };
            async move { omrs_simulate::run(&cfg, &sim).await }
        }));
        let manifest = wait_sim(sim_task, &mut progress).await?;
        sim_rows = manifest.row_changes;
        t_end_ms = now_ms();
        progress.step(format!("backlog written: {} row changes in {:.1} s", fmt_n(sim_rows as f64), manifest.write_seconds));
    }

    // 5. The pipeline.
    let mut hq_conn = mysql_async::Conn::new(omrs_sinks::mysql_opts(&cfg.hq.database)).await.context("connecting to HQ")?;
    let t_pipeline = Instant::now();
    start_agents_etc(&mut procs)?;
    progress.step(format!(
        "pipeline started: {} ingest agents, transform, HQ MySQL sink, Parquet sink (logs in {})",
        sites.len(),
        logs.display()
    ));

    // 6. The live workload, with offline windows, once every site's snapshot is through (so the
    // latency figures are those of live changes).
    let mut latency_base: Vec<prom::Sample> = Vec::new();
    if !args.backlog {
        let since = now_ms();
        let deadline = Instant::now() + Duration::from_secs(args.drain_timeout);
        if let Err(late_sites) = until_released(&mut procs, &mut board, &sites, &windows, since, deadline, &mut progress, "snapshots").await? {
            bail!("the snapshots did not come through within {} s (sites behind: {late_sites:?}); see the logs in {}", args.drain_timeout, logs.display());
        }
        // The HQ sink through the snapshot too, so the latency figures start from live changes.
        loop {
            procs.check()?;
            let lags = omrs_sinks::verify::stage_lags(&cfg, &mut hq_conn, None).await?;
            if lags.iter().any(|l| l.stage == "hq_mysql" && l.messages == Some(0)) || Instant::now() >= deadline {
                break;
            }
            board.scrape(&procs, &sites, &windows).await;
            progress.set(format!("snapshots: {} · waiting for the HQ sink", board.line()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        board.scrape(&procs, &sites, &windows).await;
        latency_base = board.hq.clone();
        progress.step(format!("snapshots through: {} events captured; the live workload starts ({:.0} row changes/s for {:.0} s)", fmt_n(board.captured()), args.rate, args.duration));
        let sim_task = Task(tokio::spawn({
            let cfg = cfg.clone();
            let sim = omrs_simulate::SimulateArgs { no_provision: true, rate: Some(args.rate), duration: Some(args.duration), offline: args.offline.clone(), ..sim.clone() };
            async move { omrs_simulate::run(&cfg, &sim).await }
        }));
        let t_work = Instant::now();
        let mut sim_task = Some(sim_task);
        loop {
            procs.check()?;
            let elapsed = t_work.elapsed().as_secs_f64();
            if windows.iter().any(|w| w.state == WindowState::Ahead && elapsed >= w.start) {
                // The agents' last counts before one of them stops.
                board.scrape(&procs, &sites, &windows).await;
            }
            for w in windows.iter_mut() {
                if w.state == WindowState::Ahead && elapsed >= w.start {
                    procs.stop(&format!("ingest-{}", w.site), Duration::from_secs(10)).await;
                    w.state = WindowState::Down;
                    progress.step(format!("{} offline: its ingest agent is stopped for {:.0} s while the clinic keeps writing", w.site, w.secs));
                } else if w.state == WindowState::Down && elapsed >= w.start + w.secs {
                    start_agent(&mut procs, &sites, &w.site, args.metrics_port)?;
                    w.state = WindowState::Over;
                    progress.step(format!("{} back online: its agent reads the backlog", w.site));
                }
            }
            if sim_task.as_ref().is_some_and(|t| t.0.is_finished()) {
                let t = sim_task.take().context("simulator task")?;
                let manifest = wait_sim(t, &mut progress).await?;
                sim_rows = manifest.row_changes;
                t_end_ms = now_ms();
                break;
            }
            board.scrape(&procs, &sites, &windows).await;
            let offline: Vec<String> = windows
                .iter()
                .filter(|w| w.state == WindowState::Down)
                .map(|w| format!("{} OFFLINE {:.0} s left", w.site, (w.start + w.secs - elapsed).max(0.0)))
                .collect();
            let written = prom::sum(&prom::parse(&m::metrics().render()), m::SIMULATED_ROWS, &[]);
            progress.set(format!(
                "live {:.0}/{:.0} s · clinics wrote {} · {}{}{}",
                elapsed.min(args.duration),
                args.duration,
                fmt_n(written),
                board.line(),
                if offline.is_empty() { "" } else { " · " },
                offline.join(", ")
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // A window that outlasted the workload ends now, so the drain has every site.
        for w in windows.iter_mut().filter(|w| w.state != WindowState::Over) {
            if w.state == WindowState::Down {
                start_agent(&mut procs, &sites, &w.site, args.metrics_port)?;
                progress.step(format!("{} back online at the end of the workload", w.site));
            }
            w.state = WindowState::Over;
        }
        progress.step(format!("workload done: {} row changes at {} sites", fmt_n(sim_rows as f64), sites.len()));
    }

    // 7. Drain: every site caught up past the end of the workload and released by the
    // transform; then the agents stop and the rest flows out.
    let deadline = Instant::now() + Duration::from_secs(args.drain_timeout);
    let mut drained = true;
    let mut problems: Vec<String> = Vec::new();
    if let Err(late_sites) = until_released(&mut procs, &mut board, &sites, &windows, t_end_ms, deadline, &mut progress, "draining").await? {
        drained = false;
        problems.push(format!("the pipeline did not drain within {} s (sites behind: {late_sites:?})", args.drain_timeout));
    }
    let endpoints: Vec<(String, String)> = procs
        .running
        .iter()
        .filter(|p| !p.name.starts_with("ingest-"))
        .filter_map(|p| p.port.map(|port| (p.name.clone(), format!("http://127.0.0.1:{port}/metrics"))))
        .chain(sites.iter().enumerate().map(|(i, s)| (format!("ingest-{s}"), format!("http://127.0.0.1:{}/metrics", args.metrics_port + 3 + i as u16))))
        .collect();
    // The stages stop in pipeline order, each once its input is consumed to the end, so nothing
    // new reaches a topic after its reader was found at the end of it: the agents; the
    // transform, at the end of the site topics (its last counts scraped first); then the sinks,
    // at the end of omrs.hq.changes with nothing pending at HQ.
    procs.stop_all("ingest-", Duration::from_secs(10)).await;
    let mut lags = Vec::new();
    let mut transform_running = true;
    while drained {
        procs.check()?;
        lags = omrs_sinks::verify::stage_lags(&cfg, &mut hq_conn, Some(&lake)).await?;
        let pending: i64 = hq_conn.query_first("SELECT COUNT(*) FROM omrs_sync_pending").await.context("counting pending rows at HQ")?.unwrap_or(0);
        board.scrape(&procs, &sites, &windows).await;
        if transform_running && lags.iter().filter(|l| l.stage == "transform").all(|l| l.messages == Some(0)) {
            procs.stop("transform", Duration::from_secs(15)).await;
            transform_running = false;
            continue;
        }
        let busy: Vec<String> = lags.iter().filter(|l| l.messages != Some(0)).map(|l| format!("{} {}", l.stage, l.messages.map(|m| m.to_string()).unwrap_or("-".into()))).collect();
        if !transform_running && busy.is_empty() && pending == 0 {
            break;
        }
        if Instant::now() >= deadline {
            drained = false;
            problems.push(format!("the sinks did not drain within {} s ({} pending at HQ; behind: {busy:?})", args.drain_timeout, pending));
            break;
        }
        progress.set(format!("draining the sinks: {} · behind: {} · {pending} pending at HQ", board.line(), busy.join(", ")));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pipeline_secs = t_pipeline.elapsed().as_secs_f64();
    board.scrape(&procs, &sites, &windows).await;
    procs.stop_all("", Duration::from_secs(15)).await;
    progress.step(format!("drained in {:.1} s after the workload{}", (now_ms() - t_end_ms) as f64 / 1000.0, if drained { "" } else { " (NOT complete)" }));

    // 8. Compaction and verify.
    progress.set("compacting the lake (current tables and views)".into());
    procs.run_to_end("sink-parquet-compact", &["sink".into(), "parquet".into(), "--compact".into()]).await?;
    progress.set("verifying sites against HQ against the lake".into());
    let verify = omrs_sinks::verify::run(
        &cfg,
        &omrs_sinks::verify::VerifyArgs { manifest: Some(manifest_path.clone()), json: false, lake: Some(lake.clone()), no_lake: false, no_values: false, samples: 5 },
    )
    .await
    .context("verify")?;
    progress.finish();

    // 9. The summary.
    let facts = summary::Facts {
        run_id,
        run_dir,
        config: config_path,
        logs,
        lake,
        manifest: manifest_path,
        prefix,
        sites: sites.clone(),
        windows: windows.iter().map(|w| (w.site.clone(), w.start, w.secs)).collect(),
        backlog: args.backlog,
        sim_rows,
        pipeline_secs,
        total_secs: t0.elapsed().as_secs_f64(),
        drained,
        problems,
        max_delay_ms: board.max_delay_ms.clone(),
        transform: board.transform.clone(),
        hq: board.hq.clone(),
        parquet: board.parquet.clone(),
        lags,
        endpoints,
        latency_base,
    };
    summary::build(&cfg, facts, &mut hq_conn, verify).await
}

/// Sites not yet caught up past `t_ms` (site watermark behind it, or idle), and whether the
/// transform's global watermark has passed it (every event up to `t_ms` released).
fn behind(board: &Board, sites: &[String], t_ms: i64) -> (Vec<String>, bool) {
    let t = &board.transform;
    let behind: Vec<String> = sites
        .iter()
        .filter(|s| prom::sum(t, m::SITE_WATERMARK, &[("site", s)]) < t_ms as f64 || prom::sum(t, m::SITE_IDLE, &[("site", s)]) > 0.0)
        .cloned()
        .collect();
    (behind, prom::sum(t, m::GLOBAL_WATERMARK, &[]) >= t_ms as f64)
}

/// Waits until every site is caught up past `t_ms` and the transform has released everything
/// up to it. `Err(sites behind)` at the deadline.
#[allow(clippy::too_many_arguments)]
async fn until_released(
    procs: &mut Procs,
    board: &mut Board,
    sites: &[String],
    windows: &[Window],
    t_ms: i64,
    deadline: Instant,
    progress: &mut Progress,
    what: &str,
) -> anyhow::Result<Result<(), Vec<String>>> {
    loop {
        procs.check()?;
        board.scrape(procs, sites, windows).await;
        let (late_sites, released) = behind(board, sites, t_ms);
        if late_sites.is_empty() && released {
            return Ok(Ok(()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(late_sites));
        }
        progress.set(format!(
            "{what}: {} · waiting for {}",
            board.line(),
            if late_sites.is_empty() { "the transform to release the last events".to_string() } else { format!("{} to catch up", late_sites.join(", ")) }
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts (or restarts) one site's agent on its metrics port.
fn start_agent(procs: &mut Procs, sites: &[String], site: &str, base: u16) -> anyhow::Result<()> {
    let i = sites.iter().position(|s| s == site).unwrap_or(0);
    let port = base + 3 + i as u16;
    procs.spawn(&format!("ingest-{site}"), &["ingest".into(), "--site".into(), site.to_string(), "--quiet".into(), "--metrics-port".into(), port.to_string()], Some(port))
}

async fn wait_sim(task: Task<Result<omrs_simulate::manifest::Manifest, omrs_simulate::SimError>>, progress: &mut Progress) -> anyhow::Result<omrs_simulate::manifest::Manifest> {
    let mut task = task;
    loop {
        if task.0.is_finished() {
            let r = (&mut task.0).await.context("the simulator task")?;
            return r.context("the workload");
        }
        let written = prom::sum(&prom::parse(&m::metrics().render()), m::SIMULATED_ROWS, &[]);
        progress.set(format!("clinics wrote {} row changes", fmt_n(written)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_checked() {
        let sites = site_names(3);
        assert_eq!(sites, ["site-a", "site-b", "site-c"]);
        let w = parse_window("site-b:20:25", &sites, 60.0).unwrap();
        assert_eq!((w.site.as_str(), w.start, w.secs), ("site-b", 20.0, 25.0));
        for (bad, why) in [
            ("site-x:1:10", "not one of"),
            ("site-b:1", "three fields"),
            ("site-b:70:10", "not inside"),
            ("site-b:1:3", "idle timeout"),
            ("site-b:a:10", "START"),
        ] {
            let e = parse_window(bad, &sites, 60.0).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let args = <DemoArgs as clap::FromArgMatches>::from_arg_matches(
            &<DemoArgs as clap::Args>::augment_args(clap::Command::new("demo")).get_matches_from(["demo", "--sites", "12"]),
        )
        .unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, config_text(&args, "demo-x.", Path::new("/tmp/lake"), 9470)).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.sites.len(), 12);
        assert_eq!(cfg.sites[11].name, "site-l");
        assert_eq!(cfg.sites[11].database.port, 3322);
        assert_eq!(cfg.transform.idle_timeout_s, IDLE_TIMEOUT_S);
    }

    #[test]
    fn thousands() {
        assert_eq!(fmt_n(1234567.0), "1,234,567");
        assert_eq!(fmt_n(12.0), "12");
        assert_eq!(fmt_n(0.0), "0");
    }
}
