//! SQL literal building for the text protocol. The simulator sends each logical OpenMRS
//! transaction as one `START TRANSACTION; …; COMMIT;` string (and several of them per round
//! trip in burst mode), so every value is rendered as an escaped literal here.

use std::fmt::Write;

use chrono::{NaiveDate, NaiveDateTime};

/// A quoted, escaped string literal.
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x1a' => out.push_str("\\Z"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

pub fn qo(s: Option<&str>) -> String {
    s.map(q).unwrap_or_else(|| "NULL".into())
}

pub fn dt(d: NaiveDateTime) -> String {
    format!("'{}'", d.format("%Y-%m-%d %H:%M:%S"))
}

pub fn date(d: NaiveDate) -> String {
    format!("'{}'", d.format("%Y-%m-%d"))
}

pub fn io(v: Option<i64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into())
}

/// A multi-row `INSERT INTO table (cols) VALUES (…),(…)`.
pub struct Insert {
    sql: String,
    rows: u64,
}

impl Insert {
    pub fn new(table: &str, cols: &[&str]) -> Self {
        let mut sql = String::with_capacity(256);
        let _ = write!(sql, "INSERT INTO {table} ({}) VALUES ", cols.join(","));
        Insert { sql, rows: 0 }
    }

    pub fn row(&mut self, values: &[String]) {
        if self.rows > 0 {
            self.sql.push(',');
        }
        self.sql.push('(');
        self.sql.push_str(&values.join(","));
        self.sql.push(')');
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends the statement (if it has rows) to a transaction.
    pub fn finish(self, tx: &mut crate::site::Tx) {
        if self.rows > 0 {
            tx.stmt(&self.sql, self.rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_everything_mariadb_interprets() {
        assert_eq!(q("O'Brien \\ x\n"), "'O\\'Brien \\\\ x\\n'");
        assert_eq!(qo(None), "NULL");
    }
}
