//! What OpenMRS `mergePatients` does, done at HQ: merges recorded, rows moved to the survivor,
//! the loser voided and logged, survivor changes followed; and what keeps a merged person
//! merged when its site writes it again.

use std::collections::{HashMap, HashSet};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use omrs_core::openmrs::{DAEMON_USER_UUID, MOVES};
use serde_json::Value as J;

use super::cache::wanted;
use super::merge_map::MergeMap;
use super::merge_run::{holding, record_merges};
use super::sql::{datetime, db, id_list, q, stable_chunks};
use super::{Applier, Work};
use crate::SinkError;

/// Namespace of the uuids HQ makes for its own `person_merge_log` rows (a function of the loser,
/// so that every run writes the same row).
pub(super) const MERGE_LOG_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f6d_7273_2d73_7472_6561_6d2d_6d65_7267);

#[derive(Debug, Clone)]
pub(super) struct MergeRec {
    pub(super) winner: String,
    pub(super) ts_ms: i64,
    pub(super) reason: String,
    pub(super) applied: bool,
    pub(super) evidence: String,
    pub(super) site: String,
    /// The review queue's entry for this merge (None for merges stored before the queue).
    pub(super) review_id: Option<String>,
}

/// The merges HQ knows of (`omrs_sync_merge`), by loser.
pub(super) async fn load(conn: &mut Conn) -> Result<MergeMap, SinkError> {
    let rows: Vec<(String, String, i64, String, i64, Option<String>, String, Option<String>)> = conn
        .query("SELECT loser_uuid, winner_uuid, ts_ms, reason, applied, evidence, site, review_id FROM omrs_sync_merge")
        .await
        .map_err(db("reading omrs_sync_merge"))?;
    let mut map: MergeMap = rows
        .into_iter()
        .map(|(loser, winner, ts_ms, reason, applied, evidence, site, review_id)| {
            (loser, MergeRec { winner, ts_ms, reason, applied: applied == 1, evidence: evidence.unwrap_or_default(), site, review_id })
        })
        .collect();
    let released: Vec<String> = conn.query("SELECT person_uuid FROM omrs_sync_released").await.map_err(db("reading omrs_sync_released"))?;
    for r in released {
        map.release(&r);
    }
    Ok(map)
}

/// `loser` is merged again: a split no longer keeps it alive.
pub(super) async fn unrelease(conn: &mut Conn, merges: &MergeMap, loser: &str) -> Result<(), SinkError> {
    if merges.is_released(loser) {
        conn.exec_drop("DELETE FROM omrs_sync_released WHERE person_uuid = ?", (loser,)).await.map_err(db("forgetting a released record merged again"))?;
    }
    Ok(())
}

/// Which of the HQ person ids `ids` are patients.
pub(super) async fn patients_among(conn: &mut Conn, ids: Vec<i64>) -> Result<HashSet<i64>, SinkError> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(1000) {
        let list = id_list(chunk);
        let rows: Vec<i64> = conn.query(format!("SELECT patient_id FROM patient WHERE patient_id IN ({list})")).await.map_err(db("reading which merged persons are patients"))?;
        found.extend(rows);
    }
    Ok(found)
}

/// Stores a merge in `omrs_sync_merge` (a later record of the same loser re-points it).
pub(super) async fn record_merge(conn: &mut Conn, loser: &str, rec: &MergeRec, log_uuid: Option<&str>) -> Result<(), SinkError> {
    record_merges(conn, &[(loser, rec, log_uuid)]).await
}

/// Remembers whose the rows of `table` on HQ person `id` are (`owner`, with their own
/// `preferred`), for those not remembered yet: the first time a row leaves its person.
pub(super) async fn remember_owner(conn: &mut Conn, table: &str, col: &str, pk: &str, has_preferred: bool, owner: &str, id: i64) -> Result<(), SinkError> {
    let flag = if has_preferred { "preferred" } else { "NULL" };
    conn.exec_drop(
        format!("INSERT IGNORE INTO omrs_sync_moved (tbl, hq_id, person_uuid, preferred) SELECT ?, {}, ?, {flag} FROM {} WHERE {} = ?", q(pk), q(table), q(col)),
        (omrs_core::openmrs::moved_key(table, col), owner, id),
    )
    .await
    .map_err(|e| SinkError::db(format!("remembering whose the moved {table} rows are"), e))
}

