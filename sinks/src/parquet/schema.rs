//! The lake's table schemas: each table as the sites' shapes describe it (sent by the agents
//! ahead of their snapshots and after every DDL, merged here by [`LakeSchemaFile::evolve`], or
//! read once from HQ's `information_schema` with `sinks.parquet.schema_from_hq`), kept in
//! `<lake>/_schema.json` so that restarts and readers need nothing else, typed through the one
//! MySQL → Arrow map of `omrs_core::arrow_map`; and the conversion of one change event into a
//! typed row.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use base64::Engine;
use omrs_core::arrow_map::{arrow_type, is_zero_date, parse_date_days, parse_datetime_us, parse_decimal, parse_time_us};
use omrs_core::envelope::{ChangeEvent, Op};
use omrs_core::hq::{row_key, KeyShape, RowVersion};
use omrs_core::zone::SiteRule;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::SinkError;

/// The change-history columns every table has, before its own.
pub const META_COLUMNS: &[&str] = &[
    "_op", "_event_time", "_site", "_uuid", "_person", "_late", "_row_key", "_change_ms", "_priority", "_position", "_rewritten",
    "_kafka_partition", "_kafka_offset",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LakeColumn {
    pub name: String,
    /// `information_schema.columns.column_type`.
    pub mysql_type: String,
    /// The table this column references, when it is a foreign key: the lake adds a
    /// `<name>_uuid` column next to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<String>,
    /// The value a row without this column has: the column's default, for a column added by a
    /// schema change at a site (HQ gives it to its rows that predate it, and to rows of sites
    /// that have not upgraded, as the lake does then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<J>,
}

/// A default as an SQL literal (`'in_person'`, `0`) as the value a row image would carry; None
/// for an expression (`current_timestamp()`), which the lake leaves null.
pub fn default_value(sql: Option<&str>) -> Option<J> {
    let d = sql?.trim();
    if let Some(s) = d.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Some(J::String(s.replace("''", "'")));
    }
    serde_json::from_str::<serde_json::Number>(d).ok().map(J::Number)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LakeTableDef {
    pub name: String,
    pub columns: Vec<LakeColumn>,
    pub pk: Vec<String>,
    pub has_uuid: bool,
    #[serde(default)]
    pub shared_parent: Option<String>,
}

/// `<lake>/_schema.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LakeSchemaFile {
    /// Where the model came from: `stream` (the sites' table shapes) or `hq:<database>`.
    pub source: String,
    pub tables: BTreeMap<String, LakeTableDef>,
}

