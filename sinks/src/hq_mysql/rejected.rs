//! Rows HQ did not write, and the rows staged against them (issue #22, hole C).
//!
//! HQ does not check the foreign keys of the upserts of tables whose every reference the sink
//! resolves (`server_fk_checks = false`): a child staged against the id its parent has just
//! been given would be inserted even when HQ rejects the parent's row, an orphan. So the
//! writer follows, by HQ id, the rows it did not write: a row HQ rejected (dead-lettered with
//! the server's message) and, transitively, every row staged against one of them. Those it
//! parks in `omrs_sync_pending`, waiting for the row they reference, as if that row had never
//! arrived. The batch planned while a batch was being written may have staged rows against
//! that batch's ids: what the batch did not write is carried into its write ([`Carry`]).
//!
//! A later change of a parked row, planned before the writer parked it, is written if it
//! references nothing missing: the versions order the two when the parked change wakes (it is
//! older, so it loses), which ends where applying both in order would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::dlq::DeadKind;
use omrs_core::hq::RowVersion;
use omrs_core::model::TableModel;

use super::apply::{q, DeadLetter, Outcome, PendingEntry, Receipt, StagedRow, StagedVersion, Writer};
use crate::{is_transient_db, SinkError};

/// Why a row of a batch was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// HQ rejected its upsert (dead-lettered). `absent`: the row is not at HQ.
    Rejected { absent: bool },
    /// Parked by the writer, waiting for a row HQ does not hold. `absent` as above.
    Held { absent: bool },
    /// HQ refused its delete (dead-lettered): the row is still there.
    Refused,
}

/// A row of a batch that HQ did not write.
#[derive(Debug, Clone)]
pub(super) struct Unwritten {
    pub table: String,
    pub key: String,
    pub hq_id: Option<i64>,
    /// The version the batch staged for it (and cached).
    pub version: RowVersion,
    pub why: Why,
}

/// What a batch's write did not write: the applier forgets the cached ids and versions of these
/// rows and learns of the rows the writer parked ([`super::apply::Applier::forget`]).
#[derive(Debug, Default)]
pub struct Rejected {
    pub(super) rows: Vec<Unwritten>,
    /// Rows parked by the writer, already in the batch's `omrs_sync_pending` inserts.
    pub(super) parked: Vec<(i64, PendingEntry)>,
}

impl Rejected {
    /// True when HQ wrote every row of the batch.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows not written: rejected, refused or parked.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Rows the writer parked because a row they reference was not written.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    pub(super) fn extend(&mut self, other: Rejected) {
        self.rows.extend(other.rows);
        self.parked.extend(other.parked);
    }

    /// What the rows of a batch written after this one must not reference.
    pub(super) fn missing(&self) -> Missing {
        let mut m = Missing::default();
        for u in &self.rows {
            m.add(u);
        }
        m
    }
}

/// The rows a write must not reference: rows not at HQ that staged rows were given ids for.
#[derive(Debug, Default, Clone)]
pub(super) struct Missing {
    /// table → HQ id → row key.
    by_id: HashMap<String, HashMap<i64, String>>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn add(&mut self, u: &Unwritten) {
        let absent = matches!(u.why, Why::Rejected { absent: true } | Why::Held { absent: true });
        if let (Some(id), true) = (u.hq_id, absent) {
            self.by_id.entry(u.table.clone()).or_default().insert(id, u.key.clone());
        }
    }

    /// Row `id` of `table` was written after all (a later change of a rejected row): rows may
    /// reference it again.
    pub fn landed(&mut self, table: &str, id: i64) {
        if let Some(m) = self.by_id.get_mut(table) {
            m.remove(&id);
            if m.is_empty() {
                self.by_id.remove(table);
            }
        }
    }

    pub fn merge(&mut self, other: Missing) {
        for (t, m) in other.by_id {
            self.by_id.entry(t).or_default().extend(m);
        }
    }

