//! omrs-ingest: the per-site agent, `omrs-stream ingest --site NAME`.
//!
//! Delivery guarantee: **exactly once** from the site's binlog into `omrs.cdc.<site>`. Every
//! Kafka transaction holds whole site transactions (or, for a very large one, a run of its rows)
//! plus the checkpoint that follows them, in `omrs.ingest.offsets.<site>`; on restart the agent resumes
//! from the last committed checkpoint, and `transactional.id` (derived from the site) fences a
//! zombie. The initial snapshot is consistent without a global lock and resumes mid-table.
//!
//! - [`server`]: MariaDB or MySQL, its version and binlog settings.
//! - [`schema`]: the schema history (column names when the binlog has none).
//! - [`snapshot`]: chunked consistent snapshot (`op:"r"`).
//! - [`stream`]: binlog tailing with mysql_async, heartbeats, DDL refresh.
//! - [`refs`]: FK → uuid.
//! - [`convert`]: MySQL values → envelope JSON.
//! - [`encode`]: binlog rows straight to the JSON of their change events.
//! - [`checkpoint`], [`producer`]: offsets and the transactional producer.
//! - [`debezium`]: the other way in, `--from-debezium`: a clinic's Debezium topics instead of
//!   its binlog.

pub mod checkpoint;
pub mod convert;
pub mod debezium;
pub mod encode;
pub mod gtid;
pub mod producer;
pub mod refs;
pub mod schema;
pub mod server;
pub mod snapshot;
pub mod stream;

use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::{Config, SiteConfig};
use omrs_core::metrics::metrics;
use omrs_core::model::Model;
use omrs_core::topics::TopicNames;

use crate::checkpoint::Checkpoint;
use omrs_core::clock::retry_transient;
use crate::producer::TxProducer;
use crate::refs::Resolver;

/// Errors of the ingest agent. Site and Kafka connectivity errors are transient (the agent
/// retries with backoff); the rest are definite and stop the agent with a message that says
/// what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("site database: {context}: {source}")]
    Site {
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("kafka: {context}: {message}")]
    Kafka { context: String, message: String },
    /// The site's server is not set up for row-based CDC.
    #[error("the site server is not ready for CDC: {0}")]
    Refused(String),
    /// The binlog position to resume from is gone.
    #[error("{0}")]
    Purged(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Usage(String),
    #[error("binlog: {0}")]
    Binlog(String),
    /// The binlog and the schema history disagree about a table: definite, the agent stops.
    #[error("schema: {0}")]
    Schema(String),
}

impl From<omrs_core::CoreError> for IngestError {
    /// Core's errors reach the agent from the table model (a database error at the site) and
    /// from Kafka setup.
    fn from(e: omrs_core::CoreError) -> Self {
        match e {
            omrs_core::CoreError::Db { context, source } => IngestError::Site { context, source },
            omrs_core::CoreError::Kafka { context, message, .. } => IngestError::Kafka { context, message },
            other => IngestError::Usage(other.to_string()),
        }
    }
}

impl IngestError {
    pub fn site(context: &str, source: mysql_async::Error) -> Self {
        IngestError::Site { context: context.to_string(), source }
    }
    pub fn kafka(context: &str, e: rdkafka::error::KafkaError) -> Self {
        IngestError::Kafka { context: context.to_string(), message: e.to_string() }
    }
    /// True when retrying may help: the site or Kafka is unreachable or timed out.
    pub fn is_transient(&self) -> bool {
        match self {
            IngestError::Site { source, .. } => matches!(source, mysql_async::Error::Io(_) | mysql_async::Error::Driver(_)),
            IngestError::Kafka { .. } => true,
            IngestError::Binlog(_) => true,
            _ => false,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            IngestError::Site { .. } => "site",
            IngestError::Kafka { .. } => "kafka",
            IngestError::Binlog(_) => "binlog",
            _ => "other",
        }
    }
}

