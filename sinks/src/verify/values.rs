//! `verify`'s value check: every HQ row equals, column by column in uuid space, the row that
//! DESIGN.md's rules say should win, worked out here from the sites' current rows and
//! independently of the HQ sink's code path:
//!
//! - the candidates are the current rows of every site that holds the uuid;
//! - person references are mapped to the survivor of their merge component (the merges HQ
//!   recorded in `omrs_sync_merge`, followed to the end of their chain); a moved identifier,
//!   name or address is not preferred;
//! - a merged-away person and patient are voided by the daemon user, dated at the person's
//!   registration, "Merged with patient <survivor>"; a survivor a site had merged away is alive;
//! - between sites that differ, the conflict rule (`omrs_core::hq::compare`) picks the winner
//!   from each row's own change time (`date_changed`, else `date_created`) and the site's
//!   priority and name. Rows without either time cannot be ordered from their current state:
//!   HQ must then hold one of the candidates ("undecided", counted).

use std::collections::{HashMap, HashSet};

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::config::Config;
use omrs_core::hq::{compare, parse_datetime, RowVersion};
use omrs_core::merge_log::SiteMoves;
use omrs_core::zone::SiteRule;
use serde::Serialize;

use super::space::{key_cmp, DbModel, Pager, Select};
use crate::SinkError;

/// The OpenMRS daemon user, in whose name HQ's merges are done (a well-known OpenMRS uuid).
const DAEMON_USER: &str = "A4F30A1B-5EB9-11DF-A648-37A07F9C90FB";
/// Tables whose moved rows stop being preferred (OpenMRS `mergePatients`).
const NOT_PREFERRED_WHEN_MOVED: &[(&str, &str)] = &[("patient_identifier", "patient_id"), ("person_name", "person_id"), ("person_address", "person_id")];

/// One value that is not what it should be.
#[derive(Debug, Clone, Serialize)]
pub struct ValueDiff {
    pub key: String,
    pub column: String,
    /// `<site>: <value>` of the winning site row (HQ checks), or None.
    pub site: Option<String>,
    pub hq: Option<String>,
    /// The lake's value (lake checks).
    pub lake: Option<String>,
}

/// One table's value comparison.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TableValues {
    pub table: String,
    pub compared: usize,
    pub equal: usize,
    pub differing: usize,
    /// Rows that differ between sites and carry no change time: HQ holds one of them.
    pub undecided: usize,
    pub examples: Vec<ValueDiff>,
    /// Columns of HQ's table the lake's table lacks (the lake check only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_columns: Vec<String>,
}

impl TableValues {
    /// Counts one compared row and keeps up to `samples` examples of what differs.
    pub fn record(&mut self, diffs: Vec<ValueDiff>, samples: usize) {
        if diffs.is_empty() {
            self.equal += 1;
        } else {
            self.differing += 1;
            let room = samples.saturating_sub(self.examples.len());
            self.examples.extend(diffs.into_iter().take(room));
        }
    }
}

/// A site's row: the site's index and its values.
type Candidate = (usize, Vec<Option<String>>);

/// The identity result HQ applied: loser → final survivor.
#[derive(Debug, Default)]
pub struct Merges {
    pub survivor: HashMap<String, String>,
    pub survivors: HashSet<String>,
    /// Losers whose chain does not end (a loop, e.g. a survivor merged into itself).
    pub loops: Vec<String>,
    /// HQ person id → uuid, for the ids named by "Merged with patient #<id>".
    pub hq_person: HashMap<String, String>,
    /// The rows the clinics' own merges moved, by the clinics' own merge logs: the loser's.
    pub site: SiteMoves,
    /// Records a split made survivors again (HQ's `omrs_sync_released`).
    pub released: HashSet<String>,
}

