//! Binlog tailing: from a checkpoint position, decode row events of the site database into
//! change events, group whole site transactions into Kafka transactions with the checkpoint
//! that follows them, send heartbeats while the site is quiet, and refresh the table model on
//! DDL.
//!
//! MariaDB specifics (checked on 10.11):
//! - `SET @mariadb_slave_capability=4` before the dump, or GTID events become dummy queries;
//! - GTID (162) and GTID_LIST (163) events reach mysql_common as unknown events: GTID is decoded
//!   here (seq: bytes 0–7, domain: bytes 8–11, server id from the header);
//! - the first ROTATE comes before the format description, so its name still carries the 4
//!   checksum bytes: the requested file name is trusted instead;
//! - a purged or unknown file only errors on the first `next()`.
//!
//! Rows are encoded straight from the row events into the JSON of their change events
//! ([`crate::encode`]), and complete site transactions are streamed to the producer task while
//! the Kafka transaction that will hold them is still open; it commits with the checkpoint.
//!
//! Very large site transactions (more than `max_txn_events` captured rows) are split: the rows
//! so far are committed with a checkpoint at the *start* of the site transaction plus the
//! number of its rows already sent (`skip_rows`); a restart re-reads the transaction from its
//! start and skips that many rows. Such a transaction is then visible in Kafka in parts; nothing
//! is lost or doubled.
//!
//! Resuming is by GTID (`@slave_connect_state`) when the checkpoint has one and the server has
//! GTIDs, else by file and position (after a snapshot, and for a split transaction).
//!
//! MySQL specifics (decoded on MySQL's own binlog files, see tests/mysql_binlogs.rs): a
//! transaction starts with GTID (33), tagged GTID (42, 8.4+) or ANONYMOUS_GTID (34); GTIDs are
//! kept as `uuid[:tag]:gno` in checkpoints, and resuming is by file and position (see
//! `open`). A compressed transaction (TRANSACTION_PAYLOAD, 40, 8.0.20+) arrives as the payload
//! event followed by its decompressed events, whose headers carry no position: their rows take
//! the payload's position with row numbers running across the transaction, and the
//! transaction ends at the payload's end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStream;
use mysql_common::binlog::events::{Event, EventData, QueryEvent, RotateEvent};
use omrs_core::clock::now_ms;
use omrs_core::envelope::{ChangeEvent, Row, Source};
use omrs_core::metrics::metrics;
use omrs_core::model::{Model, TableModel};
use serde_json::Value as J;

use crate::checkpoint::{Checkpoint, Position, Segment};
use crate::producer::{Batch, STREAM_BYTES};
use crate::{Agent, IngestError};

mod open;
mod rows;

pub(crate) use rows::{resolve_refs, resolve_uuid};

/// The envelope's `key` of a row: its primary key columns, or every column of a table without
/// one.
pub(crate) fn row_key(table: &TableModel, image: &Row) -> Row {
    if table.pk.is_empty() {
        return image.clone();
    }
    table.pk.iter().map(|k| (k.clone(), image.get(k).cloned().unwrap_or(J::Null))).collect()
}

/// Which snapshot segment a row belongs to, and so from which position its changes count.
struct Segments {
    table_idx: HashMap<String, usize>,
    segments: Vec<Segment>,
    tables: Vec<String>,
}

impl Segments {
    /// The position a change to (table, key) must be after to be applied, if any.
    fn floor(&self, table: &str, key: Option<i64>) -> Option<&Position> {
        let ti = *self.table_idx.get(table)?;
        self.segments
            .iter()
            .rev()
            .find(|s| s.table_idx < ti || (s.table_idx == ti && (s.after_key.is_none() || key.is_some_and(|k| Some(k) > s.after_key))))
            .map(|s| &s.position)
    }
    fn max(&self) -> Option<&Position> {
        self.segments.iter().map(|s| &s.position).max_by(|a, b| a.key().cmp(&b.key()))
    }
}

