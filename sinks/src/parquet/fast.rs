//! The Parquet sink's fast path: a `change` record of a table keyed by uuid, read by core's
//! decoder with row images as [`RawPairs`] (column and raw JSON borrowed from the record, in
//! table order), each value typed from its raw text, without building a JSON tree.
//!
//! Anything unusual (another record type, a table keyed by its columns, an envelope of the
//! wrong shape) returns `None`, and the caller takes the general path
//! ([`super::schema::convert`] over `HqEvent`), which also names what is wrong for the DLQ.
//! The lake test compares the result of both paths with HQ, and the unit test below compares
//! them field by field.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::DataType;
use omrs_core::arrow_map::{is_zero_date, parse_datetime_us};
use omrs_core::envelope::{Op, RawPairs};
use omrs_core::hq::{change_ms, HqEvent};
use omrs_core::zone::SiteRules;
use serde_json::value::RawValue;

use super::schema::{cell, keeps_own_person, Cell, LakeTable};
use super::write::Meta;

/// The text of a JSON string without its quotes, unescaped only when it has escapes.
fn text(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(s).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// One raw value as a cell of type `t`: the common cases from the text, the rest through
/// [`cell`] (the same rules either way).
fn raw_cell<'a>(raw: &'a RawValue, t: &DataType) -> Result<Cell<'a>, String> {
    let s = raw.get();
    if s == "null" {
        return Ok(Cell::Null);
    }
    let quick = match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => s.parse::<i64>().ok().filter(|i| match t {
            DataType::Int8 => i8::try_from(*i).is_ok(),
            DataType::Int16 => i16::try_from(*i).is_ok(),
            DataType::Int32 => i32::try_from(*i).is_ok(),
            _ => true,
        }).map(Cell::Int),
        DataType::Utf8 if s.starts_with('"') => text(raw).map(Cell::Str),
        DataType::Boolean => match s {
            "0" | "false" => Some(Cell::Bool(false)),
            "1" | "true" => Some(Cell::Bool(true)),
            _ => None,
        },
        DataType::Float64 => s.parse::<f64>().ok().filter(|f| f.is_finite()).map(Cell::Float),
        DataType::Timestamp(_, _) => text(raw).and_then(|t| if is_zero_date(&t) { Some(Cell::Null) } else { parse_datetime_us(&t).map(Cell::Temporal) }),
        _ => None,
    };
    match quick {
        Some(c) => Ok(c),
        None => {
            let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("{s}: {e}"))?;
            cell(&v, t)
        }
    }
}

