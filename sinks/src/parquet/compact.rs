//! Compaction: the current state of every table and the flattened clinical views, rebuilt
//! incrementally and published atomically.
//!
//! Delivery guarantee: a snapshot is a pure function of the manifest entries it covers. It is
//! built in a new `_snapshots/<id>/` from the previous snapshot's raw state plus the change
//! files committed since (tables without new files are hard-linked, not rewritten), then
//! published by renaming a new symlink over `<lake>/current` and `<lake>/views`. A crash
//! leaves an unreferenced directory, removed by the next compaction; readers never see a mix.
//!
//! `_raw/<table>.parquet` holds the winning version of each row key (deletes included, as
//! tombstones, so that an older change arriving later cannot resurrect a row), decided by the
//! one comparison of `omrs_core::hq`. `current/<table>/` is that state without deletes, with
//! the merges applied the way the HQ sink applies them: the loser's clinical rows point at the
//! survivor (identifiers, names and addresses as non-preferred), the loser person and patient
//! are voided "Merged with patient <survivor uuid>", and a survivor that its site had merged
//! away is alive.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Int32Array, Int64Array, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder,
};
use arrow::compute::{concat_batches, filter_record_batch, interleave_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use omrs_core::hq::{compare, RowVersion};
use omrs_core::metrics::metrics;
// Merges are done in the daemon user's name, moving what `mergePatients` moves (as at HQ).
use omrs_core::merge_log::SiteMoves;
use omrs_core::openmrs::{DAEMON_USER_UUID, MOVES};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use super::lake::{failpoint, io, sync_dir, write_atomic, Lake, LakeLock, State};
use super::schema::LakeTable;
use super::{write, MERGE_TABLE};
use crate::SinkError;

/// `_snapshots/<id>/snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: u64,
    /// The last manifest entry it covers.
    pub manifest_seq: u64,
    pub created_at_ms: i64,
    /// Live rows per table in current/.
    pub tables: BTreeMap<String, u64>,
    pub views: BTreeMap<String, u64>,
    pub merges: u64,
}

pub struct Report {
    pub id: u64,
    pub rebuilt: usize,
    pub seconds: f64,
}

/// The published snapshot: what `<lake>/current` points at.
pub fn published(lake: &Lake) -> Option<SnapshotInfo> {
    let target = std::fs::read_link(lake.root.join("current")).ok()?;
    let dir = lake.root.join(target).parent()?.to_path_buf();
    let b = std::fs::read(dir.join("snapshot.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Files were committed since the published snapshot, or a compaction died between its two
/// pointer swaps (`views` still names the previous snapshot).
pub fn needs(lake: &Lake, state: &State) -> bool {
    let seq = published(lake).map(|s| s.manifest_seq).unwrap_or(0);
    let snap = |name: &str| std::fs::read_link(lake.root.join(name)).ok().and_then(|t| t.parent().map(Path::to_path_buf));
    (state.seq > seq && state.files.iter().any(|f| f.seq > seq)) || snap("current") != snap("views")
}

fn pq_err(context: String) -> impl FnOnce(parquet::errors::ParquetError) -> SinkError {
    move |e| SinkError::Lake(format!("{context}: {e}"))
}

fn arrow_err(context: String) -> impl FnOnce(arrow::error::ArrowError) -> SinkError {
    move |e| SinkError::Lake(format!("{context}: {e}"))
}

/// Every batch of a Parquet file.
pub fn read_file(path: &Path) -> Result<Vec<RecordBatch>, SinkError> {
    let f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(pq_err(format!("reading {}", path.display())))?
        .with_batch_size(65_536)
        .build()
        .map_err(pq_err(format!("reading {}", path.display())))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(arrow_err(format!("reading {}", path.display())))
}

/// A file's batches in the table's schema: a column the file predates (added by a schema
/// change at a site, issue #25) reads as its default, or null; columns are matched by name.
pub fn read_conformed(path: &Path, table: &LakeTable) -> Result<Vec<RecordBatch>, SinkError> {
    let batches = read_file(path)?;
    batches.iter().map(|b| conform(b, table).map_err(arrow_err(format!("reading {}", path.display())))).collect()
}

fn conform(b: &RecordBatch, table: &LakeTable) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = &table.schema;
    if b.schema().fields() == schema.fields() {
        return Ok(b.clone());
    }
    let n = b.num_rows();
    let cols = schema
        .fields()
        .iter()
        .map(|f| match b.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, f.data_type()),
            None => {
                let default = table.def.columns.iter().find(|c| c.name == *f.name()).and_then(|c| c.default.as_ref());
                let constant: Option<ArrayRef> = match default {
                    Some(serde_json::Value::String(s)) => Some(Arc::new(StringArray::from(vec![s.as_str(); n]))),
                    Some(serde_json::Value::Number(x)) => match x.as_i64() {
                        Some(i) => Some(Arc::new(Int64Array::from(vec![i; n]))),
                        None => x.as_f64().map(|v| Arc::new(arrow::array::Float64Array::from(vec![v; n])) as ArrayRef),
                    },
                    _ => None,
                };
                match constant {
                    Some(c) => arrow::compute::cast(&c, f.data_type()),
                    None => Ok(arrow::array::new_null_array(f.data_type(), n)),
                }
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), cols)
}

fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray, SinkError> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| SinkError::Lake(format!("column {name} missing or not a string")))
}

