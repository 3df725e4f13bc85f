//! `omrs-stream sink hq-mysql`: the consolidated OpenMRS database at HQ.
//!
//! Delivery guarantee: **exactly once** into HQ. Each batch of `omrs.hq.changes` is applied in
//! one HQ transaction that also stores the consumed offsets in `omrs_sync_offsets`; on start the
//! sink seeks to those offsets, never to a consumer group's. Dead letters go to `omrs.dlq`
//! before the transaction commits, so they are at least once: a crash between the two can
//! repeat a dead letter, never lose one.
//!
//! Failure behaviour: HQ unreachable, a deadlock or a lock wait timeout rolls the batch back and
//! retries it with backoff, from the last committed offsets; the process does not exit. A
//! definite error of one row (a constraint violation that is not a missing parent, data too
//! long) dead-letters that row and the rest of the batch commits.

pub mod apply;
pub mod schema;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::Config;
use omrs_core::metrics::metrics;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset};

use crate::SinkError;
use apply::{Applier, Record};

/// `omrs-stream sink hq-mysql`: apply omrs.hq.changes to the HQ OpenMRS database.
#[derive(Debug, Clone, clap::Args)]
pub struct HqSinkArgs {
    /// Create the HQ database from the OpenMRS schema and shared metadata of the demo dump, and
    /// the omrs_sync_* tables, then exit. An existing HQ database is kept (see --force).
    #[arg(long)]
    pub init: bool,
    /// With --init: drop and recreate an existing HQ database.
    #[arg(long, requires = "init")]
    pub force: bool,
    /// The OpenMRS dump that --init loads.
    #[arg(long, env = "OMRS_DEMO_DUMP", default_value = "../shared/openmrs-demo/openmrs-standalone-demo-db-2.6.0.sql.gz")]
    pub dump: PathBuf,
    /// Exit 0 once everything that was on omrs.hq.changes at start is applied (batch runs, tests).
    #[arg(long)]
    pub until_idle: bool,
    /// Serve /metrics on this port (0: any free port) instead of metrics.listen's.
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Override sinks.hq_mysql.batch_max_rows.
    #[arg(long)]
    pub batch_rows: Option<usize>,
    /// No progress line on the terminal.
    #[arg(long)]
    pub quiet: bool,
}

fn hq_opts(cfg: &Config, with_db: bool) -> OptsBuilder {
    let d = &cfg.hq.database;
    crate::mysql_opts(d).db_name(with_db.then(|| d.database.clone())).stmt_cache_size(256)
}

