//! Which uuids HQ may hold, so that a row new to HQ goes in without a lookup first.
//!
//! Before the sink writes a created or snapshot row, it must know whether HQ already has the
//! row's uuid (the change then updates that row, under HQ's id) or not (a new row, under an id
//! the sink gives it). A bulk lookup per batch answers that, and in a cold replay nearly every
//! answer is "not there": those lookups were 15 % of HQ's statement time in stop 54's replay.
//! This filter answers most of them in memory. It holds every uuid of each table in which HQ
//! keeps `uuid` unique, read from HQ on a connection of its own while the sink starts, and every
//! uuid the sink has given an HQ id since. So a uuid it has never seen is not at HQ: the sink is
//! HQ's only writer (docs/OPERATIONS.md). A uuid it may have seen (those at HQ, and about 1 % of
//! the others) is looked up as before, as is every row until the filter has loaded.
//!
//! Delivery guarantee: unchanged, exactly once. A row inserted without a lookup is marked
//! ([`super::StagedRow::unverified`]). If HQ's unique index refuses it, the uuid was there after
//! all (a writer other than the sink), and the batch fails with [`SinkError::UuidTaken`]: it
//! rolls back, and the sink starts again from its stored offsets with that table left out of
//! the filter, its rows looked up as before. Nothing is written twice or lost.

use std::collections::HashSet;
use std::time::Instant;

use fastbloom::BloomFilter;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};

use super::sql::{db, q};
use crate::SinkError;

/// A Bloom filter's false positives: a uuid new to HQ that is still looked up.
const FALSE_POSITIVES: f64 = 0.01;
/// The first layer's size; each next layer is twice the one before.
const FIRST_LAYER: usize = 1 << 20;

/// The uuids HQ may hold, by table ([`self`]).
#[derive(Default)]
pub(crate) struct UuidFilter {
    /// The tables it answers for: a unique index on `uuid` alone, and not left out after a
    /// refused insert. Empty until HQ's uuids have loaded.
    tables: HashSet<String>,
    layers: Vec<Layer>,
}

struct Layer {
    bloom: BloomFilter,
    room: usize,
    held: usize,
}

impl Layer {
    fn new(room: usize) -> Layer {
        Layer { bloom: BloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(room), room, held: 0 }
    }
}

impl UuidFilter {
    /// True when `uuid` of `table` is surely not at HQ (and so neither is its row).
    pub(crate) fn surely_new(&self, table: &str, uuid: &str) -> bool {
        self.tables.contains(table) && !self.layers.iter().any(|l| l.bloom.contains(&(table, uuid)))
    }

    /// Remembers a uuid HQ holds, or is about to hold: the sink has given its row an id.
    pub(crate) fn insert(&mut self, table: &str, uuid: &str) {
        let room = match self.layers.last() {
            Some(l) if l.held < l.room => None,
            Some(l) => Some(l.room * 2),
            None => Some(FIRST_LAYER),
        };
        if let Some(room) = room {
            self.layers.push(Layer::new(room));
        }
        if let Some(l) = self.layers.last_mut() {
            l.bloom.insert(&(table, uuid));
            l.held += 1;
        }
    }

    /// HQ's uuids (this, loaded) with those the sink gave ids meanwhile (`since`).
    pub(crate) fn absorb(&mut self, since: UuidFilter) {
        self.layers.extend(since.layers);
    }

    /// How many uuids it holds, and its size in bytes.
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.layers.iter().map(|l| l.held).sum(), self.layers.iter().map(|l| l.bloom.num_bits() / 8).sum())
    }
}

/// HQ's uuids being read by a task of its own; the task stops when this is dropped.
pub(crate) struct Loading(tokio::task::JoinHandle<()>);

impl Drop for Loading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The filter as it loads: [`super::Applier::with_uuid_filter`] takes it in once it is read.
pub(crate) type Loaded = tokio::sync::oneshot::Receiver<Result<UuidFilter, SinkError>>;

