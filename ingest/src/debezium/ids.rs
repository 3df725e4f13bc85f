//! The clinic's id → uuid map, learned from the Debezium stream itself (the input has no
//! connection to the clinic to ask): the rows of every table that a foreign key points to, or
//! whose key another table shares (`patient` → `person`).
//!
//! What the input learns from the records it sends is saved beside its checkpoint, in the same
//! Kafka transaction (`ids:<table>:<n>` records of `[[id,"uuid"],…]` in the site's checkpoint
//! topic), so a restart reads the map back instead of the clinic's whole history. A uuid in its
//! usual 36-character form is kept in 16 bytes.

use std::collections::HashMap;

use omrs_core::model::Model;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Uuid {
    Packed(u128),
    Text(Box<str>),
}

impl Uuid {
    fn new(s: &str) -> Uuid {
        let b = s.as_bytes();
        let dashes = b.len() == 36 && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-');
        let lower = s.bytes().all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        if dashes && lower {
            if let Ok(n) = u128::from_str_radix(&s.replace('-', ""), 16) {
                return Uuid::Packed(n);
            }
        }
        Uuid::Text(s.into())
    }

    fn text(&self) -> String {
        match self {
            Uuid::Text(s) => s.to_string(),
            Uuid::Packed(n) => {
                let h = format!("{n:032x}");
                format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
            }
        }
    }
}

#[derive(Default)]
pub struct Ids {
    /// Each row's uuid, and whether it was saved (learned from a record the input sent).
    map: HashMap<(u32, i64), (Uuid, bool)>,
    tables: HashMap<String, u32>,
    /// Learned since the last [`Ids::take_fresh`], per table, to be saved.
    fresh: HashMap<String, Vec<(i64, String)>>,
    saved: u64,
}

impl Ids {
    fn table_id(&mut self, table: &str) -> u32 {
        let n = self.tables.len() as u32;
        *self.tables.entry(table.to_string()).or_insert(n)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Row `id` of `table` has `uuid`, read from a record the input sends (`save`: to be saved
    /// with its transaction, unless it was already) or only read ahead (not saved: it is read
    /// ahead again after a restart). Returns true when that is news.
    pub fn learn(&mut self, table: &str, id: i64, uuid: &str, save: bool) -> bool {
        let t = self.table_id(table);
        let u = Uuid::new(uuid);
        match self.map.get_mut(&(t, id)) {
            Some((known, saved)) if *known == u => {
                if save && !*saved {
                    *saved = true;
                    self.fresh.entry(table.to_string()).or_default().push((id, uuid.to_string()));
                }
                false
            }
            _ => {
                self.map.insert((t, id), (u, save));
                if save {
                    self.fresh.entry(table.to_string()).or_default().push((id, uuid.to_string()));
                }
                true
            }
        }
    }

    /// The uuid of row `id` of `table` itself (not following shared keys).
    pub fn get(&self, table: &str, id: i64) -> Option<String> {
        let t = *self.tables.get(table)?;
        self.map.get(&(t, id)).map(|(u, _)| u.text())
    }

    /// The uuid that stands for row `id` of `table`: its own, or that of the row whose key it
    /// shares (patient → person), following the model.
    pub fn uuid_of(&self, model: &Model, table: &str, id: i64) -> Option<String> {
        let mut table = table;
        for _ in 0..4 {
            let t = model.table(table)?;
            if t.has_uuid {
                return self.get(table, id);
            }
            table = t.shared_parent.as_deref()?;
        }
        None
    }

    /// What was learned since the last call, as checkpoint-topic records.
    pub fn take_fresh(&mut self, site: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for (table, rows) in self.fresh.drain() {
            self.saved += 1;
            // Unique among this site's records: the time and a counter.
            let key = format!("ids:{table}:{}-{}", omrs_core::clock::now_ms(), self.saved);
            let value = serde_json::to_vec(&rows).unwrap_or_default();
            tracing::trace!(site, table = %table, rows = rows.len(), "saving learned ids");
            out.push((key.into_bytes(), value));
        }
        out
    }

    /// Reads back one `ids:` record of the checkpoint topic.
    pub fn load(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let key = std::str::from_utf8(key).map_err(|_| "an ids record key that is not UTF-8".to_string())?;
        let table = key.strip_prefix("ids:").and_then(|k| k.rsplit_once(':')).map(|(t, _)| t).ok_or_else(|| format!("`{key}` is not an ids record"))?;
        let rows: Vec<(i64, String)> = serde_json::from_slice(value).map_err(|e| format!("ids record `{key}`: {e}"))?;
        for (id, uuid) in rows {
            let t = self.table_id(table);
            self.map.insert((t, id), (Uuid::new(&uuid), true));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_packed_or_not() {
        let mut ids = Ids::default();
        for (id, u) in [(1, "1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"), (2, "1000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), (3, "ABC-not-a-uuid")] {
            assert!(ids.learn("person", id, u, true));
            assert_eq!(ids.get("person", id).as_deref(), Some(u));
        }
        assert!(!ids.learn("person", 1, "1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1", true), "known already");
        // Read ahead, then sent: saved once, when sent.
        assert!(ids.learn("person", 4, "2ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1", false));
        assert!(!ids.learn("person", 4, "2ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1", true));
        assert!(!ids.learn("person", 4, "2ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1", true));
        let saved = ids.take_fresh("site-a");
        assert_eq!(saved.len(), 1);
        let mut back = Ids::default();
        back.load(&saved[0].0, &saved[0].1).unwrap();
        assert_eq!(back.get("person", 2).as_deref(), Some("1000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        assert_eq!(back.len(), 4);
        assert_eq!(back.get("person", 4).as_deref(), Some("2ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"));
        assert!(back.take_fresh("site-a").is_empty(), "what is read back is not saved again");
    }
}