fn version(b: &RecordBatch, i: usize) -> Result<RowVersion, SinkError> {
    let change = b.column_by_name("_change_ms").and_then(|c| c.as_any().downcast_ref::<Int64Array>().map(|a| a.value(i)));
    let prio = b.column_by_name("_priority").and_then(|c| c.as_any().downcast_ref::<Int32Array>().map(|a| a.value(i)));
    let commit = b.column_by_name("_event_time").and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>().map(|a| a.value(i) / 1000));
    match (change, prio, commit) {
        (Some(change_ms), Some(priority), Some(commit_ms)) => Ok(RowVersion {
            change_ms,
            priority,
            site: str_col(b, "_site")?.value(i).to_string(),
            commit_ms,
            position: str_col(b, "_position")?.value(i).to_string(),
        }),
        _ => Err(SinkError::Lake("a change file lacks its version columns".into())),
    }
}

/// The winning version of each row key among `batches` (in commit order: a tie goes to the
/// later one), in the order of `batches`. The winners are gathered from the batches as they
/// are: concatenating them first held every input row twice.
pub fn winners(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, SinkError> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut best: HashMap<&str, (usize, usize)> = HashMap::with_capacity(rows);
    for (b, batch) in batches.iter().enumerate() {
        let keys = str_col(batch, "_row_key")?;
        for i in 0..batch.num_rows() {
            match best.entry(keys.value(i)) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert((b, i));
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let (ob, oi) = *e.get();
                    if compare(&version(batch, i)?, &version(&batches[ob], oi)?) != std::cmp::Ordering::Less {
                        e.insert((b, i));
                    }
                }
            }
        }
    }
    if best.is_empty() {
        return Ok(RecordBatch::new_empty(schema.clone()));
    }
    let mut idx: Vec<(usize, usize)> = best.into_values().collect();
    idx.sort_unstable();
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    interleave_record_batch(&refs, &idx).map_err(arrow_err("selecting winners".into()))
}

/// Merges in commit order, folded the way the HQ sink folds them: loser → final survivor.
#[derive(Default)]
pub struct Merges {
    winner: HashMap<String, String>,
    /// The rows the clinics' own merges moved, by their merge logs (the `person_merge_log`
    /// rows, in stream order): each belongs to its loser, as at HQ
    /// (`hq_mysql::apply::site_moves`).
    site: SiteMoves,
    /// Records a split made survivors again, until merged again: alive even where their clinic
    /// voided them by merging them (HQ's `omrs_sync_released`).
    released: HashSet<String>,
}

impl Merges {
    pub fn load(lake: &Lake, state: &State) -> Result<Merges, SinkError> {
        let mut rows: Vec<(i32, i64, String, String)> = Vec::new();
        for f in state.files.iter().filter(|f| f.table == MERGE_TABLE) {
            for b in read_file(&lake.root.join(&f.path))? {
                let (w, l) = (str_col(&b, "winner")?, str_col(&b, "loser")?);
                let kp = b.column_by_name("_kafka_partition").and_then(|c| c.as_any().downcast_ref::<Int32Array>().cloned());
                let ko = b.column_by_name("_kafka_offset").and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
                let (Some(kp), Some(ko)) = (kp, ko) else { return Err(SinkError::Lake(format!("{}: not a merge file", f.path))) };
                for i in 0..b.num_rows() {
                    rows.push((kp.value(i), ko.value(i), w.value(i).to_string(), l.value(i).to_string()));
                }
            }
        }
        let mut m = Merges::from_rows(rows);
        m.site = site_moves(lake, state)?;
        Ok(m)
    }

    /// The person a row of `table` belongs to: its clinic's merge log's loser for a row the
    /// clinic's merge moved, else `stored`.
    fn own<'a>(&'a self, table: &str, row_uuid: Option<&str>, encounter_uuid: Option<&str>, stored: Option<&'a str>) -> Option<&'a str> {
        self.site.owner(table, row_uuid, encounter_uuid).or(stored)
    }

    /// The merges of (partition, offset, winner, loser) rows, in stream order. A row whose
    /// winner is its loser is a split's: that record is nobody's loser any more.
    fn from_rows(mut rows: Vec<(i32, i64, String, String)>) -> Merges {
        rows.sort();
        let mut m = Merges::default();
        for (_, _, winner, loser) in rows {
            if winner == loser {
                // A split released this record: it survives on its own again.
                m.winner.remove(&winner);
                m.released.insert(winner);
                continue;
            }
            m.released.remove(&loser);
            // A survivor change: the new survivor is no longer anyone's loser.
            m.winner.remove(&winner);
            for w in m.winner.values_mut() {
                if *w == loser {
                    *w = winner.clone();
                }
            }
            m.winner.insert(loser, winner);
        }
        m
    }

