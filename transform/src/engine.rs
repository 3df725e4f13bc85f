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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use omrs_core::config::IdentifierRule;
use omrs_core::envelope::{ChangeEvent, Op};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::identity::{Identity, Merged};

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

pub use omrs_core::hq::HqEvent;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub out_of_orderness_ms: i64,
    pub idle_timeout_ms: i64,
    pub max_buffered: usize,
    pub identifiers: Vec<IdentifierRule>,
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
    time: i64,
    /// The site name's first 8 bytes, big-endian: orders like the name, without touching it.
    prefix: u64,
    site: String,
    seq: u64,
    ev: ChangeEvent,
    origin: Origin,
    bytes: usize,
}

fn name_prefix(site: &str) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(site.bytes()) {
        *d = s;
    }
    u64::from_be_bytes(b)
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.time, self.prefix)
            .cmp(&(o.time, o.prefix))
            .then_with(|| if self.prefix == o.prefix && self.site != o.site { self.site.cmp(&o.site) } else { std::cmp::Ordering::Equal })
            .then(self.seq.cmp(&o.seq))
    }
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
}

impl Fact {
    /// The compaction key: the latest fact per key is all that is needed.
    pub fn key(&self) -> String {
        match self {
            Fact::Person { uuid, .. } => format!("p:{uuid}"),
            Fact::Identifier { type_idx, value, .. } => format!("i:{type_idx}:{value}"),
            Fact::Link { a, b } => format!("l:{a}:{b}"),
            Fact::Watermark { site, .. } => format!("w:{site}"),
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    pub sites: BTreeMap<String, SiteState>,
    /// Boxed: sifting the heap then moves pointers, not whole events.
    buffer: BinaryHeap<Reverse<Box<Pending>>>,
    /// Offsets still buffered, per (topic, partition), in arrival order. A site's events are
    /// released in arrival order, so the front is always the first one not yet emitted.
    buffered_offsets: BTreeMap<(String, i32), std::collections::VecDeque<i64>>,
    buffered_bytes: usize,
    seq: u64,
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
            buffer: BinaryHeap::new(),
            buffered_offsets: BTreeMap::new(),
            buffered_bytes: 0,
            seq: 0,
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
        (self.buffer.len(), self.buffered_bytes)
    }

    pub fn is_full(&self) -> bool {
        self.buffer.len() >= self.cfg.max_buffered
    }

    /// The smallest buffered offset per (topic, partition): what must not be committed past.
    pub fn pending_offsets(&self) -> BTreeMap<(String, i32), i64> {
        self.buffered_offsets.iter().filter_map(|(k, q)| q.front().map(|&o| (k.clone(), o))).collect()
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
        }
    }

    pub fn take_facts(&mut self) -> Vec<Fact> {
        std::mem::take(&mut self.facts)
    }

    /// Takes one input event. Returns what can be emitted now.
    pub fn push(&mut self, ev: ChangeEvent, origin: Origin, now_ms: i64) -> Vec<HqEvent> {
        let site = ev.site.clone();
        let st = self.sites.entry(site.clone()).or_default();
        let time = st.max_ts.max(ev.source.ts_ms);
        st.max_ts = time;
        st.last_seen = now_ms;
        if st.idle {
            st.idle = false;
            tracing::info!(site = %site, "site active again");
        }
        let mut out = Vec::new();
        if ev.op == Op::Heartbeat {
            self.advance(now_ms, &mut out);
            return out;
        }
        if time < self.global_wm {
            // Late: older than what has already been released. Emitted at once.
            *self.late_events.entry(site.clone()).or_default() += 1;
            self.emit(ev, true, &mut out);
            self.advance(now_ms, &mut out);
            return out;
        }
        self.seq += 1;
        let bytes = ev.before.as_ref().map_or(0, |r| r.len() * 48) + ev.after.as_ref().map_or(0, |r| r.len() * 48) + 256;
        self.buffered_bytes += bytes;
        if let Some(s) = self.sites.get_mut(&site) {
            s.buffered += 1;
        }
        self.buffered_offsets.entry((origin.topic.clone(), origin.partition)).or_default().push_back(origin.offset);
        let prefix = name_prefix(&site);
        self.buffer.push(Reverse(Box::new(Pending { time, prefix, site, seq: self.seq, ev, origin, bytes })));
        self.advance(now_ms, &mut out);
        out
    }

    /// Idle detection and release, driven by the clock alone.
    pub fn tick(&mut self, now_ms: i64) -> Vec<HqEvent> {
        let mut out = Vec::new();
        self.advance(now_ms, &mut out);
        out
    }

    /// Releases everything buffered, in order (end of input in tests and batch runs).
    pub fn drain(&mut self) -> Vec<HqEvent> {
        let mut out = Vec::new();
        while let Some(Reverse(p)) = self.buffer.pop() {
            self.release(p, &mut out);
        }
        out
    }