/// One typed cell of a row (text and bytes borrowed from the record when they can be).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Decimal(i128),
    /// µs (timestamps, times) or days (dates), by the column's type.
    Temporal(i64),
    Str(std::borrow::Cow<'a, str>),
    Bin(std::borrow::Cow<'a, [u8]>),
}

/// A table of the lake, ready to convert events.
#[derive(Debug)]
pub struct LakeTable {
    pub def: LakeTableDef,
    /// The change-history schema: meta columns, then each column (and `<fk>_uuid` after an FK).
    pub schema: SchemaRef,
    /// Per table column: its Arrow type.
    pub types: Vec<DataType>,
    fk_key_columns: Vec<String>,
    site_local: bool,
}

impl LakeTable {
    pub fn new(def: LakeTableDef) -> LakeTable {
        let mut fields = vec![
            Field::new("_op", DataType::Utf8, false),
            Field::new("_event_time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
            Field::new("_site", DataType::Utf8, false),
            Field::new("_uuid", DataType::Utf8, true),
            Field::new("_person", DataType::Utf8, true),
            Field::new("_late", DataType::Boolean, false),
            Field::new("_row_key", DataType::Utf8, false),
            Field::new("_change_ms", DataType::Int64, false),
            Field::new("_priority", DataType::Int32, false),
            Field::new("_position", DataType::Utf8, false),
            Field::new("_rewritten", DataType::Boolean, false),
            Field::new("_kafka_partition", DataType::Int32, false),
            Field::new("_kafka_offset", DataType::Int64, false),
        ];
        let mut types = Vec::with_capacity(def.columns.len());
        for c in &def.columns {
            let t = arrow_type(&c.mysql_type);
            fields.push(Field::new(&c.name, t.clone(), true));
            if c.references.is_some() {
                fields.push(Field::new(format!("{}_uuid", c.name), DataType::Utf8, true));
            }
            types.push(t);
        }
        let fk_key_columns =
            def.pk.iter().filter(|p| def.columns.iter().any(|c| &c.name == *p && c.references.is_some())).cloned().collect();
        let site_local = def.pk.len() == 1
            && def.columns.iter().any(|c| c.name == def.pk[0] && c.references.is_none() && matches!(arrow_type(&c.mysql_type), DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::UInt64));
        LakeTable { schema: Arc::new(Schema::new(fields)), types, fk_key_columns, site_local, def }
    }

    /// The row key in uuid space (the same rule as HQ's, from `omrs_core::hq`).
    pub fn row_key(&self, ev: &ChangeEvent, origin_refs: &serde_json::Map<String, J>) -> Result<String, String> {
        let fk: Vec<&str> = self.fk_key_columns.iter().map(String::as_str).collect();
        let shape = KeyShape {
            table: &self.def.name,
            by_uuid: self.def.has_uuid || self.def.shared_parent.is_some(),
            pk: &self.def.pk,
            fk_columns: &fk,
            site_local: self.site_local,
        };
        row_key(&shape, ev, origin_refs)
    }
}

/// One change, converted: meta values and the row's cells (`<fk>_uuid` cells included), in
/// schema order after the meta columns.
#[derive(Debug)]
pub struct LakeRow {
    pub op: Op,
    pub event_ms: i64,
    pub site: String,
    pub uuid: Option<String>,
    pub person: Option<String>,
    pub late: bool,
    pub row_key: String,
    pub version: RowVersion,
    pub rewritten: bool,
    pub partition: i32,
    pub offset: i64,
    pub cells: Vec<Cell<'static>>,
}

/// A row of a table a merge moves (obs, encounters, identifiers, names…) keeps the person it
/// was written for (the site's) in its `<column>_uuid`, not the survivor the transform pointed
/// it at: the current view maps it through the merges, so a survivor change that hands the
/// person back, or a split, finds it its own.
pub fn keeps_own_person(table: &str, column: &str) -> bool {
    omrs_core::openmrs::MOVES.iter().any(|(t, c, _)| *t == table && *c == column)
}

/// Converts one change: the after image (the before image of a delete), each value typed by
/// its column. An error names the table, the column and the value.
#[allow(clippy::too_many_arguments)]
pub fn convert(
    table: &LakeTable,
    ev: &ChangeEvent,
    late: bool,
    person: Option<String>,
    origin_refs: &serde_json::Map<String, J>,
    rule: &SiteRule,
    partition: i32,
    offset: i64,
) -> Result<LakeRow, String> {
    let image = if ev.op == Op::Delete { ev.before.as_ref() } else { ev.after.as_ref() };
    let image = image.ok_or_else(|| format!("{} change without a row image", table.def.name))?;
    let row_key = table.row_key(ev, origin_refs)?;
    let mut cells = Vec::with_capacity(table.schema.fields().len() - META_COLUMNS.len());
    for (c, t) in table.def.columns.iter().zip(&table.types) {
        let v = image.get(&c.name).or(c.default.as_ref()).unwrap_or(&J::Null);
        let cell = cell(v, t).map_err(|why| format!("{}.{}: {why}", table.def.name, c.name))?;
        cells.push(cell);
        if c.references.is_some() {
            let own = keeps_own_person(&table.def.name, &c.name).then(|| origin_refs.get(&c.name)).flatten();
            cells.push(match own.or_else(|| ev.refs.get(&c.name)) {
                Some(J::String(u)) => Cell::Str(u.clone().into()),
                _ => Cell::Null,
            });
        }
    }
    Ok(LakeRow {
        op: ev.op,
        event_ms: ev.source.ts_ms,
        site: ev.site.clone(),
        uuid: ev.uuid.clone(),
        person,
        late,
        row_key,
        version: RowVersion::of(ev, rule),
        rewritten: !origin_refs.is_empty(),
        partition,
        offset,
        cells,
    })
}

fn short(v: &J) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// One envelope value as a cell of Arrow type `t`.
pub fn cell(v: &J, t: &DataType) -> Result<Cell<'static>, String> {
    if v.is_null() {
        return Ok(Cell::Null);
    }
    let bad = |what: &str| Err(format!("{} is not {what}", short(v)));
    Ok(match t {
        DataType::Boolean => match v {
            J::Bool(b) => Cell::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(0) => Cell::Bool(false),
                Some(_) => Cell::Bool(true),
                None => return bad("a boolean (0 or 1)"),
            },
            _ => return bad("a boolean (0 or 1)"),
        },
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let i = match v {
                J::Number(n) => n.as_i64(),
                J::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            let Some(i) = i else { return bad("an integer") };
            let fits = match t {
                DataType::Int8 => i8::try_from(i).is_ok(),
                DataType::Int16 => i16::try_from(i).is_ok(),
                DataType::Int32 => i32::try_from(i).is_ok(),
                _ => true,
            };
            if !fits {
                return bad(&format!("within {t}"));
            }
            Cell::Int(i)
        }
        DataType::UInt64 => match v.as_u64() {
            Some(u) => Cell::UInt(u),
            None => return bad("an unsigned integer"),
        },
        DataType::Float32 | DataType::Float64 => match v {
            J::Number(n) => Cell::Float(n.as_f64().unwrap_or(0.0)),
            J::String(s) => match s.trim().parse::<f64>() {
                Ok(f) => Cell::Float(f),
                Err(_) => return bad("a number"),
            },
            _ => return bad("a number"),
        },
        DataType::Decimal128(_, s) => {
            let text = match v {
                J::String(s) => s.clone(),
                J::Number(n) => n.to_string(),
                _ => return bad("a decimal"),
            };
            match parse_decimal(&text, *s) {
                Some(d) => Cell::Decimal(d),
                None => return bad(&format!("a decimal of scale {s}")),
            }
        }
        DataType::Date32 => match v.as_str() {
            Some(s) if is_zero_date(s) => Cell::Null,
            Some(s) => match parse_date_days(s) {
                Some(d) => Cell::Temporal(d as i64),
                None => return bad("a date (YYYY-MM-DD)"),
            },
            None => return bad("a date (YYYY-MM-DD)"),
        },
        DataType::Timestamp(_, _) => match v.as_str() {
            Some(s) if is_zero_date(s) => Cell::Null,
            Some(s) => match parse_datetime_us(s) {
                Some(us) => Cell::Temporal(us),
                None => return bad("a datetime (YYYY-MM-DD HH:MM:SS[.ffffff])"),
            },
            None => return bad("a datetime"),
        },
        DataType::Time64(_) => match v.as_str().and_then(parse_time_us) {
            Some(us) if (0..86_400_000_000).contains(&us) => Cell::Temporal(us),
            _ => return bad("a time of day (00:00:00 to 23:59:59.999999)"),
        },
        DataType::Binary => match v.as_str() {
            Some(s) => match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(b) => Cell::Bin(b.into()),
                Err(_) => return bad("base64 bytes"),
            },
            None => return bad("base64 bytes"),
        },
        _ => match v {
            J::String(s) => Cell::Str(s.clone().into()),
            other => Cell::Str(other.to_string().into()),
        },
    })
}