    pub fn survivor_of(&self, uuid: &str) -> Option<&str> {
        let mut cur = self.winner.get(uuid)?;
        for _ in 0..64 {
            match self.winner.get(cur) {
                Some(n) if n != cur => cur = n,
                _ => break,
            }
        }
        (cur != uuid).then_some(cur.as_str())
    }

    pub fn is_winner(&self, uuid: &str) -> bool {
        self.winner.values().any(|w| w == uuid)
    }

    pub fn len(&self) -> usize {
        self.winner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.winner.is_empty() && self.site.is_empty()
    }

    /// `(loser, survivor)` of every merge.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self.winner.keys().filter_map(|l| Some((l.clone(), self.survivor_of(l)?.to_string()))).collect();
        v.sort();
        v
    }
}

/// The rows the clinics' merge logs name, from the lake's `person_merge_log` files in stream
/// order (the order HQ wrote them in).
fn site_moves(lake: &Lake, state: &State) -> Result<SiteMoves, SinkError> {
    let mut logs: Vec<(i32, i64, String, String)> = Vec::new();
    for f in state.files.iter().filter(|f| f.table == "person_merge_log") {
        for b in read_file(&lake.root.join(&f.path))? {
            let (Ok(loser), Ok(data)) = (str_col(&b, "loser_person_id_uuid"), str_col(&b, "merged_data")) else { continue };
            let kp = b.column_by_name("_kafka_partition").and_then(|c| c.as_any().downcast_ref::<Int32Array>().cloned());
            let ko = b.column_by_name("_kafka_offset").and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
            let (Some(kp), Some(ko)) = (kp, ko) else { continue };
            for i in 0..b.num_rows() {
                if loser.is_null(i) || data.is_null(i) || !data.value(i).starts_with('<') {
                    continue;
                }
                logs.push((kp.value(i), ko.value(i), loser.value(i).to_string(), data.value(i).to_string()));
            }
        }
    }
    logs.sort();
    let mut moves = SiteMoves::default();
    for (_, _, loser, data) in logs {
        moves.add(&loser, &data);
    }
    Ok(moves)
}

fn replace(batch: &RecordBatch, name: &str, arr: ArrayRef) -> Result<RecordBatch, SinkError> {
    let Some(i) = batch.schema().index_of(name).ok() else { return Ok(batch.clone()) };
    let mut cols = batch.columns().to_vec();
    cols[i] = arr;
    RecordBatch::try_new(batch.schema(), cols).map_err(arrow_err(format!("replacing {name}")))
}

