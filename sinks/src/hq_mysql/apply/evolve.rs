//! Schema evolution at HQ (issue #25 §2): an `HqEvent::Schema` (a DDL at a site) makes HQ's
//! table able to hold the site's rows of the new shape before the first of them is planned.
//!
//! - Additive changes (a new table, a new column, a wider type) are run at HQ, idempotently:
//!   each is worked out against HQ's `information_schema` as it is now, so the same upgrade
//!   sent by ten sites (or read again after a crash) runs once. A new column is nullable at HQ
//!   (rows of sites not upgraded yet have no value for it) and is placed after the column it
//!   follows at the site when HQ has that column.
//! - Anything else (a column dropped or renamed, a type changed) stops that site's changes of
//!   that table from the schema event on: they are dead-lettered (`schema_blocked`, naming the
//!   site, table and statement), every other table and site goes on. A person migrates HQ,
//!   marks the change resolved and replays the dead letters (docs/OPERATIONS.md, "OpenMRS
//!   upgrades").
//! - Every schema event is logged in `omrs_sync_schema_change` (status `applied`, `in_step`
//!   when HQ already had the shape, `blocked`, later `resolved` by a person).
//!
//! DDL commits implicitly, so this runs between batches, outside the batch's transaction; what
//! it does is idempotent, so a crash before the batch's offsets commit only repeats a no-op.

use std::collections::HashMap;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::clock::now_ms;
use omrs_core::model::Model;
use omrs_core::shape::{missing_indexes, ColumnShape, IndexShape, Step, TableShape};

use crate::SinkError;

/// The schema change log's DDL (also in `schema::BOOKKEEPING`).
pub const LOG_DDL: &str = "CREATE TABLE IF NOT EXISTS omrs_sync_schema_change (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        event_key VARCHAR(191) NOT NULL,
        site VARCHAR(64) NOT NULL,
        tbl VARCHAR(64) NOT NULL,
        site_ddl TEXT NULL,
        applied TEXT NULL,
        status VARCHAR(16) NOT NULL,
        reason TEXT NULL,
        site_ts_ms BIGINT NOT NULL,
        kafka_offset BIGINT NOT NULL,
        recorded_at DATETIME(3) NOT NULL,
        UNIQUE KEY (event_key),
        KEY (site, tbl, status)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

/// (site, table) → the offset of `omrs.hq.changes` from which that site's changes of the table
/// are stopped.
pub type Blocked = HashMap<(String, String), i64>;

/// The blocks no person has resolved yet.
pub async fn load_blocked(conn: &mut Conn) -> Result<Blocked, SinkError> {
    let rows: Vec<(String, String, i64)> = conn
        .query("SELECT site, tbl, MIN(kafka_offset) FROM omrs_sync_schema_change WHERE status = 'blocked' GROUP BY site, tbl")
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_schema_change", e))?;
    Ok(rows.into_iter().map(|(s, t, o)| ((s, t), o)).collect())
}

/// What a schema event did at HQ.
#[derive(Debug, PartialEq)]
pub enum Evolved {
    /// HQ ran these statements.
    Applied(Vec<String>),
    /// HQ already had what the site has.
    InStep,
    /// Not additive: that site's changes of the table stop here.
    Blocked(String),
}

