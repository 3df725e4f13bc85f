//! `verify`'s lake checks: the lake's `current.<table>` equals HQ value for value (every HQ
//! column but HQ's own id; a reference as the `<column>_uuid` the lake keeps next to it; values
//! normalised across the MySQL → Arrow map), and the change history holds each site change
//! once (no two rows with the same site and binlog position, nor the same Kafka offset).
//!
//! Both sides are read in key order and merged: HQ in pages, a lake table as a stream of
//! batches sorted by DataFusion (which spills past the session's memory limit).

use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};

use arrow::array::{Array, ArrayRef, BinaryArray, LargeBinaryArray, StringArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use mysql_async::Conn;
use serde::Serialize;

use super::space::{key_cmp, norm, DbModel, KeyedRow, Pager};
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

/// A batch's rows as (`_row_key` in lower case, the named columns as text), in batch order.
fn keyed_rows(b: &RecordBatch, cols: &[String], table: &str) -> Result<Vec<KeyedRow>, SinkError> {
    let schema = b.schema();
    let Ok(ki) = schema.index_of("_row_key") else { return Ok(Vec::new()) };
    let keys = as_text(b.column(ki), &format!("current.{table}._row_key"))?;
    let values: Vec<Option<Vec<Option<String>>>> =
        cols.iter().map(|c| schema.index_of(c).ok().map(|i| as_text(b.column(i), &format!("current.{table}.{c}"))).transpose()).collect::<Result<_, _>>()?;
    Ok(keys
        .into_iter()
        .enumerate()
        .filter_map(|(r, k)| {
            let row = values.iter().map(|v| v.as_ref().map(|v| v[r].clone()).unwrap_or(Some("\u{0}absent".into()))).collect();
            Some((k?.to_ascii_lowercase(), row))
        })
        .collect())
}

/// A lake table read as a stream in the servers' key order (`space::key_cmp`: bytes in lower
/// case), one batch at a time: memory holds a batch, and DataFusion's sort spills past the
/// session's limit.
struct LakeRows {
    stream: SendableRecordBatchStream,
    buf: VecDeque<KeyedRow>,
    cols: Vec<String>,
    table: String,
    /// The last key read, to refuse an order the merge cannot follow.
    last: String,
}

impl LakeRows {
    async fn open(ctx: &SessionContext, table: &str, cols: Vec<String>) -> Result<LakeRows, SinkError> {
        let q = |e: datafusion::error::DataFusionError| SinkError::Query(format!("reading current.{table} in key order: {e}"));
        let df = ctx.sql(&format!("SELECT * FROM current.{table} ORDER BY lower(_row_key)")).await.map_err(q)?;
        let stream = df.execute_stream().await.map_err(q)?;
        Ok(LakeRows { stream, buf: VecDeque::new(), cols, table: table.to_string(), last: String::new() })
    }

    /// The next row at or after `key`: rows before it (HQ does not have them; presence is the
    /// other check's) are passed over. None when the lake has no row `key`.
    async fn take(&mut self, key: &str) -> Result<Option<Vec<Option<String>>>, SinkError> {
        loop {
            while self.buf.is_empty() {
                match self.stream.next().await {
                    Some(b) => {
                        let b = b.map_err(|e| SinkError::Query(format!("reading current.{}: {e}", self.table)))?;
                        for (k, row) in keyed_rows(&b, &self.cols, &self.table)? {
                            if key_cmp(&k, &self.last) == Ordering::Less {
                                return Err(SinkError::Query(format!("current.{}: key {k} came after {} (an order verify cannot merge)", self.table, self.last)));
                            }
                            self.last.clone_from(&k);
                            self.buf.push_back((k, row));
                        }
                    }
                    None => return Ok(None),
                }
            }
            let Some((k, _)) = self.buf.front() else { return Ok(None) };
            match key_cmp(k, key) {
                Ordering::Less => {
                    self.buf.pop_front();
                }
                Ordering::Equal => return Ok(self.buf.pop_front().map(|(_, row)| row)),
                Ordering::Greater => return Ok(None),
            }
        }
    }
}

/// Every `current.<table>` of the lake that HQ has, compared with HQ value for value: both read
/// in key order and merged, so neither side is held whole.
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
        // A column HQ has and the lake lacks (a schema change the lake did not take) is a
        // difference of every row, not a column to pass over.
        let have: HashSet<String> = match ctx.table(format!("current.{t}").as_str()).await {
            Ok(df) => df.schema().fields().iter().map(|f| f.name().to_string()).collect(),
            Err(_) => HashSet::new(),
        };
        let missing_columns: Vec<String> = lake_cols.iter().filter(|c| !have.contains(*c)).cloned().collect();
        let mut lake = LakeRows::open(ctx, t, lake_cols).await?;
        let voids = matches!(t, "person" | "patient").then(|| cols.iter().position(|c| c == "void_reason")).flatten();
        let mut check = TableValues { table: t.to_string(), missing_columns, ..Default::default() };
        let mut pager = Pager::new(sel, "HQ");
        while pager.peek(hq).await?.is_some() {
            let Some((key, mut row)) = pager.pop() else { break };
            // Presence is the other check's.
            let Some(lrow) = lake.take(&key.to_ascii_lowercase()).await? else { continue };
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

/// The identity review queue at HQ against the lake's `identity.reviews`: the same reviews,
/// each with the same status and reason.
#[derive(Debug, Serialize, Default)]
pub struct ReviewCheck {
    pub hq: usize,
    pub lake: usize,
    /// Reviews one side lacks or holds differently: `id status reason` of HQ, then of the lake.
    pub differing: usize,
    pub sample: Vec<String>,
}

pub async fn reviews(ctx: &SessionContext, hq: &mut Conn, samples: usize) -> Result<ReviewCheck, SinkError> {
    use mysql_async::prelude::Queryable;
    let at_hq: Vec<(String, String, String)> = hq
        .query("SELECT review_id, status, reason FROM omrs_sync_identity_review")
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_identity_review", e))?;
    let at_hq: HashSet<String> = at_hq.into_iter().map(|(i, s, r)| format!("{i} {s} {r}")).collect();
    let batches = crate::query::sql(ctx, "SELECT CONCAT_WS(' ', review_id, status, reason) FROM identity.reviews").await?;
    let mut in_lake = HashSet::new();
    for b in &batches {
        in_lake.extend(as_text(b.column(0), "review")?.into_iter().flatten());
    }
    let mut diff: Vec<String> = at_hq.symmetric_difference(&in_lake).map(|k| format!("{}: {k}", if at_hq.contains(k) { "HQ" } else { "lake" })).collect();
    diff.sort();
    Ok(ReviewCheck { hq: at_hq.len(), lake: in_lake.len(), differing: diff.len(), sample: diff.into_iter().take(samples).collect() })
}
