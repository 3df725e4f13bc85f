//! Row versions at HQ: `omrs_sync_version` (one row per row, read in bulk) and the version
//! packs (`omrs_sync_version_pack`), which hold the first versions of a batch's new rows in a
//! few compressed rows instead of one row each.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::hq::RowVersion;

use super::cache::Wanted;
use super::sql::{db, id_list, padded_len};
use super::{Applier, StagedVersion};
use crate::SinkError;

/// 150 bytes each: a pack stays well under the server's max_allowed_packet).
pub(super) const MAX_PACK: usize = 4096;

/// One `omrs_sync_version_pack` row, read back: HQ id → (row key, version).
pub(super) struct Pack {
    pub(super) table: String,
    pub(super) first_id: i64,
    pub(super) last_id: i64,
    pub(super) entries: HashMap<i64, (String, Stored)>,
}

/// The `omrs_sync_version_pack` rows of `packed` (first versions, see [`StagedVersion`]):
/// (table, first HQ id, last HQ id, entries), at most [`MAX_PACK`] entries each. The entries
/// are a JSON array compressed the way MariaDB's `COMPRESS()` does it (the length in 4 bytes,
/// low byte first, then a zlib stream), so that the view reads them with `UNCOMPRESS()`. A
/// batch's obs are about 860 KB of JSON: sent and stored as is, they took HQ 8 ms per batch.
pub(super) fn version_packs(packed: &[&StagedVersion]) -> Vec<(String, i64, i64, Vec<u8>)> {
    let mut by_table: BTreeMap<&str, Vec<&StagedVersion>> = BTreeMap::new();
    for v in packed {
        by_table.entry(v.table.as_str()).or_default().push(v);
    }
    let mut out = Vec::new();
    for (table, mut entries) in by_table {
        entries.sort_by_key(|v| v.stored.hq_id);
        for chunk in entries.chunks(MAX_PACK) {
            let (Some(first), Some(last)) = (chunk.first().and_then(|v| v.stored.hq_id), chunk.last().and_then(|v| v.stored.hq_id)) else { continue };
            let mut json: Vec<u8> = Vec::with_capacity(chunk.len() * 160);
            json.push(b'[');
            for (i, v) in chunk.iter().enumerate() {
                if i > 0 {
                    json.push(b',');
                }
                let s = &v.stored;
                let entry = (s.hq_id, &v.key, s.version.change_ms, s.version.priority, &s.version.site, s.version.commit_ms, &s.version.position, &v.origin, s.hash);
                // Serializing plain values into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut json, &entry);
            }
            json.push(b']');
            let mut packed = Vec::with_capacity(json.len() / 3 + 16);
            packed.extend_from_slice(&(json.len() as u32).to_le_bytes());
            let mut z = flate2::write::ZlibEncoder::new(packed, flate2::Compression::fast());
            // Writing into a Vec cannot fail.
            let _ = std::io::Write::write_all(&mut z, &json);
            out.push((table.to_string(), first, last, z.finish().unwrap_or_default()));
        }
    }
    out
}

/// Inserts version packs ([`version_packs`]); returns their pack ids. A pack stored ahead of
/// its batch (`committed` false) counts only once the batch marks it committed.
pub(super) async fn store_packs(conn: &mut Conn, packs: Vec<(String, i64, i64, Vec<u8>)>, committed: bool) -> Result<Vec<i64>, SinkError> {
    let mut ids = Vec::with_capacity(packs.len());
    for (table, first, last, entries) in packs {
        conn.exec_drop(
            "INSERT INTO omrs_sync_version_pack (tbl, first_id, last_id, entries, committed) VALUES (?, ?, ?, ?, ?)",
            (table, first, last, entries, committed as i64),
        )
        .await
        .map_err(db("writing a version pack"))?;
        ids.extend(conn.last_insert_id().map(|id| id as i64));
    }
    Ok(ids)
}


#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) version: RowVersion,
    pub(super) hash: u64,
    pub(crate) hq_id: Option<i64>,
}

impl Applier {
    pub(super) async fn prefetch_versions(&mut self, conn: &mut Conn, wanted: Wanted<'_>) -> Result<(), SinkError> {
        for (table, keys) in wanted {
            let keys: Vec<&str> = keys.into_iter().filter(|k| !self.versions.contains(&table, k)).collect();
            for chunk in keys.chunks(1000) {
                let width = padded_len(chunk.len(), 1000);
                let marks = vec!["?"; width].join(",");
                let sql = format!(
                    "SELECT row_key, hq_id, change_ms, priority, site, commit_ms, position, content_hash
                     FROM omrs_sync_version WHERE tbl = ? AND row_key IN ({marks})"
                );
                let mut params: Vec<Value> = vec![Value::from(table.as_str())];
                params.extend(chunk.iter().chain(std::iter::repeat_n(&chunk[0], width - chunk.len())).map(|k| Value::from(*k)));
                let rows: Vec<mysql_async::Row> = conn.exec(sql, params).await.map_err(db("reading row versions"))?;
                let mut found = HashSet::new();
                for r in rows {
                    let (Some(key), hq_id, Some(change_ms), Some(priority), Some(site), Some(commit_ms), Some(position), Some(hash)) = (
                        r.get::<String, _>(0),
                        r.get::<Option<i64>, _>(1).flatten(),
                        r.get::<i64, _>(2),
                        r.get::<i32, _>(3),
                        r.get::<String, _>(4),
                        r.get::<i64, _>(5),
                        r.get::<String, _>(6),
                        r.get::<u64, _>(7),
                    ) else {
                        continue;
                    };
                    found.insert(key.clone());
                    let version = RowVersion { change_ms, priority, site, commit_ms, position };
                    self.versions.put((table.clone(), key), Some(Stored { version, hash, hq_id }));
                }
                // Packs hold first versions of uuid-keyed rows only, found by the row's HQ id.
                let packed = self.model.table(&table).is_some_and(|t| t.has_uuid);
                let mut misses = Vec::new();
                for k in chunk {
                    if !found.contains(*k) {
                        self.versions.put((table.clone(), k.to_string()), None);
                        if let Some(id) = self.ids.peek(&table, k).filter(|_| packed) {
                            misses.push((k.to_string(), *id));
                        }
                    }
                }
                if !misses.is_empty() {
                    self.packed_versions(conn, &table, misses).await?;
                }
            }
        }
        Ok(())
    }

