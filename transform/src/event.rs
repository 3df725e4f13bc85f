//! Input events as the transform holds them, and the `omrs.hq.changes` change records it writes.
//!
//! The engine needs only a few fields of an event (op, site, table, uuid, refs, source), so an
//! input record is parsed once into [`InEvent`]: those fields decoded, the row images (`key`,
//! `before`, `after`) validated as JSON but kept as the record's raw bytes. The output record is
//! written by splicing those bytes back in, instead of building and re-serialising a map per
//! row. The output is the same JSON as serialising [`omrs_core::hq::HqEvent::Change`] (same
//! fields, same values; `to_hq` parses it back, and the tests compare both ways).
//!
//! Delivery guarantee: this module only parses and writes; exactly once is the runner's
//! transaction (see the crate docs).

use std::fmt;
use std::sync::Arc;

use omrs_core::envelope::{ChangeEvent, FlatRow, Image, Op, RawImage, RawPairs, Source};
use omrs_core::error::CoreError;
use omrs_core::hq::HqEvent;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value as J;

/// An event's `refs`: column → uuid (or null), in record order. A few entries, so a vector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Refs(pub Vec<(String, J)>);

impl Refs {
    pub fn get(&self, col: &str) -> Option<&J> {
        self.0.iter().find(|(c, _)| c == col).map(|(_, v)| v)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Refs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Refs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Refs, A::Error> {
                let mut v: Vec<(String, J)> = Vec::with_capacity(m.size_hint().unwrap_or(4));
                while let Some((k, val)) = m.next_entry::<String, J>()? {
                    // As a JSON map: a repeated column keeps its place and takes the last value.
                    match v.iter_mut().find(|(c, _)| *c == k) {
                        Some(e) => e.1 = val,
                        None => v.push((k, val)),
                    }
                }
                Ok(Refs(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for Refs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A byte range of [`InEvent::raw`].
type Span = (u32, u32);

/// One input change event (or heartbeat), validated.
#[derive(Debug, Clone)]
pub struct InEvent {
    pub op: Op,
    pub site: Arc<str>,
    pub table: Option<Box<str>>,
    pub uuid: Option<String>,
    pub refs: Refs,
    pub source: Source,
    pub ts_ms: i64,
    /// The record's bytes, holding the row images; empty for a heartbeat.
    raw: Box<[u8]>,
    key: Option<Span>,
    before: Option<Span>,
    after: Option<Span>,
    /// `op:"s"`: the table's new shape (rare: boxed).
    pub schema: Option<Box<omrs_core::shape::TableShape>>,
}

/// A parsed record, before it owns its bytes.
struct Parts {
    op: Op,
    site: Arc<str>,
    table: Option<Box<str>>,
    uuid: Option<String>,
    refs: Refs,
    source: Source,
    ts_ms: i64,
    key: Option<Span>,
    before: Option<Span>,
    after: Option<Span>,
    schema: Option<Box<omrs_core::shape::TableShape>>,
}

impl Parts {
    fn into_event(self, raw: Box<[u8]>) -> InEvent {
        // A heartbeat or a schema event keeps no bytes.
        let raw = if matches!(self.op, Op::Heartbeat | Op::Schema) { Box::default() } else { raw };
        InEvent {
            op: self.op,
            site: self.site,
            table: self.table,
            uuid: self.uuid,
            refs: self.refs,
            source: self.source,
            ts_ms: self.ts_ms,
            raw,
            key: self.key,
            before: self.before,
            after: self.after,
            schema: self.schema,
        }
    }
}

impl InEvent {
    /// Parses and validates one record from site `site`'s topic (core's decoder, row images
    /// kept as raw JSON). Err is the dead-letter reason, as [`ChangeEvent::from_json`] gives it.
    pub fn decode(payload: &[u8], site: &Arc<str>, topic: &str) -> Result<InEvent, String> {
        let p = Self::parse(payload, site).map_err(|e| e.to_string())?;
        if *p.site != **site {
            return Err(format!("unknown site `{}` on topic {topic} (expected `{site}`)", p.site));
        }
        Ok(p.into_event(payload.into()))
    }

    /// Parses a record into owned fields and the spans of its row images.
    fn parse(payload: &[u8], site: &Arc<str>) -> Result<Parts, CoreError> {
        let w: ChangeEvent<RawImage<'_>> = serde_json::from_slice(payload).map_err(|e| CoreError::Envelope(e.to_string()))?;
        w.validate()?;
        let site = if w.site == **site { site.clone() } else { Arc::from(w.site.as_str()) };
        if w.op == Op::Heartbeat {
            // A heartbeat is never emitted: anything else it carries is not kept.
            return Ok(Parts { op: w.op, site, table: None, uuid: None, refs: Refs::default(), source: w.source, ts_ms: w.ts_ms, key: None, before: None, after: None, schema: None });
        }
        if w.op == Op::Schema {
            // Passed on as `HqEvent::Schema`; no row.
            let table = w.table.map(String::into_boxed_str);
            return Ok(Parts { op: w.op, site, table, uuid: None, refs: Refs::default(), source: w.source, ts_ms: w.ts_ms, key: None, before: None, after: None, schema: w.schema.map(Box::new) });
        }
        // Row images are kept raw, and a raw value's strings are not decoded: an escape that
        // decodes to nothing (a lone surrogate, `\udc00`) would pass here and fail every
        // reader downstream. Records with `\u` escapes (rare) get their images decoded in full.
        // (Found by the `envelope` fuzz target.)
        if payload.windows(2).any(|x| x == b"\\u") {
            for r in [w.key, w.before, w.after].into_iter().flatten() {
                serde_json::from_str::<J>(r.json()).map_err(|e| CoreError::Envelope(e.to_string()))?;
            }
        }
        let refs: Refs = if w.refs.is_empty() { Refs::default() } else { serde_json::from_str(w.refs.json()).map_err(|e| CoreError::Envelope(format!("`refs`: {e}")))? };
        let base = payload.as_ptr() as usize;
        // Borrowed values lie within the record; checked all the same.
        let span = |v: RawImage<'_>| -> Result<Span, CoreError> {
            let s = v.json();
            let start = (s.as_ptr() as usize).wrapping_sub(base);
            match start.checked_add(s.len()) {
                Some(end) if end <= payload.len() => Ok((start as u32, end as u32)),
                _ => Err(CoreError::Envelope("a row image outside its record".into())),
            }
        };
        Ok(Parts {
            op: w.op,
            site,
            table: w.table.map(String::into_boxed_str),
            uuid: w.uuid,
            refs,
            source: w.source,
            ts_ms: w.ts_ms,
            key: w.key.map(span).transpose()?,
            before: w.before.map(span).transpose()?,
            after: w.after.map(span).transpose()?,
            schema: None,
        })
    }

    fn slice(&self, s: Option<Span>) -> Option<&[u8]> {
        s.and_then(|(a, b)| self.raw.get(a as usize..b as usize))
    }

    /// The raw JSON of the `before` image.
    pub fn before_raw(&self) -> Option<&[u8]> {
        self.slice(self.before)
    }

    /// The raw JSON of the `after` image.
    pub fn after_raw(&self) -> Option<&[u8]> {
        self.slice(self.after)
    }

    pub fn table_str(&self) -> &str {
        self.table.as_deref().unwrap_or("")
    }

    /// Size of the held event, for the buffer's byte count.
    pub fn approx_bytes(&self) -> usize {
        self.raw.len() + self.refs.0.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len) + 64).sum::<usize>() + 192
    }

    /// Appends the event's JSON, as `ChangeEvent` serialises it.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(self.op.as_str().as_bytes());
        out.extend_from_slice(b"\",\"site\":");
        write_str(out, &self.site);
        if let Some(t) = &self.table {
            out.extend_from_slice(b",\"table\":");
            write_str(out, t);
        }
        if let Some(k) = self.slice(self.key) {
            out.extend_from_slice(b",\"key\":");
            out.extend_from_slice(k);
        }
        if let Some(u) = &self.uuid {
            out.extend_from_slice(b",\"uuid\":");
            write_str(out, u);
        }
        out.extend_from_slice(b",\"before\":");
        out.extend_from_slice(self.slice(self.before).unwrap_or(b"null"));
        out.extend_from_slice(b",\"after\":");
        out.extend_from_slice(self.slice(self.after).unwrap_or(b"null"));
        if !self.refs.is_empty() {
            out.extend_from_slice(b",\"refs\":");
            // Strings and plain values: serialising them cannot fail.
            let _ = serde_json::to_writer(&mut *out, &self.refs);
        }
        out.extend_from_slice(b",\"source\":");
        let _ = serde_json::to_writer(&mut *out, &self.source);
        out.extend_from_slice(b",\"ts_ms\":");
        let _ = serde_json::to_writer(&mut *out, &self.ts_ms);
        out.push(b'}');
    }

    /// The event as a [`ChangeEvent`] (tests, tools).
    pub fn to_change_event(&self) -> Result<ChangeEvent, String> {
        let mut b = Vec::new();
        self.write_json(&mut b);
        ChangeEvent::from_json(&b).map_err(|e| e.to_string())
    }
}

/// Appends a JSON string.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// One record of `omrs.hq.changes`, as the engine emits it.
// Nearly every record is a change: it stays inline, the rare merge or review is boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Out {
    /// A site change (`HqEvent::Change`), with its event held raw.
    Change {
        late: bool,
        person: Option<String>,
        /// Column → original uuid, for the refs rewritten to the survivor.
        origin_refs: Vec<(String, String)>,
        event: InEvent,
    },
    /// A merge or an identity review (rare: boxed).
    Hq(Box<HqEvent>),
}