/// `omrs-stream ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// The site, as named in omrs-stream.toml. Repeat it to run several sites in one process
    /// (an HQ-side deployment that pulls from clinics over a VPN): each has its own binlog
    /// connection, checkpoint topic and Kafka transaction, and one site's error never stops the
    /// others.
    #[arg(long = "site", value_name = "SITE", required_unless_present = "all_sites")]
    pub sites: Vec<String>,
    /// Every site of the config, in one process (as repeating --site for each).
    #[arg(long, conflicts_with = "sites")]
    pub all_sites: bool,
    /// Exit 0 once the snapshot is done and the binlog end seen at start has been reached.
    #[arg(long)]
    pub until_caught_up: bool,
    /// Ignore the saved position and take a fresh snapshot (after the binlog was purged); with
    /// --from-debezium, read the Debezium topics from their beginning.
    #[arg(long)]
    pub resnapshot: bool,
    /// Read the site from an existing Debezium deployment's topics (`[sites.debezium]`) instead
    /// of its binlog: no agent at the clinic.
    #[arg(long)]
    pub from_debezium: bool,
    /// Serve /metrics and /health on this port (overrides metrics.listen).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Tuning knobs (config `[ingest]` plus fixed defaults).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub chunk_rows: u32,
    pub heartbeat: Duration,
    /// At most this many events (whole site transactions) per Kafka transaction, reached while
    /// catching up; a live site's batches end at `batch_age` first. Events stream to the
    /// producer ahead of their checkpoint, so this does not bound the agent's memory.
    pub batch_events: usize,
    pub batch_age: Duration,
    /// A site transaction larger than this is split across Kafka transactions.
    pub max_txn_events: usize,
    pub ref_cache: usize,
}

/// What every phase of the agent shares.
pub struct Agent {
    pub site: SiteConfig,
    pub model: Model,
    pub resolver: Resolver,
    pub producer: TxProducer,
    /// For point queries (FK misses, site clock, binlog listing). Never inside the snapshot.
    pub query: Conn,
    pub scrub: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub tuning: Tuning,
    pub server_id: u32,
    /// The server's kind, version and binlog metadata, read at start.
    pub server: server::Server,
    pub quiet: bool,
}

pub fn site_opts(site: &SiteConfig) -> OptsBuilder {
    site.database.opts()
}

pub async fn connect(site: &SiteConfig) -> Result<Conn, IngestError> {
    let mut c = Conn::new(site_opts(site))
        .await
        .map_err(|e| IngestError::site(&format!("connecting to {}", site.database.redacted_url()), e))?;
    c.query_drop("SET time_zone = '+00:00'").await.map_err(|e| IngestError::site("setting the session time zone", e))?;
    Ok(c)
}

/// Runs the agent of each site given until `--until-caught-up` is satisfied, or forever. Every
/// site named must be in the config (checked before connecting). With several sites, each runs
/// as a task of its own: a site whose agent stops with a definite error is logged and counted
/// (`omrs_stream_ingest_site_running` 0) while the others go on; the process then exits 1 when
/// the rest are done, naming the sites that stopped.
pub async fn run(cfg: &Config, args: &IngestArgs) -> Result<(), IngestError> {
    let names: Vec<String> = if args.all_sites { cfg.site_names() } else { args.sites.clone() };
    let mut sites = Vec::with_capacity(names.len());
    for name in &names {
        let site = cfg
            .site(name)
            .ok_or_else(|| IngestError::Usage(format!("site `{name}` is not in the config (sites: {})", cfg.site_names().join(", "))))?;
        if sites.iter().any(|s: &SiteConfig| s.name == site.name) {
            return Err(IngestError::Usage(format!("site `{name}` is given twice")));
        }
        if args.from_debezium {
            debezium::check(site)?;
        }
        sites.push(site.clone());
    }
    match sites.as_slice() {
        [] => Err(IngestError::Usage("no site to capture: name one with --site, or use --all-sites".into())),
        [one] => run_site(cfg, one, args).await,
        _ => run_sites(cfg, sites, args).await,
    }
}

/// Several sites in one process, each on a task of its own.
async fn run_sites(cfg: &Config, sites: Vec<SiteConfig>, args: &IngestArgs) -> Result<(), IngestError> {
    // One progress bar per site would garble the terminal: progress goes to the log.
    let args = IngestArgs { quiet: true, ..args.clone() };
    tracing::info!(sites = sites.len(), "one agent per site in this process");
    let mut tasks = tokio::task::JoinSet::new();
    for site in sites {
        let (cfg, args) = (cfg.clone(), args.clone());
        tasks.spawn(async move {
            metrics().ingest_site_running.with_label_values(&[&site.name]).set(1);
            let r = run_site(&cfg, &site, &args).await;
            metrics().ingest_site_running.with_label_values(&[&site.name]).set(0);
            (site.name, r)
        });
    }
    let mut stopped = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((site, Ok(()))) => tracing::info!(site = %site, "site's agent done"),
            Ok((site, Err(e))) => {
                tracing::error!(site = %site, error = %e, "this site's agent stopped; the other sites go on");
                stopped.push(format!("{site}: {e}"));
            }
            Err(e) => stopped.push(format!("a site's task: {e}")),
        }
    }
    if stopped.is_empty() {
        Ok(())
    } else {
        Err(IngestError::Usage(format!("{} site(s) stopped: {}", stopped.len(), stopped.join("; "))))
    }
}

