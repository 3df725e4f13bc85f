//! Row events: each row decoded by its table's plan, its uuid and foreign keys resolved, and
//! its change event written into the open batch; a very large site transaction is split (see
//! the module docs of `super`).
//!
//! The events go to the batch of the Kafka transaction that commits them with their
//! checkpoint; nothing here commits but a split.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use mysql_async::BinlogStream;
use mysql_common::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql_common::io::ParseBuf;
use omrs_core::clock::now_ms;
use omrs_core::envelope::Op;
use omrs_core::metrics::metrics;

use super::{flush, Tail};
use crate::checkpoint::Checkpoint;
use crate::convert::scrubbed;
use crate::encode::{push_ref, source_parts, RowEncoder, TablePlan};
use crate::{Agent, IngestError};

/// Table maps → how their rows are encoded, and buffers reused from row to row.
#[derive(Default)]
pub(super) struct RowState {
    pub plans: HashMap<u64, Arc<TablePlan>>,
    enc: RowEncoder,
    before_bits: Vec<bool>,
    after_bits: Vec<bool>,
    src_head: Vec<u8>,
    src_tail: Vec<u8>,
    refs: Vec<u8>,
    key_buf: Vec<u8>,
}

impl Tail<'_> {
    /// One rows event (v1 or v2): its rows of this database's captured tables become change
    /// events in the batch.
    pub(super) async fn on_rows(&mut self, stream: &BinlogStream, event: &Event, start_pos: u64) -> Result<(), IngestError> {
        let data = event.read_data().map_err(|e| IngestError::Binlog(format!("decoding a row event at {}:{start_pos}: {e}", self.cur.file)))?;
        let Some(EventData::RowsEvent(re)) = data else { return Ok(()) };
        let op = match re {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Create,
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
            _ => Op::Update,
        };
        let Some(tme) = stream.get_tme(re.table_id()) else {
            return Err(IngestError::Binlog(format!("row event at {}:{start_pos} without its table map", self.cur.file)));
        };
        let Some(plan) = plan_for(&mut self.rows.plans, self.agent, &self.db, &self.site, tme, re.table_id())? else { return Ok(()) };
        let table = &plan.table;
        let st = &mut self.rows;
        let before_cols = re.columns_before_image().map(|b| {
            st.before_bits.clear();
            st.before_bits.extend(b.iter().by_vals());
        });
        let after_cols = re.columns_after_image().map(|b| {
            st.after_bits.clear();
            st.after_bits.extend(b.iter().by_vals());
        });
        let (before_cols, after_cols) = (before_cols.map(|_| &st.before_bits[..]), after_cols.map(|_| &st.after_bits[..]));
        let h = event.header();
        source_parts(h.server_id(), self.cur.txn_gtid.as_deref(), (&self.cur.file, start_pos), h.timestamp() as i64 * 1000, false, &mut st.src_head, &mut st.src_tail);
        let mut rows = ParseBuf(re.rows_data());
        // Processing time, once per row event.
        let ts_ms = now_ms();
        let mut re_rows: u64 = 0;
        while !rows.is_empty() {
            plan.decode_row(&mut rows, before_cols, after_cols, &mut st.enc)
                .map_err(|e| IngestError::Binlog(format!("decoding {} rows at {}:{start_pos}: {e}", table.name, self.cur.file)))?;
            let row_idx = self.cur.row_base + re_rows as u32;
            re_rows += 1;
            self.cur.txn_rows_seen += 1;
            if self.cur.resume_skip > 0 {
                self.cur.resume_skip -= 1;
                continue;
            }
            let key = plan.int_key(&st.enc);
            if let Some(floor) = self.segs.floor(&table.name, key) {
                // The snapshot position is where the first transaction *not* in the snapshot
                // starts.
                if self.cur.txn_start.key() < floor.key() {
                    continue; // already in the snapshot rows of its segment
                }
            }
            if !st.enc.has_image() {
                return Err(IngestError::Binlog(format!("{}: a row event without an image", table.name)));
            }
            let uuid = resolve_uuid(self.agent, &plan, &st.enc, key, op).await?;
            resolve_refs(self.agent, &self.site, &plan, &st.enc, &mut st.refs).await?;
            plan.write_event(&st.enc, op, uuid.as_deref(), &st.refs, (&st.src_head, row_idx, &st.src_tail), ts_ms, &mut st.key_buf, &mut self.pend.batch);
        }
        let counter = match op {
            Op::Create => &plan.events_in[0],
            Op::Delete => &plan.events_in[2],
            _ => &plan.events_in[1],
        };
        counter(re_rows);
        if self.cur.payload.is_some() {
            // The rows of a compressed transaction share its position: number them on.
            self.cur.row_base += re_rows as u32;
        }
        if self.pend.batch.len() - self.pend.done >= self.agent.tuning.max_txn_events {
            self.split().await?;
        }
        Ok(())
    }

    /// Commits a very large site transaction so far, with a checkpoint at its start plus the
    /// number of its rows read (see the module docs).
    async fn split(&mut self) -> Result<(), IngestError> {
        let cp = Checkpoint::Streaming {
            // The set before this transaction: its GTID joins only at its end.
            position: crate::checkpoint::Position { gtid_set: self.cur.gtids.as_ref().map(|g| g.to_string()), ..self.cur.txn_start.clone() },
            skip_rows: self.cur.txn_rows_seen,
            tables: self.segs.tables.clone(),
            segments: self.segs.segments.clone(),
        };
        flush(self.agent, &mut self.pend.batch, &cp, &mut self.committed, &self.site).await?;
        (self.pend.sent, self.pend.done) = (0, 0);
        self.pend.end = None;
        self.pend.last_emit = Instant::now();
        Ok(())
    }
}

