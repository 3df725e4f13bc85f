//! Foreign key → uuid resolution (`refs` of the envelope).
//!
//! An id→uuid map, learned from every snapshot and binlog row of a table that has a uuid (or
//! shares its key with one that has), answers most lookups; binlog order puts parents before
//! children within a site. A miss is answered by a point query against the site and cached.
//! The map is an LRU bounded by `capacity` entries. A reference that cannot be resolved is
//! sent as null, counted and logged — never invented.

use std::num::NonZeroUsize;

use lru::LruCache;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde_json::Value as J;

use crate::model::Model;
use crate::IngestError;

pub struct Resolver {
    cache: LruCache<(u32, i64), Box<str>>,
    tables: std::collections::HashMap<String, u32>,
    pub hits: u64,
    pub misses: u64,
    pub unresolved: u64,
}

impl Resolver {
    pub fn new(capacity: usize) -> Self {
        Resolver {
            cache: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN)),
            tables: Default::default(),
            hits: 0,
            misses: 0,
            unresolved: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    fn table_id(&mut self, table: &str) -> u32 {
        if let Some(&id) = self.tables.get(table) {
            return id;
        }
        let n = self.tables.len() as u32;
        self.tables.insert(table.to_string(), n);
        n
    }

    /// Remembers the uuid of `table` row `id`.
    pub fn learn(&mut self, table: &str, id: i64, uuid: &str) {
        let t = self.table_id(table);
        self.cache.put((t, id), uuid.into());
    }

    /// The uuid that stands for row `id` of `table`: its own uuid column, or the uuid of the
    /// row whose key it shares (patient → person). None when the row does not exist.
    pub async fn uuid_of(&mut self, model: &Model, conn: &mut Conn, table: &str, id: i64) -> Result<Option<String>, IngestError> {
        let mut table: &str = table;
        // Follow shared keys up to the table that has the uuid (at most a few hops).
        for _ in 0..4 {
            let Some(t) = model.table(table) else { return Ok(None) };
            if t.has_uuid {
                break;
            }
            match &t.shared_parent {
                Some(p) => table = p.as_str(),
                None => return Ok(None),
            }
        }
        let tid = self.table_id(table);
        if let Some(u) = self.cache.get(&(tid, id)) {
            self.hits += 1;
            // An empty entry remembers that the row does not exist.
            return Ok((!u.is_empty()).then(|| u.to_string()));
        }
        self.misses += 1;
        let Some(t) = model.table(table) else { return Ok(None) };
        if !t.has_uuid || t.pk.len() != 1 {
            return Ok(None);
        }
        let sql = format!("SELECT uuid FROM `{}`.`{}` WHERE `{}` = {id}", model.database, table, t.pk[0]);
        let found: Option<String> = conn.query_first(sql).await.map_err(|e| IngestError::site("resolving a foreign key", e))?;
        self.cache.put((tid, id), found.as_deref().unwrap_or("").into());
        Ok(found)
    }

    /// Resolves every FK column of `row` of `table` into `refs` (column → uuid or null).
    pub async fn refs(
        &mut self,
        model: &Model,
        conn: &mut Conn,
        site: &str,
        table: &str,
        row: &serde_json::Map<String, J>,
    ) -> Result<serde_json::Map<String, J>, IngestError> {
        let mut out = serde_json::Map::new();
        let Some(t) = model.table(table) else { return Ok(out) };
        for fk in &t.fks {
            let v = match row.get(&fk.column) {
                None => continue, // scrubbed or not in the image
                Some(J::Null) => J::Null,
                Some(v) => match v.as_i64() {
                    Some(id) => match self.uuid_of(model, conn, &fk.ref_table, id).await? {
                        Some(u) => J::String(u),
                        None => {
                            self.unresolved += 1;
                            omrs_core::metrics::metrics().unresolved_refs.with_label_values(&[site, table]).inc();
                            tracing::warn!(site, table, column = %fk.column, id, ref_table = %fk.ref_table, "foreign key does not resolve to a uuid; sent as null");
                            J::Null
                        }
                    },
                    None => J::Null,
                },
            };
            out.insert(fk.column.clone(), v);
        }
        Ok(out)
    }
}
