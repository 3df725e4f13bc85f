//! Opening the binlog stream at a checkpoint: the server's identity, whether the checkpoint's
//! file is still retained (and the margin and retention metrics), the binlog end for
//! `--until-caught-up`, and the request by GTID or by file and position.
//!
//! Reads only; the stream's delivery guarantee is the module's (`super`).

use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest};
use omrs_core::metrics::metrics;

use crate::checkpoint::Position;
use crate::server::{grant_error, Kind};
use crate::{connect, Agent, IngestError};

/// An open binlog stream and how it was positioned.
pub(super) struct Opened {
    pub stream: BinlogStream,
    /// The GTID it resumes after, when it resumes by GTID.
    pub by_gtid: Option<String>,
    /// The binlog end when it opened.
    pub target: Option<(String, u64)>,
}

pub(super) async fn open(agent: &mut Agent, position: &Position, skip_rows: u64) -> Result<Opened, IngestError> {
    let site = agent.site.name.clone();
    let mut conn = connect(&agent.site).await?;
    let server_id: u32 = conn.query_first("SELECT @@server_id").await.map_err(|e| IngestError::site("reading server_id", e))?.unwrap_or(0);
    agent.server_id = server_id;
    // A MySQL checkpoint whose file is gone may still resume by its GTID set.
    let gtid_set = match check_retained(&mut conn, &site, position).await {
        Ok(()) => None,
        Err(IngestError::Purged(msg)) => match mysql_gtid_resume(&mut conn, agent, position, skip_rows).await? {
            Some(set) => {
                tracing::warn!(site = %site, file = %position.file, gtid_set = %set, "the checkpoint's binlog file is not on this server: resuming by the checkpoint's GTID set (a fail-over, or a purge of transactions the agent had read)");
                Some(set)
            }
            None => return Err(IngestError::Purged(msg)),
        },
        Err(e) => return Err(e),
    };
    let target: Option<(String, u64)> = {
        let row: Option<mysql_async::Row> = conn.query_first(agent.server.binlog_status_sql()).await.map_err(|e| grant_error("reading the binlog end", "REPLICATION CLIENT", e))?;
        row.and_then(|r| Some((r.get::<String, _>(0)?, r.get::<u64, _>(1)?)))
    };
    let mariadb = agent.server.detected == Kind::MariaDb;
    if mariadb {
        conn.query_drop("SET @mariadb_slave_capability = 4").await.map_err(|e| IngestError::site("announcing GTID capability", e))?;
    }
    // A replica id unique to this connection, so concurrent agents on one server do not kick
    // each other off.
    let replica_id = 1_000_000_000u32 + (rand_u32() % 1_000_000_000);
    // Resume by GTID where a MariaDB server has GTIDs (it survives a fail-over to a replica whose
    // file names differ), else by file and position. A split transaction resumes at its start by
    // position, since it must be re-read from its first row. MySQL resumes by file and position
    // while the file is there (the path every test runs), else by the executed GTID set the
    // checkpoint keeps (`COM_BINLOG_DUMP_GTID`).
    let server_gtids: String = if mariadb {
        conn.query_first::<Option<String>, _>("SELECT @@GLOBAL.gtid_binlog_pos")
            .await
            .map_err(|e| IngestError::site("reading gtid_binlog_pos", e))?
            .flatten()
            .unwrap_or_default()
    } else {
        String::new()
    };
    let by_gtid = match (&gtid_set, &position.gtid, skip_rows) {
        (Some(set), _, _) => Some(set.to_string()),
        (None, Some(g), 0) if !server_gtids.is_empty() && g.split('-').count() == 3 && g.chars().all(|c| c.is_ascii_digit() || c == '-') => Some(g.clone()),
        _ => None,
    };
    let file_bytes = position.file.clone().into_bytes();
    let req = match (&by_gtid, &gtid_set) {
        (_, Some(set)) => BinlogStreamRequest::new(replica_id)
            .with_gtid()
            .with_gtid_set(set.sids().map_err(|e| IngestError::Checkpoint(format!("site {site}: the checkpoint's GTID set: {e}")))?)
            .with_filename(b"")
            .with_pos(4),
        (Some(gtid), None) => {
            conn.query_drop(format!("SET @slave_connect_state = '{gtid}'; SET @slave_gtid_strict_mode = 0; SET @slave_gtid_ignore_duplicates = 0"))
                .await
                .map_err(|e| IngestError::site("setting the GTID to resume from", e))?;
            BinlogStreamRequest::new(replica_id).with_filename(b"").with_pos(4)
        }
        (None, None) => BinlogStreamRequest::new(replica_id).with_filename(&file_bytes).with_pos(position.pos),
    };
    let stream = conn.get_binlog_stream(req).await.map_err(|e| grant_error("requesting the binlog", "REPLICATION SLAVE", e))?;
    tracing::info!(site = %site, file = %position.file, pos = position.pos, gtid = ?by_gtid, skip_rows, "streaming the binlog");
    Ok(Opened { stream, by_gtid, target })
}