fn is_ddl(q: &str) -> bool {
    let q = q.trim_start().to_ascii_uppercase();
    ["ALTER ", "CREATE ", "DROP ", "RENAME ", "TRUNCATE "].iter().any(|p| q.starts_with(p))
}

pub async fn run(agent: &mut Agent, cp: Checkpoint, until_caught_up: bool) -> Result<(), IngestError> {
    let Checkpoint::Streaming { position, skip_rows, tables, segments } = cp else {
        return Err(IngestError::Checkpoint("streaming started without a streaming checkpoint".into()));
    };
    let segs = Segments { table_idx: tables.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect(), segments, tables };
    let opened = open::open(agent, &position, skip_rows).await?;
    let mut stream = opened.stream;
    let mut tail = Tail::new(agent, position, skip_rows, segs, opened.by_gtid, opened.target);
    loop {
        if omrs_core::stop::requested() {
            return tail.stop().await;
        }
        if until_caught_up && tail.caught_up().await? {
            return Ok(());
        }
        match tail.next_event(&mut stream).await {
            // Idle (or a batch's age reached): the loop turns.
            Err(_) => tail.idle().await?,
            Ok(None) => return Err(IngestError::Binlog("the server closed the binlog stream".into())),
            Ok(Some(Err(e))) => return Err(tail.read_error(e)),
            Ok(Some(Ok(event))) => tail.on_event(&stream, &event).await?,
        }
    }
}

/// Where the tail is in the binlog, and in the site transaction it is reading.
struct Cursor {
    file: String,
    pos: u64,
    last_gtid: Option<String>,
    /// MySQL's executed GTID set through `pos` (None: the server has no GTIDs, or the
    /// checkpoint predates them).
    gtids: Option<crate::gtid::GtidSet>,
    /// No event read yet (the first ROTATE and a purged file are special).
    first: bool,
    /// Rows of the first transaction already sent before a split (see the module docs).
    resume_skip: u64,
    in_txn: bool,
    txn_start: Position,
    txn_gtid: Option<String>,
    txn_rows_seen: u64,
    /// A MariaDB GTID flagged standalone: a DDL with no COMMIT after it.
    standalone: bool,
    /// Inside a MySQL compressed transaction: where its payload event starts and ends.
    payload: Option<(u64, u64)>,
    /// Rows of the transaction's earlier row events inside a payload (they share its position).
    row_base: u32,
    /// A DDL changed the schema history: commit a checkpoint after it at once.
    ddl: bool,
}

impl Cursor {
    fn here(&self) -> Position {
        Position { file: self.file.clone(), pos: self.pos, gtid: self.last_gtid.clone(), gtid_set: self.gtids.as_ref().map(|g| g.to_string()) }
    }
    /// A site transaction starts at `start_pos`.
    fn begin(&mut self, start_pos: u64) {
        self.in_txn = true;
        // The GTID set is written only if the transaction is split (`rows.rs`).
        self.txn_start = Position { file: self.file.clone(), pos: start_pos, gtid: self.last_gtid.clone(), gtid_set: None };
        self.txn_rows_seen = 0;
    }
}

/// What has been read and not yet committed. The first `done` events of `batch` are whole
/// site transactions, the rest belong to the transaction being read; `sent` more were streamed
/// to the producer since the last checkpoint. The Kafka transaction ends with the checkpoint
/// that follows them.
struct Pending {
    batch: Batch,
    done: usize,
    sent: usize,
    /// Where the whole transactions end; the checkpoint is built from it at the flush.
    end: Option<Position>,
    since: Instant,
    last_emit: Instant,
}

impl Pending {
    fn any(&self) -> bool {
        self.sent + self.done > 0
    }
}

/// The streaming loop's state: read (`next_event`), process (`on_event` and `rows`), commit
/// (`flush`, at a transaction end, a batch's age, a split, a stop).
struct Tail<'a> {
    agent: &'a mut Agent,
    site: String,
    db: String,
    segs: Segments,
    /// Where the stream was asked to start (for the purged-file error).
    start: Position,
    by_gtid: Option<String>,
    /// The binlog end when streaming began (`--until-caught-up`).
    target: Option<(String, u64)>,
    committed: Position,
    cur: Cursor,
    pend: Pending,
    rows: rows::RowState,
    last_margin: Instant,
}

