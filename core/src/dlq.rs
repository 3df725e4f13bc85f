//! The dead-letter record: one JSON object on `omrs.dlq` per record a stage could not process.
//! Every stage writes the same shape, so one consumer (or `kcat`) reads them all.

use base64::Engine as _;

/// What kind of trouble put a record on `omrs.dlq`: the dead letter's `kind`, which
/// `omrs-stream dlq list --kind` filters on and `omrs_stream_dead_lettered_total` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadKind {
    /// Not a record of its topic at all (not JSON, or not its shape).
    InvalidRecord,
    /// A change event that breaks the envelope contract (a field missing or of the wrong type).
    InvalidEvent,
    /// Larger than the topic it would go to may carry.
    TooLarge,
    /// A change of a table the sink does not hold.
    UnknownTable,
    /// An aggregate the sink does not know.
    UnknownAggregate,
    /// A change whose row key cannot be worked out.
    MissingKey,
    /// A value that cannot be stored in its column.
    BadValue,
    /// HQ refused the row.
    RowRejected,
    /// The row it references did not reach HQ in time (`fk_wait_timeout_s`).
    FkWaitTimeout,
    /// It had to wait for a row, and the pending store was full (`max_pending_rows`).
    PendingFull,
    /// A foreign key of a change read from Debezium names a row the input never saw
    /// (`[sites.debezium] ref_wait_ms`).
    UnresolvedReference,
    /// Its table's schema changed at its site in a way HQ does not follow alone (a dropped,
    /// renamed or retyped column): stopped until a person migrates HQ.
    SchemaBlocked,
}

impl DeadKind {
    /// The name written in the dead letter and used as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::InvalidRecord => "invalid_record",
            DeadKind::InvalidEvent => "invalid_event",
            DeadKind::TooLarge => "too_large",
            DeadKind::UnknownTable => "unknown_table",
            DeadKind::UnknownAggregate => "unknown_aggregate",
            DeadKind::MissingKey => "missing_key",
            DeadKind::BadValue => "bad_value",
            DeadKind::RowRejected => "row_rejected",
            DeadKind::FkWaitTimeout => "fk_wait_timeout",
            DeadKind::PendingFull => "pending_full",
            DeadKind::SchemaBlocked => "schema_blocked",
            DeadKind::UnresolvedReference => "unresolved_reference",
        }
    }
}

/// Where a dead record came from, and why it is dead.
pub struct DeadRecord<'a> {
    /// `transform`, `hq_mysql`, …
    pub stage: &'a str,
    /// What kind of trouble it is.
    pub kind: DeadKind,
    pub reason: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
}

/// The most payload bytes a dead letter carries; a larger payload is cut (the whole record stays
/// in its source topic, at `topic`/`partition`/`offset`, which keep it forever). The dead-letter
/// topic's records must stay under the broker's default 1 MiB.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// The most reason bytes a dead letter carries.
pub const MAX_REASON: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl DeadRecord<'_> {
    /// The record's JSON: the payload as text when it is UTF-8, and always as base64; a payload
    /// over [`MAX_PAYLOAD`] is cut, with `payload_truncated` and the full `payload_bytes`.
    pub fn to_json(&self, ts_ms: i64) -> Vec<u8> {
        let truncated = self.payload.len() > MAX_PAYLOAD;
        let payload = &self.payload[..self.payload.len().min(MAX_PAYLOAD)];
        let text = match std::str::from_utf8(payload) {
            Ok(t) => Some(t),
            // A cut inside a character: the text up to it.
            Err(e) if truncated && e.error_len().is_none() => std::str::from_utf8(&payload[..e.valid_up_to()]).ok(),
            Err(_) => None,
        };
        let mut v = serde_json::json!({
            "stage": self.stage,
            "reason": cut(self.reason, MAX_REASON),
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload),
            "payload_text": text,
            "payload_bytes": self.payload.len(),
            "ts_ms": ts_ms,
        });
        if truncated {
            v["payload_truncated"] = serde_json::Value::Bool(true);
        }
        v["kind"] = serde_json::Value::String(self.kind.as_str().to_string());
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_payload_is_cut_and_says_so() {
        let big = "é".repeat(MAX_PAYLOAD); // two bytes each: twice the limit
        let reason = "r".repeat(10_000);
        let d = DeadRecord { stage: "transform", kind: DeadKind::InvalidEvent, reason: &reason, topic: "t", partition: 0, offset: 7, payload: big.as_bytes() };
        let v: serde_json::Value = serde_json::from_slice(&d.to_json(1)).unwrap();
        assert_eq!(v["payload_truncated"], true);
        assert_eq!(v["payload_bytes"], big.len());
        assert_eq!(v["payload_text"].as_str().unwrap().len(), MAX_PAYLOAD);
        assert_eq!(v["reason"].as_str().unwrap().len(), MAX_REASON);
        assert!(d.to_json(1).len() < 512 * 1024);
        let small = DeadRecord { stage: "transform", kind: DeadKind::InvalidEvent, reason: "bad", topic: "t", partition: 0, offset: 7, payload: b"{x" };
        let v: serde_json::Value = serde_json::from_slice(&small.to_json(1)).unwrap();
        assert!(v.get("payload_truncated").is_none());
        assert_eq!(v["payload_text"], "{x");
        assert_eq!(v["kind"], "invalid_event");
    }

    #[test]
    fn every_kind_has_its_own_name() {
        use DeadKind::*;
        let all = [InvalidRecord, InvalidEvent, TooLarge, UnknownTable, UnknownAggregate, MissingKey, BadValue, RowRejected, FkWaitTimeout, PendingFull];
        let names: std::collections::HashSet<&str> = all.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), all.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')), "{names:?}");
    }
}