impl Out {
    /// Appends the record's JSON (the same as `HqEvent::to_json`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Out::Change { late, person, origin_refs, event } => {
                out.extend_from_slice(if *late { b"{\"type\":\"change\",\"late\":true" } else { b"{\"type\":\"change\",\"late\":false" });
                if let Some(p) = person {
                    out.extend_from_slice(b",\"person\":");
                    write_str(out, p);
                }
                if !origin_refs.is_empty() {
                    out.extend_from_slice(b",\"origin_refs\":{");
                    for (i, (c, u)) in origin_refs.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write_str(out, c);
                        out.push(b':');
                        write_str(out, u);
                    }
                    out.push(b'}');
                }
                out.extend_from_slice(b",\"event\":");
                event.write_json(out);
                out.push(b'}');
            }
            Out::Hq(h) => {
                let _ = serde_json::to_writer(&mut *out, h);
            }
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        self.write_json(&mut b);
        b
    }

    /// Writes the record key on `omrs.hq.changes` (as `HqEvent::key`).
    pub fn write_key(&self, out: &mut String) {
        out.clear();
        match self {
            Out::Change { event, .. } => {
                out.push_str(event.table_str());
                out.push(':');
                out.push_str(event.uuid.as_deref().unwrap_or(""));
            }
            Out::Hq(h) => out.push_str(&h.key()),
        }
    }

    pub fn key(&self) -> String {
        let mut k = String::new();
        self.write_key(&mut k);
        k
    }

    /// The partition of `omrs.hq.changes` (of `n`) the record goes to: a site's changes and
    /// schema records to the site's ([`omrs_core::topics::hq_partition`]), identity records and
    /// aggregates to [`omrs_core::topics::IDENTITY_LANE`]; `None` for a watermark, which goes
    /// to every partition.
    pub fn partition(&self, n: i32) -> Option<i32> {
        use omrs_core::topics::{hq_partition, IDENTITY_LANE};
        match self {
            Out::Change { event, .. } => Some(hq_partition(&event.site, n)),
            Out::Hq(h) => match h.as_ref() {
                HqEvent::Watermark { .. } => None,
                HqEvent::Schema { site, .. } | HqEvent::Change { event: omrs_core::envelope::ChangeEvent { site, .. }, .. } => Some(hq_partition(site, n)),
                HqEvent::Merge { .. } | HqEvent::Split { .. } | HqEvent::IdentityReview { .. } | HqEvent::Aggregate { .. } => Some(IDENTITY_LANE),
            },
        }
    }

    /// The record as an [`HqEvent`], parsed back from its JSON.
    pub fn to_hq(&self) -> Result<HqEvent, String> {
        serde_json::from_slice(&self.to_json()).map_err(|e| e.to_string())
    }
}