/// Decodes one `omrs.hq.changes` record on the fast path and hands the row to `out` (its
/// table, meta fields and cells, borrowed from `payload`). `None`: take the general path.
/// `Some(Err)`: a value does not fit its column (the reason names both).
pub fn decode(
    payload: &[u8],
    tables: &HashMap<String, Arc<LakeTable>>,
    rules: &SiteRules,
    partition: i32,
    offset: i64,
    out: impl FnOnce(&Arc<LakeTable>, &Meta<'_>, &[Cell<'_>]),
) -> Option<Result<(), String>> {
    let HqEvent::Change { late, person, origin_refs, event: ev } = serde_json::from_slice::<HqEvent<RawPairs<'_>>>(payload).ok()? else {
        return None;
    };
    let table = tables.get(ev.table.as_deref()?)?;
    if !(table.def.has_uuid || table.def.shared_parent.is_some()) {
        return None;
    }
    let uuid = ev.uuid.as_deref().filter(|u| !u.is_empty())?;
    let image = match (ev.op, ev.before.is_some(), ev.after.is_some(), ev.source.snapshot) {
        (Op::Create, false, true, false) | (Op::Read, false, true, true) | (Op::Update, true, true, false) => ev.after.as_ref()?,
        (Op::Delete, true, false, false) => ev.before.as_ref()?,
        _ => return None,
    };
    let mut cells: Vec<Cell<'_>> = Vec::with_capacity(table.schema.fields().len());
    let mut cursor = 0;
    for (c, t) in table.def.columns.iter().zip(&table.types) {
        // Images are in table order: the next pair is nearly always the column.
        let raw = match image.at(cursor) {
            Some((k, v)) if k == c.name => {
                cursor += 1;
                Some(v)
            }
            _ => image.get(&c.name),
        };
        let cell = match raw {
            None => match &c.default {
                // A column the row's site does not have yet (issue #25): its default.
                Some(d) => match super::schema::cell(d, t) {
                    Ok(c) => c,
                    Err(why) => return Some(Err(format!("{}.{}: {why}", table.def.name, c.name))),
                },
                None => Cell::Null,
            },
            Some(r) => match raw_cell(r, t) {
                Ok(c) => c,
                Err(why) => return Some(Err(format!("{}.{}: {why}", table.def.name, c.name))),
            },
        };
        cells.push(cell);
        if c.references.is_some() {
            let own = keeps_own_person(&table.def.name, &c.name).then(|| origin_refs.get(&c.name).and_then(|v| v.as_str()).map(Cow::Borrowed)).flatten();
            cells.push(match own.or_else(|| ev.refs.get(&c.name).and_then(text)) {
                Some(u) => Cell::Str(u),
                None => Cell::Null,
            });
        }
    }
    let dates = |col: &str| if ev.op == Op::Delete { None } else { ev.after.as_ref().and_then(|a| a.get(col)).and_then(text) };
    let (changed, created) = (dates("date_changed"), dates("date_created"));
    let s = &ev.source;
    thread_local! {
        static POSITION: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    POSITION.with(|pos| {
        use std::fmt::Write;
        let mut position = pos.borrow_mut();
        position.clear();
        let _ = write!(position, "{}:{:020}:{:010}", s.file, s.pos, s.row);
        let meta = Meta {
            op: ev.op.as_str(),
            event_ms: s.ts_ms,
            site: &ev.site,
            uuid: Some(uuid),
            person: person.as_deref(),
            late,
            row_key: uuid,
            change_ms: change_ms(
                &rules.get(&ev.site).zone,
                changed.as_deref(),
                created.as_deref(),
                s.ts_ms,
            ),
            priority: rules.get(&ev.site).priority,
            position: &position,
            rewritten: !origin_refs.is_empty(),
            partition,
            offset,
        };
        out(table, &meta, &cells);
    });
    Some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::{convert, LakeColumn, LakeTableDef};
    use omrs_core::hq::HqEvent;

    fn table() -> Arc<LakeTable> {
        let col = |n: &str, t: &str, r: Option<&str>| LakeColumn { name: n.into(), mysql_type: t.into(), references: r.map(str::to_string), default: None };
        Arc::new(LakeTable::new(LakeTableDef {
            name: "obs".into(),
            columns: vec![
                col("obs_id", "int(11)", None),
                col("person_id", "int(11)", Some("person")),
                col("value_numeric", "double", None),
                col("value_text", "text", None),
                col("amount", "decimal(12,4)", None),
                col("voided", "tinyint(1)", None),
                col("date_created", "datetime", None),
                col("date_changed", "datetime(6)", None),
                col("uuid", "char(38)", None),
            ],
            pk: vec!["obs_id".into()],
            has_uuid: true,
            shared_parent: None,
        }))
    }

    #[test]
    fn the_fast_path_types_every_value_as_the_general_path_does() {
        let t = table();
        let tables: HashMap<String, Arc<LakeTable>> = [("obs".to_string(), t.clone())].into();
        let prio = SiteRules::new([("site-a".to_string(), omrs_core::zone::SiteRule { priority: 3, ..Default::default() })]);
        let payload = br#"{"type":"change","late":true,"person":"p-1","origin_refs":{"person_id":"p-0"},"event":{"op":"u","site":"site-a","table":"obs","key":{"obs_id":7},"uuid":"o-7","before":{"obs_id":7},"after":{"obs_id":7,"person_id":3,"value_text":"caf\u00e9 \"x\"","value_numeric":70.5,"amount":"-12.3400","voided":1,"date_created":"2024-01-02 03:04:05","date_changed":"2024-01-03 00:00:00.000001","uuid":"o-7"},"refs":{"person_id":"p-1"},"source":{"server_id":11,"file":"binlog.000002","pos":99,"row":1,"ts_ms":1700000000000},"ts_ms":1700000000001}}"#;
        let mut fast = None;
        decode(payload, &tables, &prio, 0, 5, |_, m, cells| {
            fast = Some((m.row_key.to_string(), m.uuid.map(str::to_string), m.person.map(str::to_string), m.late, m.rewritten, m.change_ms, m.position.to_string(), cells.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>()))
        })
        .unwrap()
        .unwrap();
        let fast = fast.unwrap();
        let ev: HqEvent = serde_json::from_slice(payload).unwrap();
        let HqEvent::Change { late, person, origin_refs, event } = ev else { panic!() };
        let slow = convert(&t, &event, late, person, &origin_refs, prio.get("site-a"), 0, 5).unwrap();
        let slow_cells: Vec<String> = slow.cells.iter().map(|c| format!("{c:?}")).collect();
        assert_eq!(fast.7, slow_cells);
        assert_eq!((fast.5, fast.6.as_str()), (slow.version.change_ms, slow.version.position.as_str()));
        assert_eq!((fast.0, fast.1, fast.2, fast.3, fast.4), (slow.row_key, slow.uuid, slow.person, slow.late, slow.rewritten));
        assert_eq!(slow.cells[4], Cell::Str("café \"x\"".into()));
        // A value that does not fit is named; another record type takes the general path.
        let bad = String::from_utf8_lossy(payload).replace(r#""amount":"-12.3400""#, r#""amount":"1.23456""#);
        assert!(decode(bad.as_bytes(), &tables, &prio, 0, 5, |_, _, _| {}).unwrap().unwrap_err().contains("obs.amount"));
        assert!(decode(br#"{"type":"watermark","ts_ms":5}"#, &tables, &prio, 0, 5, |_, _, _| {}).is_none());
    }
}