impl Merges {
    pub async fn load(hq: &mut Conn) -> Result<Merges, SinkError> {
        let direct: HashMap<String, String> = hq
            .query::<(String, String), _>("SELECT loser_uuid, winner_uuid FROM omrs_sync_merge")
            .await
            .map_err(|e| SinkError::db("reading omrs_sync_merge", e))?
            .into_iter()
            .collect();
        let mut m = Merges::default();
        for loser in direct.keys() {
            let mut at = loser;
            let mut steps = 0;
            while let Some(next) = direct.get(at) {
                at = next;
                steps += 1;
                if at == loser || steps > direct.len() {
                    break;
                }
            }
            if at == loser || direct.contains_key(at) {
                m.loops.push(loser.clone());
            } else {
                m.survivor.insert(loser.clone(), at.clone());
                m.survivors.insert(at.clone());
            }
        }
        m.loops.sort();
        let ids: Vec<(String, String)> = hq
            .query(
                // A derived table joined by key: as `IN (subquery)`, MariaDB ran the union once
                // per person, which took hours at 100 k patients.
                "SELECT CAST(p.person_id AS CHAR), p.uuid FROM (
                   SELECT CAST(SUBSTRING(void_reason, 22) AS UNSIGNED) AS id FROM person WHERE void_reason LIKE 'Merged with patient #%'
                   UNION SELECT CAST(SUBSTRING(void_reason, 22) AS UNSIGNED) FROM patient WHERE void_reason LIKE 'Merged with patient #%'
                 ) ids JOIN person p ON p.person_id = ids.id",
            )
            .await
            .map_err(|e| SinkError::db("reading the persons named by merge void reasons", e))?;
        m.hq_person = ids.into_iter().collect();
        // An HQ whose sink has not run since this version made the table has released nobody.
        let released: Vec<String> = match hq.query("SELECT person_uuid FROM omrs_sync_released").await {
            Ok(r) => r,
            Err(mysql_async::Error::Server(e)) if e.code == 1146 => Vec::new(),
            Err(e) => return Err(SinkError::db("reading omrs_sync_released", e)),
        };
        m.released = released.into_iter().collect();
        Ok(m)
    }

    /// What each clinic's merge logs say its merges moved (read at the clinic, in the order it
    /// wrote them).
    pub async fn add_site_logs(&mut self, site: &mut Conn) -> Result<(), SinkError> {
        let logs: Vec<(String, Option<String>)> = match site
            .query("SELECT p.uuid, l.merged_data FROM person_merge_log l JOIN person p ON p.person_id = l.loser_person_id ORDER BY l.person_merge_log_id")
            .await
        {
            Ok(l) => l,
            // A database without OpenMRS's merge log has no merges to read.
            Err(mysql_async::Error::Server(e)) if e.code == 1146 => Vec::new(),
            Err(e) => return Err(SinkError::db("reading a site's person_merge_log", e)),
        };
        for (loser, data) in logs {
            if let Some(d) = data {
                self.site.add(&loser, &d);
            }
        }
        Ok(())
    }

    /// HQ's void reason in uuid space ("Merged with patient #12" names HQ's id).
    pub fn hq_reason(&self, v: Option<String>) -> Option<String> {
        let s = v?;
        match s.strip_prefix("Merged with patient #").and_then(|id| self.hq_person.get(id)) {
            Some(u) => Some(format!("Merged with patient {u}")),
            None => Some(s),
        }
    }
}

/// What a table's rows must look like: positions of the columns the rules touch.
pub struct TableRules<'a> {
    pub table: &'a str,
    pub cols: &'a [String],
    /// Columns that reference a person (mapped to the survivor).
    person_refs: Vec<usize>,
    preferred: Option<(usize, usize)>,
    voids: Option<[usize; 4]>,
    date_changed: Option<usize>,
    date_created: Option<usize>,
    /// The person column a clinic's merge moves ([`SiteMoves::column`]), and an obs's encounter.
    moved_by_log: Option<usize>,
    encounter: Option<usize>,
}