impl LakeSchemaFile {
    /// From the table model read from a database's `information_schema`.
    pub fn from_model(model: &omrs_core::model::Model, source: String) -> LakeSchemaFile {
        let tables = model
            .tables
            .iter()
            .map(|(name, t)| {
                let columns = t
                    .columns
                    .iter()
                    .map(|c| LakeColumn { name: c.name.clone(), mysql_type: c.column_type.clone(), references: t.fk(&c.name).map(|f| f.ref_table.clone()), default: None })
                    .collect();
                (
                    name.clone(),
                    LakeTableDef { name: name.clone(), columns, pk: t.pk.clone(), has_uuid: t.has_uuid, shared_parent: t.shared_parent.clone() },
                )
            })
            .collect();
        LakeSchemaFile { source, tables }
    }

    /// Takes a table's new shape from a site (issue #25 §2): a new table gets its definition, a
    /// new column is appended (nullable; older files read it as null), and a column the site
    /// widened (`int` → `bigint`, `decimal(10,2)` → `decimal(12,4)`, `float` → `double`) takes
    /// the wider type: new files carry it, older ones are cast to it when read (the query
    /// layer reads each table in this schema, compaction conforms to it). Nothing else changes:
    /// the lake is a history, so a column dropped at one site stays (null in that site's new
    /// rows), and a type narrowed at one site stays wide.
    /// `scrubbed` says whether a column is scrubbed. Returns whether the schema changed.
    pub fn evolve(&mut self, shape: &omrs_core::shape::TableShape, scrubbed: &dyn Fn(&str, &str) -> bool) -> bool {
        if shape.dropped || shape.table.starts_with("omrs_sync_") || shape.table.starts_with("omrs_dash_") {
            return false;
        }
        let refs = |c: &str| shape.fks.iter().find(|f| f.column == c).map(|f| f.ref_table.clone());
        let column = |c: &omrs_core::shape::ColumnShape| LakeColumn { name: c.name.clone(), mysql_type: c.column_type.clone(), references: refs(&c.name), default: default_value(c.default_sql().as_deref()) };
        match self.tables.get_mut(&shape.table) {
            None => {
                let columns: Vec<LakeColumn> = shape.columns.iter().filter(|c| !scrubbed(&shape.table, &c.name)).map(column).collect();
                let has_uuid = columns.iter().any(|c| c.name == "uuid");
                self.tables.insert(shape.table.clone(), LakeTableDef { name: shape.table.clone(), columns, pk: shape.pk.clone(), has_uuid, shared_parent: shape.shared_parent.clone() });
                true
            }
            Some(def) => {
                let mut changed = false;
                for c in &shape.columns {
                    match def.columns.iter_mut().find(|d| d.name.eq_ignore_ascii_case(&c.name)) {
                        Some(d) if omrs_core::shape::widens(&d.mysql_type, &c.column_type) == Some(true) && arrow_type(&d.mysql_type) != arrow_type(&c.column_type) => {
                            d.mysql_type = c.column_type.clone();
                            changed = true;
                        }
                        Some(_) => {}
                        None if !scrubbed(&shape.table, &c.name) => {
                            def.columns.push(column(c));
                            def.has_uuid |= c.name == "uuid";
                            changed = true;
                        }
                        None => {}
                    }
                }
                changed
            }
        }
    }