/// One site's agent, restarted from its last committed checkpoint with backoff after a
/// transient error (site or Kafka unreachable).
async fn run_site(cfg: &Config, site: &SiteConfig, args: &IngestArgs) -> Result<(), IngestError> {
    let resnapshot = std::sync::atomic::AtomicBool::new(args.resnapshot);
    retry_transient(
        || async {
            let fresh = resnapshot.load(std::sync::atomic::Ordering::Relaxed);
            if args.from_debezium {
                debezium::run_once(cfg, site, args, fresh).await
            } else {
                run_once(cfg, site, args, fresh).await
            }
        },
        IngestError::is_transient,
        |e, wait| {
            metrics().ingest_retries.with_label_values(&[&site.name, e.reason()]).inc();
            tracing::warn!(site = %site.name, error = %e, retry_in_ms = wait.as_millis() as u64, "transient error; resuming from the last committed checkpoint");
            // A resnapshot that already committed progress continues from it.
            resnapshot.store(false, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .await
}

async fn run_once(cfg: &Config, site: &SiteConfig, args: &IngestArgs, resnapshot: bool) -> Result<(), IngestError> {
    let t0 = std::time::Instant::now();
    let mut query = connect(site).await?;
    let server = server::inspect(&mut query, site.database.flavor).await?;
    tracing::info!(site = %site.name, version = %server.version, kind = ?server.kind, metadata = ?server.metadata, "site server");
    let mut model = Model::load(&mut query, &site.database.database, &cfg.ingest.include, &cfg.ingest.exclude).await?;
    if model.tables.is_empty() {
        return Err(IngestError::Usage(format!("database `{}` at site {} has no tables to capture", site.database.database, site.name)));
    }
    let t_model = t0.elapsed();
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let producer = TxProducer::new(&cfg.kafka, &site.name, names.cdc(&site.name), names.ingest_offsets(&site.name))?;
    let t_producer = t0.elapsed();
    let (saved, history) = if resnapshot {
        (None, schema::History::default())
    } else {
        let (cp, history) = checkpoint::read_with_schema(&cfg.kafka, &names.ingest_offsets(&site.name), &site.name)?;
        match cp {
            Some(cp) => (Some(cp), history),
            None => (checkpoint::read_legacy(&cfg.kafka, &names.legacy_ingest_offsets(), &site.name), history),
        }
    };
    // Where the agent resumes, each table as the binlog knew it there (a DDL it has not read
    // yet is already in information_schema).
    if saved.is_some() {
        history.apply_to(&mut model);
    }
    tracing::debug!(site = %site.name, model_ms = t_model.as_millis() as u64, producer_ms = t_producer.as_millis() as u64, checkpoint_ms = t0.elapsed().as_millis() as u64, "agent started");
    omrs_core::endpoint::ready();
    let tuning = Tuning {
        chunk_rows: cfg.ingest.snapshot_chunk_rows,
        heartbeat: Duration::from_millis(cfg.ingest.heartbeat_interval_ms.max(50)),
        batch_events: 20_000,
        batch_age: Duration::from_millis(cfg.ingest.batch_max_ms.max(1)),
        max_txn_events: cfg.ingest.max_txn_events,
        ref_cache: 2_000_000,
    };
    let mut agent = Agent {
        site: site.clone(),
        model,
        resolver: Resolver::new(tuning.ref_cache),
        producer,
        query,
        scrub: cfg.ingest.scrub.clone(),
        include: cfg.ingest.include.clone(),
        exclude: cfg.ingest.exclude.clone(),
        tuning,
        server_id: server.server_id,
        server,
        quiet: args.quiet,
    };
    let streaming = match saved {
        Some(cp @ Checkpoint::Streaming { .. }) => Some(cp),
        Some(Checkpoint::Snapshot { tables, segments, next_table, after_key, rows }) => {
            tracing::info!(site = %site.name, next_table, ?after_key, "resuming the snapshot");
            snapshot::run(&mut agent, Some((tables, segments, next_table, after_key, rows))).await?
        }
        Some(Checkpoint::Debezium { .. }) => {
            return Err(IngestError::Usage(format!(
                "site {}'s checkpoint is the Debezium input's: run `ingest --site {} --from-debezium`, or `--resnapshot` to capture its binlog from a fresh snapshot instead",
                site.name, site.name
            )))
        }
        None => snapshot::run(&mut agent, None).await?,
    };
    // None: stopped during the snapshot (SIGTERM), with what was read committed.
    let Some(streaming) = streaming else { return Ok(()) };
    stream::run(&mut agent, streaming, args.until_caught_up).await
}
