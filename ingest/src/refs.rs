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

use omrs_core::model::Model;
use crate::IngestError;

/// The table whose uuid column answers a lookup (see [`Resolver::target`]).
#[derive(Debug, Clone)]
pub struct Target {
    id: u32,
    pub table: String,
}

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

    /// The resolver's small integer id of `table`, stable for the resolver's lifetime.
    pub fn table_id(&mut self, table: &str) -> u32 {
        if let Some(&id) = self.tables.get(table) {
            return id;
        }
        let n = self.tables.len() as u32;
        self.tables.insert(table.to_string(), n);
        n
    }

    /// Remembers the uuid of row `id` of a table, by the table's id ([`Resolver::table_id`]).
    pub fn learn_id(&mut self, table_id: u32, id: i64, uuid: &str) {
        self.cache.put((table_id, id), uuid.into());
    }

    /// Where the uuid of a row of `table` is looked up: the table itself, or the table whose
    /// key it shares. None when the chain leaves the model (the uuid is then unknown).
    pub fn target(&mut self, model: &Model, table: &str) -> Option<Target> {
        let mut table: &str = table;
        // Follow shared keys up to the table that has the uuid (at most a few hops).
        for _ in 0..4 {
            let t = model.table(table)?;
            if t.has_uuid {
                break;
            }
            table = t.shared_parent.as_deref()?;
        }
        Some(Target { id: self.table_id(table), table: table.to_string() })
    }

    /// The cached answer for row `id` of `target`: `Some(Some(uuid))`, `Some(None)` when the
    /// row is known not to exist, None on a miss (then [`Resolver::fetch`]).
    pub fn cached(&mut self, target: &Target, id: i64) -> Option<Option<&str>> {
        let u = self.cache.get(&(target.id, id))?;
        self.hits += 1;
        // An empty entry remembers that the row does not exist.
        Some((!u.is_empty()).then_some(&**u))
    }

    /// Asks the site for the uuid of row `id` of `target` after a cache miss, and caches it.
    pub async fn fetch(&mut self, model: &Model, conn: &mut Conn, target: &Target, id: i64) -> Result<Option<String>, IngestError> {
        self.misses += 1;
        let Some(t) = model.table(&target.table) else { return Ok(None) };
        if !t.has_uuid || t.pk.len() != 1 {
            return Ok(None);
        }
        let sql = format!("SELECT uuid FROM `{}`.`{}` WHERE `{}` = {id}", model.database, target.table, t.pk[0]);
        let found: Option<String> = conn.query_first(sql).await.map_err(|e| IngestError::site("resolving a foreign key", e))?;
        self.cache.put((target.id, id), found.as_deref().unwrap_or("").into());
        Ok(found)
    }
}
