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

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
pub use crate::image::{column_name, FlatIter, FlatRow, Image, RawImage, RawPairs, Row, RowImage};

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
    /// A DDL changed a table: its new shape in `schema`, no row (issue #25, an addition to
    /// DESIGN.md's envelope: docs/ARCHITECTURE.md, "Schema evolution").
    #[serde(rename = "s")]
    Schema,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Heartbeat => "h",
            Op::Schema => "s",
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

/// One row change (or heartbeat) from one site. `R` holds its row images (see [`Image`]):
/// the one decoder of a site record, whatever form a stage reads the images in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound(serialize = "R: Serialize + Image", deserialize = "R: Deserialize<'de> + Image"))]
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
    #[serde(default, skip_serializing_if = "Image::is_empty")]
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
    /// `op:"s"`: the table's shape after a DDL at the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<crate::shape::TableShape>,
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
            schema: None,
        }
    }

    /// A table's new shape after a DDL at a site, at the DDL's binlog position.
    pub fn schema(site: impl Into<String>, shape: crate::shape::TableShape, source: Source, ts_ms: i64) -> Self {
        ChangeEvent { op: Op::Schema, table: Some(shape.table.clone()), schema: Some(shape), ..ChangeEvent::heartbeat(site, source, ts_ms) }
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

impl<R: Image + Serialize> ChangeEvent<R> {
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
        if self.op == Op::Schema {
            return match &self.schema {
                None => bad("a schema event needs `schema`"),
                Some(s) if Some(s.table.as_str()) != self.table.as_deref() => bad("`schema.table` differs from `table`"),
                Some(s) if s.columns.is_empty() && !s.dropped => bad("`schema.columns` is empty"),
                Some(_) if self.before.is_some() || self.after.is_some() => bad("a schema event carries no row images"),
                Some(_) => Ok(()),
            };
        }
        match self.table.as_deref() {
            None | Some("") => return bad("`table` is missing"),
            Some(_) => {}
        }
        if self.key.as_ref().is_none_or(Image::is_empty) {
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
            (Op::Heartbeat | Op::Schema, _, _) => {}
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
    use serde_json::Value as J;
    use std::borrow::Cow;

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