impl<'a> Tail<'a> {
    fn new(agent: &'a mut Agent, position: Position, skip_rows: u64, segs: Segments, by_gtid: Option<String>, target: Option<(String, u64)>) -> Self {
        let cur = Cursor {
            file: position.file.clone(),
            pos: position.pos,
            last_gtid: position.gtid.clone(),
            gtids: position.gtid_set.as_deref().and_then(|s| match crate::gtid::GtidSet::parse(s) {
                Ok(set) => Some(set),
                Err(e) => {
                    tracing::warn!(error = %e, "the checkpoint's GTID set is unreadable: checkpoints go on without one");
                    None
                }
            }),
            first: true,
            resume_skip: skip_rows,
            in_txn: false,
            txn_start: position.clone(),
            txn_gtid: None,
            txn_rows_seen: 0,
            standalone: false,
            payload: None,
            row_base: 0,
            ddl: false,
        };
        let pend = Pending { batch: agent.producer.batch(), done: 0, sent: 0, end: None, since: Instant::now(), last_emit: Instant::now() };
        Tail {
            site: agent.site.name.clone(),
            db: agent.model.database.clone(),
            agent,
            segs,
            committed: position.clone(),
            start: position,
            by_gtid,
            target,
            cur,
            pend,
            rows: rows::RowState::default(),
            last_margin: Instant::now(),
        }
    }

    /// Commits the whole transactions read, with the checkpoint after them; the transaction
    /// being read waits in the buffer for its end.
    async fn flush_done(&mut self) -> Result<(), IngestError> {
        let cp = streaming_cp(self.pend.end.as_ref().unwrap_or(&self.committed), &self.segs);
        self.pend.end = None;
        let mut rest = self.pend.batch.split_off(self.pend.done, self.agent.producer.batch());
        flush(self.agent, &mut self.pend.batch, &cp, &mut self.committed, &self.site).await?;
        std::mem::swap(&mut self.pend.batch, &mut rest);
        (self.pend.sent, self.pend.done) = (0, 0);
        self.pend.last_emit = Instant::now();
        Ok(())
    }

    /// Stopped: every whole site transaction read is committed with its position; the one being
    /// read (if any) is read again from there at the next start.
    async fn stop(mut self) -> Result<(), IngestError> {
        if self.pend.any() {
            self.flush_done().await?;
        }
        self.agent.producer.wait().await?;
        tracing::info!(site = %self.site, file = %self.committed.file, pos = self.committed.pos, "stopped; every whole transaction read is committed");
        Ok(())
    }

    /// At the binlog end seen at start, with nothing pending: commits the position and says so.
    async fn caught_up(&mut self) -> Result<bool, IngestError> {
        let Some((tf, tp)) = &self.target else { return Ok(false) };
        if self.cur.in_txn || self.pend.any() || (self.cur.file.as_str(), self.cur.pos) < (tf.as_str(), *tp) {
            return Ok(false);
        }
        if (self.committed.file.as_str(), self.committed.pos) < (self.cur.file.as_str(), self.cur.pos) {
            self.agent.producer.send(Batch::default(), streaming_cp(&self.cur.here(), &self.segs)).await?;
        }
        self.agent.producer.wait().await?;
        let r = &self.agent.resolver;
        tracing::info!(
            site = %self.site, file = %self.cur.file, pos = self.cur.pos,
            ref_hits = r.hits, ref_misses = r.misses, ref_unresolved = r.unresolved,
            "caught up with the binlog end seen at start"
        );
        Ok(true)
    }