/// How the rows of a table map are encoded: None for another database or a table not captured.
fn plan_for(plans: &mut HashMap<u64, Arc<TablePlan>>, agent: &mut Agent, db: &str, site: &str, tme: &TableMapEvent<'_>, table_id: u64) -> Result<Option<Arc<TablePlan>>, IngestError> {
    if tme.database_name() != db {
        return Ok(None);
    }
    if let Some(p) = plans.get(&table_id).filter(|p| p.fits(tme)) {
        return Ok(Some(p.clone()));
    }
    let Some(table) = agent.model.table(&tme.table_name()).cloned() else { return Ok(None) };
    let scrub = scrubbed(&table, &agent.scrub);
    let p = Arc::new(TablePlan::new(tme, table, &scrub, site, &agent.model, &mut agent.resolver)?);
    plans.insert(table_id, p.clone());
    Ok(Some(p))
}

/// The row's uuid: its own (learnt for later references), or its parent's for a table that
/// shares its parent's key.
pub(crate) async fn resolve_uuid<'e>(agent: &mut Agent, plan: &TablePlan, enc: &'e RowEncoder, key: Option<i64>, op: Op) -> Result<Option<Cow<'e, str>>, IngestError> {
    if plan.table.has_uuid {
        let u = plan.uuid(enc);
        if let (Some(t), Some(id), Some(u), false) = (plan.learn, key, &u, op == Op::Delete) {
            agent.resolver.learn_id(t, id, u);
        }
        return Ok(u);
    }
    let (Some(Some(t)), Some(id)) = (&plan.parent, key) else { return Ok(None) };
    Ok(match agent.resolver.cached(t, id) {
        Some(hit) => hit.map(|u| Cow::Owned(u.to_string())),
        None => agent.resolver.fetch(&agent.model, &mut agent.query, t, id).await?.map(Cow::Owned),
    })
}

/// The row's foreign keys as uuids, written into `refs`; one that does not resolve is sent as
/// null, counted and logged.
pub(crate) async fn resolve_refs(agent: &mut Agent, site: &str, plan: &TablePlan, enc: &RowEncoder, refs: &mut Vec<u8>) -> Result<(), IngestError> {
    refs.clear();
    for fk in &plan.fks {
        let Some(fid) = plan.fk_id(fk, enc) else { continue }; // scrubbed or not in the image
        let Some(id) = fid else {
            push_ref(refs, fk, None);
            continue;
        };
        let found = match &fk.target {
            None => None,
            Some(t) => match agent.resolver.cached(t, id) {
                Some(Some(u)) => {
                    push_ref(refs, fk, Some(u));
                    continue;
                }
                Some(None) => None,
                None => agent.resolver.fetch(&agent.model, &mut agent.query, t, id).await?,
            },
        };
        if found.is_none() {
            agent.resolver.unresolved += 1;
            let table = &plan.table.name;
            metrics().unresolved_refs.with_label_values(&[site, table]).inc();
            tracing::warn!(site = %site, table = %table, column = %fk.column, id, ref_table = %fk.ref_table, "foreign key does not resolve to a uuid; sent as null");
        }
        push_ref(refs, fk, found.as_deref());
    }
    Ok(())
}
