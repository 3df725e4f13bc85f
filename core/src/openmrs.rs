//! The real OpenMRS schema and metadata, from the OpenMRS demo dump (`scripts/fetch-demo-dump`
//! puts it in place: a local copy, or the pinned file from github.com/openmrs/openmrs-standalone).
//!
//! Sites (through the simulator) and HQ (`omrs-stream sink hq-mysql --init`) are created the same
//! way: a fresh database, the dump loaded statement by statement, and, unless asked to keep
//! them, the demo patients removed so that only shared metadata (concepts, locations, encounter
//! types, users and providers with their persons) remains.
//!
//! Also here: what OpenMRS's own patient merge (`PatientService.mergePatients`) does, which HQ
//! and the lake both follow when they merge one person's records from several sites.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

/// The OpenMRS daemon user: HQ's own merges are done in its name.
pub const DAEMON_USER_UUID: &str = "A4F30A1B-5EB9-11DF-A648-37A07F9C90FB";

/// What `mergePatients` moves from the loser to the survivor: (table, column, also set
/// `preferred = 0`). Tables missing at HQ are skipped.
pub const MOVES: &[(&str, &str, bool)] = &[
    ("visit", "patient_id", false),
    ("encounter", "patient_id", false),
    ("obs", "person_id", false),
    ("orders", "patient_id", false),
    ("patient_program", "patient_id", false),
    ("conditions", "patient_id", false),
    ("allergy", "patient_id", false),
    ("relationship", "person_a", false),
    ("relationship", "person_b", false),
    ("person_attribute", "person_id", false),
    ("patient_identifier", "patient_id", true),
    ("person_name", "person_id", true),
    ("person_address", "person_id", true),
];

/// The name HQ's `omrs_sync_moved` knows a moved person column by: the table, or
/// `table.column` for a table with two person columns (`relationship`).
pub fn moved_key(table: &str, column: &str) -> String {
    if MOVES.iter().filter(|(t, _, _)| *t == table).count() > 1 {
        format!("{table}.{column}")
    } else {
        table.to_string()
    }
}

/// Why loading the dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("OpenMRS demo dump {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: mysql_async::Error,
    },
}

fn db(context: &'static str) -> impl FnOnce(mysql_async::Error) -> DumpError {
    move |source| DumpError::Db { context, source }
}

/// The demo dump's file name.
pub const DUMP_NAME: &str = "openmrs-standalone-demo-db-2.6.0.sql.gz";

/// Where the demo dump is looked for, the first that exists: `$OMRS_DEMO_DUMP`; where
/// `scripts/fetch-demo-dump` puts it (`$OMRS_STATE/openmrs-demo/`, `OMRS_STATE` being
/// `/var/lib/omrs-stream` by default); `../shared/openmrs-demo/` (a development checkout). When
/// none exists, the fetch script's place (and [`missing_dump`] says how to fill it).
pub fn default_dump() -> PathBuf {
    if let Ok(p) = std::env::var("OMRS_DEMO_DUMP") {
        return PathBuf::from(p);
    }
    let state = std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into());
    let fetched = Path::new(&state).join("openmrs-demo").join(DUMP_NAME);
    let shared = Path::new("../shared/openmrs-demo").join(DUMP_NAME);
    [fetched.clone(), shared].into_iter().find(|p| p.is_file()).unwrap_or(fetched)
}

/// What to do about a demo dump that is not at `path`.
pub fn missing_dump(path: &Path) -> String {
    format!(
        "the OpenMRS demo dump {} is not there: run scripts/fetch-demo-dump (it downloads the pinned file from \
         github.com/openmrs/openmrs-standalone, or copies a local one), or pass --dump PATH or set OMRS_DEMO_DUMP",
        path.display()
    )
}

/// Drops and recreates `database`, loads the dump into it, and strips the demo patients unless
/// `keep_demo_patients`. The connection is left on `database`.
pub async fn load_dump(conn: &mut Conn, database: &str, dump: &Path, keep_demo_patients: bool) -> Result<(), DumpError> {
    conn.query_drop(format!(
        "DROP DATABASE IF EXISTS `{database}`; CREATE DATABASE `{database}` DEFAULT CHARACTER SET utf8 COLLATE utf8_general_ci; USE `{database}`"
    ))
    .await
    .map_err(db("creating the database"))?;

    let file = std::fs::File::open(dump).map_err(|source| DumpError::Read { path: dump.to_path_buf(), source })?;
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut stmt = String::new();
    let mut batch = String::new();
    for line in reader.lines() {
        let line = line.map_err(|source| DumpError::Read { path: dump.to_path_buf(), source })?;
        if stmt.is_empty() && (line.starts_with("--") || line.trim().is_empty()) {
            continue;
        }
        stmt.push_str(&line);
        stmt.push('\n');
        if line.trim_end().ends_with(';') {
            batch.push_str(&stmt);
            stmt.clear();
            if batch.len() > 4 << 20 {
                conn.query_drop(std::mem::take(&mut batch)).await.map_err(db("loading the OpenMRS demo dump"))?;
            }
        }
    }
    if !batch.is_empty() {
        conn.query_drop(batch).await.map_err(db("loading the OpenMRS demo dump"))?;
    }

    if !keep_demo_patients {
        // Patient data only; users, providers and their persons stay (shared metadata).
        conn.query_drop(
            "SET FOREIGN_KEY_CHECKS=0;
             CREATE TEMPORARY TABLE demo_patients AS SELECT patient_id FROM patient;
             DELETE FROM obs WHERE person_id IN (SELECT patient_id FROM demo_patients);
             DELETE ep FROM encounter_provider ep JOIN encounter e ON e.encounter_id = ep.encounter_id
               WHERE e.patient_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM encounter WHERE patient_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM visit WHERE patient_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM patient_identifier WHERE patient_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM person_attribute WHERE person_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM person_name WHERE person_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM person_address WHERE person_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM idgen_log_entry;
             DELETE FROM patient WHERE patient_id IN (SELECT patient_id FROM demo_patients);
             DELETE FROM person WHERE person_id IN (SELECT patient_id FROM demo_patients);
             DROP TEMPORARY TABLE demo_patients;
             SET FOREIGN_KEY_CHECKS=1;",
        )
        .await
        .map_err(db("removing the demo patients"))?;
    }
    Ok(())
}
