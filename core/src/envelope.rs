//! The change event: one JSON object per row change, Debezium-shaped (DESIGN.md, "The change event").
//!
//! ```json
//! {"op":"u","site":"site-a","table":"encounter","key":{"encounter_id":123},"uuid":"…",
//!  "before":{…},"after":{…},"refs":{"patient_id":"<person uuid>"},
//!  "source":{"server_id":11,"gtid":"0-11-42","file":"binlog.000003","pos":1234,"row":0,
//!            "ts_ms":1700000000000,"snapshot":false},
//!  "ts_ms":1700000000123}
//! ```
//!
//! A heartbeat (`"op":"h"`) carries only `site`, `source` and `ts_ms`; it moves the site's
//! watermark when the site is quiet. [`ChangeEvent::validate`] enforces the per-op shape, so a
//! consumer can dead-letter a malformed record with a precise reason.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::error::{CoreError, Result};

/// A row image: column name → value, in table column order.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// What a reader of a row image needs from it, whatever holds it: [`Row`] (a JSON map) or
/// [`FlatRow`] (pairs in order). [`ChangeEvent`] is generic over it.
pub trait RowImage: Default {
    /// The value of a column.
    fn get(&self, col: &str) -> Option<&J>;
    /// No columns.
    fn is_empty(&self) -> bool;
}

impl RowImage for Row {
    fn get(&self, col: &str) -> Option<&J> {
        serde_json::Map::get(self, col)
    }
    fn is_empty(&self) -> bool {
        serde_json::Map::is_empty(self)
    }
}

/// A row image as (column, value) pairs in the order they came, with the same JSON form and
/// the same meaning as [`Row`] (a repeated column keeps its first place and its last value).
///
/// It is for a reader that decodes many events and looks at each column once or twice: the
/// HQ sink. Decoding builds no hash map per image, and a column name is a `&'static str`
/// shared by every image ([`column_name`]) instead of a `String` per image. A lookup by name
/// is a scan, which for an OpenMRS row (at most a few dozen columns) is as fast as hashing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatRow(Vec<(Cow<'static, str>, J)>);

