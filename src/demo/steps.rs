//! The demo's steps, in order (see the module docs of `super`): [`Demo::prepare`] (arguments,
//! the dump, the run directory and config), services, topics, sites and HQ, the backlog or the
//! live workload with its offline windows, the drain, compaction and verify.
//!
//! Delivery guarantee: none of its own (see `super`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mysql_async::prelude::Queryable;
use omrs_core::clock::now_ms;
use omrs_core::config::{Config, TopicsFile};
use omrs_core::metrics as m;

use super::procs::{self, Procs};
use super::{GROUP_PROC, fetch_dump, find_dev_up, fmt_n, parse_window, prom, site_names, start_agent, summary, until_released, wait_sim, Board, DemoArgs, Progress, Summary, Task, Window, WindowState};

/// Runs the demo. `topics` is the topics file (topics.toml).
pub async fn run(args: &DemoArgs, topics_file: &Path) -> anyhow::Result<Summary> {
    let t0 = Instant::now();
    let mut d = Demo::prepare(args, topics_file)?;
    d.services().await?;
    d.topics().await?;
    d.sites_and_hq().await?;
    let mut work = Work::default();
    if args.backlog {
        work = d.backlog().await?;
    }
    let mut hq_conn = mysql_async::Conn::new(omrs_sinks::mysql_opts(&d.cfg.hq.database)).await.context("connecting to HQ")?;
    let t_pipeline = Instant::now();
    let machine_before = procs::machine_ticks();
    let servers = procs::Servers::find(&d.server_ports());
    d.start_pipeline()?;
    let mut latency_base: (Vec<prom::Sample>, Vec<prom::Sample>) = Default::default();
    if !args.backlog {
        latency_base = d.through_snapshots(&mut hq_conn).await?;
        work = d.live().await?;
    }
    let (drain, lake_secs, lake_cpu) = if args.lake_first {
        let (drain, secs, cpu) = d.drain_lake_first(&mut hq_conn, work.t_end_ms, t_pipeline, &servers).await?;
        (drain, Some(secs), Some(cpu))
    } else {
        (d.drain(&mut hq_conn, work.t_end_ms, true).await?, None, None)
    };
    let drain_secs = (now_ms() - work.t_end_ms) as f64 / 1000.0;
    let pipeline_secs = t_pipeline.elapsed().as_secs_f64();
    let machine_busy = machine_before.zip(procs::machine_ticks()).map(|((b0, t0), (b1, t1))| (b1 - b0) as f64 / (t1 - t0).max(1) as f64);
    let servers_cpu = servers.used();
    d.board.scrape(&d.procs, &d.sites, &d.windows).await;
    d.procs.stop_all("", Duration::from_secs(15)).await;
    let peak_rss_mb = d.procs.peak_rss_mb();
    let mut cpu_seconds = d.procs.cpu_seconds();
    cpu_seconds.extend(servers_cpu);
    d.progress.step(format!("drained in {drain_secs:.1} s after the workload{}", if drain.drained { "" } else { " (NOT complete)" }));

    // Compaction and verify.
    d.progress.set("compacting the lake (current tables and views)".into());
    d.procs.run_to_end("sink-parquet-compact", &["sink".into(), "parquet".into(), "--compact".into()]).await?;
    d.progress.set("verifying sites against HQ against the lake".into());
    let verify = omrs_sinks::verify::run(
        &d.cfg,
        &omrs_sinks::verify::VerifyArgs { manifest: Some(d.paths.manifest.clone()), json: false, lake: Some(d.paths.lake.clone()), no_lake: false, no_values: false, samples: 5, site: None },
    )
    .await
    .context("verify")?;
    d.progress.finish();

    let p = d.paths;
    let facts = summary::Facts {
        run_id: p.run_id,
        run_dir: p.run_dir,
        config: p.config,
        logs: p.logs,
        lake: p.lake,
        manifest: p.manifest,
        prefix: p.prefix,
        sites: d.sites.clone(),
        windows: d.windows.iter().map(|w| (w.site.clone(), w.start, w.secs)).collect(),
        backlog: args.backlog,
        sim_rows: work.sim_rows,
        pipeline_secs,
        lake_secs,
        total_secs: t0.elapsed().as_secs_f64(),
        drained: drain.drained,
        problems: drain.problems,
        max_delay_ms: d.board.max_delay_ms.clone(),
        transform: d.board.transform.clone(),
        hq: d.board.hq.clone(),
        parquet: d.board.parquet.clone(),
        lags: drain.lags,
        endpoints: drain.endpoints,
        latency_base,
        probe: work.probe,
        peak_rss_mb,
        cpu_seconds,
        lake_cpu,
        machine_busy,
        drain_secs,
    };
    summary::build(&d.cfg, facts, &mut hq_conn, verify).await
}