/// The statements that keep HQ persons `ids` (and their patients) alive, if a merge had voided
/// them.
pub(super) fn unvoid_sql(ids: &[i64]) -> String {
    let list = id_list(ids);
    [("person", "person_id"), ("patient", "patient_id")]
        .iter()
        .map(|(table, col)| format!("UPDATE {table} SET voided = 0, voided_by = NULL, date_voided = NULL, void_reason = NULL WHERE {col} IN ({list}) AND voided = 1 AND void_reason LIKE 'Merged with patient%'"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// HQ person `id` (and its patient) alive, if a merge had voided it.
pub(super) async fn unvoid_survivor(conn: &mut Conn, id: i64) -> Result<(), SinkError> {
    conn.query_drop(unvoid_sql(&[id])).await.map_err(db("keeping the surviving person and patient"))
}

/// The statements that void each HQ person `l` of `merged` (and its patient) "Merged with
/// patient #`w`", dated at its own registration. Every value is a number, written into the text.
pub(super) fn void_sql(merged: &[(i64, i64)], daemon_user: i64) -> String {
    let list = id_list(merged.iter().map(|(l, _)| l));
    let reason: String = merged.iter().map(|(l, w)| format!(" WHEN {l} THEN 'Merged with patient #{w}'")).collect();
    [("person", "person_id"), ("patient", "patient_id")]
        .iter()
        .map(|(table, col)| format!("UPDATE {table} SET voided = 1, voided_by = {daemon_user}, date_voided = date_created, void_reason = CASE {col}{reason} END WHERE {col} IN ({list})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Merges' voids in one round trip: every survivor `w` of `merged` (loser, survivor) alive
/// ([`unvoid_sql`]), then every loser `l` voided in its survivor's name ([`void_sql`]). No
/// person may be in two of the merges (the survivors are kept alive before any loser is voided).
pub(super) async fn void_losers_keep_survivors(conn: &mut Conn, merged: &[(i64, i64)], daemon_user: i64) -> Result<(), SinkError> {
    let survivors: Vec<i64> = merged.iter().map(|(_, w)| *w).collect();
    conn.query_drop(format!("{}; {}", unvoid_sql(&survivors), void_sql(merged, daemon_user)))
        .await
        .map_err(db("voiding merged persons and keeping their survivors"))
}

/// HQ person `id` (and its patient) voided by a merge into HQ person `survivor`, dated at its
/// own registration: the same whenever HQ learns of it.
pub(super) async fn void_merged(conn: &mut Conn, id: i64, daemon_user: i64, survivor: i64) -> Result<(), SinkError> {
    conn.query_drop(void_sql(&[(id, survivor)], daemon_user)).await.map_err(db("voiding the merged person and patient"))
}

/// One merge's persons for [`Applier::move_rows`]: (loser uuid, HQ id), (survivor uuid, HQ id).
pub(super) type Moved<'a> = ((&'a str, i64), (&'a str, i64));

/// Merges whose rows of one table move in one statement ([`Applier::move_rows`]).
const MOVES_PER_STATEMENT: usize = 500;

/// Members of merged components settled in one round trip of three statements
/// ([`Applier::settle_voids`]).
const SETTLE_PER_TRIP: usize = 500;

/// The statements that void each HQ person `lid` of `members` (and its patient) in the name of
/// its survivor `sid`, and point its merge log (`log_uuid`) at it: no-ops where that is so
/// already. Every value is a number or a uuid made here.
fn settle_sql(members: &[(i64, i64, uuid::Uuid)]) -> String {
    let ids = id_list(members.iter().map(|(l, _, _)| l));
    let uuids = members.iter().map(|(_, _, u)| format!("'{u}'")).collect::<Vec<_>>().join(",");
    let reason: String = members.iter().map(|(l, s, _)| format!(" WHEN {l} THEN 'Merged with patient #{s}'")).collect();
    let winner: String = members.iter().map(|(_, s, u)| format!(" WHEN '{u}' THEN {s}")).collect();
    let rename = |table: &str, col: &str| {
        format!("UPDATE {table} SET void_reason = CASE {col}{reason} END WHERE {col} IN ({ids}) AND voided = 1 AND NOT (void_reason <=> CASE {col}{reason} END)")
    };
    format!(
        "{}; {}; UPDATE person_merge_log SET winner_person_id = CASE uuid{winner} END WHERE uuid IN ({uuids}) AND winner_person_id <> CASE uuid{winner} END",
        rename("person", "person_id"),
        rename("patient", "patient_id")
    )
}

/// HQ's own `person_merge_log` rows whose loser a site's own log also names go: a site's merge
/// is logged by the site (semantics 4: the same rows whichever of the two arrived first).
/// HQ's rows are the ones `omrs_sync_merge` names; HQ writes at most one per loser. Only the
/// `losers` (HQ person ids) of the site logs just written are looked at: an index lookup each,
/// where a look at every log was quadratic in the merges (a 10-site replay crawled at a few
/// hundred rows a second once HQ held some thousand merges).
pub(super) async fn drop_covered_merge_logs(conn: &mut Conn, losers: &[Value]) -> Result<(), SinkError> {
    for chunk in losers.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(",");
        conn.exec_drop(
            format!(
                "DELETE h FROM person_merge_log h
                   JOIN omrs_sync_merge m ON m.merge_log_uuid = h.uuid
                   JOIN person_merge_log s ON s.loser_person_id = h.loser_person_id AND s.uuid <> h.uuid
                  WHERE h.loser_person_id IN ({marks})"
            ),
            chunk.to_vec(),
        )
        .await
        .map_err(db("dropping HQ's merge logs that a site's log covers"))?;
    }
    Ok(())
}

/// The loser person ids of staged `person_merge_log` rows (site logs about to be written).
pub(super) fn merge_log_losers(rows: &[super::stage::StagedRow]) -> Vec<Value> {
    rows.iter()
        .filter_map(|r| {
            let i = r.cols.iter().position(|c| c == "loser_person_id")?;
            r.vals.get(i).filter(|v| matches!(v, Value::Int(_) | Value::UInt(_))).cloned()
        })
        .collect()
}

impl Applier {
    /// The loser's final survivor, following merges transitively (None for a survivor, even
    /// one whose chain would lead back to itself).
    pub(super) fn survivor_of(&self, uuid: &str) -> Option<String> {
        let mut cur = self.merges.get(uuid)?.winner.clone();
        for _ in 0..64 {
            match self.merges.get(&cur) {
                Some(m) if m.winner != cur => cur = m.winner.clone(),
                _ => break,
            }
        }
        (cur != uuid).then_some(cur)
    }

    /// Re-applies merges whose persons were not both at HQ yet. Returns the losers of those
    /// applied now: their components are settled with the batch's own ([`Self::settle_voids`]).
    /// (With a partition per site, a merge can reach HQ before its survivor's record, which
    /// its own site's partition brings later: `tests/broker_fault.rs` saw a record voided in
    /// the name of a survivor that a later survivor change replaced.)
    ///
    /// A merge that would still wait is not retried: its persons' ids are looked up for all
    /// waiting merges at once, and which of them are patients in one query per thousand. A
    /// retry that waits again would only have written the same `omrs_sync_merge` row again; in
    /// a cold replay thousands of merges wait for their patient rows, and retrying each of them
    /// after every batch (three queries and a write each) made the HQ sink's first minute
    /// crawl. A merge is still retried when its survivor is itself a loser, or when other
    /// merges name its loser as their survivor (the retry then re-points those).
    pub(super) async fn retry_merges(&mut self, conn: &mut Conn) -> Result<Vec<String>, SinkError> {
        let waiting: Vec<(String, MergeRec)> =
            self.merges.iter().filter(|(_, m)| !m.applied).map(|(l, m)| (l.clone(), m.clone())).collect();
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        self.prefetch_ids(conn, wanted("person", waiting.iter().flat_map(|(l, m)| [l.as_str(), m.winner.as_str()]))).await?;
        let ids: HashMap<String, i64> = waiting
            .iter()
            .flat_map(|(l, m)| [l.as_str(), m.winner.as_str()])
            .filter_map(|u| Some((u.to_string(), *self.ids.get("person", u)?)))
            .collect();
        let patients = patients_among(conn, ids.values().copied().collect()).await?;
        let mut retry = Vec::new();
        for (loser, rec) in waiting {
            let ready = match (ids.get(rec.winner.as_str()), ids.get(loser.as_str())) {
                (Some(w), Some(l)) => !patients.contains(l) || patients.contains(w),
                _ => false,
            };
            if !ready && !self.merges.contains_key(&rec.winner) && !self.merges.is_survivor(&loser) {
                continue;
            }
            retry.push((loser, rec));
        }
        let mut applied = self.apply_merges(conn, retry).await?;
        applied.retain(|l| self.merges.get(l).is_some_and(|m| m.applied));
        Ok(applied)
    }

    /// A merged person stays voided whatever its site says later, and the rows moved to a
    /// survivor stay non-preferred (semantics 4: the same result in any order). Returns, for a
    /// row written to a person not its own, per person column (`moved_key`): that person and
    /// the row's own `preferred`.
    pub(super) async fn force_merge_values<'c>(
        &mut self,
        conn: &mut Conn,
        table: &str,
        row_key: &str,
        w: &Work,
        cols: &mut Vec<&'c str>,
        vals: &mut Vec<Value>,
    ) -> Result<Vec<(String, String, Value)>, SinkError> {
        let set = |cols: &mut Vec<&'c str>, vals: &mut Vec<Value>, c: &'static str, v: Value| match cols.iter().position(|x| *x == c) {
            Some(i) => vals[i] = v,
            None => {
                cols.push(c);
                vals.push(v);
            }
        };
        match table {
            "person" | "patient" => {
                if let Some(survivor) = self.survivor_of(row_key) {
                    let own = cols.iter().position(|c| *c == "date_created").map(|i| vals[i].clone());
                    let when = match own {
                        Some(v) => v,
                        None => Value::from(self.merge_time(conn, row_key).await?),
                    };
                    let reason = self.void_reason(conn, &survivor).await?;
                    set(cols, vals, "voided", Value::from(1));
                    let daemon = self.daemon(conn).await?;
                    set(cols, vals, "voided_by", Value::from(daemon));
                    set(cols, vals, "date_voided", when);
                    set(cols, vals, "void_reason", Value::from(reason));
                } else if Self::merge_voided(cols, vals) && (self.merges.is_survivor(row_key) || self.merges.is_released(row_key)) {
                    // The site voided this person by merging it into another one, but HQ's rule
                    // (earliest registration, then uuid) made it the survivor, or a person split
                    // it off that merge: it stays alive.
                    set(cols, vals, "voided", Value::from(0));
                    set(cols, vals, "voided_by", Value::NULL);
                    set(cols, vals, "date_voided", Value::NULL);
                    set(cols, vals, "void_reason", Value::NULL);
                }
            }
            _ => {
                // A row written to a person not its own: whose it is (a split takes it back),
                // and for an identifier, name or address its own `preferred`.
                let mut owners = Vec::new();
                for (_, col, preferred) in MOVES.iter().filter(|(t, _, _)| *t == table) {
                    if let Some(J::String(own)) = w.origin_refs.get(*col) {
                        let mut flag = Value::NULL;
                        if *preferred {
                            flag = cols.iter().position(|c| *c == "preferred").map_or(Value::NULL, |i| vals[i].clone());
                            set(cols, vals, "preferred", Value::from(0));
                        }
                        owners.push((omrs_core::openmrs::moved_key(table, col), own.clone(), flag));
                    }
                }
                return Ok(owners);
            }
        }
        Ok(Vec::new())
    }

    /// The (table, person column, has `preferred`) of [`MOVES`] that HQ's schema has.
    pub(super) fn moves(&self) -> Vec<(&'static str, &'static str, bool)> {
        MOVES.iter().filter(|(table, col, _)| self.model.table(table).is_some_and(|tm| tm.columns.iter().any(|c| c.name == *col))).copied().collect()
    }

    /// Merges' moves: which tables hold each loser's rows ([`holding`]), then each such table's
    /// rows moved for all the losers that have some there ([`Applier::move_rows`]).
    pub(super) async fn move_held(&mut self, conn: &mut Conn, pairs: &[Moved<'_>]) -> Result<(), SinkError> {
        let moves = self.moves();
        let held = holding(conn, &moves, &pairs.iter().map(|((_, l), _)| *l).collect::<Vec<_>>()).await?;
        for (m, mv) in moves.iter().enumerate() {
            let here: Vec<Moved> = pairs.iter().filter(|((_, l), _)| held.contains(&(m, *l))).copied().collect();
            if !here.is_empty() {
                self.move_rows(conn, *mv, &here).await?;
            }
        }
        Ok(())
    }

    /// Merges' move of one table's rows from each HQ person `l` (uuid `loser`) of `pairs` to its
    /// `w` (`winner`): whose they were is remembered the first time they leave their person, and
    /// an identifier, name or address goes non-preferred unless it goes back to the person it
    /// came from (a survivor change hands the component to an earlier loser). Two statements for
    /// [`MOVES_PER_STATEMENT`] merges, where there were two for each merge: a cold replay's
    /// moves were a fifth of the statements HQ's server ran. No person may be in two of the
    /// merges (no survivor is a loser).
    pub(super) async fn move_rows(&mut self, conn: &mut Conn, (table, col, preferred): (&str, &str, bool), pairs: &[Moved<'_>]) -> Result<(), SinkError> {
        let Some(tm) = self.model.table(table) else { return Ok(()) };
        let single_pk = (tm.pk.len() == 1).then(|| q(&tm.pk[0]));
        let has_preferred = preferred && tm.columns.iter().any(|c| c.name == "preferred");
        let (t, c, key) = (q(table), q(col), omrs_core::openmrs::moved_key(table, col));
        // Every value a parameter, in chunks whose sizes repeat: the statements are prepared
        // once (a merge applied alone moves one person's rows; with the numbers in the text,
        // each was prepared and closed again, 16,000 round trips in a 10-clinic replay).
        for chunk in stable_chunks(pairs, MOVES_PER_STATEMENT) {
            let marks = vec!["?"; chunk.len()].join(",");
            let losers = || chunk.iter().map(|((_, l), _)| Value::from(*l));
            // A value for each loser: its survivor's id, or (remembering whose the rows were) its uuid.
            let by_loser = " WHEN ? THEN ?".repeat(chunk.len());
            if let Some(pk) = &single_pk {
                let flag = if has_preferred { "preferred" } else { "NULL" };
                let mut params = vec![Value::from(key.as_str())];
                params.extend(chunk.iter().flat_map(|((loser, l), _)| [Value::from(*l), Value::from(*loser)]));
                params.extend(losers());
                conn.exec_drop(
                    format!("INSERT IGNORE INTO omrs_sync_moved (tbl, hq_id, person_uuid, preferred) SELECT ?, {pk}, CASE {c}{by_loser} END, {flag} FROM {t} WHERE {c} IN ({marks})"),
                    params,
                )
                .await
                .map_err(|e| SinkError::db(format!("remembering whose the moved {table} rows are"), e))?;
            }
            let moves = chunk.iter().flat_map(|((_, l), (_, w))| [Value::from(*l), Value::from(*w)]);
            let moved = match (&single_pk, has_preferred) {
                (Some(pk), true) => {
                    // The survivor's uuid whether the row names the loser or already the survivor
                    // (a multi-table UPDATE may assign in any order).
                    let winner = " WHEN ? THEN ? WHEN ? THEN ?".repeat(chunk.len());
                    let mut params = vec![Value::from(key.as_str())];
                    params.extend(chunk.iter().flat_map(|((_, l), (winner, w))| [Value::from(*l), Value::from(*winner), Value::from(*w), Value::from(*winner)]));
                    params.extend(moves);
                    params.extend(losers());
                    let sql = format!(
                        "UPDATE {t} r LEFT JOIN omrs_sync_moved m ON m.tbl = ? AND m.hq_id = r.{pk}
                            SET r.preferred = IF(m.person_uuid <=> CASE r.{c}{winner} END, m.preferred, 0), r.{c} = CASE r.{c}{by_loser} ELSE r.{c} END
                          WHERE r.{c} IN ({marks})"
                    );
                    conn.exec_drop(sql, params).await
                }
                _ => {
                    let params: Vec<Value> = moves.chain(losers()).collect();
                    conn.exec_drop(format!("UPDATE {t} SET {c} = CASE {c}{by_loser} ELSE {c} END WHERE {c} IN ({marks})"), params).await
                }
            };
            moved.map_err(|e| SinkError::db(format!("moving {table} to the survivor"), e))?;
        }
        Ok(())
    }

    /// The row is voided by a merge ("Merged with patient #…").
    pub(super) fn merge_voided(cols: &[&str], vals: &[Value]) -> bool {
        let get = |c: &str| cols.iter().position(|x| *x == c).map(|i| &vals[i]);
        let voided = matches!(get("voided"), Some(Value::Int(1)) | Some(Value::UInt(1)));
        let merged = matches!(get("void_reason"), Some(Value::Bytes(b)) if b.starts_with(b"Merged with patient"));
        voided && merged
    }

    /// When a merge is dated at HQ: the voided row's own registration (`date_created`, read
    /// from the row being written; this reads the person's when the image lacks it). A
    /// duplicate is a duplicate from its creation; and unlike the time HQ learned of it, this
    /// does not depend on the order in which the sites were read (semantics 4).
    /// Every merged record of the components the merges of a batch touched (`losers`) is voided
    /// in the name of its component's survivor, and HQ's merge log of it names that survivor,
    /// whatever order the merges and the merged records' own changes arrived in. (A change of
    /// a merged record voids it in the name of its survivor at that moment; a survivor change
    /// later in the stream renames the records merged into the old survivor, but one merged
    /// through a record the change withdrew kept the old name: `tests/stop.rs` saw it.)
    pub(super) async fn settle_voids(&mut self, conn: &mut Conn, losers: &[String]) -> Result<(), SinkError> {
        let mut survivors: Vec<String> = losers.iter().filter_map(|l| self.survivor_of(l)).collect();
        if survivors.is_empty() {
            return Ok(());
        }
        survivors.sort();
        survivors.dedup();
        // The survivors' components (every record whose chain reaches one), then the same test as
        // ever on each.
        let mut members: Vec<(String, String)> = Vec::new();
        for s in &survivors {
            for l in self.merged_into(s, "") {
                if self.merges.get(&l).is_some_and(|m| m.applied) && self.survivor_of(&l).as_ref() == Some(s) {
                    members.push((l, s.clone()));
                }
            }
        }
        // Three statements for SETTLE_PER_TRIP members: a cold replay settles thousands of
        // members, and one round trip each was a tenth of the HQ sink's time while the merges
        // came in; three statements each were a third of the UPDATEs HQ's server ran.
        self.prefetch_ids(conn, wanted("person", members.iter().flat_map(|(l, s)| [l.as_str(), s.as_str()]))).await?;
        let mut ids: Vec<(i64, i64, uuid::Uuid)> = Vec::new();
        for (l, s) in members {
            let (Some(lid), Some(sid)) = (self.lookup_id(conn, "person", &l).await?, self.lookup_id(conn, "person", &s).await?) else { continue };
            ids.push((lid, sid, uuid::Uuid::new_v5(&MERGE_LOG_NS, l.as_bytes())));
        }
        for chunk in ids.chunks(SETTLE_PER_TRIP) {
            conn.query_drop(settle_sql(chunk)).await.map_err(db("naming merged persons' survivors"))?;
        }
        Ok(())
    }

    /// The records whose survivor is `loser`, directly or through a chain, but `except`.
    fn merged_into(&self, loser: &str, except: &str) -> Vec<String> {
        let mut below: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::from([loser.to_string()]);
        let mut frontier: Vec<String> = vec![loser.to_string()];
        while let Some(w) = frontier.pop() {
            for l in self.merges.losers_of(&w) {
                if seen.insert(l.clone()) {
                    below.push(l.clone());
                    frontier.push(l);
                }
            }
        }
        below.retain(|l| l != except);
        below
    }

    /// HQ's id of the OpenMRS daemon user, in whose name merges are done. An HQ built from a
    /// site's schema (`--init --schema-from`) starts without users: the daemon user arrives with
    /// the first snapshot, so it is looked up again until found (until then: the lowest user id,
    /// else 1).
    pub(super) async fn daemon(&mut self, conn: &mut Conn) -> Result<i64, SinkError> {
        if !self.daemon_known {
            let found: Option<i64> = conn.exec_first("SELECT user_id FROM users WHERE uuid = ?", (DAEMON_USER_UUID,)).await.map_err(db("reading the daemon user"))?;
            if let Some(id) = found {
                self.daemon_user = id;
                self.daemon_known = true;
            }
        }
        Ok(self.daemon_user)
    }

    pub(super) async fn merge_time(&mut self, conn: &mut Conn, loser: &str) -> Result<String, SinkError> {
        let t: Option<Option<String>> = conn
            .exec_first("SELECT DATE_FORMAT(date_created, '%Y-%m-%d %H:%i:%s') FROM person WHERE uuid = ?", (loser,))
            .await
            .map_err(db("reading the merged person"))?;
        // Not at HQ: the merge's own time.
        Ok(t.flatten().unwrap_or_else(|| datetime(self.merges.get(loser).map(|m| m.ts_ms).unwrap_or(0))))
    }

    pub(super) async fn void_reason(&mut self, conn: &mut Conn, survivor: &str) -> Result<String, SinkError> {
        Ok(match self.lookup_id(conn, "person", survivor).await? {
            Some(id) => format!("Merged with patient #{id}"),
            None => format!("Merged with patient {survivor}"),
        })
    }

    /// `mergePatients`, in the batch's transaction: the loser's clinical rows move to the
    /// survivor (identifiers, names and addresses too, as non-preferred: a move keeps their
    /// uuids, so a later edit at the site lands on the same row, whatever the order), the loser
    /// patient and person are voided "Merged with patient #<id>", and a `person_merge_log` row
    /// is written (a site's own merge brings its own). Earlier losers of the loser follow it to
    /// the new survivor. If either person is not at HQ yet, the merge is remembered and applied
    /// when both are; rows that arrive later are already canonical.
    pub(super) async fn merge(&mut self, conn: &mut Conn, loser: &str, mut rec: MergeRec) -> Result<(), SinkError> {
        if loser == rec.winner {
            return Ok(());
        }
        unrelease(conn, &self.merges, loser).await?;
        // Every record whose survivor was `loser`, directly or through a chain (read before the
        // maps change): their void reason and HQ's merge log must name the new survivor. Direct
        // losers alone missed one merged into a record that a survivor change then withdrew
        // (x → y, y → l; then l → y makes y the survivor: x still named l; tests/stop.rs saw it).
        let below = self.merged_into(loser, &rec.winner);
        // The survivor of a component is never a loser. A survivor change names an earlier loser
        // of this component as the new survivor: its own merge is withdrawn (its merge log goes,
        // it is un-voided below), instead of being chained to itself, which voided everyone.
        if self.merges.remove(&rec.winner).is_some() {
            conn.exec_drop("DELETE FROM omrs_sync_merge WHERE loser_uuid = ?", (rec.winner.as_str(),)).await.map_err(db("withdrawing the survivor's merge"))?;
            let u = uuid::Uuid::new_v5(&MERGE_LOG_NS, rec.winner.as_bytes()).to_string();
            conn.exec_drop("DELETE FROM person_merge_log WHERE uuid = ?", (u.as_str(),)).await.map_err(db("withdrawing the survivor's merge log"))?;
        }
        // Earlier losers of the loser now belong to the new survivor.
        let chained: Vec<String> = self.merges.losers_of(loser);
        for l in &chained {
            self.merges.set_winner(l, &rec.winner);
        }
        let w = self.lookup_id(conn, "person", &rec.winner).await?;
        let l = self.lookup_id(conn, "person", loser).await?;
        // A patient's rows (identifiers, visits, encounters…) move only to a survivor that is a
        // patient at HQ: with a partition per site, a survivor's person can land before its
        // patient row. Until then the merge waits, as for a person not at HQ yet.
        let ready = match (w, l) {
            (Some(w), Some(l)) => {
                let patients = patients_among(conn, vec![l, w]).await?;
                !patients.contains(&l) || patients.contains(&w)
            }
            _ => false,
        };
        let mut log_uuid: Option<String> = None;
        if let (Some(w), Some(l), true) = (w, l, ready) {
            self.move_held(conn, &[((loser, l), (&rec.winner, w))]).await?;
            let reason = format!("Merged with patient #{w}");
            // A survivor that its site had merged away (the site chose the other record) is
            // alive at HQ.
            let daemon = self.daemon(conn).await?;
            void_losers_keep_survivors(conn, &[(l, w)], daemon).await?;
            // HQ logs a merge of its own unless a site's log names the same loser (whatever the
            // reason of this record: which records reach HQ as `site_merge` and which as
            // `identifier` depends on the order the evidence arrived in; the site's log that
            // lands later removes HQ's, see `drop_covered_merge_logs`).
            let mut logged = self.log_merges(conn, &[(loser.to_string(), rec.clone())], &[(0, l, w)], daemon).await?;
            log_uuid = logged.remove(&0);
            // Earlier losers: their merge log and void reason name the new survivor.
            for cl in &below {
                if let Some(cid) = self.lookup_id(conn, "person", cl).await? {
                    for (table, col) in [("person", "person_id"), ("patient", "patient_id")] {
                        conn.exec_drop(format!("UPDATE {table} SET void_reason = ? WHERE {col} = ? AND voided = 1"), (reason.as_str(), cid))
                            .await
                            .map_err(db("renaming a chained merge"))?;
                    }
                    let cu = uuid::Uuid::new_v5(&MERGE_LOG_NS, cl.as_bytes()).to_string();
                    conn.exec_drop("UPDATE person_merge_log SET winner_person_id = ? WHERE uuid = ?", (w, cu.as_str()))
                        .await
                        .map_err(db("renaming a chained merge"))?;
                }
            }
            rec.applied = true;
        }
        record_merge(conn, loser, &rec, log_uuid.as_deref()).await?;
        if !chained.is_empty() {
            let marks = vec!["?"; chained.len()].join(",");
            let mut params: Vec<Value> = vec![Value::from(rec.winner.as_str())];
            params.extend(chained.iter().map(|c| Value::from(c.as_str())));
            conn.exec_drop(format!("UPDATE omrs_sync_merge SET winner_uuid = ? WHERE loser_uuid IN ({marks})"), params)
                .await
                .map_err(db("following a survivor change"))?;
        }
        self.merges.insert(loser.to_string(), rec);
        Ok(())
    }
}