    /// The next binlog event; Err when none came before the batch's age or the heartbeat is
    /// due. Without a timer while the binlog has events ready (a timer per event costs more
    /// than decoding the event).
    async fn next_event(&self, stream: &mut BinlogStream) -> Result<Option<Result<Event, mysql_async::Error>>, tokio::time::error::Elapsed> {
        if let Some(ev) = stream.next().now_or_never() {
            return Ok(ev);
        }
        let tuning = &self.agent.tuning;
        let wait = if self.pend.any() {
            tuning.batch_age.saturating_sub(self.pend.since.elapsed())
        } else {
            tuning.heartbeat.saturating_sub(self.pend.last_emit.elapsed())
        };
        tokio::time::timeout(wait.max(Duration::from_millis(1)), stream.next()).await
    }

    /// No event for a while: commit what is whole, or send a heartbeat, and refresh the margin.
    async fn idle(&mut self) -> Result<(), IngestError> {
        omrs_core::endpoint::beat();
        if self.pend.any() {
            self.flush_done().await?;
        } else if !self.cur.first && !self.cur.in_txn && self.pend.last_emit.elapsed() >= self.agent.tuning.heartbeat {
            // Not before the stream's first event: a heartbeat says the site is at its clock's
            // time at this position, which is false while a backlog after it is unread. Sent
            // ahead of the backlog (a connection slower than the heartbeat interval), it would
            // give the backlog's events its time, and none of them would be marked late.
            let pos = self.cur.here();
            heartbeat(self.agent, &pos, &self.segs).await?;
            self.committed = pos;
            self.pend.last_emit = Instant::now();
        }
        if !self.cur.in_txn && self.last_margin.elapsed() >= MARGIN_REFRESH {
            refresh_margin(self.agent, &self.cur.file).await;
            self.last_margin = Instant::now();
        }
        Ok(())
    }

    fn read_error(&self, e: mysql_async::Error) -> IngestError {
        let msg = e.to_string();
        if self.cur.first && (msg.contains("Could not find first log file") || msg.contains("1236")) {
            let (site, p) = (&self.site, &self.start);
            return IngestError::Purged(format!(
                "site {site}: the server cannot serve binlog {} at {}: {msg}. If it was purged, run `omrs-stream ingest --site {site} --resnapshot`.",
                p.file, p.pos
            ));
        }
        IngestError::site("reading the binlog", e)
    }

