//! The schema history: each captured table's columns as the binlog knew them, so that a row
//! event is decoded with the schema current at its position, also when the binlog does not
//! name its columns (`binlog_row_metadata=MINIMAL`, MySQL 5.7) and after a restart in the
//! middle of a DDL sequence.
//!
//! - At a fresh snapshot every table's columns (from `information_schema`, at the snapshot's
//!   position) are recorded: the base.
//! - A DDL in the binlog is applied to the model as a statement ([`apply_ddl`], with sqlparser's
//!   MySQL dialect: CREATE TABLE [LIKE], ALTER TABLE ADD / DROP / CHANGE / MODIFY / RENAME COLUMN
//!   with FIRST / AFTER, RENAME TABLE, DROP TABLE). `information_schema` is read again and
//!   preferred for a table whose columns it names the same (types, keys, enum labels): it is
//!   the schema right after the DDL unless a later DDL has already run at the site, in which case
//!   the applied statement is right and `information_schema` is ahead. A DDL the parser cannot
//!   follow takes `information_schema` as it is, and says so.
//! - Every table a DDL changed is recorded with its columns.
//!
//! Records live in the site's compacted checkpoint topic (`omrs.ingest.offsets.<site>`), key
//! `schema:<table>`, written in the Kafka transaction of the checkpoint after the DDL, so a
//! committed record is never ahead of the committed checkpoint and the latest record of a table
//! is its schema at that checkpoint. A record older than the latest base belongs to an earlier
//! snapshot and is ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use omrs_core::model::{dependency_order, ColumnInfo, Fk, Model, TableModel};
use omrs_core::shape::TableShape;
use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    AlterTableOperation, ColumnDef, ColumnOption, CreateTableLikeKind, MySQLColumnPosition, ObjectName, ObjectNamePart, ObjectType, RenameTableNameKind,
    Statement, TableConstraint,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;

use crate::checkpoint::Position;

/// The key prefix of schema records in the checkpoint topic.
pub const KEY_PREFIX: &str = "schema:";
/// The key of the base marker: the position of the latest fresh snapshot.
const BASE_KEY: &str = "schema:*";

/// One table's shape at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSchema {
    #[serde(flatten)]
    pub shape: TableShape,
    pub position: Position,
}

impl TableSchema {
    pub fn of(t: &TableModel, position: &Position, ddl: Option<&str>) -> Self {
        TableSchema { shape: TableShape::of(t, ddl), position: position.clone() }
    }

    /// A table dropped (or renamed away) at `position`.
    pub fn dropped(table: &str, position: &Position, ddl: &str) -> Self {
        let shape = TableShape { table: table.to_string(), columns: Vec::new(), pk: Vec::new(), fks: Vec::new(), indexes: Vec::new(), dropped: true, ddl: Some(ddl.chars().take(2000).collect()), shared_parent: None, base: false };
        TableSchema { shape, position: position.clone() }
    }

    pub fn table(&self) -> &str {
        &self.shape.table
    }

    /// The Kafka record (key, value).
    pub fn record(&self) -> (Vec<u8>, Vec<u8>) {
        (format!("{KEY_PREFIX}{}", self.shape.table).into_bytes(), serde_json::to_vec(self).unwrap_or_default())
    }
}

/// A table's shape as a fresh snapshot (or a Debezium input reading from the beginning) sends
/// it ahead of the rows, scrubbed columns left out: the lake builds its schema from these (see
/// [`TableShape::base`]).
pub fn base_shape(t: &TableModel, scrub: &[String]) -> TableShape {
    let scrubbed = crate::convert::scrubbed(t, scrub);
    let mut shape = TableShape::base_of(t);
    shape.columns.retain(|c| !scrubbed.contains(&c.name.as_str()));
    shape
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Base {
    position: Position,
}

/// The records of base (every table of `model` at `position`), and the base marker.
pub fn base_records(model: &Model, position: &Position) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = model.tables.values().map(|t| TableSchema::of(t, position, None).record()).collect();
    out.push((BASE_KEY.as_bytes().to_vec(), serde_json::to_vec(&Base { position: position.clone() }).unwrap_or_default()));
    out
}

/// The schema history read back from the checkpoint topic.
#[derive(Debug, Default)]
pub struct History {
    base: Option<Position>,
    tables: BTreeMap<String, TableSchema>,
}

