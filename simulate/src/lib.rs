//! omrs-simulate: the multi-site OpenMRS workload generator used by the demo, the tests and
//! the benchmarks.
//!
//! Delivery guarantee: not a pipeline stage. Each logical OpenMRS action is one SQL
//! transaction at its site, committed or not at all; the manifest is written only after every
//! site has finished, and describes exactly what was committed.
//!
//! `run` provisions each site (real OpenMRS schema and metadata from the demo dump), then writes
//! registrations, visits with encounters and obs, edits, voids, deletes and site-side merges,
//! with cross-site duplicate people, at a fixed rate or as fast as possible, and finally writes
//! the ground-truth manifest.

pub mod manifest;
mod names;
pub mod plan;
pub mod provision;
mod site;
mod sql;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::clock::now_ms;
use omrs_core::config::{Config, DatabaseConfig, SiteConfig};
use omrs_core::metrics::metrics;

use crate::manifest::*;
use crate::plan::{Plan, RegKind};
use crate::provision::PATIENT_TABLES;
use crate::site::SiteGen;

pub use provision::NATIONAL_ID_TYPE_UUID;

/// Errors of the simulator. Database connection failures are transient; everything else is
/// definite (a bad argument, a missing dump, a schema without what OpenMRS needs).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Usage(String),
    #[error("site {site}: {context}: {source}")]
    Db {
        site: String,
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("site {site}: {message}")]
    Schema { site: String, message: String },
    #[error("OpenMRS demo dump {path}: {source}")]
    Dump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
}

impl SimError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SimError::Db { source: mysql_async::Error::Io(_), .. })
    }
}

/// `omrs-stream simulate`: a multi-site OpenMRS workload on the real schema.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of sites, taken in order from omrs-stream.toml.
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// People in the population plan (demo patients at the seed site come on top).
    #[arg(long, default_value_t = 300)]
    pub patients: usize,
    /// Fraction of people registered at two or more sites with the same National ID.
    #[arg(long, default_value_t = 0.2)]
    pub dup_fraction: f64,
    /// Seed: the same seed gives the same logical rows (uuids, identifiers, values).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Adversarial identity mode, at this rate (0 to 1): National IDs pasted with Unicode
    /// dashes, full-width forms and invisible spaces; people with another's name, sex and
    /// birthdate; National IDs one digit apart from another person's; misprinted cards
    /// corrected later (update, void and add, delete and add); registration dates fixed after
    /// the fact (backdated, before 1970 too, sometimes put back).
    #[arg(long, default_value_t = 0.0)]
    pub adversarial: f64,
    /// Clock trouble: the second site's clock runs 10 minutes behind, the third's jumps a day
    /// ahead for a stretch of its work and back (its NOW(), so its DATETIMEs and binlog times).
    /// Each site also writes in the `time_zone` its config gives it.
    #[arg(long)]
    pub clock_trouble: bool,
    /// Steady row changes per second across all sites.
    #[arg(long, conflicts_with = "burst")]
    pub rate: Option<f64>,
    /// Write as fast as possible (the default when --rate is not given).
    #[arg(long)]
    pub burst: bool,
    /// Stop after this many seconds; activity continues on existing patients once the plan is
    /// done. Without it (and without --until-patients) the run ends when the plan is done.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop once this many patients have been registered across all sites.
    #[arg(long)]
    pub until_patients: Option<u64>,
    /// SITE:START:SECS: report SITE offline to the demo from START seconds after the run starts,
    /// for SECS seconds. The site's writes continue. Repeatable.
    #[arg(long, value_name = "SITE:START:SECS")]
    pub offline: Vec<String>,
    /// Where to write the ground-truth manifest (JSON).
    #[arg(long, default_value = "simulate-manifest.json")]
    pub manifest: PathBuf,
    /// Site database name (overrides omrs-stream.toml, e.g. for isolated test runs).
    #[arg(long)]
    pub database: Option<String>,
    /// Keep the existing site databases and add activity to them.
    #[arg(long)]
    pub no_provision: bool,
    /// Provision the sites, write the manifest and stop.
    #[arg(long)]
    pub provision_only: bool,
    /// The OpenMRS demo dump (gzip SQL).
    #[arg(long, env = "OMRS_DEMO_DUMP", default_value_os_t = omrs_core::openmrs::default_dump())]
    pub dump: PathBuf,
    /// The site that gets the 100 demo patients; "none" for no demo patients.
    #[arg(long, default_value = "first")]
    pub demo_site: String,
    /// Database user with write access at the sites (the cdc user of the config is read-only).
    #[arg(long, default_value = "omrs", env = "OMRS_ADMIN_USER")]
    pub admin_user: String,
    #[arg(long, default_value = "omrs", env = "OMRS_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: String,
    /// Transactions per round trip in burst mode.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// No progress bar (log lines instead).
    #[arg(long)]
    pub quiet: bool,
    /// The pipeline will read this run's changes by a snapshot only (the agents start after the
    /// run, on new sites: `demo --backlog`). A National ID corrected before the snapshot is then
    /// never seen, so the manifest joins records on the numbers they hold at the end, not on
    /// every number they ever held.
    #[arg(long)]
    pub snapshot_only: bool,
}

