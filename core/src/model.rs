//! The table model of an OpenMRS database, read from its own `information_schema` (a site's by
//! its agent at start and after DDL, HQ's by its sink): primary keys, the uuid column, foreign
//! keys, tables that share their key with a parent (`patient` → `person`), column types, and
//! the FK-dependency order (parents first) used by the snapshot and by HQ's writes.

// Rows read from SQL come back as tuples named by their SELECT.
#![allow(clippy::type_complexity)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::CoreError;

#[derive(Debug, Clone)]
pub struct Fk {
    pub column: String,
    pub ref_table: String,
    pub ref_column: String,
}

#[derive(Debug, Clone, Default)]
pub struct ColumnInfo {
    pub name: String,
    /// `information_schema.columns.column_type`, e.g. `int(11)`, `enum('a','b')`.
    pub column_type: String,
    /// `is_nullable = 'NO'`.
    pub not_null: bool,
    /// `information_schema.columns.column_default` as the server writes it (MariaDB: an SQL
    /// expression, `'text'`, `0`, `current_timestamp()`, `NULL`; MySQL: the bare value).
    pub default: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TableModel {
    pub name: String,
    pub columns: Vec<ColumnInfo>,
    pub pk: Vec<String>,
    pub has_uuid: bool,
    pub fks: Vec<Fk>,
    /// The table whose primary key this table's primary key also is (patient → person).
    pub shared_parent: Option<String>,
    /// Values of ENUM columns, by column, so a binlog index maps back to its label.
    pub enums: HashMap<String, Vec<String>>,
}

impl TableModel {
    /// The primary key is one integer column: the snapshot can chunk and resume by it.
    pub fn int_pk(&self) -> Option<&str> {
        if self.pk.len() != 1 {
            return None;
        }
        let col = self.columns.iter().find(|c| c.name == self.pk[0])?;
        is_int_type(&col.column_type).then_some(self.pk[0].as_str())
    }

    pub fn fk(&self, column: &str) -> Option<&Fk> {
        self.fks.iter().find(|f| f.column == column)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub database: String,
    pub tables: BTreeMap<String, Arc<TableModel>>,
    /// Captured tables, parents before children.
    pub order: Vec<String>,
}

impl Model {
    pub fn table(&self, name: &str) -> Option<&Arc<TableModel>> {
        self.tables.get(name)
    }

    /// The secondary indexes of `table` (not the primary key), from `information_schema.statistics`,
    /// by name; a column indexed by its first characters reads `column(prefix)`.
    pub async fn indexes(conn: &mut Conn, database: &str, table: &str) -> Result<Vec<crate::shape::IndexShape>, CoreError> {
        let rows: Vec<(String, String, Option<u64>, i64)> = conn
            .exec(
                "SELECT index_name, column_name, sub_part, non_unique FROM information_schema.statistics
                 WHERE table_schema = ? AND table_name = ? AND index_name <> 'PRIMARY' AND column_name IS NOT NULL
                 ORDER BY index_name, seq_in_index",
                (database, table),
            )
            .await
            .map_err(|e| CoreError::db(format!("reading the indexes of `{table}` from information_schema.statistics"), e))?;
        let mut out: Vec<crate::shape::IndexShape> = Vec::new();
        for (name, column, prefix, non_unique) in rows {
            let column = match prefix {
                Some(n) => format!("{column}({n})"),
                None => column,
            };
            match out.last_mut() {
                Some(i) if i.name == name => i.columns.push(column),
                _ => out.push(crate::shape::IndexShape { name, columns: vec![column], unique: non_unique == 0 }),
            }
        }
        Ok(out)
    }