/// The published rows of a table: its raw state without deletes, with the merges applied.
fn publish(table: &str, raw: &RecordBatch, merges: &Merges) -> Result<RecordBatch, SinkError> {
    let ops = str_col(raw, "_op")?;
    let keep: BooleanArray = ops.iter().map(|o| Some(o != Some("d"))).collect();
    // Without deletes (most tables, most of the time) the raw rows are shared, not copied.
    let mut b = if keep.true_count() == raw.num_rows() { raw.clone() } else { filter_record_batch(raw, &keep).map_err(arrow_err("dropping deletes".into()))? };
    if merges.is_empty() {
        return Ok(b);
    }
    let n = b.num_rows();
    // Clinical rows of a loser point at the survivor; a row a clinic's merge moved is its
    // loser's.
    let mut moved = vec![false; n];
    let site_col = SiteMoves::column(table).filter(|_| !merges.site.is_empty());
    let row_keys = site_col.and_then(|_| str_col(&b, "_uuid").ok().cloned());
    let encounters = (site_col.is_some() && table == "obs").then(|| str_col(&b, "encounter_id_uuid").ok().cloned()).flatten();
    for (_, col, _) in MOVES.iter().filter(|(t, _, _)| *t == table) {
        let name = format!("{col}_uuid");
        let Ok(c) = str_col(&b, &name) else { continue };
        let by_log = site_col == Some(*col);
        let mut out = StringBuilder::with_capacity(n, n * 36);
        for (i, v) in c.iter().enumerate() {
            let v = match (&row_keys, by_log) {
                (Some(k), true) => {
                    let enc = encounters.as_ref().and_then(|e| (!e.is_null(i)).then(|| e.value(i)));
                    merges.own(table, (!k.is_null(i)).then(|| k.value(i)), enc, v)
                }
                _ => v,
            };
            match v.and_then(|u| merges.survivor_of(u)) {
                Some(s) => {
                    moved[i] = true;
                    out.append_value(s);
                }
                None => out.append_option(v),
            }
        }
        b = replace(&b, &name, Arc::new(out.finish()))?;
    }
    if MOVES.iter().any(|(t, _, pref)| *t == table && *pref) {
        // The row's person is its own (`schema::keeps_own_person`): moved means merged away.
        if let Some(pref) = b.column_by_name("preferred").map(|c| c.as_boolean().clone()) {
            let out: BooleanArray = (0..n).map(|i| if moved[i] { Some(false) } else if pref.is_null(i) { None } else { Some(pref.value(i)) }).collect();
            b = replace(&b, "preferred", Arc::new(out))?;
        }
    }
    if table == "person" || table == "patient" {
        let keys = str_col(&b, "_row_key")?.clone();
        let (Some(voided), Some(reason), Some(date)) = (
            b.column_by_name("voided").map(|c| c.as_boolean().clone()),
            b.column_by_name("void_reason").and_then(|c| c.as_string_opt::<i32>().cloned()),
            b.column_by_name("date_voided").and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>().cloned()),
        ) else {
            return Ok(b);
        };
        let by = str_col(&b, "voided_by_uuid").ok().cloned();
        // A merged row is dated at its own registration.
        let created = b.column_by_name("date_created").and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>().cloned());
        let by_id = b.column_by_name("voided_by").cloned();
        let (mut v_out, mut r_out, mut d_out, mut by_out) =
            (BooleanBuilder::with_capacity(n), StringBuilder::new(), TimestampMicrosecondBuilder::with_capacity(n), StringBuilder::new());
        let mut by_id_null = vec![false; n];
        #[allow(clippy::needless_range_loop)] // i indexes six arrays at once
        for i in 0..n {
            let k = keys.value(i);
            let cur_by = by.as_ref().and_then(|a| (!a.is_null(i)).then(|| a.value(i).to_string()));
            if let Some(s) = merges.survivor_of(k) {
                v_out.append_value(true);
                r_out.append_value(format!("Merged with patient {s}"));
                let when = created.as_ref().filter(|c| !c.is_null(i)).map(|c| c.value(i)).map(|us| us - us.rem_euclid(1_000_000));
                d_out.append_option(when);
                by_out.append_value(DAEMON_USER_UUID);
                by_id_null[i] = true;
            } else if !voided.is_null(i) && voided.value(i) && !reason.is_null(i) && reason.value(i).starts_with("Merged with patient") && (merges.is_winner(k) || merges.released.contains(k)) {
                v_out.append_value(false);
                r_out.append_null();
                d_out.append_null();
                by_out.append_null();
                by_id_null[i] = true;
            } else {
                v_out.append_option((!voided.is_null(i)).then(|| voided.value(i)));
                r_out.append_option((!reason.is_null(i)).then(|| reason.value(i)));
                d_out.append_option((!date.is_null(i)).then(|| date.value(i)));
                by_out.append_option(cur_by);
            }
        }
        b = replace(&b, "voided", Arc::new(v_out.finish()))?;
        b = replace(&b, "void_reason", Arc::new(r_out.finish()))?;
        b = replace(&b, "date_voided", Arc::new(d_out.finish().with_timezone_opt(date.timezone().map(Arc::from))))?;
        if by.is_some() {
            b = replace(&b, "voided_by_uuid", Arc::new(by_out.finish()))?;
        }
        if let Some(c) = by_id {
            let nulls: BooleanArray = by_id_null.iter().map(|x| Some(!*x)).collect();
            let kept = arrow::compute::nullif(&c, &arrow::compute::not(&nulls).map_err(arrow_err("voided_by".into()))?)
                .map_err(arrow_err("voided_by".into()))?;
            b = replace(&b, "voided_by", kept)?;
        }
    }
    Ok(b)
}

fn snapshot_dir(lake: &Lake, id: u64) -> PathBuf {
    lake.snapshots().join(format!("{id:010}"))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), SinkError> {
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))?;
    }
    std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(|_| ())).map_err(io(format!("linking {}", to.display())))
}