impl Default for SimulateArgs {
    /// The command line's defaults, for callers that build the arguments in code.
    fn default() -> Self {
        SimulateArgs {
            sites: 3,
            patients: 300,
            dup_fraction: 0.2,
            seed: 1,
            adversarial: 0.0,
            clock_trouble: false,
            rate: None,
            burst: false,
            duration: None,
            until_patients: None,
            offline: Vec::new(),
            manifest: PathBuf::from("simulate-manifest.json"),
            database: None,
            no_provision: false,
            provision_only: false,
            dump: omrs_core::openmrs::default_dump(),
            demo_site: "first".into(),
            admin_user: "omrs".into(),
            admin_password: "omrs".into(),
            batch: 16,
            quiet: false,
            snapshot_only: false,
        }
    }
}

struct Offline {
    site: String,
    start: f64,
    secs: f64,
}

fn parse_offline(spec: &str, sites: &[String]) -> Result<Offline, SimError> {
    let parts: Vec<&str> = spec.split(':').collect();
    let bad = |why: &str| SimError::Usage(format!("--offline {spec}: {why} (expected SITE:START:SECS, e.g. site-b:30:120)"));
    if parts.len() != 3 {
        return Err(bad("three fields separated by `:`"));
    }
    if !sites.iter().any(|s| s == parts[0]) {
        return Err(bad(&format!("site `{}` is not one of the simulated sites {sites:?}", parts[0])));
    }
    let start: f64 = parts[1].parse().map_err(|_| bad("START is not a number of seconds"))?;
    let secs: f64 = parts[2].parse().map_err(|_| bad("SECS is not a number of seconds"))?;
    if start < 0.0 || secs <= 0.0 {
        return Err(bad("START must be >= 0 and SECS > 0"));
    }
    Ok(Offline { site: parts[0].to_string(), start, secs })
}

fn opts(db: &DatabaseConfig, args: &SimulateArgs, database: Option<&str>) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(db.host.clone())
        .tcp_port(db.port)
        .user(Some(args.admin_user.clone()))
        .pass(Some(args.admin_password.clone()))
        .db_name(database.map(str::to_string))
        .prefer_socket(false)
}

/// A connection to a site that writes in the site's time zone (its config's `time_zone`).
async fn site_conn(site: &SiteConfig, args: &SimulateArgs) -> Result<Conn, SimError> {
    let db = |context: String| move |source| SimError::Db { site: site.name.clone(), context, source };
    let mut conn = Conn::new(opts(&site.database, args, None)).await.map_err(db(format!("connecting to {}", site.database.redacted_url())))?;
    let zone = site.zone();
    if !zone.is_utc() {
        conn.query_drop(format!("SET time_zone = '{}'", zone.offset_now())).await.map_err(db("setting the site's time zone".into()))?;
    }
    Ok(conn)
}