impl<'a> TableRules<'a> {
    pub fn new(table: &'a str, cols: &'a [String], hq: &DbModel) -> TableRules<'a> {
        let at = |c: &str| cols.iter().position(|x| x == c);
        // A site's merge log keeps its own winner and loser.
        let person_refs = if table == "person_merge_log" {
            Vec::new()
        } else {
            (0..cols.len()).filter(|&i| hq.references(table, &cols[i]).as_deref() == Some("person")).collect()
        };
        let preferred = NOT_PREFERRED_WHEN_MOVED.iter().find(|(t, _)| *t == table).and_then(|(_, c)| Some((at(c)?, at("preferred")?)));
        let voids = matches!(table, "person" | "patient").then(|| Some([at("voided")?, at("voided_by")?, at("date_voided")?, at("void_reason")?])).flatten();
        let moved_by_log = SiteMoves::column(table).and_then(at);
        let encounter = (table == "obs").then(|| at("encounter_id")).flatten();
        TableRules { table, cols, person_refs, preferred, voids, date_changed: at("date_changed"), date_created: at("date_created"), moved_by_log, encounter }
    }

    /// A site's row as HQ must hold it: persons through the merges (a row its clinic's merge
    /// moved is its loser's), merge voids.
    fn map(&self, key: &str, mut row: Vec<Option<String>>, m: &Merges) -> Vec<Option<String>> {
        if let Some(i) = self.moved_by_log.filter(|_| !m.site.is_empty()) {
            let encounter = self.encounter.and_then(|e| row[e].as_deref());
            if let Some(owner) = m.site.owner(self.table, Some(key), encounter) {
                row[i] = Some(owner.to_string());
            }
        }
        for &i in &self.person_refs {
            if let Some(s) = row[i].as_ref().and_then(|v| m.survivor.get(v)) {
                row[i] = Some(s.clone());
                if let Some((_, pref)) = self.preferred.filter(|(by, _)| *by == i) {
                    row[pref] = Some("0".into());
                }
            }
        }
        if let Some([voided, by, date, reason]) = self.voids {
            if let Some(s) = m.survivor.get(key) {
                row[voided] = Some("1".into());
                row[by] = Some(DAEMON_USER.into());
                // Dated at the row's own registration.
                row[date] = self.date_created.and_then(|i| row[i].clone());
                row[reason] = Some(format!("Merged with patient {s}"));
            } else if (m.survivors.contains(key) || m.released.contains(key)) && row[voided].as_deref() == Some("1") && row[reason].as_deref().is_some_and(|r| r.starts_with("Merged with patient")) {
                row[voided] = Some("0".into());
                row[by] = None;
                row[date] = None;
                row[reason] = None;
            }
        }
        row
    }

    /// The winner among the (mapped) candidates; None when they differ and cannot be ordered.
    fn winner<'r>(
        &self,
        cands: &'r [Candidate],
        sites: &[(String, SiteRule)],
    ) -> Option<&'r Candidate> {
        let first = cands.first()?;
        if cands.iter().all(|c| c.1 == first.1) {
            return Some(first);
        }
        let version = |c: &Candidate| -> Option<RowVersion> {
            let get = |i: Option<usize>| i.and_then(|i| c.1[i].as_deref());
            let dated = get(self.date_changed)
                .and_then(parse_datetime)
                .or_else(|| get(self.date_created).and_then(parse_datetime))
                .is_some();
            dated.then(|| {
                RowVersion::from_parts(
                    get(self.date_changed),
                    get(self.date_created),
                    &sites[c.0].1,
                    &sites[c.0].0,
                    0,
                    "",
                    0,
                    0,
                )
            })
        };
        let mut best: Option<(&Candidate, RowVersion)> = None;
        for c in cands {
            let v = version(c)?;
            if best.as_ref().is_none_or(|(_, b)| compare(&v, b).is_gt()) {
                best = Some((c, v));
            }
        }
        best.map(|(c, _)| c)
    }
}

