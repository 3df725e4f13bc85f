//! The dead-letter record: one JSON object on `omrs.dlq` per record a stage could not process.
//! Every stage writes the same shape, so one consumer (or `kcat`) reads them all.

use base64::Engine as _;

/// Where a dead record came from, and why it is dead.
pub struct DeadRecord<'a> {
    /// `transform`, `hq_mysql`, …
    pub stage: &'a str,
    /// A short machine-readable class (`row_rejected`, `fk_wait_timeout`, …), when the stage has one.
    pub kind: Option<&'a str>,
    pub reason: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
}

impl DeadRecord<'_> {
    /// The record's JSON: the payload as text when it is UTF-8, and always as base64.
    pub fn to_json(&self, ts_ms: i64) -> Vec<u8> {
        let mut v = serde_json::json!({
            "stage": self.stage,
            "reason": self.reason,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(self.payload),
            "payload_text": std::str::from_utf8(self.payload).ok(),
            "ts_ms": ts_ms,
        });
        if let Some(kind) = self.kind {
            v["kind"] = serde_json::Value::String(kind.to_string());
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }
}
