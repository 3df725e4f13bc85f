//! One batch of `omrs.hq.changes` applied to HQ inside one database transaction.
//!
//! For each change, in stream order: the row's key at HQ (its uuid, the uuid of the row whose
//! key it shares, or its references), its version against the stored one (the one rule of
//! `omrs_core::hq::compare`), every reference mapped from uuid to the HQ id (a missing parent
//! parks the row in `omrs_sync_pending`), then a staged write. Staged writes go out as
//! multi-row prepared `INSERT … ON DUPLICATE KEY UPDATE` per table, parents before children; a
//! statement that fails on a definite error is retried row by row so that only the bad row is
//! dead-lettered. A `merge` record does what OpenMRS `mergePatients` does (see
//! [`Applier::merge`]) after the changes before it are written, and before any change after
//! it that concerns its persons; merges in a row go together ([`merge_run`]).

// Rows read from SQL come back as tuples named by their SELECT.
#![allow(clippy::type_complexity)]

mod aggregate;
mod cache;
mod columns;
pub mod evolve;
mod ids;
mod merge;
mod merge_map;
mod merge_run;
pub(crate) mod new_rows;
mod pending;
mod record;
mod review;
mod site_moves;
mod split;
mod sql;
mod stage;
mod versions;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;

use lru::LruCache;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::clock::now_ms;
use omrs_core::dlq::DeadKind;
use omrs_core::envelope::{FlatRow, Op};
use omrs_core::hq::{row_key, KeyShape};
use omrs_core::model::{Model, TableModel};
use omrs_core::openmrs::DAEMON_USER_UUID;
use omrs_core::merge_log::SiteMoves;
use omrs_core::zone::SiteRules;
use serde_json::Value as J;

use super::canonical::canonicalise;
use super::rejected::{Carry, Missing, Rejected};
use crate::SinkError;
use aggregate::{upsert_aggregates, AggRow, Aggregates};
use cache::{Cache, TKey, Wanted};
use columns::Columns;
use merge::MergeRec;
use pending::PendingStore;
pub(crate) use review::export_gauges;
use review::{upsert_reviews, ReviewRow};
pub(crate) use pending::PendingEntry;
pub use record::Record;
use sql::db;
pub(crate) use sql::q;
use stage::Staged;
pub(crate) use stage::{Receipt, StagedRow, StagedVersion};
use versions::{store_packs, version_packs, Pack};
pub(crate) use versions::Stored;
pub use writer::{PlannedBatch, Writer};


/// A change as the sink reads it: row images as [`FlatRow`]s (the same JSON as everywhere).
type ChangeEvent = omrs_core::envelope::ChangeEvent<FlatRow>;
/// A record of `omrs.hq.changes` as the sink reads it.
pub type HqEvent = omrs_core::hq::HqEvent<FlatRow>;

pub use crate::kafka::DeadLetter;