    /// Reads the model of `database`, keeping the captured tables (include/exclude).
    pub async fn load(conn: &mut Conn, database: &str, include: &[String], exclude: &[String]) -> Result<Model, CoreError> {
        let db = database.replace('\'', "''");
        let cols: Vec<(String, String, String, String, Option<String>)> = conn
            .query(format!(
                "SELECT table_name, column_name, column_type, is_nullable, column_default FROM information_schema.columns
                 WHERE table_schema = '{db}' ORDER BY table_name, ordinal_position"
            ))
            .await
            .map_err(|e| CoreError::db("reading information_schema.columns", e))?;
        let base: BTreeSet<String> = conn
            .query::<String, _>(format!(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' AND table_type = 'BASE TABLE'"
            ))
            .await
            .map_err(|e| CoreError::db("reading information_schema.tables", e))?
            .into_iter()
            .collect();
        let keys: Vec<(String, String, String, Option<String>, Option<String>)> = conn
            .query(format!(
                "SELECT table_name, column_name, constraint_name, referenced_table_name, referenced_column_name
                 FROM information_schema.key_column_usage WHERE table_schema = '{db}'
                 ORDER BY table_name, constraint_name, ordinal_position"
            ))
            .await
            .map_err(|e| CoreError::db("reading information_schema.key_column_usage", e))?;

        let mut tables: BTreeMap<String, TableModel> = BTreeMap::new();
        for (table, column, column_type, nullable, default) in cols {
            if !base.contains(&table) {
                continue;
            }
            let t = tables.entry(table.clone()).or_insert_with(|| TableModel {
                name: table.clone(),
                columns: Vec::new(),
                pk: Vec::new(),
                has_uuid: false,
                fks: Vec::new(),
                shared_parent: None,
                enums: HashMap::new(),
            });
            if column == "uuid" {
                t.has_uuid = true;
            }
            if let Some(values) = parse_enum(&column_type) {
                t.enums.insert(column.clone(), values);
            }
            t.columns.push(ColumnInfo { name: column, column_type, not_null: nullable == "NO", default: default.filter(|d| d != "NULL") });
        }
        for (table, column, constraint, ref_table, ref_column) in keys {
            let Some(t) = tables.get_mut(&table) else { continue };
            if constraint == "PRIMARY" {
                t.pk.push(column);
            } else if let (Some(rt), Some(rc)) = (ref_table, ref_column) {
                if !t.fks.iter().any(|f| f.column == column) {
                    t.fks.push(Fk { column, ref_table: rt, ref_column: rc });
                }
            }
        }
        let pks: HashMap<String, Vec<String>> = tables.iter().map(|(n, t)| (n.clone(), t.pk.clone())).collect();
        for t in tables.values_mut() {
            if t.pk.len() == 1 {
                if let Some(fk) = t.fks.iter().find(|f| f.column == t.pk[0]) {
                    if pks.get(&fk.ref_table).is_some_and(|p| p.len() == 1 && p[0] == fk.ref_column) && fk.ref_table != t.name {
                        t.shared_parent = Some(fk.ref_table.clone());
                    }
                }
            }
        }
        tables.retain(|name, _| (include.is_empty() || include.contains(name)) && !exclude.contains(name));
        let order = dependency_order(&tables);
        let tables = tables.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        Ok(Model { database: database.to_string(), tables, order })
    }
}

/// An integer column type (`int(11)`, `bigint(20) unsigned`, `tinyint(1)`, …).
pub fn is_int_type(column_type: &str) -> bool {
    let t = column_type.to_ascii_lowercase();
    ["int", "bigint", "smallint", "mediumint", "tinyint"].iter().any(|p| t.starts_with(p))
}

/// `enum('a','b')` → ["a", "b"].
pub fn parse_enum(column_type: &str) -> Option<Vec<String>> {
    let inner = column_type.strip_prefix("enum(")?.strip_suffix(')')?;
    Some(
        inner
            .split("','")
            .map(|s| s.trim_matches('\'').replace("''", "'"))
            .collect(),
    )
}

/// Parents before children (Kahn's algorithm over FK edges). OpenMRS has FK cycles (`users` ↔
/// `person` through `creator`); a cycle is broken at the table with the fewest unmet parents,
/// by name.
pub fn dependency_order(tables: &BTreeMap<String, TableModel>) -> Vec<String> {
    let mut parents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, t) in tables {
        let set = parents.entry(name.as_str()).or_default();
        for fk in &t.fks {
            if fk.ref_table != *name && tables.contains_key(&fk.ref_table) {
                set.insert(fk.ref_table.as_str());
            }
        }
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(tables.len());
    while done.len() < tables.len() {
        let ready: Vec<&str> = parents
            .iter()
            .filter(|(n, ps)| !done.contains(*n) && ps.iter().all(|p| done.contains(p)))
            .map(|(n, _)| *n)
            .collect();
        let next: Vec<&str> = if ready.is_empty() {
            // A cycle: take the table with the fewest parents still missing.
            let pick = parents
                .iter()
                .filter(|(n, _)| !done.contains(*n))
                .min_by_key(|(n, ps)| (ps.iter().filter(|p| !done.contains(*p)).count(), **n))
                .map(|(n, _)| *n);
            pick.into_iter().collect()
        } else {
            ready
        };
        for n in next {
            done.insert(n);
            order.push(n.to_string());
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, fks: &[(&str, &str)]) -> TableModel {
        TableModel {
            name: name.into(),
            columns: vec![],
            pk: vec![format!("{name}_id")],
            has_uuid: true,
            fks: fks.iter().map(|(c, r)| Fk { column: c.to_string(), ref_table: r.to_string(), ref_column: format!("{r}_id") }).collect(),
            shared_parent: None,
            enums: HashMap::new(),
        }
    }

    #[test]
    fn parents_come_first_even_with_cycles() {
        let mut m = BTreeMap::new();
        for table in [
            t("obs", &[("encounter_id", "encounter"), ("person_id", "person"), ("creator", "users")]),
            t("encounter", &[("patient_id", "patient"), ("creator", "users")]),
            t("patient", &[("patient_id", "person"), ("creator", "users")]),
            t("person", &[("creator", "users")]),
            t("users", &[("person_id", "person"), ("creator", "users")]),
        ] {
            m.insert(table.name.clone(), table);
        }
        let order = dependency_order(&m);
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("person") < pos("patient"));
        assert!(pos("patient") < pos("encounter"));
        assert!(pos("encounter") < pos("obs"));
        assert_eq!(order.len(), 5);
    }

    #[test]
    fn enum_values_are_parsed() {
        assert_eq!(parse_enum("enum('a','it''s')").unwrap(), vec!["a", "it's"]);
        assert!(parse_enum("int(11)").is_none());
    }
}