    pub fn load(path: &Path) -> Result<Option<LakeSchemaFile>, SinkError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| SinkError::Lake(format!("{}: not a lake schema ({e})", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SinkError::io(format!("reading {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omrs_core::model::{ColumnInfo, Fk, TableModel};
    use omrs_core::shape::TableShape;

    #[test]
    fn a_new_lake_takes_its_tables_from_the_sites_base_shapes() {
        let col = |n: &str, t: &str| ColumnInfo { name: n.into(), column_type: t.into(), ..Default::default() };
        let patient = TableModel {
            name: "patient".into(),
            columns: vec![col("patient_id", "int(11)"), col("allergy_status", "varchar(50)"), col("secret", "varchar(9)")],
            pk: vec!["patient_id".into()],
            has_uuid: false,
            fks: vec![Fk { column: "patient_id".into(), ref_table: "person".into(), ref_column: "person_id".into() }],
            shared_parent: Some("person".into()),
            enums: Default::default(),
        };
        let mut file = LakeSchemaFile { source: "stream".into(), tables: BTreeMap::new() };
        let scrub = |t: &str, c: &str| t == "patient" && c == "secret";
        assert!(file.evolve(&TableShape::base_of(&patient), &scrub));
        let def = &file.tables["patient"];
        assert_eq!(def.columns.iter().map(|c| (c.name.as_str(), c.mysql_type.as_str(), c.references.as_deref())).collect::<Vec<_>>(), [
            ("patient_id", "int(11)", Some("person")),
            ("allergy_status", "varchar(50)", None)
        ]);
        assert_eq!((def.pk.clone(), def.has_uuid, def.shared_parent.as_deref()), (vec!["patient_id".to_string()], false, Some("person")));
        let t = LakeTable::new(def.clone());
        assert!(!t.site_local && t.fk_key_columns == ["patient_id"], "patient rows are keyed by their person");
        // The same shape from a second site changes nothing; a wider one widens.
        assert!(!file.evolve(&TableShape::base_of(&patient), &scrub));
        let mut wider = TableShape::base_of(&patient);
        wider.columns[1].column_type = "varchar(255)".into();
        assert!(!file.evolve(&wider, &scrub), "both are Utf8: nothing to change in the lake");
        wider.columns[0].column_type = "bigint(20)".into();
        assert!(file.evolve(&wider, &scrub));
        assert_eq!(file.tables["patient"].columns[0].mysql_type, "bigint(20)");
    }

    #[test]
    fn cells_are_typed_or_refused_with_the_value() {
        assert_eq!(cell(&J::from(1), &DataType::Boolean).unwrap(), Cell::Bool(true));
        assert_eq!(cell(&J::from("12.5000"), &DataType::Decimal128(12, 4)).unwrap(), Cell::Decimal(125000));
        assert_eq!(cell(&J::from("2024-01-02 03:04:05.123456"), &DataType::Timestamp(TimeUnit::Microsecond, None)).unwrap(), Cell::Temporal(1_704_164_645_123_456));
        assert_eq!(cell(&J::from("0000-00-00 00:00:00"), &DataType::Timestamp(TimeUnit::Microsecond, None)).unwrap(), Cell::Null);
        let e = cell(&J::from(300), &DataType::Int8).unwrap_err();
        assert!(e.contains("300") && e.contains("Int8"), "{e}");
        let e = cell(&J::from("abc"), &DataType::Date32).unwrap_err();
        assert!(e.contains("\"abc\"") && e.contains("date"), "{e}");
    }
}
