//! Site values → JSON values of the envelope, the same for a snapshot row (text protocol) and a
//! binlog row, so a row reads identically whichever way it reached Kafka.
//!
//! | MySQL | JSON |
//! |---|---|
//! | integer types, YEAR, BIT | number |
//! | FLOAT, DOUBLE | number (FLOAT through its shortest decimal form) |
//! | DECIMAL | string, exact |
//! | DATE / DATETIME / TIMESTAMP / TIME | string `YYYY-MM-DD[ HH:MM:SS[.ffffff]]` (TIMESTAMP in UTC) |
//! | CHAR, VARCHAR, TEXT, ENUM, SET | string (decoded with the column charset) |
//! | BINARY, VARBINARY, BLOB | string, base64 |

use base64::Engine;
use mysql_common::binlog::value::BinlogValue;
use mysql_common::constants::ColumnType;
use mysql_common::packets::Column;
use mysql_common::value::Value;
use serde_json::Value as J;

use omrs_core::model::TableModel;

/// Charset id 63 is `binary`.
pub(crate) const BINARY: u16 = 63;

pub(crate) fn is_latin1(charset: u16) -> bool {
    matches!(charset, 5 | 8 | 15 | 31 | 47 | 48 | 49 | 94)
}

fn text(bytes: &[u8], charset: u16) -> J {
    if charset == BINARY {
        return J::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if is_latin1(charset) {
        return J::String(bytes.iter().map(|&b| b as char).collect());
    }
    J::String(String::from_utf8_lossy(bytes).into_owned())
}

fn bits(bytes: &[u8]) -> J {
    let mut v: u64 = 0;
    for b in bytes.iter().take(8) {
        v = (v << 8) | *b as u64;
    }
    J::from(v)
}

#[allow(clippy::too_many_arguments)] // a date's seven fields as the binlog decodes them, on the hot path
fn datetime(y: u16, m: u8, d: u8, h: u8, i: u8, s: u8, us: u32, date_only: bool) -> J {
    if date_only {
        return J::String(format!("{y:04}-{m:02}-{d:02}"));
    }
    if us == 0 {
        J::String(format!("{y:04}-{m:02}-{d:02} {h:02}:{i:02}:{s:02}"))
    } else {
        J::String(format!("{y:04}-{m:02}-{d:02} {h:02}:{i:02}:{s:02}.{us:06}"))
    }
}

fn time(neg: bool, days: u32, h: u8, i: u8, s: u8, us: u32) -> J {
    let hours = days * 24 + h as u32;
    let sign = if neg { "-" } else { "" };
    if us == 0 {
        J::String(format!("{sign}{hours:02}:{i:02}:{s:02}"))
    } else {
        J::String(format!("{sign}{hours:02}:{i:02}:{s:02}.{us:06}"))
    }
}

pub(crate) fn f64_json(v: f64) -> J {
    serde_json::Number::from_f64(v).map(J::Number).unwrap_or(J::Null)
}

fn is_date_only(t: ColumnType) -> bool {
    matches!(t, ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE)
}

fn is_timestamp(t: ColumnType) -> bool {
    matches!(t, ColumnType::MYSQL_TYPE_TIMESTAMP | ColumnType::MYSQL_TYPE_TIMESTAMP2)
}

/// A value of a binlog row image.
pub fn binlog_value(value: &BinlogValue<'_>, col: &Column, enums: Option<&Vec<String>>) -> J {
    binlog_value_typed(value, col.column_type(), col.character_set(), enums)
}

/// [`binlog_value`] from the column's type and charset alone (what [`crate::encode`] knows of
/// a column).
pub fn binlog_value_typed(value: &BinlogValue<'_>, t: ColumnType, charset: u16, enums: Option<&Vec<String>>) -> J {
    use ColumnType::*;
    let v = match value {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(j) => {
            return serde_json::Value::try_from(j.clone()).unwrap_or(J::Null);
        }
        BinlogValue::JsonDiff(_) => return J::Null,
    };
    match v {
        Value::NULL => J::Null,
        Value::Int(i) => {
            if t == MYSQL_TYPE_ENUM {
                if let Some(values) = enums {
                    return values.get((*i as usize).wrapping_sub(1)).map(|s| J::String(s.clone())).unwrap_or(J::String(String::new()));
                }
            }
            if is_timestamp(t) {
                return timestamp_from_epoch(&i.to_string());
            }
            J::from(*i)
        }
        Value::UInt(u) => J::from(*u),
        Value::Float(f) => float32(*f),
        Value::Double(d) => f64_json(*d),
        Value::Date(y, m, d, h, i, s, us) => datetime(*y, *m, *d, *h, *i, *s, *us, is_date_only(t)),
        Value::Time(neg, days, h, i, s, us) => time(*neg, *days, *h, *i, *s, *us),
        Value::Bytes(b) => match t {
            MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => J::String(String::from_utf8_lossy(b).into_owned()),
            MYSQL_TYPE_YEAR => std::str::from_utf8(b).ok().and_then(|s| s.parse::<i64>().ok()).map(J::from).unwrap_or(J::Null),
            MYSQL_TYPE_BIT => bits(b),
            MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => timestamp_from_epoch(&String::from_utf8_lossy(b)),
            _ => text(b, charset),
        },
    }
}

pub(crate) fn float32(f: f32) -> J {
    format!("{f}").parse::<f64>().map(f64_json).unwrap_or(J::Null)
}

/// TIMESTAMP in the binlog is `seconds[.micros]` since the epoch; render it in UTC, as the
/// snapshot session (time_zone +00:00) does.
fn timestamp_from_epoch(s: &str) -> J {
    let (secs, micros) = match s.split_once('.') {
        Some((a, b)) => (a.parse::<i64>().unwrap_or(0), b.parse::<u32>().unwrap_or(0)),
        None => (s.parse::<i64>().unwrap_or(0), 0),
    };
    if secs == 0 && micros == 0 {
        return J::String("0000-00-00 00:00:00".into());
    }
    // A fraction of more than six digits is not a binlog TIMESTAMP (it overflowed here; found by
    // the `binlog_value` fuzz target).
    if micros >= 1_000_000 {
        return J::Null;
    }
    match chrono::DateTime::from_timestamp(secs, micros * 1000) {
        Some(dt) => {
            let f = if micros == 0 { "%Y-%m-%d %H:%M:%S" } else { "%Y-%m-%d %H:%M:%S%.6f" };
            J::String(dt.naive_utc().format(f).to_string())
        }
        None => J::Null,
    }
}

/// A value of a text-protocol result row (the snapshot).
pub fn text_value(value: &Value, col: &Column) -> J {
    use ColumnType::*;
    let t = col.column_type();
    let b = match value {
        Value::NULL => return J::Null,
        Value::Bytes(b) => b,
        // The text protocol only yields bytes; other variants come from the binary protocol.
        other => return binlog_value(&BinlogValue::Value(other.clone()), col, None),
    };
    let s = || String::from_utf8_lossy(b);
    match t {
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_LONG | MYSQL_TYPE_LONGLONG | MYSQL_TYPE_INT24 | MYSQL_TYPE_YEAR => {
            let s = s();
            s.parse::<i64>().map(J::from).or_else(|_| s.parse::<u64>().map(J::from)).unwrap_or(J::String(s.into_owned()))
        }
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => s().parse::<f64>().map(f64_json).unwrap_or(J::Null),
        MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => J::String(s().into_owned()),
        MYSQL_TYPE_BIT => bits(b),
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE | MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 | MYSQL_TYPE_TIMESTAMP
        | MYSQL_TYPE_TIMESTAMP2 | MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => {
            // Trailing zero microseconds are dropped, as the binlog decoder does.
            let s = s();
            let trimmed = match s.split_once('.') {
                Some((head, frac)) if frac.bytes().all(|c| c == b'0') => head.to_string(),
                Some((head, frac)) => format!("{head}.{frac:0<6}"),
                None => s.into_owned(),
            };
            J::String(trimmed)
        }
        _ => text(b, col.character_set()),
    }
}

/// The scrubbed columns of a table, from `table.column` entries.
pub fn scrubbed<'a>(table: &TableModel, scrub: &'a [String]) -> Vec<&'a str> {
    scrub
        .iter()
        .filter_map(|s| s.split_once('.'))
        .filter(|(t, _)| *t == table.name)
        .map(|(_, c)| c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(t: ColumnType, charset: u16) -> Column {
        Column::new(t).with_character_set(charset)
    }

    #[test]
    fn snapshot_and_binlog_render_the_same() {
        let dt = col(ColumnType::MYSQL_TYPE_DATETIME2, 63);
        assert_eq!(
            binlog_value(&BinlogValue::Value(Value::Date(2017, 5, 2, 10, 3, 4, 0)), &dt, None),
            text_value(&Value::Bytes(b"2017-05-02 10:03:04".to_vec()), &dt)
        );
        let dec = col(ColumnType::MYSQL_TYPE_NEWDECIMAL, 63);
        assert_eq!(binlog_value(&BinlogValue::Value(Value::Bytes(b"12.50".to_vec())), &dec, None), J::String("12.50".into()));
        assert_eq!(text_value(&Value::Bytes(b"12.50".to_vec()), &dec), J::String("12.50".into()));
        let f = col(ColumnType::MYSQL_TYPE_FLOAT, 63);
        assert_eq!(binlog_value(&BinlogValue::Value(Value::Float(1.1)), &f, None), text_value(&Value::Bytes(b"1.1".to_vec()), &f));
        let latin = col(ColumnType::MYSQL_TYPE_VARCHAR, 8);
        assert_eq!(text_value(&Value::Bytes(vec![0x4a, 0xfc]), &latin), J::String("Jü".into()));
        let blob = col(ColumnType::MYSQL_TYPE_BLOB, 63);
        assert_eq!(text_value(&Value::Bytes(vec![0, 1, 2]), &blob), J::String("AAEC".into()));
        let ts = col(ColumnType::MYSQL_TYPE_TIMESTAMP2, 63);
        assert_eq!(binlog_value(&BinlogValue::Value(Value::Bytes(b"1500000000".to_vec())), &ts, None), J::String("2017-07-14 02:40:00".into()));
        let us = col(ColumnType::MYSQL_TYPE_DATETIME2, 63);
        assert_eq!(
            binlog_value(&BinlogValue::Value(Value::Date(2017, 5, 2, 10, 3, 4, 120)), &us, None),
            text_value(&Value::Bytes(b"2017-05-02 10:03:04.000120".to_vec()), &us)
        );
    }
}
