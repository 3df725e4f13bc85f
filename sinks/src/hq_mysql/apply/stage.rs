//! One change planned and staged: its version against the stored one, its key and references
//! mapped to HQ ids, merged persons kept merged; staged rows grouped per table for the writer.

use std::sync::Arc;

use base64::Engine as _;
use mysql_async::{Conn, Value};
use omrs_core::dlq::DeadKind;
use omrs_core::envelope::{FlatRow, Op};
use omrs_core::hq::{compare, RowVersion};
use omrs_core::model::TableModel;
use serde_json::Value as J;

use super::cache::{wanted, TKey, Tk};
use super::columns::{ColInfo, Columns};
use super::{Applier, ChangeEvent, Outcome, PendingEntry, Plan, Stored, Work};
use crate::SinkError;

/// Where a staged write came from: for its dead letter, its latency, and its pending-store
/// entry should the writer park it.
pub(crate) struct Receipt {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(super) site: String,
    pub(super) commit_ms: i64,
    pub(crate) first_seen_ms: i64,
    pub(crate) payload: std::sync::Arc<Vec<u8>>,
}

/// A version to store with a staged write: in `omrs_sync_version`, or, for the first version
/// of a row the sink just created, in its batch's pack (`omrs_sync_version_pack`).
pub(crate) struct StagedVersion {
    pub(crate) table: String,
    pub(crate) key: String,
    pub(crate) stored: Stored,
    pub(super) origin: Option<String>,
    pub(crate) work: usize,
    pub(super) packed: bool,
}

pub(crate) struct StagedRow {
    /// Shared by the rows of a table that have the same columns ([`Applier::col_list`]).
    pub(crate) cols: std::sync::Arc<[String]>,
    pub(crate) vals: Vec<Value>,
    pub(crate) work: usize,
    /// A row new to HQ, with the id the sink has just given it: a plain INSERT.
    pub(crate) insert: bool,
    /// New to HQ by the uuid filter, not looked up ([`super::new_rows`]): if HQ's unique
    /// index refuses it, the batch rolls back ([`SinkError::UuidTaken`]).
    pub(crate) unverified: bool,
}

#[derive(Default)]
pub(super) struct Staged {
    /// table → rows, in stream order; `index` finds a row by its primary-key text.
    pub(super) upserts: hashbrown::HashMap<String, Vec<Option<StagedRow>>>,
    pub(super) index: hashbrown::HashMap<TKey, usize>,
    pub(super) deletes: Vec<(String, Vec<(String, Value)>, usize)>,
    pub(super) deleted_keys: hashbrown::HashSet<TKey>,
    pub(super) versions: Vec<StagedVersion>,
    pub(super) conflicts: Vec<Vec<Value>>,
    /// Where each staged write came from, by index.
    pub(super) receipts: Vec<Receipt>,
    /// (table, op, count) in stream order, a run of the same table and op counted once.
    pub(super) ops: Vec<(String, &'static str, u64)>,
    /// Pending-store changes written with this unit: rows parked, and rows woken or expired.
    pub(super) pending_insert: Vec<(i64, PendingEntry)>,
    pub(super) pending_delete: Vec<i64>,
    /// The version packs of `versions`, stored ahead by [`Applier::plan_batch`] (off the write
    /// path) and not yet marked committed: their pack ids. None: not stored yet.
    pub(super) packs_ahead: Option<Vec<i64>>,
    /// Rows written to a person that is not their own: (table, HQ id, own person uuid, own
    /// `preferred`, work index), kept in `omrs_sync_moved`.
    pub(super) moved: Vec<(String, i64, String, Value, usize)>,
}

impl Staged {
    /// One more row written of `table` by `op`.
    pub(super) fn count_op(&mut self, table: &str, op: &'static str) {
        match self.ops.last_mut() {
            Some((t, o, n)) if *o == op && t == table => *n += 1,
            _ => self.ops.push((table.to_string(), op, 1)),
        }
    }
}

/// A change whose version has won against the stored one, as the steps that stage it see it.
pub(super) struct Change<'w> {
    w: &'w Work,
    tm: Arc<TableModel>,
    cm: Arc<Columns>,
    table: String,
    row_key: String,
    version: RowVersion,
    hash: u64,
    /// The stored version it overwrites with other values from another site: a conflict.
    overwritten: Option<Stored>,
    /// No version of the row is stored: its first.
    first: bool,
}

