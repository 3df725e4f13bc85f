//! Debezium's JSON values → the envelope's values ([`crate::convert`]'s table), by the column's
//! type in the table model, so that a row reads the same whether this project's agent or
//! Debezium captured it.
//!
//! | MariaDB/MySQL | Debezium (JsonConverter) | envelope |
//! |---|---|---|
//! | DATETIME(0–3) | ms since the epoch of the wall-clock value read as UTC (`io.debezium.time.Timestamp`) | `YYYY-MM-DD HH:MM:SS[.ffffff]`, the wall clock |
//! | DATETIME(4–6) | µs, the same way (`MicroTimestamp`) | the same |
//! | DATE | days since the epoch (`io.debezium.time.Date`) | `YYYY-MM-DD` |
//! | TIMESTAMP | `2024-01-02T03:04:05Z`, UTC (`ZonedTimestamp`) | UTC, `YYYY-MM-DD HH:MM:SS` |
//! | TIME | µs (`MicroTime`), or ms (`Time`) | `[-]HH:MM:SS[.ffffff]` |
//! | TINYINT(1), integers, YEAR | number | number |
//! | BIT(1) | boolean | number |
//! | BIT(n) | base64 of the bits, least significant byte first (`io.debezium.data.Bits`) | number |
//! | DECIMAL | string (`decimal.handling.mode=string`), base64 of the unscaled value (`precise`), or a number (`double`) | string, with the column's scale |
//! | FLOAT, DOUBLE | number | number (FLOAT through its shortest decimal form) |
//! | CHAR, VARCHAR, TEXT, ENUM, SET, JSON | string | string |
//! | BINARY, VARBINARY, BLOB | base64 | base64 |
//!
//! `time.precision.mode=connect` (every DATETIME in ms, TIME in ms, DATE in days) reads the same
//! way: a number is read as ms, µs or days by the column type and its fractional digits.

use base64::Engine;
use serde_json::Value as J;

/// The envelope's value of `v`, a value Debezium wrote for a column of type `column_type` (as
/// `information_schema.columns.column_type` names it: `datetime`, `decimal(19,4)`, `bit(1)`…).
/// An Err names what did not fit.
pub fn value(column_type: &str, v: &J) -> Result<J, String> {
    if v.is_null() {
        return Ok(J::Null);
    }
    let t = column_type.trim().to_ascii_lowercase();
    let base = t.split(['(', ' ']).next().unwrap_or("");
    let digits = || args(&t).first().copied().unwrap_or(0);
    let bad = || format!("a {column_type} column holds {v}");
    match base {
        "datetime" => match v {
            J::Number(n) => {
                let n = n.as_i64().ok_or_else(bad)?;
                let us = if digits() > 3 { n } else { n.checked_mul(1000).ok_or_else(bad)? };
                wall_clock(us).ok_or_else(bad)
            }
            // `time.precision.mode` string forms (ISO 8601).
            J::String(s) => Ok(J::String(iso_to_sql(s))),
            _ => Err(bad()),
        },
        "timestamp" => match v {
            J::String(s) => Ok(J::String(iso_to_sql(s))),
            J::Number(n) => wall_clock(n.as_i64().ok_or_else(bad)?.checked_mul(1000).ok_or_else(bad)?).ok_or_else(bad),
            _ => Err(bad()),
        },
        "date" => match v {
            J::Number(n) => {
                let days = n.as_i64().ok_or_else(bad)?;
                let d = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|e| e.checked_add_signed(chrono::Duration::days(days)))
                    .ok_or_else(bad)?;
                Ok(J::String(d.format("%Y-%m-%d").to_string()))
            }
            J::String(s) => Ok(J::String(s.get(..10).unwrap_or(s).to_string())),
            _ => Err(bad()),
        },
        "time" => match v {
            J::Number(n) => {
                let n = n.as_i64().ok_or_else(bad)?;
                // MicroTime unless `time.precision.mode=connect` (ms), which cannot be told
                // from the value: a TIME of OpenMRS has no fraction, and µs is the default.
                Ok(time_of_day(n))
            }
            J::String(s) => Ok(J::String(s.clone())),
            _ => Err(bad()),
        },
        "bit" => match v {
            J::Bool(b) => Ok(J::from(u64::from(*b))),
            J::Number(_) => Ok(v.clone()),
            J::String(s) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| bad())?;
                // io.debezium.data.Bits: little-endian.
                Ok(J::from(bytes.iter().take(8).rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))))
            }
            _ => Err(bad()),
        },
        "decimal" | "numeric" => {
            let scale = args(&t).get(1).copied().unwrap_or(0);
            match v {
                J::String(s) => match base64_decimal(s, scale) {
                    // `precise`: base64 of a two's-complement big-endian unscaled integer. A
                    // plain decimal string never decodes as base64 of a few bytes and parses
                    // as a number too, so a string that parses is taken as written.
                    Some(d) if s.parse::<f64>().is_err() => Ok(J::String(d)),
                    _ => Ok(J::String(with_scale(s, scale))),
                },
                J::Number(n) => Ok(J::String(with_scale(&n.to_string(), scale))),
                _ => Err(bad()),
            }
        }
        "float" => match v {
            J::Number(n) => Ok(crate::convert::float32(n.as_f64().ok_or_else(bad)? as f32)),
            J::String(s) => s.parse::<f32>().map(crate::convert::float32).map_err(|_| bad()),
            _ => Err(bad()),
        },
        "double" | "real" => match v {
            J::Number(_) => Ok(v.clone()),
            J::String(s) => s.parse::<f64>().map(crate::convert::f64_json).map_err(|_| bad()),
            _ => Err(bad()),
        },
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => match v {
            J::Number(_) => Ok(v.clone()),
            J::Bool(b) => Ok(J::from(i64::from(*b))),
            // bigint.unsigned.handling.mode=precise writes a decimal.
            J::String(s) => s.parse::<u64>().map(J::from).or_else(|_| s.parse::<i64>().map(J::from)).map_err(|_| bad()),
            _ => Err(bad()),
        },
        _ => match v {
            J::String(_) => Ok(v.clone()),
            // A JSON column's value arrives as text already; anything else is kept as written.
            other => Ok(J::String(other.to_string())),
        },
    }
}

