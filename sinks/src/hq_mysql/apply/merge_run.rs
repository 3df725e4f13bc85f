//! Merges applied together. The merges of a batch (they come in the identity lane, one after
//! another) wait in a [`MergeRun`] until the batch ends, a split comes, or a change comes that
//! they concern; then the run is applied in stream order, and the merges of it that concern no
//! other merge of the run and no earlier merge's chain go to HQ together: a handful of
//! statements for all of them, where [`Applier::merge`] takes about a dozen round trips each.
//! (A cold replay's merge phase was bound by those round trips: HQ's general log showed 42,500
//! statements in 15 s for 2,587 merges, the connection mostly waiting; docs/BENCHMARKS.md,
//! "Stop 47".)
//!
//! Delivery guarantee: that of the batch's transaction (the caller commits); the result at HQ
//! is the one [`Applier::merge`] gives each merge in stream order.

use std::collections::{HashMap, HashSet};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::envelope::FlatRow;
use serde_json::Value as J;

use super::cache::wanted;
use super::merge::{patients_among, void_losers_keep_survivors, MergeRec, Moved, MERGE_LOG_NS};
use super::sql::{datetime, db, id_list, q, stable_chunks};
use super::Applier;
use crate::SinkError;

/// Merges whose voids go to HQ in one round trip (four UPDATEs for all of them).
const VOIDS_PER_TRIP: usize = 500;
/// Losers whose rows are looked for in one round trip ([`holding`]).
const PROBES_PER_TRIP: usize = 500;
/// Rows of one multi-row `omrs_sync_merge` or `person_merge_log` INSERT.
const ROWS_PER_INSERT: usize = 200;

/// Merges of a batch not applied yet, and the persons whose rows or references they change.
#[derive(Default)]
pub(super) struct MergeRun {
    merges: Vec<(String, MergeRec)>,
    /// Every loser and survivor of the run, and the survivor each had when it joined: a change
    /// naming none of them is keyed and written the same before the run as after it.
    persons: HashSet<String>,
}

impl MergeRun {
    pub(super) fn is_empty(&self) -> bool {
        self.merges.is_empty()
    }

    /// Adds a merge; `survivor_of` is the survivor of a record before the run is applied.
    pub(super) fn push(&mut self, loser: String, rec: MergeRec, survivor_of: impl Fn(&str) -> Option<String>) {
        for u in [loser.as_str(), rec.winner.as_str()] {
            self.persons.insert(u.to_string());
            self.persons.extend(survivor_of(u));
        }
        self.merges.push((loser, rec));
    }

    /// Whether a change (its key, references and own references, keyed before the run) concerns
    /// a person of the run, or a record merged into one: it must be keyed and written after it.
    pub(super) fn concerns(&self, key: Option<&str>, refs: &FlatRow, origin_refs: &serde_json::Map<String, J>, survivor_of: impl Fn(&str) -> Option<String>) -> bool {
        let hit = |u: &str| self.persons.contains(u) || survivor_of(u).is_some_and(|s| self.persons.contains(&s));
        key.is_some_and(hit) || refs.iter().filter_map(|(_, v)| v.as_str()).any(hit) || origin_refs.values().filter_map(J::as_str).any(hit)
    }

    pub(super) fn take(&mut self) -> Vec<(String, MergeRec)> {
        self.persons.clear();
        std::mem::take(&mut self.merges)
    }
}

