//! Binlog rows straight to envelope JSON: each row of a row event is decoded from the event
//! bytes and its change event is written as JSON into the batch buffer, with no
//! `serde_json::Map` and no per-column `String` on the way.
//!
//! What a table needs is worked out once per table map ([`TablePlan`]): the type, metadata,
//! charset and scrubbing of every column, its JSON key (`"name":`), ENUM labels as JSON
//! strings, and where the primary key, the uuid and the FK columns are. A row is decoded into
//! [`Image`]s, which hold the JSON of the row image and where each column's value lies in it;
//! the key, the uuid, the int key and the FK ids are read back from those bytes.
//!
//! Values are rendered as [`crate::convert::binlog_value`] renders them and serde_json
//! serialises them, so the bytes sent are those of `ChangeEvent::to_json` for the same event.
//! The unit tests compare the two value by value; `bench_ingest N --check` compares every row
//! image of a real workload's binlog.

use std::borrow::Cow;
use std::io;
use std::sync::Arc;

use base64::Engine;
use mysql_common::binlog::events::{OptionalMetaExtractor, TableMapEvent};
use mysql_common::binlog::value::BinlogValue;
use mysql_common::constants::ColumnType;
use mysql_common::io::ParseBuf;
use mysql_common::value::Value;
use omrs_core::envelope::Op;
use omrs_core::model::{Model, TableModel};

use crate::convert::{binlog_value_typed, float32, is_latin1, BINARY};
use crate::refs::{Resolver, Target};
use crate::IngestError;

mod text;

/// One column of a table map.
struct ColPlan {
    ty: ColumnType,
    meta: Box<[u8]>,
    unsigned: bool,
    charset: u16,
    /// `"name":`
    key: Box<[u8]>,
    scrub: bool,
    /// ENUM labels as JSON strings, when the model knows the column's labels.
    enums: Option<Vec<Box<[u8]>>>,
}

/// A foreign key column of the table.
pub struct FkPlan {
    /// Index of the column in the table map.
    col: usize,
    /// `"column":`
    key: Box<[u8]>,
    pub column: String,
    pub ref_table: String,
    /// Where the referenced uuid is looked up; None when the referenced table is not captured.
    pub target: Option<Target>,
}

/// What encoding the rows of one table map takes, worked out once.
pub struct TablePlan {
    pub table: Arc<TableModel>,
    pub name: Arc<str>,
    table_id: u64,
    cols: Vec<ColPlan>,
    /// `"site":"…","table":"…",`
    head: Vec<u8>,
    /// The primary key columns: `"name":` and the column index, if the table map has it.
    pk: Vec<(Box<[u8]>, Option<usize>)>,
    int_pk: Option<usize>,
    uuid: Option<usize>,
    /// The resolver's id of this table, when its rows' uuids are learnt.
    pub learn: Option<u32>,
    /// For a table that shares its key with a parent: where its uuid is looked up.
    pub parent: Option<Option<Target>>,
    pub fks: Vec<FkPlan>,
    /// Counts rows into `events_in` for create, update, delete.
    pub events_in: [Box<dyn Fn(u64) + Send + Sync>; 3],
}

