//! The consistent initial snapshot: without a global lock on MariaDB, with one held for
//! milliseconds on MySQL.
//!
//! `START TRANSACTION WITH CONSISTENT SNAPSHOT` fixes one InnoDB view; MariaDB's session status
//! `binlog_snapshot_file`/`binlog_snapshot_position` names the binlog position that view
//! corresponds to exactly, so streaming from there has no gap and no overlap. MySQL has no such
//! status: the agent takes `FLUSH TABLES WITH READ LOCK`, opens the view, reads the position
//! (`SHOW MASTER STATUS`, `SHOW BINARY LOG STATUS` on 8.4+) and unlocks; no commit can fall
//! between the view and the position. A user without RELOAD gets table locks on the captured
//! tables instead, and on MySQL 8.0+ a backup lock that holds DDL for the snapshot's length
//! ([`tables_view`]). The lock's wait is bounded (`lock_wait_timeout`), and the time it was
//! held is logged and measured (`omrs_stream_snapshot_lock_ms`). Tables go in
//! FK-dependency order (parents first), in chunks by integer primary key. Each chunk's `op:"r"`
//! events and the progress (table, last key) are one Kafka transaction, so a crash resumes
//! mid-table.
//!
//! A resumed snapshot opens a new view at a later position. The rows read under each view form a
//! [`Segment`]; while streaming replays the binlog from the first view's position, a change to a
//! row is dropped when the row's segment was read at or after that change's position, because
//! the row read already contains it.
//!
//! Each row's event is written as JSON straight from the result row by its table's plan
//! ([`TablePlan::for_result`], `encode/text.rs`), as the binlog's rows are.

use std::sync::Arc;

use mysql_async::prelude::Queryable;
use omrs_core::clock::now_ms;
use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::model::TableModel;
use omrs_core::metrics::metrics;

use crate::checkpoint::{Checkpoint, Position, Segment};
use crate::convert::scrubbed;
use crate::encode::{source_parts, RowEncoder, TablePlan};
use crate::producer::Batch;
use crate::stream::{resolve_refs, resolve_uuid};
use crate::server::{grant_error, is_grant_error, Kind};
use crate::{connect, Agent, IngestError};

type Resume = (Vec<String>, Vec<Segment>, usize, Option<i64>, u64);