/// A row's primary key at HQ, worked out by [`Applier::hq_key`].
pub(super) struct HqKey {
    vals: Vec<(String, Value)>,
    /// The row's own HQ id, when its key is one integer column.
    own_id: Option<i64>,
    /// The id was given by the sink just now: a row new to HQ, written by a plain INSERT.
    allocated: bool,
}

/// A row's primary key at HQ as text, to find it again among a batch's staged rows:
/// `col=value` per key column, joined by `|` (a value in its `Debug` form, which tells an
/// integer from a string).
pub(super) fn pk_text(pk: &[(String, Value)]) -> String {
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


/// FNV-1a: a stable content hash (the same across runs and builds).
pub(super) fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}


impl Applier {
    /// Content hash of a row in uuid space: references by uuid, site-local ids left out.
    pub(super) fn content_hash(tm: &TableModel, cm: &Columns, ev: &ChangeEvent) -> u64 {
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

    /// Decides what one change does at HQ and stages it.
    pub(super) async fn plan(&mut self, conn: &mut Conn, w: &Work, staged: &mut Staged, units: &mut Vec<Staged>, out: &mut Outcome) -> Result<Plan, SinkError> {
        let ev = &w.event;
        let Some(table) = ev.table.clone() else { return Ok(Plan::Dead(DeadKind::InvalidEvent, "change without a table".into())) };
        let (Some(tm), Some(cm)) = (self.table(&table), self.columns.get(&table).cloned()) else {
            return Ok(Plan::Dead(DeadKind::UnknownTable, format!("table `{table}` does not exist at HQ")));
        };
        let row_key = match &w.key {
            Ok(k) => k.clone(),
            Err(reason) => return Ok(Plan::Dead(DeadKind::MissingKey, reason.clone())),
        };
        // Later changes of a parked row queue behind it. A woken row is the first of its row's
        // parked changes: the ones behind it wait for it to be done (re-parking it behind them
        // would leave them all waiting for each other).
        if !w.woken && self.pending.holds_row(&table, &row_key) {
            return Ok(Plan::Park(table, row_key));
        }
        let version = RowVersion::of(ev, self.rules.get(&ev.site));
        let hash = Self::content_hash(&tm, &cm, ev);
        let cached = self.versions.get(&table, &row_key).cloned();
        let stored = match cached {
            Some(s) => s,
            None if self.known_new(&table, &row_key) => None,
            None => {
                self.prefetch_versions(conn, wanted(&table, [row_key.as_str()])).await?;
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

        let first = stored.is_none();
        let stored_id = stored.as_ref().and_then(|s| s.hq_id);
        let c = Change { w, tm, cm, table, row_key, version, hash, overwritten: overwritten.cloned(), first };
        let row = if ev.op == Op::Delete { ev.before.as_ref() } else { ev.after.as_ref() };
        let Some(row) = row else { return Ok(Plan::Dead(DeadKind::InvalidEvent, format!("{} {}: no row image", c.table, c.row_key))) };
        let key = match self.hq_key(conn, &c, row, stored_id).await? {
            Ok(k) => k,
            Err(p) => return Ok(p),
        };
        if ev.op == Op::Delete {
            self.stage_delete(staged, c, key);
            return Ok(Plan::Done);
        }
        self.stage_upsert(conn, c, row, key, staged, units).await
    }

    /// The row's primary key at HQ: the id of the row whose key it shares, its own id (looked
    /// up by uuid, or given now to a row new to HQ), or its key columns with references mapped.
    /// `Err(plan)` parks or dead-letters the row.
    async fn hq_key(&mut self, conn: &mut Conn, c: &Change<'_>, row: &FlatRow, stored_id: Option<i64>) -> Result<Result<HqKey, Plan>, SinkError> {
        let (tm, cm, ev) = (&c.tm, &c.cm, &c.w.event);
        let mut key = HqKey { vals: Vec::new(), own_id: None, allocated: false };
        let int_pk = cm.int_pk.as_deref();
        if let (Some(pk), Some(parent)) = (int_pk, tm.shared_parent.as_deref()) {
            match self.lookup_id(conn, parent, &c.row_key).await? {
                Some(id) => {
                    key.vals.push((pk.to_string(), Value::from(id)));
                    key.own_id = Some(id);
                }
                None if ev.op == Op::Delete => {}
                None => return Ok(Err(Plan::Park(parent.to_string(), c.row_key.clone()))),
            }
        } else if let (Some(pk), true) = (int_pk, tm.has_uuid || cm.fk(int_pk.unwrap_or("")).is_none()) {
            let known = if tm.has_uuid { self.lookup_id(conn, &c.table, &c.row_key).await? } else { stored_id };
            key.own_id = match known {
                Some(id) => Some(id),
                None if ev.op == Op::Delete => None,
                None => {
                    key.allocated = true;
                    if tm.has_uuid {
                        self.uuids.insert(&c.table, &c.row_key);
                    }
                    Some(self.allocate(conn, &c.table, pk).await?)
                }
            };
            if let Some(id) = key.own_id {
                key.vals.push((pk.to_string(), Value::from(id)));
            }
        } else {
            for col in &tm.pk {
                let info = cm.get(col).cloned().unwrap_or_else(|| ColInfo { name: col.clone(), ..ColInfo::default() });
                match self.column_value(conn, tm, &info, row.get(col).unwrap_or(&J::Null), ev, &c.w.origin_refs).await? {
                    Ok(v) => key.vals.push((col.clone(), v)),
                    Err(p) => return Ok(Err(p)),
                }
            }
        }
        Ok(Ok(key))
    }

    /// Stages a delete: the row's staged write in this unit is dropped, its id forgotten, and
    /// its version kept as a tombstone.
    fn stage_delete(&mut self, staged: &mut Staged, c: Change<'_>, key: HqKey) {
        let Change { w, tm, table, row_key, version, hash, overwritten, .. } = c;
        let wi = Self::receipt(staged, w);
        if !key.vals.is_empty() && key.vals.len() == tm.pk.len() {
            let pk_text = pk_text(&key.vals);
            if let Some(i) = staged.index.remove(&Tk(&table, &pk_text)) {
                if let Some(rows) = staged.upserts.get_mut(&table) {
                    rows[i] = None;
                }
            }
            staged.deletes.push((table.clone(), key.vals, wi));
            staged.deleted_keys.insert((table.clone(), pk_text));
            staged.count_op(&table, "d");
        }
        self.ids.pop(&table, &row_key);
        self.tombstones.insert((table.clone(), row_key.clone()));
        self.deleting.insert((table.clone(), row_key.clone()), self.generation);
        self.stage_version(staged, wi, &table, &row_key, (version, hash, key.own_id), None, overwritten, &w.event, false);
    }

    /// Stages an insert or update: every column, references mapped to HQ ids, merged persons
    /// kept merged; the row replaces its earlier staged write in this unit.
    async fn stage_upsert(&mut self, conn: &mut Conn, c: Change<'_>, row: &FlatRow, key: HqKey, staged: &mut Staged, units: &mut Vec<Staged>) -> Result<Plan, SinkError> {
        let (w, tm, ev) = (c.w, &c.tm, &c.w.event);
        let (table, row_key) = (c.table.as_str(), c.row_key.as_str());
        let pk_text = pk_text(&key.vals);
        // The names are borrowed from the table's column info; the list is shared below.
        let npk = key.vals.len();
        let mut cols: Vec<&str> = Vec::with_capacity(row.len() + 2);
        let mut vals: Vec<Value> = Vec::with_capacity(row.len() + 2);
        for (col, v) in key.vals {
            // A key column's name, borrowed from the table's key.
            cols.push(tm.pk.iter().find(|p| **p == col).map_or("", String::as_str));
            vals.push(v);
        }
        let mut has_uuid_col = false;
        for (col, raw) in row {
            let Some(info) = c.cm.get(col) else {
                if self.warned.insert((table.to_string(), col.to_string())) {
                    tracing::warn!(table = %table, column = %col, site = %ev.site, "column does not exist at HQ; its values are not applied");
                    omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "unknown_column"]).inc();
                }
                continue;
            };
            // A row image's columns are distinct: only a key column can be there already.
            if info.pk && cols[..npk].contains(&info.name.as_str()) {
                continue;
            }
            let v = match self.column_value(conn, tm, info, raw, ev, &w.origin_refs).await? {
                Ok(v) => v,
                Err(p) => return Ok(p),
            };
            if key.allocated && info.null_default && v == Value::NULL {
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
            vals.push(Value::from(row_key));
        }
        let owner = self.force_merge_values(conn, table, row_key, w, &mut cols, &mut vals).await?;
        let cols = self.col_list(table, &cols);

        if staged.deleted_keys.contains(&Tk(table, &pk_text)) {
            // Deleted earlier in this flush and written again: what is staged is written first.
            units.push(std::mem::take(staged));
        }
        let wi = Self::receipt(staged, w);
        if let Some(id) = key.own_id {
            for (moved_key, person, preferred) in owner {
                staged.moved.push((moved_key, id, person, preferred, wi));
            }
        }
        let rows = staged.upserts.entry_ref(table).or_default();
        let at = staged.index.get(&Tk(table, &pk_text)).copied();
        // A row given its id in this unit stays an INSERT through its later changes here.
        let (insert, unverified) = match at.and_then(|i| rows.get(i)).and_then(Option::as_ref) {
            Some(earlier) if earlier.insert => (true, earlier.unverified),
            _ => (key.allocated, key.allocated && self.assumed.contains(&Tk(table, row_key))),
        };
        let staged_row = Some(StagedRow { cols, vals, work: wi, insert, unverified });
        match at {
            Some(i) => rows[i] = staged_row,
            None => {
                staged.index.insert((table.to_string(), pk_text), rows.len());
                rows.push(staged_row);
            }
        }
        staged.count_op(table, ev.op.as_str());
        if !self.tombstones.is_empty() {
            self.tombstones.remove(&Tk(table, row_key));
        }
        if let Some(id) = key.own_id {
            self.absent.remove(&Tk(table, row_key));
            self.ids.put_ref(table, row_key, id);
        }
        let origin_key = ev.key.as_ref().map(|k| serde_json::to_string(k).unwrap_or_default());
        // A first version is packed with its batch's when HQ can find it again by the row's id:
        // the row has a uuid and the id is the one the sink just gave it.
        let packed = key.allocated && tm.has_uuid && c.first;
        self.stage_version(staged, wi, table, row_key, (c.version, c.hash, key.own_id), origin_key, c.overwritten, ev, packed);
        Ok(Plan::Done)
    }

    /// `cols` as a shared list: one of the table's recent lists when it has the same columns.
    pub(super) fn col_list(&mut self, table: &str, cols: &[&str]) -> std::sync::Arc<[String]> {
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

    pub(super) fn receipt(staged: &mut Staged, w: &Work) -> usize {
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
    pub(super) fn stage_version(
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

    pub(super) fn conflict_row(&self, table: &str, row_key: &str, winner: &RowVersion, loser: &RowVersion, ev: &ChangeEvent, overwritten: bool) -> Vec<Value> {
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
    pub(super) async fn column_value(
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
                Err(e) => return Ok(Err(Plan::Dead(DeadKind::BadValue, format!("{}.{col}: not base64 ({e})", tm.name)))),
            },
            J::String(s) if info.int && s.is_empty() => Value::NULL,
            J::String(s) => Value::from(s.as_str()),
            other => Value::from(other.to_string()),
        }))
    }
}


#[cfg(test)]
mod tests {
    use super::pk_text;

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
}