/// `person.date_created` of every person at every site in seconds since the epoch: the site's
/// local DATETIME less the offset its server reports for the site's time zone (the simulator's
/// own reading of what it wrote, never the pipeline's conversion).
async fn registration_times(args: &SimulateArgs, sites: &[SiteConfig], databases: &[String]) -> Result<HashMap<String, i64>, SimError> {
    let mut out = HashMap::new();
    for (site, db) in sites.iter().zip(databases) {
        let mut conn = site_conn(site, args).await?;
        let rows: Vec<(String, Option<i64>)> = conn
            .query(format!(
                "SELECT uuid, TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', date_created) - TIME_TO_SEC(TIMEDIFF(NOW(), UTC_TIMESTAMP())) FROM `{db}`.person"
            ))
            .await
            .map_err(|source| SimError::Db { site: site.name.clone(), context: "reading registration times".into(), source })?;
        out.extend(rows.into_iter().filter_map(|(u, c)| Some((u, c?))));
        let _ = conn.disconnect().await;
    }
    Ok(out)
}

struct Progress {
    rows: AtomicU64,
    registered: AtomicU64,
}

/// Runs the simulator and writes the manifest. Returns the manifest.
pub async fn run(cfg: &Config, args: &SimulateArgs) -> Result<Manifest, SimError> {
    let setup = Setup::check(cfg, args)?;
    let started_at_ms = now_ms();
    let (conns, starts, databases) = setup.open_sites(args).await?;
    let (gens, humans, elapsed) = simulate(&setup, args, conns, &starts).await?;
    let run = Ran { gens: &gens, humans: &humans, starts: &starts, databases: &databases, started_at_ms, elapsed };
    let manifest = manifest_of(&setup, args, &run).await?;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| SimError::Manifest { path: args.manifest.clone(), message: e.to_string() })?;
    std::fs::write(&args.manifest, text).map_err(|e| SimError::Manifest { path: args.manifest.clone(), message: e.to_string() })?;
    let regs: u64 = gens.iter().map(|(g, _)| g.registered).sum();
    tracing::info!(
        sites = args.sites,
        registrations = regs,
        row_changes = manifest.row_changes,
        seconds = format!("{elapsed:.1}"),
        rate = format!("{:.0}/s", manifest.row_changes as f64 / elapsed.max(0.001)),
        manifest = %args.manifest.display(),
        "simulation done"
    );
    Ok(manifest)
}

/// The checked arguments: which sites, their names, the offline windows, the demo site.
struct Setup {
    sites: Vec<SiteConfig>,
    names: Vec<String>,
    offline: Vec<Offline>,
    demo_site: Option<usize>,
    provision: bool,
}

impl Setup {
    /// Everything that can be wrong with the arguments, before anything is written.
    fn check(cfg: &Config, args: &SimulateArgs) -> Result<Setup, SimError> {
        if args.sites == 0 {
            return Err(SimError::Usage("--sites must be at least 1".into()));
        }
        if args.sites > cfg.sites.len() {
            return Err(SimError::Usage(format!(
                "--sites {}: omrs-stream.toml configures only {} site(s); add [[sites]] entries and start their databases (scripts/dev-up hq site-a site-b site-c site-d …)",
                args.sites,
                cfg.sites.len()
            )));
        }
        if !(0.0..=1.0).contains(&args.dup_fraction) {
            return Err(SimError::Usage(format!("--dup-fraction {} must be between 0 and 1", args.dup_fraction)));
        }
        if !(0.0..=1.0).contains(&args.adversarial) {
            return Err(SimError::Usage(format!("--adversarial {} must be between 0 and 1", args.adversarial)));
        }
        if let Some(r) = args.rate.filter(|r| *r <= 0.0) {
            return Err(SimError::Usage(format!("--rate {r} must be positive")));
        }
        let sites: Vec<_> = cfg.sites[..args.sites].to_vec();
        let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
        let offline: Vec<Offline> = args.offline.iter().map(|o| parse_offline(o, &names)).collect::<Result<_, _>>()?;
        let demo_site = match args.demo_site.as_str() {
            "first" => Some(0),
            "none" => None,
            name => Some(names.iter().position(|n| n == name).ok_or_else(|| SimError::Usage(format!("--demo-site {name}: not one of the simulated sites {names:?}")))?),
        };
        let provision = !args.no_provision;
        if provision && !args.dump.is_file() {
            return Err(SimError::Usage(omrs_core::openmrs::missing_dump(&args.dump)));
        }
        Ok(Setup { sites, names, offline, demo_site, provision })
    }