/// Compares one table: HQ (the last connection) against the sites' winners.
pub async fn compare_table(
    rules: &TableRules<'_>,
    sels: Vec<Option<Select>>,
    conns: &mut [Conn],
    sites: &[(String, SiteRule)],
    merges: &Merges,
    skip: &HashSet<String>,
    samples: usize,
) -> Result<TableValues, SinkError> {
    let hq_at = conns.len() - 1;
    let mut pagers: Vec<Option<Pager>> =
        sels.into_iter().enumerate().map(|(i, s)| s.map(|s| Pager::new(s, sites.get(i).map(|s| s.0.as_str()).unwrap_or("HQ")))).collect();
    let mut out = TableValues { table: rules.table.to_string(), ..Default::default() };
    loop {
        let mut least: Option<String> = None;
        for (i, p) in pagers.iter_mut().enumerate() {
            if let Some(p) = p {
                if let Some(k) = p.peek(&mut conns[i]).await? {
                    if least.as_deref().is_none_or(|l| key_cmp(k, l).is_lt()) {
                        least = Some(k.to_string());
                    }
                }
            }
        }
        let Some(key) = least else { break };
        let mut cands = Vec::new();
        let mut hq_row = None;
        for (i, p) in pagers.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if p.peek(&mut conns[i]).await?.is_some_and(|k| key_cmp(k, &key).is_eq()) {
                let (_, row) = p.pop().expect("peeked");
                if i == hq_at {
                    hq_row = Some(row);
                } else {
                    cands.push((i, rules.map(&key, row, merges)));
                }
            }
        }
        // Presence (missing, extra) is the other check's: only rows on both sides compare.
        let Some(mut hq_row) = hq_row else { continue };
        if cands.is_empty() || skip.contains(&key) {
            continue;
        }
        if let Some([_, _, _, reason]) = rules.voids {
            hq_row[reason] = merges.hq_reason(hq_row[reason].take());
        }
        out.compared += 1;
        let present_in = |site: usize, col: usize| pagers[site].as_ref().is_some_and(|p| p.present()[col]) && pagers[hq_at].as_ref().is_some_and(|p| p.present()[col]);
        let diffs: Vec<ValueDiff> = match rules.winner(&cands, sites) {
            Some((site, row)) => (0..rules.cols.len())
                .filter(|&c| present_in(*site, c) && row[c] != hq_row[c])
                .map(|c| ValueDiff {
                    key: key.clone(),
                    column: rules.cols[c].clone(),
                    site: Some(format!("{}: {}", sites[*site].0, row[c].as_deref().unwrap_or("NULL"))),
                    hq: hq_row[c].clone(),
                    lake: None,
                })
                .collect(),
            None => {
                out.undecided += 1;
                let equal_one = cands.iter().any(|(s, row)| (0..rules.cols.len()).all(|c| !present_in(*s, c) || row[c] == hq_row[c]));
                if equal_one {
                    Vec::new()
                } else {
                    vec![ValueDiff { key: key.clone(), column: "(row)".into(), site: Some(format!("{} candidates", cands.len())), hq: None, lake: None }]
                }
            }
        };
        out.record(diffs, samples);
    }
    Ok(out)
}

/// The columns of `table` compared between HQ and the sites: HQ's, without its own id and the
/// columns never shipped.
pub fn compared_columns(hq: &DbModel, table: &str, scrub: &HashSet<String>) -> Vec<String> {
    let own = hq.own_id(table).map(str::to_string);
    hq.columns(table).filter(|c| Some(*c) != own.as_deref() && !scrub.contains(&format!("{table}.{c}"))).map(str::to_string).collect()
}

