//! One database's tables in uuid space, read in key order: the piece of `verify` that lets a
//! site's row, HQ's row and the lake's row be compared value for value.
//!
//! A row is keyed by its uuid, or by the uuid of the row whose key it shares (`patient` by its
//! `person`). Its own integer id is left out (HQ assigns its own), and every foreign key is
//! read as the uuid of the row it points to, resolved by the database itself (a `LEFT JOIN`
//! per reference), so nothing but one page of rows is held in memory. Values are read as the
//! server prints them (`CAST(… AS CHAR)`; `BIT` as a number, binary columns as hex), the same
//! for every server, so a site's text and HQ's text are equal exactly when the values are.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::SinkError;

/// Rows read per page.
const PAGE: usize = 5_000;

fn q(id: &str) -> String {
    format!("`{}`", id.replace('`', "``"))
}

/// Keys as the servers order them (`utf8_general_ci` on `[0-9A-Za-z-]`: case-insensitive).
pub fn key_cmp(a: &str, b: &str) -> Ordering {
    a.bytes().map(|x| x.to_ascii_lowercase()).cmp(b.bytes().map(|x| x.to_ascii_lowercase()))
}

/// The tables, columns, keys and references of one database, from `information_schema`.
#[derive(Debug, Default)]
pub struct DbModel {
    /// Table → (column, data type), in column order.
    columns: HashMap<String, Vec<(String, String)>>,
    pk: HashMap<String, Vec<String>>,
    /// (table, column) → (referenced table, referenced column).
    fks: HashMap<(String, String), (String, String)>,
}

impl DbModel {
    pub async fn load(c: &mut Conn, db: &str, what: &str) -> Result<DbModel, SinkError> {
        let cols: Vec<(String, String, String)> = c
            .exec(
                "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c
                   JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE'
                 WHERE c.table_schema = ? ORDER BY c.table_name, c.ordinal_position",
                (db,),
            )
            .await
            .map_err(|e| SinkError::db(format!("reading the columns of {what}"), e))?;
        type KeyRow = (String, String, String, Option<String>, Option<String>);
        let keys: Vec<KeyRow> = c
            .exec(
                "SELECT table_name, column_name, constraint_name, referenced_table_name, referenced_column_name
                 FROM information_schema.key_column_usage WHERE table_schema = ? ORDER BY table_name, ordinal_position",
                (db,),
            )
            .await
            .map_err(|e| SinkError::db(format!("reading the keys of {what}"), e))?;
        let mut m = DbModel::default();
        for (t, col, ty) in cols {
            m.columns.entry(t).or_default().push((col, ty.to_ascii_lowercase()));
        }
        for (t, col, cons, rt, rc) in keys {
            if cons == "PRIMARY" {
                m.pk.entry(t).or_default().push(col);
            } else if let (Some(rt), Some(rc)) = (rt, rc) {
                m.fks.insert((t, col), (rt, rc));
            }
        }
        Ok(m)
    }

    pub fn has_table(&self, t: &str) -> bool {
        self.columns.contains_key(t)
    }

    pub fn tables(&self) -> impl Iterator<Item = &String> {
        self.columns.keys()
    }

    pub fn columns(&self, t: &str) -> impl Iterator<Item = &str> {
        self.columns.get(t).into_iter().flatten().map(|(c, _)| c.as_str())
    }

    fn has_column(&self, t: &str, c: &str) -> bool {
        self.columns.get(t).is_some_and(|cs| cs.iter().any(|(n, _)| n == c))
    }

    fn data_type(&self, t: &str, c: &str) -> Option<&str> {
        self.columns.get(t)?.iter().find(|(n, _)| n == c).map(|(_, ty)| ty.as_str())
    }

    fn single_pk(&self, t: &str) -> Option<&str> {
        self.pk.get(t).filter(|p| p.len() == 1).map(|p| p[0].as_str())
    }