pub async fn run(agent: &mut Agent, resume: Option<Resume>) -> Result<Option<Checkpoint>, IngestError> {
    let (tables, mut segments, next_table, mut after_key, mut rows_done) = match resume {
        Some(r) => r,
        None => (agent.model.order.clone(), Vec::new(), 0, None, 0),
    };
    let site = agent.site.name.clone();
    let db = agent.model.database.clone();

    let (mut snap, position, ts_ms, backup) = open_view(agent).await?;
    let mut pending: Batch = agent.producer.batch();
    if segments.is_empty() {
        // A fresh snapshot: the schema history starts here, and every table's shape goes
        // ahead of the rows, in their transaction.
        agent.producer.aside(crate::schema::base_records(&agent.model, &position)).await?;
        base_shapes(agent, &tables, &position, ts_ms, &mut pending);
    }
    segments.push(Segment { table_idx: next_table, after_key, position: position.clone() });
    tracing::info!(site = %site, file = %position.file, pos = position.pos, tables = tables.len(), from_table = next_table, "snapshot started");

    let bar = progress_bar(&mut snap, &db, agent.quiet, rows_done).await;

    let mut chunks = Chunks::default();
    // Every row of this view has the same `source` but for its row number.
    source_parts(agent.server_id, None, (&position.file, position.pos), ts_ms, true, &mut chunks.src_head, &mut chunks.src_tail);
    let mut pending_cp: Option<Checkpoint> = None;
    for (ti, name) in tables.iter().enumerate().skip(next_table) {
        let Some(table) = agent.model.table(name).cloned() else {
            after_key = None;
            continue;
        };
        if let Some(pb) = &bar {
            pb.set_message(name.clone());
        }
        let scrub = scrubbed(&table, &agent.scrub);
        let cols: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).filter(|c| !scrub.contains(c)).collect();
        let select = cols.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(",");
        let int_pk = table.int_pk().map(str::to_string);
        loop {
            let sql = match (&int_pk, after_key) {
                (Some(pk), Some(k)) => format!("SELECT {select} FROM `{db}`.`{name}` WHERE `{pk}` > {k} ORDER BY `{pk}` LIMIT {}", agent.tuning.chunk_rows),
                (Some(pk), None) => format!("SELECT {select} FROM `{db}`.`{name}` ORDER BY `{pk}` LIMIT {}", agent.tuning.chunk_rows),
                (None, _) => format!("SELECT {select} FROM `{db}`.`{name}`"),
            };
            let rows: Vec<mysql_async::Row> = snap.query(sql).await.map_err(|e| IngestError::site(&format!("reading {name}"), e))?;
            let n = rows.len();
            let last_key = read_rows(agent, &table, after_key, rows, (&mut chunks, &mut rows_done), &mut pending).await?;
            let table_done = int_pk.is_none() || n < agent.tuning.chunk_rows as usize;
            let cp = if table_done {
                Checkpoint::Snapshot { tables: tables.clone(), segments: segments.clone(), next_table: ti + 1, after_key: None, rows: rows_done }
            } else {
                Checkpoint::Snapshot { tables: tables.clone(), segments: segments.clone(), next_table: ti, after_key: last_key, rows: rows_done }
            };
            // Small tables share a Kafka transaction: a batch goes out once it holds a chunk's
            // worth of rows, with the checkpoint that covers all of it.
            if pending.len() >= agent.tuning.chunk_rows as usize {
                send_pending(agent, &mut pending, cp).await?;
            } else {
                pending_cp = Some(cp);
            }
            metrics().snapshot_rows.with_label_values(&[&site, name]).inc_by(n as u64);
            metrics().events_in.with_label_values(&["ingest", &site, name, "r"]).inc_by(n as u64);
            if let Some(pb) = &bar {
                pb.set_position(rows_done);
            }
            omrs_core::endpoint::beat();
            if omrs_core::stop::requested() {
                // Stopped between chunks: what was read is committed with its checkpoint, and
                // the snapshot resumes from there at the next start.
                if let Some(cp) = pending_cp.take().filter(|_| !pending.is_empty()) {
                    send_pending(agent, &mut pending, cp).await?;
                }
                agent.producer.wait().await?;
                let _ = snap.query_drop("COMMIT").await;
                release_backup(backup).await;
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                tracing::info!(site = %site, rows = rows_done, table = %name, "stopped during the snapshot; it resumes from its checkpoint");
                return Ok(None);
            }
            if table_done {
                after_key = None;
                metrics().snapshot_tables_done.with_label_values(&[&site]).set(ti as i64 + 1);
                break;
            }
            after_key = last_key;
        }
    }
    if let Some(cp) = pending_cp.take().filter(|_| !pending.is_empty()) {
        send_pending(agent, &mut pending, cp).await?;
    }
    snap.query_drop("COMMIT").await.map_err(|e| IngestError::site("ending the snapshot", e))?;
    release_backup(backup).await;
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let start = segments.first().map(|s| s.position.clone()).unwrap_or(position);
    let cp = Checkpoint::Streaming { position: start, skip_rows: 0, tables, segments };
    agent.producer.send(Default::default(), cp.clone()).await?;
    agent.producer.wait().await?;
    tracing::info!(site = %site, rows = rows_done, "snapshot done; streaming");
    Ok(Some(cp))
}

/// A connection holding a consistent snapshot view, the binlog position that view corresponds
/// to, the site clock then, and the connection holding a backup lock until the snapshot ends
/// (MySQL 8.0+ without RELOAD). Sets the agent's `server_id`.
async fn open_view(agent: &mut Agent) -> Result<(mysql_async::Conn, Position, i64, Option<mysql_async::Conn>), IngestError> {
    let mut snap = connect(&agent.site).await?;
    snap.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(|e| IngestError::site("setting the snapshot isolation level", e))?;
    let (position, backup) = match agent.server.kind {
        Kind::MariaDb => (mariadb_view(&mut snap).await?, None),
        Kind::MySql => mysql_view(&mut snap, agent).await?,
    };
    let ts_ms: i64 = snap
        .query_first::<f64, _>("SELECT UNIX_TIMESTAMP(NOW(3)) * 1000")
        .await
        .map_err(|e| IngestError::site("reading the site clock", e))?
        .unwrap_or(0.0) as i64;
    let server_id: u32 = snap
        .query_first("SELECT @@server_id")
        .await
        .map_err(|e| IngestError::site("reading server_id", e))?
        .unwrap_or(0);
    agent.server_id = server_id;
    Ok((snap, position, ts_ms, backup))
}