/// When a MySQL checkpoint's file is gone: its GTID set, if the server can send every
/// transaction after it (GTIDs on, and none of those transactions purged:
/// `GTID_SUBSET(@@gtid_purged, set)`). None: resuming is not possible (the caller's error
/// says to take a fresh snapshot).
async fn mysql_gtid_resume(conn: &mut mysql_async::Conn, agent: &Agent, position: &Position, skip_rows: u64) -> Result<Option<crate::gtid::GtidSet>, IngestError> {
    let Some(text) = position.gtid_set.as_deref() else { return Ok(None) };
    if !resumable_by_gtid_set(agent.server.detected, skip_rows, text) {
        return Ok(None);
    }
    let set = crate::gtid::GtidSet::parse(text).map_err(IngestError::Checkpoint)?;
    let mode: Option<String> = conn.query_first("SELECT @@GLOBAL.gtid_mode").await.map_err(|e| IngestError::site("reading gtid_mode", e))?;
    if !mode.is_some_and(|m| m.eq_ignore_ascii_case("ON")) {
        return Ok(None);
    }
    let subset: Option<i64> = conn
        .exec_first("SELECT GTID_SUBSET(@@GLOBAL.gtid_purged, ?)", (set.to_string(),))
        .await
        .map_err(|e| IngestError::site("comparing gtid_purged with the checkpoint's GTID set", e))?;
    Ok((subset == Some(1)).then_some(set))
}

/// A checkpoint can resume by its GTID set: a MySQL server (MariaDB's GTIDs are another
/// protocol), a whole transaction (a split one is re-read from its first row, by position),
/// and a non-empty set.
pub(super) fn resumable_by_gtid_set(server: Kind, skip_rows: u64, set: &str) -> bool {
    server == Kind::MySql && skip_rows == 0 && !set.trim().is_empty()
}

/// The checkpoint's file must still be on the server; sets the margin and retention metrics.
async fn check_retained(conn: &mut mysql_async::Conn, site: &str, position: &Position) -> Result<(), IngestError> {
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(|e| grant_error("listing binary logs", "REPLICATION CLIENT", e))?;
    let files: Vec<String> = logs.iter().filter_map(|r| r.get::<String, _>(0)).collect();
    let Some(idx) = files.iter().position(|f| *f == position.file) else {
        return Err(IngestError::Purged(format!(
            "site {site}: binlog file {} (position {}) is no longer on the server (oldest retained: {}); it was purged while the agent was behind. \
             Run `omrs-stream ingest --site {site} --resnapshot` to take a fresh snapshot and resume, and raise expire_logs_days / binlog_expire_logs_seconds.",
            position.file,
            position.pos,
            files.first().map(String::as_str).unwrap_or("none")
        )));
    };
    metrics().ingest_binlog_margin.with_label_values(&[site]).set(idx as i64);
    // The server's binlog retention, for alerts against the longest expected outage
    // (OPERATIONS.md, "Binlog retention"): binlog_expire_logs_seconds where the server has it
    // (MariaDB 10.6+, MySQL 8), else expire_logs_days.
    let retention: Option<f64> = match conn.query_first::<f64, _>("SELECT @@binlog_expire_logs_seconds").await {
        Ok(v) => v,
        Err(_) => conn.query_first::<f64, _>("SELECT @@expire_logs_days * 86400").await.ok().flatten(),
    };
    if let Some(secs) = retention {
        metrics().ingest_binlog_retention.with_label_values(&[site]).set(secs as i64);
        if secs == 0.0 {
            tracing::info!(site = %site, "the site server never purges its binlogs (retention 0)");
        }
    }
    if idx == 0 && files.len() > 1 {
        tracing::warn!(site = %site, file = %position.file, "the agent's binlog file is the oldest the server retains: the next purge loses changes it has not read");
    }
    Ok(())
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u32) ^ ((t >> 32) as u32) ^ std::process::id().wrapping_mul(2654435761)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_mysql_transaction_with_a_set_resumes_by_it() {
        let set = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-40";
        assert!(resumable_by_gtid_set(Kind::MySql, 0, set));
        assert!(!resumable_by_gtid_set(Kind::MariaDb, 0, set), "MariaDB's GTIDs are another protocol");
        assert!(!resumable_by_gtid_set(Kind::MySql, 3, set), "a split transaction is re-read by position");
        assert!(!resumable_by_gtid_set(Kind::MySql, 0, " "));
    }
}
