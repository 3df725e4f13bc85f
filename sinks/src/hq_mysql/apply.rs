//! One batch of `omrs.hq.changes` applied to HQ inside one database transaction.
//!
//! For each change, in stream order: the row's key at HQ (its uuid, the uuid of the row whose
//! key it shares, or its references), its version against the stored one (the one rule of
//! `omrs_core::hq::compare`), every reference mapped from uuid to the HQ id (a missing parent
//! parks the row in `omrs_sync_pending`), then a staged write. Staged writes go out as
//! multi-row prepared `INSERT … ON DUPLICATE KEY UPDATE` per table, parents before children; a
//! statement that fails on a definite error is retried row by row so that only the bad row is
//! dead-lettered. A `merge` record first flushes what is staged, then does what OpenMRS
//! `mergePatients` does (see [`Applier::merge`]).

// Rows read from SQL come back as tuples named by their SELECT.
#![allow(clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;

use base64::Engine as _;
use lru::LruCache;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::envelope::{FlatRow, Op};
use omrs_core::hq::{compare, row_key, KeyShape, RowVersion};
use omrs_core::zone::SiteRules;
use omrs_ingest::model::{is_int_type, Model, TableModel};
use serde_json::Value as J;

use super::canonical::canonicalise;
use super::rejected::{Carry, Missing, Rejected, Tracker, Why};
use crate::{is_transient_db, SinkError};

/// A change as the sink reads it: row images as [`FlatRow`]s (the same JSON as everywhere).
type ChangeEvent = omrs_core::envelope::ChangeEvent<FlatRow>;
/// A record of `omrs.hq.changes` as the sink reads it.
pub type HqEvent = omrs_core::hq::HqEvent<FlatRow>;

/// The OpenMRS daemon user: HQ's own merges are done in its name.
pub const DAEMON_USER_UUID: &str = "A4F30A1B-5EB9-11DF-A648-37A07F9C90FB";

/// Namespace of the uuids HQ makes for its own `person_merge_log` rows (a function of the loser,
/// so that every run writes the same row).
const MERGE_LOG_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f6d_7273_2d73_7472_6561_6d2d_6d65_7267);

/// What `mergePatients` moves from the loser to the survivor: (table, column, also set
/// `preferred = 0`). Tables missing at HQ are skipped.
pub const MOVES: &[(&str, &str, bool)] = &[
    ("visit", "patient_id", false),
    ("encounter", "patient_id", false),
    ("obs", "person_id", false),
    ("orders", "patient_id", false),
    ("patient_program", "patient_id", false),
    ("conditions", "patient_id", false),
    ("allergy", "patient_id", false),
    ("relationship", "person_a", false),
    ("relationship", "person_b", false),
    ("person_attribute", "person_id", false),
    ("patient_identifier", "patient_id", true),
    ("person_name", "person_id", true),
    ("person_address", "person_id", true),
];

/// At most this many rows' first versions go into one `omrs_sync_version_pack` row (about
/// 150 bytes each: a pack stays well under the server's max_allowed_packet).
const MAX_PACK: usize = 4096;

/// One `omrs_sync_version_pack` row, read back: HQ id → (row key, version).
struct Pack {
    table: String,
    first_id: i64,
    last_id: i64,
    entries: HashMap<i64, (String, Stored)>,
}

/// The `omrs_sync_version_pack` rows of `packed` (first versions, see [`StagedVersion`]):
/// (table, first HQ id, last HQ id, entries), at most [`MAX_PACK`] entries each. The entries
/// are a JSON array compressed the way MariaDB's `COMPRESS()` does it (the length in 4 bytes,
/// low byte first, then a zlib stream), so that the view reads them with `UNCOMPRESS()`. A
/// batch's obs are about 860 KB of JSON: sent and stored as is, they took HQ 8 ms per batch.
fn version_packs(packed: &[&StagedVersion]) -> Vec<(String, i64, i64, Vec<u8>)> {
    let mut by_table: BTreeMap<&str, Vec<&StagedVersion>> = BTreeMap::new();
    for v in packed {
        by_table.entry(v.table.as_str()).or_default().push(v);
    }
    let mut out = Vec::new();
    for (table, mut entries) in by_table {
        entries.sort_by_key(|v| v.stored.hq_id);
        for chunk in entries.chunks(MAX_PACK) {
            let (Some(first), Some(last)) = (chunk.first().and_then(|v| v.stored.hq_id), chunk.last().and_then(|v| v.stored.hq_id)) else { continue };
            let mut json: Vec<u8> = Vec::with_capacity(chunk.len() * 160);
            json.push(b'[');
            for (i, v) in chunk.iter().enumerate() {
                if i > 0 {
                    json.push(b',');
                }
                let s = &v.stored;
                let entry = (s.hq_id, &v.key, s.version.change_ms, s.version.priority, &s.version.site, s.version.commit_ms, &s.version.position, &v.origin, s.hash);
                // Serializing plain values into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut json, &entry);
            }
            json.push(b']');
            let mut packed = Vec::with_capacity(json.len() / 3 + 16);
            packed.extend_from_slice(&(json.len() as u32).to_le_bytes());
            let mut z = flate2::write::ZlibEncoder::new(packed, flate2::Compression::fast());
            // Writing into a Vec cannot fail.
            let _ = std::io::Write::write_all(&mut z, &json);
            out.push((table.to_string(), first, last, z.finish().unwrap_or_default()));
        }
    }
    out
}

/// Inserts version packs ([`version_packs`]); returns their pack ids. A pack stored ahead of
/// its batch (`committed` false) counts only once the batch marks it committed.
async fn store_packs(conn: &mut Conn, packs: Vec<(String, i64, i64, Vec<u8>)>, committed: bool) -> Result<Vec<i64>, SinkError> {
    let mut ids = Vec::with_capacity(packs.len());
    for (table, first, last, entries) in packs {
        conn.exec_drop(
            "INSERT INTO omrs_sync_version_pack (tbl, first_id, last_id, entries, committed) VALUES (?, ?, ?, ?, ?)",
            (table, first, last, entries, committed as i64),
        )
        .await
        .map_err(db("writing a version pack"))?;
        ids.extend(conn.last_insert_id().map(|id| id as i64));
    }
    Ok(ids)
}

/// One input record of the batch.
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// The payload parsed ([`Record::decode`]), or why it is not an `omrs.hq.changes` record.
    pub decoded: Result<HqEvent, String>,
}

/// The body of a `change` record, parsed straight from the bytes. `HqEvent` is an internally
/// tagged enum, which serde can only parse by buffering the whole record first; a change (nearly
/// every record) whose tag comes first, as every writer of the topic puts it, skips that.
#[derive(serde::Deserialize)]
struct ChangeRecord {
    #[serde(rename = "type")]
    _kind: serde::de::IgnoredAny,
    late: bool,
    #[serde(default)]
    person: Option<String>,
    #[serde(default)]
    origin_refs: serde_json::Map<String, J>,
    event: ChangeEvent,
}

impl Record {
    /// Parses the payload. Runs on the reader task, while the previous batch is being written.
    pub fn decode(partition: i32, offset: i64, payload: Vec<u8>) -> Record {
        let decoded = if payload.starts_with(b"{\"type\":\"change\",") {
            serde_json::from_slice::<ChangeRecord>(&payload)
                .map(|c| HqEvent::Change { late: c.late, person: c.person, origin_refs: c.origin_refs, event: c.event })
        } else {
            serde_json::from_slice::<HqEvent>(&payload)
        };
        let decoded = decoded.map_err(|e| format!("not an omrs.hq.changes record: {e}"));
        Record { partition, offset, payload, decoded }
    }
}

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
}

/// A batch's aggregate window versions: aggregate name → (site, window start, dimension) → the
/// latest version.
type Aggregates = BTreeMap<String, BTreeMap<(String, i64, String), AggRow>>;

/// One aggregate window version, as upserted.
#[derive(Debug, Clone)]
struct AggRow {
    site: String,
    start_ms: i64,
    end_ms: i64,
    dim: String,
    value: i64,
    is_final: bool,
    revision: u32,
    watermark_ms: i64,
}

/// `ms` as a DATETIME literal value (UTC).
fn datetime(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "1970-01-01 00:00:00".into())
}

/// Upserts the batch's aggregate versions (the latest per window wins: records are in order).
/// HQ's own `person_merge_log` rows whose loser a site's own log also names go: a site's merge
/// is logged by the site (semantics 4: the same rows whichever of the two arrived first).
/// HQ's rows are the ones `omrs_sync_merge` names; HQ writes at most one per loser.
async fn drop_covered_merge_logs(conn: &mut Conn) -> Result<(), SinkError> {
    conn.query_drop(
        "DELETE h FROM person_merge_log h
           JOIN omrs_sync_merge m ON m.merge_log_uuid = h.uuid
           JOIN person_merge_log s ON s.loser_person_id = h.loser_person_id AND s.uuid <> h.uuid",
    )
    .await
    .map_err(db("dropping HQ's merge logs that a site's log covers"))
}

async fn upsert_aggregates(conn: &mut Conn, by_name: Aggregates) -> Result<u64, SinkError> {
    let mut n = 0;
    for (name, rows) in by_name {
        let Some(def) = omrs_core::hq::AGGREGATES.iter().find(|a| a.name == name) else { continue };
        let rows: Vec<AggRow> = rows.into_values().collect();
        for chunk in rows.chunks(500) {
            let dim_col = def.dim_column.map(|c| format!("{c}, ")).unwrap_or_default();
            let per_row = if def.dim_column.is_some() { "(?, ?, ?, ?, ?, ?, ?, ?, NOW(3))" } else { "(?, ?, ?, ?, ?, ?, ?, NOW(3))" };
            let sql = format!(
                "INSERT INTO {t} (site, window_start, window_end, {dim_col}value, is_final, revision, watermark_ms, updated_at) VALUES {vals} \
                 ON DUPLICATE KEY UPDATE window_end = VALUES(window_end), value = VALUES(value), is_final = VALUES(is_final), \
                 revision = VALUES(revision), watermark_ms = VALUES(watermark_ms), updated_at = VALUES(updated_at)",
                t = def.hq_table,
                vals = vec![per_row; chunk.len()].join(", "),
            );
            let mut params: Vec<mysql_async::Value> = Vec::with_capacity(chunk.len() * 8);
            for r in chunk {
                params.push(r.site.clone().into());
                params.push(datetime(r.start_ms).into());
                params.push(datetime(r.end_ms).into());
                if def.dim_column.is_some() {
                    params.push(r.dim.clone().into());
                }
                params.push(r.value.into());
                params.push((r.is_final as i64).into());
                params.push((r.revision as i64).into());
                params.push(r.watermark_ms.into());
            }
            conn.exec_drop(sql, params).await.map_err(db("upserting dashboard aggregates"))?;
            n += chunk.len() as u64;
        }
    }
    Ok(n)
}

#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) version: RowVersion,
    hash: u64,
    pub(super) hq_id: Option<i64>,
}

/// (table, row key): the key of the caches and sets that follow rows.
type TKey = (String, String);

/// A (table, row key) looked up without building a [`TKey`]: it hashes and compares the same
/// (a derived `Hash` hashes the fields in order, as a tuple does).
#[derive(Hash)]
struct Tk<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<TKey> for Tk<'_> {
    fn equivalent(&self, k: &TKey) -> bool {
        self.0 == k.0 && self.1 == k.1
    }
}

/// A bounded cache by (table, row key), looked up without allocating: two generations, the
/// current one and the one before it. An entry read from the older generation moves to the
/// current one; when the current one is full it becomes the older one and the older one is
/// dropped. It holds between `cap / 2` and `cap` entries, the most recently used of them.
struct Cache<V> {
    cur: hashbrown::HashMap<TKey, V>,
    old: hashbrown::HashMap<TKey, V>,
    half: usize,
}

