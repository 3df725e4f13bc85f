//! Snapshot rows (the text protocol of a `SELECT`) straight to envelope JSON, as the binlog's
//! rows are ([`super`]): a plan per table from the result set's columns, each row's image written
//! as JSON into reused buffers, no `serde_json::Map` per row.
//!
//! Values are written as [`crate::convert::text_value`] renders them and serde_json serialises
//! them; the unit tests compare the two byte for byte, and a whole event with
//! `ChangeEvent::to_json`'s.

use std::sync::Arc;

use mysql_common::constants::{ColumnFlags, ColumnType};
use mysql_common::packets::Column;
use mysql_common::value::Value;
use omrs_core::model::{Model, TableModel};

use super::{json_key, json_str, push_i64, push_u64, write_string, ColPlan, Image, RowEncoder, TablePlan};
use crate::convert::{f64_json, text_value};
use crate::refs::Resolver;

impl TablePlan {
    /// The plan for the rows of a `SELECT` of `table`'s columns, whose result set has `columns`
    /// (scrubbed columns are not selected).
    pub fn for_result(columns: &[Column], table: Arc<TableModel>, site: &str, model: &Model, resolver: &mut Resolver) -> TablePlan {
        let names: Vec<String> = columns.iter().map(|c| c.name_str().into_owned()).collect();
        let cols = columns
            .iter()
            .zip(&names)
            .map(|(c, name)| ColPlan {
                ty: c.column_type(),
                meta: Box::new([]),
                unsigned: c.flags().contains(ColumnFlags::UNSIGNED_FLAG),
                charset: c.character_set(),
                key: json_key(name),
                scrub: false,
                // The text protocol sends ENUM values as their labels.
                enums: None,
            })
            .collect();
        Self::assemble(table, 0, cols, &names, site, model, resolver)
    }

    /// Writes a result row of this plan's `SELECT` as the row's after image (no before image).
    pub fn decode_text_row(&self, row: &mysql_async::Row, enc: &mut RowEncoder) {
        enc.before.present = false;
        let img: &mut Image = &mut enc.after;
        img.buf.clear();
        img.spans.clear();
        img.spans.resize(self.cols.len(), (0, 0));
        img.present = true;
        img.buf.push(b'{');
        let columns = row.columns_ref();
        for (i, c) in self.cols.iter().enumerate() {
            if i > 0 {
                img.buf.push(b',');
            }
            img.buf.extend_from_slice(&c.key);
            let start = img.buf.len();
            match (row.as_ref(i), columns.get(i)) {
                (Some(v), Some(col)) => write_text(&mut img.buf, v, c, col, &mut enc.scratch),
                _ => img.buf.extend_from_slice(b"null"),
            }
            img.spans[i] = (start as u32, img.buf.len() as u32);
        }
        img.buf.push(b'}');
    }
}