/// MariaDB: the view, and the position its session status names; no lock.
async fn mariadb_view(snap: &mut mysql_async::Conn) -> Result<Position, IngestError> {
    snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(|e| IngestError::site("starting the consistent snapshot", e))?;
    let status: Vec<(String, String)> = snap
        .query("SHOW SESSION STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(|e| IngestError::site("reading the snapshot's binlog position", e))?;
    let get = |k: &str| status.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    match (get("binlog_snapshot_file"), get("binlog_snapshot_position")) {
        (Some(file), Some(pos)) if !file.is_empty() => Ok(Position { file, pos: pos.parse().unwrap_or(4), gtid: None, gtid_set: None }),
        _ => Err(IngestError::Refused(
            "the server does not report binlog_snapshot_file/binlog_snapshot_position (a MariaDB feature): if this is a MySQL server, set `flavor = \"mysql\"` under [sites.database] (or leave it at \"auto\")".into(),
        )),
    }
}

/// How long the agent waits for a lock (global or tables) before it gives up and retries later,
/// rather than hold the clinic's writes queued behind a long query.
const LOCK_WAIT_S: u32 = 10;

/// A lock error as the agent reports it: a wait that timed out is retried later; a missing
/// grant names what to grant.
fn lock_error(what: &str, grant: &str, e: mysql_async::Error) -> IngestError {
    match &e {
        mysql_async::Error::Server(s) if s.code == 1205 => IngestError::Site { context: format!("taking {what} (waited {LOCK_WAIT_S} s for a long query or lock at the site; retrying later)"), source: e },
        _ => grant_error(&format!("taking {what} for the snapshot"), grant, e),
    }
}

/// The view opened and its position read, on `snap`, while commits are held by a lock.
async fn view_and_position(snap: &mut mysql_async::Conn, server: &crate::server::Server) -> Result<Position, IngestError> {
    snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(|e| IngestError::site("starting the consistent snapshot", e))?;
    let row: Option<mysql_async::Row> = snap
        .query_first(server.binlog_status_sql())
        .await
        .map_err(|e| grant_error("reading the binlog position", "REPLICATION CLIENT", e))?;
    let row = row.ok_or_else(|| IngestError::Refused("the server reports no binary log position (is log_bin on?)".into()))?;
    let file: Option<String> = row.get(0);
    let pos: Option<u64> = row.get(1);
    // MySQL's fifth column: the executed GTID set, read in the same statement as the position,
    // under the lock, so the two agree.
    let gtids: Option<String> = if row.len() > 4 { row.get::<Option<String>, _>(4).flatten() } else { None };
    match (file, pos) {
        (Some(file), Some(pos)) if !file.is_empty() => {
            let gtid_set = match gtids.as_deref().map(str::trim).filter(|g| !g.is_empty()).map(crate::gtid::GtidSet::parse) {
                Some(Ok(set)) => Some(set.to_string()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the server's executed GTID set could not be read: the agent resumes by file and position only");
                    None
                }
                None => None,
            };
            Ok(Position { file, pos, gtid: None, gtid_set })
        }
        _ => Err(IngestError::Refused("the server reports no binary log position (is log_bin on?)".into())),
    }
}

/// MySQL: the view opened and its position read under `FLUSH TABLES WITH READ LOCK`, held for
/// as short a time as that takes. A user without RELOAD (a managed server often grants none)
/// gets table locks instead ([`tables_view`]). Returns the connection that holds the backup
/// lock until the snapshot ends, when one was taken.
async fn mysql_view(snap: &mut mysql_async::Conn, agent: &Agent) -> Result<(Position, Option<mysql_async::Conn>), IngestError> {
    let site = agent.site.name.as_str();
    snap.query_drop(format!("SET SESSION lock_wait_timeout = {LOCK_WAIT_S}"))
        .await
        .map_err(|e| IngestError::site("setting lock_wait_timeout", e))?;
    let t = std::time::Instant::now();
    match snap.query_drop("FLUSH TABLES WITH READ LOCK").await {
        Ok(()) => {}
        Err(e) if is_grant_error(&e) => {
            tracing::info!(site, error = %e, "no global read lock (the user lacks RELOAD): the snapshot takes table locks instead");
            return tables_view(snap, agent).await;
        }
        Err(e) => return Err(lock_error("the global read lock", "RELOAD", e)),
    }
    let locked = view_and_position(snap, &agent.server).await;
    // Unlocked whatever happened; the view stays open.
    let unlocked = snap.query_drop("UNLOCK TABLES").await.map_err(|e| IngestError::site("releasing the global read lock", e));
    let held = t.elapsed();
    let position = locked?;
    unlocked?;
    metrics().snapshot_lock_ms.with_label_values(&[site]).set(held.as_millis() as i64);
    tracing::info!(site, held_ms = held.as_millis() as u64, file = %position.file, pos = position.pos, gtid_set = position.gtid_set.as_deref().unwrap_or(""), "global read lock held while the snapshot view opened");
    Ok((position, None))
}

/// MySQL without RELOAD (as MySQL Shell's dump does): a second connection takes `LOCK TABLES …
/// READ` on every captured table, which waits for the transactions writing them to commit and
/// holds new ones; the view opens and the position is read on `snap`; the tables unlock. No
/// commit to a captured table falls between the view and the position (a commit to another
/// table may, and is not captured). On MySQL 8.0+ the second connection first takes `LOCK
/// INSTANCE FOR BACKUP` (BACKUP_ADMIN), which lets writes go on but holds DDL until the
/// snapshot ends, so a clinic's ALTER cannot invalidate the view half-way; without that grant
/// the snapshot goes on and a DDL during it makes the agent read the table again later.
async fn tables_view(snap: &mut mysql_async::Conn, agent: &Agent) -> Result<(Position, Option<mysql_async::Conn>), IngestError> {
    let site = agent.site.name.as_str();
    let mut lock = connect(&agent.site).await?;
    lock.query_drop(format!("SET SESSION lock_wait_timeout = {LOCK_WAIT_S}"))
        .await
        .map_err(|e| IngestError::site("setting lock_wait_timeout", e))?;
    let server = &agent.server;
    let mut backup = false;
    if server.detected == Kind::MySql && server.number >= (8, 0, 0) {
        match lock.query_drop("LOCK INSTANCE FOR BACKUP").await {
            Ok(()) => backup = true,
            Err(e) if is_grant_error(&e) => {
                tracing::warn!(site, error = %e, "no backup lock (the user lacks BACKUP_ADMIN): a DDL at the clinic during the snapshot will make the agent read that table again")
            }
            Err(e) => return Err(lock_error("the backup lock", "BACKUP_ADMIN", e)),
        }
    }
    let db = agent.model.database.replace('`', "``");
    let list = agent.model.order.iter().map(|t| format!("`{db}`.`{}` READ", t.replace('`', "``"))).collect::<Vec<_>>().join(", ");
    let t = std::time::Instant::now();
    lock.query_drop(format!("LOCK TABLES {list}"))
        .await
        .map_err(|e| lock_error("table locks", "RELOAD (a global read lock, held for milliseconds) or LOCK TABLES on the OpenMRS database (table locks)", e))?;
    let locked = view_and_position(snap, server).await;
    let unlocked = lock.query_drop("UNLOCK TABLES").await.map_err(|e| IngestError::site("releasing the table locks", e));
    let held = t.elapsed();
    let position = locked?;
    unlocked?;
    metrics().snapshot_lock_ms.with_label_values(&[site]).set(held.as_millis() as i64);
    tracing::info!(
        site, held_ms = held.as_millis() as u64, tables = agent.model.order.len(), backup_lock = backup, file = %position.file, pos = position.pos, gtid_set = position.gtid_set.as_deref().unwrap_or(""),
        "table locks held while the snapshot view opened"
    );
    Ok((position, if backup { Some(lock) } else { let _ = lock.disconnect().await; None }))
}

/// Ends the backup lock taken for the snapshot, if one was.
async fn release_backup(backup: Option<mysql_async::Conn>) {
    if let Some(mut c) = backup {
        let _ = c.query_drop("UNLOCK INSTANCE").await;
        let _ = c.disconnect().await;
    }
}

/// The progress bar (unless quiet), its length an estimate of the rows left.
async fn progress_bar(snap: &mut mysql_async::Conn, db: &str, quiet: bool, rows_done: u64) -> Option<indicatif::ProgressBar> {
    let estimate: u64 = snap
        .query_first::<Option<u64>, _>(format!("SELECT SUM(table_rows) FROM information_schema.tables WHERE table_schema = '{}'", db.replace('\'', "''")))
        .await
        .ok()
        .flatten()
        .flatten()
        .unwrap_or(0);
    (!quiet).then(|| {
        let pb = indicatif::ProgressBar::new(estimate.max(rows_done));
        pb.set_style(
            indicatif::ProgressStyle::with_template("snapshot {spinner} [{bar:30}] {pos}/~{len} rows  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(rows_done);
        pb
    })
}

/// Every captured table's shape as the snapshot sees it ([`crate::schema::base_shape`]), as
/// schema events ahead of the rows.
fn base_shapes(agent: &Agent, tables: &[String], position: &Position, ts_ms: i64, pending: &mut Batch) {
    for (i, name) in tables.iter().enumerate() {
        let Some(table) = agent.model.table(name) else { continue };
        let shape = crate::schema::base_shape(table, &agent.scrub);
        let source = Source { server_id: agent.server_id, gtid: None, file: position.file.clone(), pos: position.pos, row: i as u32, ts_ms, snapshot: true };
        pending.push_event(&ChangeEvent::schema(agent.site.name.clone(), shape, source, ts_ms));
    }
}

/// Sends the rows gathered so far with the checkpoint that covers them; `pending` starts again
/// with one of the producer's spare batches.
async fn send_pending(agent: &mut Agent, pending: &mut Batch, cp: Checkpoint) -> Result<(), IngestError> {
    let full = std::mem::replace(pending, agent.producer.batch());
    agent.producer.send(full, cp).await
}

/// Reused from chunk to chunk: the current table's plan (from its first chunk's columns) and
/// the row encoder's buffers, and the view's `source` object around the row number.
#[derive(Default)]
struct Chunks {
    plan: Option<Arc<TablePlan>>,
    enc: RowEncoder,
    refs: Vec<u8>,
    key: Vec<u8>,
    src_head: Vec<u8>,
    src_tail: Vec<u8>,
}

/// One chunk's rows as `op:"r"` events into `pending`, written straight to JSON by the table's
/// plan ([`TablePlan::for_result`]), numbered from `rows_done`.
/// Returns the last integer key read (`after_key` when there are no rows).
async fn read_rows(
    agent: &mut Agent,
    table: &Arc<TableModel>,
    after_key: Option<i64>,
    rows: Vec<mysql_async::Row>,
    (st, rows_done): (&mut Chunks, &mut u64),
    pending: &mut Batch,
) -> Result<Option<i64>, IngestError> {
    let mut last_key = after_key;
    let Some(first) = rows.first() else { return Ok(last_key) };
    let (site, int_pk) = (agent.site.name.clone(), table.int_pk().is_some());
    let plan = match &st.plan {
        Some(p) if Arc::ptr_eq(&p.table, table) => p.clone(),
        _ => {
            let p = Arc::new(TablePlan::for_result(first.columns_ref(), table.clone(), &site, &agent.model, &mut agent.resolver));
            st.plan = Some(p.clone());
            p
        }
    };
    // Processing time, once per chunk.
    let ts_ms = now_ms();
    for r in &rows {
        plan.decode_text_row(r, &mut st.enc);
        let key = plan.int_key(&st.enc);
        if int_pk {
            last_key = key;
        }
        let uuid = resolve_uuid(agent, &plan, &st.enc, key, Op::Read).await?;
        resolve_refs(agent, &site, &plan, &st.enc, &mut st.refs).await?;
        let row = (*rows_done % u32::MAX as u64) as u32;
        *rows_done += 1;
        plan.write_event(&st.enc, Op::Read, uuid.as_deref(), &st.refs, (&st.src_head, row, &st.src_tail), ts_ms, &mut st.key, pending);
    }
    Ok(last_key)
}
