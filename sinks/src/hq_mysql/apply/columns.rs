//! What the sink needs of each HQ column, worked out once when it loads HQ's table model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::model::{is_int_type, Fk, Model};

use super::sql::{db, is_binary_type};
use crate::SinkError;

/// What the sink needs to know of one HQ column, worked out once per table.
#[derive(Debug, Clone, Default)]
pub(super) struct ColInfo {
    pub(super) name: String,
    /// The foreign key from this column, if any.
    pub(super) fk: Option<Fk>,
    /// A reference to a table whose key is one integer column (mapped uuid → HQ id).
    pub(super) fk_to_int: bool,
    pub(super) binary: bool,
    pub(super) int: bool,
    /// Part of the primary key.
    pub(super) pk: bool,
    /// Nullable, with NULL as its default: a new row's NULL need not be sent.
    pub(super) null_default: bool,
}

/// One HQ table's columns as the sink plans rows with them, worked out once at load: a row's
/// column is found with one hash lookup (not by scanning the table's foreign keys).
#[derive(Debug, Default)]
pub(super) struct Columns {
    pub(super) index: hashbrown::HashMap<String, usize>,
    pub(super) info: Vec<ColInfo>,
    /// [`TableModel::int_pk`].
    pub(super) int_pk: Option<String>,
}

impl Columns {
    pub(super) fn get(&self, col: &str) -> Option<&ColInfo> {
        self.index.get(col).map(|&i| &self.info[i])
    }

    pub(super) fn fk(&self, col: &str) -> Option<&Fk> {
        self.get(col).and_then(|c| c.fk.as_ref())
    }
}

/// Every HQ table's [`Columns`], and the tables whose every foreign key the sink resolves itself
/// (from a uuid to the id of a row at HQ): HQ need not check those again.
pub(super) async fn load(conn: &mut Conn, database: &str, model: &Model) -> Result<(HashMap<String, Arc<Columns>>, HashSet<String>), SinkError> {
    // Columns whose default is NULL: a new row leaves its NULLs in them out of the INSERT
    // (fewer values for HQ to take in; the row is the same).
    let null_default: Vec<(String, String)> = conn
        .exec(
            "SELECT table_name, column_name FROM information_schema.columns
             WHERE table_schema = ? AND is_nullable = 'YES' AND (column_default IS NULL OR column_default = 'NULL')",
            (database,),
        )
        .await
        .map_err(db("reading information_schema.columns"))?;
    let null_default: HashSet<(String, String)> = null_default.into_iter().collect();
    let mut columns = HashMap::new();
    let mut resolved_fks = HashSet::new();
    for (name, t) in &model.tables {
        let mut m = Columns { int_pk: t.int_pk().map(str::to_string), ..Columns::default() };
        let mut resolved = true;
        for c in &t.columns {
            let fk = t.fk(&c.name).cloned();
            let fk_to_int =
                fk.as_ref().is_some_and(|fk| model.table(&fk.ref_table).and_then(|rt| rt.int_pk().map(|p| p == fk.ref_column)).unwrap_or(false));
            resolved &= fk_to_int || fk.is_none();
            m.index.insert(c.name.clone(), m.info.len());
            m.info.push(ColInfo {
                name: c.name.clone(),
                fk,
                fk_to_int,
                binary: is_binary_type(&c.column_type),
                int: is_int_type(&c.column_type),
                pk: t.pk.contains(&c.name),
                null_default: null_default.contains(&(name.clone(), c.name.clone())),
            });
        }
        if resolved {
            resolved_fks.insert(name.clone());
        }
        columns.insert(name.clone(), Arc::new(m));
    }
    Ok((columns, resolved_fks))
}