/// Renames a new symlink `<root>/<name>` → `target` over the old one (atomic).
fn swap_link(root: &Path, name: &str, target: &Path) -> Result<(), SinkError> {
    let tmp = root.join(format!(".{name}.swap"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(format!("creating {}", tmp.display())))?;
    std::fs::rename(&tmp, root.join(name)).map_err(io(format!("publishing {name}")))?;
    sync_dir(root)
}

/// A compaction running on a thread of its own: its report arrives here.
pub type Running = tokio::sync::oneshot::Receiver<Result<Report, SinkError>>;

/// Starts [`compact`] on a thread of its own at the lowest CPU priority (nice 19), for the
/// running sink's scheduled compactions: on a shared host HQ's database and the other stages
/// come first (a 10-site replay's compactions, about 110 s at 140 % CPU each while the lake
/// caught up, held HQ to a fraction of its rate). It works on copies of `state` and `tables`:
/// a snapshot is a function of the manifest entries it covers, so the sink's loop goes on
/// committing file sets meanwhile, and the lake's commits do not wait for it. `_writer` is the
/// lake's writer lock, held by the caller.
pub fn start_in_background(lake: &Lake, _writer: &LakeLock, state: &State, tables: &HashMap<String, Arc<LakeTable>>, trigger: &'static str) -> Result<Running, SinkError> {
    let (lake_c, state_c, tables_c) = (lake.clone(), state.clone(), tables.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("compaction".into())
        .spawn(move || {
            omrs_core::runtime::lowest_thread_priority();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("compaction-worker")
                .on_thread_start(omrs_core::runtime::lowest_thread_priority)
                .enable_all()
                .build();
            let result = match rt {
                Ok(rt) => rt.block_on(compact_held(&lake_c, &state_c, &tables_c, trigger)),
                Err(e) => Err(SinkError::Lake(format!("starting the compaction's threads: {e}"))),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| SinkError::Lake(format!("starting the compaction thread: {e}")))?;
    Ok(rx)
}

/// The report of a compaction started by [`start_in_background`], once it is done (None while
/// it runs).
pub fn finished(running: &mut Running) -> Option<Result<Report, SinkError>> {
    match running.try_recv() {
        Ok(r) => Some(r),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Err(SinkError::Lake("the compaction thread ended without a result".into()))),
    }
}

/// Waits for a compaction started by [`start_in_background`].
pub async fn wait(running: Running) -> Result<Report, SinkError> {
    running.await.map_err(|_| SinkError::Lake("the compaction thread ended without a result".into()))?
}

/// Builds and publishes a new snapshot from `state`. `_writer` is the lake's writer lock (the
/// running sink's, or `--compact`'s): one compaction at a time, and none next to another writer.
pub async fn compact(lake: &Lake, _writer: &LakeLock, state: &State, tables: &HashMap<String, Arc<LakeTable>>, trigger: &str) -> Result<Report, SinkError> {
    compact_held(lake, state, tables, trigger).await
}

/// [`compact`], the lake's lock held by the caller.
async fn compact_held(lake: &Lake, state: &State, tables: &HashMap<String, Arc<LakeTable>>, trigger: &str) -> Result<Report, SinkError> {
    let started = Instant::now();

    let prev = published(lake);
    let prev_seq = prev.as_ref().map(|p| p.manifest_seq).unwrap_or(0);
    let prev_dir = prev.as_ref().map(|p| snapshot_dir(lake, p.id));
    // Directories of interrupted compactions, and snapshots older than the previous one.
    let keep: HashSet<u64> = prev.iter().map(|p| p.id).collect();
    if let Ok(rd) = std::fs::read_dir(lake.snapshots()) {
        for e in rd.flatten() {
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                let stale = match &prev {
                    Some(p) => id > p.id || id + 1 < p.id,
                    None => true,
                };
                if stale && !keep.contains(&id) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let id = prev.as_ref().map(|p| p.id + 1).unwrap_or(1);
    let dir = snapshot_dir(lake, id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("_raw")).map_err(io(format!("creating {}", dir.display())))?;

    let mut new_files: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in state.files.iter().filter(|f| f.seq > prev_seq) {
        new_files.entry(f.table.as_str()).or_default().push(f.path.as_str());
    }
    // A clinic's merge log gives rows back to its loser: it changes the published rows too.
    let merges_changed = new_files.contains_key(MERGE_TABLE) || new_files.contains_key("person_merge_log");
    let merges = Merges::load(lake, state)?;
    let merge_tables: HashSet<&str> = MOVES.iter().map(|(t, _, _)| *t).chain(["person", "patient"]).collect();
    let row_group = 128 * 1024;

    // Tables in name order (each is published from its own rows and the merges).
    let mut names: Vec<&String> = tables.keys().collect();
    names.sort_by_key(|n| (n.as_str() != "person", n.as_str()));
    let mut info = SnapshotInfo { id, manifest_seq: state.seq, created_at_ms: chrono::Utc::now().timestamp_millis(), tables: BTreeMap::new(), views: BTreeMap::new(), merges: merges.len() as u64 };
    let mut rebuilt = 0;
    for name in names {
        let t = &tables[name];
        let raw_path = dir.join("_raw").join(format!("{name}.parquet"));
        let cur_path = dir.join("current").join(name).join("part-0.parquet");
        let prev_raw = prev_dir.as_ref().map(|d| d.join("_raw").join(format!("{name}.parquet"))).filter(|p| p.exists());
        let prev_cur = prev_dir.as_ref().map(|d| d.join("current").join(name).join("part-0.parquet")).filter(|p| p.exists());
        let fresh = new_files.get(name.as_str());
        if fresh.is_none() && prev_raw.is_none() {
            continue;
        }
        let republish = merges_changed && merge_tables.contains(name.as_str());
        if fresh.is_none() && !republish {
            if let (Some(r), Some(c)) = (&prev_raw, &prev_cur) {
                link_or_copy(r, &raw_path)?;
                link_or_copy(c, &cur_path)?;
                info.tables.insert(name.clone(), prev.as_ref().and_then(|p| p.tables.get(name)).copied().unwrap_or(0));
                continue;
            }
        }
        let raw = if let Some(files) = fresh {
            let mut batches = Vec::new();
            if let Some(p) = &prev_raw {
                batches.extend(read_conformed(p, t)?);
            }
            for f in files {
                batches.extend(read_conformed(&lake.root.join(f), t)?);
            }
            let w = winners(&t.schema, &batches)?;
            write::write_file(&raw_path, &t.schema, std::slice::from_ref(&w), row_group)?;
            w
        } else {
            let p = prev_raw.clone().ok_or_else(|| SinkError::Lake(format!("snapshot lacks _raw/{name}.parquet")))?;
            link_or_copy(&p, &raw_path)?;
            concat_batches(&t.schema, &read_conformed(&p, t)?).map_err(arrow_err(format!("reading _raw/{name}")))?
        };
        if fresh.is_none() && !republish {
            if let Some(c) = &prev_cur {
                link_or_copy(c, &cur_path)?;
                info.tables.insert(name.clone(), prev.as_ref().and_then(|p| p.tables.get(name)).copied().unwrap_or(0));
                continue;
            }
        }
        let out = publish(name, &raw, &merges)?;
        drop(raw);
        std::fs::create_dir_all(cur_path.parent().unwrap_or(&dir)).map_err(io(format!("creating {}", cur_path.display())))?;
        let bytes = write::write_file(&cur_path, &t.schema, std::slice::from_ref(&out), row_group)?;
        metrics().lake_files_written.with_label_values(&["current"]).inc();
        metrics().lake_bytes_written.with_label_values(&["current"]).inc_by(bytes);
        info.tables.insert(name.clone(), out.num_rows() as u64);
        rebuilt += 1;
    }
    failpoint("compact:after-tables");

    build_views(&dir, tables, &merges, &mut info, row_group).await?;
    std::fs::create_dir_all(dir.join("views")).map_err(io("creating views"))?;
    let bytes = serde_json::to_vec_pretty(&info).map_err(|e| SinkError::Lake(format!("encoding snapshot.json: {e}")))?;
    write_atomic(&lake.tmp(), &dir.join("snapshot.json"), &bytes)?;
    sync_tree(&dir)?;
    failpoint("compact:before-swap");
    swap_link(&lake.root, "current", &PathBuf::from(format!("_snapshots/{id:010}/current")))?;
    failpoint("compact:between-swaps");
    swap_link(&lake.root, "views", &PathBuf::from(format!("_snapshots/{id:010}/views")))?;
    let seconds = started.elapsed().as_secs_f64();
    metrics().lake_compaction_seconds.with_label_values(&[trigger]).observe(seconds);
    tracing::info!(snapshot = id, manifest_seq = state.seq, rebuilt, merges = merges.len(), seconds, "current state and views published");
    Ok(Report { id, rebuilt, seconds })
}

/// The views, from the new current tables (`info.tables`) and the merges, into `dir/views`;
/// their row counts into `info.views`.
async fn build_views(dir: &Path, tables: &HashMap<String, Arc<LakeTable>>, merges: &Merges, info: &mut SnapshotInfo, row_group: usize) -> Result<(), SinkError> {
    let ctx = SessionContext::new();
    for name in info.tables.keys() {
        crate::query::register_dir(&ctx, name, &dir.join("current").join(name), false, tables.get(name).map(|t| t.schema.clone())).await?;
    }
    // A table with no rows yet reads as empty (a view's LEFT JOIN to it yields nulls).
    for (name, t) in tables {
        if !info.tables.contains_key(name) {
            ctx.register_batch(name.as_str(), RecordBatch::new_empty(t.schema.clone())).map_err(|e| SinkError::Lake(format!("{name}: {e}")))?;
        }
    }
    let pairs = merges.pairs();
    let mm = RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("loser", DataType::Utf8, false),
            arrow::datatypes::Field::new("survivor", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(pairs.iter().map(|p| p.0.as_str()))),
            Arc::new(StringArray::from_iter_values(pairs.iter().map(|p| p.1.as_str()))),
        ],
    )
    .map_err(arrow_err("merge map".into()))?;
    ctx.register_batch("merge_map", mm).map_err(|e| SinkError::Lake(format!("merge map: {e}")))?;
    for (view, sql) in VIEWS {
        let missing = missing_tables(&ctx, sql);
        if !missing.is_empty() {
            // A lake whose sites capture no such table (ingest.include), or none yet.
            tracing::warn!(view, missing = ?missing, "view not built: the lake has none of these tables (no site has sent their shape)");
            continue;
        }
        let batches = match ctx.sql(sql).await {
            Ok(df) => df.collect().await,
            Err(e) => Err(e),
        };
        match batches {
            Ok(batches) => {
                let schema = match batches.first() {
                    Some(b) => b.schema(),
                    None => match ctx.sql(sql).await {
                        Ok(df) => Arc::new(df.schema().as_arrow().clone()),
                        Err(e) => return Err(SinkError::Lake(format!("view {view}: {e}"))),
                    },
                };
                let p = dir.join("views").join(view).join("part-0.parquet");
                std::fs::create_dir_all(p.parent().unwrap_or(dir)).map_err(io(format!("creating {}", p.display())))?;
                write::write_file(&p, &schema, &batches, row_group)?;
                metrics().lake_files_written.with_label_values(&["views"]).inc();
                info.views.insert(view.to_string(), batches.iter().map(|b| b.num_rows() as u64).sum());
            }
            Err(e) => return Err(SinkError::Lake(format!("building view {view}: {e}"))),
        }
    }
    Ok(())
}

/// The tables `sql` reads that `ctx` does not have.
fn missing_tables(ctx: &SessionContext, sql: &str) -> Vec<String> {
    let state = ctx.state();
    let Ok(statement) = state.sql_to_statement(sql, &datafusion::config::Dialect::Generic) else { return Vec::new() };
    let refs = state.resolve_table_references(&statement).unwrap_or_default();
    refs.into_iter().filter(|r| !ctx.table_exist(r.clone()).unwrap_or(true)).map(|r| r.to_string()).collect()
}

/// fsyncs every directory of a snapshot (its files were fsynced when written).
fn sync_tree(dir: &Path) -> Result<(), SinkError> {
    sync_dir(dir)?;
    for e in std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree(&e.path())?;
        }
    }
    Ok(())
}

/// The flattened clinical views, as SQL over the current tables (and `merge_map`).
pub const VIEWS: &[(&str, &str)] = &[
    (
        "patients",
        "WITH ident AS (
            SELECT pa._row_key AS person_uuid, COALESCE(m.survivor, pa._row_key) AS hq_uuid, pa._site AS site
            FROM patient pa LEFT JOIN merge_map m ON pa._row_key = m.loser),
          grp AS (
            SELECT hq_uuid, array_sort(array_agg(DISTINCT person_uuid)) AS person_uuids, array_sort(array_agg(DISTINCT site)) AS sites
            FROM ident GROUP BY hq_uuid),
          names AS (
            SELECT person_id_uuid AS person_uuid, given_name, middle_name, family_name,
                   ROW_NUMBER() OVER (PARTITION BY person_id_uuid ORDER BY preferred DESC, date_created, uuid) AS rn
            FROM person_name WHERE voided = false),
          ids AS (
            SELECT i.patient_id_uuid AS hq_uuid,
                   array_sort(array_agg(DISTINCT COALESCE(t.name, i.identifier_type_uuid) || ': ' || i.identifier)) AS identifiers
            FROM patient_identifier i LEFT JOIN patient_identifier_type t ON t.uuid = i.identifier_type_uuid
            WHERE i.voided = false GROUP BY i.patient_id_uuid)
        SELECT g.hq_uuid AS patient_uuid, g.person_uuids, g.sites, cardinality(g.sites) AS site_count,
               n.given_name, n.middle_name, n.family_name, p.gender, p.birthdate, p.dead, p.death_date,
               ids.identifiers, p.date_created
        FROM grp g JOIN person p ON p.uuid = g.hq_uuid
        LEFT JOIN names n ON n.person_uuid = g.hq_uuid AND n.rn = 1
        LEFT JOIN ids ON ids.hq_uuid = g.hq_uuid
        WHERE p.voided = false",
    ),
    (
        "encounters_flat",
        "WITH prov AS (
            SELECT ep.encounter_id_uuid AS encounter_uuid, pr.uuid AS provider_uuid,
                   COALESCE(pr.name, concat_ws(' ', pn.given_name, pn.family_name), pr.identifier) AS provider_name,
                   ROW_NUMBER() OVER (PARTITION BY ep.encounter_id_uuid ORDER BY ep.date_created, ep.uuid) AS rn
            FROM encounter_provider ep JOIN provider pr ON pr.uuid = ep.provider_id_uuid
            LEFT JOIN (SELECT person_id_uuid, given_name, family_name,
                              ROW_NUMBER() OVER (PARTITION BY person_id_uuid ORDER BY preferred DESC, uuid) AS r
                       FROM person_name WHERE voided = false) pn ON pn.person_id_uuid = pr.person_id_uuid AND pn.r = 1
            WHERE ep.voided = false)
        SELECT e.uuid AS encounter_uuid, e.encounter_datetime, e.patient_id_uuid AS patient_uuid, e._site AS site,
               e.visit_id_uuid AS visit_uuid, vt.name AS visit_type, e.encounter_type_uuid, et.name AS encounter_type,
               e.location_id_uuid AS location_uuid, l.name AS location_name, prov.provider_uuid, prov.provider_name,
               e.form_id_uuid AS form_uuid
        FROM encounter e
        LEFT JOIN visit v ON v.uuid = e.visit_id_uuid
        LEFT JOIN visit_type vt ON vt.uuid = v.visit_type_id_uuid
        LEFT JOIN encounter_type et ON et.uuid = e.encounter_type_uuid
        LEFT JOIN location l ON l.uuid = e.location_id_uuid
        LEFT JOIN prov ON prov.encounter_uuid = e.uuid AND prov.rn = 1
        WHERE e.voided = false",
    ),
    (
        "obs_flat",
        "WITH cn AS (
            SELECT concept_id_uuid AS concept_uuid, name,
                   ROW_NUMBER() OVER (PARTITION BY concept_id_uuid
                       ORDER BY CASE WHEN locale = 'en' THEN 0 ELSE 1 END, locale_preferred DESC,
                                CASE WHEN concept_name_type = 'FULLY_SPECIFIED' THEN 0 ELSE 1 END, concept_name_id) AS rn
            FROM concept_name WHERE voided = false)
        SELECT o.uuid AS obs_uuid, o.person_id_uuid AS patient_uuid, o.encounter_id_uuid AS encounter_uuid,
               o.concept_id_uuid AS concept_uuid, c.name AS concept_name,
               o.value_numeric, o.value_coded_uuid, vc.name AS value_coded_name, o.value_text, o.value_datetime,
               o.obs_datetime, o._site AS site, o.obs_group_id_uuid AS obs_group_uuid, o.location_id_uuid AS location_uuid
        FROM obs o
        LEFT JOIN cn c ON c.concept_uuid = o.concept_id_uuid AND c.rn = 1
        LEFT JOIN cn vc ON vc.concept_uuid = o.value_coded_uuid AND vc.rn = 1
        WHERE o.voided = false",
    ),
];