    fn advance(&mut self, now_ms: i64, out: &mut Vec<HqEvent>) {
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
        while let Some(Reverse(top)) = self.buffer.peek() {
            if top.time > self.global_wm {
                break;
            }
            let Some(Reverse(p)) = self.buffer.pop() else { break };
            self.release(p, out);
        }
    }

    fn release(&mut self, p: Box<Pending>, out: &mut Vec<HqEvent>) {
        let p = *p;
        if let Some(q) = self.buffered_offsets.get_mut(&(p.origin.topic.clone(), p.origin.partition)) {
            if let Some(i) = q.iter().position(|&o| o == p.origin.offset) {
                q.remove(i);
            }
        }
        self.buffered_bytes = self.buffered_bytes.saturating_sub(p.bytes);
        if let Some(s) = self.sites.get_mut(&p.site) {
            s.buffered = s.buffered.saturating_sub(1);
        }
        self.emit(p.ev, false, out);
    }

    fn rule_of(&self, type_uuid: &str) -> Option<(u16, &IdentifierRule)> {
        self.cfg.identifiers.iter().enumerate().find(|(_, r)| r.identifier_type_uuid == type_uuid).map(|(i, r)| (i as u16, r))
    }

    fn merged(&mut self, m: Merged, reason: &str, evidence: J, site: &str, ts: i64, out: &mut Vec<HqEvent>) {
        self.merges += 1;
        out.push(HqEvent::Merge { winner: m.winner, loser: m.loser, reason: reason.into(), evidence, site: site.into(), ts_ms: ts });
    }

    /// Applies identity, canonicalises person references and emits.
    fn emit(&mut self, mut ev: ChangeEvent, late: bool, out: &mut Vec<HqEvent>) {
        let table = ev.table.clone().unwrap_or_default();
        let site = ev.site.clone();
        let ts = ev.source.ts_ms;
        let alive = ev.op != Op::Delete;
        let row = ev.after.as_ref().or(ev.before.as_ref());
        let mut pending_merges: Vec<(Merged, &'static str, J)> = Vec::new();
        let mut review: Option<(String, J)> = None;

        match table.as_str() {
            "person" if alive => {
                if let Some(uuid) = ev.uuid.clone() {
                    let created = row.and_then(|r| r.get("date_created")).and_then(J::as_str).map(str::to_string);
                    if let Some(m) = self.identity.person(&uuid, created.as_deref()) {
                        pending_merges.push((m, "survivor_change", serde_json::json!({"earlier_record": uuid})));
                    }
                    self.facts.push(Fact::Person { uuid, created });
                }
            }
            "patient_identifier" => {
                let type_uuid = ev.refs.get("identifier_type").and_then(J::as_str).unwrap_or("").to_string();
                let person = ev.refs.get("patient_id").and_then(J::as_str).map(str::to_string);
                let raw = row.and_then(|r| r.get("identifier")).and_then(J::as_str).map(str::to_string);
                if let (Some((ti, rule)), Some(person), Some(raw)) = (self.rule_of(&type_uuid), person, raw) {
                    let value = rule.normalize(&raw);
                    let was_voided = ev.before.as_ref().and_then(|r| r.get("voided")).and_then(J::as_i64).unwrap_or(0) == 1;
                    let voided = row.and_then(|r| r.get("voided")).and_then(J::as_i64).unwrap_or(0) == 1;
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
            self.merged(m, reason, evidence, &site, ts, out);
        }
        if let Some((person, evidence)) = review {
            self.reviews += 1;
            out.push(HqEvent::IdentityReview { person, reason: "identifier voided or deleted on a merged person".into(), evidence, site: site.clone(), ts_ms: ts });
        }

        let mut origin_refs = serde_json::Map::new();
        // A merge log row keeps its own winner and loser.
        let canonicalise = table != "person_merge_log";
        for (col, v) in ev.refs.iter_mut().filter(|_| canonicalise) {
            if let Some(u) = v.as_str() {
                if self.identity.knows(u) {
                    let c = self.identity.canonical(u);
                    if c != u {
                        origin_refs.insert(col.clone(), J::String(u.to_string()));
                        *v = J::String(c);
                    }
                }
            }
        }
        let person = match table.as_str() {
            "person" | "patient" => ev.uuid.as_deref().map(|u| self.identity.canonical(u)),
            _ => ["patient_id", "person_id"].iter().find_map(|c| ev.refs.get(*c).and_then(J::as_str).map(str::to_string)),
        };
        out.push(HqEvent::Change { late, person, origin_refs, event: ev });
    }

    /// Watermark facts for the changelog.
    pub fn watermark_facts(&self) -> Vec<Fact> {
        self.sites.iter().map(|(s, st)| Fact::Watermark { site: s.clone(), max_ts: st.max_ts }).collect()
    }
}