    /// One binlog event: transaction boundaries, DDL, rows.
    async fn on_event(&mut self, stream: &BinlogStream, event: &Event) -> Result<(), IngestError> {
        let h = event.header();
        let etype = h.event_type_raw();
        let (next_pos, start_pos) = match self.cur.payload {
            // An event of a compressed transaction: no position of its own.
            Some((start, end)) if etype != 40 => (end, start),
            _ => {
                let next = h.log_pos() as u64;
                (next, next.saturating_sub(h.event_size() as u64))
            }
        };
        let was_first = std::mem::replace(&mut self.cur.first, false);
        if was_first {
            // The stream has begun (the server's first event comes right before the backlog):
            // the heartbeat's silence counts from here, not from before the connection.
            self.pend.last_emit = Instant::now();
        }
        let end_txn = match etype {
            // ROTATE
            4 => {
                self.on_rotate(event, was_first);
                return Ok(());
            }
            // MariaDB GTID: a transaction starts.
            162 => {
                let d = event.data();
                if d.len() >= 13 {
                    let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
                    let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or([0; 4]));
                    self.cur.txn_gtid = Some(format!("{domain}-{}-{seq}", h.server_id()));
                    self.cur.standalone = d[12] & 1 == 1;
                }
                self.cur.begin(start_pos);
                false
            }
            // MySQL GTID, tagged GTID (8.4+), anonymous GTID: a transaction starts. Standalone
            // until a BEGIN says otherwise: a DDL is a GTID and its statement, with no COMMIT.
            33 | 34 | 42 => {
                self.cur.txn_gtid = match event.read_data() {
                    Ok(Some(EventData::GtidEvent(g))) if etype != 34 => Some(mysql_gtid(&g)),
                    _ => None,
                };
                self.cur.standalone = true;
                self.cur.begin(start_pos);
                false
            }
            // MySQL TRANSACTION_PAYLOAD: the transaction's events follow, decompressed.
            40 => {
                self.cur.payload = Some((start_pos, next_pos));
                self.cur.row_base = 0;
                if !self.cur.in_txn {
                    self.cur.begin(start_pos);
                }
                false
            }
            // QUERY
            2 => self.on_query(event, start_pos).await?,
            // XID
            16 => true,
            // Row events, v1 and v2
            23 | 24 | 25 | 30 | 31 | 32 => {
                self.on_rows(stream, event, start_pos).await?;
                false
            }
            // FORMAT_DESCRIPTION, ANNOTATE_ROWS, BINLOG_CHECKPOINT, GTID_LIST, TABLE_MAP,
            // HEARTBEAT and the rest
            _ => false,
        };
        if end_txn {
            self.cur.payload = None;
            self.end_txn(next_pos).await?;
            if std::mem::take(&mut self.cur.ddl) {
                // The schema history's records go with the checkpoint after the DDL.
                self.pend.done = self.pend.batch.len();
                self.pend.end = Some(self.cur.here());
                self.flush_done().await?;
            }
        } else if !self.cur.in_txn && next_pos > 0 {
            self.cur.pos = next_pos;
        }
        Ok(())
    }

    fn on_rotate(&mut self, event: &Event, was_first: bool) {
        let Ok(r) = event.read_event::<RotateEvent>() else { return };
        if !was_first {
            self.cur.file = r.name().trim_end_matches('\0').to_string();
            self.cur.pos = r.position();
        } else if self.by_gtid.is_some() {
            // Resuming by GTID, the server names the file. This first ROTATE comes before the
            // format description, so its name still carries the 4 checksum bytes: keep
            // `<base>.<6 digits>`.
            if let Some(name) = strip_rotate_name(&r.name()) {
                self.cur.file = name;
                self.cur.pos = r.position();
            }
        }
    }

    /// BEGIN, COMMIT or a statement (DDL refreshes the table model). True: the transaction ends.
    async fn on_query(&mut self, event: &Event, start_pos: u64) -> Result<bool, IngestError> {
        let q = event.read_event::<QueryEvent>().map_err(|e| IngestError::Binlog(format!("decoding a query event at {}:{start_pos}: {e}", self.cur.file)))?;
        let text = q.query();
        let t = text.trim();
        // MySQL's XA START opens its transaction as BEGIN does (a GTID, then the statement).
        if t.eq_ignore_ascii_case("BEGIN") || t.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("XA START")) {
            if !self.cur.in_txn {
                self.cur.begin(start_pos);
            }
            self.cur.standalone = false;
            return Ok(false);
        }
        if t.eq_ignore_ascii_case("COMMIT") {
            return Ok(true);
        }
        if is_ddl(t) && (q.schema() == self.db || t.contains(&self.db)) {
            let schema = q.schema().into_owned();
            let end = Position { file: self.cur.file.clone(), pos: event.header().log_pos() as u64, gtid: self.cur.txn_gtid.clone(), gtid_set: None };
            let source = Source {
                server_id: event.header().server_id(),
                gtid: self.cur.txn_gtid.clone(),
                file: self.cur.file.clone(),
                pos: start_pos,
                row: 0,
                ts_ms: event.header().timestamp() as i64 * 1000,
                snapshot: false,
            };
            self.on_ddl(t, &schema, &end, source).await?;
        }
        Ok(self.cur.standalone || !self.cur.in_txn)
    }

    /// A DDL of the site database: the schema history follows it (see [`crate::schema`]), the
    /// tables it changed are recorded with the next checkpoint and sent on as schema events
    /// (`op:"s"`, in the site's order: before the rows that have the new shape), and row plans
    /// are made afresh.
    async fn on_ddl(&mut self, ddl: &str, schema: &str, end: &Position, source: Source) -> Result<(), IngestError> {
        let a = &mut *self.agent;
        let current = Model::load(&mut a.query, &self.db, &a.include, &a.exclude).await?;
        let (include, exclude) = (a.include.clone(), a.exclude.clone());
        let captured = move |t: &str| (include.is_empty() || include.iter().any(|i| i == t)) && !exclude.iter().any(|e| e == t);
        let mut next = a.model.clone();
        let scope = crate::schema::Scope { db: &self.db, default: schema };
        let mut records = match crate::schema::apply_ddl(&mut next, scope, ddl, &captured) {
            Ok(crate::schema::Applied::Tables(tables)) => {
                let recs = crate::schema::settle(&mut next, &current, &tables, end, ddl);
                metrics().schema_changes.with_label_values(&[&self.site, "applied"]).inc();
                recs
            }
            Ok(crate::schema::Applied::Nothing) => Vec::new(),
            Err(reason) => {
                tracing::warn!(site = %self.site, ddl = %ddl.chars().take(200).collect::<String>(), reason = %reason, "DDL not followed as a statement: the table model is read from information_schema as it is now");
                metrics().schema_changes.with_label_values(&[&self.site, "information_schema"]).inc();
                let recs = crate::schema::differences(&a.model, &current, end, ddl);
                next = current;
                recs
            }
        };
        for r in records.iter_mut().filter(|r| !r.shape.dropped) {
            // The table's indexes as the site has them now, for HQ to add the new ones.
            r.shape.indexes = Model::indexes(&mut a.query, &self.db, &r.shape.table).await?;
        }
        tracing::info!(site = %self.site, ddl = %ddl.chars().take(200).collect::<String>(), tables = ?records.iter().map(|r| r.table()).collect::<Vec<_>>(), "DDL: schema history updated");
        a.model = next;
        self.rows.plans.clear();
        if !records.is_empty() {
            a.producer.aside(records.iter().map(|r| r.record()).collect()).await?;
            for (i, r) in records.iter().enumerate() {
                let ev = ChangeEvent::schema(self.site.clone(), r.shape.clone(), Source { row: i as u32, ..source.clone() }, now_ms());
                self.pend.batch.push_event(&ev);
            }
            self.cur.ddl = true;
        }
        Ok(())
    }

    /// A site transaction ended at `next_pos`: its events are whole; commit or stream them when
    /// the batch is full.
    async fn end_txn(&mut self, next_pos: u64) -> Result<(), IngestError> {
        self.cur.in_txn = false;
        self.cur.standalone = false;
        self.cur.row_base = 0;
        if let Some(g) = self.cur.txn_gtid.take() {
            if let Some(set) = &mut self.cur.gtids {
                set.add(&g);
            }
            self.cur.last_gtid = Some(g);
        }
        if next_pos > 0 {
            self.cur.pos = next_pos;
        }
        if self.segs.max().is_some_and(|m| m.le(&self.cur.txn_start)) {
            self.segs.segments.clear();
        }
        if self.pend.batch.is_empty() && self.pend.sent == 0 {
            return Ok(());
        }
        if !self.pend.any() {
            self.pend.since = Instant::now();
        }
        self.pend.done = self.pend.batch.len();
        self.pend.end = Some(self.cur.here());
        if self.pend.sent + self.pend.done >= self.agent.tuning.batch_events {
            self.flush_done().await?;
        } else if self.pend.batch.bytes() >= STREAM_BYTES {
            // Whole site transactions only: the buffer holds no partial one here.
            let full = std::mem::replace(&mut self.pend.batch, self.agent.producer.batch());
            self.agent.producer.stream(full).await?;
            self.pend.sent += self.pend.done;
            self.pend.done = 0;
        }
        Ok(())
    }
}

