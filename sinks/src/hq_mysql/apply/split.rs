//! A split at HQ (issue #23 §4): records that a person's decision took away from a merged
//! person survive on their own again, with exactly the rows that are theirs.
//!
//! Whose a row is, HQ knows from `omrs_sync_moved`: every row of a table a merge moves gets an
//! entry the first time it leaves its person (moved by a merge, or written to a survivor by
//! the transform). A split moves back the rows of the leaving records, un-voids their new
//! survivor, and re-points their merge records and HQ's merge logs. In the batch's
//! transaction, like a merge, so it happens once; and a function of the records' provenance,
//! not of the order the merges came in.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::openmrs::{moved_key, MOVES};

use super::merge::{record_merge, remember_owner, unrelease, unvoid_survivor, void_merged, MergeRec, MERGE_LOG_NS};
use super::sql::{db, q};
use super::Applier;
use crate::SinkError;

/// A split as the sink applies it ([`omrs_core::hq::HqEvent::Split`]).
pub(super) struct SplitRec {
    pub(super) survivor: String,
    pub(super) from: String,
    pub(super) records: Vec<String>,
    pub(super) review_id: String,
    pub(super) site: String,
    pub(super) ts_ms: i64,
}

impl Applier {
    /// `records` leave the person that survived as `from` and survive as `survivor`.
    pub(super) async fn split(&mut self, conn: &mut Conn, s: SplitRec) -> Result<(), SinkError> {
        let (sid, fid) = (self.lookup_id(conn, "person", &s.survivor).await?, self.lookup_id(conn, "person", &s.from).await?);
        tracing::info!(from = %s.from, survivor = %s.survivor, records = s.records.len(), review = %s.review_id, "split: records leave a merged person");
        self.resplit_merges(conn, &s, sid).await?;
        // Alive from now on, even where its clinic voided it by merging it.
        conn.exec_drop(
            "INSERT INTO omrs_sync_released (person_uuid, review_id, ts_ms) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE review_id = VALUES(review_id), ts_ms = VALUES(ts_ms)",
            (s.survivor.as_str(), s.review_id.as_str(), s.ts_ms),
        )
        .await
        .map_err(db("recording the released record"))?;
        self.merges.release(&s.survivor);
        let (Some(sid), Some(fid)) = (sid, fid) else {
            // A person not at HQ yet has no rows to take back; its rows arrive canonical.
            return Ok(());
        };
        let marks = vec!["?"; s.records.len()].join(",");
        for (table, col, preferred) in MOVES {
            let Some(tm) = self.model.table(table) else { continue };
            if tm.pk.len() != 1 || !tm.columns.iter().any(|c| c.name == *col) {
                continue;
            }
            let (t, c, pk, key) = (q(table), q(col), q(&tm.pk[0]), moved_key(table, col));
            let has_preferred = *preferred && tm.columns.iter().any(|c| c.name == "preferred");
            // The rows still on `from` that were its own have no entry yet: they get one.
            remember_owner(conn, table, col, &tm.pk[0], has_preferred, &s.from, fid).await?;
            // Preferred again on the person it is its own, non-preferred elsewhere.
            let set_pref = if has_preferred { ", r.preferred = IF(m.person_uuid <=> ?, m.preferred, 0)" } else { "" };
            let mut params: Vec<Value> = vec![Value::from(key.as_str()), Value::from(sid)];
            if has_preferred {
                params.push(Value::from(s.survivor.as_str()));
            }
            params.push(Value::from(fid));
            params.extend(s.records.iter().map(|r| Value::from(r.as_str())));
            conn.exec_drop(format!("UPDATE {t} r JOIN omrs_sync_moved m ON m.tbl = ? AND m.hq_id = r.{pk} SET r.{c} = ?{set_pref} WHERE r.{c} = ? AND m.person_uuid IN ({marks})"), params)
                .await
                .map_err(|e| SinkError::db(format!("moving the {table} rows of a split person back"), e))?;
        }
        self.revoid(conn, &s, sid).await
    }

    /// The merge map and `omrs_sync_merge`: the survivor is nobody's loser, every other record
    /// leaving is the survivor's; HQ's merge log of the survivor goes.
    async fn resplit_merges(&mut self, conn: &mut Conn, s: &SplitRec, sid: Option<i64>) -> Result<(), SinkError> {
        if self.merges.remove(&s.survivor).is_some() {
            conn.exec_drop("DELETE FROM omrs_sync_merge WHERE loser_uuid = ?", (s.survivor.as_str(),)).await.map_err(db("withdrawing the split survivor's merge"))?;
        }
        let own_log = uuid::Uuid::new_v5(&MERGE_LOG_NS, s.survivor.as_bytes()).to_string();
        conn.exec_drop("DELETE FROM person_merge_log WHERE uuid = ?", (own_log.as_str(),)).await.map_err(db("withdrawing the split survivor's merge log"))?;
        for r in s.records.iter().filter(|r| **r != s.survivor) {
            let rec = match self.merges.get(r) {
                Some(m) => MergeRec { winner: s.survivor.clone(), ..m.clone() },
                // `from` itself was a survivor: it is now the new survivor's loser.
                None => MergeRec {
                    winner: s.survivor.clone(),
                    ts_ms: s.ts_ms,
                    reason: "split".into(),
                    applied: sid.is_some(),
                    evidence: serde_json::json!({"from": s.from, "review_id": s.review_id}).to_string(),
                    site: s.site.clone(),
                    review_id: Some(s.review_id.clone()),
                },
            };
            record_merge(conn, r, &rec, None).await?;
            unrelease(conn, &self.merges, r).await?;
            self.merges.insert(r.clone(), rec);
        }
        Ok(())
    }

    /// The survivor is alive again; every other record leaving is voided "Merged with patient
    /// #<survivor>" (dated at its own registration, as a merge is) and HQ's merge log of it
    /// names the survivor.
    async fn revoid(&mut self, conn: &mut Conn, s: &SplitRec, sid: i64) -> Result<(), SinkError> {
        unvoid_survivor(conn, sid).await?;
        for r in s.records.iter().filter(|r| **r != s.survivor) {
            let Some(id) = self.lookup_id(conn, "person", r).await? else { continue };
            let daemon = self.daemon(conn).await?;
            void_merged(conn, id, daemon, sid).await?;
            let u = uuid::Uuid::new_v5(&MERGE_LOG_NS, r.as_bytes()).to_string();
            conn.exec_drop("UPDATE person_merge_log SET winner_person_id = ? WHERE uuid = ?", (sid, u.as_str())).await.map_err(db("re-pointing a merge log"))?;
        }
        Ok(())
    }
}
