//! The transform's logic, free of Kafka: per-site watermarks with idle detection, late data,
//! and patient identity. Time is passed in (`now_ms`), so golden tests drive it with a scripted
//! clock.
//!
//! Emit on arrival, finalise by watermark (issue #24): every event is emitted when it arrives,
//! its identity resolved, in the order its site wrote it. Nothing waits for another site, so a
//! quiet clinic, one replaying days of backlog or one whose clock is wrong never holds back
//! another's live data. `omrs.hq.changes` keeps each site's order and has no order across
//! sites; completeness is the watermark's: a `watermark` record at W says that every later
//! record that is not `late` has an event time at or after W.
//!
//! Watermarks: every event gets an *effective* event time, the running maximum of its site's
//! `source.ts_ms` (capped at processing time plus `max_clock_ahead_ms`, so a clock that jumps
//! forward does not carry its site's watermark into the future). The global watermark is the
//! minimum over active sites of (effective time − out-of-orderness). A binlog event whose
//! effective time is already below it is marked late. Aggregate windows and lake date
//! partitions are final once the watermark passes them.
//!
//! Identity is applied at emission, in output order, so the identity state always matches
//! exactly what has been emitted, and the runner commits every offset it has read with the
//! output of the batch.
//!
//! Offsets handled past the committed offset ([`Fact::Emitted`]) were written by versions that
//! buffered events for ordering. They are still restored and skipped, so an upgrade in the
//! middle of such a run emits nothing twice; this version writes none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use omrs_core::config::IdentifierRule;
use omrs_core::envelope::Op;
use omrs_core::hq::review;
use omrs_core::zone::SiteRules;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

pub use crate::event::{InEvent, Out, Refs};
use crate::identity::{Change, Identity, Merged};
use crate::nearmiss::{NearMiss, Part};

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

pub use omrs_core::hq::HqEvent;

/// A (topic, partition).
type Partition = (Arc<str>, i32);

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub out_of_orderness_ms: i64,
    pub idle_timeout_ms: i64,
    /// How far ahead of processing time a site's effective time may go: a clock that jumps
    /// forward is capped here (and counted in [`Engine::clock_capped`]).
    pub max_clock_ahead_ms: i64,
    pub identifiers: Vec<IdentifierRule>,
    /// Each site's time zone: registration times are compared in UTC.
    pub sites: SiteRules,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteState {
    /// Running maximum of the site's event times (capped, see [`EngineConfig::max_clock_ahead_ms`]).
    pub max_ts: i64,
    /// Processing time the site was last heard from.
    pub last_seen: i64,
    pub idle: bool,
    /// How far the site's latest event time was ahead of processing time (0 when behind).
    #[serde(default)]
    pub clock_ahead_ms: i64,
}

/// A fact for the state changelog (`omrs.transform.state`): replaying all of them rebuilds the
/// identity index and the watermarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Fact {
    Person { uuid: String, created: Option<String> },
    Identifier { type_idx: u16, value: String, person: String },
    Link { a: String, b: String },
    /// A person's split decision: no record of `keep` is one person with a record of `other`.
    Apart { review_id: String, keep: Vec<String>, other: Vec<String> },
    Watermark { site: String, max_ts: i64 },
    /// A part of a record's demographics for near misses: `part` is `sb` (sex and birthdate)
    /// or `n` (preferred name), at its site.
    Demo { uuid: String, part: String, value: String, site: String },
    /// A record holds a configured identifier (for near misses).
    Holds { uuid: String },
    /// Offset ranges (inclusive) of a partition that were handled (emitted or dead-lettered)
    /// past its committed offset. Empty once the committed offset has passed them.
    Emitted { topic: String, partition: i32, ranges: Vec<(i64, i64)> },
}