fn streaming_cp(pos: &Position, segs: &Segments) -> Checkpoint {
    Checkpoint::Streaming { position: pos.clone(), skip_rows: 0, tables: segs.tables.clone(), segments: segs.segments.clone() }
}

async fn flush(agent: &mut Agent, batch: &mut Batch, cp: &Checkpoint, committed: &mut Position, site: &str) -> Result<(), IngestError> {
    omrs_core::endpoint::beat();
    let started = Instant::now();
    let full = std::mem::replace(batch, agent.producer.batch());
    agent.producer.send(full, cp.clone()).await?;
    metrics().batch_latency.with_label_values(&["ingest"]).observe(started.elapsed().as_secs_f64());
    metrics().ref_cache_entries.with_label_values(&[site]).set(agent.resolver.len() as i64);
    if let Checkpoint::Streaming { position, .. } = cp {
        *committed = position.clone();
        metrics().ingest_position.with_label_values(&[site, &position.file]).set(position.pos as i64);
    }
    Ok(())
}

/// How often a streaming agent re-reads how many binlog files the server keeps behind it.
const MARGIN_REFRESH: Duration = Duration::from_secs(60);

/// Sets `omrs_stream_ingest_binlog_margin_files` from `SHOW BINARY LOGS` while streaming. A
/// failure only logs: the stream itself will report a lost site.
async fn refresh_margin(agent: &mut Agent, file: &str) {
    match agent.query.query::<mysql_async::Row, _>("SHOW BINARY LOGS").await {
        Ok(rows) => {
            if let Some(idx) = rows.iter().position(|r| r.get::<String, _>(0).as_deref() == Some(file)) {
                metrics().ingest_binlog_margin.with_label_values(&[&agent.site.name]).set(idx as i64);
            }
        }
        Err(e) => tracing::debug!(site = %agent.site.name, error = %e, "could not list the binlogs for the margin"),
    }
}