/// Starts reading HQ's uuids on `conn` (a connection of its own), but for `excluded`.
pub(crate) fn spawn_load(mut conn: Conn, database: String, excluded: HashSet<String>) -> (Loading, Loaded) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _ = tx.send(load(&mut conn, &database, &excluded).await);
    });
    (Loading(task), rx)
}

/// Reads every uuid of HQ's tables that keep `uuid` unique, but for `excluded`.
async fn load(conn: &mut Conn, database: &str, excluded: &HashSet<String>) -> Result<UuidFilter, SinkError> {
    let t0 = Instant::now();
    let unique: Vec<(String, Option<u64>)> = conn
        .exec(
            "SELECT s.table_name, MAX(t.table_rows) FROM information_schema.statistics s
             JOIN information_schema.tables t ON t.table_schema = s.table_schema AND t.table_name = s.table_name
             WHERE s.table_schema = ? AND s.non_unique = 0
             GROUP BY s.table_name, s.index_name HAVING COUNT(*) = 1 AND MAX(s.column_name) = 'uuid'",
            (database,),
        )
        .await
        .map_err(db("finding HQ's tables with unique uuids"))?;
    let tables: HashSet<String> = unique.iter().map(|(t, _)| t.clone()).filter(|t| !excluded.contains(t)).collect();
    // The first layer sized for HQ's rows as information_schema estimates them; more layers
    // come as the sink inserts.
    let estimate: u64 = unique.iter().filter(|(t, _)| tables.contains(t)).map(|(_, n)| n.unwrap_or(0)).sum();
    let room = (estimate as usize).saturating_mul(3) / 2;
    let mut f = UuidFilter { tables: HashSet::new(), layers: vec![Layer::new(room.max(FIRST_LAYER))] };
    let mut names: Vec<&String> = tables.iter().collect();
    names.sort();
    for table in names {
        let mut rows = conn.query_iter(format!("SELECT uuid FROM {}", q(table))).await.map_err(db("reading HQ's uuids"))?;
        rows.for_each(|row| {
            if let Some(Value::Bytes(b)) = row.as_ref(0) {
                if let Ok(u) = std::str::from_utf8(b) {
                    f.insert(table, u);
                }
            }
        })
        .await
        .map_err(db("reading HQ's uuids"))?;
    }
    f.tables = tables;
    let (n, bytes) = f.size();
    tracing::info!(tables = f.tables.len(), uuids = n, mib = bytes / (1 << 20), ms = t0.elapsed().as_millis() as u64, "HQ's uuids loaded: rows new to HQ go in without a lookup");
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_never_inserted_is_new_once_its_table_is_covered() {
        let mut f = UuidFilter::default();
        f.insert("obs", "u-1");
        // Not loaded yet: no table is covered, every row is looked up.
        assert!(!f.surely_new("obs", "u-2"));
        let mut loaded = UuidFilter { tables: ["obs".to_string()].into(), layers: vec![Layer::new(16)] };
        loaded.insert("obs", "u-0");
        loaded.absorb(f);
        assert!(!loaded.surely_new("obs", "u-0"), "loaded from HQ");
        assert!(!loaded.surely_new("obs", "u-1"), "given an id by the sink before the load ended");
        assert!(loaded.surely_new("obs", "u-2"));
        // The same uuid in another table is another row; an uncovered table is always looked up.
        assert!(!loaded.surely_new("encounter", "u-2"));
    }

    #[test]
    fn layers_grow_and_keep_every_uuid() {
        let mut f = UuidFilter { tables: ["obs".to_string()].into(), layers: vec![Layer::new(100)] };
        for i in 0..1_000 {
            f.insert("obs", &format!("u-{i}"));
        }
        assert!(f.layers.len() >= 4, "100, 200, 400, 800: {}", f.layers.len());
        assert!((0..1_000).all(|i| !f.surely_new("obs", &format!("u-{i}"))), "no false negative");
        let new = (1_000..11_000).filter(|i| f.surely_new("obs", &format!("u-{i}"))).count();
        assert!(new > 9_500, "about 1 % false positives a layer: {new} of 10,000 found new");
    }
}