/// The JSON of a text-protocol value, as serde_json writes `text_value(..)`.
fn write_text(out: &mut Vec<u8>, value: &Value, c: &ColPlan, col: &Column, scratch: &mut String) {
    use ColumnType::*;
    let fallback = |out: &mut Vec<u8>| {
        let _ = serde_json::to_writer(&mut *out, &text_value(value, col));
    };
    let b = match value {
        Value::NULL => return out.extend_from_slice(b"null"),
        Value::Bytes(b) => b,
        _ => return fallback(out),
    };
    match c.ty {
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_LONG | MYSQL_TYPE_LONGLONG | MYSQL_TYPE_INT24 | MYSQL_TYPE_YEAR => {
            let s = std::str::from_utf8(b).ok();
            if let Some(n) = s.and_then(|s| s.parse::<i64>().ok()) {
                push_i64(out, n);
            } else if let Some(n) = s.and_then(|s| s.parse::<u64>().ok()) {
                push_u64(out, n);
            } else {
                fallback(out);
            }
        }
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => {
            let v = std::str::from_utf8(b).ok().and_then(|s| s.parse::<f64>().ok());
            match v {
                Some(v) => {
                    let _ = serde_json::to_writer(&mut *out, &f64_json(v));
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => json_str(out, &String::from_utf8_lossy(b)),
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE | MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 | MYSQL_TYPE_TIMESTAMP
        | MYSQL_TYPE_TIMESTAMP2 | MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => {
            // Trailing zero microseconds are dropped, as the binlog decoder does.
            let s = String::from_utf8_lossy(b);
            match s.split_once('.') {
                Some((head, frac)) if frac.bytes().all(|c| c == b'0') => json_str(out, head),
                Some((head, frac)) if frac.len() < 6 => {
                    scratch.clear();
                    scratch.push_str(head);
                    scratch.push('.');
                    scratch.push_str(frac);
                    scratch.extend(std::iter::repeat_n('0', 6 - frac.len()));
                    json_str(out, scratch);
                }
                _ => json_str(out, &s),
            }
        }
        MYSQL_TYPE_BIT => fallback(out),
        _ => write_string(out, b, c.charset, scratch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omrs_core::envelope::{ChangeEvent, Op, Row, Source};
    use omrs_core::model::ColumnInfo;

    fn column(name: &str, ty: ColumnType, charset: u16, unsigned: bool) -> Column {
        let c = Column::new(ty).with_name(name.as_bytes()).with_character_set(charset);
        if unsigned {
            c.with_flags(ColumnFlags::UNSIGNED_FLAG)
        } else {
            c
        }
    }

    /// The direct writer and serde_json over `text_value` agree byte for byte.
    #[test]
    fn text_values_are_written_as_serde_json_writes_them() {
        use ColumnType::*;
        let cases: Vec<(ColumnType, u16, bool, &[u8])> = vec![
            (MYSQL_TYPE_LONG, 63, false, b"-42"),
            (MYSQL_TYPE_LONGLONG, 63, false, b"-9223372036854775808"),
            (MYSQL_TYPE_LONGLONG, 63, true, b"18446744073709551615"),
            (MYSQL_TYPE_LONG, 63, false, b"007"),
            (MYSQL_TYPE_LONG, 63, false, b"not a number"),
            (MYSQL_TYPE_TINY, 63, false, b"1"),
            (MYSQL_TYPE_YEAR, 63, true, b"2020"),
            (MYSQL_TYPE_DOUBLE, 63, false, b"71.5"),
            (MYSQL_TYPE_DOUBLE, 63, false, b"1"),
            (MYSQL_TYPE_DOUBLE, 63, false, b"1e300"),
            (MYSQL_TYPE_DOUBLE, 63, false, b"-0"),
            (MYSQL_TYPE_DOUBLE, 63, false, b"nan?"),
            (MYSQL_TYPE_FLOAT, 63, false, b"1.1"),
            (MYSQL_TYPE_NEWDECIMAL, 63, false, b"12.50"),
            (MYSQL_TYPE_DATETIME, 63, false, b"2017-05-02 10:03:04"),
            (MYSQL_TYPE_DATETIME, 63, false, b"2017-05-02 10:03:04.000120"),
            (MYSQL_TYPE_DATETIME, 63, false, b"2017-05-02 10:03:04.000000"),
            (MYSQL_TYPE_DATETIME, 63, false, b"2017-05-02 10:03:04.12"),
            (MYSQL_TYPE_TIMESTAMP, 63, false, b"0000-00-00 00:00:00"),
            (MYSQL_TYPE_DATE, 63, false, b"2017-05-02"),
            (MYSQL_TYPE_TIME, 63, false, b"-26:02:03.5"),
            (MYSQL_TYPE_BIT, 63, true, &[1, 2]),
            (MYSQL_TYPE_BLOB, 63, false, &[0, 1, 2, 255]),
            (MYSQL_TYPE_VAR_STRING, 45, false, "Jü \"q\" \\ \n\t\u{1}/ 𝄞 ﬁ".as_bytes()),
            (MYSQL_TYPE_VAR_STRING, 45, false, &[0xff, b'a']),
            (MYSQL_TYPE_STRING, 8, false, &[0x4a, 0xfc]),
            (MYSQL_TYPE_STRING, 8, false, b"plain"),
            (MYSQL_TYPE_BLOB, 33, false, "long text".as_bytes()),
        ];
        for (ty, charset, unsigned, bytes) in cases {
            let col = column("c", ty, charset, unsigned);
            let c = ColPlan { ty, meta: Box::new([]), unsigned, charset, key: json_key("c"), scrub: false, enums: None };
            for v in [Value::Bytes(bytes.to_vec()), Value::NULL] {
                let mut got = Vec::new();
                write_text(&mut got, &v, &c, &col, &mut String::new());
                let want = serde_json::to_vec(&text_value(&v, &col)).unwrap();
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{ty:?} {v:?}");
            }
        }
    }

    fn info(name: &str, ty: &str) -> ColumnInfo {
        ColumnInfo { name: name.into(), column_type: ty.into(), ..Default::default() }
    }

    /// A snapshot row's event, written by the plan, is the bytes of the general path's
    /// `ChangeEvent` (a `Row` of `text_value`s, serialised), key included.
    #[test]
    fn a_snapshot_event_is_the_general_paths_bytes() {
        use ColumnType::*;
        let table = Arc::new(TableModel {
            name: "obs".into(),
            columns: vec![info("obs_id", "int(11)"), info("value_numeric", "double"), info("value_text", "text"), info("obs_datetime", "datetime"), info("uuid", "char(38)")],
            pk: vec!["obs_id".into()],
            has_uuid: true,
            fks: vec![],
            shared_parent: None,
            enums: Default::default(),
        });
        let columns: Arc<[Column]> = vec![
            column("obs_id", MYSQL_TYPE_LONG, 63, false),
            column("value_numeric", MYSQL_TYPE_DOUBLE, 63, false),
            column("value_text", MYSQL_TYPE_BLOB, 45, false),
            column("obs_datetime", MYSQL_TYPE_DATETIME, 63, false),
            column("uuid", MYSQL_TYPE_STRING, 45, false),
        ]
        .into();
        let values = vec![
            Value::Bytes(b"12".to_vec()),
            Value::Bytes(b"36.6".to_vec()),
            Value::Bytes("fièvre \"haute\"".as_bytes().to_vec()),
            Value::Bytes(b"2024-02-29 23:59:59.500000".to_vec()),
            Value::Bytes(b"6f1c2f6e-0000-4000-8000-000000000012".to_vec()),
        ];
        let row = mysql_common::row::new_row(values.clone(), columns.clone());
        let model = Model::default();
        let plan = TablePlan::for_result(&columns, table.clone(), "site-a", &model, &mut Resolver::new(4));
        let mut enc = RowEncoder::default();
        plan.decode_text_row(&row, &mut enc);
        assert_eq!(plan.int_key(&enc), Some(12));
        let uuid = plan.uuid(&enc).map(|u| u.into_owned());
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        super::super::source_parts(7, None, ("bin.000003", 456), 1_700_000_000_000, true, &mut head, &mut tail);
        let mut fast = crate::producer::Batch::default();
        plan.write_event(&enc, Op::Read, uuid.as_deref(), &[], (&head, 3, &tail), 1_700_000_000_123, &mut Vec::new(), &mut fast);

        let mut image = Row::new();
        for (v, c) in values.iter().zip(columns.iter()) {
            image.insert(c.name_str().into_owned(), text_value(v, c));
        }
        let ev = ChangeEvent {
            op: Op::Read,
            site: "site-a".into(),
            table: Some("obs".into()),
            key: Some(crate::stream::row_key(&table, &image)),
            uuid,
            before: None,
            after: Some(image),
            refs: Default::default(),
            source: Source { server_id: 7, gtid: None, file: "bin.000003".into(), pos: 456, row: 3, ts_ms: 1_700_000_000_000, snapshot: true },
            ts_ms: 1_700_000_000_123,
            oversize: None,
            schema: None,
        };
        let mut general = crate::producer::Batch::default();
        general.push_event(&ev);
        let (f, g): (Vec<_>, Vec<_>) = (fast.records().collect(), general.records().collect());
        assert_eq!(f.len(), 1);
        assert_eq!(String::from_utf8_lossy(f[0].0), String::from_utf8_lossy(g[0].0), "key");
        assert_eq!(String::from_utf8_lossy(f[0].1), String::from_utf8_lossy(g[0].1), "value");
    }
}
