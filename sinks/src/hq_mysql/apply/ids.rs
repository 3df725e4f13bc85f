//! HQ ids by uuid: bulk lookups into the id cache, and the ids the sink gives new rows.

use std::collections::HashSet;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};

use super::cache::{wanted, Tk, Wanted};
use super::sql::{db, padded_len, q};
use super::Applier;
use crate::SinkError;

impl Applier {
    /// Fills the id cache for (table, uuid) pairs in bulk.
    pub(super) async fn prefetch_ids(&mut self, conn: &mut Conn, wanted: Wanted<'_>) -> Result<(), SinkError> {
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
    pub(super) fn known_new(&self, table: &str, key: &str) -> bool {
        let q = Tk(table, key);
        self.absent.contains(&q) && !self.tombstones.contains(&q)
    }

    /// The HQ id of the row of `table` that `uuid` stands for, if it is at HQ.
    pub(super) async fn lookup_id(&mut self, conn: &mut Conn, table: &str, uuid: &str) -> Result<Option<i64>, SinkError> {
        if let Some(id) = self.ids.get(table, uuid) {
            return Ok(Some(*id));
        }
        if self.absent.contains(&Tk(table, uuid)) {
            return Ok(None);
        }
        self.prefetch_ids(conn, wanted(table, [uuid])).await?;
        Ok(self.ids.get(table, uuid).copied())
    }

    pub(super) async fn allocate(&mut self, conn: &mut Conn, table: &str, pk: &str) -> Result<i64, SinkError> {
        if !self.next_id.contains_key(table) {
            let max: Option<Option<i64>> =
                conn.query_first(format!("SELECT MAX({}) FROM {}", q(pk), q(table))).await.map_err(db("reading the next HQ id"))?;
            self.next_id.insert(table.to_string(), max.flatten().unwrap_or(0) + 1);
        }
        // (Looked up by `&str`: a new row costs no allocation here.)
        let n = self.next_id.entry_ref(table).or_insert(1);
        let id = *n;
        *n += 1;
        Ok(id)
    }
}

