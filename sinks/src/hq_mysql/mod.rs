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
//! long) dead-letters that row and the rest of the batch commits; the rows staged against it,
//! in this batch or the next (planned before the rejection was known), wait for it in
//! `omrs_sync_pending` instead of being written as orphans ([`rejected`]).
//!
//! Pipelining: a batch without merges is planned (keys, versions, uuid → id lookups on a second,
//! read-committed connection) while the batch before it is written and committed by a task of
//! its own on the writing connection. What the batch in flight changed is known from the
//! applier's caches, and the rows it deletes are marked so that a read cannot bring them back.
//! A batch with a merge, a merge still waiting for its persons, or a change of a merged person
//! waits for the batch in flight and is planned and written on the writing connection, as
//! merges read and move committed rows. Transactions still commit one at a time, in order.

pub mod apply;
mod canonical;
mod reader;
pub mod rejected;
pub mod schema;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::clock::{now_ms, retry_transient};
use omrs_core::config::Config;
use omrs_core::metrics::metrics;
use omrs_core::topics::TopicNames;

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
    #[arg(long, env = "OMRS_DEMO_DUMP", default_value_os_t = omrs_core::openmrs::default_dump())]
    pub dump: PathBuf,
    /// With --init: build HQ from this site's live schema (the programme's own OpenMRS version
    /// and modules, read with the site's agent credentials: SHOW CREATE TABLE of each of its
    /// tables) instead of the demo dump. HQ starts empty; the sites' snapshots bring the shared
    /// metadata (concepts, locations, users) like everything else.
    #[arg(long, requires = "init", value_name = "SITE")]
    pub schema_from: Option<String>,
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
    crate::mysql_opts(d).db_name(with_db.then(|| d.database.clone())).stmt_cache_size(1024)
}

pub(crate) async fn connect(cfg: &Config, with_db: bool) -> Result<Conn, SinkError> {
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

/// Runs the sink (or `--init`).
pub async fn run(cfg: &Config, args: &HqSinkArgs) -> Result<(), SinkError> {
    if args.init {
        let mut conn = connect(cfg, false).await?;
        if let Some(site) = &args.schema_from {
            let site_cfg = cfg.site(site).ok_or_else(|| SinkError::Usage(format!("--schema-from: site `{site}` is not in the config (sites: {})", cfg.site_names().join(", "))))?;
            let n = schema::init_from_site(&mut conn, &cfg.hq.database.database, &site_cfg.database, args.force).await?;
            match n {
                Some(n) => tracing::info!(database = %cfg.hq.database.database, site = %site, tables = n, "HQ database created from the site's schema (no rows: the sites' snapshots bring them)"),
                None => tracing::info!(database = %cfg.hq.database.database, "HQ database already holds OpenMRS; kept it (use --force to recreate); omrs_sync_ tables ensured"),
            }
            return Ok(());
        }
        let created = schema::init(&mut conn, &cfg.hq.database.database, &args.dump, args.force).await?;
        if created {
            tracing::info!(database = %cfg.hq.database.database, dump = %args.dump.display(), "HQ database created from the OpenMRS schema and shared metadata");
        } else {
            tracing::info!(database = %cfg.hq.database.database, "HQ database already holds OpenMRS; kept it (use --force to recreate); omrs_sync_ tables ensured");
        }
        return Ok(());
    }
    // Tables whose rows the uuid filter took for new and HQ refused: looked up from then on.
    let mut excluded: HashSet<String> = HashSet::new();
    loop {
        let run = retry_transient(
            || run_once(cfg, args, &excluded),
            SinkError::is_transient,
            |e, wait| {
                let kind = match e {
                    SinkError::Db { source: mysql_async::Error::Server(s), .. } if s.code == 1213 => "deadlock",
                    SinkError::Db { .. } => "hq_unavailable",
                    _ => "kafka",
                };
                metrics().sink_errors.with_label_values(&["hq_mysql", kind]).inc();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "transient error; retrying from the last committed batch");
            },
        )
        .await;
        match run {
            Err(SinkError::UuidTaken { table, detail }) => {
                metrics().sink_errors.with_label_values(&["hq_mysql", "uuid_taken"]).inc();
                tracing::warn!(
                    table = %table, error = %detail,
                    "HQ holds a uuid the sink took for new (a writer other than the sink?): the batch rolled back; starting again from the last committed batch, the table's rows looked up"
                );
                excluded.insert(table);
            }
            other => return other,
        }
    }
}