async fn connect(cfg: &Config, with_db: bool) -> Result<Conn, SinkError> {
    let mut c = Conn::new(hq_opts(cfg, with_db)).await.map_err(|e| match &e {
        mysql_async::Error::Server(s) if s.code == 1049 => SinkError::Schema(format!(
            "the HQ database `{}` does not exist: create it with `omrs-stream sink hq-mysql --init`",
            cfg.hq.database.database
        )),
        _ => SinkError::db(format!("connecting to {}", cfg.hq.database.redacted_url()), e),
    })?;
    c.query_drop("SET time_zone = '+00:00', SESSION sql_mode = 'STRICT_TRANS_TABLES,NO_AUTO_VALUE_ON_ZERO'; SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(|e| SinkError::db("setting up the session", e))?;
    Ok(c)
}

/// One batch from the reader task: parsed records, the offsets after them, and whether the
/// topic's end at start has been reached (`--until-idle`).
struct Batch {
    records: Vec<Record>,
    next: HashMap<i32, i64>,
    at_end: bool,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs the sink (or `--init`).
pub async fn run(cfg: &Config, args: &HqSinkArgs) -> Result<(), SinkError> {
    if args.init {
        let mut conn = connect(cfg, false).await?;
        let created = schema::init(&mut conn, &cfg.hq.database.database, &args.dump, args.force).await?;
        if created {
            tracing::info!(database = %cfg.hq.database.database, dump = %args.dump.display(), "HQ database created from the OpenMRS schema and shared metadata");
        } else {
            tracing::info!(database = %cfg.hq.database.database, "HQ database already holds OpenMRS; kept it (use --force to recreate); omrs_sync_ tables ensured");
        }
        return Ok(());
    }
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_once(cfg, args).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                let kind = match &e {
                    SinkError::Db { source: mysql_async::Error::Server(s), .. } if s.code == 1213 => "deadlock",
                    SinkError::Db { .. } => "hq_unavailable",
                    _ => "kafka",
                };
                metrics().sink_errors.with_label_values(&["hq_mysql", kind]).inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "transient error; retrying from the last committed batch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_once(cfg: &Config, args: &HqSinkArgs) -> Result<(), SinkError> {
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let topic = names.hq_changes();
    let dlq_topic = names.dlq();
    let sink_cfg = &cfg.sinks.hq_mysql;
    let batch_rows = args.batch_rows.unwrap_or(sink_cfg.batch_max_rows).max(1);

    let mut conn = connect(cfg, true).await?;
    // An HQ made by an older version lacks the newer bookkeeping or dashboard tables.
    schema::ensure_bookkeeping(&mut conn).await?;
    let priorities: HashMap<String, i32> = cfg.sites.iter().map(|s| (s.name.clone(), s.priority)).collect();
    let mut applier = Applier::load(&mut conn, &cfg.hq.database.database, priorities, sink_cfg.fk_wait_timeout_s as i64 * 1000)
        .await?
        .with_max_pending(sink_cfg.max_pending_rows);

    let consumer = crate::kafka::consumer(cfg, "hq-mysql")?;
    let producer = crate::kafka::dlq_producer(cfg)?;

    let stored: Vec<(i32, i64)> = conn
        .exec("SELECT kafka_partition, next_offset FROM omrs_sync_offsets WHERE topic = ?", (topic.as_str(),))
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_offsets", e))?;
    let stored: HashMap<i32, i64> = stored.into_iter().collect();
    // Seek to the offsets stored in HQ (semantics 1), not to a group's.
    let partitions = crate::kafka::assign_at(&consumer, &topic, &stored)?;
    tracing::info!(topic = %topic, offsets = ?stored, pending = applier.pending_len(), "HQ sink started");

    let mut targets: HashMap<i32, i64> = HashMap::new();
    if args.until_idle {
        for p in &partitions {
            let (_, high) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(30)).map_err(|e| SinkError::kafka("reading end offsets", e))?;
            targets.insert(*p, high);
        }
    }
    let bar = (!args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(indicatif::ProgressStyle::with_template("{spinner} hq-mysql {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    // The reader task consumes and parses the next batch while this one is being written.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, SinkError>>(2);
    let reader = crate::kafka::AbortOnDrop(tokio::spawn({
        let topic = topic.clone();
        let batch_max = Duration::from_millis(sink_cfg.batch_max_ms);
        let until_idle = args.until_idle;
        let mut next = stored.clone();
        async move {
            loop {
                let deadline = Instant::now() + batch_max;
                let mut records: Vec<Record> = Vec::new();
                while records.len() < batch_rows {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match tokio::time::timeout(left, consumer.recv()).await {
                        Err(_) => break,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(SinkError::kafka("consuming", e))).await;
                            return;
                        }
                        Ok(Ok(m)) => {
                            next.insert(m.partition(), m.offset() + 1);
                            records.push(Record::decode(m.partition(), m.offset(), m.payload().unwrap_or(&[]).to_vec()));
                        }
                    }
                }
                let at_end = until_idle
                    && records.is_empty()
                    && targets.iter().all(|(p, high)| {
                        let pos = consumer
                            .position()
                            .ok()
                            .and_then(|tp| tp.find_partition(&topic, *p).and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None }));
                        *high == 0 || pos.is_some_and(|o| o >= *high) || next.get(p).is_some_and(|o| *o >= *high)
                    });
                if tx.send(Ok(Batch { records, next: next.clone(), at_end })).await.is_err() {
                    return;
                }
            }
        }
    }));
    let mut total_applied: u64 = 0;
    let mut last_bytes_total = Instant::now();

    loop {
        let Some(batch) = rx.recv().await else {
            return Err(SinkError::Kafka { context: "reading omrs.hq.changes".into(), message: "the reader task stopped".into(), transient: true });
        };
        let Batch { records, next: stored_now, at_end } = batch?;
        let started = Instant::now();
        let n = records.len();

        if n > 0 || applier.pending_len() > 0 {
            conn.query_drop("START TRANSACTION").await.map_err(|e| SinkError::db("beginning a transaction", e))?;
            let outcome = match applier.apply(&mut conn, records).await {
                Ok(o) => o,
                Err(e) => {
                    let _ = conn.query_drop("ROLLBACK").await;
                    return Err(e);
                }
            };
            if n > 0 {
                for (p, o) in &stored_now {
                    conn.exec_drop(
                        "INSERT INTO omrs_sync_offsets (topic, kafka_partition, next_offset, updated_at) VALUES (?, ?, ?, NOW(3))
                         ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), updated_at = VALUES(updated_at)",
                        (topic.as_str(), *p, *o),
                    )
                    .await
                    .map_err(|e| SinkError::db("storing offsets", e))?;
                }
            }
            // Dead letters are durable in Kafka before the batch commits: never lost.
            crate::kafka::send_dead_letters(&producer, &dlq_topic, "hq_mysql", &topic, &outcome.dead).await?;
            conn.query_drop("COMMIT").await.map_err(|e| SinkError::db("committing", e))?;
            let committed = now_ms();
            let m = metrics();
            m.batch_latency.with_label_values(&["hq_mysql"]).observe(started.elapsed().as_secs_f64());
            for ((table, op), k) in &outcome.applied {
                m.hq_rows_applied.with_label_values(&[table.as_str(), op]).inc_by(*k);
                total_applied += k;
            }
            for (table, k) in &outcome.conflicts {
                m.conflicts.with_label_values(&["hq_mysql", table]).inc_by(*k);
            }
            for _ in 0..outcome.merges {
                m.merges.inc();
            }
            for (site, ts) in &outcome.commits {
                m.hq_e2e_latency.with_label_values(&[site]).observe(((committed - ts).max(0)) as f64 / 1000.0);
            }
        }
        let m = metrics();
        m.parked_rows.set(applier.pending_len() as i64);
        m.hq_pending_oldest_age.set(applier.oldest_pending_ms().map(|t| (now_ms() - t) / 1000).unwrap_or(0));
        if let Some(b) = &bar {
            if last_bytes_total.elapsed() > Duration::from_millis(200) {
                b.set_message(format!("{total_applied} rows applied, {} pending", applier.pending_len()));
                last_bytes_total = Instant::now();
            }
        }
        if at_end {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            tracing::info!(rows = total_applied, pending = applier.pending_len(), "omrs.hq.changes applied to its end at start; done");
            drop(reader);
            return Ok(());
        }
    }
}