/// For losers `ids` (HQ person ids), which (index into `moves`, loser) have rows at HQ: one
/// query for [`PROBES_PER_TRIP`] losers, a `SELECT DISTINCT` of the person column per moved
/// table. (An `EXISTS` subquery per loser and table cost HQ's server more to optimise than to
/// run: 7 % of its CPU in a 10-clinic replay's HQ phase, by perf.)
pub(super) async fn holding(conn: &mut Conn, moves: &[(&str, &str, bool)], ids: &[i64]) -> Result<HashSet<(usize, i64)>, SinkError> {
    let mut found = HashSet::new();
    if moves.is_empty() {
        return Ok(found);
    }
    for chunk in ids.chunks(PROBES_PER_TRIP) {
        let list = id_list(chunk);
        let probes: Vec<String> =
            moves.iter().enumerate().map(|(m, (t, c, _))| format!("SELECT DISTINCT {m}, {c} FROM {t} WHERE {c} IN ({list})", t = q(t), c = q(c))).collect();
        let rows: Vec<(i64, Option<i64>)> = conn.query(probes.join(" UNION ALL ")).await.map_err(db("reading which tables hold merged persons' rows"))?;
        found.extend(rows.into_iter().filter_map(|(m, id)| Some((usize::try_from(m).ok()?, id?))));
    }
    Ok(found)
}

/// Stores merges in `omrs_sync_merge` (a later record of the same loser re-points it): loser,
/// merge, and the uuid of HQ's merge log of it if HQ wrote one.
pub(super) async fn record_merges(conn: &mut Conn, merges: &[(&str, &MergeRec, Option<&str>)]) -> Result<(), SinkError> {
    for chunk in stable_chunks(merges, ROWS_PER_INSERT) {
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, IF(? = 1, NOW(3), NULL), ?)"; chunk.len()].join(", ");
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 10);
        for (loser, rec, log_uuid) in chunk {
            params.extend([
                Value::from(*loser),
                Value::from(rec.winner.as_str()),
                Value::from(rec.reason.as_str()),
                Value::from(rec.evidence.as_str()),
                Value::from(rec.site.as_str()),
                Value::from(rec.ts_ms),
                Value::from(rec.applied as i64),
                Value::from(*log_uuid),
                Value::from(rec.applied as i64),
                Value::from(rec.review_id.as_deref()),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO omrs_sync_merge (loser_uuid, winner_uuid, reason, evidence, site, ts_ms, applied, merge_log_uuid, applied_at, review_id)
                 VALUES {rows}
                 ON DUPLICATE KEY UPDATE winner_uuid = VALUES(winner_uuid), applied = VALUES(applied),
                   merge_log_uuid = COALESCE(VALUES(merge_log_uuid), merge_log_uuid), applied_at = COALESCE(applied_at, VALUES(applied_at)),
                   review_id = COALESCE(VALUES(review_id), review_id)"
            ),
            params,
        )
        .await
        .map_err(db("recording merges"))?;
    }
    Ok(())
}

/// A merge of a run that HQ applies now: its index in the run, loser and survivor HQ ids.
pub(super) type Ready = (usize, i64, i64);

impl Applier {
    /// Applies a run of merges ([`MergeRun`]) in stream order. A merge that concerns another
    /// of the run, the chain of an earlier merge (its loser is someone's survivor, or its
    /// survivor is someone's loser) or a split (its loser was released) is applied alone
    /// ([`Applier::merge`]), after the independent merges before it, which go together
    /// ([`Applier::merge_together`]). Returns the run's losers.
    pub(super) async fn apply_merges(&mut self, conn: &mut Conn, run: Vec<(String, MergeRec)>) -> Result<Vec<String>, SinkError> {
        let losers: Vec<String> = run.iter().map(|(l, _)| l.clone()).collect();
        let mut as_loser: HashMap<&str, usize> = HashMap::new();
        let mut as_winner: HashSet<&str> = HashSet::new();
        for (l, r) in &run {
            *as_loser.entry(l.as_str()).or_default() += 1;
            as_winner.insert(r.winner.as_str());
        }
        let alone: Vec<bool> = run
            .iter()
            .map(|(l, r)| {
                let in_run = as_loser.get(l.as_str()) != Some(&1) || as_winner.contains(l.as_str()) || as_loser.contains_key(r.winner.as_str());
                let chained = self.merges.is_survivor(l) || self.merges.contains_key(&r.winner) || self.merges.is_released(l);
                *l == r.winner || in_run || chained
            })
            .collect();
        let mut together: Vec<(String, MergeRec)> = Vec::new();
        for ((l, r), alone) in run.into_iter().zip(alone) {
            if !alone {
                together.push((l, r));
                continue;
            }
            self.merge_together(conn, std::mem::take(&mut together)).await?;
            self.merge(conn, &l, r).await?;
        }
        self.merge_together(conn, together).await?;
        Ok(losers)
    }

