//! The HQ database: created from the real OpenMRS schema and the shared metadata of the demo
//! dump (`--init`), plus the sink's own bookkeeping in `omrs_sync_*` tables. OpenMRS tables are
//! never altered.

use std::path::Path;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::SinkError;

/// The sink's bookkeeping. Every table is written in the same transaction as the rows it
/// describes.
pub const BOOKKEEPING: &[&str] = &[
    // Consumed offsets of omrs.hq.changes: where a restart resumes (semantics 1).
    "CREATE TABLE IF NOT EXISTS omrs_sync_offsets (
        topic VARCHAR(249) NOT NULL,
        kafka_partition INT NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at DATETIME(3) NOT NULL,
        PRIMARY KEY (topic, kafka_partition)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // One version per HQ row (semantics 6), which is also its provenance: the site and the
    // site-local key it came from, and the HQ id it was given. A row the sink created keeps its
    // first version in a pack (below) until it changes again; every later version, every
    // delete (a tombstone) and every row without an HQ id of its own is here.
    "CREATE TABLE IF NOT EXISTS omrs_sync_version (
        tbl VARCHAR(64) NOT NULL,
        row_key VARCHAR(255) NOT NULL,
        hq_id BIGINT NULL,
        change_ms BIGINT NOT NULL,
        priority INT NOT NULL,
        site VARCHAR(64) NOT NULL,
        commit_ms BIGINT NOT NULL,
        position VARCHAR(128) NOT NULL,
        origin_key VARCHAR(255) NULL,
        content_hash BIGINT UNSIGNED NOT NULL,
        deleted TINYINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tbl, row_key)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // First versions of the rows one batch created in one table, packed into one JSON array
    // (`[hq_id, row_key, change_ms, priority, site, commit_ms, position, origin_key,
    // content_hash]` per row, by HQ id) in the format of COMPRESS(): one row per batch and
    // table instead of one per row.
    // A pack covers the HQ ids first_id..=last_id; an entry counts only while
    // omrs_sync_version has no row for its key. A pack is written ahead of its batch
    // (committed = 0) and marked committed in the batch's transaction.
    "CREATE TABLE IF NOT EXISTS omrs_sync_version_pack (
        pack_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        tbl VARCHAR(64) NOT NULL,
        first_id BIGINT NOT NULL,
        last_id BIGINT NOT NULL,
        entries LONGBLOB NOT NULL,
        committed TINYINT NOT NULL DEFAULT 1,
        KEY (tbl, first_id)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // The version and provenance of every HQ row, one row each, whichever table holds it: what
    // to query for "which site did this row come from".
    "CREATE OR REPLACE VIEW omrs_sync_row_version AS
        SELECT tbl, row_key, hq_id, change_ms, priority, site, commit_ms, position, origin_key, content_hash, deleted
        FROM omrs_sync_version
     UNION ALL
        SELECT p.tbl, j.row_key, j.hq_id, j.change_ms, j.priority, j.site, j.commit_ms, j.position, j.origin_key, j.content_hash, 0
        FROM omrs_sync_version_pack p, JSON_TABLE(CONVERT(UNCOMPRESS(p.entries) USING utf8mb4), '$[*]' COLUMNS (
            hq_id BIGINT PATH '$[0]',
            row_key VARCHAR(255) CHARACTER SET utf8mb4 PATH '$[1]',
            change_ms BIGINT PATH '$[2]',
            priority INT PATH '$[3]',
            site VARCHAR(64) CHARACTER SET utf8mb4 PATH '$[4]',
            commit_ms BIGINT PATH '$[5]',
            position VARCHAR(128) CHARACTER SET utf8mb4 PATH '$[6]',
            origin_key VARCHAR(255) CHARACTER SET utf8mb4 PATH '$[7]',
            content_hash BIGINT UNSIGNED PATH '$[8]')) j
        WHERE p.committed = 1 AND NOT EXISTS (SELECT 1 FROM omrs_sync_version v WHERE v.tbl = p.tbl AND v.row_key = j.row_key)",
    // Every losing change (semantics 6).
    "CREATE TABLE IF NOT EXISTS omrs_sync_conflict (
        conflict_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        tbl VARCHAR(64) NOT NULL,
        row_key VARCHAR(255) NOT NULL,
        winner_site VARCHAR(64) NOT NULL,
        winner_version TEXT NOT NULL,
        loser_site VARCHAR(64) NOT NULL,
        loser_version TEXT NOT NULL,
        loser_values LONGTEXT NULL,
        overwritten TINYINT NOT NULL,
        detected_at DATETIME(3) NOT NULL,
        KEY (tbl, row_key)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // Rows waiting for a referenced row (semantics 7).
    "CREATE TABLE IF NOT EXISTS omrs_sync_pending (
        pending_id BIGINT NOT NULL PRIMARY KEY,
        tbl VARCHAR(64) NOT NULL,
        row_key VARCHAR(255) NOT NULL,
        waits_for_table VARCHAR(64) NOT NULL,
        waits_for_key VARCHAR(255) NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        source_offset BIGINT NOT NULL,
        event LONGTEXT NOT NULL,
        KEY (waits_for_table, waits_for_key)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // Every merge applied at HQ, in addition to OpenMRS's own person_merge_log.
    "CREATE TABLE IF NOT EXISTS omrs_sync_merge (
        loser_uuid CHAR(38) NOT NULL PRIMARY KEY,
        winner_uuid CHAR(38) NOT NULL,
        reason VARCHAR(32) NOT NULL,
        evidence TEXT NULL,
        site VARCHAR(64) NOT NULL,
        ts_ms BIGINT NOT NULL,
        applied TINYINT NOT NULL,
        merge_log_uuid CHAR(38) NULL,
        applied_at DATETIME(3) NULL,
        review_id CHAR(36) NULL,
        KEY (winner_uuid),
        KEY (merge_log_uuid)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // Records a split made survivors again (issue #23 §4): alive at HQ even where their clinic
    // voided them by merging them, until they are merged again.
    "CREATE TABLE IF NOT EXISTS omrs_sync_released (
        person_uuid CHAR(38) NOT NULL PRIMARY KEY,
        review_id CHAR(36) NULL,
        ts_ms BIGINT NOT NULL
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // The identity review queue (omrs_core::hq::review): every merge (status `merged`),
    // every identity change HQ will not act on alone (`open`), and what a person decided.
    // `first_seen` is the site time of the event that raised it (UTC), `raised_at` HQ's.
    "CREATE TABLE IF NOT EXISTS omrs_sync_identity_review (
        review_id CHAR(36) NOT NULL PRIMARY KEY,
        reason VARCHAR(32) NOT NULL,
        status VARCHAR(16) NOT NULL,
        person_uuid CHAR(38) NOT NULL,
        records TEXT NOT NULL,
        evidence TEXT NULL,
        site VARCHAR(64) NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        first_seen DATETIME(3) NOT NULL,
        raised_at DATETIME(3) NOT NULL,
        decided_at DATETIME(3) NULL,
        decided_by VARCHAR(255) NULL,
        note TEXT NULL,
        KEY (status, reason),
        KEY (person_uuid)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // Identifiers, names and addresses that left their own person (moved by a merge, or written
    // to a survivor by the transform): whose they are and their own `preferred` flag, so that
    // one handed back to its person by a survivor change is preferred again as at its site.
    super::apply::evolve::LOG_DDL,
    "CREATE TABLE IF NOT EXISTS omrs_sync_moved (
        tbl VARCHAR(64) NOT NULL,
        hq_id BIGINT NOT NULL,
        person_uuid CHAR(38) NOT NULL,
        preferred TINYINT NULL,
        PRIMARY KEY (tbl, hq_id)
     ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
];