    /// Provisions (unless told not to) and reads each site's starting state, all sites at once.
    async fn open_sites(&self, args: &SimulateArgs) -> Result<(Vec<Conn>, Vec<provision::SiteStart>, Vec<String>), SimError> {
        let setup = futures::future::join_all(self.sites.iter().enumerate().map(|(i, site)| {
            let database = args.database.clone().unwrap_or_else(|| site.database.database.clone());
            let keep_demo = self.demo_site == Some(i);
            let provision = self.provision;
            async move {
                let mut conn = site_conn(site, args).await?;
                if provision {
                    tracing::info!(site = %site.name, database = %database, demo_patients = keep_demo, "provisioning from the OpenMRS demo dump");
                    provision::provision(&mut conn, &site.name, &database, &args.dump, keep_demo).await?;
                } else {
                    conn.query_drop(format!("USE `{database}`"))
                        .await
                        .map_err(|source| SimError::Db { site: site.name.clone(), context: format!("using database {database}"), source })?;
                }
                let start = provision::load_start(&mut conn, &site.name).await?;
                Ok::<_, SimError>((conn, start, database))
            }
        }))
        .await;
        let (mut conns, mut starts, mut databases) = (Vec::new(), Vec::new(), Vec::new());
        for r in setup {
            let (conn, start, db) = r?;
            conns.push(conn);
            starts.push(start);
            databases.push(db);
        }
        Ok((conns, starts, databases))
    }
}

/// Every site's generator driven to its end (one task per site), with a progress line.
/// Returns each site's generator and row count, the plan's humans, and the seconds it took.
async fn simulate(setup: &Setup, args: &SimulateArgs, conns: Vec<Conn>, starts: &[provision::SiteStart]) -> Result<(Vec<(SiteGen, u64)>, Arc<Vec<plan::Human>>, f64), SimError> {
    let plan = if args.provision_only {
        Plan::new(args.seed, args.sites, 0, 0.0)
    } else {
        Plan::with_adversarial(args.seed, args.sites, args.patients, args.dup_fraction, args.adversarial)
    };
    let humans = Arc::new(plan.humans);
    let progress = Arc::new(Progress { rows: AtomicU64::new(0), registered: AtomicU64::new(0) });
    let t0 = Instant::now();
    let deadline = args.duration.map(|d| t0 + Duration::from_secs_f64(d));
    let per_site_rate = args.rate.map(|r| r / args.sites as f64);
    let planned_total: u64 = plan.per_site.iter().map(|r| r.len() as u64).sum();
    let mut tasks = Vec::new();
    for (i, ((conn, start), regs)) in conns.into_iter().zip(starts.iter()).zip(plan.per_site).enumerate() {
        let rng = plan::seed_for(args.seed, 1 + i as u64);
        let mut gen = SiteGen::new(&setup.names[i], i, rng, start, if args.provision_only { Vec::new() } else { regs });
        if args.clock_trouble {
            gen.clock_trouble = match i {
                1 => site::ClockTrouble::Behind(600),
                2 => site::ClockTrouble::JumpsADay,
                _ => site::ClockTrouble::None,
            };
        }
        let (humans, progress, ongoing) = (humans.clone(), progress.clone(), args.duration.is_some());
        let (batch, until, stop_now) = (args.batch.max(1), args.until_patients, args.provision_only);
        tasks.push(tokio::spawn(async move { drive(conn, gen, humans, progress, ongoing, deadline, per_site_rate, batch, until, stop_now).await }));
    }
    let bar = (!args.quiet).then(|| {
        let pb = indicatif::ProgressBar::new(planned_total.max(1));
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} registrations  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let reporter = tokio::spawn(report(progress, bar.clone(), t0));
    let mut gens = Vec::new();
    for t in tasks {
        let res = t.await.map_err(|e| SimError::Usage(format!("site task failed: {e}")))?;
        gens.push(res?);
    }
    reporter.abort();
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    Ok((gens, humans, t0.elapsed().as_secs_f64()))
}

/// The progress line (or, without one, a log line every 5 s) until aborted.
async fn report(progress: Arc<Progress>, bar: Option<indicatif::ProgressBar>, t0: Instant) {
    let mut last_log = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rows = progress.rows.load(Ordering::Relaxed);
        let regs = progress.registered.load(Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64().max(0.001);
        if let Some(pb) = &bar {
            pb.set_position(regs);
            pb.set_message(format!("{rows} row changes, {:.0}/s", rows as f64 / secs));
        } else if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(rows, registered = regs, rate = format!("{:.0}/s", rows as f64 / secs), "simulating");
        }
    }
}