#[cfg(test)]
mod merge_tests {
    use super::Merges;

    #[test]
    fn a_survivor_change_leaves_the_new_survivor_alive_and_no_loop() {
        // W merged into S while W's registration date was unknown; then W turns out earlier.
        let m = Merges::from_rows(vec![(0, 1, "S".into(), "W".into()), (0, 2, "W".into(), "S".into())]);
        assert_eq!(m.survivor_of("W"), None, "the survivor is nobody's loser");
        assert_eq!(m.survivor_of("S"), Some("W"));
        assert!(m.is_winner("W") && !m.is_winner("S"));
        // Through a chain: W lost to X, then X to S; then W becomes the survivor.
        let m = Merges::from_rows(vec![(0, 1, "X".into(), "W".into()), (0, 2, "S".into(), "X".into()), (0, 3, "W".into(), "S".into())]);
        assert_eq!(m.survivor_of("W"), None);
        assert_eq!(m.survivor_of("X"), Some("W"));
        assert_eq!(m.survivor_of("S"), Some("W"));
    }

    #[test]
    fn a_split_releases_its_survivor_and_takes_its_records_along() {
        // L1 and L2 merged into W; a split takes both away, L1 surviving (its rows as the
        // sink writes them: the survivor merged into itself, then each other record).
        let m = Merges::from_rows(vec![
            (0, 1, "W".into(), "L1".into()),
            (0, 2, "W".into(), "L2".into()),
            (0, 3, "W".into(), "L3".into()),
            (0, 4, "L1".into(), "L2".into()),
            (0, 4, "L1".into(), "L1".into()),
        ]);
        assert_eq!((m.survivor_of("L1"), m.survivor_of("L2"), m.survivor_of("L3")), (None, Some("L1"), Some("W")));
        assert!(m.is_winner("L1") && m.is_winner("W"));
    }
}

