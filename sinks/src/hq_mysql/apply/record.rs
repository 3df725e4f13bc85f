//! The records of `omrs.hq.changes` as the HQ sink reads them, parsed off the write path.

use super::{ChangeEvent, HqEvent};
use serde_json::Value as J;

/// One input record of the batch.
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// The payload parsed ([`Record::decode`]), or why it is not an `omrs.hq.changes` record.
    pub decoded: Result<HqEvent, String>,
}

/// The body of a `change` record, parsed straight from the bytes. `HqEvent` is an internally
/// tagged enum, which serde can only parse by buffering the whole record first; a change (nearly
/// every record) whose tag comes first, as every writer of the topic puts it, skips that.
#[derive(serde::Deserialize)]
pub(super) struct ChangeRecord {
    #[serde(rename = "type")]
    pub(super) _kind: serde::de::IgnoredAny,
    pub(super) late: bool,
    #[serde(default)]
    pub(super) person: Option<String>,
    #[serde(default)]
    pub(super) origin_refs: serde_json::Map<String, J>,
    pub(super) event: ChangeEvent,
}

impl Record {
    /// Parses the payload. Runs on the reader task, while the previous batch is being written.
    pub fn decode(partition: i32, offset: i64, payload: Vec<u8>) -> Record {
        let decoded = if payload.starts_with(b"{\"type\":\"change\",") {
            serde_json::from_slice::<ChangeRecord>(&payload)
                .map(|c| HqEvent::Change { late: c.late, person: c.person, origin_refs: c.origin_refs, event: c.event })
        } else {
            serde_json::from_slice::<HqEvent>(&payload)
        };
        let decoded = decoded.map_err(|e| format!("not an omrs.hq.changes record: {e}"));
        Record { partition, offset, payload, decoded }
    }
}

#[cfg(test)]
mod decode_tests {
    use super::{HqEvent, Record};

    #[test]
    fn the_change_fast_path_parses_what_the_enum_parses() {
        let records: &[&str] = &[
            r#"{"type":"change","late":false,"event":{"op":"c","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"u-1","after":{"obs_id":7,"value_text":"a \"quoted\" é"},"refs":{"person_id":"p-1"},"source":{"server_id":11,"file":"binlog.000001","pos":4,"row":0,"ts_ms":5,"snapshot":false},"ts_ms":5}}"#,
            r#"{"type":"change","late":true,"person":"p-2","origin_refs":{"person_id":"p-9"},"event":{"op":"u","site":"site-b","table":"person_name","key":{"person_name_id":3},"uuid":"u-2","before":{"person_name_id":3},"after":{"person_name_id":3},"refs":{},"source":{"server_id":12,"file":"binlog.000002","pos":9,"row":1,"ts_ms":6,"snapshot":false},"ts_ms":6}}"#,
            r#"{"type":"watermark","ts_ms":12}"#,
        ];
        for r in records {
            let fast = Record::decode(0, 0, r.as_bytes().to_vec()).decoded.expect("decodes");
            let slow: HqEvent = serde_json::from_str(r).expect("enum decodes");
            assert_eq!(fast, slow, "{r}");
            // Flat row images mean what JSON maps mean: the same JSON back.
            let maps: omrs_core::hq::HqEvent = serde_json::from_str(r).expect("decodes with maps");
            assert_eq!(serde_json::to_value(&fast).expect("serializes"), serde_json::to_value(&maps).expect("serializes"), "{r}");
        }
        // A change missing a required field is still refused, with the field named.
        let bad = Record::decode(0, 0, br#"{"type":"change","event":{}}"#.to_vec()).decoded.expect_err("refused");
        assert!(bad.contains("not an omrs.hq.changes record"), "{bad}");
        assert!(Record::decode(0, 0, b"{\"type\":\"change\",".to_vec()).decoded.is_err());
    }
}