/// The dashboard tables (`omrs_dash_*`, issue #9): one row per aggregate window, upserted by
/// window key in the sink's transaction. `is_final` and `revision` say whether the watermark
/// has passed the window and how many final versions it has had (corrections bump it).
pub fn dash_ddl() -> Vec<String> {
    omrs_core::hq::AGGREGATES
        .iter()
        .map(|a| {
            let dim = a.dim_column.map(|c| format!("{c} VARCHAR(64) NOT NULL, ")).unwrap_or_default();
            let pk_dim = a.dim_column.map(|c| format!(", {c}")).unwrap_or_default();
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    site VARCHAR(64) NOT NULL,
                    window_start DATETIME NOT NULL,
                    window_end DATETIME NOT NULL,
                    {dim}value BIGINT NOT NULL COMMENT '{counts}',
                    is_final TINYINT NOT NULL,
                    revision INT NOT NULL,
                    watermark_ms BIGINT NOT NULL,
                    updated_at DATETIME(3) NOT NULL,
                    PRIMARY KEY (site, window_start{pk_dim})
                 ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
                t = a.hq_table,
                counts = a.counts,
            )
        })
        .collect()
}

/// Creates the bookkeeping and dashboard tables if they are missing.
pub async fn ensure_bookkeeping(conn: &mut Conn) -> Result<(), SinkError> {
    // HQ databases made before version packs kept every version in the table that is now the
    // view: it becomes omrs_sync_version, rows and all.
    let old: Option<String> = conn
        .query_first("SELECT table_type FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'omrs_sync_row_version'")
        .await
        .map_err(|e| SinkError::db("reading information_schema", e))?;
    if old.as_deref() == Some("BASE TABLE") {
        tracing::info!("moving omrs_sync_row_version to omrs_sync_version (a view over versions and version packs takes its name)");
        conn.query_drop("RENAME TABLE omrs_sync_row_version TO omrs_sync_version")
            .await
            .map_err(|e| SinkError::db("renaming omrs_sync_row_version to omrs_sync_version", e))?;
    }
    for ddl in BOOKKEEPING {
        conn.query_drop(*ddl).await.map_err(|e| SinkError::db("creating the omrs_sync_ tables", e))?;
    }
    for ddl in dash_ddl() {
        conn.query_drop(ddl).await.map_err(|e| SinkError::db("creating the omrs_dash_ tables", e))?;
    }
    // HQ databases made before them lack the index that finds HQ's own merge logs (a lookup
    // per site merge log written; without it, a scan of omrs_sync_merge per row) and the link
    // from a merge to its review.
    let added = [
        ("statistics", "merge_log_uuid", "ADD KEY merge_log_uuid (merge_log_uuid)", "indexing omrs_sync_merge.merge_log_uuid"),
        ("columns", "review_id", "ADD COLUMN review_id CHAR(36) NULL", "adding omrs_sync_merge.review_id (the identity review queue)"),
    ];
    for (view, column, alter, what) in added {
        let present: Option<i64> = conn
            .query_first(format!("SELECT COUNT(*) FROM information_schema.{view} WHERE table_schema = DATABASE() AND table_name = 'omrs_sync_merge' AND column_name = '{column}'"))
            .await
            .map_err(|e| SinkError::db("reading information_schema", e))?;
        if present == Some(0) {
            tracing::info!("{what}");
            conn.query_drop(format!("ALTER TABLE omrs_sync_merge {alter}")).await.map_err(|e| SinkError::db(what, e))?;
        }
    }
    conn.query_drop(IDENTITY_MERGE_VIEW).await.map_err(|e| SinkError::db("creating the omrs_sync_identity_merge view", e))?;
    Ok(())
}