#[cfg(test)]
mod winner_tests {
    use std::sync::Arc;

    use arrow::array::{Int32Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow::record_batch::RecordBatch;

    use super::winners;

    /// Rows of (row key, site, position, value); every row changed at the same time, priority 0.
    fn batch(schema: &Arc<Schema>, rows: &[(&str, &str, &str, &str)]) -> RecordBatch {
        let n = rows.len();
        let s = |i: usize| Arc::new(StringArray::from(rows.iter().map(|r| [r.0, r.1, r.2, r.3][i]).collect::<Vec<_>>()));
        RecordBatch::try_new(
            schema.clone(),
            vec![
                s(0),
                Arc::new(Int64Array::from(vec![1_000; n])),
                Arc::new(Int32Array::from(vec![0; n])),
                Arc::new(TimestampMicrosecondArray::from(vec![1_000_000; n])),
                s(1),
                s(2),
                s(3),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_latest_version_of_each_key_wins_across_batches_in_input_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("_row_key", DataType::Utf8, false),
            Field::new("_change_ms", DataType::Int64, false),
            Field::new("_priority", DataType::Int32, false),
            Field::new("_event_time", DataType::Timestamp(TimeUnit::Microsecond, None), false),
            Field::new("_site", DataType::Utf8, false),
            Field::new("_position", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, false),
        ]));
        // The previous state, then two change files: k1 changed twice at site-a (the later
        // position wins whatever the file order), k2 once at each site (a full tie: the lower
        // site name wins), k3 never again.
        let prev = batch(&schema, &[("k1", "site-a", "01", "k1 v1"), ("k2", "site-b", "01", "k2 from b"), ("k3", "site-a", "02", "k3 v1")]);
        let f1 = batch(&schema, &[("k1", "site-a", "05", "k1 v3"), ("k2", "site-a", "01", "k2 from a")]);
        let f2 = batch(&schema, &[("k1", "site-a", "03", "k1 v2"), ("k4", "site-c", "01", "k4 v1")]);
        let w = winners(&schema, &[prev, f1, f2]).unwrap();
        let col = |name: &str| w.column_by_name(name).unwrap().as_any().downcast_ref::<StringArray>().unwrap().iter().map(|v| v.unwrap().to_string()).collect::<Vec<_>>();
        // In the order of the input: prev's k3, then f1's k1 and k2, then f2's k4.
        assert_eq!(col("value"), ["k3 v1", "k1 v3", "k2 from a", "k4 v1"]);
        assert_eq!(w.schema(), schema);
        assert_eq!(winners(&schema, &[]).unwrap().num_rows(), 0);
    }
}