/// The fuzz target `envelope` (fuzz/) and its regression test: a site-topic record as the
/// transform decodes it, the same bytes as a `ChangeEvent` and as an `omrs.hq.changes`
/// record. Err names a broken promise: what the transform accepts, it writes back as JSON
/// that parses; an `HqEvent` serialises to a record that parses to the same key.
pub fn check_envelope(data: &[u8]) -> Result<(), String> {
    let site: Arc<str> = Arc::from("site-a");
    if let Ok(ev) = InEvent::decode(data, &site, "omrs.cdc.site-a") {
        let mut out = Vec::new();
        ev.write_json(&mut out);
        serde_json::from_slice::<J>(&out).map_err(|e| format!("the transform wrote a record that is not JSON ({e}): {}", String::from_utf8_lossy(&out)))?;
        let _ = ev.to_change_event();
    }
    if let Ok(ev) = serde_json::from_slice::<ChangeEvent>(data) {
        let _ = ev.validate();
    }
    // Core's one decoder of `omrs.hq.changes` reads the same record whichever image form a
    // sink asks for.
    let maps = serde_json::from_slice::<HqEvent>(data);
    let flat = serde_json::from_slice::<HqEvent<FlatRow>>(data);
    if maps.is_ok() != flat.is_ok() {
        return Err(format!("an omrs.hq.changes record read with maps and flat rows differently: {:?} / {:?}", maps.as_ref().err(), flat.as_ref().err()));
    }
    if let (Ok(m), Ok(f), Ok(r)) = (&maps, &flat, serde_json::from_slice::<HqEvent<RawPairs<'_>>>(data)) {
        let v = serde_json::to_value(m).ok();
        if serde_json::to_value(f).ok() != v || serde_json::to_value(&r).ok() != v {
            return Err("an omrs.hq.changes record means different things in different image forms".into());
        }
    }
    if let Ok(h) = maps {
        let again: HqEvent = serde_json::from_slice(&h.to_json()).map_err(|e| format!("an HqEvent serialised to a record that does not parse: {e}"))?;
        if again.key() != h.key() {
            return Err(format!("an HqEvent changed key on a round trip: {} → {}", h.key(), again.key()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Arc<str> {
        Arc::from("site-a")
    }

    /// The spliced output equals serialising the parsed `ChangeEvent`, value for value.
    #[test]
    fn spliced_json_is_the_serialised_event() {
        let inputs = [
            r#"{"op":"c","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"o-1","after":{"obs_id":7,"value_numeric":60.50,"s":"a\"b\u00e9","n":null},"refs":{"person_id":"p-1","x":null},"source":{"server_id":1,"file":"b.1","pos":4,"ts_ms":5},"ts_ms":6}"#,
            r#"{"op":"u","site":"site-a","table":"person","key":{"person_id":1},"uuid":"p","before":{ "voided" : 0 },"after":{"voided":1},"source":{"server_id":1,"gtid":"0-1-2","file":"b.1","pos":4,"row":2,"ts_ms":5,"snapshot":false},"ts_ms":6}"#,
            r#"{"op":"d","site":"site-a","table":"obs","key":{"obs_id":7},"before":{},"after":null,"source":{"server_id":1,"file":"b.1","pos":4,"ts_ms":5},"ts_ms":6}"#,
            r#"{"op":"r","site":"site-a","table":"obs","key":{"obs_id":7},"after":{"a":[1,{"b":2}]},"source":{"server_id":1,"file":"b.1","pos":4,"ts_ms":5,"snapshot":true},"ts_ms":6}"#,
            r#"{"op":"h","site":"site-a","source":{"server_id":1,"file":"b.1","pos":4,"ts_ms":5},"ts_ms":6}"#,
        ];
        for input in inputs {
            let ev = InEvent::decode(input.as_bytes(), &site(), "t").unwrap();
            assert!(!ev.raw.is_empty() || ev.op == Op::Heartbeat);
            let full = ChangeEvent::from_json(input.as_bytes()).unwrap();
            let mut mine = Vec::new();
            ev.write_json(&mut mine);

            let a: J = serde_json::from_slice(&mine).unwrap();
            let b: J = serde_json::from_slice(&full.to_json()).unwrap();
            assert_eq!(a, b, "{input}");
            let out = Out::Change { late: true, person: Some("p\"1".into()), origin_refs: vec![("person_id".into(), "q".into())], event: ev };
            let hq = out.to_hq().unwrap();
            assert_eq!(serde_json::from_slice::<J>(&out.to_json()).unwrap(), serde_json::from_slice::<J>(&hq.to_json()).unwrap());
            assert_eq!(out.key(), hq.key());
        }
    }

    #[test]
    fn invalid_records_get_the_full_parser_reason() {
        let bad = [
            (r#"{"op":"c","site":"site-a","table":"obs","key":1,"after":{},"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "invalid type"),
            (r#"{"op":"c","site":"site-a","table":"obs","key":{},"after":{},"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "`key` is missing or empty"),
            (r#"{"op":"c","site":"site-a","table":"obs","key":{"a":1},"after":[],"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "invalid type"),
            (r#"{"op":"u","site":"site-a","table":"obs","key":{"a":1},"after":{},"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "needs both"),
            (r#"{"op":"c","site":"site-a","table":"obs","key":{"a":1},"after":{},"extra":1,"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "unknown field"),
            (r#"{"op":"c","site":"site-b","table":"obs","key":{"a":1},"after":{},"source":{"server_id":1,"file":"f","pos":1,"ts_ms":1},"ts_ms":1}"#, "unknown site `site-b`"),
        ];
        for (input, reason) in bad {
            let err = InEvent::decode(input.as_bytes(), &site(), "t").unwrap_err();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }
}