impl<V> Cache<V> {
    fn new(cap: usize) -> Self {
        Cache { cur: hashbrown::HashMap::new(), old: hashbrown::HashMap::new(), half: (cap / 2).max(1) }
    }

    fn get(&mut self, table: &str, key: &str) -> Option<&V> {
        let q = Tk(table, key);
        if !self.cur.contains_key(&q) {
            let (k, v) = self.old.remove_entry(&q)?;
            self.put(k, v);
        }
        self.cur.get(&q)
    }

    fn peek(&self, table: &str, key: &str) -> Option<&V> {
        let q = Tk(table, key);
        self.cur.get(&q).or_else(|| self.old.get(&q))
    }

    fn contains(&self, table: &str, key: &str) -> bool {
        self.peek(table, key).is_some()
    }

    fn put(&mut self, k: TKey, v: V) {
        self.old.remove(&k);
        if self.cur.len() >= self.half && !self.cur.contains_key(&k) {
            self.old = std::mem::take(&mut self.cur);
        }
        self.cur.insert(k, v);
    }

    /// [`Cache::put`], building the key only when the entry is not in the current generation.
    fn put_ref(&mut self, table: &str, key: &str, v: V) {
        match self.cur.get_mut(&Tk(table, key)) {
            Some(slot) => *slot = v,
            None => self.put((table.to_string(), key.to_string()), v),
        }
    }

    fn pop(&mut self, table: &str, key: &str) -> Option<V> {
        let q = Tk(table, key);
        let a = self.cur.remove(&q);
        let b = self.old.remove(&q);
        a.or(b)
    }
}

#[derive(Debug, Clone)]
struct MergeRec {
    winner: String,
    ts_ms: i64,
    reason: String,
    applied: bool,
    evidence: String,
    site: String,
}