impl History {
    /// Takes one record of the checkpoint topic (others are ignored).
    pub fn learn(&mut self, key: &[u8], payload: &[u8]) -> Result<(), String> {
        if key == BASE_KEY.as_bytes() {
            let b: Base = serde_json::from_slice(payload).map_err(|e| format!("schema base record: {e}"))?;
            self.base = Some(b.position);
        } else if key.starts_with(KEY_PREFIX.as_bytes()) {
            let t: TableSchema = serde_json::from_slice(payload).map_err(|e| format!("schema record {}: {e}", String::from_utf8_lossy(key)))?;
            self.tables.insert(t.shape.table.clone(), t);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Sets each recorded table of `model` (read from `information_schema` now) to its recorded
    /// columns. A table whose current columns are the recorded ones keeps the richer current model.
    pub fn apply_to(&self, model: &mut Model) {
        let mut changed = false;
        for rec in self.tables.values() {
            if self.base.as_ref().is_some_and(|b| rec.position.key() < b.key()) {
                continue; // from an earlier snapshot
            }
            let t = &rec.shape;
            let current = model.tables.get(&t.table).cloned();
            if t.dropped {
                changed |= model.tables.remove(&t.table).is_some();
                continue;
            }
            let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
            if current.as_ref().is_some_and(|c| same_columns(c, &names)) {
                continue;
            }
            tracing::info!(table = %t.table, columns = t.columns.len(), "the table as the binlog knew it at the checkpoint (information_schema is ahead)");
            let columns = t.columns.iter().map(|c| ColumnInfo { name: c.name.clone(), column_type: c.column_type.clone(), not_null: c.not_null, default: c.default.clone() }).collect();
            let mut m = rebuilt(&t.table, columns, t.pk.clone(), current.as_deref());
            if current.is_none() {
                m.fks = t.fks.iter().map(|f| Fk { column: f.column.clone(), ref_table: f.ref_table.clone(), ref_column: f.ref_column.clone() }).collect();
            }
            model.tables.insert(t.table.clone(), Arc::new(m));
            changed = true;
        }
        if changed {
            reorder(model);
        }
    }
}

fn same_columns(t: &TableModel, names: &[&str]) -> bool {
    t.columns.len() == names.len() && t.columns.iter().zip(names).all(|(a, n)| a.name.eq_ignore_ascii_case(n))
}

/// A table model from columns and key, keeping what `like` knows of the columns still there.
fn rebuilt(name: &str, columns: Vec<ColumnInfo>, pk: Vec<String>, like: Option<&TableModel>) -> TableModel {
    let has = |c: &str| columns.iter().any(|x: &ColumnInfo| x.name == c);
    let enums: HashMap<String, Vec<String>> = columns.iter().filter_map(|c| omrs_core::model::parse_enum(&c.column_type).map(|v| (c.name.clone(), v))).collect();
    let fks = like.map(|l| l.fks.iter().filter(|f| has(&f.column)).cloned().collect()).unwrap_or_default();
    let shared_parent = like.filter(|l| l.pk == pk).and_then(|l| l.shared_parent.clone());
    TableModel { name: name.to_string(), has_uuid: has("uuid"), columns, pk, fks, shared_parent, enums }
}

fn reorder(model: &mut Model) {
    let owned: BTreeMap<String, TableModel> = model.tables.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect();
    model.order = dependency_order(&owned);
}

/// What a DDL statement did to the model.
#[derive(Debug, PartialEq)]
pub enum Applied {
    /// These tables changed (created, altered, dropped, renamed).
    Tables(Vec<String>),
    /// Not a statement about this database's tables (a view, a trigger, another schema…).
    Nothing,
}

/// Where a statement ran: the captured database, and the statement's default schema (an
/// unqualified table name is ours only when that is the captured database).
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub db: &'a str,
    pub default: &'a str,
}

/// Applies `ddl` to `model`; `captured` says whether a new table is captured. Err: the
/// statement could not be followed (the caller falls back to `information_schema`).
pub fn apply_ddl(model: &mut Model, scope: Scope<'_>, ddl: &str, captured: &dyn Fn(&str) -> bool) -> Result<Applied, String> {
    let statements = Parser::parse_sql(&MySqlDialect {}, ddl).map_err(|e| e.to_string())?;
    let mut changed = Vec::new();
    for st in statements {
        apply_one(model, scope, st, captured, &mut changed)?;
    }
    if changed.is_empty() {
        return Ok(Applied::Nothing);
    }
    reorder(model);
    changed.sort();
    changed.dedup();
    Ok(Applied::Tables(changed))
}

/// The table a name means in the captured database: None for another schema.
fn table_name(name: &ObjectName, scope: Scope<'_>) -> Option<String> {
    let parts: Vec<&str> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => i.value.as_str(),
            _ => "",
        })
        .collect();
    match parts.as_slice() {
        [t] if scope.default == scope.db => Some(t.to_string()),
        [s, t] if *s == scope.db => Some(t.to_string()),
        _ => None,
    }
}