impl Fact {
    /// The compaction key: the latest fact per key is all that is needed.
    pub fn key(&self) -> String {
        match self {
            Fact::Person { uuid, .. } => format!("p:{uuid}"),
            Fact::Identifier { type_idx, value, .. } => format!("i:{type_idx}:{value}"),
            Fact::Link { a, b } => format!("l:{a}:{b}"),
            Fact::Apart { review_id, .. } => format!("x:{review_id}"),
            Fact::Watermark { site, .. } => format!("w:{site}"),
            Fact::Demo { uuid, part, .. } => format!("d:{part}:{uuid}"),
            Fact::Holds { uuid } => format!("h:{uuid}"),
            Fact::Emitted { topic, partition, .. } => format!("e:{topic}:{partition}"),
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    pub sites: BTreeMap<String, SiteState>,
    /// Per (topic, partition): ascending, disjoint offset ranges (inclusive) that a version
    /// which buffered events handled past its commit point, restored from the changelog. A
    /// record read again in one of them is skipped. Only partitions with ranges are present.
    ahead: BTreeMap<Partition, Vec<(i64, i64)>>,
    /// Partitions whose ranges changed since the last `take_facts`.
    ahead_changed: BTreeSet<Partition>,
    pub identity: Identity,
    /// Demographics for near-miss suggestions.
    near: NearMiss,
    global_wm: i64,
    /// Facts produced since the last `take_facts`.
    facts: Vec<Fact>,
    pub late_events: BTreeMap<String, u64>,
    /// Events whose time was capped because their site's clock ran ahead, per site.
    pub clock_capped: BTreeMap<String, u64>,
    pub merges: u64,
    pub reviews: u64,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Engine {
            cfg,
            sites: BTreeMap::new(),
            ahead: BTreeMap::new(),
            ahead_changed: BTreeSet::new(),
            identity: Identity::default(),
            near: NearMiss::default(),
            global_wm: i64::MIN,
            facts: Vec::new(),
            late_events: BTreeMap::new(),
            clock_capped: BTreeMap::new(),
            merges: 0,
            reviews: 0,
        }
    }

    /// Approximate heap bytes of the identity state: the index and the near-miss demographics.
    pub fn identity_bytes(&self) -> usize {
        self.identity.approx_bytes() + self.near.approx_bytes()
    }

    pub fn global_watermark(&self) -> i64 {
        self.global_wm
    }

    /// Declares a site (from the config): until it speaks or its idle timeout passes, it holds
    /// the global watermark back, so its first events are not mistaken for late ones.
    pub fn expect_site(&mut self, site: &str, now_ms: i64) {
        self.sites.entry(site.to_string()).or_insert(SiteState { max_ts: i64::MIN / 2, last_seen: now_ms, ..Default::default() });
    }

    /// Restores a fact from the changelog (no output).
    pub fn restore(&mut self, fact: Fact) {
        match fact {
            Fact::Person { uuid, created } => {
                self.identity.person(&uuid, created.as_deref());
            }
            Fact::Identifier { type_idx, value, person } => {
                if let Some(other) = self.identity.identifier(type_idx, &value, &person) {
                    self.identity.link(&person, &other);
                }
            }
            Fact::Link { a, b } => {
                self.identity.link(&a, &b);
            }
            Fact::Apart { keep, other, .. } => {
                self.identity.keep_apart(&keep, &other);
            }
            Fact::Watermark { site, max_ts } => {
                let s = self.sites.entry(site).or_default();
                s.max_ts = s.max_ts.max(max_ts);
            }
            Fact::Demo { uuid, part, value, site } => {
                let r = self.identity.record(&uuid);
                let p = if part == "n" { Part::Name(&value) } else { Part::SexBirth(&value) };
                self.near.set(r, &site, p);
            }
            Fact::Holds { uuid } => {
                let r = self.identity.record(&uuid);
                self.near.holds_identifier(r);
            }
            Fact::Emitted { topic, partition, ranges } => {
                let key = (Arc::from(topic), partition);
                if ranges.is_empty() {
                    self.ahead.remove(&key);
                } else {
                    tracing::info!(topic = %key.0, partition, ranges = ranges.len(), "offsets emitted past the commit point by an earlier version: skipped when read again");
                    self.ahead.insert(key, ranges);
                }
            }
        }
    }

    /// The facts produced since the last call, with the emitted-ahead ranges of every partition
    /// whose ranges changed (an empty list once they are all committed).
    pub fn take_facts(&mut self) -> Vec<Fact> {
        let mut facts = std::mem::take(&mut self.facts);
        for key in std::mem::take(&mut self.ahead_changed) {
            let ranges = self.ahead.get(&key).cloned().unwrap_or_default();
            facts.push(Fact::Emitted { topic: key.0.to_string(), partition: key.1, ranges });
        }
        facts
    }

    /// Whether the record at `origin` was already handled: emitted or dead-lettered past the
    /// commit point by an earlier version before a restart. The runner skips it (and does not
    /// dead-letter it again).
    pub fn already_handled(&self, origin: &Origin) -> bool {
        if self.ahead.is_empty() {
            return false;
        }
        self.ahead
            .get(&(origin.topic.clone(), origin.partition))
            .is_some_and(|r| r.iter().any(|&(a, b)| a <= origin.offset && origin.offset <= b))
    }

    /// The runner commits `next` as the partition's offset, in the transaction of the facts
    /// taken next: the ranges below it can never be read again.
    pub fn committing(&mut self, topic: &str, partition: i32, next: i64) {
        let Some((key, ranges)) = self.ahead.iter_mut().find(|((t, p), _)| **t == *topic && *p == partition) else { return };
        let before = ranges.len();
        ranges.retain(|&(_, b)| b >= next);
        if ranges.len() != before {
            let key = key.clone();
            if ranges.is_empty() {
                self.ahead.remove(&key);
            }
            self.ahead_changed.insert(key);
        }
    }

    /// Takes one input event. Returns what can be emitted now.
    pub fn push(&mut self, ev: InEvent, origin: Origin, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        self.push_into(ev, origin, now_ms, &mut out);
        out
    }

    /// [`Engine::push`], appending to `out`: the event itself (after any merge or review it
    /// causes) and nothing else; it is never held back.
    pub fn push_into(&mut self, ev: InEvent, origin: Origin, now_ms: i64, out: &mut Vec<Out>) {
        if self.already_handled(&origin) {
            // Emitted before a restart, past the committed offset: its effects on the site's
            // time, identity and aggregates were committed with it.
            return;
        }
        if ev.op == Op::Schema && ev.schema.as_ref().is_some_and(|s| s.base) {
            // A table's shape at a fresh snapshot, ahead of its rows: passed on, with no time of
            // its own (the Debezium input sends it before it has read any).
            if let Some(schema) = ev.schema {
                out.push(Out::Hq(Box::new(HqEvent::Schema { site: ev.site.to_string(), schema: *schema, ts_ms: ev.source.ts_ms })));
            }
            return;
        }
        let st = match self.sites.get_mut(&*ev.site) {
            Some(st) => st,
            None => self.sites.entry(ev.site.to_string()).or_default(),
        };
        let ts = ev.source.ts_ms;
        st.clock_ahead_ms = (ts - now_ms).max(0);
        let cap = now_ms.saturating_add(self.cfg.max_clock_ahead_ms);
        if ts > cap {
            *self.clock_capped.entry(ev.site.to_string()).or_default() += 1;
        }
        let time = st.max_ts.max(ts.min(cap));
        st.max_ts = time;
        st.last_seen = now_ms;
        if st.idle {
            st.idle = false;
            tracing::info!(site = %ev.site, "site active again");
        }
        if ev.op == Op::Schema {
            // A table's new shape goes on ahead of the site's next changes; nothing to resolve.
            if let Some(schema) = ev.schema {
                out.push(Out::Hq(Box::new(HqEvent::Schema { site: ev.site.to_string(), schema: *schema, ts_ms: ts })));
            }
        } else if ev.op != Op::Heartbeat {
            // A snapshot row states the site's content as of its snapshot, not history: never
            // late. A binlog event older than the global watermark is (an offline site
            // catching up, a site whose clock is behind the others').
            let late = ev.op != Op::Read && time < self.global_wm;
            if late {
                match self.late_events.get_mut(&*ev.site) {
                    Some(n) => *n += 1,
                    None => {
                        self.late_events.insert(ev.site.to_string(), 1);
                    }
                }
            }
            self.emit(ev, late, out);
        }
        self.advance(now_ms);
    }

    /// Idle detection and the watermark, driven by the clock alone. Emits nothing: the runner
    /// publishes the watermark.
    pub fn tick(&mut self, now_ms: i64) {
        self.advance(now_ms);
    }

    fn advance(&mut self, now_ms: i64) {
        let mut wm = i64::MAX;
        let mut any = false;
        for (name, s) in self.sites.iter_mut() {
            if !s.idle && now_ms - s.last_seen > self.cfg.idle_timeout_ms {
                s.idle = true;
                tracing::warn!(site = %name, silent_ms = now_ms - s.last_seen, "site idle: it no longer holds the global watermark back");
            }
            if !s.idle {
                any = true;
                wm = wm.min(s.max_ts - self.cfg.out_of_orderness_ms);
            }
        }
        if !any {
            // Every site idle: everything seen is complete.
            wm = self.sites.values().map(|s| s.max_ts).max().unwrap_or(i64::MIN);
        }
        if wm > self.global_wm && wm > i64::MIN / 4 {
            self.global_wm = wm;
        }
    }

    fn rule_of(&self, type_uuid: &str) -> Option<(u16, &IdentifierRule)> {
        self.cfg.identifiers.iter().enumerate().find(|(_, r)| r.identifier_type_uuid == type_uuid).map(|(i, r)| (i as u16, r))
    }

    /// A merge, and its entry in the review queue (status `merged`: listed, explainable, and
    /// open to a person's decision).
    fn merged(&mut self, m: Merged, reason: &str, evidence: J, site: &str, ts: i64, out: &mut Vec<Out>) {
        self.merges += 1;
        let mut records: Vec<String> = ["records", "record", "site_winner", "site_loser"]
            .iter()
            .filter_map(|k| evidence.get(k))
            .flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]))
            .filter_map(|v| v.as_str().map(str::to_string))
            .chain([m.winner.clone(), m.loser.clone()])
            .collect();
        records.sort();
        records.dedup();
        let review = HqEvent::IdentityReview {
            review_id: review::merge_review_id(&m.loser, &m.winner),
            reason: review::merge_reason(reason).into(),
            status: review::MERGED.into(),
            person: m.winner.clone(),
            records,
            evidence: evidence.clone(),
            site: site.into(),
            ts_ms: ts,
            decided: None,
        };
        out.push(Out::Hq(Box::new(HqEvent::Merge { winner: m.winner, loser: m.loser, reason: reason.into(), evidence, site: site.into(), ts_ms: ts })));
        out.push(Out::Hq(Box::new(review)));
    }

    /// What a link or a decision changed, for the sinks: a merge, or records leaving a
    /// component (`review_id` names the decision, or is derived from the records).
    #[allow(clippy::too_many_arguments)]
    fn changed(&mut self, c: Change, reason: &str, evidence: J, review_id: &str, site: &str, ts: i64, out: &mut Vec<Out>) {
        match c {
            Change::Merged(m) => self.merged(m, reason, evidence, site, ts, out),
            Change::Split { survivor, from, records } => {
                let review_id = if review_id.is_empty() { review::review_id(&["regroup", &from, &survivor, &records.join(",")]) } else { review_id.to_string() };
                tracing::info!(from = %from, survivor = %survivor, records = records.len(), review = %review_id, "records leave a merged person");
                out.push(Out::Hq(Box::new(HqEvent::Split { survivor, from, records, review_id, site: site.into(), ts_ms: ts })));
            }
        }
    }

    /// A link a person's split decision keeps from joining: an open review, not a merge.
    fn kept_apart(&mut self, mut records: [String; 2], evidence: J, site: &str, ts: i64, out: &mut Vec<Out>) {
        self.reviews += 1;
        records.sort();
        out.push(Out::Hq(Box::new(HqEvent::IdentityReview {
            review_id: review::review_id(&["shared", &records[0], &records[1]]),
            reason: review::IDENTIFIER_SHARED.into(),
            status: review::OPEN.into(),
            person: self.identity.canonical(&records[0]),
            records: records.to_vec(),
            evidence,
            site: site.into(),
            ts_ms: ts,
            decided: None,
        })));
    }

    /// An identifier of a merged person stopped holding at its site: the merge stays (one
    /// clerk's edit must not move clinical data back and forth), a person decides.
    fn review_identifier(&mut self, f: Finding, site: &str, ts: i64, out: &mut Vec<Out>) {
        self.reviews += 1;
        out.push(Out::Hq(Box::new(HqEvent::IdentityReview {
            review_id: review::review_id(&["identifier", f.reason, &f.record, &f.type_uuid, &f.value]),
            reason: f.reason.into(),
            status: review::OPEN.into(),
            person: self.identity.canonical(&f.record),
            records: vec![f.record],
            evidence: f.evidence,
            site: site.into(),
            ts_ms: ts,
            decided: None,
        })));
    }

    /// A site's local DATETIME as a UTC one (kept in that form in the identity facts).
    fn in_utc(&self, site: &str, local: &str) -> String {
        let zone = self.cfg.sites.get(site).zone;
        match omrs_core::hq::parse_datetime(local) {
            Some(t) if !zone.is_utc() => chrono::DateTime::from_timestamp_millis(zone.utc_ms(t))
                .map(|u| u.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| local.to_string()),
            _ => local.to_string(),
        }
    }

    /// Applies identity, canonicalises person references and emits.
    fn emit(&mut self, mut ev: InEvent, late: bool, out: &mut Vec<Out>) {
        let ts = ev.source.ts_ms;
        let alive = ev.op != Op::Delete;
        let mut pending_merges: Vec<(Change, &'static str, J)> = Vec::new();
        // A link a split decision keeps from joining: (the two records, its evidence).
        let mut refused: Option<([String; 2], J)> = None;
        let mut review: Option<Finding> = None;
        // A record that holds a configured identifier with this event.
        let mut holder: Option<String> = None;
        // The few identity rows are parsed in full, once; every other row stays raw.
        let row = match ev.table_str() {
            "person" | "person_name" | "patient_identifier" => row_map(ev.after_raw().or(ev.before_raw())),
            _ => None,
        };

        match ev.table_str() {
            "person" if alive => {
                if let Some(uuid) = ev.uuid.clone() {
                    let created = row
                        .as_ref()
                        .and_then(|r| r.get("date_created"))
                        .and_then(J::as_str)
                        .map(|c| self.in_utc(&ev.site, c));
                    if let Some(m) = self.identity.person(&uuid, created.as_deref()) {
                        pending_merges.push((
                            Change::Merged(m),
                            "survivor_change",
                            serde_json::json!({"record": uuid, "date_created": created}),
                        ));
                    }
                    self.facts.push(Fact::Person { uuid, created });
                }
            }
            "patient_identifier" => {
                let type_uuid = ev.refs.get("identifier_type").and_then(J::as_str).unwrap_or("").to_string();
                let person = ev.refs.get("patient_id").and_then(J::as_str).map(str::to_string);
                let raw = row.as_ref().and_then(|r| r.get("identifier")).and_then(J::as_str).map(str::to_string);
                if let (Some((ti, rule)), Some(person), Some(raw)) = (self.rule_of(&type_uuid), person, raw) {
                    let value = rule.normalize(&raw);
                    let before = row_map(ev.before_raw());
                    let was_voided = before.as_ref().and_then(|r| r.get("voided").and_then(J::as_i64)).unwrap_or(0) == 1;
                    let voided = row.as_ref().and_then(|r| r.get("voided")).and_then(J::as_i64).unwrap_or(0) == 1;
                    // A value changed in place (X → Y) on a live identifier: X stops holding.
                    let corrected_from = match (&before, ev.op) {
                        (Some(b), Op::Update) if alive && !voided && !was_voided => {
                            b.get("identifier").and_then(J::as_str).map(|old| rule.normalize(old)).filter(|old| !old.is_empty() && *old != value)
                        }
                        _ => None,
                    };
                    if let Some(old) = corrected_from {
                        if self.identity.component_size(&person) > 1 {
                            let evidence = serde_json::json!({"identifier_type": type_uuid, "value": old, "new_value": value, "record": person, "op": ev.op.as_str()});
                            review = Some(Finding { reason: review::IDENTIFIER_CORRECTED, record: person.clone(), type_uuid: type_uuid.clone(), value: old, evidence });
                        }
                    }
                    if !value.is_empty() && alive && !voided {
                        holder = Some(person.clone());
                        if let Some(other) = self.identity.identifier(ti, &value, &person) {
                            let (changes, kept_apart) = self.identity.link(&person, &other);
                            let evidence = serde_json::json!({"identifier_type": type_uuid, "value": value, "records": [other, person]});
                            if kept_apart {
                                refused = Some(([other.clone(), person.clone()], evidence.clone()));
                            }
                            pending_merges.extend(changes.into_iter().map(|c| (c, "identifier", evidence.clone())));
                            self.facts.push(Fact::Link { a: other, b: person.clone() });
                        } else {
                            self.facts.push(Fact::Identifier { type_idx: ti, value, person: person.clone() });
                        }
                    } else if (!alive || (voided && !was_voided)) && self.identity.component_size(&person) > 1 {
                        let reason = if alive { review::IDENTIFIER_VOIDED } else { review::IDENTIFIER_DELETED };
                        let evidence = serde_json::json!({"identifier_type": type_uuid, "value": value, "record": person, "op": ev.op.as_str()});
                        review = Some(Finding { reason, record: person.clone(), type_uuid: type_uuid.clone(), value, evidence });
                    }
                }
            }
            "person_merge_log" if ev.op == Op::Create || ev.op == Op::Read => {
                let w = ev.refs.get("winner_person_id").and_then(J::as_str).map(str::to_string);
                let l = ev.refs.get("loser_person_id").and_then(J::as_str).map(str::to_string);
                if let (Some(w), Some(l)) = (w, l) {
                    let (changes, kept_apart) = self.identity.link(&w, &l);
                    let evidence = serde_json::json!({"site_winner": w, "site_loser": l, "person_merge_log": ev.uuid});
                    if kept_apart {
                        refused = Some(([w.clone(), l.clone()], evidence.clone()));
                    }
                    pending_merges.extend(changes.into_iter().map(|c| (c, "site_merge", evidence.clone())));
                    self.facts.push(Fact::Link { a: w, b: l });
                }
            }
            _ => {}
        }

        // Merges first: the change that caused them follows, already canonical.
        for (c, reason, evidence) in pending_merges {
            self.changed(c, reason, evidence, "", &ev.site, ts, out);
        }
        if let Some((records, evidence)) = refused {
            self.kept_apart(records, evidence, &ev.site, ts, out);
        }
        if let Some(f) = review {
            self.review_identifier(f, &ev.site, ts, out);
        }

        self.near_misses(&ev, row.as_ref(), holder, ts, out);

        let mut origin_refs = Vec::new();
        // A merge log row keeps its own winner and loser.
        if ev.table_str() != "person_merge_log" {
            for (col, v) in ev.refs.0.iter_mut() {
                if let J::String(u) = v {
                    if let Some(c) = self.identity.survivor_if_other(u) {
                        origin_refs.push((col.clone(), std::mem::replace(u, c)));
                    }
                }
            }
        }
        let person = match ev.table_str() {
            "person" | "patient" => ev.uuid.as_deref().map(|u| self.identity.canonical(u)),
            _ => ["patient_id", "person_id"].iter().find_map(|c| ev.refs.get(c).and_then(J::as_str).map(str::to_string)),
        };
        out.push(Out::Change { late, person, origin_refs, event: ev });
    }

    /// Keeps the near-miss index up to date with a person or preferred name row (`row`, parsed
    /// by [`Engine::emit`]) or a record that now holds an identifier (`holder`), and suggests
    /// every record of another clinic it now matches that no merge joined.
    fn near_misses(&mut self, ev: &InEvent, row: Option<&serde_json::Map<String, J>>, holder: Option<String>, ts: i64, out: &mut Vec<Out>) {
        if ev.op == Op::Delete {
            return;
        }
        let get = |c: &str| row.and_then(|r| r.get(c)).and_then(J::as_str).map(str::trim).filter(|v| !v.is_empty());
        let flag = |c: &str| row.and_then(|r| r.get(c)).and_then(J::as_i64).unwrap_or(0) == 1;
        let (person, part, value) = match ev.table_str() {
            "person" => match (ev.uuid.as_deref(), get("gender"), get("birthdate")) {
                (Some(u), Some(g), Some(b)) if !flag("voided") => (u.to_string(), "sb", format!("{g}|{}", b.get(..10).unwrap_or(b))),
                _ => return,
            },
            "person_name" => match (ev.refs.get("person_id").and_then(J::as_str), get("family_name")) {
                (Some(u), Some(f)) if flag("preferred") && !flag("voided") => (u.to_string(), "n", format!("{} {f}", get("given_name").unwrap_or(""))),
                _ => return,
            },
            _ => match holder {
                Some(u) => (u, "", String::new()),
                None => return,
            },
        };
        let rec = self.identity.record(&person);
        let found = match part {
            "sb" => self.near.set(rec, &ev.site, Part::SexBirth(&value)),
            "n" => self.near.set(rec, &ev.site, Part::Name(&value)),
            _ => self.near.holds_identifier(rec),
        };
        let Some(found) = found else { return };
        let fact = if part.is_empty() { Fact::Holds { uuid: person } } else { Fact::Demo { uuid: person, part: part.into(), value, site: ev.site.to_string() } };
        self.facts.push(fact);
        for other in found {
            if self.identity.same_component(rec, other) {
                continue;
            }
            let (a, b) = if self.identity.uuid_of(rec) < self.identity.uuid_of(other) { (rec, other) } else { (other, rec) };
            let records = vec![self.identity.uuid_of(a).to_string(), self.identity.uuid_of(b).to_string()];
            out.push(Out::Hq(Box::new(HqEvent::IdentityReview {
                review_id: review::review_id(&["near_miss", &records[0], &records[1]]),
                reason: review::NEAR_MISS.into(),
                status: review::SUGGESTED.into(),
                person: self.identity.canonical(&records[0]),
                evidence: self.near.evidence(a, b),
                records,
                site: ev.site.to_string(),
                ts_ms: ts,
                decided: None,
            })));
        }
    }

    /// A data manager's decision on a review (`omrs.identity.decisions`): the review again,
    /// with the status the decision gives it, for both sinks. Err: not a decision this version
    /// knows (the runner dead-letters it).
    pub fn decide(&mut self, d: review::Decision, out: &mut Vec<Out>) -> Result<(), String> {
        let status = d.status()?;
        if d.review_id.is_empty() {
            return Err("decision without a review_id".into());
        }
        tracing::info!(review = %d.review_id, status, by = %d.decided.by, "identity review decided");
        if status == review::SPLIT {
            for c in self.identity.keep_apart(&d.keep, &d.other) {
                self.changed(c, "survivor_change", J::Null, &d.review_id, &d.site, d.ts_ms, out);
            }
            self.facts.push(Fact::Apart { review_id: d.review_id.clone(), keep: d.keep.clone(), other: d.other.clone() });
        }
        out.push(Out::Hq(Box::new(HqEvent::IdentityReview {
            person: self.identity.canonical(&d.person),
            review_id: d.review_id,
            reason: d.reason,
            status: status.into(),
            records: d.records,
            evidence: d.evidence,
            site: d.site,
            ts_ms: d.ts_ms,
            decided: Some(d.decided),
        })));
        Ok(())
    }

    /// Watermark facts for the changelog.
    pub fn watermark_facts(&self) -> Vec<Fact> {
        self.sites.iter().map(|(s, st)| Fact::Watermark { site: s.clone(), max_ts: st.max_ts }).collect()
    }
}

