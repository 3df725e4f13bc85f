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

mod probe;
mod procs;
pub use omrs_core::prom;
mod steps;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use omrs_core::clock::now_ms;
use omrs_core::metrics as m;

use procs::Procs;
pub use steps::run;
pub use summary::{render, Summary};

/// `omrs-stream demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Clinics to simulate (site-a … site-z, then site-aa, site-ab, …; one MariaDB server each,
    /// ports 3311, 3312, … for the first 19, 3419, 3420, … from site-t on). Above 5, the agents
    /// share one `omrs-stream ingest` process.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=MAX_SITES))]
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
    /// Clock trouble at the clinics: the second site's clock runs 10 minutes behind, the
    /// third's jumps a day ahead for a stretch of its work and back (no other site's changes
    /// may wait for either).
    #[arg(long)]
    pub clock_trouble: bool,
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
    /// With --backlog: run the pipeline without the HQ sink until the lake holds everything
    /// (the lake's own replay rate), then start the HQ sink and let it catch up; verify as
    /// always. The summary gives both times.
    #[arg(long, requires = "backlog")]
    pub lake_first: bool,
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
    /// Change one setting of the run's config, e.g. `--set transform.batch_max_ms=50` or
    /// `--set sinks.hq_mysql.batch_max_ms=100` (the VALUE as TOML writes it; repeatable). The
    /// run's config is checked like any other before anything starts.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
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

/// The most clinics a demo simulates (issue #24's 50-site run).
const MAX_SITES: i64 = 50;

/// The demo's clinics: site-a … site-z, then site-aa, site-ab, … (two letters from the 27th).
fn site_names(n: u16) -> Vec<String> {
    let letter = |i: usize| (b'a' + (i % 26) as u8) as char;
    (0..n as usize).map(|i| if i < 26 { format!("site-{}", letter(i)) } else { format!("site-{}{}", letter(i / 26 - 1), letter(i)) }).collect()
}

/// The MariaDB port of the i-th clinic: 3311 + i for site-a … site-s (deploy/mariadb/mariadb-up's
/// own choice for them), 3400 + i from site-t on, clear of site-minimal's 3330 (the MySQL-style
/// test server) and of instances mariadb-up numbers from 3341.
fn site_port(i: usize) -> u16 {
    if i < 19 {
        3311 + i as u16
    } else {
        3400 + i as u16
    }
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
            port = site_port(i),
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
max_clock_ahead_s = 300

{aggregates}
[sinks.hq_mysql]
fk_wait_timeout_s = 600
max_pending_rows = 100000
batch_max_rows = 5000
batch_max_ms = 100

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

/// The run's config text with each `--set SECTION.KEY=VALUE` applied: the key's line in its
/// `[SECTION]` replaced, or added under the section's header.
fn apply_sets(text: &str, sets: &[String]) -> anyhow::Result<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for set in sets {
        let bad = || anyhow::anyhow!("--set {set}: expected SECTION.KEY=VALUE, e.g. transform.batch_max_ms=50");
        let (path, value) = set.split_once('=').ok_or_else(bad)?;
        let (section, key) = path.trim().rsplit_once('.').ok_or_else(bad)?;
        let header = format!("[{section}]");
        let start = lines.iter().position(|l| l.trim() == header).ok_or_else(|| {
            anyhow::anyhow!("--set {set}: the demo's config has no {header} (it has kafka, metrics, hq.database, ingest, transform, sinks.hq_mysql, sinks.parquet; clinics are not set this way)")
        })?;
        let end = lines[start + 1..].iter().position(|l| l.trim_start().starts_with('[')).map_or(lines.len(), |i| start + 1 + i);
        let line = format!("{key} = {}", value.trim());
        match lines[start + 1..end].iter().position(|l| l.split('=').next().is_some_and(|k| k.trim() == key)) {
            Some(i) => lines[start + 1 + i] = line,
            None => lines.insert(start + 1, line),
        }
    }
    Ok(lines.join("\n") + "\n")
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
            // Its own agent's process, or the one the grouped sites share.
            if let Some(port) = procs.port(&format!("ingest-{site}")).or_else(|| procs.port(GROUP_PROC)) {
                if let Some(s) = prom::scrape(port).await {
                    let v = prom::sum(&s, m::EVENTS_OUT, &[("stage", "ingest"), ("site", site)])
                        - prom::sum(&s, m::EVENTS_OUT, &[("stage", "ingest"), ("site", site), ("op", "heartbeat")]);
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

/// The process that runs the agents of the grouped sites (`steps::GROUP_ABOVE`).
pub(crate) const GROUP_PROC: &str = "ingest-group";

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
    use omrs_core::config::Config;

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
    fn fifty_clinics_have_names_and_ports_of_their_own() {
        let names = site_names(50);
        assert_eq!((names[0].as_str(), names[25].as_str(), names[26].as_str(), names[27].as_str(), names[49].as_str()), ("site-a", "site-z", "site-aa", "site-ab", "site-ax"));
        let ports: Vec<u16> = (0..50).map(site_port).collect();
        assert_eq!((ports[0], ports[18], ports[19], ports[49]), (3311, 3329, 3419, 3449));
        assert_eq!(names.iter().collect::<std::collections::BTreeSet<_>>().len(), 50);
        assert_eq!(ports.iter().collect::<std::collections::BTreeSet<_>>().len(), 50);
        assert!(!ports.contains(&3310) && !ports.contains(&3330), "HQ's and site-minimal's ports stay free");
        // Every name is one deploy/mariadb/mariadb-up takes.
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')));
        let err = <DemoArgs as clap::Args>::augment_args(clap::Command::new("demo")).try_get_matches_from(["demo", "--sites", "51"]).unwrap_err();
        assert!(err.to_string().contains("51"), "{err}");
    }

    #[test]
    fn a_set_replaces_or_adds_a_key_in_its_section() {
        let text = "[transform]\nout_of_orderness_ms = 2000\n\n[sinks.hq_mysql]\nbatch_max_ms = 200\n";
        let sets = ["sinks.hq_mysql.batch_max_ms=100".to_string(), "transform.batch_max_ms = 50".to_string()];
        let got = apply_sets(text, &sets).unwrap();
        assert_eq!(got, "[transform]\nbatch_max_ms = 50\nout_of_orderness_ms = 2000\n\n[sinks.hq_mysql]\nbatch_max_ms = 100\n");
        let err = apply_sets(text, &["nosuch.key=1".to_string()]).unwrap_err().to_string();
        assert!(err.contains("has no [nosuch]"), "{err}");
        assert!(apply_sets(text, &["transform".to_string()]).unwrap_err().to_string().contains("SECTION.KEY=VALUE"));
    }

    #[test]
    fn thousands() {
        assert_eq!(fmt_n(1234567.0), "1,234,567");
        assert_eq!(fmt_n(12.0), "12");
        assert_eq!(fmt_n(0.0), "0");
    }
}
