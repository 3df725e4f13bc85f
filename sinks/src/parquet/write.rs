//! Typed rows → Arrow record batches → zstd Parquet files (fsynced).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, Int8Builder, StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::lake::io;
use super::schema::{Cell, LakeRow, LakeTable, META_COLUMNS};
use crate::SinkError;

fn arrow_err(context: &str) -> impl FnOnce(arrow::error::ArrowError) -> SinkError + '_ {
    move |e| SinkError::Lake(format!("{context}: {e}"))
}

/// One column of cells as an array of type `t`.
pub fn column(t: &DataType, cells: impl Iterator<Item = Cell>, n: usize) -> Result<ArrayRef, SinkError> {
    macro_rules! build {
        ($b:expr, $pat:pat => $v:expr) => {{
            let mut b = $b;
            for c in cells {
                match c {
                    $pat => b.append_value($v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    Ok(match t {
        DataType::Boolean => build!(BooleanBuilder::with_capacity(n), Cell::Bool(v) => v),
        DataType::Int8 => build!(Int8Builder::with_capacity(n), Cell::Int(v) => v as i8),
        DataType::Int16 => build!(Int16Builder::with_capacity(n), Cell::Int(v) => v as i16),
        DataType::Int32 => build!(Int32Builder::with_capacity(n), Cell::Int(v) => v as i32),
        DataType::Int64 => build!(Int64Builder::with_capacity(n), Cell::Int(v) => v),
        DataType::UInt64 => build!(UInt64Builder::with_capacity(n), Cell::UInt(v) => v),
        DataType::Float32 => build!(Float32Builder::with_capacity(n), Cell::Float(v) => v as f32),
        DataType::Float64 => build!(Float64Builder::with_capacity(n), Cell::Float(v) => v),
        DataType::Decimal128(p, s) => {
            let mut b = Decimal128Builder::with_capacity(n);
            for c in cells {
                match c {
                    Cell::Decimal(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish().with_precision_and_scale(*p, *s).map_err(arrow_err("decimal column"))?) as ArrayRef
        }
        DataType::Date32 => build!(Date32Builder::with_capacity(n), Cell::Temporal(v) => v as i32),
        DataType::Timestamp(_, tz) => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(n);
            for c in cells {
                match c {
                    Cell::Temporal(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish().with_timezone_opt(tz.clone())) as ArrayRef
        }
        DataType::Time64(_) => build!(Time64MicrosecondBuilder::with_capacity(n), Cell::Temporal(v) => v),
        DataType::Binary => {
            let mut b = BinaryBuilder::with_capacity(n, n * 16);
            for c in cells {
                match c {
                    Cell::Bin(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }
        _ => {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            for c in cells {
                match c {
                    Cell::Str(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }
    })
}

/// The change-history batch of `rows` (all of `table`).
pub fn rows_to_batch(table: &LakeTable, rows: Vec<LakeRow>) -> Result<RecordBatch, SinkError> {
    let n = rows.len();
    let mut op = StringBuilder::with_capacity(n, n);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
    let mut site = StringBuilder::with_capacity(n, n * 8);
    let mut uuid = StringBuilder::with_capacity(n, n * 36);
    let mut person = StringBuilder::with_capacity(n, n * 36);
    let mut late = BooleanBuilder::with_capacity(n);
    let mut key = StringBuilder::with_capacity(n, n * 36);
    let mut change = Int64Builder::with_capacity(n);
    let mut prio = Int32Builder::with_capacity(n);
    let mut pos = StringBuilder::with_capacity(n, n * 40);
    let mut rew = BooleanBuilder::with_capacity(n);
    let mut kp = Int32Builder::with_capacity(n);
    let mut ko = Int64Builder::with_capacity(n);
    let width = table.schema.fields().len() - META_COLUMNS.len();
    let mut cols: Vec<Vec<Cell>> = (0..width).map(|_| Vec::with_capacity(n)).collect();
    for r in rows {
        op.append_value(r.op.as_str());
        ts.append_value(r.event_ms * 1000);
        site.append_value(&r.site);
        uuid.append_option(r.uuid.as_deref());
        person.append_option(r.person.as_deref());
        late.append_value(r.late);
        key.append_value(&r.row_key);
        change.append_value(r.version.change_ms);
        prio.append_value(r.version.priority);
        pos.append_value(&r.version.position);
        rew.append_value(r.rewritten);
        kp.append_value(r.partition);
        ko.append_value(r.offset);
        for (i, c) in r.cells.into_iter().enumerate() {
            if let Some(col) = cols.get_mut(i) {
                col.push(c);
            }
        }
    }
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(op.finish()),
        Arc::new(ts.finish().with_timezone("UTC")),
        Arc::new(site.finish()),
        Arc::new(uuid.finish()),
        Arc::new(person.finish()),
        Arc::new(late.finish()),
        Arc::new(key.finish()),
        Arc::new(change.finish()),
        Arc::new(prio.finish()),
        Arc::new(pos.finish()),
        Arc::new(rew.finish()),
        Arc::new(kp.finish()),
        Arc::new(ko.finish()),
    ];
    for (i, cells) in cols.into_iter().enumerate() {
        let t = table.schema.field(META_COLUMNS.len() + i).data_type().clone();
        arrays.push(column(&t, cells.into_iter(), n)?);
    }
    RecordBatch::try_new(table.schema.clone(), arrays).map_err(arrow_err(&format!("building the {} batch", table.def.name)))
}

pub fn props(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by("omrs-stream".into())
        .build()
}

/// Writes `batches` to a new file at `path` and fsyncs it. Returns its size.
pub fn write_file(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], row_group_rows: usize) -> Result<u64, SinkError> {
    let f = std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
    let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props(row_group_rows)))
        .map_err(|e| SinkError::Lake(format!("writing {}: {e}", path.display())))?;
    for b in batches {
        w.write(b).map_err(|e| SinkError::Lake(format!("writing {}: {e}", path.display())))?;
    }
    let f = w.into_inner().map_err(|e| SinkError::Lake(format!("closing {}: {e}", path.display())))?;
    f.sync_all().map_err(io(format!("fsync {}", path.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(len)
}