#[derive(Debug, Clone)]
pub(super) struct PendingEntry {
    pub(super) tbl: String,
    pub(super) row_key: String,
    pub(super) waits: (String, String),
    pub(super) first_seen_ms: i64,
    pub(super) offset: i64,
    pub(super) partition: i32,
    /// The change record, as JSON.
    pub(super) event: String,
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

/// Where a staged write came from: for its dead letter, its latency, and its pending-store
/// entry should the writer park it.
pub(super) struct Receipt {
    pub(super) partition: i32,
    pub(super) offset: i64,
    site: String,
    commit_ms: i64,
    pub(super) first_seen_ms: i64,
    pub(super) payload: std::sync::Arc<Vec<u8>>,
}

/// A version to store with a staged write: in `omrs_sync_version`, or, for the first version
/// of a row the sink just created, in its batch's pack (`omrs_sync_version_pack`).
pub(super) struct StagedVersion {
    pub(super) table: String,
    pub(super) key: String,
    pub(super) stored: Stored,
    origin: Option<String>,
    pub(super) work: usize,
    packed: bool,
}

pub(super) struct StagedRow {
    /// Shared by the rows of a table that have the same columns ([`Applier::col_list`]).
    pub(super) cols: std::sync::Arc<[String]>,
    pub(super) vals: Vec<Value>,
    pub(super) work: usize,
    /// A row new to HQ, with the id the sink has just given it: a plain INSERT.
    pub(super) insert: bool,
}

#[derive(Default)]
struct Staged {
    /// table → rows, in stream order; `index` finds a row by its primary-key text.
    upserts: HashMap<String, Vec<Option<StagedRow>>>,
    index: hashbrown::HashMap<TKey, usize>,
    deletes: Vec<(String, Vec<(String, Value)>, usize)>,
    deleted_keys: hashbrown::HashSet<TKey>,
    versions: Vec<StagedVersion>,
    conflicts: Vec<Vec<Value>>,
    /// Where each staged write came from, by index.
    receipts: Vec<Receipt>,
    /// (table, op, count) in stream order, a run of the same table and op counted once.
    ops: Vec<(String, &'static str, u64)>,
    /// Pending-store changes written with this unit: rows parked, and rows woken or expired.
    pending_insert: Vec<(i64, PendingEntry)>,
    pending_delete: Vec<i64>,
    /// The version packs of `versions`, stored ahead by [`Applier::plan_batch`] (off the write
    /// path) and not yet marked committed: their pack ids. None: not stored yet.
    packs_ahead: Option<Vec<i64>>,
    /// Rows written to a person that is not their own: (table, HQ id, own person uuid, own
    /// `preferred`, work index), kept in `omrs_sync_moved`.
    moved: Vec<(String, i64, String, Value, usize)>,
}

impl Staged {
    /// One more row written of `table` by `op`.
    fn count_op(&mut self, table: &str, op: &'static str) {
        match self.ops.last_mut() {
            Some((t, o, n)) if *o == op && t == table => *n += 1,
            _ => self.ops.push((table.to_string(), op, 1)),
        }
    }
}

/// A row's primary key at HQ as text, to find it again among a batch's staged rows:
/// `col=value` per key column, joined by `|` (a value in its `Debug` form, which tells an
/// integer from a string).
fn pk_text(pk: &[(String, Value)]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(24);
    for (i, (c, v)) in pk.iter().enumerate() {
        if i > 0 {
            s.push('|');
        }
        s.push_str(c);
        s.push('=');
        // Writing into a String cannot fail.
        let _ = match v {
            Value::Int(n) => write!(s, "Int({n})"),
            other => write!(s, "{other:?}"),
        };
    }
    s
}

/// A batch planned while the previous one was being written (see [`Applier::plan_batch`]): the
/// units to write in order, the dashboard aggregates, and what planning already decided (dead
/// letters, parked rows).
pub struct PlannedBatch {
    units: Vec<Staged>,
    aggregates: Aggregates,
    pub out: Outcome,
    /// [`Applier::written`] with this once the batch has committed.
    pub generation: u64,
}

impl PlannedBatch {
    /// Writes the batch inside an open transaction; returns the rows HQ did not write, whose
    /// cached ids and versions the applier must forget, and the rows parked for them
    /// ([`Applier::forget`]). Rows staged against a row that an earlier batch did not write,
    /// learnt of after this batch was planned, wait for it ([`super::rejected`]).
    pub async fn write(self, writer: &Writer, conn: &mut Conn) -> Result<(Outcome, Rejected), SinkError> {
        let mut out = self.out;
        let mut missing = writer.carry.for_batch(self.generation);
        let mut rejected = Rejected::default();
        let merge_logs = self.units.iter().any(|u| u.upserts.contains_key("person_merge_log"));
        for unit in self.units {
            rejected.extend(writer.execute(conn, unit, &mut out, &mut missing).await?);
        }
        out.aggregates = upsert_aggregates(conn, self.aggregates).await?;
        if merge_logs {
            drop_covered_merge_logs(conn).await?;
        }
        Ok((out, rejected))
    }
}

/// What writing needs of HQ's table model: staged units are written by this, on the writing
/// connection, while the [`Applier`] plans the next batch.
pub struct Writer {
    pub(super) tables: BTreeMap<String, std::sync::Arc<TableModel>>,
    order: Vec<String>,
    max_rows_per_statement: usize,
    /// Tables whose upserts HQ need not check the foreign keys of: every foreign key of the
    /// table is resolved by the sink from a uuid to the id of a row at HQ (or staged before it).
    /// Empty with `sinks.hq_mysql.server_fk_checks`.
    unchecked: HashSet<String>,
    /// What earlier batches did not write, shared with the applier ([`super::rejected`]).
    carry: Carry,
    /// The next `omrs_sync_pending` id, shared with the applier: the writer parks rows too.
    pub(super) pending_ids: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Writer {
    /// Writes what is staged: upserts parents first, then deletes children first, versions and
    /// conflicts. A statement that fails definitely is retried row by row; the rows that still
    /// fail are dead-lettered and their versions are not written. A row staged against a row
    /// that is not at HQ (in `missing`, or rejected here) is parked instead of written, and
    /// joins `missing` itself ([`super::rejected`]). Returns the rows not written.
    async fn execute(&self, conn: &mut Conn, mut staged: Staged, out: &mut Outcome, missing: &mut Missing) -> Result<Rejected, SinkError> {
        self.read_overwritten(conn, &mut staged.conflicts).await?;

        let t_exec = std::time::Instant::now();
        let mut tracker = Tracker::new(missing, &staged.versions, &staged.receipts);
        let order = &self.order;
        // HQ checks foreign keys only where the sink has not resolved them itself (see
        // `Writer::unchecked`). Deletes below are always checked.
        let mut checking = true;
        // Written rows are freed after the batch, on a blocking thread: freeing thousands of
        // small values here would keep HQ's connection idle.
        let mut written: Vec<Vec<StagedRow>> = Vec::new();
        for table in order {
            let Some(rows) = staged.upserts.remove(table) else { continue };
            let rows: Vec<StagedRow> = rows.into_iter().flatten().collect();
            if rows.is_empty() {
                continue;
            }
            let check = !self.unchecked.contains(table);
            if check != checking {
                conn.query_drop(format!("SET SESSION foreign_key_checks = {}", check as u8)).await.map_err(db("setting foreign-key checks"))?;
                checking = check;
            }
            // Group by column list (rows of one table normally share it).
            // New rows (plain INSERT) apart from the rest (upserts).
            let mut groups: Vec<((bool, std::sync::Arc<[String]>), Vec<StagedRow>)> = Vec::new();
            for r in rows {
                match groups.iter_mut().find(|((i, c), _)| *i == r.insert && (std::sync::Arc::ptr_eq(c, &r.cols) || *c == r.cols)) {
                    Some((_, g)) => g.push(r),
                    None => groups.push(((r.insert, r.cols.clone()), vec![r])),
                }
            }
            let t_table = std::time::Instant::now();
            let n_rows: usize = groups.iter().map(|g| g.1.len()).sum();
            for ((insert, cols), rows) in groups {
                let tm = self.tables.get(table);
                // A new row is inserted: a collision at HQ is an error, never an update of the
                // row that is there.
                let pk: Option<Vec<String>> = (!insert).then(|| tm.map(|t| t.pk.clone()).unwrap_or_default());
                let per = (60_000 / cols.len().max(1)).clamp(1, self.max_rows_per_statement);
                for chunk in stable_chunks(&rows, per) {
                    self.write_chunk(conn, (table, &cols, pk.as_deref()), chunk, &mut tracker, out).await?;
                }
                written.push(rows);
            }
            tracing::debug!(table = %table, rows = n_rows, ms = t_table.elapsed().as_secs_f64() * 1000.0, "table written");
        }
        if !checking {
            conn.query_drop("SET SESSION foreign_key_checks = 1").await.map_err(db("turning foreign-key checks back on"))?;
        }
        // Deletes, children first.
        let pos: HashMap<&str, usize> = order.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        staged.deletes.sort_by_key(|(t, _, _)| std::cmp::Reverse(pos.get(t.as_str()).copied().unwrap_or(0)));
        for (table, pk, wi) in &staged.deletes {
            let cond = pk.iter().map(|(c, _)| format!("{} = ?", q(c))).collect::<Vec<_>>().join(" AND ");
            let params: Vec<Value> = pk.iter().map(|(_, v)| v.clone()).collect();
            if let Err(e) = conn.exec_drop(format!("DELETE FROM {} WHERE {cond}", q(table)), params).await {
                if is_transient_db(&e) {
                    return Err(SinkError::db(format!("deleting from {table}"), e));
                }
                tracker.not_written(*wi, Why::Refused);
                let w = &staged.receipts[*wi];
                out.dead.push(DeadLetter {
                    partition: w.partition,
                    offset: w.offset,
                    kind: "row_rejected",
                    reason: format!("HQ refused to delete the {table} row: {e}"),
                    payload: w.payload.to_vec(),
                });
            }
        }
        let t_rows = t_exec.elapsed();
        // Versions of what was written: first versions packed per table, the rest one row each.
        // Not the versions of a row HQ did not write, including those of its earlier changes in
        // this unit (their staged write was replaced by the failed one).
        let failed = &tracker.failed;
        let unwritten: HashSet<(&str, &str)> = tracker.rejected.rows.iter().map(|u| (u.table.as_str(), u.key.as_str())).collect();
        let (packed, single): (Vec<&StagedVersion>, Vec<&StagedVersion>) = staged
            .versions
            .iter()
            .filter(|v| !failed.contains(&v.work) && (unwritten.is_empty() || !unwritten.contains(&(v.table.as_str(), v.key.as_str()))))
            .partition(|v| v.packed);
        write_version_rows(conn, &single, &staged.deletes).await?;
        let moved: Vec<_> = staged.moved.iter().filter(|m| !failed.contains(&m.4)).collect();
        write_moved_rows(conn, &moved).await?;
        // Packs stored ahead count once this transaction commits. If HQ rejected a row, its
        // entry must go: those packs are dropped and written again here, as are packs not
        // stored ahead (the batches applied on this connection).
        let ahead = staged.packs_ahead.take();
        if let Some(ids) = ahead.as_ref().filter(|ids| !ids.is_empty()) {
            let sql = if failed.is_empty() { "UPDATE omrs_sync_version_pack SET committed = 1" } else { "DELETE FROM omrs_sync_version_pack" };
            let marks = vec!["?"; ids.len()].join(",");
            conn.exec_drop(format!("{sql} WHERE pack_id IN ({marks})"), ids.clone()).await.map_err(db("committing version packs"))?;
        }
        if ahead.is_none() || !failed.is_empty() {
            store_packs(conn, version_packs(&packed), true).await?;
        }
        if !staged.receipts.is_empty() {
            tracing::debug!(rows_ms = t_rows.as_millis() as u64, versions_ms = (t_exec.elapsed() - t_rows).as_millis() as u64, "rows written");
        }
        // A failed row's cached id and version are gone with it (the applier forgets them), and
        // the rows parked here are parked in the same transaction.
        let Tracker { failed, rejected, .. } = tracker;
        staged.pending_insert.extend(rejected.parked.iter().cloned());
        // Pending store changes, in the same transaction.
        write_pending(conn, &staged.pending_delete, &staged.pending_insert).await?;
        for chunk in staged.conflicts.chunks(200) {
            let marks = vec!["(?,?,?,?,?,?,?,?,NOW(3))"; chunk.len()].join(",");
            let params: Vec<Value> = chunk.iter().flatten().cloned().collect();
            conn.exec_drop(
                format!(
                    "INSERT INTO omrs_sync_conflict (tbl, row_key, winner_site, winner_version, loser_site, loser_version, loser_values, overwritten, detected_at) VALUES {marks}"
                ),
                params,
            )
            .await
            .map_err(db("logging conflicts"))?;
        }
        for c in &staged.conflicts {
            if matches!(c.get(7), Some(Value::Int(1))) {
                if let Some(Value::Bytes(t)) = c.first() {
                    *out.conflicts.entry(String::from_utf8_lossy(t).to_string()).or_default() += 1;
                }
            }
        }
        for (i, r) in staged.receipts.iter().enumerate() {
            if !failed.contains(&i) {
                out.commits.push((r.site.clone(), r.commit_ms));
            }
        }
        for (table, op, n) in std::mem::take(&mut staged.ops) {
            *out.applied.entry((table, op)).or_default() += n;
        }
        tokio::task::spawn_blocking(move || drop((written, staged)));
        Ok(rejected)
    }

    /// Conflicts that overwrite: reads the values that are about to be overwritten.
    async fn read_overwritten(&self, conn: &mut Conn, conflicts: &mut [Vec<Value>]) -> Result<(), SinkError> {
        for c in conflicts.iter_mut() {
            if matches!(c.get(7), Some(Value::Int(1))) {
                let (Some(Value::Bytes(t)), Some(Value::Bytes(k))) = (c.first(), c.get(1)) else { continue };
                let table = String::from_utf8_lossy(t).to_string();
                let key = String::from_utf8_lossy(k).to_string();
                if let Some(tm) = self.tables.get(&table) {
                    if tm.has_uuid {
                        let row: Option<mysql_async::Row> =
                            conn.exec_first(format!("SELECT * FROM {} WHERE uuid = ?", q(&table)), (key.as_str(),)).await.map_err(db("reading an overwritten row"))?;
                        if let Some(r) = row {
                            let mut m = serde_json::Map::new();
                            for (i, col) in r.columns_ref().iter().enumerate() {
                                let v: Option<Value> = r.as_ref(i).cloned();
                                m.insert(col.name_str().to_string(), J::String(v.map(|v| v.as_sql(true)).unwrap_or_default()));
                            }
                            c[6] = Value::from(J::Object(m).to_string());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) async fn upsert<'r>(
        &self,
        conn: &mut Conn,
        table: &str,
        cols: &[String],
        upsert_pk: Option<&[String]>,
        rows: impl Iterator<Item = &'r StagedRow> + Clone,
    ) -> Result<(), mysql_async::Error> {
        let n = rows.clone().count();
        if n == 0 {
            return Ok(());
        }
        let one = format!("({})", vec!["?"; cols.len()].join(","));
        let on_duplicate = match upsert_pk {
            Some(pk) => {
                let updates: Vec<String> = cols.iter().filter(|c| !pk.contains(c)).map(|c| format!("{0} = VALUES({0})", q(c))).collect();
                let update = if updates.is_empty() { format!("{0} = {0}", q(&cols[0])) } else { updates.join(", ") };
                format!(" ON DUPLICATE KEY UPDATE {update}")
            }
            None => String::new(),
        };
        let sql = format!("INSERT INTO {} ({}) VALUES {}{on_duplicate}", q(table), cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(","), vec![one; n].join(","));
        let params: Vec<Value> = rows.flat_map(|r| r.vals.iter().cloned()).collect();
        conn.exec_drop(sql, params).await
    }

}

/// Stores versions one row each in `omrs_sync_version` (a delete's as a tombstone).
async fn write_version_rows(conn: &mut Conn, single: &[&StagedVersion], deletes: &[(String, Vec<(String, Value)>, usize)]) -> Result<(), SinkError> {
    for chunk in stable_chunks(single, 500) {
        let marks = vec!["(?,?,?,?,?,?,?,?,?,?,?)"; chunk.len()].join(",");
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 11);
        for v in chunk {
            let s = &v.stored;
            let deleted = deletes.iter().any(|(_, _, w)| *w == v.work);
            params.extend([
                Value::from(v.table.as_str()),
                Value::from(v.key.as_str()),
                s.hq_id.map(Value::from).unwrap_or(Value::NULL),
                Value::from(s.version.change_ms),
                Value::from(s.version.priority),
                Value::from(s.version.site.as_str()),
                Value::from(s.version.commit_ms),
                Value::from(s.version.position.as_str()),
                v.origin.as_deref().map(Value::from).unwrap_or(Value::NULL),
                Value::from(s.hash),
                Value::from(deleted as i64),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO omrs_sync_version (tbl, row_key, hq_id, change_ms, priority, site, commit_ms, position, origin_key, content_hash, deleted)
                 VALUES {marks} ON DUPLICATE KEY UPDATE hq_id = COALESCE(VALUES(hq_id), hq_id), change_ms = VALUES(change_ms), priority = VALUES(priority),
                 site = VALUES(site), commit_ms = VALUES(commit_ms), position = VALUES(position), origin_key = COALESCE(VALUES(origin_key), origin_key),
                 content_hash = VALUES(content_hash), deleted = VALUES(deleted)"
            ),
            params,
        )
        .await
        .map_err(db("writing row versions"))?;
    }
    Ok(())
}

/// Remembers whose the rows written to another person are (`omrs_sync_moved`).
async fn write_moved_rows(conn: &mut Conn, moved: &[&(String, i64, String, Value, usize)]) -> Result<(), SinkError> {
    for chunk in moved.chunks(500) {
        let marks = vec!["(?,?,?,?)"; chunk.len()].join(",");
        let params: Vec<Value> = chunk.iter().flat_map(|(t, id, p, pref, _)| [Value::from(t.as_str()), Value::from(*id), Value::from(p.as_str()), pref.clone()]).collect();
        conn.exec_drop(
            format!("INSERT INTO omrs_sync_moved (tbl, hq_id, person_uuid, preferred) VALUES {marks} ON DUPLICATE KEY UPDATE person_uuid = VALUES(person_uuid), preferred = VALUES(preferred)"),
            params,
        )
        .await
        .map_err(db("remembering where rows written to a survivor belong"))?;
    }
    Ok(())
}

/// Pending store changes: rows woken or expired leave `omrs_sync_pending`, rows parked join it.
async fn write_pending(conn: &mut Conn, delete: &[i64], insert: &[(i64, PendingEntry)]) -> Result<(), SinkError> {
    for chunk in delete.chunks(1000) {
        let marks = vec!["?"; chunk.len()].join(",");
        conn.exec_drop(format!("DELETE FROM omrs_sync_pending WHERE pending_id IN ({marks})"), chunk.to_vec())
            .await
            .map_err(db("clearing woken pending rows"))?;
    }
    for chunk in insert.chunks(200) {
        let marks = vec!["(?,?,?,?,?,?,?,?)"; chunk.len()].join(",");
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 8);
        for (id, p) in chunk {
            params.extend([
                Value::from(*id),
                Value::from(p.tbl.as_str()),
                Value::from(p.row_key.as_str()),
                Value::from(p.waits.0.as_str()),
                Value::from(p.waits.1.as_str()),
                Value::from(p.first_seen_ms),
                Value::from(p.offset),
                Value::from(p.event.as_str()),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO omrs_sync_pending (pending_id, tbl, row_key, waits_for_table, waits_for_key, first_seen_ms, source_offset, event) VALUES {marks}"
            ),
            params,
        )
        .await
        .map_err(db("parking rows"))?;
    }
    Ok(())
}

/// What the sink needs to know of one HQ column, worked out once per table.
#[derive(Debug, Clone, Default)]
struct ColInfo {
    name: String,
    /// The foreign key from this column, if any.
    fk: Option<omrs_ingest::model::Fk>,
    /// A reference to a table whose key is one integer column (mapped uuid → HQ id).
    fk_to_int: bool,
    binary: bool,
    int: bool,
    /// Part of the primary key.
    pk: bool,
    /// Nullable, with NULL as its default: a new row's NULL need not be sent.
    null_default: bool,
}

/// One HQ table's columns as the sink plans rows with them, worked out once at load: a row's
/// column is found with one hash lookup (not by scanning the table's foreign keys).
#[derive(Debug, Default)]
struct Columns {
    index: hashbrown::HashMap<String, usize>,
    info: Vec<ColInfo>,
    /// [`TableModel::int_pk`].
    int_pk: Option<String>,
}

impl Columns {
    fn get(&self, col: &str) -> Option<&ColInfo> {
        self.index.get(col).map(|&i| &self.info[i])
    }

    fn fk(&self, col: &str) -> Option<&omrs_ingest::model::Fk> {
        self.get(col).and_then(|c| c.fk.as_ref())
    }
}

/// HQ's state as the sink sees it: table model, id and version caches, merges, pending rows.
pub struct Applier {
    pub model: Model,
    rules: SiteRules,
    ids: Cache<i64>,
    /// Keys the current flush's bulk lookup found absent at HQ: no point query for them.
    absent: hashbrown::HashSet<TKey>,
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
    next_id: HashMap<String, i64>,
    merges: HashMap<String, MergeRec>,
    pending: BTreeMap<i64, PendingEntry>,
    waits: hashbrown::HashMap<TKey, Vec<i64>>,
    pending_rows: hashbrown::HashMap<TKey, usize>,
    /// The next `omrs_sync_pending` id, shared with the writers ([`Writer::pending_ids`]).
    pending_ids: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Rows a writer parked for a row that a later batch has staged since: the next plan
    /// wakes them.
    ready: Vec<i64>,
    /// What batches did not write, for the writes of batches planned before the applier
    /// learnt of it ([`super::rejected`]).
    carry: Carry,
    daemon_user: i64,
    fk_wait_ms: i64,
    max_pending: usize,
    warned: HashSet<(String, String)>,
    columns: HashMap<String, std::sync::Arc<Columns>>,
    /// The column lists of the rows staged lately, per table (a few: new rows leave out their
    /// NULLs, so a table's rows have a few lists): a row shares the list that has its columns
    /// instead of a list of its own.
    col_lists: HashMap<String, Vec<std::sync::Arc<[String]>>>,
    pub max_rows_per_statement: usize,
    fk_checks: bool,
    /// Tables whose every foreign key the sink resolves from a uuid to an HQ id (worked out
    /// with `columns`): HQ need not check them again ([`Writer::unchecked`]).
    resolved_fks: HashSet<String>,
}

/// The step of [`stable_chunks`]' sizes below the maximum.
const CHUNK_STEP: usize = 32;

/// Splits `items` into chunks whose sizes repeat from batch to batch: `max` as often as it fits,
/// then a multiple of [`CHUNK_STEP`], then what is left (fewer than the step). Every distinct
/// size is its own prepared statement (the connection caches them by text), so a batch's
/// partial chunks do not make the server parse a new multi-row statement each time, and a
/// table's rows take at most two statements besides the full ones (powers of two took up to
/// ten, each a round trip with its own overhead at HQ).
fn stable_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let n = if rest.len() >= max {
            max
        } else if rest.len() >= CHUNK_STEP {
            rest.len() / CHUNK_STEP * CHUNK_STEP
        } else {
            rest.len()
        };
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// The number of placeholders of an `IN (…)` list for `n` keys: the next power of two (up to
/// `max`), so that lookups reuse a few prepared statements. The list is padded by repeating a
/// key, which does not change the result.
fn padded_len(n: usize, max: usize) -> usize {
    n.next_power_of_two().min(max).max(n)
}

fn db(context: &str) -> impl FnOnce(mysql_async::Error) -> SinkError + '_ {
    move |e| SinkError::db(context, e)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// FNV-1a: a stable content hash (the same across runs and builds).
fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

pub(super) fn q(id: &str) -> String {
    format!("`{}`", id.replace('`', "``"))
}

fn ms_to_datetime(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "1970-01-01 00:00:00".into())
}

fn is_binary_type(t: &str) -> bool {
    let t = t.to_ascii_lowercase();
    t.contains("blob") || t.contains("binary")
}

enum Intake {
    Work(Box<Work>),
    Merge(String, MergeRec),
}

enum Plan {
    /// Staged (or an idempotent no-op).
    Done,
    /// Waits for (table, key).
    Park(String, String),
    Dead(&'static str, String),
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
        let mut merges = HashMap::new();
        let rows: Vec<(String, String, i64, String, i64, Option<String>, String)> = conn
            .query("SELECT loser_uuid, winner_uuid, ts_ms, reason, applied, evidence, site FROM omrs_sync_merge")
            .await
            .map_err(db("reading omrs_sync_merge"))?;
        for (loser, winner, ts_ms, reason, applied, evidence, site) in rows {
            merges.insert(loser, MergeRec { winner, ts_ms, reason, applied: applied == 1, evidence: evidence.unwrap_or_default(), site });
        }
        let mut a = Applier {
            model,
            rules,
            ids: Cache::new(500_000),
            absent: hashbrown::HashSet::new(),
            tombstones: hashbrown::HashSet::new(),
            deleting: hashbrown::HashMap::new(),
            generation: 0,
            versions: Cache::new(500_000),
            packs: LruCache::new(NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN)),
            next_id: HashMap::new(),
            merges,
            pending: BTreeMap::new(),
            waits: hashbrown::HashMap::new(),
            pending_rows: hashbrown::HashMap::new(),
            pending_ids: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1)),
            ready: Vec::new(),
            carry: Carry::default(),
            daemon_user,
            fk_wait_ms,
            max_pending: usize::MAX,
            warned: HashSet::new(),
            columns: HashMap::new(),
            col_lists: HashMap::new(),
            max_rows_per_statement: 1000,
            fk_checks: false,
            resolved_fks: HashSet::new(),
        };
        // Columns whose default is NULL: a new row leaves its NULLs in them out of the INSERT
        // (fewer values for HQ to take in; the row is the same).
        let null_default: Vec<(String, String)> = conn
            .exec(
                "SELECT table_name, column_name FROM information_schema.columns
                 WHERE table_schema = ? AND is_nullable = 'YES' AND (column_default IS NULL OR column_default = 'NULL')",
                (database,),
            )
            .await
            .map_err(db("reading information_schema.columns"))?;
        let null_default: HashSet<(String, String)> = null_default.into_iter().collect();
        for (name, t) in &a.model.tables {
            let mut m = Columns { int_pk: t.int_pk().map(str::to_string), ..Columns::default() };
            let mut resolved = true;
            for c in &t.columns {
                let fk = t.fk(&c.name).cloned();
                let fk_to_int =
                    fk.as_ref().is_some_and(|fk| a.model.table(&fk.ref_table).and_then(|rt| rt.int_pk().map(|p| p == fk.ref_column)).unwrap_or(false));
                resolved &= fk_to_int || fk.is_none();
                m.index.insert(c.name.clone(), m.info.len());
                m.info.push(ColInfo {
                    name: c.name.clone(),
                    fk,
                    fk_to_int,
                    binary: is_binary_type(&c.column_type),
                    int: is_int_type(&c.column_type),
                    pk: t.pk.contains(&c.name),
                    null_default: null_default.contains(&(name.clone(), c.name.clone())),
                });
            }
            if resolved {
                a.resolved_fks.insert(name.clone());
            }
            a.columns.insert(name.clone(), std::sync::Arc::new(m));
        }
        let dead: Vec<(String, String)> =
            conn.query("SELECT tbl, row_key FROM omrs_sync_version WHERE deleted = 1").await.map_err(db("reading tombstones"))?;
        a.tombstones.extend(dead);
        // Version packs stored ahead of a batch that never committed.
        conn.query_drop("DELETE FROM omrs_sync_version_pack WHERE committed = 0").await.map_err(db("clearing version packs of uncommitted batches"))?;
        let rows: Vec<(i64, String, String, String, String, i64, i64, i32, String)> = conn
            .query(
                "SELECT pending_id, tbl, row_key, waits_for_table, waits_for_key, first_seen_ms, source_offset, 0, event
                 FROM omrs_sync_pending ORDER BY pending_id",
            )
            .await
            .map_err(db("reading omrs_sync_pending"))?;
        for (id, tbl, row_key, wt, wk, first_seen_ms, offset, partition, event) in rows {
            a.add_pending(id, PendingEntry { tbl, row_key, waits: (wt, wk), first_seen_ms, offset, partition, event });
            a.pending_ids.fetch_max(id + 1, std::sync::atomic::Ordering::Relaxed);
        }
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

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn oldest_pending_ms(&self) -> Option<i64> {
        self.pending.values().map(|p| p.first_seen_ms).min()
    }

    fn add_pending(&mut self, id: i64, p: PendingEntry) {
        self.waits.entry(p.waits.clone()).or_default().push(id);
        *self.pending_rows.entry((p.tbl.clone(), p.row_key.clone())).or_default() += 1;
        self.pending.insert(id, p);
    }

    fn take_pending(&mut self, id: i64) -> Option<PendingEntry> {
        let p = self.pending.remove(&id)?;
        if let Some(v) = self.waits.get_mut(&p.waits) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                self.waits.remove(&p.waits);
            }
        }
        let k = Tk(&p.tbl, &p.row_key);
        if let Some(n) = self.pending_rows.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.pending_rows.remove(&k);
            }
        }
        Some(p)
    }