/// Every merge HQ holds, one row per merged-away record: the survivor it now belongs to, the
/// rule and evidence that linked them, the site that brought the evidence, when, and the
/// status of its review (`merged` until a person confirms it).
const IDENTITY_MERGE_VIEW: &str = "CREATE OR REPLACE VIEW omrs_sync_identity_merge AS
    SELECT m.winner_uuid AS survivor_uuid, m.loser_uuid, m.reason AS rule, m.evidence, m.site,
           m.ts_ms AS first_seen_ms, m.applied, m.applied_at, m.review_id,
           COALESCE(r.status, 'merged') AS status
      FROM omrs_sync_merge m LEFT JOIN omrs_sync_identity_review r ON r.review_id = m.review_id";

/// True when `database` already holds an OpenMRS schema.
pub async fn has_openmrs(conn: &mut Conn, database: &str) -> Result<bool, SinkError> {
    let n: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ? AND table_name IN ('person', 'patient', 'encounter', 'obs')",
            (database,),
        )
        .await
        .map_err(|e| SinkError::db("reading information_schema", e))?;
    Ok(n.unwrap_or(0) == 4)
}

/// `--init`: the OpenMRS schema and shared metadata from the demo dump, then the bookkeeping.
/// An existing HQ database is kept unless `force`.
pub async fn init(conn: &mut Conn, database: &str, dump: &Path, force: bool) -> Result<bool, SinkError> {
    if has_openmrs(conn, database).await? && !force {
        conn.query_drop(format!("USE `{database}`")).await.map_err(|e| SinkError::db("selecting the HQ database", e))?;
        ensure_bookkeeping(conn).await?;
        return Ok(false);
    }
    if !dump.exists() {
        return Err(SinkError::Usage(omrs_core::openmrs::missing_dump(dump)));
    }
    omrs_core::openmrs::load_dump(conn, database, dump, false).await.map_err(|e| match e {
        omrs_core::openmrs::DumpError::Db { context, source } => SinkError::db(context, source),
        other => SinkError::Usage(other.to_string()),
    })?;
    ensure_bookkeeping(conn).await?;
    Ok(true)
}

