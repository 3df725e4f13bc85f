//! Dashboard aggregates: the transform's window versions upserted into `omrs_dash_*`.

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::sql::{datetime, db};
use crate::SinkError;

/// A batch's aggregate window versions: aggregate name → (site, window start, dimension) → the
/// latest version.
pub(super) type Aggregates = BTreeMap<String, BTreeMap<(String, i64, String), AggRow>>;

/// One aggregate window version, as upserted.
#[derive(Debug, Clone)]
pub(super) struct AggRow {
    pub(super) site: String,
    pub(super) start_ms: i64,
    pub(super) end_ms: i64,
    pub(super) dim: String,
    pub(super) value: i64,
    pub(super) is_final: bool,
    pub(super) revision: u32,
    pub(super) watermark_ms: i64,
}

/// Upserts the batch's aggregate versions (the latest per window wins: records are in order).
pub(super) async fn upsert_aggregates(conn: &mut Conn, by_name: Aggregates) -> Result<u64, SinkError> {
    let mut n = 0;
    for (name, rows) in by_name {
        let Some(def) = omrs_core::hq::AGGREGATES.iter().find(|a| a.name == name) else { continue };
        let rows: Vec<AggRow> = rows.into_values().collect();
        for chunk in rows.chunks(500) {
            let dim_col = def.dim_column.map(|c| format!("{c}, ")).unwrap_or_default();
            let per_row = if def.dim_column.is_some() { "(?, ?, ?, ?, ?, ?, ?, ?, NOW(3))" } else { "(?, ?, ?, ?, ?, ?, ?, NOW(3))" };
            let sql = format!(
                "INSERT INTO {t} (site, window_start, window_end, {dim_col}value, is_final, revision, watermark_ms, updated_at) VALUES {vals} \
                 ON DUPLICATE KEY UPDATE window_end = VALUES(window_end), value = VALUES(value), is_final = VALUES(is_final), \
                 revision = VALUES(revision), watermark_ms = VALUES(watermark_ms), updated_at = VALUES(updated_at)",
                t = def.hq_table,
                vals = vec![per_row; chunk.len()].join(", "),
            );
            let mut params: Vec<mysql_async::Value> = Vec::with_capacity(chunk.len() * 8);
            for r in chunk {
                params.push(r.site.clone().into());
                params.push(datetime(r.start_ms).into());
                params.push(datetime(r.end_ms).into());
                if def.dim_column.is_some() {
                    params.push(r.dim.clone().into());
                }
                params.push(r.value.into());
                params.push((r.is_final as i64).into());
                params.push((r.revision as i64).into());
                params.push(r.watermark_ms.into());
            }
            conn.exec_drop(sql, params).await.map_err(db("upserting dashboard aggregates"))?;
            n += chunk.len() as u64;
        }
    }
    Ok(n)
}