/// What a run left for its manifest.
struct Ran<'a> {
    gens: &'a [(SiteGen, u64)],
    humans: &'a [plan::Human],
    starts: &'a [provision::SiteStart],
    databases: &'a [String],
    started_at_ms: i64,
    elapsed: f64,
}

/// The manifest, from what was committed: per-site counts, the humans HQ can establish, the
/// merges it must log, the offline windows.
async fn manifest_of(setup: &Setup, args: &SimulateArgs, run: &Ran<'_>) -> Result<Manifest, SimError> {
    let (site_manifests, row_changes, mut expected_tables) = site_manifests(setup, args, run);
    let (humans_out, site_merges) = humans_of(setup, args, run).await?;
    let (started_at_ms, elapsed) = (run.started_at_ms, run.elapsed);
    // HQ logs each record it merges away that no site's own merge log names as the loser: every
    // record but the survivor that its site did not merge away itself.
    let hq_merges: u64 = humans_out
        .iter()
        .map(|h| h.records.iter().filter(|r| r.merged_into.is_none() && Some(&r.person_uuid) != h.survivor_uuid.as_ref()).count() as u64)
        .sum();
    *expected_tables.entry("person_merge_log".into()).or_insert(0) += hq_merges as i64;
    let window = |o: &Offline| OfflineWindow {
        site: o.site.clone(),
        start_ms: started_at_ms + (o.start * 1000.0) as i64,
        end_ms: started_at_ms + ((o.start + o.secs) * 1000.0) as i64,
    };
    Ok(Manifest {
        format: 1,
        seed: args.seed,
        patients: args.patients,
        dup_fraction: args.dup_fraction,
        started_at_ms,
        finished_at_ms: now_ms(),
        row_changes,
        write_seconds: elapsed,
        sites: site_manifests,
        expected_hq: ExpectedHq { active_patients: humans_out.len() as u64, hq_merges, tables: expected_tables },
        humans: humans_out,
        site_merges,
        offline: setup.offline.iter().map(window).collect(),
    })
}

