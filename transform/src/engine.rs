//! The transform's logic, free of Kafka: per-site watermarks with idle detection, the ordered
//! merge buffer, late data, and patient identity. Time is passed in (`now_ms`), so golden tests
//! drive it with a scripted clock.
//!
//! Ordering: every event gets an *effective* event time, the running maximum of its site's
//! `source.ts_ms`, so a site's order is never broken even if its clock steps back. Events are
//! released in (effective time, site, arrival sequence) order once the global watermark — the
//! minimum over active sites of (latest time − out-of-orderness) — reaches them. An event that
//! arrives already older than the global watermark is emitted at once and marked late.
//!
//! Identity is applied at *emission*, in output order, so the identity state always matches
//! exactly what has been emitted (which makes "commit offsets up to what was emitted" a correct
//! crash-recovery rule).
//!
//! A record emitted at once (a snapshot row, a late event) or dead-lettered while an earlier
//! offset of its partition is still buffered lies past the committed offset. Those offsets are
//! kept as ranges per partition and written as a fact ([`Fact::Emitted`]) with the emission, so
//! that after a restart the re-read records are skipped instead of emitted a second time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use omrs_core::config::IdentifierRule;
use omrs_core::envelope::Op;
use omrs_core::zone::SiteRules;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

pub use crate::event::{InEvent, Out, Refs};
use crate::identity::{Identity, Merged};

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
    pub max_buffered: usize,
    pub identifiers: Vec<IdentifierRule>,
    /// Each site's time zone: registration times are compared in UTC.
    pub sites: SiteRules,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteState {
    /// Running maximum of the site's event times.
    pub max_ts: i64,
    /// Processing time the site was last heard from.
    pub last_seen: i64,
    pub idle: bool,
    pub buffered: usize,
}

struct Pending {
    /// Effective event time: the site's running maximum, so non-decreasing within a site.
    time: i64,
    ev: InEvent,
    origin: Origin,
    bytes: usize,
}

/// One site's buffered events in arrival order, which is also their release order: effective
/// times never decrease within a site, and ties keep arrival order.
struct SiteQueue {
    site: Arc<str>,
    q: VecDeque<Pending>,
}