/// The numbers in a column type's parentheses: `decimal(19,4)` → [19, 4].
fn args(t: &str) -> Vec<u32> {
    let Some((_, rest)) = t.split_once('(') else { return Vec::new() };
    rest.split(')').next().unwrap_or("").split(',').filter_map(|a| a.trim().parse().ok()).collect()
}

/// µs since the epoch as the wall-clock text the site wrote.
fn wall_clock(us: i64) -> Option<J> {
    let dt = chrono::DateTime::from_timestamp_micros(us)?.naive_utc();
    let f = if us.rem_euclid(1_000_000) == 0 { "%Y-%m-%d %H:%M:%S" } else { "%Y-%m-%d %H:%M:%S%.6f" };
    Some(J::String(dt.format(f).to_string()))
}

/// `2024-01-02T03:04:05.120Z` → `2024-01-02 03:04:05.120000`.
fn iso_to_sql(s: &str) -> String {
    let s = s.trim_end_matches('Z').replacen('T', " ", 1);
    match s.split_once('.') {
        Some((head, frac)) if frac.bytes().all(|c| c == b'0') => head.to_string(),
        Some((head, frac)) => format!("{head}.{frac:0<6}"),
        None => s,
    }
}

fn time_of_day(us: i64) -> J {
    let sign = if us < 0 { "-" } else { "" };
    let a = us.unsigned_abs();
    let (secs, frac) = (a / 1_000_000, a % 1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        J::String(format!("{sign}{h:02}:{m:02}:{s:02}"))
    } else {
        J::String(format!("{sign}{h:02}:{m:02}:{s:02}.{frac:06}"))
    }
}

/// A decimal string with exactly `scale` fractional digits, as the server prints the column.
fn with_scale(s: &str, scale: u32) -> String {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if scale == 0 {
        return int.to_string();
    }
    let mut frac = frac.to_string();
    frac.truncate(scale as usize);
    format!("{int}.{frac:0<width$}", width = scale as usize)
}

/// `decimal.handling.mode=precise`: base64 of the unscaled value, two's complement, big-endian.
fn base64_decimal(s: &str, scale: u32) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let neg = bytes[0] & 0x80 != 0;
    let mut n: i128 = if neg { -1 } else { 0 };
    for b in &bytes {
        n = (n << 8) | i128::from(*b);
    }
    let digits = n.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if neg { "-" } else { "" };
    Some(if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_read_as_the_site_wrote_them() {
        // 2017-05-02 10:03:04 as Debezium writes a DATETIME: the wall clock read as UTC.
        assert_eq!(value("datetime", &json!(1_493_719_384_000i64)).unwrap(), json!("2017-05-02 10:03:04"));
        assert_eq!(value("datetime(6)", &json!(1_493_719_384_000_120i64)).unwrap(), json!("2017-05-02 10:03:04.000120"));
        assert_eq!(value("date", &json!(17_288)).unwrap(), json!("2017-05-02"));
        assert_eq!(value("date", &json!(-1)).unwrap(), json!("1969-12-31"));
        assert_eq!(value("timestamp", &json!("2017-05-02T10:03:04Z")).unwrap(), json!("2017-05-02 10:03:04"));
        assert_eq!(value("time", &json!(37_384_000_000i64)).unwrap(), json!("10:23:04"));
        assert_eq!(value("datetime", &J::Null).unwrap(), J::Null);
    }

    #[test]
    fn numbers_bits_and_decimals() {
        assert_eq!(value("tinyint(1)", &json!(1)).unwrap(), json!(1));
        assert_eq!(value("bit(1)", &json!(true)).unwrap(), json!(1));
        assert_eq!(value("bit(16)", &json!("AQI=")).unwrap(), json!(0x0201));
        assert_eq!(value("decimal(19,4)", &json!("12.5")).unwrap(), json!("12.5000"));
        assert_eq!(value("decimal(19,4)", &json!(12.5)).unwrap(), json!("12.5000"));
        // precise: 125000 unscaled = 0x01E848 → 12.5000
        assert_eq!(value("decimal(19,4)", &json!("AehI")).unwrap(), json!("12.5000"));
        assert_eq!(value("decimal(5,2)", &json!("/w==")).unwrap(), json!("-0.01"));
        assert_eq!(value("float", &json!(36.6)).unwrap(), json!(36.6));
        assert_eq!(value("double", &json!(1.25)).unwrap(), json!(1.25));
        assert_eq!(value("bigint(20) unsigned", &json!("18446744073709551615")).unwrap(), json!(u64::MAX));
    }

    #[test]
    fn text_stays_text_and_wrong_types_are_named() {
        assert_eq!(value("varchar(255)", &json!("Jü")).unwrap(), json!("Jü"));
        assert_eq!(value("longblob", &json!("AAEC")).unwrap(), json!("AAEC"));
        let e = value("datetime", &json!({"a": 1})).unwrap_err();
        assert!(e.contains("datetime") && e.contains("{\"a\":1}"), "{e}");
    }
}