/// Every keyed table HQ shares with the sites, compared.
pub async fn run(cfg: &Config, hq: Conn, sites: Vec<Conn>, skip: &HashSet<String>, samples: usize) -> Result<(Vec<TableValues>, Merges), SinkError> {
    let mut conns = sites;
    conns.push(hq);
    let hq_at = conns.len() - 1;
    let mut models = Vec::with_capacity(conns.len());
    for (i, c) in conns.iter_mut().enumerate() {
        let (db, what) = match cfg.sites.get(i) {
            Some(s) => (s.database.database.clone(), format!("site {}", s.name)),
            None => (cfg.hq.database.database.clone(), "HQ".to_string()),
        };
        models.push(DbModel::load(c, &db, &what).await?);
    }
    let mut merges = Merges::load(&mut conns[hq_at]).await?;
    for c in conns[..hq_at].iter_mut() {
        merges.add_site_logs(c).await?;
    }
    let scrub: HashSet<String> = cfg.ingest.scrub.iter().cloned().collect();
    let sites: Vec<(String, SiteRule)> = cfg
        .sites
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                SiteRule {
                    priority: s.priority,
                    zone: s.zone(),
                },
            )
        })
        .collect();
    let mut tables: Vec<String> = models[hq_at]
        .tables()
        .filter(|t| !t.starts_with("omrs_") && !cfg.ingest.exclude.contains(t) && (cfg.ingest.include.is_empty() || cfg.ingest.include.contains(t)))
        .cloned()
        .collect();
    tables.sort();
    let mut out = Vec::new();
    for t in &tables {
        let cols = compared_columns(&models[hq_at], t, &scrub);
        let Some(hq_sel) = models[hq_at].select(t, &cols) else { continue };
        let mut sels: Vec<Option<Select>> = models[..hq_at].iter().map(|m| m.select(t, &cols)).collect();
        if sels.iter().all(Option::is_none) {
            continue;
        }
        sels.push(Some(hq_sel));
        let rules = TableRules::new(t, &cols, &models[hq_at]);
        out.push(compare_table(&rules, sels, &mut conns, &sites, &merges, skip, samples).await?);
    }
    Ok((out, merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for<'a>(table: &'a str, cols: &'a [String]) -> TableRules<'a> {
        let at = |c: &str| cols.iter().position(|x| x == c);
        TableRules {
            table,
            cols,
            person_refs: at("person_id").into_iter().collect(),
            preferred: at("person_id").zip(at("preferred")),
            voids: None,
            date_changed: at("date_changed"),
            date_created: at("date_created"),
            moved_by_log: SiteMoves::column(table).and_then(at),
            encounter: at("encounter_id"),
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn the_later_change_wins_then_priority_then_the_lower_site_name() {
        let cols: Vec<String> = ["name", "date_created", "date_changed"].iter().map(|s| s.to_string()).collect();
        let r = rules_for("location", &cols);
        let rule = |priority| SiteRule {
            priority,
            ..SiteRule::default()
        };
        let sites = vec![
            ("site-a".to_string(), rule(0)),
            ("site-b".to_string(), rule(0)),
            ("site-c".to_string(), rule(5)),
        ];
        let a = (
            0,
            vec![s("A"), s("2026-01-01 00:00:00"), s("2026-02-01 00:00:00")],
        );
        let b = (
            1,
            vec![s("B"), s("2026-01-01 00:00:00"), s("2026-03-01 00:00:00")],
        );
        assert_eq!(
            r.winner(&[a.clone(), b.clone()], &sites).map(|w| w.0),
            Some(1)
        );
        // Same change time: the higher priority, else the lower site name.
        let b_tie = (1, vec![s("B"), s("2026-01-01 00:00:00"), s("2026-02-01 00:00:00")]);
        assert_eq!(r.winner(&[b_tie.clone(), a.clone()], &sites).map(|w| w.0), Some(0));
        let c_tie = (2, vec![s("C"), s("2026-01-01 00:00:00"), s("2026-02-01 00:00:00")]);
        assert_eq!(r.winner(&[a.clone(), c_tie], &sites).map(|w| w.0), Some(2));
        // No change time on a row that differs: undecided.
        let undated = (1, vec![s("X"), None, None]);
        assert!(r.winner(&[a, undated], &sites).is_none());
    }

    #[test]
    fn merged_persons_are_mapped_and_moved_rows_not_preferred() {
        let cols: Vec<String> = ["person_id", "preferred"].iter().map(|s| s.to_string()).collect();
        let r = rules_for("person_name", &cols);
        let mut m = Merges::default();
        m.survivor.insert("loser".into(), "winner".into());
        assert_eq!(r.map("n1", vec![s("loser"), s("1")], &m), vec![s("winner"), s("0")]);
        assert_eq!(r.map("n2", vec![s("other"), s("1")], &m), vec![s("other"), s("1")]);
    }
}
