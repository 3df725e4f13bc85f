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

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::hq::HqEvent;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
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

/// The record as read: the fields the engine needs, decoded; row images borrowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    op: Op,
    #[serde(borrow)]
    site: Cow<'a, str>,
    #[serde(default, borrow)]
    table: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    key: Option<&'a RawValue>,
    #[serde(default, borrow)]
    uuid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    before: Option<&'a RawValue>,
    #[serde(default, borrow)]
    after: Option<&'a RawValue>,
    #[serde(default)]
    refs: Refs,
    source: Source,
    ts_ms: i64,
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
}

impl Parts {
    fn into_event(self, raw: Box<[u8]>) -> InEvent {
        // A heartbeat keeps no bytes.
        let raw = if self.op == Op::Heartbeat { Box::default() } else { raw };
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
        }
    }
}

/// Is a raw JSON value an object (with at least one member when `non_empty`)?
fn is_object(v: &RawValue, non_empty: bool) -> bool {
    let s = v.get().as_bytes();
    s.first() == Some(&b'{') && (!non_empty || s[1..].iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'}'))
}

impl InEvent {
    /// Parses and validates one record from site `site`'s topic. Err is the dead-letter reason,
    /// the same as [`ChangeEvent::from_json`] gives.
    pub fn decode(payload: &[u8], site: &Arc<str>, topic: &str) -> Result<InEvent, String> {
        let ev = match Self::fast(payload, site) {
            Some(ev) => ev,
            // Not a plain valid event: the full parser has the precise reason (or accepts a
            // form the fast path does not, which is then taken from its canonical JSON).
            None => {
                let full = ChangeEvent::from_json(payload).map_err(|e| e.to_string())?;
                if full.site != **site {
                    return Err(format!("unknown site `{}` on topic {topic} (expected `{site}`)", full.site));
                }
                Self::fast(&full.to_json(), site).ok_or_else(|| "invalid change event: not re-readable".to_string())?
            }
        };
        if *ev.site != **site {
            return Err(format!("unknown site `{}` on topic {topic} (expected `{site}`)", ev.site));
        }
        Ok(ev)
    }

    /// The single-pass parse; None when the record is invalid in any way.
    fn fast(payload: &[u8], site: &Arc<str>) -> Option<InEvent> {
        Self::parse(payload, site).map(|p| p.into_event(payload.into()))
    }

    /// Parses a record into owned fields and the spans of its row images.
    fn parse(payload: &[u8], site: &Arc<str>) -> Option<Parts> {
        let w: Wire = serde_json::from_slice(payload).ok()?;
        // The checks of ChangeEvent::validate.
        if w.site.is_empty() {
            return None;
        }
        let site = if *w.site == **site { site.clone() } else { Arc::from(&*w.site) };
        let base = payload.as_ptr() as usize;
        let span = |v: &RawValue| -> Span {
            let s = v.get();
            let start = (s.as_ptr() as usize).wrapping_sub(base) as u32;
            (start, start + s.len() as u32)
        };
        if w.op == Op::Heartbeat {
            if w.table.is_some() || w.before.is_some() || w.after.is_some() {
                return None;
            }
            // A heartbeat is never emitted: anything else it carries is not kept.
            return Some(Parts { op: w.op, site, table: None, uuid: None, refs: Refs::default(), source: w.source, ts_ms: w.ts_ms, key: None, before: None, after: None });
        }
        match w.table.as_deref() {
            None | Some("") => return None,
            Some(_) => {}
        }
        if !w.key.is_some_and(|k| is_object(k, true)) {
            return None;
        }
        if w.before.is_some_and(|r| !is_object(r, false)) || w.after.is_some_and(|r| !is_object(r, false)) {
            return None;
        }
        let ok = matches!(
            (w.op, w.before.is_some(), w.after.is_some()),
            (Op::Create | Op::Read, false, true) | (Op::Update, true, true) | (Op::Delete, true, false)
        );
        if !ok || (w.op == Op::Read) != w.source.snapshot {
            return None;
        }
        // Row images are kept raw, and a raw value's strings are not decoded: an escape that
        // decodes to nothing (a lone surrogate, `\udc00`) would pass here and fail every
        // reader downstream. Records with `\u` escapes (rare) get their images decoded in full;
        // on failure the full parser names the problem. (Found by the `envelope` fuzz target.)
        if payload.windows(2).any(|x| x == b"\\u") {
            for r in [w.key, w.before, w.after].into_iter().flatten() {
                serde_json::from_str::<J>(r.get()).ok()?;
            }
        }
        // Borrowed values always lie within the record; checked all the same.
        let (key, before, after) = (w.key.map(span), w.before.map(span), w.after.map(span));
        for (a, b) in [key, before, after].into_iter().flatten() {
            if a as usize > payload.len() || b as usize > payload.len() {
                return None;
            }
        }
        Some(Parts {
            op: w.op,
            site,
            table: w.table.map(|t| t.into()),
            uuid: w.uuid.map(Cow::into_owned),
            refs: w.refs,
            source: w.source,
            ts_ms: w.ts_ms,
            key,
            before,
            after,
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

    /// The record as an [`HqEvent`], parsed back from its JSON.
    pub fn to_hq(&self) -> Result<HqEvent, String> {
        serde_json::from_slice(&self.to_json()).map_err(|e| e.to_string())
    }
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
    if let Ok(h) = serde_json::from_slice::<HqEvent>(data) {
        let again: HqEvent = serde_json::from_slice(&h.to_json()).map_err(|e| format!("an HqEvent serialised to a record that does not parse: {e}"))?;
        if again.key() != h.key() {
            return Err(format!("an HqEvent changed key on a round trip: {} → {}", h.key(), again.key()));
        }
    }
    Ok(())
}