    /// The table holding the uuid that `table.column` stands for, and the column to join it
    /// on: the referenced table if it has a uuid and the reference is its key, else through a
    /// key shared with a parent (`patient.patient_id` → `person.person_id`).
    pub fn uuid_target(&self, table: &str, column: &str) -> Option<(String, String)> {
        let (mut t, mut c) = self.fks.get(&(table.to_string(), column.to_string()))?.clone();
        for _ in 0..4 {
            let own_key = self.single_pk(&t) == Some(c.as_str());
            if own_key && self.has_column(&t, "uuid") {
                return Some((t, c));
            }
            let next = self.fks.get(&(t.clone(), c.clone())).filter(|_| own_key)?.clone();
            (t, c) = next;
        }
        None
    }

    /// What a reference points to in uuid space: the table whose uuid it reads.
    pub fn references(&self, table: &str, column: &str) -> Option<String> {
        self.uuid_target(table, column).map(|(t, _)| t)
    }

    /// The table's own integer id, left out of comparisons (each server assigns its own).
    pub fn own_id(&self, table: &str) -> Option<&str> {
        let p = self.single_pk(table)?;
        (self.has_column(table, "uuid") || self.uuid_target(table, p).is_some()).then_some(p)
    }

    /// How the rows of `table` are keyed in uuid space: (join, key expression). None for a
    /// table that has no uuid and shares none.
    fn key_of(&self, table: &str) -> Option<(String, String)> {
        if self.has_column(table, "uuid") {
            return Some((String::new(), "t.uuid".into()));
        }
        let p = self.single_pk(table)?;
        let (rt, rc) = self.uuid_target(table, p)?;
        Some((format!(" JOIN {} k ON k.{} = t.{}", q(&rt), q(&rc), q(p)), "k.uuid".into()))
    }

    /// The keyed read of `cols` of `table` (None if the table is not keyed by a uuid here).
    /// A column this database lacks is read as NULL and marked absent.
    pub fn select(&self, table: &str, cols: &[String]) -> Option<Select> {
        let (key_join, key) = self.key_of(table)?;
        let mut fields = vec![key.clone()];
        let mut joins = key_join;
        let mut present = Vec::with_capacity(cols.len());
        for (i, c) in cols.iter().enumerate() {
            let Some(ty) = self.data_type(table, c) else {
                present.push(false);
                fields.push("NULL".into());
                continue;
            };
            present.push(true);
            let col = format!("t.{}", q(c));
            let field = if let Some((rt, rc)) = self.uuid_target(table, c) {
                joins.push_str(&format!(" LEFT JOIN {} j{i} ON j{i}.{} = {col}", q(&rt), q(&rc)));
                format!("IF({col} IS NULL, NULL, COALESCE(j{i}.uuid, CONCAT('#', {col})))")
            } else if ty == "bit" {
                format!("CAST({col} + 0 AS CHAR)")
            } else if ty.contains("blob") || ty.contains("binary") {
                format!("HEX({col})")
            } else {
                format!("CAST({col} AS CHAR)")
            };
            fields.push(field);
        }
        Some(Select { head: format!("SELECT {} FROM {} t{joins}", fields.join(", "), q(table)), key, present, table: table.to_string() })
    }
}

/// One table's keyed read on one server.
#[derive(Debug, Clone)]
pub struct Select {
    head: String,
    key: String,
    /// Per compared column: whether this server's table has it.
    pub present: Vec<bool>,
    table: String,
}

/// A row in uuid space: its key and its values, in the order of the compared columns.
pub type KeyedRow = (String, Vec<Option<String>>);

/// Pages through a [`Select`] in key order.
pub struct Pager {
    sel: Select,
    after: String,
    buf: VecDeque<KeyedRow>,
    done: bool,
    what: String,
}