/// A fact for the state changelog (`omrs.transform.state`): replaying all of them rebuilds the
/// identity index and the watermarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Fact {
    Person { uuid: String, created: Option<String> },
    Identifier { type_idx: u16, value: String, person: String },
    Link { a: String, b: String },
    Watermark { site: String, max_ts: i64 },
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
            Fact::Watermark { site, .. } => format!("w:{site}"),
            Fact::Emitted { topic, partition, .. } => format!("e:{topic}:{partition}"),
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    pub sites: BTreeMap<String, SiteState>,
    /// The ordered merge: one FIFO per site, merged on release by (effective time, site name).
    /// This is the order of a single heap keyed by (time, site, arrival), without its cost.
    queues: Vec<SiteQueue>,
    buffered_events: usize,
    /// Offsets still buffered, per (topic, partition), in arrival order. A site's events are
    /// released in arrival order, so the front is always the first one not yet emitted.
    buffered_offsets: BTreeMap<(Arc<str>, i32), VecDeque<i64>>,
    /// Per (topic, partition): ascending, disjoint offset ranges (inclusive) handled past the
    /// commit point, i.e. while an earlier offset of the partition was buffered. A record read
    /// again in one of them is skipped. Only partitions with ranges are present.
    ahead: BTreeMap<Partition, Vec<(i64, i64)>>,
    /// Partitions whose ranges changed since the last `take_facts`.
    ahead_changed: BTreeSet<Partition>,
    buffered_bytes: usize,
    pub identity: Identity,
    global_wm: i64,
    /// Facts produced since the last `take_facts`.
    facts: Vec<Fact>,
    pub late_events: BTreeMap<String, u64>,
    pub merges: u64,
    pub reviews: u64,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Engine {
            cfg,
            sites: BTreeMap::new(),
            queues: Vec::new(),
            buffered_events: 0,
            buffered_offsets: BTreeMap::new(),
            ahead: BTreeMap::new(),
            ahead_changed: BTreeSet::new(),
            buffered_bytes: 0,
            identity: Identity::default(),
            global_wm: i64::MIN,
            facts: Vec::new(),
            late_events: BTreeMap::new(),
            merges: 0,
            reviews: 0,
        }
    }

    pub fn global_watermark(&self) -> i64 {
        self.global_wm
    }

    pub fn buffered(&self) -> (usize, usize) {
        (self.buffered_events, self.buffered_bytes)
    }

    pub fn is_full(&self) -> bool {
        self.buffered_events >= self.cfg.max_buffered
    }

    /// The smallest buffered offset per (topic, partition): what must not be committed past.
    pub fn pending_offsets(&self) -> BTreeMap<(String, i32), i64> {
        self.buffered_offsets.iter().filter_map(|((t, p), q)| q.front().map(|&o| ((t.to_string(), *p), o))).collect()
    }

    /// Declares a site (from the config): until it speaks or its idle timeout passes, it holds
    /// the global watermark back, so its first events are not mistaken for late ones.
    pub fn expect_site(&mut self, site: &str, now_ms: i64) {
        self.sites.entry(site.to_string()).or_insert(SiteState { max_ts: i64::MIN / 2, last_seen: now_ms, idle: false, buffered: 0 });
    }

    /// A site we are not reading (paused for back-pressure) is not idle.
    pub fn touch(&mut self, site: &str, now_ms: i64) {
        if let Some(s) = self.sites.get_mut(site) {
            s.last_seen = now_ms;
        }
    }

    /// Restores a fact from the changelog (no output).
    pub fn restore(&mut self, fact: Fact) {
        match fact {
            Fact::Person { uuid, created } => {
                self.identity.person(&uuid, created.as_deref());
            }
            Fact::Identifier { type_idx, value, person } => {
                if let Some(other) = self.identity.identifier(type_idx, &value, &person) {
                    self.identity.union(&person, &other);
                }
            }
            Fact::Link { a, b } => {
                self.identity.union(&a, &b);
            }
            Fact::Watermark { site, max_ts } => {
                let s = self.sites.entry(site).or_default();
                s.max_ts = s.max_ts.max(max_ts);
            }
            Fact::Emitted { topic, partition, ranges } => {
                let key = (Arc::from(topic), partition);
                if ranges.is_empty() {
                    self.ahead.remove(&key);
                } else {
                    tracing::info!(topic = %key.0, partition, ranges = ranges.len(), "offsets emitted past the commit point: skipped when read again");
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
    /// commit point before a restart. The runner skips it (and does not dead-letter it again).
    pub fn already_handled(&self, origin: &Origin) -> bool {
        if self.ahead.is_empty() {
            return false;
        }
        self.ahead
            .get(&(origin.topic.clone(), origin.partition))
            .is_some_and(|r| r.iter().any(|&(a, b)| a <= origin.offset && origin.offset <= b))
    }

    /// The runner dead-lettered the record at `origin` (it never reaches the engine): past the
    /// commit point, it is remembered like an emitted record, so it is not dead-lettered again.
    pub fn dead_lettered(&mut self, origin: &Origin) {
        self.handled_at_once(origin);
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

    /// A record handled at once (emitted or dead-lettered) rather than buffered. When an earlier
    /// offset of its partition is still buffered, the commit stops there, so the record's offset
    /// joins the partition's emitted-ahead ranges. It extends the last range when no offset in
    /// between is buffered (offsets in between that were never delivered, such as transaction
    /// markers, or were handled, may be skipped safely); a snapshot is one range.
    fn handled_at_once(&mut self, origin: &Origin) {
        let key = (origin.topic.clone(), origin.partition);
        let Some(buffered) = self.buffered_offsets.get(&key) else { return };
        let (Some(&first), Some(&last)) = (buffered.front(), buffered.back()) else { return };
        if first >= origin.offset {
            return;
        }
        let o = origin.offset;
        let ranges = self.ahead.entry(key.clone()).or_default();
        // Usually past every range; below one only when ranges restored after a restart lie
        // ahead of what is read again. Every buffered offset is below `o`, the newest read.
        let i = ranges.partition_point(|&(a, _)| a <= o);
        match i.checked_sub(1).map(|j| &mut ranges[j]) {
            Some(prev) if prev.1 >= o => return,
            Some(prev) if last < prev.1 => prev.1 = o,
            _ => ranges.insert(i, (o, o)),
        }
        self.ahead_changed.insert(key);
    }

    /// Takes one input event. Returns what can be emitted now.
    pub fn push(&mut self, ev: InEvent, origin: Origin, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        self.push_into(ev, origin, now_ms, &mut out);
        out
    }

    /// [`Engine::push`], appending to `out`.
    pub fn push_into(&mut self, ev: InEvent, origin: Origin, now_ms: i64, out: &mut Vec<Out>) {
        if self.already_handled(&origin) {
            // Emitted before a restart, past the committed offset: its effects on the site's
            // time, identity and aggregates were committed with it.
            return;
        }
        let st = match self.sites.get_mut(&*ev.site) {
            Some(st) => st,
            None => self.sites.entry(ev.site.to_string()).or_default(),
        };
        let time = st.max_ts.max(ev.source.ts_ms);
        st.max_ts = time;
        st.last_seen = now_ms;
        if st.idle {
            st.idle = false;
            tracing::info!(site = %ev.site, "site active again");
        }
        if ev.op == Op::Heartbeat {
            self.advance(now_ms, out);
            return;
        }
        if ev.op == Op::Read {
            // A snapshot row states the site's content as of its snapshot: every row of it
            // carries the same time, so ordering it by time would hold the whole snapshot in
            // memory until the site's binlog moves past it (a national cold start is millions of
            // rows). Its order carries no information: the sinks pick winners by the conflict
            // rule, not by arrival, and identity does not depend on order (semantics 4). So it is
            // emitted at once, never late; only binlog events are merged in event-time order.
            self.handled_at_once(&origin);
            self.emit(ev, false, out);
            self.advance(now_ms, out);
            return;
        }
        if time < self.global_wm {
            // Late: older than what has already been released. Emitted at once.
            match self.late_events.get_mut(&*ev.site) {
                Some(n) => *n += 1,
                None => {
                    self.late_events.insert(ev.site.to_string(), 1);
                }
            }
            self.handled_at_once(&origin);
            self.emit(ev, true, out);
            self.advance(now_ms, out);
            return;
        }
        let bytes = ev.approx_bytes();
        self.buffered_bytes += bytes;
        self.buffered_events += 1;
        st.buffered += 1;
        let key = (origin.topic.clone(), origin.partition);
        match self.buffered_offsets.get_mut(&key) {
            Some(q) => q.push_back(origin.offset),
            None => {
                self.buffered_offsets.insert(key, VecDeque::from([origin.offset]));
            }
        }
        let qi = match self.queues.iter().position(|q| q.site == ev.site) {
            Some(i) => i,
            None => {
                self.queues.push(SiteQueue { site: ev.site.clone(), q: VecDeque::new() });
                self.queues.len() - 1
            }
        };
        self.queues[qi].q.push_back(Pending { time, ev, origin, bytes });
        self.advance(now_ms, out);
    }

    /// Idle detection and release, driven by the clock alone.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Out> {
        let mut out = Vec::new();
        self.advance(now_ms, &mut out);
        out
    }

    /// Releases everything buffered, in order (end of input in tests and batch runs).
    pub fn drain(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        while let Some(p) = self.pop_next(i64::MAX) {
            self.release(p, &mut out);
        }
        out
    }

    /// The next event in merge order, if its time is at most `wm`: the smallest
    /// (effective time, site name) among the queue fronts.
    fn pop_next(&mut self, wm: i64) -> Option<Pending> {
        let mut best: Option<(usize, i64)> = None;
        for (i, q) in self.queues.iter().enumerate() {
            let Some(f) = q.q.front() else { continue };
            if f.time > wm {
                continue;
            }
            best = match best {
                Some((b, t)) if t < f.time || (t == f.time && self.queues[b].site <= q.site) => Some((b, t)),
                _ => Some((i, f.time)),
            };
        }
        let (i, _) = best?;
        self.queues[i].q.pop_front()
    }

    fn advance(&mut self, now_ms: i64, out: &mut Vec<Out>) {
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
            // Every site idle: release everything seen.
            wm = self.sites.values().map(|s| s.max_ts).max().unwrap_or(i64::MIN);
        }
        if wm > self.global_wm && wm > i64::MIN / 4 {
            self.global_wm = wm;
        }
        if self.buffered_events == 0 {
            return;
        }
        while let Some(p) = self.pop_next(self.global_wm) {
            self.release(p, out);
        }
    }

    fn release(&mut self, p: Pending, out: &mut Vec<Out>) {
        if let Some(q) = self.buffered_offsets.get_mut(&(p.origin.topic, p.origin.partition)) {
            if q.front() == Some(&p.origin.offset) {
                q.pop_front();
            } else if let Some(i) = q.iter().position(|&o| o == p.origin.offset) {
                q.remove(i);
            }
        }
        self.buffered_bytes = self.buffered_bytes.saturating_sub(p.bytes);
        self.buffered_events = self.buffered_events.saturating_sub(1);
        if let Some(s) = self.sites.get_mut(&*p.ev.site) {
            s.buffered = s.buffered.saturating_sub(1);
        }
        self.emit(p.ev, false, out);
    }

    fn rule_of(&self, type_uuid: &str) -> Option<(u16, &IdentifierRule)> {
        self.cfg.identifiers.iter().enumerate().find(|(_, r)| r.identifier_type_uuid == type_uuid).map(|(i, r)| (i as u16, r))
    }

    fn merged(&mut self, m: Merged, reason: &str, evidence: J, site: &str, ts: i64, out: &mut Vec<Out>) {
        self.merges += 1;
        out.push(Out::Hq(Box::new(HqEvent::Merge { winner: m.winner, loser: m.loser, reason: reason.into(), evidence, site: site.into(), ts_ms: ts })));
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
        let mut pending_merges: Vec<(Merged, &'static str, J)> = Vec::new();
        let mut review: Option<(String, J)> = None;

        match ev.table_str() {
            "person" if alive => {
                if let Some(uuid) = ev.uuid.clone() {
                    // The few identity rows are parsed in full; every other row stays raw.
                    let row = row_map(ev.after_raw().or(ev.before_raw()));
                    let created = row
                        .as_ref()
                        .and_then(|r| r.get("date_created"))
                        .and_then(J::as_str)
                        .map(|c| self.in_utc(&ev.site, c));
                    if let Some(m) = self.identity.person(&uuid, created.as_deref()) {
                        pending_merges.push((
                            m,
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
                let row = row_map(ev.after_raw().or(ev.before_raw()));
                let raw = row.as_ref().and_then(|r| r.get("identifier")).and_then(J::as_str).map(str::to_string);
                if let (Some((ti, rule)), Some(person), Some(raw)) = (self.rule_of(&type_uuid), person, raw) {
                    let value = rule.normalize(&raw);
                    let was_voided = row_map(ev.before_raw()).and_then(|r| r.get("voided").and_then(J::as_i64)).unwrap_or(0) == 1;
                    let voided = row.as_ref().and_then(|r| r.get("voided")).and_then(J::as_i64).unwrap_or(0) == 1;
                    if !value.is_empty() && alive && !voided {
                        if let Some(other) = self.identity.identifier(ti, &value, &person) {
                            if let Some(m) = self.identity.union(&person, &other) {
                                let evidence = serde_json::json!({"identifier_type": type_uuid, "value": value, "records": [other, person]});
                                pending_merges.push((m, "identifier", evidence));
                            }
                            self.facts.push(Fact::Link { a: other, b: person.clone() });
                        } else {
                            self.facts.push(Fact::Identifier { type_idx: ti, value, person: person.clone() });
                        }
                    } else if (!alive || (voided && !was_voided)) && self.identity.component_size(&person) > 1 {
                        review = Some((
                            self.identity.canonical(&person),
                            serde_json::json!({"identifier_type": type_uuid, "value": value, "record": person, "op": ev.op.as_str()}),
                        ));
                    }
                }
            }
            "person_merge_log" if ev.op == Op::Create || ev.op == Op::Read => {
                let w = ev.refs.get("winner_person_id").and_then(J::as_str).map(str::to_string);
                let l = ev.refs.get("loser_person_id").and_then(J::as_str).map(str::to_string);
                if let (Some(w), Some(l)) = (w, l) {
                    if let Some(m) = self.identity.union(&w, &l) {
                        pending_merges.push((m, "site_merge", serde_json::json!({"site_winner": w, "site_loser": l, "person_merge_log": ev.uuid})));
                    }
                    self.facts.push(Fact::Link { a: w, b: l });
                }
            }
            _ => {}
        }

        // Merges first: the change that caused them follows, already canonical.
        for (m, reason, evidence) in pending_merges {
            self.merged(m, reason, evidence, &ev.site, ts, out);
        }
        if let Some((person, evidence)) = review {
            self.reviews += 1;
            out.push(Out::Hq(Box::new(HqEvent::IdentityReview { person, reason: "identifier voided or deleted on a merged person".into(), evidence, site: ev.site.to_string(), ts_ms: ts })));
        }

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

    /// Watermark facts for the changelog.
    pub fn watermark_facts(&self) -> Vec<Fact> {
        self.sites.iter().map(|(s, st)| Fact::Watermark { site: s.clone(), max_ts: st.max_ts }).collect()
    }
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

    /// Release order is (effective time, site name, arrival), as with a single ordered heap.
    #[test]
    fn ties_go_by_site_name_then_arrival_and_a_site_never_goes_back() {
        let cfg = EngineConfig {
            out_of_orderness_ms: 0,
            idle_timeout_ms: 1_000_000,
            max_buffered: 100,
            identifiers: vec![],
            sites: Default::default(),
        };
        let mut e = Engine::new(cfg);
        for s in ["site-a", "site-b", "site-c"] {
            e.expect_site(s, 0);
        }
        let input = [("site-c", 1, 10), ("site-b", 2, 10), ("site-b", 3, 5), ("site-a", 4, 10), ("site-a", 5, 20), ("site-c", 6, 10)];
        let mut out = Vec::new();
        for (s, id, ts) in input {
            let (ev, o) = ev(s, id, ts);
            out.extend(e.push(ev, o, 1));
        }
        out.extend(e.drain());
        let order: Vec<String> = out.iter().map(|o| o.key()).collect();
        // site-b's ts 5 after its 10 takes the effective time 10; site-a's 20 comes last.
        assert_eq!(order, ["location:site-a-4", "location:site-b-2", "location:site-b-3", "location:site-c-1", "location:site-c-6", "location:site-a-5"]);
        assert!(e.pending_offsets().is_empty());
    }

    /// Snapshot rows pass straight through (a snapshot is millions of rows with one time);
    /// binlog events still wait for the watermark.
    #[test]
    fn snapshot_rows_are_not_held_for_the_watermark() {
        let cfg = EngineConfig {
            out_of_orderness_ms: 2000,
            idle_timeout_ms: 1_000_000,
            max_buffered: 100,
            identifiers: vec![],
            sites: Default::default(),
        };
        let mut e = Engine::new(cfg);
        for s in ["site-a", "site-b"] {
            e.expect_site(s, 0);
        }
        let site: Arc<str> = Arc::from("site-a");
        let topic: Arc<str> = Arc::from("omrs.cdc.site-a");
        let mut out = Vec::new();
        for id in 1..=3 {
            let json = format!(
                r#"{{"op":"r","site":"site-a","table":"location","key":{{"location_id":{id}}},"uuid":"s-{id}","after":{{"location_id":{id}}},"source":{{"server_id":1,"file":"f","pos":4,"ts_ms":10000,"snapshot":true}},"ts_ms":0}}"#
            );
            let ev = InEvent::decode(json.as_bytes(), &site, &topic).unwrap();
            out.extend(e.push(ev, Origin { topic: topic.clone(), partition: 0, offset: id }, 1));
        }
        let (live, o) = ev("site-a", 9, 10500);
        out.extend(e.push(live, o, 1));
        let keys: Vec<String> = out.iter().map(|o| o.key()).collect();
        assert_eq!(keys, ["location:s-1", "location:s-2", "location:s-3"], "snapshot rows out at once, the binlog event waits");
        assert!(out.iter().all(|o| matches!(o, Out::Change { late: false, .. })));
        assert_eq!(e.buffered().0, 1);
        assert_eq!(e.pending_offsets().len(), 1, "only the binlog event holds its offset back");
    }

    /// A snapshot row of site-a at `offset` (a patient, so that it counts in the aggregates).
    fn snapshot_row(offset: i64) -> (InEvent, Origin) {
        let json = format!(
            r#"{{"op":"r","site":"site-a","table":"patient","key":{{"patient_id":{offset}}},"uuid":"p-{offset}","after":{{"patient_id":{offset},"date_created":"2024-03-01 10:00:00","voided":0}},"source":{{"server_id":1,"file":"f","pos":4,"ts_ms":20000,"snapshot":true}},"ts_ms":0}}"#
        );
        let site: Arc<str> = Arc::from("site-a");
        let topic: Arc<str> = Arc::from("omrs.cdc.site-a");
        (InEvent::decode(json.as_bytes(), &site, &topic).unwrap(), Origin { topic, partition: 0, offset })
    }

    /// Site-a's binlog event at offset 0, then its snapshot rows at 1..=3 (a resnapshot).
    fn resnapshot_input() -> Vec<(InEvent, Origin)> {
        let mut v = vec![ev("site-a", 0, 10_000)];
        v.extend((1..=3).map(snapshot_row));
        v
    }

    fn two_sites() -> Engine {
        let cfg = EngineConfig {
            out_of_orderness_ms: 0,
            idle_timeout_ms: 1_000_000_000,
            max_buffered: 100,
            identifiers: vec![],
            sites: Default::default(),
        };
        let mut e = Engine::new(cfg);
        for s in ["site-a", "site-b"] {
            e.expect_site(s, 0);
        }
        e
    }

    fn keys(out: &[Out]) -> Vec<String> {
        out.iter().map(|o| o.key()).collect()
    }

    /// Issue #22, hole 3: snapshot rows emitted while an earlier binlog event of their partition
    /// is still buffered lie past the committed offset. After a restart they are read again, and
    /// must not be emitted (nor counted) a second time.
    #[test]
    fn snapshot_rows_emitted_past_the_commit_point_are_not_emitted_again_after_a_restart() {
        use crate::aggregate::{AggFact, Aggregator};
        use omrs_core::config::WindowSpec;
        let spec = [WindowSpec::Fixed(86_400_000); 4];
        let registrations = |a: &Aggregator| a.snapshot().into_iter().filter(|(k, _)| k.0 == "daily_registrations").map(|(_, v)| v.0).sum::<i64>();

        // Site-b is silent and not yet idle: it holds the watermark, so site-a's binlog event
        // waits while its snapshot rows pass straight through.
        let mut e = two_sites();
        let mut agg = Aggregator::new(spec, 1);
        let mut out = Vec::new();
        for (ev, o) in resnapshot_input() {
            out.extend(e.push(ev, o, 1));
        }
        assert_eq!(keys(&out), ["patient:p-1", "patient:p-2", "patient:p-3"]);
        assert_eq!(e.pending_offsets(), BTreeMap::from([(("omrs.cdc.site-a".to_string(), 0), 0)]), "the commit stops at the buffered binlog event");
        for o in &out {
            agg.on_output(o);
        }
        let (_, agg_facts) = agg.flush(e.global_watermark(), 1, false);
        assert_eq!(registrations(&agg), 3);
        // The batch's transaction, as the runner writes it.
        let mut facts = e.take_facts();
        facts.extend(e.watermark_facts());

        // A crash; the restarted transform restores the state and reads from offset 0 again.
        let mut e2 = two_sites();
        for f in facts {
            e2.restore(f);
        }
        let mut agg2 = Aggregator::new(spec, 1);
        let mut latest: BTreeMap<String, AggFact> = BTreeMap::new();
        for f in agg_facts {
            latest.insert(f.key(), f);
        }
        for f in latest.into_values() {
            agg2.restore(f);
        }
        let mut again = Vec::new();
        for (ev, o) in resnapshot_input() {
            again.extend(e2.push(ev, o, 2));
        }
        assert_eq!(keys(&again), Vec::<String>::new(), "rows 1..=3 were emitted before the crash");
        assert_eq!(e2.pending_offsets(), BTreeMap::from([(("omrs.cdc.site-a".to_string(), 0), 0)]));
        // The binlog event was never emitted: it is, once, when site-b's watermark lets it go.
        again.extend(e2.drain());
        assert_eq!(keys(&again), ["location:site-a-0"]);
        for o in &again {
            agg2.on_output(o);
        }
        agg2.flush(e2.global_watermark(), 3, true);
        assert_eq!(registrations(&agg2), 3, "the snapshot rows are counted once");
    }

    /// The ranges: one per run of records handled at once, split where a buffered record lies
    /// between (it must be read again), across offsets never delivered (transaction markers),
    /// with dead letters; written as a fact when they change, dropped once committed past.
    #[test]
    fn emitted_ahead_ranges_split_at_buffered_offsets_and_go_once_committed() {
        let topic: Arc<str> = Arc::from("omrs.cdc.site-a");
        let at = |offset: i64| Origin { topic: topic.clone(), partition: 0, offset };
        let ranges = |facts: Vec<Fact>| -> Vec<Vec<(i64, i64)>> {
            facts.into_iter().filter_map(|f| if let Fact::Emitted { ranges, .. } = f { Some(ranges) } else { None }).collect()
        };
        let mut e = two_sites();
        // 0: binlog (waits); 1, 2, 4: snapshot rows (3 is a transaction marker); 5: binlog
        // (waits); 6: a dead letter; 7: a snapshot row.
        let mut out = e.push(ev("site-a", 0, 10_000).0, at(0), 1);
        for o in [1, 2, 4] {
            out.extend(e.push(snapshot_row(o).0, at(o), 1));
        }
        out.extend(e.push(ev("site-a", 5, 10_000).0, at(5), 1));
        e.dead_lettered(&at(6));
        out.extend(e.push(snapshot_row(7).0, at(7), 1));
        assert_eq!(keys(&out), ["patient:p-1", "patient:p-2", "patient:p-4", "patient:p-7"]);
        let facts = e.take_facts();
        assert_eq!(facts.iter().map(Fact::key).collect::<Vec<_>>(), ["e:omrs.cdc.site-a:0"]);
        assert_eq!(ranges(facts.clone()), [vec![(1, 4), (6, 7)]]);
        assert!(e.take_facts().is_empty(), "written once, until they change");

        let mut e2 = two_sites();
        for f in facts {
            e2.restore(f);
        }
        let handled: Vec<i64> = (0..=8).filter(|&o| e2.already_handled(&at(o))).collect();
        assert_eq!(handled, [1, 2, 3, 4, 6, 7], "the buffered binlog events 0 and 5 are read again");
        let mut again = e2.push(ev("site-a", 0, 10_000).0, at(0), 2);
        for o in [1, 2, 4] {
            again.extend(e2.push(snapshot_row(o).0, at(o), 2));
        }
        again.extend(e2.push(ev("site-a", 5, 10_000).0, at(5), 2));
        again.extend(e2.push(snapshot_row(7).0, at(7), 2));
        // A row the first run never read joins the last range.
        again.extend(e2.push(snapshot_row(8).0, at(8), 2));
        assert_eq!(keys(&again), ["patient:p-8"]);
        assert_eq!(ranges(e2.take_facts()), [vec![(1, 4), (6, 8)]]);

        // Offset 0 released: the commit moves to 5 and the first range can never be read again.
        e2.committing("omrs.cdc.site-a", 0, 5);
        assert_eq!(ranges(e2.take_facts()), [vec![(6, 8)]]);
        e2.committing("omrs.cdc.site-a", 0, 5);
        assert!(e2.take_facts().is_empty());
        e2.committing("omrs.cdc.site-a", 0, 9);
        let facts = e2.take_facts();
        assert_eq!(ranges(facts.clone()), [Vec::<(i64, i64)>::new()], "an empty list replaces the ranges in the compacted changelog");
        let mut e3 = two_sites();
        for f in facts {
            e3.restore(f);
        }
        assert!((0..=8).all(|o| !e3.already_handled(&at(o))));
    }
}