/// An identifier of a merged person that stopped holding at its site: what its review says.
struct Finding {
    reason: &'static str,
    record: String,
    type_uuid: String,
    value: String,
    evidence: J,
}

/// A raw row image as a map (only for the rows identity reads).
fn row_map(raw: Option<&[u8]>) -> Option<serde_json::Map<String, J>> {
    raw.and_then(|r| serde_json::from_slice(r).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(site: &str, id: u32, ts: i64) -> (InEvent, Origin) {
        let json = format!(
            r#"{{"op":"c","site":"{site}","table":"location","key":{{"location_id":{id}}},"uuid":"{site}-{id}","after":{{"location_id":{id}}},"source":{{"server_id":1,"file":"f","pos":{id},"ts_ms":{ts}}},"ts_ms":0}}"#
        );
        let site: Arc<str> = Arc::from(site);
        let topic: Arc<str> = Arc::from(format!("omrs.cdc.{site}"));
        (InEvent::decode(json.as_bytes(), &site, &topic).unwrap(), Origin { topic, partition: 0, offset: id as i64 })
    }

    /// A snapshot row of site-a at `offset`.
    fn snapshot_row(offset: i64, ts: i64) -> (InEvent, Origin) {
        let json = format!(
            r#"{{"op":"r","site":"site-a","table":"location","key":{{"location_id":{offset}}},"uuid":"s-{offset}","after":{{"location_id":{offset}}},"source":{{"server_id":1,"file":"f","pos":4,"ts_ms":{ts},"snapshot":true}},"ts_ms":0}}"#
        );
        let site: Arc<str> = Arc::from("site-a");
        let topic: Arc<str> = Arc::from("omrs.cdc.site-a");
        (InEvent::decode(json.as_bytes(), &site, &topic).unwrap(), Origin { topic, partition: 0, offset })
    }

    fn engine(sites: &[&str], ooo: i64, ahead: i64) -> Engine {
        let cfg = EngineConfig { out_of_orderness_ms: ooo, idle_timeout_ms: 1_000_000_000, max_clock_ahead_ms: ahead, identifiers: vec![], sites: Default::default() };
        let mut e = Engine::new(cfg);
        for s in sites {
            e.expect_site(s, 0);
        }
        e
    }

    fn keys(out: &[Out]) -> Vec<String> {
        out.iter().map(|o| o.key()).collect()
    }

    fn late(out: &[Out]) -> Vec<bool> {
        out.iter().map(|o| matches!(o, Out::Change { late: true, .. })).collect()
    }

    /// Every event comes out when it arrives, in arrival order, though site-c never speaks and
    /// holds the watermark where it was: nothing waits for another site.
    #[test]
    fn every_event_is_emitted_on_arrival_whatever_the_other_sites_do() {
        let mut e = engine(&["site-a", "site-b", "site-c"], 0, 1_000_000);
        let input = [("site-b", 1, 10), ("site-a", 2, 30), ("site-b", 3, 5), ("site-a", 4, 20), ("site-b", 5, 40)];
        for (s, id, ts) in input {
            let (ev, o) = ev(s, id, ts);
            let out = e.push(ev, o, 100);
            assert_eq!(keys(&out), [format!("location:{s}-{id}")], "out at once");
            assert_eq!(late(&out), [false]);
        }
        assert_eq!(e.global_watermark(), i64::MIN, "site-c has not spoken: nothing is complete yet");
        // site-b's 5 after its 10, site-a's 20 after its 30: each site's time never goes back.
        assert_eq!((e.sites["site-a"].max_ts, e.sites["site-b"].max_ts), (30, 40));
        e.push(ev("site-c", 6, 25).0, ev("site-c", 6, 25).1, 100);
        assert_eq!(e.global_watermark(), 25, "the minimum over the sites");
    }

    /// A binlog event older than the watermark when it arrives is late; a snapshot row never is
    /// (it states the site's content, not history).
    #[test]
    fn an_event_behind_the_watermark_is_late_and_a_snapshot_row_never_is() {
        let mut e = engine(&["site-a", "site-b"], 1_000, 1_000_000);
        e.push(ev("site-a", 1, 50_000).0, ev("site-a", 1, 50_000).1, 100);
        e.push(ev("site-b", 2, 60_000).0, ev("site-b", 2, 60_000).1, 100);
        assert_eq!(e.global_watermark(), 49_000);
        // A site nobody configured, three days behind: late, and counted.
        let (old, o) = ev("site-x", 3, 10_000);
        assert_eq!(late(&e.push(old, o, 100)), [true]);
        assert_eq!(e.late_events.get("site-x"), Some(&1));
        let (row, o) = snapshot_row(4, 10_000);
        assert_eq!(late(&e.push(row, o, 100)), [false]);
        // site-a's own next event, with its clock stepped back: its effective time is 50,000.
        assert_eq!(late(&e.push(ev("site-a", 5, 40_000).0, ev("site-a", 5, 40_000).1, 100)), [false]);
    }

    /// A clock that jumps a day forward moves its site's time to processing time plus the
    /// allowance, not a day ahead: when the other site goes idle, the watermark does not leap
    /// and make everyone else's events late.
    #[test]
    fn a_clock_that_jumps_forward_is_capped_at_processing_time() {
        let now = 1_000_000;
        let mut e = engine(&["site-a", "site-b"], 0, 5_000);
        let day = 86_400_000;
        e.push(ev("site-a", 1, now + day).0, ev("site-a", 1, now + day).1, now);
        assert_eq!(e.sites["site-a"].max_ts, now + 5_000);
        assert_eq!(e.sites["site-a"].clock_ahead_ms, day);
        assert_eq!(e.clock_capped.get("site-a"), Some(&1));
        e.push(ev("site-b", 2, now - 1_000).0, ev("site-b", 2, now - 1_000).1, now);
        assert_eq!(e.global_watermark(), now - 1_000);
        // The clock is set right again: the site's time stays where the cap left it.
        e.push(ev("site-a", 3, now + 100).0, ev("site-a", 3, now + 100).1, now + 100);
        assert_eq!((e.sites["site-a"].max_ts, e.sites["site-a"].clock_ahead_ms), (now + 5_000, 0));
    }

    /// Ranges handled past the commit point by a version that buffered events (issue #22, hole
    /// 3) still count after an upgrade: the records in them are skipped when read again, and the
    /// ranges go once committed past, as an empty list in the compacted changelog.
    #[test]
    fn ranges_emitted_ahead_by_an_earlier_version_are_skipped_and_go_once_committed() {
        let topic: Arc<str> = Arc::from("omrs.cdc.site-a");
        let at = |offset: i64| Origin { topic: topic.clone(), partition: 0, offset };
        let ranges = |facts: Vec<Fact>| -> Vec<Vec<(i64, i64)>> {
            facts.into_iter().filter_map(|f| if let Fact::Emitted { ranges, .. } = f { Some(ranges) } else { None }).collect()
        };
        let mut e = engine(&["site-a", "site-b"], 0, 1_000_000);
        e.restore(Fact::Emitted { topic: topic.to_string(), partition: 0, ranges: vec![(1, 4), (6, 7)] });
        let handled: Vec<i64> = (0..=8).filter(|&o| e.already_handled(&at(o))).collect();
        assert_eq!(handled, [1, 2, 3, 4, 6, 7]);
        let mut again = Vec::new();
        for o in 0..=8 {
            let (row, _) = snapshot_row(o, 20_000);
            again.extend(e.push(row, at(o), 2));
        }
        assert_eq!(keys(&again), ["location:s-0", "location:s-5", "location:s-8"]);
        assert!(e.take_facts().iter().all(|f| !matches!(f, Fact::Emitted { .. })), "this version writes no ranges of its own");
        e.committing("omrs.cdc.site-a", 0, 5);
        assert_eq!(ranges(e.take_facts()), [vec![(6, 7)]]);
        e.committing("omrs.cdc.site-a", 0, 9);
        let facts = e.take_facts();
        assert_eq!(ranges(facts.clone()), [Vec::<(i64, i64)>::new()]);
        let mut e2 = engine(&["site-a"], 0, 1_000_000);
        for f in facts {
            e2.restore(f);
        }
        assert!((0..=8).all(|o| !e2.already_handled(&at(o))));
    }
}