    /// What a row about to be written must wait for, if anything: the first row it references
    /// that HQ does not hold. `own` is the row's table model and HQ id; `tables` is HQ's model.
    pub fn waits_for(
        &self,
        (tm, own_id): (&TableModel, Option<i64>),
        cols: &[String],
        vals: &[Value],
        tables: &BTreeMap<String, Arc<TableModel>>,
    ) -> Option<(String, String)> {
        for (c, v) in cols.iter().zip(vals) {
            let Value::Int(id) = v else { continue };
            let Some(fk) = tm.fk(c) else { continue };
            let Some(ids) = self.by_id.get(&fk.ref_table) else { continue };
            // A row pointing at itself (a user created by itself) does not wait for itself.
            if fk.ref_table == tm.name && own_id == Some(*id) {
                continue;
            }
            let Some(ref_key) = ids.get(id) else { continue };
            // Only a reference to the referenced table's integer key is an HQ id.
            if tables.get(&fk.ref_table).and_then(|t| t.int_pk()) == Some(fk.ref_column.as_str()) {
                return Some((fk.ref_table.clone(), ref_key.clone()));
            }
        }
        None
    }
}

/// What batches did not write, carried into the writes of the batches planned before the
/// applier learnt of it: shared by the applier and its writers. An entry is (the last
/// generation planned when the applier forgot the rows, what they were).
#[derive(Debug, Default, Clone)]
pub(super) struct Carry(Arc<Mutex<Vec<(u64, Missing)>>>);

impl Carry {
    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Missing)>> {
        // The lock guards plain data that no panic can leave half-changed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rows of a batch not written, learnt once `upto` (the generation planned last) was
    /// planned.
    pub fn push(&self, upto: u64, missing: Missing) {
        if !missing.is_empty() {
            self.entries().push((upto, missing));
        }
    }

    /// What the write of the batch of `generation` must not reference: what every batch that
    /// it was planned before learning of did not write.
    pub fn for_batch(&self, generation: u64) -> Missing {
        let mut m = Missing::default();
        for (upto, missing) in self.entries().iter() {
            if *upto >= generation {
                m.merge(missing.clone());
            }
        }
        m
    }

    /// The batch of `generation` (and every one before it) has committed.
    pub fn written(&self, generation: u64) {
        self.entries().retain(|(upto, _)| *upto > generation);
    }
}

/// Follows, while one unit of a batch is written, the rows it does not write.
pub(super) struct Tracker<'a> {
    pub missing: &'a mut Missing,
    versions: &'a [StagedVersion],
    receipts: &'a [Receipt],
    /// Works (receipt indexes) not written: their versions are not stored.
    pub failed: HashSet<usize>,
    pub rejected: Rejected,
    /// work → index of its version in `versions`, built when first needed.
    by_work: Option<Vec<usize>>,
}

impl<'a> Tracker<'a> {
    pub fn new(missing: &'a mut Missing, versions: &'a [StagedVersion], receipts: &'a [Receipt]) -> Self {
        Tracker { missing, versions, receipts, failed: HashSet::new(), rejected: Rejected::default(), by_work: None }
    }

    /// The version staged for the row of `work`.
    fn version(&mut self, work: usize) -> Option<&'a StagedVersion> {
        let versions = self.versions;
        let idx = self.by_work.get_or_insert_with(|| {
            let mut v = vec![usize::MAX; versions.iter().map(|v| v.work + 1).max().unwrap_or(0)];
            for (i, r) in versions.iter().enumerate() {
                v[r.work] = i;
            }
            v
        });
        idx.get(work).and_then(|&i| versions.get(i))
    }

    /// The row of `work` is not written, for `why`.
    pub fn not_written(&mut self, work: usize, why: Why) {
        self.failed.insert(work);
        if let Some(v) = self.version(work) {
            let u = Unwritten { table: v.table.clone(), key: v.key.clone(), hq_id: v.stored.hq_id, version: v.stored.version.clone(), why };
            if why != Why::Refused {
                self.missing.add(&u);
            }
            self.rejected.rows.push(u);
        }
    }

    /// The row of `work` was written: if it is one HQ lacked, rows may reference it again.
    pub fn landed(&mut self, work: usize) {
        if self.missing.is_empty() {
            return;
        }
        if let Some(v) = self.version(work) {
            if let Some(id) = v.stored.hq_id {
                self.missing.landed(&v.table, id);
            }
        }
    }
}