async fn run_once(cfg: &Config, args: &HqSinkArgs, excluded: &HashSet<String>) -> Result<(), SinkError> {
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let topic = names.hq_changes();
    let sink_cfg = &cfg.sinks.hq_mysql;
    let batch_rows = args.batch_rows.unwrap_or(sink_cfg.batch_max_rows).max(1);

    let t_start = Instant::now();
    let mut conn = connect(cfg, true).await?;
    tracing::debug!(ms = t_start.elapsed().as_millis() as u64, "startup: connected");
    // An HQ made by an older version lacks the newer bookkeeping or dashboard tables.
    schema::ensure_bookkeeping(&mut conn).await?;
    tracing::debug!(ms = t_start.elapsed().as_millis() as u64, "startup: bookkeeping ensured");
    let consumer = crate::kafka::consumer(cfg, "hq-mysql")?;
    let out = Outputs { producer: crate::kafka::producer(cfg, "the dead-letter producer")?, topic: topic.clone(), dlq_topic: names.dlq() };

    let stored: Vec<(i32, i64)> = conn
        .exec("SELECT kafka_partition, next_offset FROM omrs_sync_offsets WHERE topic = ?", (topic.as_str(),))
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_offsets", e))?;
    let stored: HashMap<i32, i64> = stored.into_iter().collect();
    // Seek to the offsets stored in HQ (semantics 1), not to a group's.
    let partitions = crate::kafka::assign_at(&consumer, &topic, &stored)?;
    tracing::debug!(ms = t_start.elapsed().as_millis() as u64, "startup: assigned");

    let targets = if args.until_idle { crate::kafka::end_offsets(&consumer, &topic, &partitions)? } else { HashMap::new() };
    tracing::debug!(ms = t_start.elapsed().as_millis() as u64, "startup: watermarks");
    let bar = crate::spinner("hq-mysql", args.quiet);
    // The reader task makes a batch when asked (`asks`), from what has arrived: the next one
    // is asked for as soon as this one's write has begun, and is read and planned meanwhile.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, SinkError>>(1);
    let (asks, ask_rx) = tokio::sync::mpsc::channel::<()>(1);
    let reading = reader::Reading { batch_rows, batch_max: Duration::from_millis(sink_cfg.batch_max_ms), until_idle: args.until_idle, targets };
    let reader = reader::spawn_reader(consumer, topic.clone(), &partitions, stored.clone(), reading, ask_rx, tx)?;
    // The first batch is read while HQ's table model and the sink's state load.
    let _ = asks.try_send(());
    let mut asked = true;
    let mut applier = Applier::load(&mut conn, &cfg.hq.database.database, omrs_core::zone::SiteRules::of(cfg), sink_cfg.fk_wait_timeout_s as i64 * 1000)
        .await?
        .with_max_pending(sink_cfg.max_pending_rows)
        .with_server_fk_checks(sink_cfg.server_fk_checks);
    // HQ's uuids are read on a connection of their own while the first batches are looked up.
    let _uuids_loading = if sink_cfg.uuid_filter {
        let (loading, loaded) = apply::new_rows::spawn_load(connect(cfg, true).await?, cfg.hq.database.database.clone(), excluded.clone());
        applier = applier.with_uuid_filter(loaded);
        Some(loading)
    } else {
        None
    };
    tracing::debug!(ms = t_start.elapsed().as_millis() as u64, "startup: loaded");
    tracing::info!(topic = %topic, offsets = ?stored, pending = applier.pending_len(), "HQ sink started");
    omrs_core::endpoint::ready();
    let mut total_applied: u64 = 0;
    let mut last_bytes_total = Instant::now();
    let mut writer = std::sync::Arc::new(applier.writer());
    // Batches without merges are planned on this connection (ids, versions: committed reads)
    // while the batch before is written on `conn` by a task of its own.
    let mut read_conn = connect(cfg, true).await?;
    let mut idle_conn: Option<Conn> = Some(conn);
    let mut inflight: Option<InFlight> = None;
    let mut reviews_exported: Option<Instant> = None;

    loop {
        // The next batch is asked for once this loop has planned the one before and begun its
        // write, not sooner: a batch made earlier would miss what arrives meanwhile.
        if !asked {
            let _ = asks.try_send(());
        }
        let received = tokio::select! {
            b = rx.recv() => Some(b),
            _ = omrs_core::stop::wait() => None,
        };
        let Some(received) = received else {
            // Stopped: the batch in flight commits; what was read after it is read again from
            // the stored offsets at the next start.
            finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await?;
            tracing::info!(rows = total_applied, pending = applier.pending_len(), "stopped; every batch begun is committed");
            drop(reader);
            return Ok(());
        };
        asked = false;
        let Some(batch) = received else {
            finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await.ok();
            return Err(SinkError::Kafka { context: "reading omrs.hq.changes".into(), message: "the reader task stopped".into(), transient: true });
        };
        let step = async {
            let Batch { records, next: stored_now, at_end } = batch?;
            let started = Instant::now();
            let n = records.len();
            let offsets = (n > 0).then_some(stored_now);
            // A write that has ended is taken in even when nothing new has come: one that failed
            // must be retried now, not when the next record arrives.
            if inflight.as_ref().is_some_and(|f| f.task.is_finished()) {
                finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await?;
            }
            if n > 0 || applier.pending_len() > 0 {
                if applier.needs_sync(&records) {
                    finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await?;
                    let conn = idle_conn.take().ok_or_else(|| SinkError::Schema("internal: no writing connection".into()))?;
                    let (conn, result) = write_in_line(conn, &mut applier, &mut writer, &out, records, offsets).await;
                    idle_conn = Some(conn);
                    let (outcome, committed) = result?;
                    record(&outcome, started, committed, &mut total_applied);
                } else {
                    let planned = applier.plan_batch(&mut read_conn, records).await?;
                    if inflight.is_some() {
                        // Batch n+1 planned (its version packs stored ahead) while n is written.
                        crate::failpoint::failpoint("hq:planned-during-write");
                    }
                    finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await?;
                    let conn = idle_conn.take().ok_or_else(|| SinkError::Schema("internal: no writing connection".into()))?;
                    inflight = Some(spawn_write(planned, conn, writer.clone(), out.clone(), offsets, started));
                }
            }
            Ok::<bool, SinkError>(at_end)
        };
        let at_end = match step.await {
            Ok(at_end) => at_end,
            Err(e) => {
                // Whatever was in flight commits or rolls back before the restart reads the
                // stored offsets.
                finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await.ok();
                return Err(e);
            }
        };
        if at_end {
            finish(&mut inflight, &mut idle_conn, &mut applier, &mut total_applied).await?;
        }
        omrs_core::endpoint::beat();
        let m = metrics();
        m.parked_rows.set(applier.pending_len() as i64);
        m.hq_pending_oldest_age.set(applier.oldest_pending_ms().map(|t| (now_ms() - t) / 1000).unwrap_or(0));
        if reviews_exported.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
            if let Err(e) = apply::export_gauges(&mut read_conn).await {
                tracing::warn!(error = %e, "could not count the open identity reviews");
            }
            reviews_exported = Some(Instant::now());
        }
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

/// Where a batch's offsets and dead letters go.
#[derive(Clone)]
struct Outputs {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    dlq_topic: String,
}

/// A batch with a merge (it reads and moves committed rows) or a schema change (DDL commits on
/// its own, before the batch's transaction), planned and written on the writing connection once
/// the batch before has committed. Returns the outcome and the commit time; the connection comes
/// back whatever happens.
async fn write_in_line(
    mut conn: Conn,
    applier: &mut Applier,
    writer: &mut std::sync::Arc<apply::Writer>,
    out: &Outputs,
    records: Vec<Record>,
    offsets: Option<HashMap<i32, i64>>,
) -> (Conn, Result<(apply::Outcome, i64), SinkError>) {
    if Applier::has_schema_changes(&records) {
        if let Err(e) = applier.evolve(&mut conn, &records).await {
            return (conn, Err(e));
        }
        *writer = std::sync::Arc::new(applier.writer());
    }
    if let Err(e) = conn.query_drop("START TRANSACTION").await {
        return (conn, Err(SinkError::db("beginning a transaction", e)));
    }
    let outcome = match applier.apply(&mut conn, records).await {
        Ok(o) => o,
        Err(e) => {
            let _ = conn.query_drop("ROLLBACK").await;
            return (conn, Err(e));
        }
    };
    match commit(&mut conn, &out.topic, offsets.as_ref(), &out.producer, &out.dlq_topic, &outcome).await {
        Ok(committed) => {
            applier.written(applier.generation());
            (conn, Ok((outcome, committed)))
        }
        Err(e) => (conn, Err(e)),
    }
}

/// Writes and commits a planned batch on the writing connection, in a task of its own, while
/// the loop plans the next one.
fn spawn_write(planned: apply::PlannedBatch, conn: Conn, writer: std::sync::Arc<apply::Writer>, out: Outputs, offsets: Option<HashMap<i32, i64>>, started: Instant) -> InFlight {
    let generation = planned.generation;
    let task = tokio::spawn(async move {
        let mut conn = conn;
        let t0 = Instant::now();
        conn.query_drop("START TRANSACTION").await.map_err(|e| SinkError::db("beginning a transaction", e))?;
        let (outcome, failed) = match planned.write(&writer, &mut conn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = conn.query_drop("ROLLBACK").await;
                return Err(e);
            }
        };
        let t_write = t0.elapsed();
        // Batch n written, not committed; n+1 may be being planned.
        crate::failpoint::failpoint("hq:written-uncommitted");
        let committed = commit(&mut conn, &out.topic, offsets.as_ref(), &out.producer, &out.dlq_topic, &outcome).await?;
        tracing::debug!(write_ms = t_write.as_millis() as u64, commit_ms = (t0.elapsed() - t_write).as_millis() as u64, "batch written");
        Ok(Written { conn, outcome, failed, committed })
    });
    InFlight { task, generation, started }
}