/// A string column's charset when the binlog does not say (MySQL 5.7): binary for the binary
/// types of the schema history, else a UTF-8 one.
fn modelled_charset(column_type: Option<&str>) -> u16 {
    match column_type {
        Some(t) if t.starts_with("binary") || t.starts_with("varbinary") || t.ends_with("blob") => BINARY,
        _ => 45, // utf8mb4_general_ci
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_key(name: &str) -> Box<[u8]> {
    let mut k = Vec::with_capacity(name.len() + 3);
    json_str(&mut k, name);
    k.push(b':');
    k.into_boxed_slice()
}

impl TablePlan {
    /// The plan for `tme`, a table map of `table`.
    pub fn new(
        tme: &TableMapEvent<'_>,
        table: Arc<TableModel>,
        scrub: &[&str],
        site: &str,
        model: &Model,
        resolver: &mut Resolver,
    ) -> Result<TablePlan, IngestError> {
        let bad = |e: String| IngestError::Binlog(format!("table map of {}: {e}", table.name));
        let n = tme.columns_count() as usize;
        let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta()).map_err(|e| bad(e.to_string()))?;
        // As mysql_common's row decoder reads them.
        let mut signedness = extractor.iter_signedness();
        let mut charsets = extractor.iter_charset();
        let mut enum_charsets = extractor.iter_enum_and_set_charset();
        let names: Vec<String> = extractor
            .iter_column_name()
            .map(|c| c.map(|c| String::from_utf8_lossy(c.name_raw()).into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        // Without names in the binlog (binlog_row_metadata MINIMAL or none), the schema
        // history's columns name them: they must be as many.
        let from_model = names.is_empty();
        if from_model && table.columns.len() != n {
            return Err(IngestError::Schema(format!(
                "the binlog's table map of `{}` has {n} columns and the schema history {} ({}): a DDL the agent did not follow. \
                 Set binlog_row_metadata=FULL at the site if the server has it, or resnapshot the site (docs/OPERATIONS.md, \"Schema history\")",
                table.name,
                table.columns.len(),
                table.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut cols = Vec::with_capacity(n);
        let mut col_names = Vec::with_capacity(n);
        for i in 0..n {
            let ty = match tme.get_column_type(i) {
                Ok(Some(ty)) => ty,
                Ok(None) => return Err(bad(format!("no type for column {i}"))),
                Err(e) => return Err(bad(e.to_string())),
            };
            let meta: Box<[u8]> = tme.get_column_metadata(i).unwrap_or(&[]).into();
            let modelled = table.columns.get(i).filter(|_| from_model).map(|c| c.column_type.to_ascii_lowercase());
            let unsigned = ty
                .is_numeric_type()
                .then(|| signedness.next().or_else(|| modelled.as_ref().map(|t| t.contains("unsigned"))))
                .flatten()
                .unwrap_or_default();
            let charset = if ty.is_character_type() {
                charsets.next().transpose().map_err(|e| bad(e.to_string()))?.unwrap_or_else(|| modelled_charset(modelled.as_deref()))
            } else if ty.is_enum_or_set_type() {
                enum_charsets.next().transpose().map_err(|e| bad(e.to_string()))?.unwrap_or_default()
            } else {
                Default::default()
            };
            let name: String = match names.get(i) {
                Some(n) => n.clone(),
                None => table.columns.get(i).map(|c| c.name.clone()).unwrap_or_else(|| format!("@{i}")),
            };
            let enums = table.enums.get(&name).map(|labels| {
                labels
                    .iter()
                    .map(|l| {
                        let mut v = Vec::new();
                        json_str(&mut v, l);
                        v.into_boxed_slice()
                    })
                    .collect()
            });
            if let Err(e) = check_meta(ty, &meta) {
                return Err(bad(format!("column `{name}`: {e}")));
            }
            cols.push(ColPlan { ty, meta, unsigned, charset, key: json_key(&name), scrub: scrub.contains(&name.as_str()), enums });
            col_names.push(name);
        }
        Ok(Self::assemble(table, tme.table_id(), cols, &col_names, site, model, resolver))
    }

    /// The plan, once its columns are known: where the key, uuid and foreign keys lie, the
    /// envelope's head, the counters.
    fn assemble(table: Arc<TableModel>, table_id: u64, cols: Vec<ColPlan>, col_names: &[String], site: &str, model: &Model, resolver: &mut Resolver) -> TablePlan {
        // A column of the image, by name (scrubbed columns are not in the image).
        let find = |name: &str| col_names.iter().position(|c| c == name).filter(|&i| !cols[i].scrub);
        let mut head = Vec::new();
        head.extend_from_slice(b"\"site\":");
        json_str(&mut head, site);
        head.extend_from_slice(b",\"table\":");
        json_str(&mut head, &table.name);
        head.push(b',');
        let pk = table.pk.iter().map(|k| (json_key(k), find(k))).collect();
        let int_pk = table.int_pk().and_then(find);
        let uuid = if table.has_uuid { find("uuid") } else { None };
        let learn = table.has_uuid.then(|| resolver.table_id(&table.name));
        let parent = table.shared_parent.as_ref().map(|p| resolver.target(model, p));
        let fks = table
            .fks
            .iter()
            .filter_map(|fk| {
                Some(FkPlan {
                    col: find(&fk.column)?,
                    key: json_key(&fk.column),
                    column: fk.column.clone(),
                    ref_table: fk.ref_table.clone(),
                    target: resolver.target(model, &fk.ref_table),
                })
            })
            .collect();
        let counter = |op: Op| -> Box<dyn Fn(u64) + Send + Sync> {
            let c = omrs_core::metrics::metrics().events_in.with_label_values(&["ingest", site, &table.name, op.as_str()]);
            Box::new(move |n| c.inc_by(n))
        };
        TablePlan {
            name: Arc::from(table.name.as_str()),
            table_id,
            cols,
            head,
            pk,
            int_pk,
            uuid,
            learn,
            parent,
            fks,
            events_in: [counter(Op::Create), counter(Op::Update), counter(Op::Delete)],
            table,
        }
    }

    /// Whether this plan was made for `tme` (same table id, table and column count).
    pub fn fits(&self, tme: &TableMapEvent<'_>) -> bool {
        self.table_id == tme.table_id() && self.cols.len() as u64 == tme.columns_count() && tme.table_name_raw() == self.name.as_bytes()
    }

    /// Decodes the next row of a rows event whose images carry the columns `before` and
    /// `after` (None: the event has no such image).
    pub fn decode_row<'a>(&'a self, buf: &mut ParseBuf<'a>, before: Option<&[bool]>, after: Option<&[bool]>, enc: &mut RowEncoder) -> io::Result<()> {
        enc.before.present = false;
        enc.after.present = false;
        if let Some(cols) = before {
            self.decode_image(buf, cols, &mut enc.before, &mut enc.scratch)?;
        }
        if let Some(cols) = after {
            self.decode_image(buf, cols, &mut enc.after, &mut enc.scratch)?;
        }
        Ok(())
    }

    fn decode_image<'a>(&'a self, buf: &mut ParseBuf<'a>, cols: &[bool], img: &mut Image, scratch: &mut String) -> io::Result<()> {
        img.buf.clear();
        img.spans.clear();
        img.spans.resize(self.cols.len(), (0, 0));
        img.present = true;
        let num_bits = cols.iter().filter(|&&c| c).count();
        let nulls: &[u8] = buf.parse(num_bits.div_ceil(8))?;
        img.buf.push(b'{');
        let mut image_idx = 0;
        for (i, c) in self.cols.iter().enumerate() {
            if !cols.get(i).copied().unwrap_or(false) {
                continue;
            }
            let is_null = nulls.get(image_idx / 8).is_none_or(|b| b & (1 << (image_idx % 8)) != 0);
            image_idx += 1;
            let value = if is_null { None } else { Some(parse_value(buf, c)?) };
            if c.scrub {
                continue;
            }
            if img.buf.len() > 1 {
                img.buf.push(b',');
            }
            img.buf.extend_from_slice(&c.key);
            let start = img.buf.len();
            match &value {
                None => img.buf.extend_from_slice(b"null"),
                Some(v) => write_value(&mut img.buf, v, c, scratch),
            }
            img.spans[i] = (start as u32, img.buf.len() as u32);
        }
        img.buf.push(b'}');
        Ok(())
    }

    /// The int primary key of the row's image.
    pub fn int_key(&self, enc: &RowEncoder) -> Option<i64> {
        self.int_pk.and_then(|i| enc.image().value(i)).and_then(as_i64)
    }

    /// The uuid column of the row's image, if the table has one and it is a string.
    pub fn uuid<'a>(&self, enc: &'a RowEncoder) -> Option<Cow<'a, str>> {
        let v = enc.image().value(self.uuid?)?;
        if v.first() != Some(&b'"') {
            return None;
        }
        match v.iter().position(|&b| b == b'\\') {
            None => std::str::from_utf8(&v[1..v.len() - 1]).ok().map(Cow::Borrowed),
            Some(_) => serde_json::from_slice::<String>(v).ok().map(Cow::Owned),
        }
    }

    /// The FK's id in the row's image: None when the column is not in the image, `Some(None)`
    /// for null or a value that is not an integer.
    pub fn fk_id(&self, fk: &FkPlan, enc: &RowEncoder) -> Option<Option<i64>> {
        enc.image().value(fk.col).map(as_i64)
    }

    /// Writes the row's change event into `out`: Kafka key, then the envelope JSON. `refs` is
    /// the body of the `refs` object ([`push_ref`]; empty: no refs), `source` the parts of the
    /// `source` object ([`source_parts`]) around the row index; `key` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn write_event(
        &self,
        enc: &RowEncoder,
        op: Op,
        uuid: Option<&str>,
        refs: &[u8],
        source: (&[u8], u32, &[u8]),
        ts_ms: i64,
        key: &mut Vec<u8>,
        out: &mut crate::producer::Batch,
    ) {
        let image = enc.image();
        let (source_head, row, source_tail) = source;
        // The Kafka key: `table:v1,v2` (every image value when there is no primary key).
        key.clear();
        key.extend_from_slice(self.name.as_bytes());
        key.push(b':');
        if self.pk.is_empty() {
            for (n, (s, e)) in image.spans.iter().filter(|(s, e)| e > s).enumerate() {
                if n > 0 {
                    key.push(b',');
                }
                key.extend_from_slice(&image.buf[*s as usize..*e as usize]);
            }
        } else {
            for (n, (_, i)) in self.pk.iter().enumerate() {
                if n > 0 {
                    key.push(b',');
                }
                key.extend_from_slice(i.and_then(|i| image.value(i)).unwrap_or(b"null"));
            }
        }
        let (before, after) = match op {
            Op::Create => (None, Some(&enc.after)),
            Op::Delete => (Some(&enc.before), None),
            _ => (Some(&enc.before).filter(|i| i.present), Some(&enc.after).filter(|i| i.present)),
        };
        out.push_with(key, Some(&self.name), op, |buf| {
            buf.extend_from_slice(b"{\"op\":\"");
            buf.extend_from_slice(op.as_str().as_bytes());
            buf.extend_from_slice(b"\",");
            buf.extend_from_slice(&self.head);
            buf.extend_from_slice(b"\"key\":");
            if self.pk.is_empty() {
                buf.extend_from_slice(&image.buf);
            } else {
                buf.push(b'{');
                for (n, (k, i)) in self.pk.iter().enumerate() {
                    if n > 0 {
                        buf.push(b',');
                    }
                    buf.extend_from_slice(k);
                    buf.extend_from_slice(i.and_then(|i| image.value(i)).unwrap_or(b"null"));
                }
                buf.push(b'}');
            }
            if let Some(u) = uuid {
                buf.extend_from_slice(b",\"uuid\":");
                json_str(buf, u);
            }
            buf.extend_from_slice(b",\"before\":");
            match before {
                Some(i) if i.present => buf.extend_from_slice(&i.buf),
                _ => buf.extend_from_slice(b"null"),
            }
            buf.extend_from_slice(b",\"after\":");
            match after {
                Some(i) if i.present => buf.extend_from_slice(&i.buf),
                _ => buf.extend_from_slice(b"null"),
            }
            if !refs.is_empty() {
                buf.extend_from_slice(b",\"refs\":{");
                buf.extend_from_slice(refs);
                buf.push(b'}');
            }
            buf.push(b',');
            buf.extend_from_slice(source_head);
            push_u64(buf, row as u64);
            buf.extend_from_slice(source_tail);
            push_i64(buf, ts_ms);
            buf.push(b'}');
        });
    }
}

/// The JSON of one row image and where each column's value lies in it.
#[derive(Default)]
pub struct Image {
    buf: Vec<u8>,
    /// By table map column: (start, end) of the value in `buf`; empty when not in the image.
    spans: Vec<(u32, u32)>,
    present: bool,
}

impl Image {
    fn value(&self, col: usize) -> Option<&[u8]> {
        let &(s, e) = self.spans.get(col)?;
        (e > s).then(|| &self.buf[s as usize..e as usize])
    }
}

/// The decoded images of the current row, in reused buffers.
#[derive(Default)]
pub struct RowEncoder {
    before: Image,
    after: Image,
    scratch: String,
}

impl RowEncoder {
    /// The image the key, uuid and refs come from: the after image, else the before image.
    fn image(&self) -> &Image {
        if self.after.present {
            &self.after
        } else {
            &self.before
        }
    }

    /// The JSON of the row's before (or after) image, if it has one.
    pub fn image_json(&self, after: bool) -> Option<&[u8]> {
        let i = if after { &self.after } else { &self.before };
        i.present.then_some(&i.buf[..])
    }

    /// Whether the row has a before or an after image.
    pub fn has_image(&self) -> bool {
        self.before.present || self.after.present
    }
}

/// Adds `"column":uuid` (or null) to the body of a `refs` object.
pub fn push_ref(refs: &mut Vec<u8>, fk: &FkPlan, uuid: Option<&str>) {
    if !refs.is_empty() {
        refs.push(b',');
    }
    refs.extend_from_slice(&fk.key);
    match uuid {
        Some(u) => json_str(refs, u),
        None => refs.extend_from_slice(b"null"),
    }
}

/// `"server_id":…,"gtid":…,"file":…,"pos":…,"row":` and `,"ts_ms":…,"snapshot":…}` of the
/// `source` object of every row of one event (or snapshot chunk), around the row index.
pub fn source_parts(server_id: u32, gtid: Option<&str>, (file, pos): (&str, u64), ts_ms: i64, snapshot: bool, head: &mut Vec<u8>, tail: &mut Vec<u8>) {
    head.clear();
    head.extend_from_slice(b"\"source\":{\"server_id\":");
    push_u64(head, server_id as u64);
    if let Some(g) = gtid {
        head.extend_from_slice(b",\"gtid\":");
        json_str(head, g);
    }
    head.extend_from_slice(b",\"file\":");
    json_str(head, file);
    head.extend_from_slice(b",\"pos\":");
    push_u64(head, pos);
    head.extend_from_slice(b",\"row\":");
    tail.clear();
    tail.extend_from_slice(b",\"ts_ms\":");
    push_i64(tail, ts_ms);
    tail.extend_from_slice(if snapshot { b",\"snapshot\":true},\"ts_ms\":" } else { b",\"snapshot\":false},\"ts_ms\":" });
}

/// `serde_json::Value::as_i64` of a value's JSON: an integer number that fits an i64.
fn as_i64(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut b = [0u8; 20];
    let mut i = b.len();
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&b[i..]);
}

fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// `n` left-padded with zeros to `width` digits.
fn push_padded(out: &mut Vec<u8>, n: u32, width: usize) {
    let digits = if n == 0 { 1 } else { n.ilog10() as usize + 1 };
    for _ in digits..width {
        out.push(b'0');
    }
    push_u64(out, n as u64);
}

/// The JSON of a value, as serde_json writes `binlog_value_typed(..)`.
fn write_value(out: &mut Vec<u8>, value: &BinlogValue<'_>, c: &ColPlan, scratch: &mut String) {
    use ColumnType::*;
    let t = c.ty;
    let fallback = |out: &mut Vec<u8>| {
        let _ = serde_json::to_writer(&mut *out, &binlog_value_typed(value, t, c.charset, None));
    };
    let BinlogValue::Value(v) = value else { return fallback(out) };
    match v {
        Value::NULL => out.extend_from_slice(b"null"),
        Value::Int(i) => {
            if t == MYSQL_TYPE_ENUM {
                if let Some(labels) = &c.enums {
                    match labels.get((*i as usize).wrapping_sub(1)) {
                        Some(l) => out.extend_from_slice(l),
                        None => out.extend_from_slice(b"\"\""),
                    }
                    return;
                }
            }
            if matches!(t, MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2) {
                return fallback(out);
            }
            push_i64(out, *i)
        }
        Value::UInt(u) => push_u64(out, *u),
        Value::Float(f) => {
            let _ = serde_json::to_writer(&mut *out, &float32(*f));
        }
        Value::Double(d) => {
            // Non-finite values are written as null, as `Number::from_f64` makes them.
            let _ = serde_json::to_writer(&mut *out, d);
        }
        Value::Date(y, m, d, h, i, s, us) if *y <= 9999 => {
            let date = [(b'"', *y as u32, 4), (b'-', *m as u32, 2), (b'-', *d as u32, 2)];
            let time = [(b' ', *h as u32, 2), (b':', *i as u32, 2), (b':', *s as u32, 2), (b'.', *us, 6)];
            let parts = match (matches!(t, MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE), *us) {
                (true, _) => 0,
                (false, 0) => 3,
                (false, _) => 4,
            };
            for (sep, n, width) in date.into_iter().chain(time.into_iter().take(parts)) {
                out.push(sep);
                push_padded(out, n, width);
            }
            out.push(b'"');
        }
        Value::Bytes(b) => match t {
            MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => json_str(out, &String::from_utf8_lossy(b)),
            MYSQL_TYPE_YEAR | MYSQL_TYPE_BIT | MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => fallback(out),
            _ => write_string(out, b, c.charset, scratch),
        },
        _ => fallback(out),
    }
}

/// A string or binary column's bytes as a JSON string: base64 for binary, decoded with the
/// column's charset otherwise (as `convert::text` makes them).
fn write_string(out: &mut Vec<u8>, b: &[u8], charset: u16, scratch: &mut String) {
    if charset == BINARY {
        scratch.clear();
        base64::engine::general_purpose::STANDARD.encode_string(b, scratch);
        json_str(out, scratch);
    } else if is_latin1(charset) && !b.is_ascii() {
        scratch.clear();
        scratch.extend(b.iter().map(|&b| b as char));
        json_str(out, scratch);
    } else {
        json_str(out, &String::from_utf8_lossy(b));
    }
}

/// One value of a rows event. mysql_common's decoders can panic on malformed bytes (an
/// overflow on a DATETIME2 without its sign bit, found by the `binlog_value` fuzz target); that
/// becomes a decoding error, which the agent reports with the table and binlog position.
fn parse_value<'a>(buf: &mut ParseBuf<'a>, c: &'a ColPlan) -> io::Result<BinlogValue<'a>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| buf.parse::<BinlogValue<'a>>((c.ty, &c.meta, c.unsigned, false)))) {
        Ok(v) => v,
        Err(_) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("a malformed {:?} value", c.ty))),
    }
}