fn column_of(def: &ColumnDef) -> ColumnInfo {
    let not_null = def.options.iter().any(|o| matches!(o.option, ColumnOption::NotNull | ColumnOption::PrimaryKey(_)));
    let default = def.options.iter().find_map(|o| match &o.option {
        ColumnOption::Default(e) => Some(e.to_string()).filter(|d| !d.eq_ignore_ascii_case("NULL")),
        _ => None,
    });
    ColumnInfo { name: def.name.value.clone(), column_type: type_text(&def.data_type), not_null, default }
}

/// A column type as information_schema writes it: `enum('a','b')`, `varchar(50)`.
fn type_text(t: &sqlparser::ast::DataType) -> String {
    t.to_string().to_ascii_lowercase().replace("', '", "','")
}

fn is_primary(def: &ColumnDef) -> bool {
    def.options.iter().any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)))
}

fn place(columns: &mut Vec<ColumnInfo>, col: ColumnInfo, at: Option<&MySQLColumnPosition>) -> Result<(), String> {
    match at {
        None => columns.push(col),
        Some(MySQLColumnPosition::First) => columns.insert(0, col),
        Some(MySQLColumnPosition::After(a)) => {
            let i = columns.iter().position(|c| c.name.eq_ignore_ascii_case(&a.value)).ok_or_else(|| format!("AFTER `{}`: no such column", a.value))?;
            columns.insert(i + 1, col);
        }
    }
    Ok(())
}

