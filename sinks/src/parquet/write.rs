//! Typed rows → Arrow builders, column by column as they arrive → record batches → zstd
//! Parquet files (fsynced).

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
use parquet::schema::types::ColumnPath;

use super::lake::io;
use super::schema::{Cell, LakeRow, LakeTable, META_COLUMNS};
use crate::SinkError;

fn arrow_err(context: &str) -> impl FnOnce(arrow::error::ArrowError) -> SinkError + '_ {
    move |e| SinkError::Lake(format!("{context}: {e}"))
}

/// The builder of one table column.
enum Col {
    Bool(BooleanBuilder),
    I8(Int8Builder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    U64(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder, u8, i8),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder, Option<Arc<str>>),
    Time(Time64MicrosecondBuilder),
    Bin(BinaryBuilder),
    Str(StringBuilder),
}

impl Col {
    fn new(t: &DataType) -> Col {
        match t {
            DataType::Boolean => Col::Bool(BooleanBuilder::new()),
            DataType::Int8 => Col::I8(Int8Builder::new()),
            DataType::Int16 => Col::I16(Int16Builder::new()),
            DataType::Int32 => Col::I32(Int32Builder::new()),
            DataType::Int64 => Col::I64(Int64Builder::new()),
            DataType::UInt64 => Col::U64(UInt64Builder::new()),
            DataType::Float32 => Col::F32(Float32Builder::new()),
            DataType::Float64 => Col::F64(Float64Builder::new()),
            DataType::Decimal128(p, s) => Col::Dec(Decimal128Builder::new(), *p, *s),
            DataType::Date32 => Col::Date(Date32Builder::new()),
            DataType::Timestamp(_, tz) => Col::Ts(TimestampMicrosecondBuilder::new(), tz.clone()),
            DataType::Time64(_) => Col::Time(Time64MicrosecondBuilder::new()),
            DataType::Binary => Col::Bin(BinaryBuilder::new()),
            _ => Col::Str(StringBuilder::new()),
        }
    }