/// Column metadata the row decoder (mysql_common) can take: a DECIMAL's precision and scale
/// within MySQL's limits (a malformed table map made mysql_common's decimal decoder overflow;
/// found by the `binlog_value` fuzz target).
fn check_meta(ty: ColumnType, meta: &[u8]) -> Result<(), String> {
    if ty == ColumnType::MYSQL_TYPE_NEWDECIMAL {
        let (p, s) = (meta.first().copied().unwrap_or(0), meta.get(1).copied().unwrap_or(0));
        if !(1..=65).contains(&p) || s > 30 || s > p {
            return Err(format!("DECIMAL metadata precision {p}, scale {s} is out of range"));
        }
    }
    Ok(())
}

/// The fuzz target `binlog_value` (fuzz/): one binlog value of a column type, metadata and
/// charset named by the first bytes, decoded from the rest as a rows event holds it, then
/// written by the direct writer and by `binlog_value_typed` + serde_json. Err when they
/// disagree or the output is not JSON; undecodable bytes are Ok (the agent reports those as
/// a decoding error naming the table and position).
pub fn check_binlog_value(data: &[u8]) -> Result<(), String> {
    use ColumnType::*;
    const TYPES: [ColumnType; 24] = [
        MYSQL_TYPE_TINY, MYSQL_TYPE_SHORT, MYSQL_TYPE_INT24, MYSQL_TYPE_LONG, MYSQL_TYPE_LONGLONG, MYSQL_TYPE_FLOAT,
        MYSQL_TYPE_DOUBLE, MYSQL_TYPE_NEWDECIMAL, MYSQL_TYPE_DATE, MYSQL_TYPE_DATETIME, MYSQL_TYPE_DATETIME2, MYSQL_TYPE_TIME,
        MYSQL_TYPE_TIME2, MYSQL_TYPE_TIMESTAMP, MYSQL_TYPE_TIMESTAMP2, MYSQL_TYPE_YEAR, MYSQL_TYPE_VARCHAR, MYSQL_TYPE_STRING,
        MYSQL_TYPE_VAR_STRING, MYSQL_TYPE_BLOB, MYSQL_TYPE_BIT, MYSQL_TYPE_ENUM, MYSQL_TYPE_SET, MYSQL_TYPE_JSON,
    ];
    const CHARSETS: [u16; 4] = [BINARY, 33, 45, 8];
    if data.len() < 4 {
        return Ok(());
    }
    let ty = TYPES[data[0] as usize % TYPES.len()];
    let unsigned = data[1] & 1 == 1;
    let charset = CHARSETS[(data[1] as usize >> 1) % CHARSETS.len()];
    let meta: Box<[u8]> = Box::new([data[2], data[3]]);
    let labels: Vec<String> = vec!["a".into(), "b\"c".into()];
    let c = ColPlan {
        ty,
        meta,
        unsigned,
        charset,
        key: json_key("c"),
        scrub: false,
        enums: (data[1] & 0x80 != 0).then(|| {
            labels
                .iter()
                .map(|s| {
                    let mut v = Vec::new();
                    json_str(&mut v, s);
                    v.into_boxed_slice()
                })
                .collect()
        }),
    };
    if check_meta(c.ty, &c.meta).is_err() {
        return Ok(());
    }
    let mut buf = ParseBuf(&data[4..]);
    let Ok(value) = parse_value(&mut buf, &c) else { return Ok(()) };
    let mut got = Vec::new();
    write_value(&mut got, &value, &c, &mut String::new());
    let want = serde_json::to_vec(&binlog_value_typed(&value, ty, charset, c.enums.as_ref().map(|_| &labels))).map_err(|e| format!("serde_json: {e}"))?;
    if got != want {
        return Err(format!("{ty:?}: the direct writer wrote {} where serde_json wrote {}", String::from_utf8_lossy(&got), String::from_utf8_lossy(&want)));
    }
    serde_json::from_slice::<serde_json::Value>(&got).map_err(|e| format!("{ty:?}: not JSON ({e}): {}", String::from_utf8_lossy(&got)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(ty: ColumnType, charset: u16, enums: Option<&[&str]>) -> ColPlan {
        ColPlan {
            ty,
            meta: Box::new([]),
            unsigned: false,
            charset,
            key: json_key("c"),
            scrub: false,
            enums: enums.map(|l| {
                l.iter()
                    .map(|s| {
                        let mut v = Vec::new();
                        json_str(&mut v, s);
                        v.into_boxed_slice()
                    })
                    .collect()
            }),
        }
    }

    /// The direct writer and serde_json over `binlog_value_typed` agree byte for byte.
    #[test]
    fn values_are_written_as_serde_json_writes_them() {
        use ColumnType::*;
        let labels = ["a", "b\"c"];
        let enum_labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let cases: Vec<(ColumnType, u16, Value)> = vec![
            (MYSQL_TYPE_LONG, 63, Value::Int(-42)),
            (MYSQL_TYPE_LONGLONG, 63, Value::Int(i64::MIN)),
            (MYSQL_TYPE_LONGLONG, 63, Value::UInt(u64::MAX)),
            (MYSQL_TYPE_DOUBLE, 63, Value::Double(71.5)),
            (MYSQL_TYPE_DOUBLE, 63, Value::Double(1.0)),
            (MYSQL_TYPE_DOUBLE, 63, Value::Double(1e300)),
            (MYSQL_TYPE_DOUBLE, 63, Value::Double(f64::NAN)),
            (MYSQL_TYPE_FLOAT, 63, Value::Float(1.1)),
            (MYSQL_TYPE_DATETIME2, 63, Value::Date(2017, 5, 2, 10, 3, 4, 0)),
            (MYSQL_TYPE_DATETIME2, 63, Value::Date(2017, 5, 2, 10, 3, 4, 120)),
            (MYSQL_TYPE_DATETIME2, 63, Value::Date(0, 0, 0, 0, 0, 0, 0)),
            (MYSQL_TYPE_DATE, 63, Value::Date(2017, 5, 2, 0, 0, 0, 0)),
            (MYSQL_TYPE_NEWDATE, 63, Value::Date(999, 12, 31, 0, 0, 0, 0)),
            (MYSQL_TYPE_TIME2, 63, Value::Time(true, 1, 2, 3, 4, 5)),
            (MYSQL_TYPE_NEWDECIMAL, 63, Value::Bytes(b"12.50".to_vec())),
            (MYSQL_TYPE_YEAR, 63, Value::Bytes(b"2020".to_vec())),
            (MYSQL_TYPE_BIT, 63, Value::Bytes(vec![1, 2])),
            (MYSQL_TYPE_TIMESTAMP2, 63, Value::Bytes(b"1500000000.000120".to_vec())),
            (MYSQL_TYPE_TIMESTAMP2, 63, Value::Int(1500000000)),
            (MYSQL_TYPE_BLOB, 63, Value::Bytes(vec![0, 1, 2, 255])),
            (MYSQL_TYPE_VARCHAR, 33, Value::Bytes("Jü \"q\" \\ \n\t\u{1}/".as_bytes().to_vec())),
            (MYSQL_TYPE_VARCHAR, 45, Value::Bytes(vec![0xff, b'a'])),
            (MYSQL_TYPE_VARCHAR, 8, Value::Bytes(vec![0x4a, 0xfc])),
            (MYSQL_TYPE_VARCHAR, 8, Value::Bytes(b"plain".to_vec())),
            (MYSQL_TYPE_ENUM, 33, Value::Int(2)),
            (MYSQL_TYPE_ENUM, 33, Value::Int(0)),
            (MYSQL_TYPE_ENUM, 33, Value::Int(7)),
            (MYSQL_TYPE_LONG, 63, Value::NULL),
        ];
        for (ty, charset, v) in cases {
            for enums in [None, Some(&labels[..])] {
                let c = col(ty, charset, enums);
                let bv = BinlogValue::Value(v.clone());
                let mut got = Vec::new();
                write_value(&mut got, &bv, &c, &mut String::new());
                let want = serde_json::to_vec(&binlog_value_typed(&bv, ty, charset, enums.map(|_| &enum_labels))).unwrap();
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{ty:?} {v:?} enums {enums:?}");
            }
        }
    }

    #[test]
    fn numbers_print_like_itoa() {
        for n in [0i64, 7, 10, -1, 1234567890123, i64::MAX, i64::MIN] {
            let mut b = Vec::new();
            push_i64(&mut b, n);
            assert_eq!(b, n.to_string().into_bytes());
        }
        let mut b = Vec::new();
        push_padded(&mut b, 5, 4);
        push_padded(&mut b, 0, 2);
        push_padded(&mut b, 12345, 2);
        assert_eq!(b, b"00050012345");
    }
}