/// Where a run keeps its things.
struct Paths {
    run_id: String,
    run_dir: PathBuf,
    logs: PathBuf,
    lake: PathBuf,
    config: PathBuf,
    manifest: PathBuf,
    prefix: String,
}

/// What the workload wrote, and when it ended.
#[derive(Default)]
struct Work {
    sim_rows: u64,
    t_end_ms: i64,
    /// The latency probe's clinic and figures.
    probe: Option<(String, super::probe::ProbeFigures)>,
}

/// How the drain went.
struct Drain {
    drained: bool,
    problems: Vec<String>,
    lags: Vec<omrs_sinks::verify::Lag>,
    endpoints: Vec<(String, String)>,
}

/// A demo run between its steps.
struct Demo<'a> {
    args: &'a DemoArgs,
    sites: Vec<String>,
    windows: Vec<Window>,
    cfg: Config,
    dump: PathBuf,
    topics_file: PathBuf,
    paths: Paths,
    procs: Procs,
    progress: Progress,
    board: Board,
    /// The simulator's arguments every step starts from.
    sim: omrs_simulate::SimulateArgs,
    /// Sites whose agents share one process (`ingest-group`): above [`GROUP_ABOVE`] sites,
    /// every site without an offline window (those the demo stops and starts alone).
    grouped: Vec<String>,
}

/// Above this many sites, the demo runs the agents of sites without an offline window in one
/// `omrs-stream ingest` process (issue #24 §4): fifty processes do not fit two cores.
const GROUP_ABOVE: usize = 5;

impl<'a> Demo<'a> {
    /// Everything that can be wrong with the arguments, before anything starts; then the dump,
    /// the run directory and its config.
    fn prepare(args: &'a DemoArgs, topics_file: &Path) -> anyhow::Result<Demo<'a>> {
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
        let windows: Vec<Window> = args.offline.iter().map(|o| parse_window(o, &sites, args.duration)).collect::<Result<_, _>>()?;
        // Only the default place is filled by fetching: a dump named by --dump or
        // OMRS_DEMO_DUMP that is not there is a mistake to report.
        let default_place = std::env::var_os("OMRS_DEMO_DUMP").is_none() && args.dump == omrs_core::openmrs::default_dump();
        let dump = match (args.dump.is_file(), default_place) {
            (true, _) => args.dump.clone(),
            (false, true) => fetch_dump(&args.dump)?,
            (false, false) => bail!("{}", omrs_core::openmrs::missing_dump(&args.dump)),
        };
        let dump = std::fs::canonicalize(&dump).with_context(|| format!("resolving {}", dump.display()))?;
        let topics_file = std::fs::canonicalize(topics_file).with_context(|| format!("the topics file {} (run the demo from the omrs-stream checkout, or pass --topics)", topics_file.display()))?;
        let exe = std::env::current_exe().context("finding this binary")?;
        let paths = Self::run_dir(args)?;
        let text = super::apply_sets(&super::config_text(args, &paths.prefix, &paths.lake, args.metrics_port), &args.set)?;
        std::fs::write(&paths.config, text).with_context(|| format!("writing {}", paths.config.display()))?;
        let cfg = Config::load(&paths.config).context("the demo's generated config")?;
        let mut progress = Progress::new(args.quiet);
        progress.step(format!(
            "run {}: {} sites, {} people, {:.0} % duplicates, seed {}; everything in {}",
            paths.run_id,
            args.sites,
            args.patients,
            args.dup_fraction * 100.0,
            args.seed,
            paths.run_dir.display()
        ));
        let procs = Procs::new(exe, paths.config.clone(), topics_file.clone(), paths.logs.clone());
        let sim = omrs_simulate::SimulateArgs {
            sites: sites.len(),
            patients: args.patients,
            dup_fraction: args.dup_fraction,
            seed: args.seed,
            adversarial: args.adversarial,
            clock_trouble: args.clock_trouble,
            manifest: paths.manifest.clone(),
            database: Some(args.site_database.clone()),
            dump: dump.clone(),
            quiet: true,
            ..Default::default()
        };
        let grouped = if sites.len() > GROUP_ABOVE { sites.iter().filter(|s| !windows.iter().any(|w: &Window| &w.site == *s)).cloned().collect() } else { Vec::new() };
        Ok(Demo { args, sites, windows, cfg, dump, topics_file, paths, procs, progress, board: Board::default(), sim, grouped })
    }

    /// A new run directory under the state root (`latest` points at it), with its logs.
    fn run_dir(args: &DemoArgs) -> anyhow::Result<Paths> {
        let state_root = args.state_dir.clone().unwrap_or_else(|| PathBuf::from(std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into())).join("demo"));
        std::fs::create_dir_all(&state_root).with_context(|| format!("creating {}", state_root.display()))?;
        let (run_id, run_dir) = new_run_dir(&state_root)?;
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let run_dir = std::fs::canonicalize(&run_dir).context("resolving the run directory")?;
        let latest = state_root.join("latest");
        let _ = std::fs::remove_file(&latest);
        let _ = std::os::unix::fs::symlink(&run_id, &latest);
        Ok(Paths {
            logs: run_dir.join("logs"),
            lake: run_dir.join("lake"),
            config: run_dir.join("omrs-stream.toml"),
            manifest: run_dir.join("manifest.json"),
            prefix: format!("demo-{run_id}."),
            run_id,
            run_dir,
        })
    }