    fn table(&self, name: &str) -> Option<std::sync::Arc<TableModel>> {
        self.model.table(name).cloned()
    }

    /// The loser's final survivor, following merges transitively (None for a survivor, even
    /// one whose chain would lead back to itself).
    fn survivor_of(&self, uuid: &str) -> Option<String> {
        let mut cur = self.merges.get(uuid)?.winner.clone();
        for _ in 0..64 {
            match self.merges.get(&cur) {
                Some(m) if m.winner != cur => cur = m.winner.clone(),
                _ => break,
            }
        }
        (cur != uuid).then_some(cur)
    }

    /// `w` with its references pointing at merge survivors ([`canonicalise`]) and its key
    /// worked out (see [`Work::key`]).
    fn keyed(&self, mut w: Work) -> Work {
        if !self.merges.is_empty() {
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

    /// Content hash of a row in uuid space: references by uuid, site-local ids left out.
    fn content_hash(tm: &TableModel, cm: &Columns, ev: &ChangeEvent) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        if ev.op == Op::Delete {
            return 0;
        }
        // A value's text, hashed without a String per value: a string as is, anything else
        // as JSON.
        let mut buf: Vec<u8> = Vec::new();
        let mut text = |h: &mut u64, v: &J| match v {
            J::String(s) => fnv(h, s.as_bytes()),
            other => {
                buf.clear();
                // Serializing a Value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut buf, other);
                fnv(h, &buf);
            }
        };
        let by_uuid = tm.has_uuid || tm.shared_parent.is_some();
        if let Some(after) = &ev.after {
            for (col, v) in after {
                let info = cm.get(col);
                if by_uuid && info.is_some_and(|c| c.pk) {
                    continue;
                }
                fnv(&mut h, col.as_bytes());
                fnv(&mut h, b"=");
                if info.is_some_and(|c| c.fk.is_some()) {
                    text(&mut h, ev.refs.get(col).unwrap_or(&J::Null));
                } else {
                    text(&mut h, v);
                }
                fnv(&mut h, b";");
            }
        }
        h
    }

    /// Fills the id cache for (table, uuid) pairs in bulk.
    async fn prefetch_ids(&mut self, conn: &mut Conn, wanted: HashMap<String, HashSet<&str>>) -> Result<(), SinkError> {
        for (table, keys) in wanted {
            let Some(tm) = self.table(&table) else { continue };
            let keys: Vec<&str> = keys.into_iter().filter(|k| !self.ids.contains(&table, k)).collect();
            if keys.is_empty() {
                continue;
            }
            let Some(pk) = tm.int_pk().map(str::to_string) else { continue };
            for chunk in keys.chunks(1000) {
                let width = padded_len(chunk.len(), 1000);
                let marks = vec!["?"; width].join(",");
                let sql = if tm.has_uuid {
                    format!("SELECT uuid, {} FROM {} WHERE uuid IN ({marks})", q(&pk), q(&table))
                } else if let Some(parent) = tm.shared_parent.as_deref().and_then(|p| self.model.table(p)).filter(|p| p.has_uuid) {
                    let ppk = parent.int_pk().unwrap_or("");
                    format!(
                        "SELECT p.uuid, t.{} FROM {} t JOIN {} p ON p.{} = t.{} WHERE p.uuid IN ({marks})",
                        q(&pk),
                        q(&table),
                        q(&parent.name),
                        q(ppk),
                        q(&pk)
                    )
                } else {
                    continue;
                };
                let params: Vec<Value> = chunk.iter().chain(std::iter::repeat_n(&chunk[0], width - chunk.len())).map(|k| Value::from(*k)).collect();
                let rows: Vec<(String, i64)> = conn.exec(sql, params).await.map_err(db("looking up HQ ids"))?;
                let mut found = HashSet::with_capacity(rows.len());
                for (u, id) in rows {
                    if self.deleting.contains_key(&Tk(&table, &u)) {
                        continue;
                    }
                    self.ids.put((table.clone(), u.clone()), id);
                    found.insert(u);
                }
                for k in chunk {
                    if !found.contains(*k) {
                        self.absent.insert((table.clone(), k.to_string()));
                    }
                }
            }
        }
        Ok(())
    }

    /// A row that this flush's bulk lookup found absent at HQ, and that HQ never deleted: it has
    /// no version (only a deleted row has one without being at HQ), so none is looked up. (The
    /// bulk lookup is by uuid: only rows keyed by one are ever `absent`.)
    fn known_new(&self, table: &str, key: &str) -> bool {
        let q = Tk(table, key);
        self.absent.contains(&q) && !self.tombstones.contains(&q)
    }

    /// The HQ id of the row of `table` that `uuid` stands for, if it is at HQ.
    async fn lookup_id(&mut self, conn: &mut Conn, table: &str, uuid: &str) -> Result<Option<i64>, SinkError> {
        if let Some(id) = self.ids.get(table, uuid) {
            return Ok(Some(*id));
        }
        if self.absent.contains(&Tk(table, uuid)) {
            return Ok(None);
        }
        let mut want = HashMap::new();
        want.insert(table.to_string(), HashSet::from([uuid]));
        self.prefetch_ids(conn, want).await?;
        Ok(self.ids.get(table, uuid).copied())
    }

    async fn prefetch_versions(&mut self, conn: &mut Conn, wanted: HashMap<String, HashSet<&str>>) -> Result<(), SinkError> {
        for (table, keys) in wanted {
            let keys: Vec<&str> = keys.into_iter().filter(|k| !self.versions.contains(&table, k)).collect();
            for chunk in keys.chunks(1000) {
                let width = padded_len(chunk.len(), 1000);
                let marks = vec!["?"; width].join(",");
                let sql = format!(
                    "SELECT row_key, hq_id, change_ms, priority, site, commit_ms, position, content_hash
                     FROM omrs_sync_version WHERE tbl = ? AND row_key IN ({marks})"
                );
                let mut params: Vec<Value> = vec![Value::from(table.as_str())];
                params.extend(chunk.iter().chain(std::iter::repeat_n(&chunk[0], width - chunk.len())).map(|k| Value::from(*k)));
                let rows: Vec<mysql_async::Row> = conn.exec(sql, params).await.map_err(db("reading row versions"))?;
                let mut found = HashSet::new();
                for r in rows {
                    let (Some(key), hq_id, Some(change_ms), Some(priority), Some(site), Some(commit_ms), Some(position), Some(hash)) = (
                        r.get::<String, _>(0),
                        r.get::<Option<i64>, _>(1).flatten(),
                        r.get::<i64, _>(2),
                        r.get::<i32, _>(3),
                        r.get::<String, _>(4),
                        r.get::<i64, _>(5),
                        r.get::<String, _>(6),
                        r.get::<u64, _>(7),
                    ) else {
                        continue;
                    };
                    found.insert(key.clone());
                    let version = RowVersion { change_ms, priority, site, commit_ms, position };
                    self.versions.put((table.clone(), key), Some(Stored { version, hash, hq_id }));
                }
                // Packs hold first versions of uuid-keyed rows only, found by the row's HQ id.
                let packed = self.model.table(&table).is_some_and(|t| t.has_uuid);
                let mut misses = Vec::new();
                for k in chunk {
                    if !found.contains(*k) {
                        self.versions.put((table.clone(), k.to_string()), None);
                        if let Some(id) = self.ids.peek(&table, k).filter(|_| packed) {
                            misses.push((k.to_string(), *id));
                        }
                    }
                }
                if !misses.is_empty() {
                    self.packed_versions(conn, &table, misses).await?;
                }
            }
        }
        Ok(())
    }

    /// Versions of rows at HQ that `omrs_sync_version` does not hold: their first version, in
    /// the pack of the batch that created them, found by the row's HQ id.
    async fn packed_versions(&mut self, conn: &mut Conn, table: &str, misses: Vec<(String, i64)>) -> Result<(), SinkError> {
        for (key, id) in misses {
            let mut found = self.pack_entry(table, id, &key);
            if found.is_none() {
                let candidates: Vec<(i64, i64)> = conn
                    .exec(
                        "SELECT pack_id, last_id FROM omrs_sync_version_pack WHERE tbl = ? AND first_id <= ? AND committed = 1 ORDER BY first_id DESC LIMIT 8",
                        (table, id),
                    )
                    .await
                    .map_err(db("finding version packs"))?;
                for (pack_id, last_id) in candidates {
                    if last_id < id || self.packs.contains(&pack_id) {
                        continue;
                    }
                    let row: Option<(i64, i64, Vec<u8>)> = conn
                        .exec_first("SELECT first_id, last_id, entries FROM omrs_sync_version_pack WHERE pack_id = ?", (pack_id,))
                        .await
                        .map_err(db("reading a version pack"))?;
                    let Some((first_id, last_id, entries)) = row else { continue };
                    let bad = |e: String| SinkError::Schema(format!("omrs_sync_version_pack row {pack_id} ({table}) is not a version pack: {e}"));
                    let mut json = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(entries.get(4..).unwrap_or_default()), &mut json).map_err(|e| bad(e.to_string()))?;
                    let parsed: Vec<(i64, String, i64, i32, String, i64, String, Option<String>, u64)> =
                        serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
                    let entries = parsed
                        .into_iter()
                        .map(|(hq_id, key, change_ms, priority, site, commit_ms, position, _origin, hash)| {
                            let version = RowVersion { change_ms, priority, site, commit_ms, position };
                            (hq_id, (key, Stored { version, hash, hq_id: Some(hq_id) }))
                        })
                        .collect();
                    self.packs.put(pack_id, std::sync::Arc::new(Pack { table: table.to_string(), first_id, last_id, entries }));
                }
                found = self.pack_entry(table, id, &key);
            }
            if let Some(stored) = found {
                self.versions.put((table.to_string(), key), Some(stored));
            }
        }
        Ok(())
    }