fn q(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A new column's definition for HQ: the site's type, NOT NULL only with a default (rows of
/// sites not upgraded yet come without it), and the site's default, so that HQ's rows from the
/// upgraded site hold what the site's ALTER gave its existing rows (the binlog carries no row
/// events for that backfill).
fn column_def(c: &ColumnShape) -> String {
    let default = c.default_sql();
    let null = if c.not_null && default.is_some() { "NOT NULL" } else { "NULL" };
    match default {
        Some(d) => format!("{} {} {null} DEFAULT {d}", q(&c.name), c.column_type),
        None => format!("{} {} {null}", q(&c.name), c.column_type),
    }
}

/// The statements that take HQ from `model` to `shape` (additive steps only).
pub fn statements(shape: &TableShape, steps: &[Step], model: &Model, widened: &HashMap<String, String>) -> Vec<String> {
    let t = q(&shape.table);
    let mut out = Vec::new();
    for step in steps {
        match step {
            Step::Create => {
                let mut defs: Vec<String> = shape
                    .columns
                    .iter()
                    .map(|c| {
                        // A key column stays NOT NULL; the rest follows the site's rows.
                        if shape.pk.contains(&c.name) {
                            format!("{} {} NOT NULL", q(&c.name), c.column_type)
                        } else {
                            column_def(c)
                        }
                    })
                    .collect();
                if !shape.pk.is_empty() {
                    defs.push(format!("PRIMARY KEY ({})", shape.pk.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ")));
                }
                // The foreign keys HQ can hold (their table is at HQ): the sink maps those
                // columns from uuids to HQ's ids, as for every OpenMRS table.
                for f in shape.fks.iter().filter(|f| model.table(&f.ref_table).is_some()) {
                    defs.push(format!("FOREIGN KEY ({}) REFERENCES {} ({})", q(&f.column), q(&f.ref_table), q(&f.ref_column)));
                }
                out.push(format!("CREATE TABLE IF NOT EXISTS {t} ({}) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4", defs.join(", ")));
            }
            Step::AddColumn { column, after } => {
                let have = model.table(&shape.table);
                let place = match after {
                    None => " FIRST".to_string(),
                    Some(a) if have.is_some_and(|h| h.columns.iter().any(|c| c.name.eq_ignore_ascii_case(a))) => format!(" AFTER {}", q(a)),
                    Some(_) => String::new(),
                };
                out.push(format!("ALTER TABLE {t} ADD COLUMN {}{place}", column_def(column)));
            }
            Step::Widen { column, .. } => {
                let tail = widened.get(&column.name).cloned().unwrap_or_else(|| " NULL".into());
                out.push(format!("ALTER TABLE {t} MODIFY COLUMN {} {}{tail}", q(&column.name), column.column_type));
            }
        }
    }
    out
}

/// The site's indexes HQ lacks, as statements. Each is a plain index at HQ even when unique at
/// the site: HQ holds every site's rows, and a value unique within one clinic (a local
/// identifier, a name) may repeat across clinics, so a unique index at HQ could refuse a later
/// clinic's row; a unique index of `uuid` alone stays unique. HQ never drops an index a site
/// dropped: an index only serves HQ's queries. A name HQ already uses for other columns gets a
/// suffix.
pub fn index_statements(shape: &TableShape, have: &[IndexShape]) -> Vec<String> {
    if shape.dropped {
        return Vec::new();
    }
    let mut names: Vec<String> = have.iter().map(|h| h.name.to_ascii_lowercase()).collect();
    let mut out = Vec::new();
    // An index read at the site after a later DDL may name a column this shape does not have yet.
    let known = |c: &String| {
        let name = c.split_once('(').map_or(c.as_str(), |(n, _)| n);
        shape.columns.iter().any(|col| col.name.eq_ignore_ascii_case(name))
    };
    for i in missing_indexes(&shape.indexes, have).into_iter().filter(|i| i.columns.iter().all(known)) {
        let mut name: String = i.name.chars().take(60).collect();
        let mut n = 1;
        while names.contains(&name.to_ascii_lowercase()) {
            n += 1;
            name = format!("{}_{n}", i.name.chars().take(56).collect::<String>());
        }
        names.push(name.to_ascii_lowercase());
        // A uuid is one record everywhere: HQ keys its rows by it, as OpenMRS's own schema does.
        let kind = if i.unique && i.columns.len() == 1 && i.columns[0].eq_ignore_ascii_case("uuid") { "UNIQUE INDEX" } else { "INDEX" };
        out.push(format!("ALTER TABLE {} ADD {kind} {} ({})", q(&shape.table), q(&name), i.column_sql()));
    }
    out
}

/// What a widened column keeps of HQ's definition: NOT NULL, its default, AUTO_INCREMENT.
async fn kept_attributes(conn: &mut Conn, database: &str, table: &str, steps: &[Step]) -> Result<HashMap<String, String>, SinkError> {
    let mut out = HashMap::new();
    for s in steps {
        let Step::Widen { column, .. } = s else { continue };
        let row: Option<(String, Option<String>, String)> = conn
            .exec_first(
                "SELECT is_nullable, column_default, extra FROM information_schema.columns WHERE table_schema = ? AND table_name = ? AND column_name = ?",
                (database, table, &column.name),
            )
            .await
            .map_err(|e| SinkError::db("reading a column's definition", e))?;
        let Some((nullable, default, extra)) = row else { continue };
        let mut tail = if nullable == "NO" { " NOT NULL".to_string() } else { " NULL".to_string() };
        if let Some(d) = default.filter(|d| d != "NULL") {
            // MariaDB writes a string default quoted and an expression or number bare.
            tail.push_str(&format!(" DEFAULT {d}"));
        }
        if extra.to_ascii_lowercase().contains("auto_increment") {
            tail.push_str(" AUTO_INCREMENT");
        }
        out.insert(column.name.clone(), tail);
    }
    Ok(out)
}

/// Makes HQ's table able to hold `shape`'s rows, or says why it cannot; logs it.
pub async fn evolve(conn: &mut Conn, database: &str, model: &Model, site: &str, shape: &TableShape, ts_ms: i64, offset: i64) -> Result<Evolved, SinkError> {
    let outcome = match shape.evolve(model.table(&shape.table).map(|t| &**t)) {
        Ok(steps) => {
            let kept = kept_attributes(conn, database, &shape.table, &steps).await?;
            let mut stmts = statements(shape, &steps, model, &kept);
            for s in &stmts {
                conn.query_drop(s).await.map_err(|e| SinkError::db(format!("evolving HQ's `{}` for site {site}: {s}", shape.table), e))?;
            }
            // Indexes after columns: a new index may be on a column just added.
            let have = if shape.indexes.is_empty() { Vec::new() } else { Model::indexes(conn, database, &shape.table).await? };
            for s in index_statements(shape, &have) {
                conn.query_drop(&s).await.map_err(|e| SinkError::db(format!("adding the site's index to HQ's `{}` for site {site}: {s}", shape.table), e))?;
                stmts.push(s);
            }
            if stmts.is_empty() {
                Evolved::InStep
            } else {
                Evolved::Applied(stmts)
            }
        }
        Err(reason) => Evolved::Blocked(reason),
    };
    let (status, applied, reason) = match &outcome {
        Evolved::Applied(s) => ("applied", Some(s.join(";\n")), None),
        Evolved::InStep => ("in_step", None, None),
        Evolved::Blocked(r) => ("blocked", None, Some(r.clone())),
    };
    let key = format!("{site}:{}:{ts_ms}:{offset}", shape.table);
    conn.exec_drop(
        "INSERT IGNORE INTO omrs_sync_schema_change (event_key, site, tbl, site_ddl, applied, status, reason, site_ts_ms, kafka_offset, recorded_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, FROM_UNIXTIME(? / 1000))",
        (key, site, &shape.table, shape.ddl.as_deref(), applied, status, reason, ts_ms, offset, now_ms()),
    )
    .await
    .map_err(|e| SinkError::db("logging a schema change", e))?;
    match &outcome {
        Evolved::Applied(s) => tracing::info!(site, table = %shape.table, statements = ?s, "HQ's table evolved with the site's schema"),
        Evolved::InStep => tracing::debug!(site, table = %shape.table, "HQ already has the site's schema"),
        Evolved::Blocked(r) => tracing::error!(
            site, table = %shape.table, ddl = shape.ddl.as_deref().unwrap_or(""), reason = %r,
            "a schema change HQ will not follow alone: this site's changes of the table are dead-lettered (schema_blocked) until a person migrates HQ (docs/OPERATIONS.md, \"OpenMRS upgrades\")"
        ),
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use omrs_core::model::{ColumnInfo, TableModel};
    use omrs_core::shape::{ColumnShape, FkShape};
    use std::sync::Arc;

    #[test]
    fn additive_steps_become_nullable_columns_in_place_and_tables_with_their_keys() {
        let mut model = Model::default();
        let cols = |c: &[&str]| c.iter().map(|n| ColumnInfo { name: n.to_string(), column_type: "int(11)".into(), ..Default::default() }).collect();
        model.tables.insert("patient".into(), Arc::new(TableModel { name: "patient".into(), columns: cols(&["patient_id"]), pk: vec!["patient_id".into()], has_uuid: false, fks: vec![], shared_parent: None, enums: Default::default() }));
        let shape = TableShape {
            table: "hiv_care".into(),
            columns: vec![ColumnShape { name: "hiv_care_id".into(), column_type: "int(11)".into(), not_null: true, default: None }, ColumnShape { name: "patient_id".into(), column_type: "int(11)".into(), not_null: true, default: None }],
            pk: vec!["hiv_care_id".into()],
            fks: vec![FkShape { column: "patient_id".into(), ref_table: "patient".into(), ref_column: "patient_id".into() }, FkShape { column: "x".into(), ref_table: "nowhere".into(), ref_column: "id".into() }],
            indexes: vec![],
            dropped: false,
            ddl: None,
            shared_parent: None,
            base: false,
        };
        let s = statements(&shape, &[Step::Create], &model, &HashMap::new());
        assert_eq!(s, ["CREATE TABLE IF NOT EXISTS `hiv_care` (`hiv_care_id` int(11) NOT NULL, `patient_id` int(11) NULL, PRIMARY KEY (`hiv_care_id`), FOREIGN KEY (`patient_id`) REFERENCES `patient` (`patient_id`)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"]);
        let add = |after: Option<&str>| Step::AddColumn { column: ColumnShape { name: "nick".into(), column_type: "varchar(50)".into(), ..Default::default() }, after: after.map(str::to_string) };
        let p = TableShape { table: "patient".into(), ..shape.clone() };
        assert_eq!(statements(&p, &[add(Some("patient_id")), add(Some("gone")), add(None)], &model, &HashMap::new()), [
            "ALTER TABLE `patient` ADD COLUMN `nick` varchar(50) NULL AFTER `patient_id`",
            "ALTER TABLE `patient` ADD COLUMN `nick` varchar(50) NULL",
            "ALTER TABLE `patient` ADD COLUMN `nick` varchar(50) NULL FIRST",
        ]);
        let widen = Step::Widen { column: ColumnShape { name: "patient_id".into(), column_type: "bigint(20)".into(), ..Default::default() }, from: "int(11)".into() };
        let channel = ColumnShape { name: "channel".into(), column_type: "varchar(16)".into(), not_null: true, default: Some("'in_person'".into()) };
        assert_eq!(statements(&p, &[Step::AddColumn { column: channel, after: None }], &model, &HashMap::new()), ["ALTER TABLE `patient` ADD COLUMN `channel` varchar(16) NOT NULL DEFAULT 'in_person' FIRST"]);
        let kept = HashMap::from([("patient_id".to_string(), " NOT NULL AUTO_INCREMENT".to_string())]);
        assert_eq!(statements(&p, &[widen], &model, &kept), ["ALTER TABLE `patient` MODIFY COLUMN `patient_id` bigint(20) NOT NULL AUTO_INCREMENT"]);
    }

    #[test]
    fn a_sites_new_index_is_a_plain_index_at_hq_under_a_free_name() {
        let i = |name: &str, cols: &[&str], unique: bool| IndexShape { name: name.into(), columns: cols.iter().map(|c| c.to_string()).collect(), unique };
        let col = |n: &str| ColumnShape { name: n.into(), column_type: "varchar(50)".into(), ..Default::default() };
        let shape = TableShape {
            table: "person_name".into(),
            columns: ["name_origin", "family_name", "given_name", "uuid"].iter().map(|n| col(n)).collect(),
            pk: vec![],
            fks: vec![],
            indexes: vec![
                i("name_origin_idx", &["name_origin"], true),
                i("family_prefix", &["family_name(10)", "given_name"], false),
                i("given", &["given_name"], false),
                i("name_uuid", &["uuid"], true),
                i("later", &["not_yet_here"], false),
            ],
            dropped: false,
            ddl: None,
            shared_parent: None,
            base: false,
        };
        let have = [i("name_origin_idx", &["voided"], false), i("person_name_given", &["given_name"], false)];
        assert_eq!(index_statements(&shape, &have), [
            "ALTER TABLE `person_name` ADD INDEX `name_origin_idx_2` (`name_origin`)",
            "ALTER TABLE `person_name` ADD INDEX `family_prefix` (`family_name`(10), `given_name`)",
            "ALTER TABLE `person_name` ADD UNIQUE INDEX `name_uuid` (`uuid`)",
        ]);
        let now: Vec<IndexShape> = have.iter().cloned().chain([i("name_origin_idx_2", &["name_origin"], false), i("family_prefix", &["family_name(10)", "given_name"], false), i("name_uuid", &["uuid"], true)]).collect();
        assert!(index_statements(&shape, &now).is_empty(), "the second site's same index finds HQ in step");
    }
}
