//! The one MySQL → Arrow type map of omrs-stream, and the conversions of envelope values (the
//! JSON that the ingest agents write) into Arrow's representations.
//!
//! | MySQL (`information_schema.columns.column_type`) | Arrow |
//! |---|---|
//! | `tinyint(1)`, `bit(1)`, `bool` | Boolean |
//! | `tinyint` / `smallint` / `mediumint`, `int` / `bigint` | Int8 / Int16 / Int32 / Int64 (unsigned: the next wider signed type; `bigint unsigned`: UInt64) |
//! | `decimal(p,s)` | Decimal128(p, s) (p ≤ 38), else Utf8 |
//! | `float`, `double`, `real` | Float32, Float64 |
//! | `date` | Date32 |
//! | `datetime[(n)]`, `timestamp[(n)]` | Timestamp(µs), no time zone (site wall time, as OpenMRS stores it) |
//! | `time[(n)]` | Time64(µs) |
//! | `year` | Int16 |
//! | `char`, `varchar`, `*text`, `enum`, `set`, `json` | Utf8 |
//! | `binary`, `varbinary`, `*blob` | Binary (the envelope carries base64) |
//! | `bit(n)`, n > 1 | UInt64 |
//!
//! Zero dates (`0000-00-00`) have no Arrow value: they become null. Every other value that does
//! not fit its column's type is an error naming the column and the value.

use arrow_schema::{DataType, TimeUnit};
use chrono::Datelike;

/// The Arrow type of a MySQL column, from its `column_type`.
pub fn arrow_type(column_type: &str) -> DataType {
    let t = column_type.trim().to_ascii_lowercase();
    let unsigned = t.contains("unsigned");
    let base = t.split(['(', ' ']).next().unwrap_or("");
    let args: Vec<u32> = t
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(inner, _)| inner.split(',').filter_map(|a| a.trim().parse().ok()).collect())
        .unwrap_or_default();
    match base {
        "tinyint" if args.first() == Some(&1) && !unsigned => DataType::Boolean,
        "bool" | "boolean" => DataType::Boolean,
        "bit" if args.first().is_none_or(|n| *n == 1) => DataType::Boolean,
        "bit" => DataType::UInt64,
        "tinyint" => if unsigned { DataType::Int16 } else { DataType::Int8 },
        "smallint" => if unsigned { DataType::Int32 } else { DataType::Int16 },
        "mediumint" | "int" | "integer" => if unsigned { DataType::Int64 } else { DataType::Int32 },
        "bigint" => if unsigned { DataType::UInt64 } else { DataType::Int64 },
        "decimal" | "numeric" | "dec" | "fixed" => {
            let p = args.first().copied().unwrap_or(10);
            let s = args.get(1).copied().unwrap_or(0);
            if (1..=38).contains(&p) && s <= p {
                DataType::Decimal128(p as u8, s as i8)
            } else {
                DataType::Utf8
            }
        }
        "float" => DataType::Float32,
        "double" | "real" => DataType::Float64,
        "date" => DataType::Date32,
        "datetime" | "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "time" => DataType::Time64(TimeUnit::Microsecond),
        "year" => DataType::Int16,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => DataType::Binary,
        _ => DataType::Utf8,
    }
}

/// `YYYY-MM-DD` → days since the epoch; `None` for a zero or invalid date.
pub fn parse_date_days(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, c| c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u32))
    };
    let d = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    Some(d.num_days_from_ce() - 719_163)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (or a bare date) → µs since the epoch, wall time.
pub fn parse_datetime_us(s: &str) -> Option<i64> {
    if s.len() == 10 {
        return parse_date_days(s).map(|d| d as i64 * 86_400_000_000);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let days = parse_date_days(date)? as i64;
    Some(days * 86_400_000_000 + parse_time_us(time).filter(|t| (0..86_400_000_000).contains(t))?)
}

/// `[-]HH:MM:SS[.ffffff]` → µs (hours may exceed 24, as MySQL's TIME allows).
pub fn parse_time_us(s: &str) -> Option<i64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (hms, frac) = match s.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let sec: i64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || m >= 60 || sec >= 60 {
        return None;
    }
    let mut us = 0i64;
    if let Some(f) = frac {
        let digits: String = f.chars().take(6).collect();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        us = digits.parse::<i64>().ok()? * 10i64.pow(6 - digits.len() as u32);
    }
    let v = ((h * 60 + m) * 60 + sec) * 1_000_000 + us;
    Some(if neg { -v } else { v })
}

/// A decimal literal (`-12.3400`) → the unscaled i128 at `scale`; `None` if it does not parse
/// or has more fractional digits than the scale keeps.
pub fn parse_decimal(s: &str, scale: i8) -> Option<i128> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = scale.max(0) as usize;
    let frac_trimmed = frac.trim_end_matches('0');
    if frac_trimmed.len() > scale {
        return None;
    }
    let mut v: i128 = 0;
    for b in int.bytes() {
        v = v.checked_mul(10)?.checked_add((b - b'0') as i128)?;
    }
    for i in 0..scale {
        let d = frac.as_bytes().get(i).map(|b| (b - b'0') as i128).unwrap_or(0);
        v = v.checked_mul(10)?.checked_add(d)?;
    }
    Some(if neg { -v } else { v })
}

/// True for a MySQL zero date or datetime (`0000-00-00…`), which becomes null.
pub fn is_zero_date(s: &str) -> bool {
    s.starts_with("0000-00-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map() {
        assert_eq!(arrow_type("tinyint(1)"), DataType::Boolean);
        assert_eq!(arrow_type("tinyint(4)"), DataType::Int8);
        assert_eq!(arrow_type("int(11)"), DataType::Int32);
        assert_eq!(arrow_type("int(10) unsigned"), DataType::Int64);
        assert_eq!(arrow_type("bigint(20) unsigned"), DataType::UInt64);
        assert_eq!(arrow_type("decimal(12,4)"), DataType::Decimal128(12, 4));
        assert_eq!(arrow_type("decimal(65,2)"), DataType::Utf8);
        assert_eq!(arrow_type("datetime(6)"), DataType::Timestamp(TimeUnit::Microsecond, None));
        assert_eq!(arrow_type("date"), DataType::Date32);
        assert_eq!(arrow_type("double"), DataType::Float64);
        assert_eq!(arrow_type("varchar(255)"), DataType::Utf8);
        assert_eq!(arrow_type("enum('a','b')"), DataType::Utf8);
        assert_eq!(arrow_type("longblob"), DataType::Binary);
        assert_eq!(arrow_type("bit(1)"), DataType::Boolean);
    }

    #[test]
    fn values_parse() {
        assert_eq!(parse_decimal("-12.34", 4), Some(-123400));
        assert_eq!(parse_decimal("12.34500", 3), Some(12345));
        assert_eq!(parse_decimal("12.3456", 3), None);
        assert_eq!(parse_decimal("1e5", 0), None);
        assert_eq!(parse_datetime_us("1970-01-02 00:00:01.5"), Some(86_401_500_000));
        assert_eq!(parse_datetime_us("2024-02-30 00:00:00"), None);
        assert_eq!(parse_date_days("1970-01-11"), Some(10));
        assert_eq!(parse_time_us("-838:59:59"), Some(-(838 * 3600 + 59 * 60 + 59) * 1_000_000));
        assert!(is_zero_date("0000-00-00 00:00:00"));
    }
}