/// Each site's counts (its starting state plus what the run added), the row changes written,
/// and the patient tables' expected counts at HQ (rows shared by every site counted once).
fn site_manifests(setup: &Setup, args: &SimulateArgs, run: &Ran<'_>) -> (Vec<SiteManifest>, u64, BTreeMap<String, i64>) {
    let mut site_manifests = Vec::new();
    let mut row_changes = 0;
    let mut expected_tables: BTreeMap<String, i64> = BTreeMap::new();
    for (i, ((gen, start), db)) in run.gens.iter().zip(run.starts).zip(run.databases).enumerate() {
        let (g, rows) = gen;
        let mut counts = start.baseline.clone();
        for (table, d) in &g.deltas {
            *counts.entry(table.to_string()).or_insert(0) += d;
        }
        for (table, _) in PATIENT_TABLES {
            let c = counts.get(*table).copied().unwrap_or(0);
            let shared = if i == 0 { 0 } else { start.shared.get(*table).copied().unwrap_or(0) };
            *expected_tables.entry(table.to_string()).or_insert(0) += c - shared;
        }
        row_changes += rows;
        let site = &setup.sites[i];
        site_manifests.push(SiteManifest {
            name: site.name.clone(),
            url: format!("mysql://{}@{}:{}/{}", args.admin_user, site.database.host, site.database.port, db),
            database: db.clone(),
            demo_patients: setup.demo_site == Some(i) && setup.provision,
            registrations: g.registered,
            row_changes: *rows,
            counts,
        });
    }
    (site_manifests, row_changes, expected_tables)
}

/// One entry per identity HQ can establish: a real human's records that share a National ID or
/// are joined by a site merge. A record whose National ID had not been entered when the run
/// ended (a late identifier cut off by --duration) cannot be matched, and stands alone. Also
/// the sites' own merges.
async fn humans_of(setup: &Setup, args: &SimulateArgs, run: &Ran<'_>) -> Result<(Vec<HumanManifest>, Vec<SiteMergeManifest>), SimError> {
    let mut by_human: BTreeMap<usize, Vec<RecordManifest>> = BTreeMap::new();
    let mut existing = Vec::new();
    let mut site_merges = Vec::new();
    for (g, _) in run.gens {
        let merged: BTreeMap<&str, &str> = g.merges.iter().map(|m| (m.loser_uuid.as_str(), m.winner_uuid.as_str())).collect();
        for p in &g.patients {
            let rec = RecordManifest {
                site: g.name.clone(),
                person_uuid: p.uuid.clone(),
                kind: match p.kind {
                    Some(RegKind::Primary) => "primary",
                    Some(RegKind::CrossSite) => "cross_site",
                    Some(RegKind::LocalDup) => "local_dup",
                    None => "existing",
                }
                .into(),
                national_id_raw: p.national_id_raw.clone(),
                national_id_at_registration: p.nid_at_registration,
                national_ids: p.nids_held.clone(),
                fixes: p.fixes.iter().map(|f| f.to_string()).collect(),
                merged_into: merged.get(p.uuid.as_str()).map(|w| w.to_string()),
                name: p.name.as_ref().map(|(g, f)| format!("{g} {f}")),
                sex_birthdate: p.human.map(|h| format!("{}|{}", run.humans[h].gender, run.humans[h].birthdate.format("%Y-%m-%d"))),
            };
            match p.human {
                Some(h) => by_human.entry(h).or_default().push(rec),
                None => existing.push(rec),
            }
        }
        for m in &g.merges {
            site_merges.push(SiteMergeManifest {
                site: g.name.clone(),
                winner_uuid: m.winner_uuid.clone(),
                loser_uuid: m.loser_uuid.clone(),
                moved_visits: m.moved_visits.clone(),
                moved_encounters: m.moved_encounters.clone(),
            });
        }
    }
    let created = registration_times(args, &setup.sites, run.databases).await?;
    let survivor = |records: &[RecordManifest]| -> Option<String> {
        records.iter().map(|r| (created.get(&r.person_uuid).copied().unwrap_or(i64::MAX), r.person_uuid.as_str())).min().map(|(_, u)| u.to_string())
    };
    let mut humans_out: Vec<HumanManifest> = Vec::new();
    for (h, records) in by_human {
        let records = if args.snapshot_only { records.into_iter().map(held_at_the_end).collect() } else { records };
        for group in resolvable_groups(records) {
            humans_out.push(HumanManifest { national_id: run.humans[h].national_id.clone(), survivor_uuid: survivor(&group), records: group });
        }
    }
    // Patients that were there before the run (the demo patients) are one human each.
    humans_out.extend(existing.into_iter().map(|r| HumanManifest { national_id: None, survivor_uuid: Some(r.person_uuid.clone()), records: vec![r] }));
    Ok((humans_out, site_merges))
}