    /// Appends a cell typed for this column (see `schema::cell`: a cell's kind follows the
    /// column's type); anything else is a null.
    fn push(&mut self, c: &Cell<'_>) {
        match (self, c) {
            (Col::Bool(b), Cell::Bool(v)) => b.append_value(*v),
            (Col::I8(b), Cell::Int(v)) => b.append_value(*v as i8),
            (Col::I16(b), Cell::Int(v)) => b.append_value(*v as i16),
            (Col::I32(b), Cell::Int(v)) => b.append_value(*v as i32),
            (Col::I64(b), Cell::Int(v)) => b.append_value(*v),
            (Col::U64(b), Cell::UInt(v)) => b.append_value(*v),
            (Col::F32(b), Cell::Float(v)) => b.append_value(*v as f32),
            (Col::F64(b), Cell::Float(v)) => b.append_value(*v),
            (Col::Dec(b, _, _), Cell::Decimal(v)) => b.append_value(*v),
            (Col::Date(b), Cell::Temporal(v)) => b.append_value(*v as i32),
            (Col::Ts(b, _), Cell::Temporal(v)) => b.append_value(*v),
            (Col::Time(b), Cell::Temporal(v)) => b.append_value(*v),
            (Col::Bin(b), Cell::Bin(v)) => b.append_value(v),
            (Col::Str(b), Cell::Str(v)) => b.append_value(v),
            (Col::Bool(b), _) => b.append_null(),
            (Col::I8(b), _) => b.append_null(),
            (Col::I16(b), _) => b.append_null(),
            (Col::I32(b), _) => b.append_null(),
            (Col::I64(b), _) => b.append_null(),
            (Col::U64(b), _) => b.append_null(),
            (Col::F32(b), _) => b.append_null(),
            (Col::F64(b), _) => b.append_null(),
            (Col::Dec(b, _, _), _) => b.append_null(),
            (Col::Date(b), _) => b.append_null(),
            (Col::Ts(b, _), _) => b.append_null(),
            (Col::Time(b), _) => b.append_null(),
            (Col::Bin(b), _) => b.append_null(),
            (Col::Str(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> Result<ArrayRef, SinkError> {
        Ok(match self {
            Col::Bool(b) => Arc::new(b.finish()),
            Col::I8(b) => Arc::new(b.finish()),
            Col::I16(b) => Arc::new(b.finish()),
            Col::I32(b) => Arc::new(b.finish()),
            Col::I64(b) => Arc::new(b.finish()),
            Col::U64(b) => Arc::new(b.finish()),
            Col::F32(b) => Arc::new(b.finish()),
            Col::F64(b) => Arc::new(b.finish()),
            Col::Dec(b, p, s) => Arc::new(b.finish().with_precision_and_scale(*p, *s).map_err(arrow_err("decimal column"))?),
            Col::Date(b) => Arc::new(b.finish()),
            Col::Ts(b, tz) => Arc::new(b.finish().with_timezone_opt(tz.clone())),
            Col::Time(b) => Arc::new(b.finish()),
            Col::Bin(b) => Arc::new(b.finish()),
            Col::Str(b) => Arc::new(b.finish()),
        })
    }
}

/// The change-history fields of one row, borrowed.
pub struct Meta<'a> {
    pub op: &'a str,
    pub event_ms: i64,
    pub site: &'a str,
    pub uuid: Option<&'a str>,
    pub person: Option<&'a str>,
    pub late: bool,
    pub row_key: &'a str,
    pub change_ms: i64,
    pub priority: i32,
    pub position: &'a str,
    pub rewritten: bool,
    pub partition: i32,
    pub offset: i64,
}

/// The rows of one (table, site, date) partition, appended column by column as they arrive.
pub struct PartBuf {
    pub table: Arc<LakeTable>,
    op: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    site: StringBuilder,
    uuid: StringBuilder,
    person: StringBuilder,
    late: BooleanBuilder,
    key: StringBuilder,
    change: Int64Builder,
    prio: Int32Builder,
    pos: StringBuilder,
    rew: BooleanBuilder,
    kp: Int32Builder,
    ko: Int64Builder,
    cols: Vec<Col>,
    pub rows: u64,
    pub first_offset: i64,
    pub last_offset: i64,
}

impl PartBuf {
    pub fn new(table: Arc<LakeTable>) -> PartBuf {
        let cols = table.schema.fields().iter().skip(META_COLUMNS.len()).map(|f| Col::new(f.data_type())).collect();
        PartBuf {
            table,
            op: StringBuilder::new(),
            ts: TimestampMicrosecondBuilder::new(),
            site: StringBuilder::new(),
            uuid: StringBuilder::new(),
            person: StringBuilder::new(),
            late: BooleanBuilder::new(),
            key: StringBuilder::new(),
            change: Int64Builder::new(),
            prio: Int32Builder::new(),
            pos: StringBuilder::new(),
            rew: BooleanBuilder::new(),
            kp: Int32Builder::new(),
            ko: Int64Builder::new(),
            cols,
            rows: 0,
            first_offset: i64::MAX,
            last_offset: i64::MIN,
        }
    }

    /// Appends one row: its meta fields and its cells (one per column after the meta columns).
    pub fn push(&mut self, m: &Meta<'_>, cells: &[Cell<'_>]) {
        self.op.append_value(m.op);
        self.ts.append_value(m.event_ms * 1000);
        self.site.append_value(m.site);
        self.uuid.append_option(m.uuid);
        self.person.append_option(m.person);
        self.late.append_value(m.late);
        self.key.append_value(m.row_key);
        self.change.append_value(m.change_ms);
        self.prio.append_value(m.priority);
        self.pos.append_value(m.position);
        self.rew.append_value(m.rewritten);
        self.kp.append_value(m.partition);
        self.ko.append_value(m.offset);
        for (i, col) in self.cols.iter_mut().enumerate() {
            col.push(cells.get(i).unwrap_or(&Cell::Null));
        }
        self.rows += 1;
        self.first_offset = self.first_offset.min(m.offset);
        self.last_offset = self.last_offset.max(m.offset);
    }

    /// Appends a row of the general path.
    pub fn push_row(&mut self, r: &LakeRow) {
        let m = Meta {
            op: r.op.as_str(),
            event_ms: r.event_ms,
            site: &r.site,
            uuid: r.uuid.as_deref(),
            person: r.person.as_deref(),
            late: r.late,
            row_key: &r.row_key,
            change_ms: r.version.change_ms,
            priority: r.version.priority,
            position: &r.version.position,
            rewritten: r.rewritten,
            partition: r.partition,
            offset: r.offset,
        };
        self.push(&m, &r.cells);
    }

    /// The batch of every row appended.
    pub fn finish(mut self) -> Result<RecordBatch, SinkError> {
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.op.finish()),
            Arc::new(self.ts.finish().with_timezone("UTC")),
            Arc::new(self.site.finish()),
            Arc::new(self.uuid.finish()),
            Arc::new(self.person.finish()),
            Arc::new(self.late.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.change.finish()),
            Arc::new(self.prio.finish()),
            Arc::new(self.pos.finish()),
            Arc::new(self.rew.finish()),
            Arc::new(self.kp.finish()),
            Arc::new(self.ko.finish()),
        ];
        for c in &mut self.cols {
            arrays.push(c.finish()?);
        }
        RecordBatch::try_new(self.table.schema.clone(), arrays).map_err(arrow_err(&format!("building the {} batch", self.table.def.name)))
    }
}

/// zstd; no dictionary for the columns that are unique per row (a dictionary would only be
/// tried and dropped).
pub fn props(row_group_rows: usize) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by("omrs-stream".into());
    for c in ["uuid", "_uuid", "_row_key", "_position", "_kafka_offset"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false);
    }
    b.build()
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
