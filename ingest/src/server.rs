//! What a site server is and whether it can be captured: MariaDB or MySQL and its version
//! (read from `VERSION()`, or forced by `[sites.database] flavor`), and its binlog settings.
//!
//! The two kinds differ where the agent starts and resumes:
//! - the consistent snapshot: MariaDB names the binlog position of a consistent-snapshot view in
//!   its session status (`binlog_snapshot_file`/`_position`), with no lock at all; MySQL has no
//!   such status, so the agent holds `FLUSH TABLES WITH READ LOCK` for the milliseconds it takes
//!   to open the view and read the position (as mysqldump and Debezium do);
//! - the binlog end: `SHOW MASTER STATUS`, renamed `SHOW BINARY LOG STATUS` in MySQL 8.4;
//! - GTIDs: MariaDB's `domain-server-seq`, resumed by `@slave_connect_state`; MySQL's
//!   `uuid[:tag]:gno`, kept in checkpoints (resuming there is by file and position).
//!
//! `binlog_row_metadata=FULL` puts column names in the binlog; with `MINIMAL` (the MySQL 5.7 and
//! 8.0 default, and a MariaDB choice) or none (MySQL 5.7 has no such setting) the names come
//! from the agent's schema history ([`crate::schema`]).
//!
//! Reads only; no delivery guarantee of its own.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::config::Flavor;

use crate::IngestError;

/// The server kind whose paths the agent takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MariaDb,
    MySql,
}

/// How much of a table's description the binlog's table maps carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowMetadata {
    /// Column names, primary key, enum labels.
    Full,
    /// Signedness and charsets only: names come from the schema history.
    Minimal,
    /// Nothing (MySQL 5.7, MariaDB NO_LOG): names, signedness and charsets from the history.
    None,
}

/// A site server as the agent found it.
#[derive(Debug, Clone)]
pub struct Server {
    /// The kind whose paths are taken (forced by `flavor`, else detected).
    pub kind: Kind,
    /// The kind `VERSION()` names.
    pub detected: Kind,
    /// `VERSION()`, e.g. `10.11.6-MariaDB-0+deb12u1` or `8.0.36`.
    pub version: String,
    /// Major, minor, patch.
    pub number: (u32, u32, u32),
    pub metadata: RowMetadata,
    pub server_id: u32,
}

impl Server {
    /// The statement that reads the binlog's end (file, position).
    pub fn binlog_status_sql(&self) -> &'static str {
        if self.detected == Kind::MySql && self.number >= (8, 4, 0) {
            "SHOW BINARY LOG STATUS"
        } else {
            "SHOW MASTER STATUS"
        }
    }
}

/// `10.11.6-MariaDB-0+deb12u1` → (10, 11, 6).
pub fn version_number(version: &str) -> (u32, u32, u32) {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Which kind a `VERSION()` string names.
pub fn detect(version: &str) -> Kind {
    if version.to_ascii_lowercase().contains("mariadb") {
        Kind::MariaDb
    } else {
        Kind::MySql
    }
}

/// Reads the server's kind and version and refuses one whose binlog cannot carry full row
/// images, with what to set.
pub async fn inspect(conn: &mut Conn, flavor: Flavor) -> Result<Server, IngestError> {
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(|e| IngestError::site("reading the server version", e))?
        .unwrap_or_default();
    let detected = detect(&version);
    let kind = match flavor {
        Flavor::Auto => detected,
        Flavor::Mariadb => Kind::MariaDb,
        Flavor::Mysql => Kind::MySql,
    };
    type Settings = (Option<String>, Option<String>, Option<String>, u32);
    let row: Option<Settings> = conn
        .query_first("SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image, @@GLOBAL.server_id")
        .await
        .map_err(|e| IngestError::site("reading binlog settings", e))?;
    let Some((log_bin, format, image, server_id)) = row else {
        return Err(IngestError::Refused("could not read the binlog settings".into()));
    };
    // Absent on MySQL 5.7 (and MariaDB before 10.5): an error, read as "no metadata".
    let metadata: Option<String> = conn.query_first::<Option<String>, _>("SELECT @@GLOBAL.binlog_row_metadata").await.ok().flatten().flatten();
    let on = |v: &Option<String>| v.as_deref().is_some_and(|s| s == "1" || s.eq_ignore_ascii_case("ON"));
    if !on(&log_bin) {
        return Err(IngestError::Refused(
            "log_bin is OFF: the binary log is disabled. Set `log_bin` (and server_id) in the server's [mysqld] config and restart it".into(),
        ));
    }
    let mut problems = Vec::new();
    if !format.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("ROW")) {
        problems.push(format!("binlog_format is {} (need ROW): SET GLOBAL binlog_format = 'ROW' and binlog_format=ROW in [mysqld]", format.unwrap_or_default()));
    }
    if !image.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("FULL")) {
        problems.push(format!("binlog_row_image is {} (need FULL): SET GLOBAL binlog_row_image = 'FULL' and binlog_row_image=FULL in [mysqld]", image.unwrap_or_default()));
    }
    if !problems.is_empty() {
        return Err(IngestError::Refused(problems.join("; ")));
    }
    let metadata = match metadata.as_deref().map(str::to_ascii_uppercase).as_deref() {
        Some("FULL") => RowMetadata::Full,
        Some("MINIMAL") => RowMetadata::Minimal,
        _ => RowMetadata::None,
    };
    let server = Server { kind, detected, number: version_number(&version), version, metadata, server_id };
    if metadata != RowMetadata::Full {
        tracing::info!(
            version = %server.version, metadata = ?metadata,
            "binlog_row_metadata is not FULL: column names come from the agent's schema history (information_schema at the snapshot, then every DDL in the binlog)"
        );
    }
    if kind != detected {
        tracing::info!(version = %server.version, ?kind, "flavor forced by the config");
    }
    Ok(server)
}

/// MySQL's "access denied" errors (1044, 1045, 1142, 1227): the user lacks a grant.
pub fn is_grant_error(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if matches!(s.code, 1044 | 1045 | 1142 | 1227))
}

/// A clear error for a statement the `cdc` user may not run (MySQL's 1227, 1044, 1045, 1142):
/// which grant it needs, else the server's own error.
pub fn grant_error(context: &str, grant: &str, e: mysql_async::Error) -> IngestError {
    if let mysql_async::Error::Server(s) = &e {
        if is_grant_error(&e) {
            return IngestError::Refused(format!(
                "{context}: {} (error {}). The agent's user needs {grant}: GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '<user>'@'<host>' (docs/OPERATIONS.md, \"MySQL sites\")",
                s.message, s.code
            ));
        }
    }
    IngestError::site(context, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_kinds_told_apart() {
        assert_eq!(version_number("10.11.6-MariaDB-0+deb12u1"), (10, 11, 6));
        assert_eq!(version_number("8.4.3"), (8, 4, 3));
        assert_eq!(version_number("5.7.44-log"), (5, 7, 44));
        assert_eq!(detect("10.11.6-MariaDB-0+deb12u1"), Kind::MariaDb);
        assert_eq!(detect("8.0.36-0ubuntu0.22.04.1"), Kind::MySql);
        let s = |v: &str| Server { kind: detect(v), detected: detect(v), version: v.into(), number: version_number(v), metadata: RowMetadata::Full, server_id: 1 };
        assert_eq!(s("8.4.0").binlog_status_sql(), "SHOW BINARY LOG STATUS");
        assert_eq!(s("8.0.36").binlog_status_sql(), "SHOW MASTER STATUS");
        assert_eq!(s("11.4.2-MariaDB").binlog_status_sql(), "SHOW MASTER STATUS");
    }
}