/// A planned batch being written and committed by a task of its own.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Written, SinkError>>,
    generation: u64,
    started: Instant,
}

struct Written {
    conn: Conn,
    outcome: apply::Outcome,
    failed: rejected::Rejected,
    committed: i64,
}

/// Waits for the batch in flight, if any: its connection comes back for the next one, and the
/// applier learns which of its rows HQ did not write (rejected, or parked for a rejected row),
/// before the next batch's write starts: that write must not reference them either.
async fn finish(inflight: &mut Option<InFlight>, idle: &mut Option<Conn>, applier: &mut Applier, total_applied: &mut u64) -> Result<(), SinkError> {
    let Some(f) = inflight.take() else { return Ok(()) };
    let written = f
        .task
        .await
        .map_err(|e| SinkError::Unavailable(format!("the HQ writing task stopped: {e}")))??;
    applier.forget(&written.failed);
    applier.written(f.generation);
    record(&written.outcome, f.started, written.committed, total_applied);
    *idle = Some(written.conn);
    Ok(())
}

/// Ends a batch's transaction: the consumed offsets with its rows (semantics 1), its dead
/// letters durable in Kafka before the commit (never lost), then COMMIT. Returns the commit
/// time.
async fn commit(
    conn: &mut Conn,
    topic: &str,
    offsets: Option<&HashMap<i32, i64>>,
    producer: &rdkafka::producer::FutureProducer,
    dlq_topic: &str,
    outcome: &apply::Outcome,
) -> Result<i64, SinkError> {
    // One statement for every partition the batch read (one each was sixteen round trips a
    // commit on a sixteen-partition topic).
    let mut offsets: Vec<(i32, i64)> = offsets.into_iter().flatten().map(|(p, o)| (*p, *o)).collect();
    offsets.sort_unstable();
    if !offsets.is_empty() {
        let rows = vec!["(?, ?, ?, NOW(3))"; offsets.len()].join(", ");
        let params: Vec<mysql_async::Value> = offsets.iter().flat_map(|(p, o)| [topic.into(), (*p).into(), (*o).into()]).collect();
        conn.exec_drop(
            format!(
                "INSERT INTO omrs_sync_offsets (topic, kafka_partition, next_offset, updated_at) VALUES {rows}
                 ON DUPLICATE KEY UPDATE next_offset = VALUES(next_offset), updated_at = VALUES(updated_at)"
            ),
            params,
        )
        .await
        .map_err(|e| SinkError::db("storing offsets", e))?;
    }
    crate::kafka::send_dead_letters(producer, dlq_topic, "hq_mysql", topic, &outcome.dead).await?;
    conn.query_drop("COMMIT").await.map_err(|e| SinkError::db("committing", e))?;
    Ok(now_ms())
}

/// Metrics of a committed batch.
fn record(outcome: &apply::Outcome, started: Instant, committed: i64, total_applied: &mut u64) {
    let m = metrics();
    m.batch_latency.with_label_values(&["hq_mysql"]).observe(started.elapsed().as_secs_f64());
    for ((table, op), k) in &outcome.applied {
        m.hq_rows_applied.with_label_values(&[table.as_str(), op]).inc_by(*k);
        *total_applied += k;
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