    /// The version of row `key` with HQ id `id` in a cached pack (the newest pack if several).
    fn pack_entry(&self, table: &str, id: i64, key: &str) -> Option<Stored> {
        self.packs
            .iter()
            .filter(|(_, p)| p.table == table && p.first_id <= id && id <= p.last_id)
            .filter_map(|(pack_id, p)| p.entries.get(&id).filter(|(k, _)| k == key).map(|(_, s)| (*pack_id, s)))
            .max_by_key(|(pack_id, _)| *pack_id)
            .map(|(_, s)| s.clone())
    }

    async fn allocate(&mut self, conn: &mut Conn, table: &str, pk: &str) -> Result<i64, SinkError> {
        if !self.next_id.contains_key(table) {
            let max: Option<Option<i64>> =
                conn.query_first(format!("SELECT MAX({}) FROM {}", q(pk), q(table))).await.map_err(db("reading the next HQ id"))?;
            self.next_id.insert(table.to_string(), max.flatten().unwrap_or(0) + 1);
        }
        let n = self.next_id.entry(table.to_string()).or_insert(1);
        let id = *n;
        *n += 1;
        Ok(id)
    }

    /// One input record: a change to stage, a merge, or nothing left to do at HQ (dead letters
    /// and aggregates are collected on the way).
    fn intake(&self, rec: Record, out: &mut Outcome, aggregates: &mut Aggregates) -> Option<Intake> {
        let payload = std::sync::Arc::new(rec.payload);
        let ev: HqEvent = match rec.decoded {
            Ok(e) => e,
            Err(reason) => {
                out.dead.push(DeadLetter { partition: rec.partition, offset: rec.offset, kind: "invalid_record", reason, payload: payload.to_vec() });
                return None;
            }
        };
        match ev {
            HqEvent::Change { late, origin_refs, event, .. } => {
                if let Err(e) = event.validate() {
                    out.dead.push(DeadLetter { partition: rec.partition, offset: rec.offset, kind: "invalid_event", reason: e.to_string(), payload: payload.to_vec() });
                    return None;
                }
                if event.op == Op::Heartbeat {
                    return None;
                }
                let w = Work { partition: rec.partition, offset: rec.offset, first_seen_ms: now_ms(), late, origin_refs, event, payload, key: Err(String::new()), woken: false };
                Some(Intake::Work(Box::new(self.keyed(w))))
            }
            HqEvent::Merge { winner, loser, reason, evidence, site, ts_ms } => {
                Some(Intake::Merge(loser, MergeRec { winner, ts_ms, reason, applied: false, evidence: evidence.to_string(), site }))
            }
            // The Parquet sink's concern: HQ has no date partitions to finalise.
            HqEvent::Watermark { .. } => None,
            HqEvent::Aggregate { name, site, window_start_ms, window_end_ms, dim, value, is_final, revision, watermark_ms } => {
                let row = AggRow { site: site.clone(), start_ms: window_start_ms, end_ms: window_end_ms, dim: dim.clone(), value, is_final, revision, watermark_ms };
                aggregates.entry(name).or_default().insert((site, window_start_ms, dim), row);
                None
            }
            HqEvent::IdentityReview { person, reason, site, .. } => {
                tracing::warn!(person = %person, site = %site, reason = %reason, "identity review: an identifier of a merged person was voided or deleted; HQ keeps the merge");
                None
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
        for rec in records {
            match self.intake(rec, &mut out, &mut aggregates) {
                Some(Intake::Work(w)) => segment.push(*w),
                Some(Intake::Merge(loser, rec)) => {
                    self.flush(conn, std::mem::take(&mut segment), &mut out, &mut missing).await?;
                    self.merge(conn, &loser, rec).await?;
                    out.merges += 1;
                }
                None => {}
            }
        }
        self.flush(conn, segment, &mut out, &mut missing).await?;
        out.aggregates = upsert_aggregates(conn, aggregates).await?;
        drop_covered_merge_logs(conn).await?;
        self.retry_merges(conn).await?;
        let expired = self.expire_pending(&mut out);
        let failed = self.writer().execute(conn, expired, &mut out, &mut missing).await?;
        self.forget(&failed);
        Ok(out)
    }

    /// True when `records` must be applied by [`Applier::apply`] on the writing connection,
    /// after the batch before it has committed: a merge (it reads and moves rows), a merge
    /// still waiting for its persons, or a change of a merged person (its void date and
    /// reason are read from HQ). Every other batch can be planned while the previous one is
    /// being written ([`Applier::plan_batch`]).
    pub fn needs_sync(&self, records: &[Record]) -> bool {
        if self.merges.values().any(|m| !m.applied) {
            return true;
        }
        records.iter().any(|r| match &r.decoded {
            Ok(HqEvent::Merge { .. }) => true,
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
                Some(Intake::Merge(..)) => return Err(SinkError::Schema("internal: a merge in a batch planned ahead; needs_sync should have sent it to apply".into())),
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
            self.add_pending(*id, p.clone());
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

    /// Re-applies merges whose persons were not both at HQ yet.
    async fn retry_merges(&mut self, conn: &mut Conn) -> Result<(), SinkError> {
        let waiting: Vec<(String, MergeRec)> =
            self.merges.iter().filter(|(_, m)| !m.applied).map(|(l, m)| (l.clone(), m.clone())).collect();
        for (loser, rec) in waiting {
            self.merge(conn, &loser, rec).await?;
        }
        Ok(())
    }

    /// Rows that waited longer than the FK timeout go to the dead-letter topic.
    /// Returns the unit that deletes them from the pending store.
    fn expire_pending(&mut self, out: &mut Outcome) -> Staged {
        let cutoff = now_ms() - self.fk_wait_ms;
        let expired: Vec<i64> = self.pending.iter().filter(|(_, p)| p.first_seen_ms < cutoff).map(|(id, _)| *id).collect();
        let mut unit = Staged::default();
        for id in expired {
            if let Some(p) = self.take_pending(id) {
                unit.pending_delete.push(id);
                out.dead.push(DeadLetter {
                    partition: p.partition,
                    offset: p.offset,
                    kind: "fk_wait_timeout",
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
        // Bulk lookups first: the rows' own ids and versions, and every referenced uuid.
        self.absent.clear();
        // (The keys are borrowed from the batch; a table's name is copied once.)
        fn want<'k>(m: &mut HashMap<String, HashSet<&'k str>>, table: &str, key: &'k str) {
            match m.get_mut(table) {
                Some(s) => {
                    s.insert(key);
                }
                None => {
                    m.insert(table.to_string(), HashSet::from([key]));
                }
            }
        }
        let mut want_ids: HashMap<String, HashSet<&str>> = HashMap::new();
        let mut want_versions: HashMap<String, HashSet<&str>> = HashMap::new();
        for w in &works {
            let Some(table) = w.event.table.as_deref() else { continue };
            let (Some(tm), Some(cm)) = (self.model.table(table), self.columns.get(table)) else { continue };
            if let Ok(k) = &w.key {
                if tm.has_uuid || tm.shared_parent.is_some() {
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
            if let Some(w) = self.take_pending(id).and_then(|p| self.woken(p)) {
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
                        (Some(table), Ok(k)) => self.waits.get(&Tk(&table, k)).cloned().unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    for id in woken {
                        if let Some(w) = self.take_pending(id).and_then(|p| self.woken(p)) {
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
                        kind: "pending_full",
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
                    self.add_pending(id, p.clone());
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

    /// Decides what one change does at HQ and stages it.
    async fn plan(&mut self, conn: &mut Conn, w: &Work, staged: &mut Staged, units: &mut Vec<Staged>, out: &mut Outcome) -> Result<Plan, SinkError> {
        let ev = &w.event;
        let Some(table) = ev.table.clone() else { return Ok(Plan::Dead("invalid_event", "change without a table".into())) };
        let (Some(tm), Some(cm)) = (self.table(&table), self.columns.get(&table).cloned()) else {
            return Ok(Plan::Dead("unknown_table", format!("table `{table}` does not exist at HQ")));
        };
        let row_key = match &w.key {
            Ok(k) => k.clone(),
            Err(reason) => return Ok(Plan::Dead("missing_key", reason.clone())),
        };
        // Later changes of a parked row queue behind it. A woken row is the first of its row's
        // parked changes: the ones behind it wait for it to be done (re-parking it behind them
        // would leave them all waiting for each other).
        if !w.woken && self.pending_rows.contains_key(&Tk(&table, &row_key)) {
            return Ok(Plan::Park(table, row_key));
        }
        let version = RowVersion::of(ev, self.rules.get(&ev.site));
        let hash = Self::content_hash(&tm, &cm, ev);
        let cached = self.versions.get(&table, &row_key).cloned();
        let stored = match cached {
            Some(s) => s,
            None if self.known_new(&table, &row_key) => None,
            None => {
                let mut want = HashMap::new();
                want.insert(table.clone(), HashSet::from([row_key.as_str()]));
                self.prefetch_versions(conn, want).await?;
                self.versions.get(&table, &row_key).cloned().flatten()
            }
        };
        let mut overwritten: Option<&Stored> = None;
        if let Some(s) = &stored {
            match compare(&version, &s.version) {
                std::cmp::Ordering::Equal => return Ok(Plan::Done), // delivered twice
                std::cmp::Ordering::Less => {
                    if s.version.site != ev.site && s.hash != hash {
                        staged.conflicts.push(self.conflict_row(&table, &row_key, &s.version, &version, ev, false));
                        *out.conflicts.entry(table.clone()).or_default() += 1;
                    }
                    return Ok(Plan::Done);
                }
                std::cmp::Ordering::Greater => {
                    if s.version.site != ev.site && s.hash != hash {
                        overwritten = Some(s);
                    }
                }
            }
        }

        // The primary key at HQ.
        let int_pk = cm.int_pk.clone();
        let mut pk_vals: Vec<(String, Value)> = Vec::new();
        let mut own_id: Option<i64> = None;
        // The sink gave the row its HQ id just now: a uuid-keyed row new to HQ.
        let mut allocated = false;
        let row = if ev.op == Op::Delete { ev.before.as_ref() } else { ev.after.as_ref() };
        let Some(row) = row else { return Ok(Plan::Dead("invalid_event", format!("{table} {row_key}: no row image"))) };
        if let (Some(pk), Some(parent)) = (int_pk.as_deref(), tm.shared_parent.as_deref()) {
            match self.lookup_id(conn, parent, &row_key).await? {
                Some(id) => {
                    pk_vals.push((pk.to_string(), Value::from(id)));
                    own_id = Some(id);
                }
                None if ev.op == Op::Delete => own_id = None,
                None => return Ok(Plan::Park(parent.to_string(), row_key)),
            }
        } else if let (Some(pk), true) = (int_pk.as_deref(), tm.has_uuid || cm.fk(int_pk.as_deref().unwrap_or("")).is_none()) {
            let known = if tm.has_uuid {
                self.lookup_id(conn, &table, &row_key).await?
            } else {
                stored.as_ref().and_then(|s| s.hq_id)
            };
            let id = match known {
                Some(id) => Some(id),
                None if ev.op == Op::Delete => None,
                None => {
                    allocated = true;
                    Some(self.allocate(conn, &table, pk).await?)
                }
            };
            if let Some(id) = id {
                pk_vals.push((pk.to_string(), Value::from(id)));
            }
            own_id = id;
        } else {
            for col in &tm.pk {
                let info = cm.get(col).cloned().unwrap_or_else(|| ColInfo { name: col.clone(), ..ColInfo::default() });
                let v = match self.column_value(conn, &tm, &info, row.get(col).unwrap_or(&J::Null), ev, &w.origin_refs).await? {
                    Ok(v) => v,
                    Err(p) => return Ok(p),
                };
                pk_vals.push((col.clone(), v));
            }
        }
        let pk_text = pk_text(&pk_vals);

        if ev.op == Op::Delete {
            let wi = Self::receipt(staged, w);
            if !pk_vals.is_empty() && pk_vals.len() == tm.pk.len() {
                if let Some(i) = staged.index.remove(&Tk(&table, &pk_text)) {
                    if let Some(rows) = staged.upserts.get_mut(&table) {
                        rows[i] = None;
                    }
                }
                staged.deletes.push((table.clone(), pk_vals, wi));
                staged.deleted_keys.insert((table.clone(), pk_text));
                staged.count_op(&table, "d");
            }
            self.ids.pop(&table, &row_key);
            self.tombstones.insert((table.clone(), row_key.clone()));
            self.deleting.insert((table.clone(), row_key.clone()), self.generation);
            self.stage_version(staged, wi, &table, &row_key, (version, hash, own_id), None, overwritten.cloned(), ev, false);
            return Ok(Plan::Done);
        }

        // Every other column: references mapped to HQ ids, merged persons kept voided. The
        // names are borrowed from the table's column info; the list is shared below.
        let npk = pk_vals.len();
        let mut cols: Vec<&str> = Vec::with_capacity(row.len() + 2);
        let mut vals: Vec<Value> = Vec::with_capacity(row.len() + 2);
        for (c, v) in pk_vals {
            // A key column's name, borrowed from the table's key.
            cols.push(tm.pk.iter().find(|p| **p == c).map_or("", String::as_str));
            vals.push(v);
        }
        let mut has_uuid_col = false;
        for (col, raw) in row {
            let Some(info) = cm.get(col) else {
                if self.warned.insert((table.clone(), col.to_string())) {
                    tracing::warn!(table = %table, column = %col, site = %ev.site, "column does not exist at HQ; its values are not applied");
                    omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "unknown_column"]).inc();
                }
                continue;
            };
            // A row image's columns are distinct: only a key column can be there already.
            if info.pk && cols[..npk].contains(&info.name.as_str()) {
                continue;
            }
            let v = match self.column_value(conn, &tm, info, raw, ev, &w.origin_refs).await? {
                Ok(v) => v,
                Err(p) => return Ok(p),
            };
            if allocated && info.null_default && v == Value::NULL {
                // A new row's NULL in a column whose default is NULL: left out of its INSERT.
                continue;
            }
            has_uuid_col |= info.name == "uuid";
            cols.push(info.name.as_str());
            vals.push(v);
        }
        if tm.has_uuid && !has_uuid_col && !cols[..npk].contains(&"uuid") {
            // The envelope's uuid is the row's: a row image without the column still keeps it.
            cols.push("uuid");
            vals.push(Value::from(row_key.as_str()));
        }
        let owner = self.force_merge_values(conn, &table, &row_key, w, &mut cols, &mut vals).await?;
        let cols = self.col_list(&table, &cols);

        if staged.deleted_keys.contains(&Tk(&table, &pk_text)) {
            // Deleted earlier in this flush and written again: what is staged is written first.
            units.push(std::mem::take(staged));
        }
        let wi = Self::receipt(staged, w);
        if let (Some((person, preferred)), Some(id)) = (owner, own_id) {
            staged.moved.push((table.clone(), id, person, preferred, wi));
        }
        let rows = staged.upserts.entry(table.clone()).or_default();
        match staged.index.get(&Tk(&table, &pk_text)) {
            Some(&i) => rows[i] = Some(StagedRow { cols, vals, work: wi, insert: allocated }),
            None => {
                staged.index.insert((table.clone(), pk_text), rows.len());
                rows.push(Some(StagedRow { cols, vals, work: wi, insert: allocated }));
            }
        }
        staged.count_op(&table, ev.op.as_str());
        if !self.tombstones.is_empty() {
            self.tombstones.remove(&Tk(&table, &row_key));
        }
        if let Some(id) = own_id {
            self.absent.remove(&Tk(&table, &row_key));
            self.ids.put_ref(&table, &row_key, id);
        }
        let origin_key = ev.key.as_ref().map(|k| serde_json::to_string(k).unwrap_or_default());
        // A first version is packed with its batch's when HQ can find it again by the row's id:
        // the row has a uuid and the id is the one the sink just gave it.
        let packed = allocated && tm.has_uuid && stored.is_none();
        self.stage_version(staged, wi, &table, &row_key, (version, hash, own_id), origin_key, overwritten.cloned(), ev, packed);
        Ok(Plan::Done)
    }

    /// `cols` as a shared list: one of the table's recent lists when it has the same columns.
    fn col_list(&mut self, table: &str, cols: &[&str]) -> std::sync::Arc<[String]> {
        let same = |l: &std::sync::Arc<[String]>| l.len() == cols.len() && l.iter().zip(cols).all(|(a, b)| a == b);
        if let Some(lists) = self.col_lists.get_mut(table) {
            if let Some(i) = lists.iter().position(same) {
                // Most recently used first.
                lists[..=i].rotate_right(1);
                return lists[0].clone();
            }
        }
        let list: std::sync::Arc<[String]> = cols.iter().map(|c| c.to_string()).collect();
        let lists = self.col_lists.entry(table.to_string()).or_default();
        lists.insert(0, list.clone());
        lists.truncate(8);
        list
    }

    fn receipt(staged: &mut Staged, w: &Work) -> usize {
        staged.receipts.push(Receipt {
            partition: w.partition,
            offset: w.offset,
            site: w.event.site.clone(),
            commit_ms: w.event.source.ts_ms,
            first_seen_ms: w.first_seen_ms,
            payload: w.payload.clone(),
        });
        staged.receipts.len() - 1
    }

    #[allow(clippy::too_many_arguments)]
    fn stage_version(
        &mut self,
        staged: &mut Staged,
        wi: usize,
        table: &str,
        row_key: &str,
        (version, hash, hq_id): (RowVersion, u64, Option<i64>),
        origin_key: Option<String>,
        overwritten: Option<Stored>,
        ev: &ChangeEvent,
        packed: bool,
    ) {
        if let Some(s) = overwritten {
            staged.conflicts.push(self.conflict_row(table, row_key, &version, &s.version, ev, true));
        }
        let stored = Stored { version, hash, hq_id };
        self.versions.put_ref(table, row_key, Some(stored.clone()));
        staged.versions.push(StagedVersion { table: table.to_string(), key: row_key.to_string(), stored, origin: origin_key, work: wi, packed });
    }

    fn conflict_row(&self, table: &str, row_key: &str, winner: &RowVersion, loser: &RowVersion, ev: &ChangeEvent, overwritten: bool) -> Vec<Value> {
        // The losing values: the incoming row when it lost; when it won, the stored row's values
        // are read back by `execute` before they are overwritten (marked by `overwritten`).
        let loser_values = if overwritten { J::Null } else { serde_json::json!({"after": ev.after, "refs": ev.refs}) };
        vec![
            Value::from(table),
            Value::from(row_key),
            Value::from(winner.site.as_str()),
            Value::from(serde_json::to_string(winner).unwrap_or_default()),
            Value::from(loser.site.as_str()),
            Value::from(serde_json::to_string(loser).unwrap_or_default()),
            Value::from(loser_values.to_string()),
            Value::from(overwritten as i64),
        ]
    }

    /// The HQ value of one column: a reference becomes the HQ id of the row it points to.
    /// `Err(plan)` parks or dead-letters the row.
    async fn column_value(
        &mut self,
        conn: &mut Conn,
        tm: &TableModel,
        info: &ColInfo,
        raw: &J,
        ev: &ChangeEvent,
        origin_refs: &serde_json::Map<String, J>,
    ) -> Result<Result<Value, Plan>, SinkError> {
        let col = info.name.as_str();
        if let Some(fk) = &info.fk {
            if info.fk_to_int {
                if raw.is_null() {
                    return Ok(Ok(Value::NULL));
                }
                // A shared key keeps its own row: `patient.patient_id` is the patient's person,
                // even when the transform points person references at a survivor.
                let own = tm.pk.len() == 1 && tm.pk[0] == col;
                let r = if own { origin_refs.get(col).or_else(|| ev.refs.get(col)) } else { ev.refs.get(col) };
                let Some(uuid) = r.and_then(J::as_str) else {
                    omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "unresolved_ref"]).inc();
                    return Ok(Ok(Value::NULL));
                };
                return Ok(match self.lookup_id(conn, &fk.ref_table, uuid).await? {
                    Some(id) => Ok(Value::from(id)),
                    None if fk.ref_table == tm.name && ev.uuid.as_deref() == Some(uuid) => {
                        // A row pointing at itself (a user created by itself).
                        match self.ids.get(&tm.name, uuid) {
                            Some(id) => Ok(Value::from(*id)),
                            None => Err(Plan::Park(fk.ref_table.clone(), uuid.to_string())),
                        }
                    }
                    None => Err(Plan::Park(fk.ref_table.clone(), uuid.to_string())),
                });
            }
        }
        Ok(Ok(match raw {
            J::Null => Value::NULL,
            J::Bool(b) => Value::from(*b as i64),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::from(i)
                } else if let Some(u) = n.as_u64() {
                    Value::from(u)
                } else {
                    Value::from(n.as_f64().unwrap_or(0.0))
                }
            }
            J::String(s) if info.binary => match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(b) => Value::Bytes(b),
                Err(e) => return Ok(Err(Plan::Dead("bad_value", format!("{}.{col}: not base64 ({e})", tm.name)))),
            },
            J::String(s) if info.int && s.is_empty() => Value::NULL,
            J::String(s) => Value::from(s.as_str()),
            other => Value::from(other.to_string()),
        }))
    }

    /// A merged person stays voided whatever its site says later, and the rows moved to a
    /// survivor stay non-preferred (semantics 4: the same result in any order). Returns, for a
    /// row written to a person not its own, that person and the row's own `preferred`.
    async fn force_merge_values<'c>(
        &mut self,
        conn: &mut Conn,
        table: &str,
        row_key: &str,
        w: &Work,
        cols: &mut Vec<&'c str>,
        vals: &mut Vec<Value>,
    ) -> Result<Option<(String, Value)>, SinkError> {
        let set = |cols: &mut Vec<&'c str>, vals: &mut Vec<Value>, c: &'static str, v: Value| match cols.iter().position(|x| *x == c) {
            Some(i) => vals[i] = v,
            None => {
                cols.push(c);
                vals.push(v);
            }
        };
        match table {
            "person" | "patient" => {
                if let Some(survivor) = self.survivor_of(row_key) {
                    let own = cols.iter().position(|c| *c == "date_created").map(|i| vals[i].clone());
                    let when = match own {
                        Some(v) => v,
                        None => Value::from(self.merge_time(conn, row_key).await?),
                    };
                    let reason = self.void_reason(conn, &survivor).await?;
                    set(cols, vals, "voided", Value::from(1));
                    set(cols, vals, "voided_by", Value::from(self.daemon_user));
                    set(cols, vals, "date_voided", when);
                    set(cols, vals, "void_reason", Value::from(reason));
                } else if Self::merge_voided(cols, vals) && self.merges.values().any(|m| m.winner == row_key) {
                    // The site voided this person by merging it into another one, but HQ's rule
                    // (earliest registration, then uuid) made it the survivor: it stays alive.
                    set(cols, vals, "voided", Value::from(0));
                    set(cols, vals, "voided_by", Value::NULL);
                    set(cols, vals, "date_voided", Value::NULL);
                    set(cols, vals, "void_reason", Value::NULL);
                }
            }
            "patient_identifier" | "person_name" | "person_address" => {
                let col = if table == "patient_identifier" { "patient_id" } else { "person_id" };
                if let Some(J::String(own)) = w.origin_refs.get(col) {
                    let preferred = cols.iter().position(|c| *c == "preferred").map_or(Value::NULL, |i| vals[i].clone());
                    set(cols, vals, "preferred", Value::from(0));
                    return Ok(Some((own.clone(), preferred)));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// The row is voided by a merge ("Merged with patient #…").
    fn merge_voided(cols: &[&str], vals: &[Value]) -> bool {
        let get = |c: &str| cols.iter().position(|x| *x == c).map(|i| &vals[i]);
        let voided = matches!(get("voided"), Some(Value::Int(1)) | Some(Value::UInt(1)));
        let merged = matches!(get("void_reason"), Some(Value::Bytes(b)) if b.starts_with(b"Merged with patient"));
        voided && merged
    }

    /// When a merge is dated at HQ: the voided row's own registration (`date_created`, read
    /// from the row being written; this reads the person's when the image lacks it). A
    /// duplicate is a duplicate from its creation; and unlike the time HQ learned of it, this
    /// does not depend on the order in which the sites were read (semantics 4).
    async fn merge_time(&mut self, conn: &mut Conn, loser: &str) -> Result<String, SinkError> {
        let t: Option<Option<String>> = conn
            .exec_first("SELECT DATE_FORMAT(date_created, '%Y-%m-%d %H:%i:%s') FROM person WHERE uuid = ?", (loser,))
            .await
            .map_err(db("reading the merged person"))?;
        Ok(t.flatten().unwrap_or_else(|| ms_to_datetime(self.merges.get(loser).map(|m| m.ts_ms).unwrap_or(0))))
    }

    async fn void_reason(&mut self, conn: &mut Conn, survivor: &str) -> Result<String, SinkError> {
        Ok(match self.lookup_id(conn, "person", survivor).await? {
            Some(id) => format!("Merged with patient #{id}"),
            None => format!("Merged with patient {survivor}"),
        })
    }

    /// `mergePatients`, in the batch's transaction: the loser's clinical rows move to the
    /// survivor (identifiers, names and addresses too, as non-preferred: a move keeps their
    /// uuids, so a later edit at the site lands on the same row, whatever the order), the loser
    /// patient and person are voided "Merged with patient #<id>", and a `person_merge_log` row
    /// is written (a site's own merge brings its own). Earlier losers of the loser follow it to
    /// the new survivor. If either person is not at HQ yet, the merge is remembered and applied
    /// when both are; rows that arrive later are already canonical.
    async fn merge(&mut self, conn: &mut Conn, loser: &str, mut rec: MergeRec) -> Result<(), SinkError> {
        if loser == rec.winner {
            return Ok(());
        }
        // The survivor of a component is never a loser. A survivor change names an earlier loser
        // of this component as the new survivor: its own merge is withdrawn (its merge log goes,
        // it is un-voided below), instead of being chained to itself, which voided everyone.
        if self.merges.remove(&rec.winner).is_some() {
            conn.exec_drop("DELETE FROM omrs_sync_merge WHERE loser_uuid = ?", (rec.winner.as_str(),)).await.map_err(db("withdrawing the survivor's merge"))?;
            let u = uuid::Uuid::new_v5(&MERGE_LOG_NS, rec.winner.as_bytes()).to_string();
            conn.exec_drop("DELETE FROM person_merge_log WHERE uuid = ?", (u.as_str(),)).await.map_err(db("withdrawing the survivor's merge log"))?;
        }
        // Earlier losers of the loser now belong to the new survivor.
        let chained: Vec<String> = self.merges.iter().filter(|(_, m)| m.winner == loser).map(|(l, _)| l.clone()).collect();
        for l in &chained {
            if let Some(m) = self.merges.get_mut(l) {
                m.winner = rec.winner.clone();
            }
        }
        let w = self.lookup_id(conn, "person", &rec.winner).await?;
        let l = self.lookup_id(conn, "person", loser).await?;
        let mut log_uuid: Option<String> = None;
        if let (Some(w), Some(l)) = (w, l) {
            for (table, col, preferred) in MOVES {
                let Some(tm) = self.model.table(table) else { continue };
                if !tm.columns.iter().any(|c| c.name == *col) {
                    continue;
                }
                if *preferred && tm.columns.iter().any(|c| c.name == "preferred") && tm.pk.len() == 1 {
                    // Non-preferred once moved, unless it goes back to the person it came from
                    // (a survivor change hands the component to an earlier loser): its owner
                    // and own flag are remembered the first time it leaves its person.
                    let pk = q(&tm.pk[0]);
                    conn.exec_drop(
                        format!("INSERT IGNORE INTO omrs_sync_moved (tbl, hq_id, person_uuid, preferred) SELECT ?, {pk}, ?, preferred FROM {} WHERE {} = ?", q(table), q(col)),
                        (*table, loser, l),
                    )
                    .await
                    .map_err(|e| SinkError::db(format!("remembering where the moved {table} rows belong"), e))?;
                    conn.exec_drop(
                        format!(
                            "UPDATE {t} r LEFT JOIN omrs_sync_moved m ON m.tbl = ? AND m.hq_id = r.{pk} SET r.{c} = ?, r.preferred = IF(m.person_uuid <=> ?, m.preferred, 0) WHERE r.{c} = ?",
                            t = q(table),
                            c = q(col)
                        ),
                        (*table, w, rec.winner.as_str(), l),
                    )
                    .await
                    .map_err(|e| SinkError::db(format!("moving {table} to the survivor"), e))?;
                    continue;
                }
                conn.exec_drop(format!("UPDATE {} SET {} = ? WHERE {} = ?", q(table), q(col), q(col)), (w, l))
                    .await
                    .map_err(|e| SinkError::db(format!("moving {table} to the survivor"), e))?;
            }
            let reason = format!("Merged with patient #{w}");
            // A survivor that its site had merged away (the site chose the other record) is
            // alive at HQ.
            for (table, col) in [("person", "person_id"), ("patient", "patient_id")] {
                conn.exec_drop(
                    format!("UPDATE {table} SET voided = 0, voided_by = NULL, date_voided = NULL, void_reason = NULL WHERE {col} = ? AND voided = 1 AND void_reason LIKE 'Merged with patient%'"),
                    (w,),
                )
                .await
                .map_err(|e| SinkError::db(format!("keeping the surviving {table}"), e))?;
            }
            for (table, col) in [("person", "person_id"), ("patient", "patient_id")] {
                conn.exec_drop(
                    // Dated at the row's own registration: the same whenever HQ learns of it.
                    format!("UPDATE {table} SET voided = 1, voided_by = ?, date_voided = date_created, void_reason = ? WHERE {col} = ?"),
                    (self.daemon_user, reason.as_str(), l),
                )
                .await
                .map_err(|e| SinkError::db(format!("voiding the merged {table}"), e))?;
            }
            // HQ logs a merge of its own unless a site's log names the same loser (whatever the
            // reason of this record: which records reach HQ as `site_merge` and which as
            // `identifier` depends on the order the evidence arrived in; the site's log that
            // lands later removes HQ's, see `drop_covered_merge_logs`).
            let u = uuid::Uuid::new_v5(&MERGE_LOG_NS, loser.as_bytes()).to_string();
            let site_logged: Option<i64> = conn
                .exec_first("SELECT COUNT(*) FROM person_merge_log WHERE loser_person_id = ? AND uuid <> ?", (l, u.as_str()))
                .await
                .map_err(db("reading the sites' merge logs"))?;
            if site_logged.unwrap_or(0) == 0 {
                let when = self.merge_time(conn, loser).await?;
                let id = self.allocate(conn, "person_merge_log", "person_merge_log_id").await?;
                // Only what does not depend on the order the evidence arrived in: the reason and
                // evidence of this merge are in omrs_sync_merge.
                let data = serde_json::json!({"loser": loser, "merged_by": "omrs-stream", "details": "omrs_sync_merge"});
                conn.exec_drop(
                    "INSERT INTO person_merge_log (person_merge_log_id, winner_person_id, loser_person_id, creator, date_created, merged_data, uuid, voided)
                     VALUES (?, ?, ?, ?, ?, ?, ?, 0)
                     ON DUPLICATE KEY UPDATE winner_person_id = VALUES(winner_person_id)",
                    (id, w, l, self.daemon_user, when.as_str(), data.to_string(), u.as_str()),
                )
                .await
                .map_err(db("writing person_merge_log"))?;
                log_uuid = Some(u);
            }
            // Earlier losers: their merge log and void reason name the new survivor.
            for cl in &chained {
                if let Some(cid) = self.lookup_id(conn, "person", cl).await? {
                    for (table, col) in [("person", "person_id"), ("patient", "patient_id")] {
                        conn.exec_drop(format!("UPDATE {table} SET void_reason = ? WHERE {col} = ? AND voided = 1"), (reason.as_str(), cid))
                            .await
                            .map_err(db("renaming a chained merge"))?;
                    }
                    let cu = uuid::Uuid::new_v5(&MERGE_LOG_NS, cl.as_bytes()).to_string();
                    conn.exec_drop("UPDATE person_merge_log SET winner_person_id = ? WHERE uuid = ?", (w, cu.as_str()))
                        .await
                        .map_err(db("renaming a chained merge"))?;
                }
            }
            rec.applied = true;
        }
        conn.exec_drop(
            "INSERT INTO omrs_sync_merge (loser_uuid, winner_uuid, reason, evidence, site, ts_ms, applied, merge_log_uuid, applied_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, IF(? = 1, NOW(3), NULL))
             ON DUPLICATE KEY UPDATE winner_uuid = VALUES(winner_uuid), applied = VALUES(applied),
               merge_log_uuid = COALESCE(VALUES(merge_log_uuid), merge_log_uuid), applied_at = COALESCE(applied_at, VALUES(applied_at))",
            (
                loser,
                rec.winner.as_str(),
                rec.reason.as_str(),
                rec.evidence.as_str(),
                rec.site.as_str(),
                rec.ts_ms,
                rec.applied as i64,
                log_uuid.as_deref(),
                rec.applied as i64,
            ),
        )
        .await
        .map_err(db("recording the merge"))?;
        if !chained.is_empty() {
            let marks = vec!["?"; chained.len()].join(",");
            let mut params: Vec<Value> = vec![Value::from(rec.winner.as_str())];
            params.extend(chained.iter().map(|c| Value::from(c.as_str())));
            conn.exec_drop(format!("UPDATE omrs_sync_merge SET winner_uuid = ? WHERE loser_uuid IN ({marks})"), params)
                .await
                .map_err(db("following a survivor change"))?;
        }
        self.merges.insert(loser.to_string(), rec);
        Ok(())
    }
}

#[cfg(test)]
mod cache_tests {
    use super::{Cache, Tk};

    #[test]
    fn borrowed_keys_find_owned_ones() {
        let mut set: hashbrown::HashSet<(String, String)> = hashbrown::HashSet::new();
        set.insert(("obs".into(), "a-uuid".into()));
        assert!(set.contains(&Tk("obs", "a-uuid")));
        assert!(!set.contains(&Tk("obs", "b-uuid")));
        // The parts are not run together: ("ab", "c") is not ("a", "bc").
        set.insert(("ab".into(), "c".into()));
        assert!(!set.contains(&Tk("a", "bc")));
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_half_to_all_of_its_capacity() {
        let mut c: Cache<i64> = Cache::new(4);
        c.put(("t".into(), "1".into()), 1);
        c.put(("t".into(), "2".into()), 2);
        // The current generation is full (2): it becomes the older one.
        c.put(("t".into(), "3".into()), 3);
        assert_eq!(c.peek("t", "1"), Some(&1));
        // Read from the older generation: it moves to the current one and survives the next turn.
        assert_eq!(c.get("t", "1"), Some(&1));
        c.put(("t".into(), "4".into()), 4);
        c.put(("t".into(), "5".into()), 5);
        assert_eq!(c.peek("t", "1"), Some(&1));
        assert_eq!(c.peek("t", "2"), None, "the least recently used entry is gone");
        assert!(c.contains("t", "5"));
        c.put_ref("t", "5", 50);
        assert_eq!(c.get("t", "5"), Some(&50));
        assert_eq!(c.pop("t", "5"), Some(50));
        assert_eq!(c.get("t", "5"), None);
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::{padded_len, pk_text, stable_chunks, CHUNK_STEP};

    #[test]
    fn key_texts_are_what_the_debug_format_gives() {
        use mysql_async::Value;
        let keys: Vec<Vec<(String, Value)>> = vec![
            vec![("obs_id".into(), Value::from(123))],
            vec![("obs_id".into(), Value::from(-7))],
            vec![("user_id".into(), Value::from(3)), ("role".into(), Value::from("System Developer"))],
            vec![("x".into(), Value::NULL), ("y".into(), Value::from(1.5))],
        ];
        for k in keys {
            let slow = k.iter().map(|(c, v)| format!("{c}={v:?}")).collect::<Vec<_>>().join("|");
            assert_eq!(pk_text(&k), slow);
        }
        // An integer key and a string key with the same digits stay apart.
        assert_ne!(pk_text(&[("id".into(), Value::from(1))]), pk_text(&[("id".into(), Value::from("1"))]));
    }

    #[test]
    fn stable_chunks_cover_everything_in_order_with_few_sizes() {
        for n in [0usize, 1, 2, 3, 7, 999, 1000, 1001, 4321, 5000] {
            let items: Vec<usize> = (0..n).collect();
            let chunks = stable_chunks(&items, 1000);
            let flat: Vec<usize> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(flat, items, "n = {n}");
            for c in &chunks {
                assert!(c.len() == 1000 || c.len() % CHUNK_STEP == 0 || c.len() < CHUNK_STEP, "n = {n}: chunk of {}", c.len());
            }
            assert!(chunks.iter().filter(|c| c.len() != 1000).count() <= 2, "n = {n}");
        }
        assert_eq!(stable_chunks(&[0u8; 4321], 1000).iter().map(|c| c.len()).collect::<Vec<_>>(), vec![1000, 1000, 1000, 1000, 320, 1]);
        assert_eq!(stable_chunks(&[0u8; 167], 1000).iter().map(|c| c.len()).collect::<Vec<_>>(), vec![160, 7]);
        assert_eq!(padded_len(5, 1000), 8);
        assert_eq!(padded_len(600, 1000), 1000);
        assert_eq!(padded_len(1000, 1000), 1000);
    }
}

#[cfg(test)]
mod decode_tests {
    use super::{HqEvent, Record};

    #[test]
    fn the_change_fast_path_parses_what_the_enum_parses() {
        let records: &[&str] = &[
            r#"{"type":"change","late":false,"event":{"op":"c","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"u-1","after":{"obs_id":7,"value_text":"a \"quoted\" é"},"refs":{"person_id":"p-1"},"source":{"server_id":11,"file":"binlog.000001","pos":4,"row":0,"ts_ms":5,"snapshot":false},"ts_ms":5}}"#,
            r#"{"type":"change","late":true,"person":"p-2","origin_refs":{"person_id":"p-9"},"event":{"op":"u","site":"site-b","table":"person_name","key":{"person_name_id":3},"uuid":"u-2","before":{"person_name_id":3},"after":{"person_name_id":3},"refs":{},"source":{"server_id":12,"file":"binlog.000002","pos":9,"row":1,"ts_ms":6,"snapshot":false},"ts_ms":6}}"#,
            r#"{"type":"watermark","ts_ms":12}"#,
        ];
        for r in records {
            let fast = Record::decode(0, 0, r.as_bytes().to_vec()).decoded.expect("decodes");
            let slow: HqEvent = serde_json::from_str(r).expect("enum decodes");
            assert_eq!(fast, slow, "{r}");
            // Flat row images mean what JSON maps mean: the same JSON back.
            let maps: omrs_core::hq::HqEvent = serde_json::from_str(r).expect("decodes with maps");
            assert_eq!(serde_json::to_value(&fast).expect("serializes"), serde_json::to_value(&maps).expect("serializes"), "{r}");
        }
        // A change missing a required field is still refused, with the field named.
        let bad = Record::decode(0, 0, br#"{"type":"change","event":{}}"#.to_vec()).decoded.expect_err("refused");
        assert!(bad.contains("not an omrs.hq.changes record"), "{bad}");
        assert!(Record::decode(0, 0, b"{\"type\":\"change\",".to_vec()).decoded.is_err());
    }
}