fn apply_one(model: &mut Model, db: Scope<'_>, st: Statement, captured: &dyn Fn(&str) -> bool, changed: &mut Vec<String>) -> Result<(), String> {
    match st {
        Statement::CreateTable(ct) => {
            let Some(name) = table_name(&ct.name, db) else { return Ok(()) };
            if !captured(&name) {
                return Ok(());
            }
            let t = match &ct.like {
                Some(CreateTableLikeKind::Plain(l) | CreateTableLikeKind::Parenthesized(l)) => {
                    let src = table_name(&l.name, db).and_then(|s| model.tables.get(&s).cloned()).ok_or("CREATE TABLE … LIKE a table the agent does not know")?;
                    TableModel { name: name.clone(), ..(*src).clone() }
                }
                None => {
                    let columns: Vec<ColumnInfo> = ct.columns.iter().map(column_of).collect();
                    let mut pk: Vec<String> = ct.columns.iter().filter(|c| is_primary(c)).map(|c| c.name.value.clone()).collect();
                    let mut fks = Vec::new();
                    for c in &ct.constraints {
                        match c {
                            TableConstraint::PrimaryKey(p) => pk = p.columns.iter().map(|c| c.column.expr.to_string().trim_matches('`').to_string()).collect(),
                            TableConstraint::ForeignKey(f) => {
                                if let (Some(rt), [col], [rc]) = (table_name(&f.foreign_table, db), f.columns.as_slice(), f.referred_columns.as_slice()) {
                                    fks.push(omrs_core::model::Fk { column: col.value.clone(), ref_table: rt, ref_column: rc.value.clone() });
                                }
                            }
                            _ => {}
                        }
                    }
                    let mut t = rebuilt(&name, columns, pk, None);
                    t.fks = fks;
                    t
                }
            };
            model.tables.insert(name.clone(), Arc::new(t));
            changed.push(name);
        }
        Statement::AlterTable(at) => {
            let Some(name) = table_name(&at.name, db) else { return Ok(()) };
            let Some(old) = model.tables.get(&name).cloned() else { return Ok(()) };
            let mut columns = old.columns.clone();
            let mut pk = old.pk.clone();
            let mut new_name = None;
            let find = |columns: &[ColumnInfo], n: &str| columns.iter().position(|c| c.name.eq_ignore_ascii_case(n)).ok_or_else(|| format!("column `{n}` of `{name}` is not known"));
            for op in &at.operations {
                match op {
                    AlterTableOperation::AddColumn { column_def, column_position, if_not_exists, .. } => {
                        if *if_not_exists && columns.iter().any(|c| c.name.eq_ignore_ascii_case(&column_def.name.value)) {
                            continue;
                        }
                        place(&mut columns, column_of(column_def), column_position.as_ref())?;
                        if is_primary(column_def) {
                            pk = vec![column_def.name.value.clone()];
                        }
                    }
                    AlterTableOperation::DropColumn { column_names, if_exists, .. } => {
                        for n in column_names {
                            match find(&columns, &n.value) {
                                Ok(i) => {
                                    columns.remove(i);
                                    pk.retain(|k| !k.eq_ignore_ascii_case(&n.value));
                                }
                                Err(_) if *if_exists => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    AlterTableOperation::ChangeColumn { old_name, new_name: to, data_type, column_position, .. } => {
                        let i = find(&columns, &old_name.value)?;
                        columns.remove(i);
                        let col = ColumnInfo { name: to.value.clone(), column_type: type_text(data_type), ..Default::default() };
                        for k in pk.iter_mut().filter(|k| k.eq_ignore_ascii_case(&old_name.value)) {
                            *k = to.value.clone();
                        }
                        match column_position {
                            None => columns.insert(i, col),
                            p => place(&mut columns, col, p.as_ref())?,
                        }
                    }
                    AlterTableOperation::ModifyColumn { col_name, data_type, column_position, .. } => {
                        let i = find(&columns, &col_name.value)?;
                        let mut col = columns.remove(i);
                        col.column_type = type_text(data_type);
                        match column_position {
                            None => columns.insert(i, col),
                            p => place(&mut columns, col, p.as_ref())?,
                        }
                    }
                    AlterTableOperation::RenameColumn { old_column_name, new_column_name } => {
                        let i = find(&columns, &old_column_name.value)?;
                        columns[i].name = new_column_name.value.clone();
                        for k in pk.iter_mut().filter(|k| k.eq_ignore_ascii_case(&old_column_name.value)) {
                            *k = new_column_name.value.clone();
                        }
                    }
                    AlterTableOperation::RenameTable { table_name: RenameTableNameKind::To(n) | RenameTableNameKind::As(n) } => {
                        new_name = Some(table_name(n, db).ok_or("RENAME to another schema")?);
                    }
                    AlterTableOperation::AddConstraint { constraint: TableConstraint::PrimaryKey(p), .. } => {
                        pk = p.columns.iter().map(|c| c.column.expr.to_string().trim_matches('`').to_string()).collect();
                    }
                    AlterTableOperation::DropPrimaryKey { .. } => pk.clear(),
                    // Indexes, constraints, options, engine, charset of the table: the columns stay.
                    _ => {}
                }
            }
            let t = rebuilt(&name, columns, pk, Some(&old));
            changed.push(name.clone());
            match new_name {
                Some(to) => {
                    model.tables.remove(&name);
                    if captured(&to) {
                        model.tables.insert(to.clone(), Arc::new(TableModel { name: to.clone(), ..t }));
                        changed.push(to);
                    }
                }
                None => {
                    model.tables.insert(name, Arc::new(t));
                }
            }
        }
        // The columns stay; the table's shape goes on with its indexes (HQ adds the new one).
        Statement::CreateIndex(ci) => {
            if let Some(t) = table_name(&ci.table_name, db).filter(|t| model.tables.contains_key(t)) {
                changed.push(t);
            }
        }
        Statement::Drop { object_type: ObjectType::Table, names, .. } => {
            for n in &names {
                if let Some(t) = table_name(n, db) {
                    if model.tables.remove(&t).is_some() {
                        changed.push(t);
                    }
                }
            }
        }
        Statement::RenameTable(renames) => {
            for r in renames {
                let (Some(from), Some(to)) = (table_name(&r.old_name, db), table_name(&r.new_name, db)) else { continue };
                if let Some(t) = model.tables.remove(&from) {
                    changed.push(from);
                    if captured(&to) {
                        model.tables.insert(to.clone(), Arc::new(TableModel { name: to.clone(), ..(*t).clone() }));
                        changed.push(to);
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// After a DDL applied to `model`: each changed table takes `current`'s (information_schema
/// read after the DDL) where that names the same columns. Returns the schemas to record.
pub fn settle(model: &mut Model, current: &Model, changed: &[String], position: &Position, ddl: &str) -> Vec<TableSchema> {
    let mut out = Vec::new();
    for name in changed {
        match model.tables.get(name).cloned() {
            None => out.push(TableSchema::dropped(name, position, ddl)),
            Some(applied) => {
                let names: Vec<&str> = applied.columns.iter().map(|c| c.name.as_str()).collect();
                let t = match current.tables.get(name) {
                    Some(c) if same_columns(c, &names) => c.clone(),
                    _ => {
                        tracing::info!(table = %name, "information_schema is already past this DDL; the table follows the statement");
                        applied
                    }
                };
                out.push(TableSchema::of(&t, position, Some(ddl)));
                model.tables.insert(name.clone(), t);
            }
        }
    }
    reorder(model);
    out
}

/// The schemas to record when a DDL could not be followed and `current` replaces `model`: the
/// tables whose columns differ.
pub fn differences(model: &Model, current: &Model, position: &Position, ddl: &str) -> Vec<TableSchema> {
    let mut out = Vec::new();
    for (name, t) in &current.tables {
        let same = model.tables.get(name).is_some_and(|m| m.columns.len() == t.columns.len() && m.columns.iter().zip(&t.columns).all(|(a, b)| a.name == b.name && a.column_type == b.column_type));
        if !same {
            out.push(TableSchema::of(t, position, Some(ddl)));
        }
    }
    for name in model.tables.keys().filter(|n| !current.tables.contains_key(*n)) {
        out.push(TableSchema::dropped(name, position, ddl));
    }
    out
}

#[cfg(test)]
mod tests;