async fn heartbeat(agent: &mut Agent, pos: &Position, segs: &Segments) -> Result<(), IngestError> {
    let site_ms = agent
        .query
        .query_first::<f64, _>("SELECT UNIX_TIMESTAMP(NOW(3)) * 1000")
        .await
        .map_err(|e| IngestError::site("reading the site clock", e))?
        .unwrap_or(0.0) as i64;
    let local = now_ms();
    metrics().site_clock_skew.with_label_values(&[&agent.site.name]).set((site_ms - local) as f64 / 1000.0);
    let ev = ChangeEvent::heartbeat(
        agent.site.name.clone(),
        Source { server_id: agent.server_id, gtid: pos.gtid.clone(), file: pos.file.clone(), pos: pos.pos, row: 0, ts_ms: site_ms, snapshot: false },
        local,
    );
    agent.producer.send(vec![ev].into(), streaming_cp(pos, segs)).await?;
    metrics().heartbeats.with_label_values(&[&agent.site.name]).inc();
    Ok(())
}

/// `binlog.000002` out of `binlog.000002` followed by checksum bytes.
fn strip_rotate_name(raw: &str) -> Option<String> {
    // The last `.` followed by six digits (the checksum bytes may hold a `.` themselves).
    raw.char_indices().rev().filter(|(_, c)| *c == '.').find_map(|(dot, _)| {
        let digits: String = raw[dot + 1..].chars().take(6).collect();
        (digits.len() == 6 && digits.chars().all(|c| c.is_ascii_digit())).then(|| format!("{}.{digits}", &raw[..dot]))
    })
}


/// A MySQL GTID as MySQL prints it: `uuid:gno`, or `uuid:tag:gno` for a tagged one.
fn mysql_gtid(g: &mysql_common::binlog::events::GtidEvent) -> String {
    match g.tag() {
        Some(tag) => format!("{}:{}:{}", uuid_hex(&g.sid()), tag.as_str(), g.gno()),
        None => format!("{}:{}", uuid_hex(&g.sid()), g.gno()),
    }
}

fn uuid_hex(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}


#[cfg(test)]
mod tests {
    #[test]
    fn rotate_names_lose_their_checksum_bytes() {
        assert_eq!(super::strip_rotate_name("binlog.000002\u{fffd}.\u{fffd}7").as_deref(), Some("binlog.000002"));
        assert_eq!(super::strip_rotate_name("mysql-bin.000123").as_deref(), Some("mysql-bin.000123"));
        assert_eq!(super::strip_rotate_name("garbage"), None);
    }
}