fn text(v: mysql_async::Value) -> Option<String> {
    match v {
        mysql_async::Value::NULL => None,
        mysql_async::Value::Bytes(b) => Some(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())),
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

impl Pager {
    pub fn new(sel: Select, what: &str) -> Pager {
        Pager { sel, after: String::new(), buf: VecDeque::new(), done: false, what: what.to_string() }
    }

    pub fn present(&self) -> &[bool] {
        &self.sel.present
    }

    /// The next row's key, reading the next page when needed.
    pub async fn peek(&mut self, c: &mut Conn) -> Result<Option<&str>, SinkError> {
        if self.buf.is_empty() && !self.done {
            let sql = format!("{} WHERE {k} > ? ORDER BY {k} LIMIT {PAGE}", self.sel.head, k = self.sel.key);
            let rows: Vec<mysql_async::Row> =
                c.exec(sql, (self.after.as_str(),)).await.map_err(|e| SinkError::db(format!("reading {}.{} in key order", self.what, self.sel.table), e))?;
            self.done = rows.len() < PAGE;
            for r in rows {
                let mut vals = r.unwrap().into_iter().map(text);
                let Some(key) = vals.next().flatten() else { continue };
                // The merge below relies on the server's order being ours.
                if !self.after.is_empty() && key_cmp(&key, &self.after) != Ordering::Greater {
                    return Err(SinkError::Query(format!(
                        "{}.{}: the server returned key {key} after {} (a uuid collation verify does not know)",
                        self.what, self.sel.table, self.after
                    )));
                }
                self.after.clone_from(&key);
                self.buf.push_back((key, vals.collect()));
            }
        }
        Ok(self.buf.front().map(|(k, _)| k.as_str()))
    }

    pub fn pop(&mut self) -> Option<KeyedRow> {
        self.buf.pop_front()
    }
}

/// A value as text in one form for the servers (`CAST(… AS CHAR)`) and the lake (Arrow cast
/// to text): booleans as 1/0, datetimes with a space and without trailing zero fractions,
/// numbers in their shortest form, MySQL's zero dates as NULL (the lake cannot hold them).
pub fn norm(v: Option<&str>) -> Option<String> {
    let s = v?;
    match s {
        "true" => return Some("1".into()),
        "false" => return Some("0".into()),
        _ => {}
    }
    if s.starts_with("0000-00-00") {
        return None;
    }
    let b = s.as_bytes();
    if b.len() >= 19 && b[4] == b'-' && b[7] == b'-' && (b[10] == b'T' || b[10] == b' ') && b[13] == b':' {
        let mut t = s.replacen('T', " ", 1);
        if t.len() > 19 && t.as_bytes()[19] == b'.' {
            while t.ends_with('0') {
                t.pop();
            }
            if t.ends_with('.') {
                t.pop();
            }
        }
        return Some(t);
    }
    if !s.is_empty() && s.bytes().any(|c| c.is_ascii_digit()) && s.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'e' | b'E' | b'+')) {
        if let Ok(f) = s.parse::<f64>() {
            return Some(format!("{f}"));
        }
    }
    Some(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_as_the_servers_order_them() {
        assert_eq!(key_cmp("5089AAAA", "5089abcd"), Ordering::Less);
        assert_eq!(key_cmp("a-1", "A-1"), Ordering::Equal);
        assert_eq!(key_cmp("0-", "00"), Ordering::Less);
    }

    #[test]
    fn values_normalise_the_same_from_servers_and_the_lake() {
        assert_eq!(norm(Some("true")), Some("1".into()));
        assert_eq!(norm(Some("2026-12-04T03:08:46")), norm(Some("2026-12-04 03:08:46")));
        assert_eq!(norm(Some("2026-12-04T03:08:46.500")), norm(Some("2026-12-04 03:08:46.500000")));
        assert_eq!(norm(Some("2026-12-04 03:08:46.000000")), Some("2026-12-04 03:08:46".into()));
        assert_eq!(norm(Some("12.3400")), norm(Some("12.34")));
        assert_eq!(norm(Some("0000-00-00 00:00:00")), None);
        assert_eq!(norm(None), None);
        assert_eq!(norm(Some("ID-0012")), Some("ID-0012".into()));
    }
}