    /// Versions of rows at HQ that `omrs_sync_version` does not hold: their first version, in
    /// the pack of the batch that created them, found by the row's HQ id. Those not in a cached
    /// pack are looked up [`PACK_LOOKUPS_PER_TRIP`] at a time: the candidate packs of all of
    /// them in one query, the packs not cached in another (one id a round trip, twice, was
    /// 5,848 queries in 15 s of a cold replay's merge phase; docs/BENCHMARKS.md, "Stop 47").
    pub(super) async fn packed_versions(&mut self, conn: &mut Conn, table: &str, misses: Vec<(String, i64)>) -> Result<(), SinkError> {
        let mut unresolved = Vec::new();
        for (key, id) in misses {
            match self.pack_entry(table, id, &key) {
                Some(stored) => self.versions.put((table.to_string(), key), Some(stored)),
                None => unresolved.push((key, id)),
            }
        }
        let tbl = Value::from(table).as_sql(false);
        for chunk in unresolved.chunks(PACK_LOOKUPS_PER_TRIP) {
            let sql: Vec<String> = chunk
                .iter()
                .map(|(_, id)| {
                    format!("(SELECT pack_id, last_id, {id} FROM omrs_sync_version_pack WHERE tbl = {tbl} AND first_id <= {id} AND committed = 1 ORDER BY first_id DESC LIMIT 8)")
                })
                .collect();
            let candidates: Vec<(i64, i64, i64)> = conn.query(sql.join(" UNION ALL ")).await.map_err(db("finding version packs"))?;
            let wanted: BTreeSet<i64> = candidates.into_iter().filter(|(pack_id, last_id, id)| last_id >= id && !self.packs.contains(pack_id)).map(|(p, _, _)| p).collect();
            let mut fetched: Vec<(i64, Arc<Pack>)> = Vec::new();
            if !wanted.is_empty() {
                let list = id_list(&wanted);
                let rows: Vec<(i64, i64, i64, Vec<u8>)> = conn
                    .query(format!("SELECT pack_id, first_id, last_id, entries FROM omrs_sync_version_pack WHERE pack_id IN ({list})"))
                    .await
                    .map_err(db("reading version packs"))?;
                for (pack_id, first_id, last_id, entries) in rows {
                    fetched.push((pack_id, Arc::new(read_pack(table, pack_id, first_id, last_id, &entries)?)));
                }
            }
            for (key, id) in chunk {
                // The newest pack that holds the row, of those just read and those cached.
                let found = [newest(fetched.iter().map(|(p, pack)| (p, pack)), table, *id, key), newest(self.packs.iter(), table, *id, key)]
                    .into_iter()
                    .flatten()
                    .max_by_key(|(pack_id, _)| *pack_id);
                if let Some((_, stored)) = found {
                    self.versions.put((table.to_string(), key.clone()), Some(stored));
                }
            }
            for (pack_id, pack) in fetched {
                self.packs.put(pack_id, pack);
            }
        }
        Ok(())
    }

    /// The version of row `key` with HQ id `id` in a cached pack (the newest pack if several).
    pub(super) fn pack_entry(&self, table: &str, id: i64, key: &str) -> Option<Stored> {
        newest(self.packs.iter(), table, id, key).map(|(_, s)| s)
    }
}

/// Rows whose candidate packs are looked up in one round trip ([`Applier::packed_versions`]).
const PACK_LOOKUPS_PER_TRIP: usize = 200;

/// Of `packs`, the newest that holds row `key` with HQ id `id`: its id and the row's version.
fn newest<'a>(packs: impl Iterator<Item = (&'a i64, &'a Arc<Pack>)>, table: &str, id: i64, key: &str) -> Option<(i64, Stored)> {
    packs
        .filter(|(_, p)| p.table == table && p.first_id <= id && id <= p.last_id)
        .filter_map(|(pack_id, p)| p.entries.get(&id).filter(|(k, _)| k == key).map(|(_, s)| (*pack_id, s.clone())))
        .max_by_key(|(pack_id, _)| *pack_id)
}

/// A stored `omrs_sync_version_pack` row's entries ([`version_packs`] wrote them).
fn read_pack(table: &str, pack_id: i64, first_id: i64, last_id: i64, entries: &[u8]) -> Result<Pack, SinkError> {
    let bad = |e: String| SinkError::Schema(format!("omrs_sync_version_pack row {pack_id} ({table}) is not a version pack: {e}"));
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(entries.get(4..).unwrap_or_default()), &mut json).map_err(|e| bad(e.to_string()))?;
    let parsed: Vec<(i64, String, i64, i32, String, i64, String, Option<String>, u64)> = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let entries = parsed
        .into_iter()
        .map(|(hq_id, key, change_ms, priority, site, commit_ms, position, _origin, hash)| {
            let version = RowVersion { change_ms, priority, site, commit_ms, position };
            (hq_id, (key, Stored { version, hash, hq_id: Some(hq_id) }))
        })
        .collect();
    Ok(Pack { table: table.to_string(), first_id, last_id, entries })
}