/// What a committed batch did, for metrics and logs.
#[derive(Default, Debug)]
pub struct Outcome {
    pub dead: Vec<DeadLetter>,
    pub applied: HashMap<(String, &'static str), u64>,
    pub conflicts: HashMap<String, u64>,
    pub merges: u64,
    pub parked: u64,
    /// (site, source commit ms) of every applied change, for the end-to-end latency.
    pub commits: Vec<(String, i64)>,
    /// Aggregate window versions upserted into `omrs_dash_*`.
    pub aggregates: u64,
    /// Identity reviews upserted into `omrs_sync_identity_review`.
    pub reviews: u64,
}


/// One change to process: from the input, or woken from the pending store.
struct Work {
    partition: i32,
    offset: i64,
    first_seen_ms: i64,
    late: bool,
    origin_refs: serde_json::Map<String, J>,
    event: ChangeEvent,
    /// The raw record, for a dead letter.
    payload: std::sync::Arc<Vec<u8>>,
    /// The row's key in uuid space ([`Applier::row_key`]), worked out once by
    /// [`Applier::keyed`]; Err says why there is none.
    key: Result<String, String>,
    /// Woken from the pending store: the first of its row's parked changes.
    woken: bool,
}


/// HQ's state as the sink sees it: table model, id and version caches, merges, pending rows.
pub struct Applier {
    pub model: Model,
    /// HQ's database name.
    database: String,
    /// (site, table) whose changes are stopped from an offset on: a schema change HQ does not
    /// follow alone ([`evolve`]).
    blocked: evolve::Blocked,
    rules: SiteRules,
    ids: Cache<i64>,
    /// Keys the current flush's bulk lookup found absent at HQ: no point query for them.
    absent: hashbrown::HashSet<TKey>,
    /// Keys of the current flush absent at HQ by the uuid filter, not looked up: their rows
    /// are staged as [`StagedRow::unverified`].
    assumed: hashbrown::HashSet<TKey>,
    /// The uuids HQ may hold ([`new_rows`]): HQ's, once loaded (`uuids_loading`), and those the
    /// sink has given ids since it started.
    uuids: new_rows::UuidFilter,
    uuids_loading: Option<new_rows::Loaded>,
    /// Rows deleted at HQ (their version is kept): the only rows absent at HQ that have one.
    tombstones: hashbrown::HashSet<TKey>,
    /// Rows deleted by staged writes that may not have committed yet, with the generation of
    /// the batch that deletes them: a read of HQ that still finds one does not bring it back
    /// into the id cache.
    deleting: hashbrown::HashMap<TKey, u64>,
    /// Counts planned batches ([`Applier::written`]).
    generation: u64,
    versions: Cache<Option<Stored>>,
    /// Version packs read back lately, by pack id.
    packs: LruCache<i64, std::sync::Arc<Pack>>,
    next_id: hashbrown::HashMap<String, i64>,
    merges: merge_map::MergeMap,
    /// The rows the clinics' own merges moved, by their merge logs: each belongs to its loser
    /// ([`omrs_core::merge_log`]).
    site_moves: SiteMoves,
    /// Rows waiting for a row they reference ([`PendingStore`]).
    pending: PendingStore,
    /// The next `omrs_sync_pending` id, shared with the writers ([`Writer::pending_ids`]).
    pending_ids: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Rows a writer parked for a row that a later batch has staged since: the next plan
    /// wakes them.
    ready: Vec<i64>,
    /// What batches did not write, for the writes of batches planned before the applier
    /// learnt of it ([`super::rejected`]).
    carry: Carry,
    daemon_user: i64,
    /// `daemon_user` is the daemon user's own id (not a fallback).
    daemon_known: bool,
    fk_wait_ms: i64,
    max_pending: usize,
    warned: HashSet<(String, String)>,
    columns: HashMap<String, std::sync::Arc<Columns>>,
    /// The column lists of the rows staged lately, per table (a few: new rows leave out their
    /// NULLs, so a table's rows have a few lists): a row shares the list that has its columns
    /// instead of a list of its own.
    col_lists: hashbrown::HashMap<String, Vec<std::sync::Arc<[String]>>>,
    pub max_rows_per_statement: usize,
    fk_checks: bool,
    /// Tables whose every foreign key the sink resolves from a uuid to an HQ id (worked out
    /// with `columns`): HQ need not check them again ([`Writer::unchecked`]).
    resolved_fks: HashSet<String>,
}

enum Intake {
    Work(Box<Work>),
    Merge(String, MergeRec),
    Split(Box<split::SplitRec>),
    Review(Box<ReviewRow>),
}

enum Plan {
    /// Staged (or an idempotent no-op).
    Done,
    /// Waits for (table, key).
    Park(String, String),
    Dead(DeadKind, String),
}

impl Applier {
    /// Loads the model, the daemon user, merges and pending rows from HQ.
    pub async fn load(conn: &mut Conn, database: &str, rules: SiteRules, fk_wait_ms: i64) -> Result<Applier, SinkError> {
        let model = Model::load(conn, database, &[], &[])
            .await
            .map_err(|e| {
                if e.is_transient() {
                    SinkError::Unavailable(format!("reading HQ's information_schema: {e}"))
                } else {
                    SinkError::Schema(format!("reading HQ's information_schema: {e}"))
                }
            })?;
        if model.table("person").is_none() || model.table("omrs_sync_offsets").is_none() {
            return Err(SinkError::Schema(format!(
                "database `{database}` is not an initialised HQ database: run `omrs-stream sink hq-mysql --init` first"
            )));
        }
        let daemon: Option<i64> = conn
            .exec_first("SELECT user_id FROM users WHERE uuid = ?", (DAEMON_USER_UUID,))
            .await
            .map_err(db("reading the daemon user"))?;
        let daemon_user = match daemon {
            Some(d) => d,
            None => conn.query_first("SELECT MIN(user_id) FROM users").await.map_err(db("reading users"))?.unwrap_or(1),
        };
        let merges = merge::load(conn).await?;
        let site_moves = site_moves::load(conn).await?;
        let blocked = evolve::load_blocked(conn).await?;
        let mut a = Applier {
            model,
            database: database.to_string(),
            blocked,
            rules,
            ids: Cache::new(500_000),
            absent: hashbrown::HashSet::new(),
            assumed: hashbrown::HashSet::new(),
            uuids: new_rows::UuidFilter::default(),
            uuids_loading: None,
            tombstones: hashbrown::HashSet::new(),
            deleting: hashbrown::HashMap::new(),
            generation: 0,
            versions: Cache::new(500_000),
            packs: LruCache::new(NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN)),
            next_id: hashbrown::HashMap::new(),
            merges,
            site_moves,
            pending: PendingStore::default(),
            pending_ids: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1)),
            ready: Vec::new(),
            carry: Carry::default(),
            daemon_user,
            daemon_known: daemon.is_some(),
            fk_wait_ms,
            max_pending: usize::MAX,
            warned: HashSet::new(),
            columns: HashMap::new(),
            col_lists: hashbrown::HashMap::new(),
            max_rows_per_statement: 1000,
            fk_checks: false,
            resolved_fks: HashSet::new(),
        };
        let (columns, resolved_fks) = columns::load(conn, database, &a.model).await?;
        a.columns = columns;
        a.resolved_fks = resolved_fks;
        let dead: Vec<(String, String)> =
            conn.query("SELECT tbl, row_key FROM omrs_sync_version WHERE deleted = 1").await.map_err(db("reading tombstones"))?;
        a.tombstones.extend(dead);
        // Version packs stored ahead of a batch that never committed.
        conn.query_drop("DELETE FROM omrs_sync_version_pack WHERE committed = 0").await.map_err(db("clearing version packs of uncommitted batches"))?;
        let (pending, next_pending_id) = PendingStore::load(conn).await?;
        a.pending = pending;
        a.pending_ids.store(next_pending_id, std::sync::atomic::Ordering::Relaxed);
        Ok(a)
    }

    /// Bounds the pending store (`sinks.hq_mysql.max_pending_rows`).
    pub fn with_max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// HQ checks the foreign keys of the upserts as well (`sinks.hq_mysql.server_fk_checks`).
    pub fn with_server_fk_checks(mut self, on: bool) -> Self {
        self.fk_checks = on;
        self
    }

    /// Rows new to HQ by the uuid filter go in without a lookup, once HQ's uuids have loaded
    /// (`sinks.hq_mysql.uuid_filter`; [`new_rows::spawn_load`]).
    pub(crate) fn with_uuid_filter(mut self, loading: new_rows::Loaded) -> Self {
        self.uuids_loading = Some(loading);
        self
    }

    /// Takes HQ's uuids into the filter once they have loaded.
    fn uuid_filter_loaded(&mut self) {
        let Some(rx) = self.uuids_loading.as_mut() else { return };
        match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return,
            Ok(Ok(mut loaded)) => {
                loaded.absorb(std::mem::take(&mut self.uuids));
                self.uuids = loaded;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not read HQ's uuids: every row is looked up at HQ first"),
            Err(_) => {}
        }
        self.uuids_loading = None;
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn oldest_pending_ms(&self) -> Option<i64> {
        self.pending.oldest_ms()
    }

    fn table(&self, name: &str) -> Option<std::sync::Arc<TableModel>> {
        self.model.table(name).cloned()
    }

    /// `w` with its references pointing at merge survivors ([`canonicalise`]) and its key
    /// worked out (see [`Work::key`]).
    fn keyed(&self, mut w: Work) -> Work {
        if !self.site_moves.is_empty() {
            site_moves::own_person(&self.site_moves, &w.event, &mut w.origin_refs);
        }
        if !self.merges.is_empty() || !w.origin_refs.is_empty() {
            canonicalise(w.event.table.as_deref(), &mut w.event.refs, &mut w.origin_refs, |u| self.survivor_of(u));
        }
        w.key = match w.event.table.as_deref().and_then(|t| self.model.table(t)) {
            Some(tm) => self.row_key(tm, &w.event, &w.origin_refs),
            None => Err(format!("table `{}` does not exist at HQ", w.event.table.as_deref().unwrap_or(""))),
        };
        w
    }

    /// The key of a row in uuid space: its uuid, the uuid of the row whose key it shares, or
    /// its key columns through their references.
    fn row_key(&self, tm: &TableModel, ev: &ChangeEvent, origin_refs: &serde_json::Map<String, J>) -> Result<String, String> {
        let fk_columns: Vec<&str> = tm.pk.iter().filter(|c| tm.fk(c).is_some()).map(String::as_str).collect();
        let shape = KeyShape {
            table: &tm.name,
            by_uuid: tm.has_uuid || tm.shared_parent.is_some(),
            pk: &tm.pk,
            fk_columns: &fk_columns,
            site_local: tm.int_pk().filter(|c| tm.fk(c).is_none()).is_some(),
        };
        row_key(&shape, ev, origin_refs)
    }

    /// One input record: a change to stage, a merge, or nothing left to do at HQ (dead letters
    /// and aggregates are collected on the way).
    fn intake(&self, rec: Record, out: &mut Outcome, aggregates: &mut Aggregates) -> Option<Intake> {
        let payload = std::sync::Arc::new(rec.payload);
        let ev: HqEvent = match rec.decoded {
            Ok(e) => e,
            Err(reason) => {
                out.dead.push(DeadLetter { partition: rec.partition, offset: rec.offset, kind: DeadKind::InvalidRecord, reason, payload: payload.to_vec() });
                return None;
            }
        };
        match ev {
            HqEvent::Change { late, origin_refs, event, .. } => {
                if let Err(e) = event.validate() {
                    out.dead.push(DeadLetter { partition: rec.partition, offset: rec.offset, kind: DeadKind::InvalidEvent, reason: e.to_string(), payload: payload.to_vec() });
                    return None;
                }
                if let Some(reason) = self.blocked_at(&event.site, event.table.as_deref(), rec.offset) {
                    out.dead.push(DeadLetter { partition: rec.partition, offset: rec.offset, kind: DeadKind::SchemaBlocked, reason, payload: payload.to_vec() });
                    return None;
                }
                if event.op == Op::Heartbeat {
                    return None;
                }
                let w = Work { partition: rec.partition, offset: rec.offset, first_seen_ms: now_ms(), late, origin_refs, event, payload, key: Err(String::new()), woken: false };
                Some(Intake::Work(Box::new(self.keyed(w))))
            }
            HqEvent::Merge { winner, loser, reason, evidence, site, ts_ms } => {
                let review_id = Some(omrs_core::hq::review::merge_review_id(&loser, &winner));
                Some(Intake::Merge(loser, MergeRec { winner, ts_ms, reason, applied: false, evidence: evidence.to_string(), site, review_id }))
            }
            HqEvent::Split { survivor, from, records, review_id, site, ts_ms } => Some(Intake::Split(Box::new(split::SplitRec { survivor, from, records, review_id, site, ts_ms }))),
            // The Parquet sink's concern: HQ has no date partitions to finalise.
            HqEvent::Watermark { .. } => None,
            // Done before the batch ([`Applier::evolve`]).
            HqEvent::Schema { .. } => None,
            HqEvent::Aggregate { name, site, window_start_ms, window_end_ms, dim, value, is_final, revision, watermark_ms } => {
                let row = AggRow { site: site.clone(), start_ms: window_start_ms, end_ms: window_end_ms, dim: dim.clone(), value, is_final, revision, watermark_ms };
                aggregates.entry(name).or_default().insert((site, window_start_ms, dim), row);
                None
            }
            HqEvent::IdentityReview { review_id, reason, status, person, records, evidence, site, ts_ms, decided } => {
                if status == omrs_core::hq::review::OPEN {
                    tracing::warn!(review = %review_id, person = %person, site = %site, reason = %reason, "identity review opened: HQ keeps the merge until someone decides (omrs-stream identity list)");
                }
                let records = serde_json::to_string(&records).unwrap_or_default();
                Some(Intake::Review(Box::new(ReviewRow { review_id, reason, status, person, records, evidence: evidence.to_string(), site, ts_ms, decided })))
            }
        }
    }

    /// Applies one batch inside an open transaction, planning and writing on the same
    /// connection. Returns what it did; the caller commits. Batches with merges go this way
    /// ([`Applier::needs_sync`]).
    pub async fn apply(&mut self, conn: &mut Conn, records: Vec<Record>) -> Result<Outcome, SinkError> {
        self.generation += 1;
        let mut out = Outcome::default();
        let mut segment: Vec<Work> = Vec::with_capacity(records.len());
        let mut aggregates: Aggregates = BTreeMap::new();
        // What this batch did not write: later rows of it must not reference it.
        let mut missing = Missing::default();
        let mut reviews: Vec<ReviewRow> = Vec::new();
        // The losers of the merges this batch applies: their components are settled at its end.
        let mut merged: Vec<String> = Vec::new();
        let mut logs: Vec<(String, String)> = Vec::new();
        // Merges wait here until a change they concern, a split or the batch's end
        // ([`merge_run`]): the changes staged before them are written first.
        let mut run = merge_run::MergeRun::default();
        for rec in records {
            match self.intake(rec, &mut out, &mut aggregates) {
                Some(Intake::Work(w)) => {
                    let mut w = *w;
                    if !run.is_empty() && run.concerns(w.key.as_deref().ok(), &w.event.refs, &w.origin_refs, |u| self.survivor_of(u)) {
                        self.flush(conn, std::mem::take(&mut segment), &mut out, &mut missing).await?;
                        merged.extend(self.apply_merges(conn, run.take()).await?);
                        w = self.keyed(w);
                    }
                    logs.extend(site_moves::logged(&w.event));
                    segment.push(w)
                }
                Some(Intake::Merge(loser, rec)) => {
                    run.push(loser, rec, |u| self.survivor_of(u));
                    out.merges += 1;
                }
                Some(Intake::Split(s)) => {
                    self.flush(conn, std::mem::take(&mut segment), &mut out, &mut missing).await?;
                    merged.extend(self.apply_merges(conn, run.take()).await?);
                    self.split(conn, *s).await?;
                }
                Some(Intake::Review(r)) => reviews.push(*r),
                None => {}
            }
        }
        self.flush(conn, segment, &mut out, &mut missing).await?;
        merged.extend(self.apply_merges(conn, run.take()).await?);
        for (loser, data) in logs {
            self.site_merge_logged(conn, &loser, &data).await?;
        }
        out.aggregates = upsert_aggregates(conn, aggregates).await?;
        out.reviews = upsert_reviews(conn, reviews).await?;
        merged.extend(self.retry_merges(conn).await?);
        self.settle_voids(conn, &merged).await?;
        let expired = self.expire_pending(&mut out);
        let failed = self.writer().execute(conn, expired, &mut out, &mut missing).await?;
        self.forget(&failed);
        Ok(out)
    }

    /// Why a change of `table` from `site` at `offset` is stopped, if it is.
    fn blocked_at(&self, site: &str, table: Option<&str>, offset: i64) -> Option<String> {
        let from = *self.blocked.get(&(site.to_string(), table?.to_string()))?;
        (offset > from).then(|| {
            format!(
                "the schema of `{}` changed at site {site} in a way HQ does not follow alone (omrs_sync_schema_change, status blocked, offset {from}): migrate HQ, mark it resolved and replay these dead letters (docs/OPERATIONS.md, \"OpenMRS upgrades\")",
                table.unwrap_or_default()
            )
        })
    }

    /// Whether `records` hold a schema change ([`Applier::evolve`] runs before they are planned).
    /// A snapshot's base shapes are not changes: HQ's schema is the programme's OpenMRS, made by
    /// `--init`, and a site on an older version must not block HQ's tables.
    pub fn has_schema_changes(records: &[Record]) -> bool {
        records.iter().any(|r| matches!(&r.decoded, Ok(HqEvent::Schema { schema, .. }) if !schema.base))
    }

    /// Evolves HQ's tables for the schema changes in `records`, in order, before the batch is
    /// planned (outside its transaction: DDL commits on its own). Reloads HQ's table model when
    /// a table changed.
    pub async fn evolve(&mut self, conn: &mut Conn, records: &[Record]) -> Result<(), SinkError> {
        let mut changed = false;
        for r in records {
            let Ok(HqEvent::Schema { site, schema, ts_ms }) = &r.decoded else { continue };
            if schema.base || self.blocked.contains_key(&(site.clone(), schema.table.clone())) {
                continue;
            }
            match evolve::evolve(conn, &self.database, &self.model, site, schema, *ts_ms, r.offset).await? {
                evolve::Evolved::Applied(_) => {
                    self.model = Model::load(conn, &self.database, &[], &[]).await.map_err(|e| SinkError::Schema(format!("reading HQ's information_schema after a schema change: {e}")))?;
                    changed = true;
                }
                evolve::Evolved::InStep => {}
                evolve::Evolved::Blocked(_) => {
                    self.blocked.insert((site.clone(), schema.table.clone()), r.offset);
                    omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "schema_blocked"]).inc();
                }
            }
        }
        if changed {
            let (columns, resolved_fks) = columns::load(conn, &self.database, &self.model).await?;
            self.columns = columns;
            self.resolved_fks = resolved_fks;
            self.col_lists.clear();
        }
        Ok(())
    }

    /// True when `records` must be applied by [`Applier::apply`] on the writing connection,
    /// after the batch before it has committed: a merge (it reads and moves rows) or a review
    /// (they come with merges, and are rare), a merge
    /// still waiting for its persons, or a change of a merged person (its void date and
    /// reason are read from HQ). Every other batch can be planned while the previous one is
    /// being written ([`Applier::plan_batch`]).
    pub fn needs_sync(&self, records: &[Record]) -> bool {
        if self.merges.any_waiting() {
            return true;
        }
        records.iter().any(|r| match &r.decoded {
            Ok(HqEvent::Merge { .. } | HqEvent::Split { .. } | HqEvent::IdentityReview { .. }) => true,
            // A clinic's merge log gives rows back to their loser ([`Applier::site_merge_logged`]).
            Ok(HqEvent::Change { event, .. }) if event.table.as_deref() == Some("person_merge_log") => true,
            // A DDL's shape evolves HQ first; a snapshot's base shape is nothing to HQ.
            Ok(HqEvent::Schema { schema, .. }) => !schema.base,
            Ok(HqEvent::Change { event, origin_refs, .. }) if matches!(event.table.as_deref(), Some("person" | "patient")) && !self.merges.is_empty() => {
                match event.table.as_deref().and_then(|t| self.model.table(t)) {
                    Some(tm) => self.row_key(tm, event, origin_refs).map(|k| self.survivor_of(&k).is_some()).unwrap_or(false),
                    None => false,
                }
            }
            _ => false,
        })
    }

    /// Plans a batch without merges ([`Applier::needs_sync`] is false) while the batch before
    /// it may still be being written on another connection. `conn` reads only what is
    /// committed; what the batch in flight changed is known from the caches, and the rows it
    /// deletes are marked (`deleting`) so that a read does not bring them back.
    pub async fn plan_batch(&mut self, conn: &mut Conn, records: Vec<Record>) -> Result<PlannedBatch, SinkError> {
        self.generation += 1;
        let mut out = Outcome::default();
        let mut segment: Vec<Work> = Vec::with_capacity(records.len());
        let mut aggregates: Aggregates = BTreeMap::new();
        for rec in records {
            match self.intake(rec, &mut out, &mut aggregates) {
                Some(Intake::Work(w)) => segment.push(*w),
                Some(Intake::Merge(..) | Intake::Split(_) | Intake::Review(_)) => {
                    return Err(SinkError::Schema("internal: a merge or review in a batch planned ahead; needs_sync should have sent it to apply".into()))
                }
                None => {}
            }
        }
        let mut units = self.plan_segment(conn, segment, &mut out).await?;
        units.push(self.expire_pending(&mut out));
        // The batch's version packs are stored now, on the reading connection, ahead of the
        // batch, so that writing them is off the write path. They count once the batch's own
        // transaction marks them committed; a restart deletes those it never marked.
        for unit in units.iter_mut() {
            let packed: Vec<&StagedVersion> = unit.versions.iter().filter(|v| v.packed).collect();
            unit.packs_ahead = Some(store_packs(conn, version_packs(&packed), false).await?);
        }
        Ok(PlannedBatch { units, aggregates, out, generation: self.generation })
    }

    /// The writer of this applier's staged units.
    pub fn writer(&self) -> Writer {
        Writer {
            tables: self.model.tables.clone(),
            order: self.model.order.clone(),
            max_rows_per_statement: self.max_rows_per_statement,
            unchecked: if self.fk_checks { HashSet::new() } else { self.resolved_fks.clone() },
            carry: self.carry.clone(),
            pending_ids: self.pending_ids.clone(),
        }
    }

    /// Learns what a written batch did not write ([`PlannedBatch::write`]): forgets the cached
    /// id and version of each such row, unless a batch planned since has staged the row again
    /// (its version is cached now, and its write decides); takes in the rows the writer parked,
    /// and wakes at the next plan those whose row has been staged since; and carries what HQ
    /// does not hold into the writes of the batches planned before now.
    pub fn forget(&mut self, rejected: &Rejected) {
        for u in &rejected.rows {
            let restaged = matches!(self.versions.peek(&u.table, &u.key), Some(Some(s)) if s.version != u.version);
            if restaged {
                continue;
            }
            self.versions.pop(&u.table, &u.key);
            if u.hq_id.is_none() || self.ids.peek(&u.table, &u.key) == u.hq_id.as_ref() {
                self.ids.pop(&u.table, &u.key);
            }
        }
        for (id, p) in &rejected.parked {
            if self.ids.peek(&p.waits.0, &p.waits.1).is_some() {
                self.ready.push(*id);
            }
            self.pending.add(*id, p.clone());
        }
        self.carry.push(self.generation, rejected.missing());
    }

    /// The batch of `generation` (and every one before it) has committed: the rows it deleted
    /// are gone from HQ for every reader now.
    pub fn written(&mut self, generation: u64) {
        self.deleting.retain(|_, g| *g > generation);
        self.carry.written(generation);
    }

    /// The generation of the batch planned last.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Rows that waited longer than the FK timeout go to the dead-letter topic.
    /// Returns the unit that deletes them from the pending store.
    fn expire_pending(&mut self, out: &mut Outcome) -> Staged {
        let cutoff = now_ms() - self.fk_wait_ms;
        let expired: Vec<i64> = self.pending.seen_before(cutoff);
        let mut unit = Staged::default();
        for id in expired {
            if let Some(p) = self.pending.take(id) {
                unit.pending_delete.push(id);
                out.dead.push(DeadLetter {
                    partition: p.partition,
                    offset: p.offset,
                    kind: DeadKind::FkWaitTimeout,
                    reason: format!(
                        "{} {}: referenced {} {} did not reach HQ within {} s",
                        p.tbl,
                        p.row_key,
                        p.waits.0,
                        p.waits.1,
                        self.fk_wait_ms / 1000
                    ),
                    payload: p.event.into_bytes(),
                });
            }
        }
        unit
    }

    /// Stages and writes a run of changes (no merge inside), then retries the pending rows
    /// their parents woke up.
    async fn flush(&mut self, conn: &mut Conn, works: Vec<Work>, out: &mut Outcome, missing: &mut Missing) -> Result<(), SinkError> {
        let writer = self.writer();
        for unit in self.plan_segment(conn, works, out).await? {
            let failed = writer.execute(conn, unit, out, missing).await?;
            self.forget(&failed);
        }
        Ok(())
    }

    /// Stages a run of changes (no merge inside), with the pending rows their parents woke up:
    /// the units to write, in order. Reads HQ through `conn` (ids and versions), and through the
    /// caches for what earlier staged writes did.
    async fn plan_segment(&mut self, conn: &mut Conn, works: Vec<Work>, out: &mut Outcome) -> Result<Vec<Staged>, SinkError> {
        let mut units: Vec<Staged> = Vec::new();
        if works.is_empty() && self.ready.is_empty() {
            return Ok(units);
        }
        // Bulk lookups first: the rows' own ids and versions, and every referenced uuid; not
        // the ids of created or snapshot rows that the uuid filter says are new to HQ.
        self.absent.clear();
        self.assumed.clear();
        self.uuid_filter_loaded();
        let mut assumed: Vec<(&str, &str)> = Vec::new();
        // (The keys are borrowed from the batch; a table's name is copied once.)
        fn want<'k>(m: &mut Wanted<'k>, table: &str, key: &'k str) {
            m.entry_ref(table).or_default().insert(key);
        }
        let mut want_ids = Wanted::new();
        let mut want_versions = Wanted::new();
        for w in &works {
            let Some(table) = w.event.table.as_deref() else { continue };
            let (Some(tm), Some(cm)) = (self.model.table(table), self.columns.get(table)) else { continue };
            if let Ok(k) = &w.key {
                if tm.has_uuid && matches!(w.event.op, Op::Create | Op::Read) && self.uuids.surely_new(table, k) {
                    assumed.push((table, k));
                } else if tm.has_uuid || tm.shared_parent.is_some() {
                    want(&mut want_ids, table, k);
                }
                want(&mut want_versions, table, k);
            }
            for (col, v) in w.event.refs.iter().chain(w.origin_refs.iter().map(|(k, v)| (k.as_str(), v))) {
                if let (Some(fk), Some(u)) = (cm.fk(col), v.as_str()) {
                    want(&mut want_ids, &fk.ref_table, u);
                }
            }
        }
        let t0 = std::time::Instant::now();
        self.prefetch_ids(conn, want_ids).await?;
        for (table, k) in assumed {
            // (A reference of another row may have brought it into the id cache.)
            if !self.ids.contains(table, k) {
                self.absent.insert((table.to_string(), k.to_string()));
                self.assumed.insert((table.to_string(), k.to_string()));
            }
        }
        if !self.assumed.is_empty() {
            omrs_core::metrics::metrics().hq_lookups_skipped.inc_by(self.assumed.len() as u64);
        }
        let t_ids = t0.elapsed();
        // A row that is not at HQ has a version only if HQ deleted it: skip the lookup for the
        // rest (most rows of a batch are new).
        // `plan` knows these have no version (`Applier::known_new`).
        for (table, keys) in want_versions.iter_mut() {
            keys.retain(|k| !self.known_new(table, k));
        }
        self.prefetch_versions(conn, want_versions).await?;
        let t_versions = t0.elapsed() - t_ids;

        let mut staged = Staged::default();
        staged.versions.reserve(works.len());
        staged.receipts.reserve(works.len());
        // Rows a writer parked whose row has been staged since come first: they are older.
        let mut queue: VecDeque<(Work, Option<i64>)> = VecDeque::with_capacity(works.len());
        for id in std::mem::take(&mut self.ready) {
            if let Some(w) = self.pending.take(id).and_then(|p| self.woken(p)) {
                queue.push_back((w, Some(id)));
            }
        }
        queue.extend(works.into_iter().map(|w| (w, None)));
        let mut new_pending: Vec<(i64, PendingEntry)> = Vec::new();
        let mut done_pending: Vec<i64> = Vec::new();
        while let Some((w, from_pending)) = queue.pop_front() {
            if let Some(id) = from_pending {
                done_pending.push(id);
            }
            match self.plan(conn, &w, &mut staged, &mut units, out).await? {
                Plan::Done => {
                    // Rows parked behind this one (its children, or its own later changes) wake.
                    let woken = match (w.event.table.clone(), &w.key) {
                        (Some(table), Ok(k)) => self.pending.waiting_for(&table, k),
                        _ => Vec::new(),
                    };
                    for id in woken {
                        if let Some(w) = self.pending.take(id).and_then(|p| self.woken(p)) {
                            queue.push_back((w, Some(id)));
                        }
                    }
                }
                Plan::Park(wt, wk) if self.pending.len() >= self.max_pending => {
                    // The pending store is bounded: past the bound a row is dead-lettered with
                    // what it waited for, not kept in memory without limit.
                    omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "pending_full"]).inc();
                    out.dead.push(DeadLetter {
                        partition: w.partition,
                        offset: w.offset,
                        kind: DeadKind::PendingFull,
                        reason: format!("waits for {wt} {wk}, and the pending store holds its maximum of {} rows (sinks.hq_mysql.max_pending_rows)", self.max_pending),
                        payload: w.payload.to_vec(),
                    });
                }
                Plan::Park(wt, wk) => {
                    let table = w.event.table.clone().unwrap_or_default();
                    let row_key = w.key.clone().unwrap_or_default();
                    let event = HqEvent::Change { late: w.late, person: None, origin_refs: w.origin_refs.clone(), event: w.event.clone() };
                    let id = self.pending_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let p = PendingEntry {
                        tbl: table,
                        row_key,
                        waits: (wt, wk),
                        first_seen_ms: w.first_seen_ms,
                        offset: w.offset,
                        partition: w.partition,
                        event: String::from_utf8(event.to_json()).unwrap_or_default(),
                    };
                    self.pending.add(id, p.clone());
                    new_pending.push((id, p));
                    out.parked += 1;
                }
                Plan::Dead(kind, reason) => {
                    out.dead.push(DeadLetter { partition: w.partition, offset: w.offset, kind, reason, payload: w.payload.to_vec() });
                }
            }
        }
        tracing::debug!(
            ids_ms = t_ids.as_millis() as u64,
            versions_ms = t_versions.as_millis() as u64,
            plan_ms = (t0.elapsed() - t_ids - t_versions).as_millis() as u64,
            "planned"
        );
        // Pending store changes, written with the last unit. A row parked and woken within this
        // segment never reaches the table.
        let done: HashSet<i64> = done_pending.iter().copied().collect();
        let fresh: HashSet<i64> = new_pending.iter().map(|(id, _)| *id).collect();
        staged.pending_delete = done_pending.into_iter().filter(|id| !fresh.contains(id)).collect();
        new_pending.retain(|(id, _)| !done.contains(id));
        staged.pending_insert = new_pending;
        units.push(staged);
        Ok(units)
    }

    /// A parked change, woken: its references point at the survivors of the merges applied
    /// while it waited ([`Applier::keyed`]).
    fn woken(&self, p: PendingEntry) -> Option<Work> {
        match serde_json::from_str::<HqEvent>(&p.event) {
            Ok(HqEvent::Change { late, origin_refs, event, .. }) => {
                let payload = std::sync::Arc::new(p.event.into_bytes());
                let w = Work { partition: p.partition, offset: p.offset, first_seen_ms: p.first_seen_ms, late, origin_refs, event, payload, key: Err(String::new()), woken: true };
                Some(self.keyed(w))
            }
            other => {
                tracing::warn!(table = %p.tbl, key = %p.row_key, offset = p.offset, error = ?other.err(), "a parked row is not a change record; dropped");
                None
            }
        }
    }
}

