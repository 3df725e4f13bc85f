//! The dashboard aggregates in the lake: every version the transform emitted, appended to
//! `<lake>/aggregates/<name>/part-<seq>-<n>.parquet` under the same manifest entry as the
//! change files of its batch (so exactly once, like them). The query layer shows the latest
//! version per window as `aggregates.<name>` and every version as `aggregates.<name>_history`.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use omrs_core::hq::AggregateDef;

use crate::SinkError;

/// The folder of the aggregates, under the lake root.
pub const DIR: &str = "aggregates";

/// One emitted version, with the Kafka position that orders versions of a window.
#[derive(Debug, Clone)]
pub struct AggVersion {
    pub site: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub dim: String,
    pub value: i64,
    pub is_final: bool,
    pub revision: u32,
    pub watermark_ms: i64,
    pub partition: i32,
    pub offset: i64,
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub fn schema(def: &AggregateDef) -> SchemaRef {
    let mut fields = vec![Field::new("site", DataType::Utf8, false), Field::new("window_start", ts(), false), Field::new("window_end", ts(), false)];
    if let Some(c) = def.dim_column {
        fields.push(Field::new(c, DataType::Utf8, false));
    }
    fields.extend([
        Field::new("value", DataType::Int64, false),
        Field::new("is_final", DataType::Boolean, false),
        Field::new("revision", DataType::Int32, false),
        Field::new("watermark_ms", DataType::Int64, false),
        Field::new("_kafka_partition", DataType::Int32, false),
        Field::new("_kafka_offset", DataType::Int64, false),
    ]);
    Arc::new(Schema::new(fields))
}

pub fn batch(def: &AggregateDef, rows: &[AggVersion]) -> Result<RecordBatch, SinkError> {
    let n = rows.len();
    let (mut site, mut start, mut end, mut dim) =
        (StringBuilder::new(), TimestampMillisecondBuilder::with_capacity(n), TimestampMillisecondBuilder::with_capacity(n), StringBuilder::new());
    let (mut value, mut fin, mut rev, mut wm, mut kp, mut ko) = (
        Int64Builder::with_capacity(n),
        BooleanBuilder::with_capacity(n),
        Int32Builder::with_capacity(n),
        Int64Builder::with_capacity(n),
        Int32Builder::with_capacity(n),
        Int64Builder::with_capacity(n),
    );
    for r in rows {
        site.append_value(&r.site);
        start.append_value(r.start_ms);
        end.append_value(r.end_ms);
        dim.append_value(&r.dim);
        value.append_value(r.value);
        fin.append_value(r.is_final);
        rev.append_value(r.revision as i32);
        wm.append_value(r.watermark_ms);
        kp.append_value(r.partition);
        ko.append_value(r.offset);
    }
    let mut cols: Vec<ArrayRef> = vec![Arc::new(site.finish()), Arc::new(start.finish().with_timezone("UTC")), Arc::new(end.finish().with_timezone("UTC"))];
    if def.dim_column.is_some() {
        cols.push(Arc::new(dim.finish()));
    }
    cols.extend([
        Arc::new(value.finish()) as ArrayRef,
        Arc::new(fin.finish()),
        Arc::new(rev.finish()),
        Arc::new(wm.finish()),
        Arc::new(kp.finish()),
        Arc::new(ko.finish()),
    ]);
    RecordBatch::try_new(schema(def), cols).map_err(|e| SinkError::Lake(format!("building the {} batch: {e}", def.name)))
}

/// The latest version of every window: the query behind `aggregates.<name>`.
pub fn latest_sql(def: &AggregateDef) -> String {
    let dim = def.dim_column.map(|c| format!(", {c}")).unwrap_or_default();
    format!(
        "SELECT site, window_start, window_end{dim}, value, is_final, revision, watermark_ms FROM \
         (SELECT *, ROW_NUMBER() OVER (PARTITION BY site, window_start{dim} ORDER BY _kafka_partition DESC, _kafka_offset DESC) AS _rn \
          FROM aggregates.{name}_history) WHERE _rn = 1",
        name = def.name
    )
}
