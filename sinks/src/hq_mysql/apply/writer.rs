//! Staged units written to HQ in the batch's transaction: rows parents first, deletes
//! children first, versions, moved rows, the pending store and the conflict log.

use std::collections::{BTreeMap, HashMap, HashSet};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::dlq::DeadKind;
use omrs_core::model::TableModel;
use serde_json::Value as J;

use super::aggregate::{upsert_aggregates, Aggregates};
use super::merge::{drop_covered_merge_logs, merge_log_losers};
use super::pending::write_pending;
use crate::hq_mysql::rejected::{Carry, Missing, Rejected, Tracker, Why};
use super::sql::{db, q, stable_chunks};
use super::versions::{store_packs, version_packs};
use super::{DeadLetter, Outcome, Staged, StagedRow, StagedVersion};
use crate::{is_transient_db, SinkError};

/// A batch planned while the previous one was being written (see [`Applier::plan_batch`]): the
/// units to write in order, the dashboard aggregates, and what planning already decided (dead
/// letters, parked rows).
pub struct PlannedBatch {
    pub(super) units: Vec<Staged>,
    pub(super) aggregates: Aggregates,
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
        for unit in self.units {
            rejected.extend(writer.execute(conn, unit, &mut out, &mut missing).await?);
        }
        out.aggregates = upsert_aggregates(conn, self.aggregates).await?;
        Ok((out, rejected))
    }
}

/// What writing needs of HQ's table model: staged units are written by this, on the writing
/// connection, while the [`Applier`] plans the next batch.
pub struct Writer {
    pub(crate) tables: BTreeMap<String, std::sync::Arc<TableModel>>,
    pub(super) order: Vec<String>,
    pub(super) max_rows_per_statement: usize,
    /// Tables whose upserts HQ need not check the foreign keys of: every foreign key of the
    /// table is resolved by the sink from a uuid to the id of a row at HQ (or staged before it).
    /// Empty with `sinks.hq_mysql.server_fk_checks`.
    pub(super) unchecked: HashSet<String>,
    /// What earlier batches did not write, shared with the applier ([`super::rejected`]).
    pub(super) carry: Carry,
    /// The next `omrs_sync_pending` id, shared with the applier: the writer parks rows too.
    pub(crate) pending_ids: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Writer {
    /// Writes what is staged: upserts parents first, then deletes children first, versions and
    /// conflicts. A statement that fails definitely is retried row by row; the rows that still
    /// fail are dead-lettered and their versions are not written. A row staged against a row
    /// that is not at HQ (in `missing`, or rejected here) is parked instead of written, and
    /// joins `missing` itself ([`super::rejected`]). Returns the rows not written.
    pub(super) async fn execute(&self, conn: &mut Conn, mut staged: Staged, out: &mut Outcome, missing: &mut Missing) -> Result<Rejected, SinkError> {
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
        let mut merge_logged = Vec::new();
        for table in order {
            let Some(rows) = staged.upserts.remove(table) else { continue };
            let rows: Vec<StagedRow> = rows.into_iter().flatten().collect();
            if rows.is_empty() {
                continue;
            }
            if table == "person_merge_log" {
                merge_logged = merge_log_losers(&rows);
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
        drop_covered_merge_logs(conn, &merge_logged).await?;
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
                    kind: DeadKind::RowRejected,
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
    pub(super) async fn read_overwritten(&self, conn: &mut Conn, conflicts: &mut [Vec<Value>]) -> Result<(), SinkError> {
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

    pub(crate) async fn upsert<'r>(
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
pub(super) async fn write_version_rows(conn: &mut Conn, single: &[&StagedVersion], deletes: &[(String, Vec<(String, Value)>, usize)]) -> Result<(), SinkError> {
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
pub(super) async fn write_moved_rows(conn: &mut Conn, moved: &[&(String, i64, String, Value, usize)]) -> Result<(), SinkError> {
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