impl FlatRow {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The value of a column.
    pub fn get(&self, col: &str) -> Option<&J> {
        self.0.iter().find(|(k, _)| k == col).map(|(_, v)| v)
    }
    /// The columns and their values, in order.
    pub fn iter(&self) -> FlatIter<'_> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

/// The iterator of [`FlatRow::iter`].
pub type FlatIter<'a> = std::iter::Map<std::slice::Iter<'a, (Cow<'static, str>, J)>, fn(&'a (Cow<'static, str>, J)) -> (&'a str, &'a J)>;

impl<'a> IntoIterator for &'a FlatRow {
    type Item = (&'a str, &'a J);
    type IntoIter = FlatIter<'a>;
    fn into_iter(self) -> FlatIter<'a> {
        self.iter()
    }
}

impl RowImage for FlatRow {
    fn get(&self, col: &str) -> Option<&J> {
        FlatRow::get(self, col)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&Row> for FlatRow {
    fn from(r: &Row) -> Self {
        FlatRow(r.iter().map(|(k, v)| (column_name(k), v.clone())).collect())
    }
}

impl Serialize for FlatRow {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k.as_ref(), v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for FlatRow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Image;
        impl<'de> Visitor<'de> for Image {
            type Value = FlatRow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row image (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<FlatRow, A::Error> {
                let mut pairs: Vec<(Cow<'static, str>, J)> = Vec::with_capacity(m.size_hint().unwrap_or(16));
                while let Some(k) = m.next_key_seed(Name)? {
                    let v: J = m.next_value()?;
                    match pairs.iter_mut().find(|(c, _)| *c == k) {
                        Some(e) => e.1 = v,
                        None => pairs.push((k, v)),
                    }
                }
                Ok(FlatRow(pairs))
            }
        }
        d.deserialize_map(Image)
    }
}

/// A column name read straight into [`column_name`], without a `String` in between.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'static, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cow<'static, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Self::Value, E> {
                Ok(column_name(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// At most this many distinct column names are shared; past it (a schema cannot have that many,
/// so only bad input gets there) each image has its own copy.
const MAX_SHARED_NAMES: usize = 20_000;
/// Names longer than this are never shared (MariaDB's limit is 64 characters).
const MAX_SHARED_NAME_LEN: usize = 128;

static SHARED_NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

thread_local! {
    static LOCAL_NAMES: std::cell::RefCell<hashbrown::HashSet<&'static str>> = std::cell::RefCell::new(hashbrown::HashSet::new());
}

/// A column name shared by every row image: the same `&'static str` for the same name, from a
/// per-thread set in front of a process-wide one. The names are kept for the life of the
/// process: a schema's column names are a small, fixed set (a few thousand for OpenMRS), and
/// [`MAX_SHARED_NAMES`] bounds them against bad input.
pub fn column_name(s: &str) -> Cow<'static, str> {
    if s.len() > MAX_SHARED_NAME_LEN {
        return Cow::Owned(s.to_string());
    }
    if let Some(name) = LOCAL_NAMES.with(|l| l.borrow().get(s).copied()) {
        return Cow::Borrowed(name);
    }
    let shared = {
        let mut g = SHARED_NAMES.lock().unwrap_or_else(|p| p.into_inner());
        let set = g.get_or_insert_with(HashSet::new);
        match set.get(s) {
            Some(name) => Some(*name),
            None if set.len() < MAX_SHARED_NAMES => {
                let name: &'static str = Box::leak(s.to_string().into_boxed_str());
                set.insert(name);
                Some(name)
            }
            None => None,
        }
    };
    match shared {
        Some(name) => {
            LOCAL_NAMES.with(|l| l.borrow_mut().insert(name));
            Cow::Borrowed(name)
        }
        None => Cow::Owned(s.to_string()),
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Insert.
    #[serde(rename = "c")]
    Create,
    /// Update.
    #[serde(rename = "u")]
    Update,
    /// Delete.
    #[serde(rename = "d")]
    Delete,
    /// Read by the initial snapshot.
    #[serde(rename = "r")]
    Read,
    /// Heartbeat of a quiet site: no row, only a position and a time.
    #[serde(rename = "h")]
    Heartbeat,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Heartbeat => "h",
        }
    }
}

/// Where in the site's binlog (or snapshot) the change comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The site server's `server_id`.
    pub server_id: u32,
    /// MariaDB GTID `domain-server-seq` of the transaction, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// Binlog file of the transaction (for a snapshot: the snapshot's binlog position).
    pub file: String,
    /// Binlog position of the transaction's event.
    pub pos: u64,
    /// Index of the row within its binlog event (or snapshot chunk).
    #[serde(default)]
    pub row: u32,
    /// Commit time at the site, in ms since the epoch: the event time.
    pub ts_ms: i64,
    /// True for `op:"r"` snapshot reads.
    #[serde(default)]
    pub snapshot: bool,
}

/// One row change (or heartbeat) from one site. `R` holds its row images: [`Row`] for every
/// stage but the HQ sink, which reads them as [`FlatRow`]s (the same JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound(serialize = "R: Serialize + RowImage", deserialize = "R: Deserialize<'de> + RowImage"))]
pub struct ChangeEvent<R = Row> {
    pub op: Op,
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Primary key columns and their site-local values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<R>,
    /// The row's uuid, or the uuid of the row whose key it shares (`patient` → `person`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default)]
    pub before: Option<R>,
    #[serde(default)]
    pub after: Option<R>,
    /// Every foreign-key column resolved to the uuid of the row it points to (null when the
    /// column is null).
    #[serde(default, skip_serializing_if = "RowImage::is_empty")]
    pub refs: R,
    pub source: Source,
    /// When the event was produced (processing time), ms since the epoch.
    pub ts_ms: i64,
    /// Set by the agent on a row change whose event would have been larger than a site event
    /// may be ([`MAX_SITE_EVENT_BYTES`]): the event's size. Such an event carries no row images
    /// and no refs; the transform dead-letters it with its site, table, key and position, and
    /// the site's stream goes on (an addition to DESIGN.md's envelope: docs/ARCHITECTURE.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversize: Option<u64>,
}

/// The largest change event an agent produces: under the transform's limit for a change that
/// must still fit `omrs.hq.changes` once wrapped (`omrs_core::topics::MAX_CHANGE_BYTES`).
pub const MAX_SITE_EVENT_BYTES: usize = 8_000_000;

impl ChangeEvent {
    /// A heartbeat for a quiet site at a binlog position.
    pub fn heartbeat(site: impl Into<String>, source: Source, ts_ms: i64) -> Self {
        ChangeEvent {
            op: Op::Heartbeat,
            site: site.into(),
            table: None,
            key: None,
            uuid: None,
            before: None,
            after: None,
            refs: serde_json::Map::new(),
            source,
            ts_ms,
            oversize: None,
        }
    }

    /// The stand-in for a row change too large to send: everything but the images and refs,
    /// with the size it would have had.
    pub fn oversize_stub(&self, bytes: usize) -> ChangeEvent {
        ChangeEvent { before: None, after: None, refs: serde_json::Map::new(), oversize: Some(bytes as u64), ..self.clone() }
    }

    /// Parses and validates one record value.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let ev: ChangeEvent =
            serde_json::from_slice(bytes).map_err(|e| CoreError::Envelope(e.to_string()))?;
        ev.validate()?;
        Ok(ev)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain maps and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

}

impl<R: RowImage + Serialize> ChangeEvent<R> {
    /// The event time: the commit time at the site.
    pub fn event_time_ms(&self) -> i64 {
        self.source.ts_ms
    }

    /// Checks the per-op shape of the envelope.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(CoreError::Envelope(format!(
                "op `{}` from site `{}`{}: {what}",
                self.op.as_str(),
                self.site,
                self.table.as_deref().map(|t| format!(", table `{t}`")).unwrap_or_default()
            )))
        };
        if self.site.is_empty() {
            return bad("`site` is empty");
        }
        if self.op == Op::Heartbeat {
            if self.table.is_some() || self.before.is_some() || self.after.is_some() {
                return bad("a heartbeat carries no table or row images");
            }
            return Ok(());
        }
        match self.table.as_deref() {
            None | Some("") => return bad("`table` is missing"),
            Some(_) => {}
        }
        if self.key.as_ref().is_none_or(RowImage::is_empty) {
            return bad("`key` is missing or empty");
        }
        if let Some(bytes) = self.oversize {
            let key = serde_json::to_string(&self.key).unwrap_or_default();
            return bad(&format!(
                "row too large: its change event was {bytes} bytes, over the {MAX_SITE_EVENT_BYTES} bytes a site event may have, so the agent sent it without its row images; the row is still at the site (key {key}{}, binlog {}:{})",
                self.uuid.as_deref().map(|u| format!(", uuid {u}")).unwrap_or_default(),
                self.source.file,
                self.source.pos
            ));
        }
        match (self.op, self.before.is_some(), self.after.is_some()) {
            (Op::Create | Op::Read, false, true) => {}
            (Op::Create | Op::Read, _, _) => return bad("needs `after` and no `before`"),
            (Op::Update, true, true) => {}
            (Op::Update, _, _) => return bad("needs both `before` and `after`"),
            (Op::Delete, true, false) => {}
            (Op::Delete, _, _) => return bad("needs `before` and no `after`"),
            (Op::Heartbeat, _, _) => {}
        }
        if (self.op == Op::Read) != self.source.snapshot {
            return bad("`source.snapshot` must be true exactly for op `r`");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> Source {
        Source {
            server_id: 11,
            gtid: None,
            file: "binlog.000001".into(),
            pos: 4,
            row: 0,
            ts_ms: 1,
            snapshot: false,
        }
    }

    #[test]
    fn heartbeat_is_valid_and_minimal() {
        let hb = ChangeEvent::heartbeat("site-a", src(), 2);
        hb.validate().unwrap();
        let json = String::from_utf8(hb.to_json()).unwrap();
        assert!(json.starts_with(r#"{"op":"h","site":"site-a""#), "{json}");
        assert!(!json.contains("table"));
    }

    #[test]
    fn flat_rows_read_as_maps_do() {
        // Order kept, a repeated column keeps its first place and its last value (as a map),
        // escaped names and values decoded.
        let json = r#"{"b":1,"a\u0062":"x \"y\"","b":2,"c":null,"d":{"e":[1,2]}}"#;
        let flat: FlatRow = serde_json::from_str(json).unwrap();
        let map: Row = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&flat).unwrap(), serde_json::to_string(&map).unwrap());
        assert_eq!(flat.len(), 4);
        assert_eq!(flat.get("b"), Some(&J::from(2)));
        assert_eq!(flat.get("ab"), Some(&J::from("x \"y\"")));
        assert_eq!(flat.get("zz"), None);
        assert_eq!(flat.iter().map(|(k, _)| k).collect::<Vec<_>>(), map.keys().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(FlatRow::from(&map), flat);
        // Not an object: refused.
        assert!(serde_json::from_str::<FlatRow>("[1]").is_err());
        // The same name is the same shared text.
        let (a, b) = (column_name("person_id"), column_name(&String::from("person_id")));
        assert!(matches!((&a, &b), (Cow::Borrowed(x), Cow::Borrowed(y)) if std::ptr::eq(*x, *y)));
        // A change event reads the same either way.
        let ev = r#"{"op":"c","site":"s","table":"obs","key":{"obs_id":1},"uuid":"u","after":{"obs_id":1,"date_created":"2026-01-01 00:00:00"},"refs":{"person_id":"p"},"source":{"server_id":1,"file":"f","pos":4,"ts_ms":1},"ts_ms":2}"#;
        let flat: ChangeEvent<FlatRow> = serde_json::from_str(ev).unwrap();
        let map: ChangeEvent = serde_json::from_str(ev).unwrap();
        flat.validate().unwrap();
        assert_eq!(serde_json::to_string(&flat).unwrap(), serde_json::to_string(&map).unwrap());
        let unknown = r#"{"op":"c","site":"s","extra":1,"source":{"server_id":1,"file":"f","pos":4,"ts_ms":1},"ts_ms":2}"#;
        assert!(serde_json::from_str::<ChangeEvent<FlatRow>>(unknown).unwrap_err().to_string().contains("extra"));
    }

    #[test]
    fn update_without_before_is_rejected_with_reason() {
        let mut ev = ChangeEvent::heartbeat("site-a", src(), 2);
        ev.op = Op::Update;
        ev.table = Some("person".into());
        let mut key = Row::new();
        key.insert("person_id".into(), 7.into());
        ev.key = Some(key);
        ev.after = Some(Row::new());
        let err = ev.validate().unwrap_err().to_string();
        assert!(err.contains("needs both `before` and `after`"), "{err}");
        assert!(err.contains("table `person`"), "{err}");
    }
}