/// A record as a snapshot shows it: only the National ID it holds at the end (the last one it was
/// given; a correction gives the new number last).
fn held_at_the_end(mut r: RecordManifest) -> RecordManifest {
    if r.national_ids.len() > 1 {
        r.national_ids.drain(..r.national_ids.len() - 1);
    }
    r
}

/// The records of one human split into the groups HQ can tell are one person: records that held
/// the same National ID at any time join each other (a misprinted card's number and the real
/// one are both the human's), and a site merge joins its loser to its winner. Order within a
/// group is kept.
fn resolvable_groups(records: Vec<RecordManifest>) -> Vec<Vec<RecordManifest>> {
    let n = records.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    // Records that held the same number at any time (HQ's identifier index does not forget).
    let mut holder: BTreeMap<&str, usize> = BTreeMap::new();
    let mut links = Vec::new();
    for (i, r) in records.iter().enumerate() {
        for nid in &r.national_ids {
            match holder.get(nid.as_str()) {
                Some(&j) => links.push((i, j)),
                None => {
                    holder.insert(nid, i);
                }
            }
        }
    }
    for (i, j) in links {
        let (a, b) = (find(&mut parent, i), find(&mut parent, j));
        parent[a] = b;
    }
    for i in 0..n {
        if let Some(winner) = &records[i].merged_into {
            if let Some(j) = records.iter().position(|r| &r.person_uuid == winner) {
                let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                parent[a] = b;
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<RecordManifest>> = BTreeMap::new();
    let mut order: Vec<usize> = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        let root = find(&mut parent, i);
        if !groups.contains_key(&root) {
            order.push(root);
        }
        groups.entry(root).or_default().push(r);
    }
    order.into_iter().filter_map(|k| groups.remove(&k)).collect()
}

/// One site's loop: generate transactions, pace them, send them.
#[allow(clippy::too_many_arguments)]
async fn drive(
    mut conn: Conn,
    mut gen: SiteGen,
    humans: Arc<Vec<plan::Human>>,
    progress: Arc<Progress>,
    ongoing: bool,
    deadline: Option<Instant>,
    rate: Option<f64>,
    batch: usize,
    until_patients: Option<u64>,
    stop_now: bool,
) -> Result<(SiteGen, u64), SimError> {
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    let mut pending: Option<site::Tx> = None;
    let site = gen.name.clone();
    if stop_now {
        return Ok((gen, 0));
    }
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if until_patients.is_some_and(|n| progress.registered.load(Ordering::Relaxed) >= n) {
            break;
        }
        let mut sql = String::new();
        let mut rows = 0u64;
        let mut txs = Vec::new();
        let budget = match rate {
            Some(r) => (t0.elapsed().as_secs_f64() * r) as u64,
            None => u64::MAX,
        };
        let regs_before = gen.registered;
        while txs.len() < batch {
            let tx = match pending.take() {
                Some(t) => t,
                None => match gen.next_tx(&humans, ongoing) {
                    Some(t) => t,
                    None => break,
                },
            };
            if rate.is_some() && sent + rows + tx.rows > budget && !txs.is_empty() {
                pending = Some(tx);
                break;
            }
            if rate.is_some() && sent + tx.rows > budget {
                // Not due yet: wait until it is.
                let r = rate.unwrap_or(1.0);
                let due = (sent + tx.rows) as f64 / r;
                let wait = due - t0.elapsed().as_secs_f64();
                pending = Some(tx);
                if wait > 0.0 {
                    let mut wait = Duration::from_secs_f64(wait.min(0.5));
                    if let Some(d) = deadline {
                        wait = wait.min(d.saturating_duration_since(Instant::now()));
                    }
                    tokio::time::sleep(wait).await;
                }
                break;
            }
            rows += tx.rows;
            sql.push_str(&tx.sql);
            txs.push(tx);
        }
        if txs.is_empty() {
            if pending.is_some() {
                continue;
            }
            break; // plan done
        }
        conn.query_drop(sql).await.map_err(|source| SimError::Db {
            site: site.clone(),
            context: "writing a batch of OpenMRS transactions (rerun with --batch 1 to find the failing one)".into(),
            source,
        })?;
        sent += rows;
        progress.rows.fetch_add(rows, Ordering::Relaxed);
        progress.registered.fetch_add(gen.registered - regs_before, Ordering::Relaxed);
        for tx in &txs {
            for (table, op, n) in &tx.changes {
                metrics().simulated_rows.with_label_values(&[site.as_str(), table, op.to_string().as_str()]).inc_by(*n);
            }
        }
    }
    if pending.is_some() {
        // A generated but unsent transaction must not be in the manifest: the run stopped
        // before its turn. It was the last one generated, so only deadlines can leave one; in
        // that case the generator's bookkeeping is one transaction ahead. Send it.
        if let Some(tx) = pending.take() {
            conn.query_drop(tx.sql).await.map_err(|source| SimError::Db { site: site.clone(), context: "writing the last transaction".into(), source })?;
            sent += tx.rows;
        }
    }
    let _ = conn.disconnect().await;
    Ok((gen, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uuid: &str, nid: Option<&str>, merged_into: Option<&str>) -> RecordManifest {
        RecordManifest {
            site: "site-a".into(),
            person_uuid: uuid.into(),
            kind: "cross_site".into(),
            national_id_raw: nid.map(str::to_string),
            national_id_at_registration: nid.is_some(),
            national_ids: nid.map(|n| n.chars().filter(char::is_ascii_digit).collect()).into_iter().collect(),
            fixes: Vec::new(),
            merged_into: merged_into.map(str::to_string),
            name: None,
            sex_birthdate: None,
        }
    }

    fn uuids(g: &[Vec<RecordManifest>]) -> Vec<Vec<&str>> {
        g.iter().map(|g| g.iter().map(|r| r.person_uuid.as_str()).collect()).collect()
    }

    #[test]
    fn a_record_without_its_national_id_stands_alone() {
        let g = resolvable_groups(vec![rec("a", None, None), rec("b", Some("NID-1"), None), rec("c", Some("NID 1"), None)]);
        assert_eq!(uuids(&g), vec![vec!["a"], vec!["b", "c"]]);
    }

    #[test]
    fn a_misprint_and_its_correction_join_through_the_record_that_held_both() {
        // a: the misprint 2 only; b: 2 corrected to 1; c: 1 only; d: 3, nobody else's.
        let mut b = rec("b", Some("2"), None);
        b.national_ids.push("1".into());
        let g = resolvable_groups(vec![rec("a", Some("2"), None), b, rec("c", Some("1"), None), rec("d", Some("3"), None)]);
        assert_eq!(uuids(&g), vec![vec!["a", "b", "c"], vec!["d"]]);
        // Without b, the misprint and the real number are two people as far as HQ can tell.
        let g = resolvable_groups(vec![rec("a", Some("2"), None), rec("c", Some("1"), None)]);
        assert_eq!(g.len(), 2);
    }

    /// A snapshot never shows the misprint b held before its correction: a and b are two people.
    #[test]
    fn seen_by_a_snapshot_only_a_corrected_misprint_joins_nobody() {
        let mut b = rec("b", Some("2"), None);
        b.national_ids.push("1".into());
        let g = resolvable_groups(vec![rec("a", Some("2"), None), held_at_the_end(b), rec("c", Some("1"), None)]);
        assert_eq!(uuids(&g), vec![vec!["a"], vec!["b", "c"]]);
    }

    #[test]
    fn a_site_merge_joins_records_without_national_id() {
        let g = resolvable_groups(vec![rec("a", None, None), rec("b", None, Some("a")), rec("c", None, None)]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].len(), 2);
    }
}
