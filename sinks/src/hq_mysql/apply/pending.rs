//! The FK pending store: rows that wait for a row they reference to reach HQ
//! (`omrs_sync_pending`).

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};

use std::collections::BTreeMap;

use super::cache::{TKey, Tk};
use super::sql::db;
use crate::SinkError;

/// A row parked in the pending store: the change, and the (table, key) it waits for.
#[derive(Debug, Clone)]
pub(crate) struct PendingEntry {
    pub(crate) tbl: String,
    pub(crate) row_key: String,
    pub(crate) waits: (String, String),
    pub(crate) first_seen_ms: i64,
    pub(crate) offset: i64,
    pub(crate) partition: i32,
    /// The change record, as JSON.
    pub(crate) event: String,
}

/// Pending store changes: rows woken or expired leave `omrs_sync_pending`, rows parked join it.
pub(super) async fn write_pending(conn: &mut Conn, delete: &[i64], insert: &[(i64, PendingEntry)]) -> Result<(), SinkError> {
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

/// The parked rows in memory, as `omrs_sync_pending` holds them once the batch commits, with two
/// indexes kept in step with them: by the row each waits for, and by the row each is a change
/// of (a later change of a parked row queues behind it).
///
/// Invariants: every id of `waits` and every count of `rows` stands for entries of `entries`,
/// and nothing else; an entry leaves all three at once.
#[derive(Debug, Default)]
pub(super) struct PendingStore {
    entries: BTreeMap<i64, PendingEntry>,
    waits: hashbrown::HashMap<TKey, Vec<i64>>,
    rows: hashbrown::HashMap<TKey, usize>,
}

impl PendingStore {
    /// The rows parked at HQ (`omrs_sync_pending`), and the next free pending id.
    pub(super) async fn load(conn: &mut Conn) -> Result<(PendingStore, i64), SinkError> {
        let rows: Vec<(i64, String, String, String, String, i64, i64, i32, String)> = conn
            .query(
                "SELECT pending_id, tbl, row_key, waits_for_table, waits_for_key, first_seen_ms, source_offset, 0, event
                 FROM omrs_sync_pending ORDER BY pending_id",
            )
            .await
            .map_err(db("reading omrs_sync_pending"))?;
        let mut store = PendingStore::default();
        let mut next = 1;
        for (id, tbl, row_key, wt, wk, first_seen_ms, offset, partition, event) in rows {
            store.add(id, PendingEntry { tbl, row_key, waits: (wt, wk), first_seen_ms, offset, partition, event });
            next = next.max(id + 1);
        }
        Ok((store, next))
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// When the longest-waiting row was first seen.
    pub(super) fn oldest_ms(&self) -> Option<i64> {
        self.entries.values().map(|p| p.first_seen_ms).min()
    }

    pub(super) fn add(&mut self, id: i64, p: PendingEntry) {
        self.waits.entry(p.waits.clone()).or_default().push(id);
        *self.rows.entry((p.tbl.clone(), p.row_key.clone())).or_default() += 1;
        self.entries.insert(id, p);
    }

    pub(super) fn take(&mut self, id: i64) -> Option<PendingEntry> {
        let p = self.entries.remove(&id)?;
        if let Some(v) = self.waits.get_mut(&p.waits) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                self.waits.remove(&p.waits);
            }
        }
        let k = Tk(&p.tbl, &p.row_key);
        if let Some(n) = self.rows.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.rows.remove(&k);
            }
        }
        Some(p)
    }

    /// The ids of the rows that wait for (table, key), in the order they were parked.
    pub(super) fn waiting_for(&self, table: &str, key: &str) -> Vec<i64> {
        self.waits.get(&Tk(table, key)).cloned().unwrap_or_default()
    }

    /// Some change of row (table, key) is parked.
    pub(super) fn holds_row(&self, table: &str, key: &str) -> bool {
        self.rows.contains_key(&Tk(table, key))
    }

    /// The ids of the rows first seen before `cutoff_ms`.
    pub(super) fn seen_before(&self, cutoff_ms: i64) -> Vec<i64> {
        self.entries.iter().filter(|(_, p)| p.first_seen_ms < cutoff_ms).map(|(id, _)| *id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: &str, key: &str, waits: (&str, &str), seen: i64) -> PendingEntry {
        PendingEntry {
            tbl: table.into(),
            row_key: key.into(),
            waits: (waits.0.into(), waits.1.into()),
            first_seen_ms: seen,
            offset: seen,
            partition: 0,
            event: String::new(),
        }
    }

    #[test]
    fn the_indexes_follow_every_entry_in_and_out() {
        let mut s = PendingStore::default();
        s.add(1, entry("obs", "o-1", ("encounter", "e-1"), 10));
        s.add(2, entry("obs", "o-2", ("encounter", "e-1"), 20));
        // A later change of o-1, queued behind the first: it waits for o-1 itself.
        s.add(3, entry("obs", "o-1", ("obs", "o-1"), 30));
        assert_eq!((s.len(), s.oldest_ms()), (3, Some(10)));
        assert_eq!(s.waiting_for("encounter", "e-1"), vec![1, 2]);
        assert!(s.holds_row("obs", "o-1") && s.holds_row("obs", "o-2") && !s.holds_row("encounter", "e-1"));
        assert_eq!(s.seen_before(25), vec![1, 2]);

        assert_eq!(s.take(1).map(|p| p.row_key), Some("o-1".to_string()));
        assert_eq!(s.waiting_for("encounter", "e-1"), vec![2]);
        assert!(s.holds_row("obs", "o-1"), "its later change is still parked");
        assert_eq!(s.take(1).map(|p| p.row_key), None, "taken once");
        s.take(3);
        assert!(!s.holds_row("obs", "o-1"));
        s.take(2);
        assert_eq!((s.len(), s.oldest_ms()), (0, None));
        assert!(s.waiting_for("encounter", "e-1").is_empty());
        assert!(s.waits.is_empty() && s.rows.is_empty(), "nothing is left in the indexes");
    }
}
