//! The records of `omrs.hq.changes` as the HQ sink reads them, parsed off the write path.

use super::HqEvent;

/// One input record of the batch.
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    /// The payload parsed ([`Record::decode`]), or why it is not an `omrs.hq.changes` record.
    pub decoded: Result<HqEvent, String>,
}

impl Record {
    /// Parses the payload. Runs on the reader task, while the previous batch is being written.
    pub fn decode(partition: i32, offset: i64, payload: Vec<u8>) -> Record {
        // Core's decoder, row images as `FlatRow`s.
        let decoded = serde_json::from_slice::<HqEvent>(&payload).map_err(|e| format!("not an omrs.hq.changes record: {e}"));
        Record { partition, offset, payload, decoded }
    }
}

#[cfg(test)]
mod decode_tests {
    use super::Record;

    #[test]
    fn records_read_with_flat_images_as_with_maps() {
        let records: &[&str] = &[
            r#"{"type":"change","late":false,"event":{"op":"c","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"u-1","after":{"obs_id":7,"value_text":"a \"quoted\" é"},"refs":{"person_id":"p-1"},"source":{"server_id":11,"file":"binlog.000001","pos":4,"row":0,"ts_ms":5,"snapshot":false},"ts_ms":5}}"#,
            r#"{"type":"change","late":true,"person":"p-2","origin_refs":{"person_id":"p-9"},"event":{"op":"u","site":"site-b","table":"person_name","key":{"person_name_id":3},"uuid":"u-2","before":{"person_name_id":3},"after":{"person_name_id":3},"refs":{},"source":{"server_id":12,"file":"binlog.000002","pos":9,"row":1,"ts_ms":6,"snapshot":false},"ts_ms":6}}"#,
            r#"{"type":"watermark","ts_ms":12}"#,
        ];
        for r in records {
            let fast = Record::decode(0, 0, r.as_bytes().to_vec()).decoded.expect("decodes");
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