    /// Independent merges (no person in two of them, none in an earlier merge's chain), each
    /// with [`Applier::merge`]'s result: their persons' ids in one lookup, which are patients
    /// in one query, which tables hold the losers' rows in one per 500 ([`holding`]); each table's
    /// rows of every loser moved in two statements ([`Applier::move_rows`]), the voids in four
    /// ([`void_losers_keep_survivors`]), HQ's merge logs and `omrs_sync_merge` in multi-row
    /// INSERTs. (A cold replay's merges move their losers' names, addresses and identifiers,
    /// which come before the merge; one statement per table and merge was most of HQ's
    /// statements.)
    async fn merge_together(&mut self, conn: &mut Conn, run: Vec<(String, MergeRec)>) -> Result<(), SinkError> {
        if run.is_empty() {
            return Ok(());
        }
        self.prefetch_ids(conn, wanted("person", run.iter().flat_map(|(l, r)| [l.as_str(), r.winner.as_str()]))).await?;
        let ids: Vec<(Option<i64>, Option<i64>)> =
            run.iter().map(|(l, r)| (self.ids.get("person", l).copied(), self.ids.get("person", &r.winner).copied())).collect();
        let patients = patients_among(conn, ids.iter().flat_map(|(l, w)| [*l, *w]).flatten().collect()).await?;
        // A patient's rows move only to a survivor that is a patient at HQ (see `merge`).
        let ready: Vec<Ready> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, (l, w))| match (l, w) {
                (Some(l), Some(w)) if !patients.contains(l) || patients.contains(w) => Some((i, *l, *w)),
                _ => None,
            })
            .collect();
        let mut logs: HashMap<usize, String> = HashMap::new();
        if !ready.is_empty() {
            let pairs: Vec<Moved> = ready.iter().map(|(i, l, w)| ((run[*i].0.as_str(), *l), (run[*i].1.winner.as_str(), *w))).collect();
            self.move_held(conn, &pairs).await?;
            // A survivor that its site had merged away is alive at HQ; the loser is voided in
            // its name.
            let daemon = self.daemon(conn).await?;
            for chunk in ready.chunks(VOIDS_PER_TRIP) {
                let merged: Vec<(i64, i64)> = chunk.iter().map(|(_, l, w)| (*l, *w)).collect();
                void_losers_keep_survivors(conn, &merged, daemon).await?;
            }
            logs = self.log_merges(conn, &run, &ready, daemon).await?;
        }
        let ready_at: HashSet<usize> = ready.iter().map(|(i, _, _)| *i).collect();
        let run: Vec<(String, MergeRec)> = run
            .into_iter()
            .enumerate()
            .map(|(i, (l, mut r))| {
                r.applied |= ready_at.contains(&i);
                (l, r)
            })
            .collect();
        let rows: Vec<(&str, &MergeRec, Option<&str>)> = run.iter().enumerate().map(|(i, (l, r))| (l.as_str(), r, logs.get(&i).map(String::as_str))).collect();
        record_merges(conn, &rows).await?;
        tracing::debug!(merges = run.len(), applied = ready.len(), "merges applied together");
        for (l, r) in run {
            self.merges.insert(l, r);
        }
        Ok(())
    }

    /// HQ's own `person_merge_log` rows of the `ready` merges of `run`, for the losers no site's
    /// log names (see `merge`), dated at the loser's registration. Returns their uuids by index.
    pub(super) async fn log_merges(&mut self, conn: &mut Conn, run: &[(String, MergeRec)], ready: &[Ready], daemon: i64) -> Result<HashMap<usize, String>, SinkError> {
        let list = id_list(ready.iter().map(|(_, l, _)| l));
        let site_logs: Vec<(i64, String)> = conn
            .query(format!("SELECT loser_person_id, uuid FROM person_merge_log WHERE loser_person_id IN ({list})"))
            .await
            .map_err(db("reading the sites' merge logs"))?;
        let created: HashMap<i64, Option<String>> = conn
            .query(format!("SELECT person_id, DATE_FORMAT(date_created, '%Y-%m-%d %H:%i:%s') FROM person WHERE person_id IN ({list})"))
            .await
            .map_err(db("reading merged persons' registration"))?
            .into_iter()
            .collect();
        let mut out = HashMap::new();
        let mut rows: Vec<[Value; 7]> = Vec::new();
        for (i, l, w) in ready {
            let (loser, rec) = &run[*i];
            let u = uuid::Uuid::new_v5(&MERGE_LOG_NS, loser.as_bytes()).to_string();
            if site_logs.iter().any(|(sl, su)| sl == l && *su != u) {
                continue;
            }
            let when = created.get(l).cloned().flatten().unwrap_or_else(|| datetime(rec.ts_ms));
            let id = self.allocate(conn, "person_merge_log", "person_merge_log_id").await?;
            // Only what does not depend on the order the evidence arrived in (see `merge`).
            let data = serde_json::json!({"loser": loser, "merged_by": "omrs-stream", "details": "omrs_sync_merge"});
            rows.push([Value::from(id), Value::from(*w), Value::from(*l), Value::from(daemon), Value::from(when), Value::from(data.to_string()), Value::from(u.as_str())]);
            out.insert(*i, u);
        }
        for chunk in stable_chunks(&rows, ROWS_PER_INSERT) {
            let marks = vec!["(?, ?, ?, ?, ?, ?, ?, 0)"; chunk.len()].join(", ");
            conn.exec_drop(
                format!(
                    "INSERT INTO person_merge_log (person_merge_log_id, winner_person_id, loser_person_id, creator, date_created, merged_data, uuid, voided)
                     VALUES {marks} ON DUPLICATE KEY UPDATE winner_person_id = VALUES(winner_person_id)"
                ),
                chunk.iter().flat_map(|r| r.iter().cloned()).collect::<Vec<Value>>(),
            )
            .await
            .map_err(db("writing person_merge_log"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(winner: &str) -> MergeRec {
        MergeRec { winner: winner.into(), ts_ms: 0, reason: "identifier".into(), applied: false, evidence: String::new(), site: "s".into(), review_id: None }
    }

    /// x was merged into l before the run; the run merges l into w.
    fn survivor(u: &str) -> Option<String> {
        (u == "x").then(|| "l".to_string())
    }

    #[test]
    fn a_change_concerns_the_run_through_its_key_references_or_an_earlier_merge() {
        let mut run = MergeRun::default();
        run.push("l".into(), rec("w"), survivor);
        let none = serde_json::Map::new();
        let flat = |v: J| -> FlatRow { serde_json::from_value(v).expect("a row image") };
        // The persons themselves, by key (their person or patient row).
        assert!(run.concerns(Some("l"), &flat(json!({})), &none, survivor));
        assert!(run.concerns(Some("w"), &flat(json!({})), &none, survivor));
        // A record merged into the loser before: its survivor changes with the run.
        assert!(run.concerns(Some("x"), &flat(json!({})), &none, survivor));
        // A row of the loser's, by reference, or by its own person (written to a survivor).
        assert!(run.concerns(Some("obs-1"), &flat(json!({"person_id": "l", "concept_id": "c"})), &none, survivor));
        let own = json!({"person_id": "x"}).as_object().cloned().unwrap_or_default();
        assert!(run.concerns(Some("obs-2"), &flat(json!({"person_id": "l"})), &own, survivor));
        // Anyone else's rows are written the same before the run as after it.
        assert!(!run.concerns(Some("obs-3"), &flat(json!({"person_id": "p", "encounter_id": "e"})), &none, survivor));
        assert!(!run.concerns(Some("p"), &flat(json!({})), &none, survivor));
        assert_eq!(run.take().len(), 1);
        assert!(run.is_empty());
        assert!(!run.concerns(Some("l"), &flat(json!({})), &none, survivor));
    }
}
