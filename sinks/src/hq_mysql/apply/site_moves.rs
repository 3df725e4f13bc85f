//! A clinic's own merge at HQ (issue #23 §4: a split undoes it too).
//!
//! The clinic moved the loser's visits, encounters and obs to the winner itself, so its rows
//! say "winner" from then on. Its merge log (`merged_data`, [`omrs_core::merge_log`]) names
//! them: HQ counts each as the loser's own row. While the merge stands that changes nothing
//! (the loser's survivor is the winner's); when a split keeps them apart, the rows go back to
//! the loser with the rest of its records, and later changes from the clinic land there too.
//!
//! Applied in the batch's transaction, like a merge: the log's rows are recorded in
//! `omrs_sync_moved` and pointed at the loser's survivor once, whatever came first (the
//! split decision or the log).

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::merge_log::SiteMoves;
use omrs_core::openmrs::moved_key;
use serde_json::Value as J;

use super::sql::{db, q};
use super::{Applier, ChangeEvent};
use crate::SinkError;

/// The site logs at HQ, in the order HQ wrote them: the rows each names.
pub(super) async fn load(conn: &mut Conn) -> Result<SiteMoves, SinkError> {
    let logs: Vec<(String, String)> = conn
        .query(
            "SELECT p.uuid, l.merged_data FROM person_merge_log l JOIN person p ON p.person_id = l.loser_person_id
              WHERE l.merged_data LIKE '<%' ORDER BY l.person_merge_log_id",
        )
        .await
        .map_err(db("reading the sites' merge logs"))?;
    let mut moves = SiteMoves::default();
    for (loser, data) in logs {
        moves.add(&loser, &data);
    }
    Ok(moves)
}

/// (loser uuid, merged_data) of a clinic's new merge log row.
pub(super) fn logged(ev: &ChangeEvent) -> Option<(String, String)> {
    if ev.table.as_deref() != Some("person_merge_log") || !matches!(ev.op, omrs_core::envelope::Op::Create | omrs_core::envelope::Op::Read) {
        return None;
    }
    let loser = ev.refs.get("loser_person_id").and_then(J::as_str)?;
    let data = ev.after.as_ref()?.get("merged_data").and_then(J::as_str)?;
    data.starts_with('<').then(|| (loser.to_string(), data.to_string()))
}

/// A change of a row that a clinic's merge moved: its person column's own person is the loser
/// (`origin_refs`, as for a row the transform wrote to a survivor).
pub(super) fn own_person(moves: &SiteMoves, ev: &ChangeEvent, origin_refs: &mut serde_json::Map<String, J>) {
    let Some(table) = ev.table.as_deref() else { return };
    let Some(col) = SiteMoves::column(table) else { return };
    let encounter = ev.refs.get("encounter_id").and_then(J::as_str);
    let Some(owner) = moves.owner(table, ev.uuid.as_deref(), encounter) else { return };
    if ev.refs.get(col).and_then(J::as_str) == Some(owner) {
        origin_refs.remove(col);
    } else {
        origin_refs.insert(col.to_string(), J::String(owner.to_string()));
    }
}

impl Applier {
    /// A clinic's merge log written at HQ: the rows it names are the loser's (recorded in
    /// `omrs_sync_moved`, unless an earlier move recorded whose they are) and on the loser's
    /// survivor.
    pub(super) async fn site_merge_logged(&mut self, conn: &mut Conn, loser: &str, data: &str) -> Result<(), SinkError> {
        let rows = self.site_moves.add(loser, data);
        if rows.is_empty() {
            return Ok(());
        }
        let survivor = self.holder_of(loser);
        let target = self.lookup_id(conn, "person", &survivor).await?;
        tracing::info!(loser, survivor = %survivor, rows = rows.len(), "a clinic's merge log: the rows it moved are its loser's");
        let mut tables: Vec<&str> = rows.iter().map(|(t, _)| *t).collect();
        tables.dedup();
        for table in tables {
            let uuids: Vec<Value> = rows.iter().filter(|(t, _)| *t == table).map(|(_, u)| Value::from(u.as_str())).collect();
            self.own_rows(conn, table, &uuids, loser, target, None).await?;
            if table == "encounter" {
                // The obs of a moved encounter moved with it.
                self.own_rows(conn, "obs", &uuids, loser, target, Some("encounter")).await?;
            }
        }
        Ok(())
    }

    /// The record that holds `loser`'s rows at HQ now: its survivor through the merges HQ has
    /// applied. A merge still waiting for its persons has not moved them (it moves them when it
    /// is applied, see `merge`); pointing them at its survivor before then broke the survivor's
    /// foreign keys when it was not a patient at HQ yet (`tests/site_fault.rs` saw it once).
    fn holder_of(&self, loser: &str) -> String {
        let mut cur = loser.to_string();
        for _ in 0..64 {
            match self.merges.get(&cur) {
                Some(m) if m.applied && m.winner != cur && m.winner != loser => cur = m.winner.clone(),
                _ => break,
            }
        }
        cur
    }

    /// Records `loser` as the owner of `table`'s rows with `uuids` (or, with `via`, of the rows
    /// of `table` in the `via` rows with those uuids) and points them at HQ person `target`.
    async fn own_rows(&self, conn: &mut Conn, table: &str, uuids: &[Value], loser: &str, target: Option<i64>, via: Option<&str>) -> Result<(), SinkError> {
        let (Some(tm), Some(col)) = (self.model.table(table), SiteMoves::column(table)) else { return Ok(()) };
        if tm.pk.len() != 1 || !tm.columns.iter().any(|c| c.name == col) {
            return Ok(());
        }
        let (t, c, pk) = (q(table), q(col), q(&tm.pk[0]));
        let marks = vec!["?"; uuids.len()].join(",");
        let (from, cond) = match via {
            Some(v) => {
                let Some(vm) = self.model.table(v) else { return Ok(()) };
                let Some(vpk) = vm.pk.first() else { return Ok(()) };
                (format!("{t} r JOIN {vt} v ON v.{vpk} = r.{vpk}", vt = q(v), vpk = q(vpk)), format!("v.uuid IN ({marks})"))
            }
            None => (format!("{t} r"), format!("r.uuid IN ({marks})")),
        };
        let preferred = if tm.columns.iter().any(|c| c.name == "preferred") { "r.preferred" } else { "NULL" };
        let mut params: Vec<Value> = vec![Value::from(moved_key(table, col)), Value::from(loser)];
        params.extend(uuids.iter().cloned());
        conn.exec_drop(format!("INSERT IGNORE INTO omrs_sync_moved (tbl, hq_id, person_uuid, preferred) SELECT ?, r.{pk}, ?, {preferred} FROM {from} WHERE {cond}"), params)
            .await
            .map_err(|e| SinkError::db(format!("recording whose {table} rows a clinic's merge moved"), e))?;
        if let Some(target) = target {
            let mut params: Vec<Value> = vec![Value::from(target)];
            params.extend(uuids.iter().cloned());
            params.push(Value::from(target));
            conn.exec_drop(format!("UPDATE {from} SET r.{c} = ? WHERE {cond} AND r.{c} <> ?"), params)
                .await
                .map_err(|e| SinkError::db(format!("pointing the {table} rows of a clinic's merge at the loser's survivor"), e))?;
        }
        Ok(())
    }
}
