//! `verify`'s lake checks: the lake's `current.<table>` equals HQ value for value (every HQ
//! column but HQ's own id; a reference as the `<column>_uuid` the lake keeps next to it; values
//! normalised across the MySQL → Arrow map), and the change history holds each site change
//! once (no two rows with the same site and binlog position, nor the same Kafka offset).
//!
//! A lake table is read whole (one table at a time); HQ is read in key order.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, ArrayRef, BinaryArray, LargeBinaryArray, StringArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use mysql_async::Conn;
use serde::Serialize;

use super::space::{norm, DbModel, Pager};
use super::values::{compared_columns, Merges, TableValues, ValueDiff};
use crate::SinkError;

/// Change-history rows that say the same thing twice.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryDuplicates {
    pub table: String,
    /// What repeats: `site+position` (a site change emitted twice) or `kafka_offset` (a record
    /// written twice).
    pub by: String,
    /// Rows beyond the first of each repeated group.
    pub rows: i64,
    pub sample: Vec<String>,
}

fn as_text(a: &ArrayRef, what: &str) -> Result<Vec<Option<String>>, SinkError> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    match a.data_type() {
        DataType::Binary => Ok(a.as_any().downcast_ref::<BinaryArray>().map(|b| b.iter().map(|v| v.map(hex)).collect()).unwrap_or_default()),
        DataType::LargeBinary => Ok(a.as_any().downcast_ref::<LargeBinaryArray>().map(|b| b.iter().map(|v| v.map(hex)).collect()).unwrap_or_default()),
        _ => {
            let s = arrow::compute::cast(a, &DataType::Utf8).map_err(|e| SinkError::Query(format!("{what} as text: {e}")))?;
            let s = s.as_any().downcast_ref::<StringArray>().ok_or_else(|| SinkError::Query(format!("{what} as text")))?;
            Ok(s.iter().map(|v| v.map(str::to_string)).collect())
        }
    }
}

/// One lake table, keyed by `_row_key` (lower case), with the named columns as text.
fn rows_by_key(batches: &[RecordBatch], cols: &[String], table: &str) -> Result<HashMap<String, Vec<Option<String>>>, SinkError> {
    let mut out = HashMap::new();
    for b in batches {
        let schema = b.schema();
        let Ok(ki) = schema.index_of("_row_key") else { return Ok(out) };
        let keys = as_text(b.column(ki), &format!("current.{table}._row_key"))?;
        let values: Vec<Option<Vec<Option<String>>>> = cols
            .iter()
            .map(|c| schema.index_of(c).ok().map(|i| as_text(b.column(i), &format!("current.{table}.{c}"))).transpose())
            .collect::<Result<_, _>>()?;
        for (r, k) in keys.into_iter().enumerate() {
            let Some(k) = k else { continue };
            let row = values.iter().map(|v| v.as_ref().map(|v| v[r].clone()).unwrap_or(Some("\u{0}absent".into()))).collect();
            out.insert(k.to_ascii_lowercase(), row);
        }
    }
    Ok(out)
}

/// Every `current.<table>` of the lake that HQ has, compared with HQ value for value.
pub async fn current_values(ctx: &SessionContext, hq: &mut Conn, hq_db: &str, scrub: &HashSet<String>, merges: &Merges, samples: usize) -> Result<Vec<TableValues>, SinkError> {
    let model = DbModel::load(hq, hq_db, "HQ").await?;
    let names = crate::query::table_names(ctx).await;
    let mut out = Vec::new();
    for t in names.iter().filter_map(|n| n.strip_prefix("current.")) {
        if !model.has_table(t) {
            continue;
        }
        let cols = compared_columns(&model, t, scrub);
        let Some(sel) = model.select(t, &cols) else { continue };
        let lake_cols: Vec<String> = cols.iter().map(|c| if model.references(t, c).is_some() { format!("{c}_uuid") } else { c.clone() }).collect();
        let batches = crate::query::sql(ctx, &format!("SELECT * FROM current.{t}")).await?;
        let mut lake = rows_by_key(&batches, &lake_cols, t)?;
        let voids = matches!(t, "person" | "patient").then(|| cols.iter().position(|c| c == "void_reason")).flatten();
        let mut check = TableValues { table: t.to_string(), ..Default::default() };
        let mut pager = Pager::new(sel, "HQ");
        while pager.peek(hq).await?.is_some() {
            let Some((key, mut row)) = pager.pop() else { break };
            // Presence is the other check's.
            let Some(lrow) = lake.remove(&key.to_ascii_lowercase()) else { continue };
            if let Some(i) = voids {
                row[i] = merges.hq_reason(row[i].take());
            }
            check.compared += 1;
            let diffs: Vec<ValueDiff> = (0..cols.len())
                .filter(|&c| lrow[c].as_deref() != Some("\u{0}absent") && norm(row[c].as_deref()) != norm(lrow[c].as_deref()))
                .map(|c| ValueDiff { key: key.clone(), column: cols[c].clone(), site: None, hq: row[c].clone(), lake: lrow[c].clone() })
                .collect();
            check.record(diffs, samples);
        }
        out.push(check);
    }
    Ok(out)
}

/// Repeated rows in every `changes.<table>`.
pub async fn history_duplicates(ctx: &SessionContext, samples: usize) -> Result<Vec<HistoryDuplicates>, SinkError> {
    let names = crate::query::table_names(ctx).await;
    let mut out = Vec::new();
    for t in names.iter().filter_map(|n| n.strip_prefix("changes.")) {
        let df = ctx.table(format!("changes.{t}")).await.map_err(|e| SinkError::Query(format!("changes.{t}: {e}")))?;
        let has = |c: &str| df.schema().fields().iter().any(|f| f.name() == c);
        for (by, group) in [("site+position", "_site, _position"), ("kafka_offset", "_kafka_partition, _kafka_offset")] {
            // (The merge history carries no site position.)
            if !group.split(", ").all(has) {
                continue;
            }
            let sql = format!(
                "SELECT CONCAT_WS(' ', {}) AS k, COUNT(*) - 1 AS extra FROM changes.{t} GROUP BY {group} HAVING COUNT(*) > 1 ORDER BY k",
                group.split(", ").map(|c| format!("CAST({c} AS VARCHAR)")).collect::<Vec<_>>().join(", ")
            );
            let batches = crate::query::sql(ctx, &sql).await?;
            let mut dup = HistoryDuplicates { table: t.to_string(), by: by.into(), rows: 0, sample: Vec::new() };
            for b in &batches {
                let keys = as_text(b.column(0), "key")?;
                let extra = as_text(b.column(1), "count")?;
                for (k, e) in keys.into_iter().zip(extra) {
                    dup.rows += e.and_then(|e| e.parse::<i64>().ok()).unwrap_or(0);
                    if dup.sample.len() < samples {
                        dup.sample.extend(k);
                    }
                }
            }
            if dup.rows > 0 {
                out.push(dup);
            }
        }
    }
    Ok(out)
}
