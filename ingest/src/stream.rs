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
//! MySQL 8 is not tested here. What differs there: GTIDs arrive as GTID_EVENT (33) and resuming
//! by GTID needs COM_BINLOG_DUMP_GTID (`BinlogStreamRequest::with_gtid`), which is not built;
//! the snapshot position has no `binlog_snapshot_*` status (the agent refuses to snapshot); V2
//! row events are decoded by mysql_common as on MariaDB.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;
use mysql_common::binlog::events::{EventData, QueryEvent, RotateEvent, RowsEventData};
use mysql_common::io::ParseBuf;
use omrs_core::clock::now_ms;
use omrs_core::envelope::{ChangeEvent, Op, Row, Source};
use omrs_core::metrics::metrics;
use omrs_core::model::{Model, TableModel};
use serde_json::Value as J;

use crate::checkpoint::{Checkpoint, Position, Segment};
use crate::convert::scrubbed;
use crate::encode::{push_ref, source_parts, RowEncoder, TablePlan};
use crate::producer::{Batch, STREAM_BYTES};
use crate::{connect, Agent, IngestError};

/// Builds one change event: key, uuid, refs; learns the row's uuid for later references.
pub async fn make_event(
    agent: &mut Agent,
    table: &TableModel,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    source: Source,
) -> Result<ChangeEvent, IngestError> {
    let image = match (&after, &before) {
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => return Err(IngestError::Binlog(format!("{}: a row event without an image", table.name))),
    };
    let mut key = Row::new();
    if table.pk.is_empty() {
        for (k, v) in image {
            key.insert(k.clone(), v.clone());
        }
    } else {
        for k in &table.pk {
            key.insert(k.clone(), image.get(k).cloned().unwrap_or(J::Null));
        }
    }
    let id = table.int_pk().and_then(|pk| image.get(pk)).and_then(J::as_i64);
    let uuid = if table.has_uuid {
        image.get("uuid").and_then(J::as_str).map(str::to_string)
    } else if let (Some(parent), Some(id)) = (&table.shared_parent, id) {
        agent.resolver.uuid_of(&agent.model, &mut agent.query, parent, id).await?
    } else {
        None
    };
    if let (true, Some(id), Some(u), false) = (table.has_uuid, id, &uuid, op == Op::Delete) {
        agent.resolver.learn(&table.name, id, u);
    }
    let refs = agent.resolver.refs(&agent.model, &mut agent.query, &agent.site.name, &table.name, image).await?;
    Ok(ChangeEvent {
        op,
        site: agent.site.name.clone(),
        table: Some(table.name.clone()),
        key: Some(key),
        uuid,
        before,
        after,
        refs,
        source,
        ts_ms: now_ms(),
        oversize: None,
    })
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
    let site = agent.site.name.clone();
    let mut segs = Segments {
        table_idx: tables.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect(),
        segments,
        tables,
    };

    let mut conn = connect(&agent.site).await?;
    let server_id: u32 = conn.query_first("SELECT @@server_id").await.map_err(|e| IngestError::site("reading server_id", e))?.unwrap_or(0);
    agent.server_id = server_id;
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(|e| IngestError::site("listing binary logs", e))?;
    let files: Vec<String> = logs.iter().filter_map(|r| r.get::<String, _>(0)).collect();
    let Some(idx) = files.iter().position(|f| *f == position.file) else {
        return Err(IngestError::Purged(format!(
            "site {site}: binlog file {} (position {}) is no longer on the server (oldest retained: {}); it was purged while the agent was behind. \
             Run `omrs-stream ingest --site {site} --resnapshot` to take a fresh snapshot and resume, and raise expire_logs_days / binlog_expire_logs_seconds.",
            position.file,
            position.pos,
            files.first().map(String::as_str).unwrap_or("none")
        )));
    };
    metrics().ingest_binlog_margin.with_label_values(&[&site]).set(idx as i64);
    // The server's binlog retention, for alerts against the longest expected outage
    // (OPERATIONS.md, "Binlog retention"): binlog_expire_logs_seconds where the server has it
    // (MariaDB 10.6+, MySQL 8), else expire_logs_days.
    let retention: Option<f64> = match conn.query_first::<f64, _>("SELECT @@binlog_expire_logs_seconds").await {
        Ok(v) => v,
        Err(_) => conn.query_first::<f64, _>("SELECT @@expire_logs_days * 86400").await.ok().flatten(),
    };
    if let Some(secs) = retention {
        metrics().ingest_binlog_retention.with_label_values(&[&site]).set(secs as i64);
        if secs == 0.0 {
            tracing::info!(site = %site, "the site server never purges its binlogs (retention 0)");
        }
    }
    if idx == 0 && files.len() > 1 {
        tracing::warn!(site = %site, file = %position.file, "the agent's binlog file is the oldest the server retains: the next purge loses changes it has not read");
    }
    let target: Option<(String, u64)> = {
        let row: Option<mysql_async::Row> = conn.query_first("SHOW MASTER STATUS").await.map_err(|e| IngestError::site("reading the binlog end", e))?;
        row.and_then(|r| Some((r.get::<String, _>(0)?, r.get::<u64, _>(1)?)))
    };
    conn.query_drop("SET @mariadb_slave_capability = 4").await.map_err(|e| IngestError::site("announcing GTID capability", e))?;
    // A replica id unique to this connection, so concurrent agents on one server do not kick
    // each other off.
    let replica_id = 1_000_000_000u32 + (rand_u32() % 1_000_000_000);
    // Resume by GTID where the server has GTIDs (it survives a fail-over to a replica whose file
    // names differ), else by file and position. A split transaction resumes at its start by
    // position, since it must be re-read from its first row.
    let server_gtids: String = conn
        .query_first::<Option<String>, _>("SELECT @@GLOBAL.gtid_binlog_pos")
        .await
        .map_err(|e| IngestError::site("reading gtid_binlog_pos", e))?
        .flatten()
        .unwrap_or_default();
    let by_gtid = match (&position.gtid, skip_rows) {
        (Some(g), 0) if !server_gtids.is_empty() && g.split('-').count() == 3 && g.chars().all(|c| c.is_ascii_digit() || c == '-') => Some(g.clone()),
        _ => None,
    };
    let file_bytes = position.file.clone().into_bytes();
    let req = match &by_gtid {
        Some(gtid) => {
            conn.query_drop(format!(
                "SET @slave_connect_state = '{gtid}'; SET @slave_gtid_strict_mode = 0; SET @slave_gtid_ignore_duplicates = 0"
            ))
            .await
            .map_err(|e| IngestError::site("setting the GTID to resume from", e))?;
            BinlogStreamRequest::new(replica_id).with_filename(b"").with_pos(4)
        }
        None => BinlogStreamRequest::new(replica_id).with_filename(&file_bytes).with_pos(position.pos),
    };
    let mut stream = conn.get_binlog_stream(req).await.map_err(|e| IngestError::site("requesting the binlog", e))?;
    tracing::info!(site = %site, file = %position.file, pos = position.pos, gtid = ?by_gtid, skip_rows, "streaming the binlog");

    let db = agent.model.database.clone();
    let mut cur_file = position.file.clone();
    let mut cur_pos = position.pos;
    let mut last_gtid = position.gtid.clone();
    let mut committed = position.clone();
    let mut first = true;
    let mut resume_skip = skip_rows;

    let mut in_txn = false;
    let mut txn_start = position.clone();
    let mut txn_gtid: Option<String> = None;
    let mut txn_rows_seen: u64 = 0;
    let mut standalone = false;

    // The events of whole site transactions, then those of the transaction being read: the
    // first `done` records are complete transactions. Complete transactions are streamed to the
    // producer as the buffer fills (`sent` records since the last checkpoint); the Kafka
    // transaction ends with the checkpoint that follows them.
    let mut batch = agent.producer.batch();
    let mut done: usize = 0;
    let mut sent: usize = 0;
    // Table maps → how their rows are encoded, and reused buffers.
    let mut plans: HashMap<u64, Arc<TablePlan>> = HashMap::new();
    let mut enc = RowEncoder::default();
    let (mut before_bits, mut after_bits): (Vec<bool>, Vec<bool>) = (Vec::new(), Vec::new());
    let (mut src_head, mut src_tail, mut refs, mut key_buf): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) = Default::default();
    // Where the batch ends; its checkpoint is built when the batch is flushed.
    let mut batch_end: Option<Position> = None;
    let mut batch_since = Instant::now();
    let mut last_emit = Instant::now();
    let mut last_margin = Instant::now();

    loop {
        if omrs_core::stop::requested() {
            // Stopped: every whole site transaction read is committed with its position; the
            // one being read (if any) is read again from there at the next start.
            if sent + done > 0 {
                let cp = streaming_cp(batch_end.as_ref().unwrap_or(&committed), &segs);
                let _partial = batch.split_off(done, agent.producer.batch());
                flush(agent, &mut batch, &cp, &mut committed, &site).await?;
            }
            agent.producer.wait().await?;
            tracing::info!(site = %site, file = %committed.file, pos = committed.pos, "stopped; every whole transaction read is committed");
            return Ok(());
        }
        // Caught up?
        if until_caught_up && !in_txn && sent + done == 0 {
            if let Some((tf, tp)) = &target {
                if (cur_file.as_str(), cur_pos) >= (tf.as_str(), *tp) {
                    if (committed.file.as_str(), committed.pos) < (cur_file.as_str(), cur_pos) {
                        let cp = Checkpoint::Streaming {
                            position: Position { file: cur_file.clone(), pos: cur_pos, gtid: last_gtid.clone() },
                            skip_rows: 0,
                            tables: segs.tables.clone(),
                            segments: segs.segments.clone(),
                        };
                        agent.producer.send(Batch::default(), cp).await?;
                    }
                    agent.producer.wait().await?;
                    tracing::info!(
                        site = %site, file = %cur_file, pos = cur_pos,
                        ref_hits = agent.resolver.hits, ref_misses = agent.resolver.misses, ref_unresolved = agent.resolver.unresolved,
                        "caught up with the binlog end seen at start"
                    );
                    return Ok(());
                }
            }
        }
        // Without a timer while the binlog has events ready (a timer per event costs more than
        // decoding the event).
        let next = match stream.next().now_or_never() {
            Some(ev) => Ok(ev),
            None => {
                let wait = if sent + done > 0 {
                    agent.tuning.batch_age.saturating_sub(batch_since.elapsed()).max(Duration::from_millis(1))
                } else {
                    agent.tuning.heartbeat.saturating_sub(last_emit.elapsed()).max(Duration::from_millis(1))
                };
                tokio::time::timeout(wait, stream.next()).await
            }
        };
        let event = match next {
            Err(_) => {
                // Idle (or a batch's age reached): the loop turns.
                omrs_core::endpoint::beat();
                if sent + done > 0 {
                    let cp = streaming_cp(batch_end.as_ref().unwrap_or(&committed), &segs);
                    batch_end = None;
                    // The transaction being read waits for its end.
                    let mut rest = batch.split_off(done, agent.producer.batch());
                    flush(agent, &mut batch, &cp, &mut committed, &site).await?;
                    std::mem::swap(&mut batch, &mut rest);
                    (sent, done) = (0, 0);
                    last_emit = Instant::now();
                } else if !in_txn && last_emit.elapsed() >= agent.tuning.heartbeat {
                    let pos = Position { file: cur_file.clone(), pos: cur_pos, gtid: last_gtid.clone() };
                    heartbeat(agent, &pos, &segs).await?;
                    committed = pos;
                    last_emit = Instant::now();
                }
                if !in_txn && last_margin.elapsed() >= MARGIN_REFRESH {
                    refresh_margin(agent, &cur_file).await;
                    last_margin = Instant::now();
                }
                continue;
            }
            Ok(None) => return Err(IngestError::Binlog("the server closed the binlog stream".into())),
            Ok(Some(Err(e))) => {
                let msg = e.to_string();
                if first && (msg.contains("Could not find first log file") || msg.contains("1236")) {
                    return Err(IngestError::Purged(format!(
                        "site {site}: the server cannot serve binlog {} at {}: {msg}. If it was purged, run `omrs-stream ingest --site {site} --resnapshot`.",
                        position.file, position.pos
                    )));
                }
                return Err(IngestError::site("reading the binlog", e));
            }
            Ok(Some(Ok(ev))) => ev,
        };
        let h = event.header();
        let etype = h.event_type_raw();
        let next_pos = h.log_pos() as u64;
        let start_pos = next_pos.saturating_sub(h.event_size() as u64);
        let was_first = first;
        first = false;
        let mut end_txn = false;
        match etype {
            // ROTATE
            4 => {
                if let Ok(r) = event.read_event::<RotateEvent>() {
                    if !was_first {
                        cur_file = r.name().trim_end_matches('\0').to_string();
                        cur_pos = r.position();
                    } else if by_gtid.is_some() {
                        // Resuming by GTID, the server names the file. This first ROTATE comes
                        // before the format description, so its name still carries the 4
                        // checksum bytes: keep `<base>.<6 digits>`.
                        if let Some(name) = strip_rotate_name(&r.name()) {
                            cur_file = name;
                            cur_pos = r.position();
                        }
                    }
                }
                continue;
            }
            // FORMAT_DESCRIPTION, ANNOTATE_ROWS, BINLOG_CHECKPOINT, GTID_LIST, TABLE_MAP, HEARTBEAT
            15 | 160 | 161 | 163 | 19 | 27 => {}
            // MariaDB GTID: a transaction starts.
            162 => {
                let d = event.data();
                if d.len() >= 13 {
                    let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
                    let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or([0; 4]));
                    txn_gtid = Some(format!("{domain}-{}-{seq}", h.server_id()));
                    standalone = d[12] & 1 == 1;
                }
                in_txn = true;
                txn_start = Position { file: cur_file.clone(), pos: start_pos, gtid: last_gtid.clone() };
                txn_rows_seen = 0;
            }
            // MySQL GTID
            33 => {
                if let Ok(Some(EventData::GtidEvent(g))) = event.read_data() {
                    txn_gtid = Some(format!("{}:{}", uuid_hex(&g.sid()), g.gno()));
                }
                in_txn = true;
                standalone = false;
                txn_start = Position { file: cur_file.clone(), pos: start_pos, gtid: last_gtid.clone() };
                txn_rows_seen = 0;
            }
            // QUERY
            2 => {
                let q = event.read_event::<QueryEvent>().map_err(|e| IngestError::Binlog(format!("decoding a query event at {cur_file}:{start_pos}: {e}")))?;
                let text = q.query();
                let t = text.trim();
                if t.eq_ignore_ascii_case("BEGIN") {
                    if !in_txn {
                        in_txn = true;
                        txn_start = Position { file: cur_file.clone(), pos: start_pos, gtid: last_gtid.clone() };
                        txn_rows_seen = 0;
                    }
                } else if t.eq_ignore_ascii_case("COMMIT") {
                    end_txn = true;
                } else {
                    if is_ddl(t) && (q.schema() == db || t.contains(&db)) {
                        tracing::info!(site = %site, ddl = %t.chars().take(200).collect::<String>(), "DDL: refreshing the table model");
                        agent.model = Model::load(&mut agent.query, &db, &agent.include, &agent.exclude).await?;
                        plans.clear();
                    }
                    if standalone || !in_txn {
                        end_txn = true;
                    }
                }
            }
            // XID
            16 => end_txn = true,
            // Row events, v1 and v2
            23 | 24 | 25 | 30 | 31 | 32 => {
                let data = event.read_data().map_err(|e| IngestError::Binlog(format!("decoding a row event at {cur_file}:{start_pos}: {e}")))?;
                if let Some(EventData::RowsEvent(re)) = data {
                    let op = match re {
                        RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Create,
                        RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
                        _ => Op::Update,
                    };
                    let Some(tme) = stream.get_tme(re.table_id()) else {
                        return Err(IngestError::Binlog(format!("row event at {cur_file}:{start_pos} without its table map")));
                    };
                    let plan = if tme.database_name() != db {
                        // Another database on the same server.
                        None
                    } else {
                        match plans.get(&re.table_id()) {
                            Some(p) if p.fits(tme) => Some(p.clone()),
                            _ => match agent.model.table(&tme.table_name()).cloned() {
                                Some(table) => {
                                    let scrub = scrubbed(&table, &agent.scrub);
                                    let p = Arc::new(TablePlan::new(tme, table, &scrub, &site, &agent.model, &mut agent.resolver)?);
                                    plans.insert(re.table_id(), p.clone());
                                    Some(p)
                                }
                                None => None,
                            },
                        }
                    };
                    if let Some(plan) = plan {
                        let table = &plan.table;
                        let before_cols = re.columns_before_image().map(|b| {
                            before_bits.clear();
                            before_bits.extend(b.iter().by_vals());
                        });
                        let after_cols = re.columns_after_image().map(|b| {
                            after_bits.clear();
                            after_bits.extend(b.iter().by_vals());
                        });
                        let (before_cols, after_cols) = (before_cols.map(|_| &before_bits[..]), after_cols.map(|_| &after_bits[..]));
                        source_parts(h.server_id(), txn_gtid.as_deref(), &cur_file, start_pos, h.timestamp() as i64 * 1000, &mut src_head, &mut src_tail);
                        let mut rows = ParseBuf(re.rows_data());
                        // Processing time, once per row event.
                        let ts_ms = now_ms();
                        let mut re_rows: u64 = 0;
                        while !rows.is_empty() {
                            plan.decode_row(&mut rows, before_cols, after_cols, &mut enc)
                                .map_err(|e| IngestError::Binlog(format!("decoding {} rows at {cur_file}:{start_pos}: {e}", table.name)))?;
                            let row_idx = re_rows as u32;
                            re_rows += 1;
                            txn_rows_seen += 1;
                            if resume_skip > 0 {
                                resume_skip -= 1;
                                continue;
                            }
                            let key = plan.int_key(&enc);
                            if let Some(floor) = segs.floor(&table.name, key) {
                                // The snapshot position is where the first transaction *not*
                                // in the snapshot starts.
                                if txn_start.key() < floor.key() {
                                    continue; // already in the snapshot rows of its segment
                                }
                            }
                            if !enc.has_image() {
                                return Err(IngestError::Binlog(format!("{}: a row event without an image", table.name)));
                            }
                            // The uuid; a row with its own uuid is learnt for later references.
                            let uuid: Option<Cow<str>> = if table.has_uuid {
                                let u = plan.uuid(&enc);
                                if let (Some(t), Some(id), Some(u), false) = (plan.learn, key, &u, op == Op::Delete) {
                                    agent.resolver.learn_id(t, id, u);
                                }
                                u
                            } else if let (Some(Some(t)), Some(id)) = (&plan.parent, key) {
                                match agent.resolver.cached(t, id) {
                                    Some(hit) => hit.map(|u| Cow::Owned(u.to_string())),
                                    None => agent.resolver.fetch(&agent.model, &mut agent.query, t, id).await?.map(Cow::Owned),
                                }
                            } else {
                                None
                            };
                            refs.clear();
                            for fk in &plan.fks {
                                let Some(fid) = plan.fk_id(fk, &enc) else { continue }; // scrubbed or not in the image
                                let Some(id) = fid else {
                                    push_ref(&mut refs, fk, None);
                                    continue;
                                };
                                let found = match &fk.target {
                                    None => None,
                                    Some(t) => match agent.resolver.cached(t, id) {
                                        Some(Some(u)) => {
                                            push_ref(&mut refs, fk, Some(u));
                                            continue;
                                        }
                                        Some(None) => None,
                                        None => agent.resolver.fetch(&agent.model, &mut agent.query, t, id).await?,
                                    },
                                };
                                if found.is_none() {
                                    agent.resolver.unresolved += 1;
                                    metrics().unresolved_refs.with_label_values(&[&site, &table.name]).inc();
                                    tracing::warn!(site = %site, table = %table.name, column = %fk.column, id, ref_table = %fk.ref_table, "foreign key does not resolve to a uuid; sent as null");
                                }
                                push_ref(&mut refs, fk, found.as_deref());
                            }
                            plan.write_event(&enc, op, uuid.as_deref(), &refs, (&src_head, row_idx, &src_tail), ts_ms, &mut key_buf, &mut batch);
                        }
                        let counter = match op {
                            Op::Create => &plan.events_in[0],
                            Op::Delete => &plan.events_in[2],
                            _ => &plan.events_in[1],
                        };
                        counter(re_rows);
                        if batch.len() - done >= agent.tuning.max_txn_events {
                            // Split a very large site transaction (see the module docs).
                            let cp = Checkpoint::Streaming {
                                position: txn_start.clone(),
                                skip_rows: txn_rows_seen,
                                tables: segs.tables.clone(),
                                segments: segs.segments.clone(),
                            };
                            flush(agent, &mut batch, &cp, &mut committed, &site).await?;
                            (sent, done) = (0, 0);
                            batch_end = None;
                            last_emit = Instant::now();
                        }
                    }
                }
            }
            _ => {}
        }
        if end_txn {
            in_txn = false;
            standalone = false;
            if txn_gtid.is_some() {
                last_gtid = txn_gtid.take();
            }
            if next_pos > 0 {
                cur_pos = next_pos;
            }
            if segs.max().is_some_and(|m| m.le(&txn_start)) {
                segs.segments.clear();
            }
            if !batch.is_empty() || sent > 0 {
                if sent + done == 0 {
                    batch_since = Instant::now();
                }
                done = batch.len();
                batch_end = Some(Position { file: cur_file.clone(), pos: cur_pos, gtid: last_gtid.clone() });
                if sent + done >= agent.tuning.batch_events {
                    let cp = streaming_cp(batch_end.as_ref().unwrap_or(&committed), &segs);
                    batch_end = None;
                    flush(agent, &mut batch, &cp, &mut committed, &site).await?;
                    (sent, done) = (0, 0);
                    last_emit = Instant::now();
                } else if batch.bytes() >= STREAM_BYTES {
                    // Whole site transactions only: the buffer holds no partial one here.
                    let full = std::mem::replace(&mut batch, agent.producer.batch());
                    agent.producer.stream(full).await?;
                    sent += done;
                    done = 0;
                }
            }
        } else if !in_txn && next_pos > 0 && etype != 4 {
            cur_pos = next_pos;
        }
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


fn uuid_hex(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u32) ^ ((t >> 32) as u32) ^ std::process::id().wrapping_mul(2654435761)
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