    /// Kafka and MariaDB (hq and one server per site), by scripts/dev-up.
    async fn services(&mut self) -> anyhow::Result<()> {
        if self.args.no_services {
            return Ok(());
        }
        let script = find_dev_up().context("scripts/dev-up not found: run the demo from the omrs-stream checkout, or start Kafka and MariaDB yourself and pass --no-services")?;
        self.progress.set(format!("starting Kafka and MariaDB (hq, {}) with {}", self.sites.join(", "), script.display()));
        let log_path = self.paths.logs.join("services.log");
        let log = std::fs::File::create(&log_path).context("creating services.log")?;
        // NAME:PORT for every clinic: the port the run's config gives it (site_port).
        let servers: Vec<String> = self.cfg.sites.iter().map(|s| format!("{}:{}", s.name, s.database.port)).collect();
        let status = tokio::process::Command::new(&script)
            .arg("hq")
            .args(&servers)
            .stdout(log.try_clone().context("log handle")?)
            .stderr(log)
            .status()
            .await
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status}); the end of {}:\n{}", script.display(), log_path.display(), procs::tail(&log_path, 15));
        }
        self.progress.step("services up: Kafka 127.0.0.1:9092, MariaDB hq 3310 and one server per site");
        Ok(())
    }

    async fn topics(&mut self) -> anyhow::Result<()> {
        self.progress.set("creating topics".into());
        let tf = TopicsFile::load(&self.topics_file)?;
        let want = tf.resolve(&self.cfg.site_names(), &self.cfg.kafka.topic_prefix);
        let report = omrs_core::topics::apply(&self.cfg.kafka, &want).await.context("creating the demo's topics")?;
        if let Some(existing) = report.unchanged.first().or(report.changed.first().map(|(t, _)| t)) {
            bail!("topic {existing} already exists: another run uses the prefix {} (a run's topics must be its own; start the demo again)", self.paths.prefix);
        }
        self.progress.step(format!("topics: {} created with prefix {}", report.created.len(), self.paths.prefix));
        Ok(())
    }

    /// The sites provisioned from the dump and HQ created, side by side.
    async fn sites_and_hq(&mut self) -> anyhow::Result<()> {
        let args = self.args;
        self.progress.set(format!("provisioning {} sites from the OpenMRS demo dump and creating HQ {}", self.sites.len(), args.hq_database));
        let provision_args = omrs_simulate::SimulateArgs { provision_only: true, ..self.sim.clone() };
        let provision = omrs_simulate::run(&self.cfg, &provision_args);
        let init_args: Vec<String> = vec!["sink".into(), "hq-mysql".into(), "--init".into(), "--force".into(), "--dump".into(), self.dump.display().to_string()];
        let init = self.procs.run_to_end("sink-hq-mysql-init", &init_args);
        let (p, i) = tokio::join!(provision, init);
        p.context("provisioning the sites")?;
        i.context("creating the HQ database")?;
        let at: Vec<String> = self.sites.iter().map(|s| format!("{s}/{}", args.site_database)).collect();
        self.progress.step(format!("sites provisioned ({}); HQ {} created", at.join(", "), args.hq_database));
        Ok(())
    }

    /// `--backlog`: the whole workload written first, as fast as the sites take it.
    async fn backlog(&mut self) -> anyhow::Result<Work> {
        self.progress.set(format!("writing the backlog: {} people at {} sites, as fast as they take it (pipeline stopped)", self.args.patients, self.sites.len()));
        let sim_task = Task(tokio::spawn({
            let cfg = self.cfg.clone();
            // The agents start after it, on a snapshot: the manifest expects what that shows.
            let sim = omrs_simulate::SimulateArgs { no_provision: true, burst: true, snapshot_only: true, ..self.sim.clone() };
            async move { omrs_simulate::run(&cfg, &sim).await }
        }));
        let manifest = wait_sim(sim_task, &mut self.progress).await?;
        self.progress.step(format!("backlog written: {} row changes in {:.1} s", fmt_n(manifest.row_changes as f64), manifest.write_seconds));
        Ok(Work { sim_rows: manifest.row_changes, t_end_ms: now_ms(), probe: None })
    }

    /// The agents, the transform and both sinks, each on its metrics port.
    fn start_pipeline(&mut self) -> anyhow::Result<()> {
        let port = self.args.metrics_port;
        for site in self.sites.iter().filter(|s| !self.grouped.contains(s)) {
            start_agent(&mut self.procs, &self.sites, site, port)?;
        }
        if let Some(first) = self.grouped.first() {
            // One process, on the first grouped site's port.
            let p = port + 3 + self.sites.iter().position(|s| s == first).unwrap_or(0) as u16;
            let mut a: Vec<String> = vec!["ingest".into()];
            for s in &self.grouped {
                a.extend(["--site".to_string(), s.clone()]);
            }
            a.extend(["--quiet".to_string(), "--metrics-port".to_string(), p.to_string()]);
            self.procs.spawn(GROUP_PROC, &a, Some(p))?;
            self.progress.step(format!("{} sites' agents in one ingest process ({GROUP_PROC})", self.grouped.len()));
        }
        self.procs.spawn("transform", &["transform".into(), "--metrics-port".into(), port.to_string()], Some(port))?;
        if !self.args.lake_first {
            self.start_hq_sink()?;
        }
        let p = port + 2;
        self.procs.spawn("sink-parquet", &["sink".into(), "parquet".into(), "--quiet".into(), "--metrics-port".into(), p.to_string()], Some(p))?;
        self.progress.step(format!(
            "pipeline started: {} ingest agents, transform, {}Parquet sink (logs in {})",
            self.sites.len(),
            if self.args.lake_first { "" } else { "HQ MySQL sink, " },
            self.paths.logs.display()
        ));
        Ok(())
    }

    fn start_hq_sink(&mut self) -> anyhow::Result<()> {
        let p = self.args.metrics_port + 1;
        self.procs.spawn("sink-hq-mysql", &["sink".into(), "hq-mysql".into(), "--quiet".into(), "--metrics-port".into(), p.to_string()], Some(p))
    }

    /// Waits for every site's snapshot to come through the transform and the HQ sink, so the
    /// latency figures are those of live changes. Returns the HQ sink's samples then.
    async fn through_snapshots(&mut self, hq_conn: &mut mysql_async::Conn) -> anyhow::Result<(Vec<prom::Sample>, Vec<prom::Sample>)> {
        let since = now_ms();
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_timeout);
        if let Err(late_sites) = until_released(&mut self.procs, &mut self.board, &self.sites, &self.windows, since, deadline, &mut self.progress, "snapshots").await? {
            bail!("the snapshots did not come through within {} s (sites behind: {late_sites:?}); see the logs in {}", self.args.drain_timeout, self.paths.logs.display());
        }
        loop {
            self.procs.check()?;
            let lags = omrs_sinks::verify::stage_lags(&self.cfg, Some(&mut *hq_conn), None).await?;
            let through = |stage: &str| lags.iter().all(|l| l.stage != stage || l.messages == Some(0));
            if (through("hq_mysql") && through("parquet")) || Instant::now() >= deadline {
                break;
            }
            self.board.scrape(&self.procs, &self.sites, &self.windows).await;
            self.progress.set(format!("snapshots: {} · waiting for the sinks", self.board.line()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.board.scrape(&self.procs, &self.sites, &self.windows).await;
        self.progress.step(format!(
            "snapshots through: {} events captured; the live workload starts ({:.0} row changes/s for {:.0} s)",
            fmt_n(self.board.captured()),
            self.args.rate,
            self.args.duration
        ));
        Ok((self.board.hq.clone(), self.board.parquet.clone()))
    }

    /// The live workload at `--rate` for `--duration`, with the offline windows: a site's agent
    /// really stopped, then started again on its backlog.
    async fn live(&mut self) -> anyhow::Result<Work> {
        let args = self.args;
        // The latency probe writes at a clinic that stays online.
        let probe_site = self.sites.iter().find(|s| self.windows.iter().all(|w| &w.site != *s)).cloned();
        let mut probe = None;
        if let Some(site) = &probe_site {
            let db = &self.cfg.site(site).context("the probe's site")?.database;
            let writer = omrs_sinks::mysql_opts(db).user(Some(self.sim.admin_user.clone())).pass(Some(self.sim.admin_password.clone()));
            probe = Some(super::probe::start(writer, omrs_sinks::mysql_opts(&self.cfg.hq.database)).await.context("starting the latency probe")?);
        }
        let sim_task = Task(tokio::spawn({
            let cfg = self.cfg.clone();
            let sim = omrs_simulate::SimulateArgs { no_provision: true, rate: Some(args.rate), duration: Some(args.duration), offline: args.offline.clone(), ..self.sim.clone() };
            async move { omrs_simulate::run(&cfg, &sim).await }
        }));
        let t_work = Instant::now();
        let work = loop {
            self.procs.check()?;
            let elapsed = t_work.elapsed().as_secs_f64();
            self.windows_at(elapsed).await?;
            if sim_task.0.is_finished() {
                let manifest = wait_sim(sim_task, &mut self.progress).await?;
                let t_end_ms = now_ms();
                let probe = match (probe.take(), &probe_site) {
                    (Some(p), Some(site)) => {
                        self.progress.set("workload done; the latency probe's last change on its way to HQ".into());
                        Some((site.clone(), p.finish(&self.cfg.kafka, site).await))
                    }
                    _ => None,
                };
                break Work { sim_rows: manifest.row_changes, t_end_ms, probe };
            }
            self.board.scrape(&self.procs, &self.sites, &self.windows).await;
            let offline: Vec<String> = self
                .windows
                .iter()
                .filter(|w| w.state == WindowState::Down)
                .map(|w| format!("{} OFFLINE {:.0} s left", w.site, (w.start + w.secs - elapsed).max(0.0)))
                .collect();
            let written = prom::sum(&prom::parse(&m::metrics().render()), m::SIMULATED_ROWS, &[]);
            self.progress.set(format!(
                "live {:.0}/{:.0} s · clinics wrote {} · {}{}{}",
                elapsed.min(args.duration),
                args.duration,
                fmt_n(written),
                self.board.line(),
                if offline.is_empty() { "" } else { " · " },
                offline.join(", ")
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        // A window that outlasted the workload ends now, so the drain has every site.
        for w in self.windows.iter_mut().filter(|w| w.state != WindowState::Over) {
            if w.state == WindowState::Down {
                start_agent(&mut self.procs, &self.sites, &w.site, args.metrics_port)?;
                self.progress.step(format!("{} back online at the end of the workload", w.site));
            }
            w.state = WindowState::Over;
        }
        self.progress.step(format!("workload done: {} row changes at {} sites", fmt_n(work.sim_rows as f64), self.sites.len()));
        Ok(work)
    }

    /// Opens and closes the offline windows due `elapsed` seconds into the workload.
    async fn windows_at(&mut self, elapsed: f64) -> anyhow::Result<()> {
        if self.windows.iter().any(|w| w.state == WindowState::Ahead && elapsed >= w.start) {
            // The agents' last counts before one of them stops.
            self.board.scrape(&self.procs, &self.sites, &self.windows).await;
        }
        for w in self.windows.iter_mut() {
            if w.state == WindowState::Ahead && elapsed >= w.start {
                self.procs.stop(&format!("ingest-{}", w.site), Duration::from_secs(10)).await;
                w.state = WindowState::Down;
                self.progress.step(format!("{} offline: its ingest agent is stopped for {:.0} s while the clinic keeps writing", w.site, w.secs));
            } else if w.state == WindowState::Down && elapsed >= w.start + w.secs {
                start_agent(&mut self.procs, &self.sites, &w.site, self.args.metrics_port)?;
                w.state = WindowState::Over;
                self.progress.step(format!("{} back online: its agent reads the backlog", w.site));
            }
        }
        Ok(())
    }

    /// Drain: every site caught up past the end of the workload and released by the
    /// transform; then the stages stop in pipeline order, each once its input is consumed to
    /// the end, so nothing new reaches a topic after its reader was found at the end of it: the
    /// agents; the transform, at the end of the site topics (its last counts scraped first);
    /// then the sinks, at the end of omrs.hq.changes with nothing pending at HQ.
    async fn drain(&mut self, hq_conn: &mut mysql_async::Conn, t_end_ms: i64, with_hq: bool) -> anyhow::Result<Drain> {
        let timeout = self.args.drain_timeout;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        if let Err(late_sites) = until_released(&mut self.procs, &mut self.board, &self.sites, &self.windows, t_end_ms, deadline, &mut self.progress, "draining").await? {
            let problems = vec![format!("the pipeline did not drain within {timeout} s (sites behind: {late_sites:?})")];
            return Ok(Drain { drained: false, problems, lags: Vec::new(), endpoints: self.endpoints() });
        }
        let endpoints = self.endpoints();
        self.procs.stop_all("ingest-", Duration::from_secs(10)).await;
        self.drain_sinks(hq_conn, deadline, true, with_hq, endpoints).await
    }

    /// The drain's second half: the transform stopped once it has read the site topics to
    /// their end, then the running sinks until they have read `omrs.hq.changes` to its end
    /// (`with_hq`: the HQ sink too, with nothing pending at HQ).
    async fn drain_sinks(&mut self, hq_conn: &mut mysql_async::Conn, deadline: Instant, mut transform_running: bool, with_hq: bool, endpoints: Vec<(String, String)>) -> anyhow::Result<Drain> {
        let timeout = self.args.drain_timeout;
        let mut lags;
        loop {
            self.procs.check()?;
            // With the HQ sink off (`--lake-first`'s first half), HQ's lag is not read: it would
            // read omrs.hq.changes from its start on every round.
            lags = omrs_sinks::verify::stage_lags(&self.cfg, with_hq.then_some(&mut *hq_conn), Some(&self.paths.lake)).await?;
            let pending: i64 = if with_hq { hq_conn.query_first("SELECT COUNT(*) FROM omrs_sync_pending").await.context("counting pending rows at HQ")?.unwrap_or(0) } else { 0 };
            self.board.scrape(&self.procs, &self.sites, &self.windows).await;
            if transform_running && lags.iter().filter(|l| l.stage == "transform").all(|l| l.messages == Some(0)) {
                self.procs.stop("transform", Duration::from_secs(15)).await;
                transform_running = false;
                continue;
            }
            let busy: Vec<String> = lags.iter().filter(|l| l.messages != Some(0)).map(|l| format!("{} {}", l.stage, l.messages.map(|m| m.to_string()).unwrap_or("-".into()))).collect();
            if !transform_running && busy.is_empty() && pending == 0 {
                return Ok(Drain { drained: true, problems: Vec::new(), lags, endpoints });
            }
            if Instant::now() >= deadline {
                let problems = vec![format!("the sinks did not drain within {timeout} s ({pending} pending at HQ; behind: {busy:?})")];
                return Ok(Drain { drained: false, problems, lags, endpoints });
            }
            self.progress.set(format!("draining the sinks: {} · behind: {} · {pending} pending at HQ", self.board.line(), busy.join(", ")));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `--lake-first`: the drain with the HQ sink off until the lake holds everything (the
    /// lake's own replay time), then the HQ sink started and drained. Returns the drain, the
    /// seconds from `t_pipeline` to the lake's end, and the CPU seconds each stage and server
    /// used until then (`servers`: found when the pipeline started).
    async fn drain_lake_first(&mut self, hq_conn: &mut mysql_async::Conn, t_end_ms: i64, t_pipeline: Instant, servers: &procs::Servers) -> anyhow::Result<(Drain, f64, BTreeMap<String, f64>)> {
        let lake = self.drain(hq_conn, t_end_ms, false).await?;
        let lake_secs = t_pipeline.elapsed().as_secs_f64();
        let cpu = self.procs.cpu_with(servers);
        if !lake.drained {
            return Ok((lake, lake_secs, cpu));
        }
        self.progress.step(format!("the lake holds everything {lake_secs:.1} s into the pipeline (HQ sink off); the HQ sink starts"));
        self.start_hq_sink()?;
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_timeout);
        let endpoints = self.endpoints();
        Ok((self.drain_sinks(hq_conn, deadline, false, true, endpoints).await?, lake_secs, cpu))
    }

    /// The local ports of the servers the run uses, by group: Kafka's broker, HQ's MariaDB,
    /// the clinics' (for [`procs::Servers`]). Servers on other hosts are left out.
    fn server_ports(&self) -> Vec<(String, u16)> {
        let local = |host: &str| matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]");
        let kafka = self.cfg.kafka.bootstrap_servers.split(',').filter_map(|b| b.trim().rsplit_once(':')).filter(|(h, _)| local(h)).filter_map(|(_, p)| p.parse().ok()).map(|p| ("kafka".to_string(), p));
        let hq = Some(&self.cfg.hq.database).filter(|d| local(&d.host)).map(|d| ("mariadb-hq".to_string(), d.port));
        let sites = self.cfg.sites.iter().map(|s| &s.database).filter(|d| local(&d.host)).map(|d| ("mariadb-sites".to_string(), d.port));
        kafka.chain(hq).chain(sites).collect()
    }

    /// Every stage's metrics endpoint, for the summary.
    fn endpoints(&self) -> Vec<(String, String)> {
        let port = self.args.metrics_port;
        self.procs
            .running
            .iter()
            .filter(|p| !p.name.starts_with("ingest-"))
            .filter_map(|p| p.port.map(|port| (p.name.clone(), format!("http://127.0.0.1:{port}/metrics"))))
            .chain(self.sites.iter().enumerate().filter(|(_, s)| !self.grouped.contains(s)).map(|(i, s)| (format!("ingest-{s}"), format!("http://127.0.0.1:{}/metrics", port + 3 + i as u16))))
            .chain(self.grouped.first().and_then(|f| self.sites.iter().position(|s| s == f)).map(|i| (GROUP_PROC.to_string(), format!("http://127.0.0.1:{}/metrics", port + 3 + i as u16))))
            .collect()
    }
}

/// A run id and its directory under `state_root`, created here and new. The run id names the
/// run's topics, and so its transactional ids and consumer groups: two demos started in the
/// same second (the demo tests run two at once) must not share them, or one run's agent resumes
/// from the other's checkpoint. The second carries a suffix of this process, and a directory
/// that already exists is never taken.
fn new_run_dir(state_root: &Path) -> anyhow::Result<(String, PathBuf)> {
    for attempt in 0u32..64 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let suffix = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos ^ attempt.wrapping_mul(40_503)) & 0xffff;
        let id = format!("{}-{suffix:04x}", chrono::Utc::now().format("%Y%m%dT%H%M%S"));
        let dir = state_root.join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no new run directory could be made under {}", state_root.display())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_run_gets_a_directory_and_id_of_its_own() {
        let root = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..50).map(|_| super::new_run_dir(root.path()).unwrap().0).collect();
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        assert!(ids.iter().all(|id| id.len() == "20261205T204926-92ff".len() && root.path().join(id).is_dir()), "{ids:?}");
    }
}
