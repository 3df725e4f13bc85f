//! The identity review queue in the lake: every review version the transform emitted,
//! appended to `<lake>/identity/reviews/part-<seq>-<n>.parquet` under the same manifest entry
//! as the change files of its batch (so exactly once, like them). The query layer shows every
//! version as `identity.reviews_history` and one row per review as `identity.reviews`: the
//! status a person decided if any (a review raised again does not undo a decision, as at HQ),
//! else the latest, with the earliest `first_seen`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::SinkError;

/// The folder of the identity tables, under the lake root (and their SQL schema).
pub const DIR: &str = "identity";
/// The review versions' folder under [`DIR`].
pub const REVIEWS: &str = "reviews";

/// One emitted review version, with the Kafka position that orders versions of a review.
#[derive(Debug, Clone)]
pub struct ReviewVersion {
    pub review_id: String,
    pub reason: String,
    pub status: String,
    pub person: String,
    pub records: String,
    pub evidence: String,
    pub site: String,
    pub ts_ms: i64,
    pub decided: Option<omrs_core::hq::review::Decided>,
    pub partition: i32,
    pub offset: i64,
}

pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("review_id", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("person_uuid", DataType::Utf8, false),
        Field::new("records", DataType::Utf8, false),
        Field::new("evidence", DataType::Utf8, true),
        Field::new("site", DataType::Utf8, false),
        Field::new("first_seen", ts.clone(), false),
        Field::new("decided_at", ts, true),
        Field::new("decided_by", DataType::Utf8, true),
        Field::new("note", DataType::Utf8, true),
        Field::new("_kafka_partition", DataType::Int32, false),
        Field::new("_kafka_offset", DataType::Int64, false),
    ]))
}

pub fn batch(rows: &[ReviewVersion]) -> Result<RecordBatch, SinkError> {
    let n = rows.len();
    let mut text: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let (mut ts, mut kp, mut ko) = (TimestampMillisecondBuilder::with_capacity(n), Int32Builder::with_capacity(n), Int64Builder::with_capacity(n));
    let (mut at, mut by, mut note) = (TimestampMillisecondBuilder::with_capacity(n), StringBuilder::new(), StringBuilder::new());
    for r in rows {
        for (b, v) in text.iter_mut().zip([&r.review_id, &r.reason, &r.status, &r.person, &r.records, &r.evidence, &r.site]) {
            b.append_value(v);
        }
        ts.append_value(r.ts_ms);
        at.append_option(r.decided.as_ref().map(|d| d.at_ms));
        by.append_option(r.decided.as_ref().map(|d| d.by.as_str()));
        note.append_option(r.decided.as_ref().and_then(|d| d.note.as_deref()));
        kp.append_value(r.partition);
        ko.append_value(r.offset);
    }
    let mut cols: Vec<ArrayRef> = text.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef).collect();
    cols.extend([
        Arc::new(ts.finish().with_timezone("UTC")) as ArrayRef,
        Arc::new(at.finish().with_timezone("UTC")),
        Arc::new(by.finish()),
        Arc::new(note.finish()),
        Arc::new(kp.finish()),
        Arc::new(ko.finish()),
    ]);
    RecordBatch::try_new(schema(), cols).map_err(|e| SinkError::Lake(format!("building the identity review batch: {e}")))
}

/// One row per review: the query behind `identity.reviews`. As at HQ: the latest version gives
/// the reason, evidence and person, the latest decision the status, the earliest `first_seen`.
pub fn latest_sql() -> String {
    let h = format!("{DIR}.{REVIEWS}_history");
    format!(
        "SELECT l.review_id, l.reason, COALESCE(d.status, l.status) AS status, l.person_uuid, l.records, l.evidence, l.site, \
                l._first AS first_seen, d.decided_at, d.decided_by, d.note \
         FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY review_id ORDER BY _kafka_partition DESC, _kafka_offset DESC) AS _rn, \
                      MIN(first_seen) OVER (PARTITION BY review_id) AS _first FROM {h}) l \
         LEFT JOIN (SELECT review_id, status, decided_at, decided_by, note, \
                      ROW_NUMBER() OVER (PARTITION BY review_id ORDER BY _kafka_partition DESC, _kafka_offset DESC) AS _rn \
                    FROM {h} WHERE decided_by IS NOT NULL) d ON d.review_id = l.review_id AND d._rn = 1 \
         WHERE l._rn = 1"
    )
}