/// `--init --schema-from <site>`: HQ's OpenMRS tables as the site has them (`SHOW CREATE TABLE`
/// of each base table, foreign keys included, auto-increment counters reset), no rows, then the
/// bookkeeping. Returns the number of tables, or None when an existing HQ was kept.
pub async fn init_from_site(conn: &mut Conn, database: &str, site: &omrs_core::config::DatabaseConfig, force: bool) -> Result<Option<usize>, SinkError> {
    if has_openmrs(conn, database).await? && !force {
        conn.query_drop(format!("USE `{database}`")).await.map_err(|e| SinkError::db("selecting the HQ database", e))?;
        ensure_bookkeeping(conn).await?;
        return Ok(None);
    }
    let mut src = Conn::new(site.opts()).await.map_err(|e| SinkError::db(format!("connecting to the site at {}", site.redacted_url()), e))?;
    let tables: Vec<String> = src
        .exec(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ? AND table_type = 'BASE TABLE' ORDER BY table_name",
            (&site.database,),
        )
        .await
        .map_err(|e| SinkError::db("listing the site's tables", e))?;
    let tables: Vec<String> = tables.into_iter().filter(|t| !t.starts_with("omrs_sync_") && !t.starts_with("omrs_dash_")).collect();
    if !tables.iter().any(|t| t == "person") || !tables.iter().any(|t| t == "patient") {
        return Err(SinkError::Usage(format!("--schema-from: database `{}` at {} is not an OpenMRS database (no person or patient table)", site.database, site.redacted_url())));
    }
    let mut ddl = Vec::with_capacity(tables.len());
    for t in &tables {
        let row: Option<(String, String)> = src
            .query_first(format!("SHOW CREATE TABLE `{}`.`{}`", site.database.replace('`', "``"), t.replace('`', "``")))
            .await
            .map_err(|e| SinkError::db(format!("reading the definition of the site's `{t}`"), e))?;
        let Some((_, create)) = row else { continue };
        ddl.push(without_auto_increment(&create));
    }
    let _ = src.disconnect().await;
    conn.query_drop(format!("DROP DATABASE IF EXISTS `{database}`; CREATE DATABASE `{database}` DEFAULT CHARACTER SET utf8mb4; USE `{database}`"))
        .await
        .map_err(|e| SinkError::db("creating the HQ database", e))?;
    conn.query_drop("SET FOREIGN_KEY_CHECKS = 0").await.map_err(|e| SinkError::db("setting FOREIGN_KEY_CHECKS", e))?;
    for (t, create) in tables.iter().zip(&ddl) {
        conn.query_drop(create).await.map_err(|e| SinkError::db(format!("creating `{t}` at HQ"), e))?;
    }
    conn.query_drop("SET FOREIGN_KEY_CHECKS = 1").await.map_err(|e| SinkError::db("setting FOREIGN_KEY_CHECKS", e))?;
    ensure_bookkeeping(conn).await?;
    Ok(Some(ddl.len()))
}

/// A `CREATE TABLE` without its `AUTO_INCREMENT=n` table option: HQ numbers its own rows.
fn without_auto_increment(create: &str) -> String {
    match create.rfind(" AUTO_INCREMENT=") {
        Some(i) => {
            let rest = &create[i + 1..];
            let end = rest.find(' ').map(|e| i + 1 + e).unwrap_or(create.len());
            format!("{}{}", &create[..i], &create[end..])
        }
        None => create.to_string(),
    }
}

#[cfg(test)]
mod init_tests {
    #[test]
    fn the_sites_row_counter_is_not_copied() {
        let c = "CREATE TABLE `obs` (\n  `obs_id` int(11) NOT NULL AUTO_INCREMENT,\n  PRIMARY KEY (`obs_id`)\n) ENGINE=InnoDB AUTO_INCREMENT=9981 DEFAULT CHARSET=utf8mb3";
        assert_eq!(super::without_auto_increment(c), "CREATE TABLE `obs` (\n  `obs_id` int(11) NOT NULL AUTO_INCREMENT,\n  PRIMARY KEY (`obs_id`)\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb3");
        assert_eq!(super::without_auto_increment("CREATE TABLE t (a int)"), "CREATE TABLE t (a int)");
    }
}