impl Writer {
    /// Writes one chunk of a table's rows that share a column list (`pk`: the key of an upsert,
    /// None for new rows). A row staged against a row HQ does not hold is parked instead. A
    /// statement that fails definitely is retried row by row: only the bad rows are rejected
    /// (dead-lettered), and the rows staged against them wait.
    pub(super) async fn write_chunk(
        &self,
        conn: &mut Conn,
        (table, cols, pk): (&str, &[String], Option<&[String]>),
        chunk: &[StagedRow],
        t: &mut Tracker<'_>,
        out: &mut Outcome,
    ) -> Result<(), SinkError> {
        let mut go: Vec<&StagedRow> = Vec::with_capacity(chunk.len());
        for r in chunk {
            if !self.held(conn, table, r, t, out).await? {
                go.push(r);
            }
        }
        match self.upsert(conn, table, cols, pk, go.iter().copied()).await {
            Ok(()) => go.iter().for_each(|r| t.landed(r.work)),
            Err(e) if is_transient_db(&e) => return Err(SinkError::db(format!("writing {table}"), e)),
            // A row taken for new by the uuid filter, whose uuid HQ holds after all.
            Err(mysql_async::Error::Server(e)) if e.code == 1062 && go.iter().any(|r| r.unverified) => {
                return Err(SinkError::UuidTaken { table: table.to_string(), detail: e.message });
            }
            Err(_) => {
                for r in go {
                    if self.held(conn, table, r, t, out).await? {
                        continue;
                    }
                    match self.upsert(conn, table, cols, pk, std::iter::once(r)).await {
                        Ok(()) => t.landed(r.work),
                        Err(e) if is_transient_db(&e) => return Err(SinkError::db(format!("writing {table}"), e)),
                        Err(e) => {
                            self.rejected(conn, table, r, t).await?;
                            let Some(w) = t.receipts.get(r.work) else { continue };
                            omrs_core::metrics::metrics().sink_errors.with_label_values(&["hq_mysql", "row_rejected"]).inc();
                            tracing::warn!(table = %table, offset = w.offset, error = %e, "HQ rejected a row; dead-lettered");
                            out.dead.push(DeadLetter {
                                partition: w.partition,
                                offset: w.offset,
                                kind: DeadKind::RowRejected,
                                reason: format!("HQ rejected the {table} row: {e}"),
                                payload: w.payload.to_vec(),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Parks the row instead of writing it when it must wait ([`Missing::waits_for`]). True
    /// if it did.
    pub(super) async fn held(&self, conn: &mut Conn, table: &str, row: &StagedRow, t: &mut Tracker<'_>, out: &mut Outcome) -> Result<bool, SinkError> {
        if t.missing.is_empty() {
            return Ok(false);
        }
        let receipts = t.receipts;
        let (Some(tm), Some(v), Some(r)) = (self.tables.get(table), t.version(row.work), receipts.get(row.work)) else { return Ok(false) };
        let Some(waits) = t.missing.waits_for((tm, v.stored.hq_id), &row.cols, &row.vals, &self.tables) else { return Ok(false) };
        // A new row (its id just given) is not at HQ; a change of one that is stays there.
        let absent = row.insert || !self.at_hq(conn, tm, v.stored.hq_id).await?;
        let id = self.pending_ids.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            table = %v.table, key = %v.key, waits_for_table = %waits.0, waits_for_key = %waits.1, offset = r.offset,
            "not written: it references a row HQ does not hold; parked until that row lands"
        );
        let entry = PendingEntry {
            tbl: v.table.clone(),
            row_key: v.key.clone(),
            waits,
            first_seen_ms: r.first_seen_ms,
            offset: r.offset,
            partition: r.partition,
            // The record as read (or as parked before): a change record, parsed again on waking.
            event: String::from_utf8_lossy(&r.payload).into_owned(),
        };
        t.not_written(row.work, Why::Held { absent });
        t.rejected.parked.push((id, entry));
        out.parked += 1;
        Ok(true)
    }

    /// A row HQ rejected (the caller dead-letters it).
    pub(super) async fn rejected(&self, conn: &mut Conn, table: &str, row: &StagedRow, t: &mut Tracker<'_>) -> Result<(), SinkError> {
        let absent = match (self.tables.get(table), t.version(row.work)) {
            _ if row.insert => true,
            (Some(tm), Some(v)) => !self.at_hq(conn, tm, v.stored.hq_id).await?,
            _ => false,
        };
        t.not_written(row.work, Why::Rejected { absent });
        Ok(())
    }

    /// True when row `id` of `tm` is at HQ, as the batch's transaction sees it. A row without
    /// an HQ id of its own is referenced by no id: it counts as there.
    async fn at_hq(&self, conn: &mut Conn, tm: &TableModel, id: Option<i64>) -> Result<bool, SinkError> {
        let (Some(id), Some(pk)) = (id, tm.int_pk()) else { return Ok(true) };
        let n: Option<i64> = conn
            .exec_first(format!("SELECT COUNT(*) FROM {} WHERE {} = ?", q(&tm.name), q(pk)), (id,))
            .await
            .map_err(|e| SinkError::db(format!("checking a rejected {} row", tm.name), e))?;
        Ok(n.unwrap_or(0) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omrs_core::model::{ColumnInfo, Fk};

    fn table(name: &str, pk: &str, fks: &[(&str, &str, &str)]) -> Arc<TableModel> {
        let mut columns = vec![ColumnInfo { name: pk.into(), column_type: "int(11)".into(), ..Default::default() }];
        columns.extend(fks.iter().map(|(c, _, _)| ColumnInfo { name: c.to_string(), column_type: "int(11)".into(), ..Default::default() }));
        Arc::new(TableModel {
            name: name.into(),
            columns,
            pk: vec![pk.into()],
            has_uuid: true,
            fks: fks.iter().map(|(c, t, r)| Fk { column: c.to_string(), ref_table: t.to_string(), ref_column: r.to_string() }).collect(),
            shared_parent: None,
            enums: HashMap::new(),
        })
    }

    fn unwritten(table: &str, key: &str, id: i64, why: Why) -> Unwritten {
        let version = RowVersion { change_ms: 1, priority: 0, site: "site-a".into(), commit_ms: 1, position: "p".into() };
        Unwritten { table: table.into(), key: key.into(), hq_id: Some(id), version, why }
    }

    #[test]
    fn a_row_waits_for_the_row_it_references_that_hq_does_not_hold() {
        let person = table("person", "person_id", &[]);
        let name = table("person_name", "person_name_id", &[("person_id", "person", "person_id"), ("creator", "users", "user_id")]);
        let tables: BTreeMap<String, Arc<TableModel>> = [("person".to_string(), person), ("person_name".to_string(), name.clone())].into_iter().collect();
        let mut m = Missing::default();
        m.add(&unwritten("person", "P", 7, Why::Rejected { absent: true }));
        // A change HQ rejected of a row that is at HQ holds nobody up.
        m.add(&unwritten("person", "Q", 8, Why::Rejected { absent: false }));
        let cols: Vec<String> = ["person_name_id", "person_id", "creator"].iter().map(|c| c.to_string()).collect();
        let waits = |m: &Missing, person_id: i64| m.waits_for((&name, Some(5)), &cols, &[Value::Int(5), Value::Int(person_id), Value::Int(7)], &tables);
        assert_eq!(waits(&m, 7), Some(("person".into(), "P".into())));
        assert_eq!(waits(&m, 8), None);
        // `creator` = 7 is a user id, not person 7.
        assert_eq!(waits(&m, 9), None);
        // A parked row is missing in turn; a refused delete leaves its row there.
        m.add(&unwritten("person_name", "N", 5, Why::Held { absent: true }));
        m.add(&unwritten("person_name", "M", 6, Why::Refused));
        let obs = table("obs", "obs_id", &[("name_id", "person_name", "person_name_id")]);
        let ncols: Vec<String> = ["obs_id", "name_id"].iter().map(|c| c.to_string()).collect();
        assert_eq!(m.waits_for((&obs, Some(1)), &ncols, &[Value::Int(1), Value::Int(5)], &tables), Some(("person_name".into(), "N".into())));
        assert_eq!(m.waits_for((&obs, Some(1)), &ncols, &[Value::Int(1), Value::Int(6)], &tables), None);
        // The person lands after all (a later change of it was written): rows may use it again.
        let mut m2 = Missing::default();
        m2.add(&unwritten("person", "P", 7, Why::Rejected { absent: true }));
        m2.landed("person", 7);
        assert!(m2.is_empty());
        assert_eq!(waits(&m2, 7), None);
    }

    #[test]
    fn what_a_batch_did_not_write_is_carried_into_the_writes_planned_before_it_was_known() {
        let carry = Carry::default();
        let mut m = Missing::default();
        m.add(&unwritten("person", "P", 7, Why::Rejected { absent: true }));
        // Batch 1 is finished after batch 2 was planned.
        carry.push(2, m);
        carry.push(2, Missing::default());
        assert!(!carry.for_batch(2).is_empty(), "batch 2 was planned against batch 1's ids");
        assert!(carry.for_batch(3).is_empty(), "batch 3 is planned after the applier forgot them");
        carry.written(1);
        assert!(!carry.for_batch(2).is_empty());
        carry.written(2);
        assert!(carry.for_batch(2).is_empty());
    }
}
