//! Streaming dashboard aggregates: tumbling windows kept as the transform's output flows, and
//! finalised by its global watermark (issue #9). No batch query recomputes them.
//!
//! | aggregate | grouped by | counts |
//! |---|---|---|
//! | `daily_registrations` | site, window | patient rows created |
//! | `hourly_encounters` | site, encounter type, window | unvoided encounters |
//! | `monthly_active_patients` | site, window | distinct patients with an unvoided encounter |
//! | `daily_obs_by_class` | site, concept class, window | unvoided obs |
//!
//! A row falls in the window of its `date_created` (clinic entry time; for a live change the
//! statement time, which is also the commit time the watermark tracks; for a snapshot row its
//! real registration day), else of its commit time. Windows are UTC, sized by `[aggregates]`.
//!
//! The operator sees every emitted change as a delta: an insert or snapshot row adds its
//! contribution, a delete removes it, an update removes the old image's and adds the new one's
//! (a void moves an encounter out). A change of person alone is a merge, and merges are applied
//! by re-keying the loser's active-patient memberships to the survivor, as HQ moves the loser's
//! encounters — so the aggregates match what HQ holds.
//!
//! Hooks (Arroyo's shape): [`Aggregator::on_output`] per emitted record, [`Aggregator::flush`]
//! per batch with the watermark and the clock. `flush` emits:
//! - a **provisional** version of each changed window the watermark has not passed, at most every
//!   `provisional_interval_ms`;
//! - a **final** version (revision 1) once the global watermark passes the window's end;
//! - a **correction** (a final version with the next revision) when a late change alters a
//!   window already final. Nothing is silently off.
//!
//! Delivery guarantee: **exactly once**, as the transform: the versions and the state facts
//! (window values, revisions, what was last emitted, memberships, concept classes) are written
//! in the batch's Kafka transaction, and state is restored from the changelog. A resnapshot of a
//! site counts its rows again (the operator keeps no per-row state); see OPERATIONS.md.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use omrs_core::config::WindowSpec;
use omrs_core::envelope::Op;
use omrs_core::hq::{parse_datetime_ms, HqEvent, AGGREGATES};
use omrs_core::metrics::metrics;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::event::{InEvent, Out};

const REGISTRATIONS: u8 = 0;
const ENCOUNTERS: u8 = 1;
const ACTIVE: u8 = 2;
const OBS: u8 = 3;

/// The dim of a row whose grouping value has no known uuid.
pub const UNKNOWN: &str = "unknown";

/// One window: (aggregate index, site, window start, dim).
pub type WinKey = (u8, Arc<str>, i64, String);

/// (aggregate name, site, window start, dim) → (value, final, revision): [`Aggregator::snapshot`].
pub type WindowValues = BTreeMap<(String, String, i64, String), (i64, bool, u32)>;

/// A window's state.
#[derive(Debug, Clone, PartialEq)]
struct Win {
    end: i64,
    value: i64,
    /// The global watermark has passed `end`.
    closed: bool,
    /// Final versions emitted so far.
    revision: u32,
    /// The last version emitted: (value, final).
    emitted: Option<(i64, bool)>,
}

/// The aggregator's facts in the transform's state changelog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum AggFact {
    AggWindow {
        a: u8,
        site: String,
        start: i64,
        dim: String,
        value: i64,
        closed: bool,
        revision: u32,
        emitted: Option<(i64, bool)>,
    },
    /// Encounters (net) of `person` counted in a monthly-active window.
    AggMember { site: String, start: i64, person: String, n: i64 },
    /// A concept's class, learned from the `concept` rows the sites send.
    ConceptClass { concept: String, class: String },
}

impl AggFact {
    pub fn key(&self) -> String {
        match self {
            AggFact::AggWindow { a, site, start, dim, .. } => format!("aw:{a}:{site}:{start}:{dim}"),
            AggFact::AggMember { site, start, person, .. } => format!("am:{site}:{start}:{person}"),
            AggFact::ConceptClass { concept, .. } => format!("cc:{concept}"),
        }
    }
}

/// The few columns of a row image the aggregates read.
#[derive(Deserialize, Default)]
struct Img<'a> {
    #[serde(default, borrow)]
    date_created: Option<Cow<'a, str>>,
    #[serde(default)]
    voided: Option<J>,
    #[serde(default)]
    encounter_type: Option<J>,
    #[serde(default)]
    concept_id: Option<J>,
}

static DATE_CREATED: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"date_created\":"));
static VOIDED: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"voided\":"));
static ENCOUNTER_TYPE: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"encounter_type\":"));
static CONCEPT_ID: std::sync::LazyLock<memchr::memmem::Finder<'static>> = std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"concept_id\":"));

/// The value after a top-level `"key":` of a compact JSON object: its raw bytes, up to the next
/// `,` or `}` (a string: up to its closing quote, without escapes). Inside a JSON string every
/// `"` is escaped, so `"key":` right after `{` or `,` is a key, never string content. None
/// when the key is absent or its value is not a plain scalar.
fn scan_value<'a>(raw: &'a [u8], key: &memchr::memmem::Finder<'_>) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(at) = key.find(&raw[from..]) {
        let at = from + at;
        from = at + key.needle().len();
        if at == 0 || !matches!(raw[at - 1], b'{' | b',') {
            continue;
        }
        let rest = &raw[from..];
        let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
        return if rest.first() == Some(&b'"') {
            let end = memchr::memchr2(b'"', b'\\', &rest[1..])?;
            (rest[1 + end] == b'"').then(|| &rest[..end + 2])
        } else {
            let end = rest.iter().position(|b| matches!(b, b',' | b'}'))?;
            Some(rest[..end].trim_ascii_end())
        };
    }
    None
}

impl Img<'_> {
    /// The four columns, read straight from the image's bytes (the aggregates see every obs, and
    /// a full parse of each cost the transform a fifth of its throughput). An image without a
    /// plainly readable `date_created` (every aggregated table has one) is parsed in full.
    fn parse(raw: Option<&[u8]>) -> Option<Img<'_>> {
        let r = raw?;
        Img::scan(r).or_else(|| serde_json::from_slice::<Img>(r).ok())
    }

    fn scan(r: &[u8]) -> Option<Img<'_>> {
        let date = scan_value(r, &DATE_CREATED)?;
        let date_created = match date {
            b"null" => None,
            d if d.len() >= 2 && d[0] == b'"' => Some(Cow::Borrowed(std::str::from_utf8(&d[1..d.len() - 1]).ok()?)),
            _ => return None,
        };
        let scalar = |v: Option<&[u8]>| -> Option<J> {
            match v? {
                b"null" => None,
                b"true" => Some(J::Bool(true)),
                b"false" => Some(J::Bool(false)),
                s if s.first() == Some(&b'"') => std::str::from_utf8(&s[1..s.len() - 1]).ok().map(|t| J::String(t.to_string())),
                n => std::str::from_utf8(n).ok().and_then(|t| t.parse::<i64>().ok()).map(J::from),
            }
        };
        Some(Img {
            date_created,
            voided: scalar(scan_value(r, &VOIDED)),
            encounter_type: scalar(scan_value(r, &ENCOUNTER_TYPE)),
            concept_id: scalar(scan_value(r, &CONCEPT_ID)),
        })
    }

    fn voided(&self) -> bool {
        match &self.voided {
            Some(J::Bool(b)) => *b,
            Some(J::Number(n)) => n.as_i64().unwrap_or(0) != 0,
            Some(J::String(s)) => s != "0" && !s.is_empty(),
            _ => false,
        }
    }
}

fn int(v: &Option<J>) -> Option<i64> {
    v.as_ref().and_then(J::as_i64)
}

/// One row image's contribution to one aggregate.
#[derive(Debug, Clone, PartialEq)]
struct Contribution {
    a: u8,
    start: i64,
    end: i64,
    dim: String,
    /// The person, for monthly active patients.
    person: Option<String>,
}

pub struct Aggregator {
    windows_spec: [WindowSpec; 4],
    provisional_interval_ms: i64,
    windows: BTreeMap<WinKey, Win>,
    /// Windows not closed yet, by end.
    open: BTreeSet<(i64, WinKey)>,
    /// Windows whose value changed since they were last emitted or written.
    dirty: BTreeSet<WinKey>,
    changed: BTreeSet<WinKey>,
    /// (site, window start) → person → net unvoided encounters.
    members: HashMap<(Arc<str>, i64), HashMap<String, i64>>,
    /// person → the active-patient windows it is counted in (for merges).
    person_windows: HashMap<String, Vec<(Arc<str>, i64)>>,
    changed_members: BTreeSet<(Arc<str>, i64, String)>,
    /// concept uuid → concept class uuid.
    concept_class: HashMap<String, String>,
    new_concepts: Vec<(String, String)>,
    /// (site, column, site-local id) → uuid, for the old image of an update that changed a
    /// grouping column (its refs describe the new image only).
    local: HashMap<(Arc<str>, &'static str, i64), String>,
    sites: HashMap<String, Arc<str>>,
    last_provisional_ms: i64,
}

impl Aggregator {
    pub fn new(windows_spec: [WindowSpec; 4], provisional_interval_ms: u64) -> Self {
        Aggregator {
            windows_spec,
            provisional_interval_ms: provisional_interval_ms as i64,
            windows: BTreeMap::new(),
            open: BTreeSet::new(),
            dirty: BTreeSet::new(),
            changed: BTreeSet::new(),
            members: HashMap::new(),
            person_windows: HashMap::new(),
            changed_members: BTreeSet::new(),
            concept_class: HashMap::new(),
            new_concepts: Vec::new(),
            local: HashMap::new(),
            sites: HashMap::new(),
            last_provisional_ms: i64::MIN,
        }
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    pub fn window_count(&self) -> usize {
        self.windows.len()
    }

    fn site(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.sites.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.sites.insert(s.to_string(), a.clone());
        a
    }

    /// Restores one fact from the changelog (windows and memberships as last committed).
    pub fn restore(&mut self, f: AggFact) {
        match f {
            AggFact::AggWindow { a, site, start, dim, value, closed, revision, emitted } => {
                let Some(spec) = self.windows_spec.get(a as usize) else { return };
                let (_, end) = spec.window(start);
                let site = self.site(&site);
                let key = (a, site, start, dim);
                if !closed {
                    self.open.insert((end, key.clone()));
                }
                let w = Win { end, value, closed, revision, emitted };
                if w.emitted != Some((value, closed)) {
                    self.dirty.insert(key.clone());
                }
                self.windows.insert(key, w);
            }
            AggFact::AggMember { site, start, person, n } => {
                if n != 0 {
                    let site = self.site(&site);
                    self.members.entry((site.clone(), start)).or_default().insert(person.clone(), n);
                    self.person_windows.entry(person).or_default().push((site, start));
                }
            }
            AggFact::ConceptClass { concept, class } => {
                self.concept_class.insert(concept, class);
            }
        }
    }

    /// Folds one emitted record into the windows.
    pub fn on_output(&mut self, out: &Out) {
        match out {
            Out::Change { person, event, .. } => self.on_change(event, person.as_deref()),
            Out::Hq(h) => {
                if let HqEvent::Merge { winner, loser, .. } = &**h {
                    self.on_merge(winner, loser);
                }
            }
        }
    }

    fn on_change(&mut self, ev: &InEvent, person: Option<&str>) {
        let table = ev.table_str();
        if !matches!(table, "patient" | "encounter" | "obs" | "concept") {
            return;
        }
        let after = if ev.op == Op::Delete { None } else { Img::parse(ev.after_raw()) };
        let before = match ev.op {
            Op::Delete | Op::Update => Img::parse(ev.before_raw()),
            _ => None,
        };
        if table == "concept" {
            if let (Some(uuid), Some(J::String(class))) = (ev.uuid.as_deref(), ev.refs.get("class_id")) {
                if after.is_some() && self.concept_class.get(uuid) != Some(class) {
                    self.concept_class.insert(uuid.to_string(), class.clone());
                    self.new_concepts.push((uuid.to_string(), class.clone()));
                }
            }
            return;
        }
        let site = self.site(&ev.site);
        // Refs describe the image the event carries (the old one of a delete): learn the
        // site-local ids they resolve, for old images of later updates.
        let refs_img = if ev.op == Op::Delete { before.as_ref() } else { after.as_ref() };
        if let Some(img) = refs_img {
            for (col, v) in [("encounter_type", &img.encounter_type), ("concept_id", &img.concept_id)] {
                if let (Some(id), Some(J::String(u))) = (int(v), ev.refs.get(col)) {
                    let k = (site.clone(), col, id);
                    if self.local.get(&k) != Some(u) {
                        self.local.insert(k, u.clone());
                    }
                }
            }
        }
        let fallback = ev.source.ts_ms;
        let new: Vec<Contribution> = after.as_ref().map(|img| self.contributions(table, img, ev, &site, true, person, fallback)).unwrap_or_default();
        let old: Vec<Contribution> = before.as_ref().map(|img| self.contributions(table, img, ev, &site, ev.op == Op::Delete, person, fallback)).unwrap_or_default();
        for c in &old {
            // A change of person alone is a merge, which re-keys memberships itself.
            let same = new.iter().any(|n| n.a == c.a && n.start == c.start && n.dim == c.dim && (n.person == c.person || c.a == ACTIVE));
            if !same {
                self.add(&site, c, -1);
            }
        }
        for c in &new {
            let same = old.iter().any(|o| o.a == c.a && o.start == c.start && o.dim == c.dim && (o.person == c.person || c.a == ACTIVE));
            if !same {
                self.add(&site, c, 1);
            }
        }
    }

    /// What `img` (a row of `table`) counts in. `own_refs`: the event's refs describe this image.
    #[allow(clippy::too_many_arguments)]
    fn contributions(&self, table: &str, img: &Img<'_>, ev: &InEvent, site: &Arc<str>, own_refs: bool, person: Option<&str>, fallback_ms: i64) -> Vec<Contribution> {
        let at = img.date_created.as_deref().and_then(parse_datetime_ms).unwrap_or(fallback_ms);
        let win = |a: u8| self.windows_spec[a as usize].window(at);
        let dim_of = |col: &'static str, v: &Option<J>| -> Option<String> {
            let by_ref = if own_refs { ev.refs.get(col).and_then(J::as_str).map(str::to_string) } else { None };
            by_ref.or_else(|| int(v).and_then(|id| self.local.get(&(site.clone(), col, id)).cloned()))
        };
        let mut out = Vec::new();
        match table {
            "patient" => {
                let (start, end) = win(REGISTRATIONS);
                out.push(Contribution { a: REGISTRATIONS, start, end, dim: String::new(), person: None });
            }
            "encounter" if !img.voided() => {
                let dim = dim_of("encounter_type", &img.encounter_type).unwrap_or_else(|| {
                    metrics().aggregate_unattributed.with_label_values(&[AGGREGATES[ENCOUNTERS as usize].name]).inc();
                    UNKNOWN.to_string()
                });
                let (start, end) = win(ENCOUNTERS);
                out.push(Contribution { a: ENCOUNTERS, start, end, dim, person: None });
                if let Some(p) = person {
                    let (start, end) = win(ACTIVE);
                    out.push(Contribution { a: ACTIVE, start, end, dim: String::new(), person: Some(p.to_string()) });
                }
            }
            "obs" if !img.voided() => {
                let class = dim_of("concept_id", &img.concept_id).and_then(|c| self.concept_class.get(&c).cloned()).unwrap_or_else(|| {
                    metrics().aggregate_unattributed.with_label_values(&[AGGREGATES[OBS as usize].name]).inc();
                    UNKNOWN.to_string()
                });
                let (start, end) = win(OBS);
                out.push(Contribution { a: OBS, start, end, dim: class, person: None });
            }
            _ => {}
        }
        out
    }

    fn window_mut(&mut self, key: &WinKey, end: i64) -> &mut Win {
        if !self.windows.contains_key(key) {
            self.open.insert((end, key.clone()));
            self.windows.insert(key.clone(), Win { end, value: 0, closed: false, revision: 0, emitted: None });
        }
        self.windows.get_mut(key).expect("inserted above")
    }

    fn bump(&mut self, key: WinKey, end: i64, delta: i64) {
        if delta == 0 {
            return;
        }
        self.window_mut(&key, end).value += delta;
        self.dirty.insert(key.clone());
        self.changed.insert(key);
    }

    /// Adds `delta` to `person`'s encounters in the active-patient window (`site`, `start`).
    /// Returns the change of the window's value (distinct persons).
    fn shift(&mut self, site: &Arc<str>, start: i64, person: &str, delta: i64) -> i64 {
        let m = self.members.entry((site.clone(), start)).or_default();
        let before = m.get(person).copied().unwrap_or(0);
        let after = before + delta;
        if after == 0 {
            m.remove(person);
        } else {
            m.insert(person.to_string(), after);
        }
        if before == 0 && after != 0 {
            self.person_windows.entry(person.to_string()).or_default().push((site.clone(), start));
        }
        self.changed_members.insert((site.clone(), start, person.to_string()));
        (after > 0) as i64 - (before > 0) as i64
    }

    fn add(&mut self, site: &Arc<str>, c: &Contribution, delta: i64) {
        if c.a != ACTIVE {
            self.bump((c.a, site.clone(), c.start, c.dim.clone()), c.end, delta);
            return;
        }
        let Some(person) = &c.person else { return };
        let d = self.shift(site, c.start, person, delta);
        self.bump((ACTIVE, site.clone(), c.start, String::new()), c.end, d);
    }

    /// `loser` is `winner` now: its memberships move to the survivor, as HQ moves its encounters.
    fn on_merge(&mut self, winner: &str, loser: &str) {
        let Some(wins) = self.person_windows.remove(loser) else { return };
        for (site, start) in wins {
            let n = self.members.get(&(site.clone(), start)).and_then(|m| m.get(loser)).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let d = self.shift(&site, start, loser, -n) + self.shift(&site, start, winner, n);
            let (_, end) = self.windows_spec[ACTIVE as usize].window(start);
            self.bump((ACTIVE, site, start, String::new()), end, d);
        }
    }

    /// Closes the windows the watermark `wm` has passed and emits what is due: finals and
    /// corrections always, provisional versions every `provisional_interval_ms` (or when
    /// `force`). Returns the records to write and the state facts of this batch.
    pub fn flush(&mut self, wm: i64, now_ms: i64, force: bool) -> (Vec<HqEvent>, Vec<AggFact>) {
        if wm > i64::MIN / 4 {
            while let Some((end, _)) = self.open.first() {
                if *end > wm {
                    break;
                }
                let Some((_, key)) = self.open.pop_first() else { break };
                if let Some(w) = self.windows.get_mut(&key) {
                    w.closed = true;
                }
                self.dirty.insert(key.clone());
                self.changed.insert(key);
            }
        }
        let provisional_due = force || now_ms.saturating_sub(self.last_provisional_ms) >= self.provisional_interval_ms;
        if provisional_due {
            self.last_provisional_ms = now_ms;
        }
        let m = metrics();
        let mut out = Vec::new();
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(w) = self.windows.get_mut(&key) else { continue };
            let (kind, is_final) = if w.closed {
                if w.emitted == Some((w.value, true)) {
                    continue;
                }
                w.revision += 1;
                (if w.revision > 1 { "correction" } else { "final" }, true)
            } else if provisional_due {
                if w.emitted == Some((w.value, false)) {
                    continue;
                }
                ("provisional", false)
            } else {
                self.dirty.insert(key);
                continue;
            };
            w.emitted = Some((w.value, is_final));
            let (a, site, start, dim) = &key;
            let def = &AGGREGATES[*a as usize];
            out.push(HqEvent::Aggregate {
                name: def.name.to_string(),
                site: site.to_string(),
                window_start_ms: *start,
                window_end_ms: w.end,
                dim: dim.clone(),
                value: w.value,
                is_final,
                revision: if is_final { w.revision } else { 0 },
                watermark_ms: wm,
            });
            m.aggregate_versions.with_label_values(&[def.name, kind]).inc();
            self.changed.insert(key);
        }
        let mut facts = Vec::new();
        for key in std::mem::take(&mut self.changed) {
            if let Some(w) = self.windows.get(&key) {
                let (a, site, start, dim) = key;
                facts.push(AggFact::AggWindow { a, site: site.to_string(), start, dim, value: w.value, closed: w.closed, revision: w.revision, emitted: w.emitted });
            }
        }
        for (site, start, person) in std::mem::take(&mut self.changed_members) {
            let n = self.members.get(&(site.clone(), start)).and_then(|m| m.get(&person)).copied().unwrap_or(0);
            facts.push(AggFact::AggMember { site: site.to_string(), start, person, n });
        }
        for (concept, class) in self.new_concepts.drain(..) {
            facts.push(AggFact::ConceptClass { concept, class });
        }
        m.aggregate_open_windows.set(self.open.len() as i64);
        (out, facts)
    }

    /// The current value of every window: (aggregate name, site, start, dim) → (value, final,
    /// revision). For tests and the demo summary.
    pub fn snapshot(&self) -> WindowValues {
        self.windows
            .iter()
            .map(|((a, site, start, dim), w)| ((AGGREGATES[*a as usize].name.to_string(), site.to_string(), *start, dim.clone()), (w.value, w.closed, w.revision)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Origin;

    const ET: &str = "et-uuid-1";

    #[test]
    fn the_byte_scan_reads_what_a_full_parse_reads() {
        let images: &[&str] = &[
            r#"{"obs_id":1,"concept_id":5089,"date_created":"2024-03-01 10:00:00","voided":0,"value_text":null}"#,
            r#"{"encounter_id":7,"encounter_type":2,"voided":1,"date_created":"2024-03-01 10:00:00"}"#,
            r#"{"encounter_id":7,"encounter_type":null,"voided":true,"date_created":"2024-03-01 10:00:00"}"#,
            // Key-like text inside a string value is content, not a key.
            r#"{"obs_id":2,"value_text":"x\",\"voided\":1,\"concept_id\":9","concept_id":5090,"voided":0,"date_created":"2024-03-02 00:00:00"}"#,
            r#"{"obs_id":3,"value_text":"{\"concept_id\":1}","date_created":"2024-03-02 00:00:00","concept_id":11}"#,
            // Spaces, a missing voided, a null date, a string voided.
            r#"{"patient_id": 4, "date_created": "2024-03-03 00:00:00", "voided": 0}"#,
            r#"{"patient_id":4,"date_created":null}"#,
            r#"{"encounter_id":8,"encounter_type":"3","voided":"1","date_created":"2024-03-03 01:00:00"}"#,
            // Escapes in the date, and keys with spaces before the colon: the full parse.
            r#"{"obs_id":5,"date_created":"2024-03-04\u0020 00:00:00","concept_id":1}"#,
            r#"{"obs_id":6, "date_created" : "2024-03-05 00:00:00", "voided" : 1}"#,
            r#"{"obs_id":7,"concept_id":12,"voided":0}"#,
        ];
        for img in images {
            let full: Img = serde_json::from_slice(img.as_bytes()).unwrap();
            let got = Img::parse(Some(img.as_bytes())).unwrap();
            assert_eq!(got.date_created.as_deref(), full.date_created.as_deref(), "{img}");
            assert_eq!(got.voided(), full.voided(), "{img}");
            assert_eq!(int(&got.encounter_type), int(&full.encounter_type), "{img}");
            assert_eq!(int(&got.concept_id), int(&full.concept_id), "{img}");
        }
        // The common case takes the scan, not the full parse.
        assert!(Img::scan(images[0].as_bytes()).is_some());
        assert!(Img::scan(images[8].as_bytes()).is_none(), "an escaped date goes to the full parse");
    }

    fn spec() -> [WindowSpec; 4] {
        [WindowSpec::Fixed(10_000); 4]
    }

    fn dt(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms).unwrap().format("%Y-%m-%d %H:%M:%S").to_string()
    }

    #[allow(clippy::too_many_arguments)] // a change event's fields, spelled out in each test
    fn change(site: &str, table: &str, op: &str, uuid: &str, before: Option<J>, after: Option<J>, refs: J, ts: i64) -> InEvent {
        let rec = serde_json::json!({
            "op": op, "site": site, "table": table, "uuid": uuid, "key": {"id": 1},
            "before": before, "after": after, "refs": refs,
            "source": {"server_id": 1, "gtid": null, "file": "f", "pos": 1, "row": 0, "ts_ms": ts, "snapshot": op == "r"},
            "ts_ms": ts
        });
        let site: Arc<str> = Arc::from(site);
        InEvent::decode(&serde_json::to_vec(&rec).unwrap(), &site, "t").unwrap()
    }

    fn out(ev: InEvent, person: Option<&str>) -> Out {
        Out::Change { late: false, person: person.map(str::to_string), origin_refs: Vec::new(), event: ev }
    }

    fn enc(site: &str, uuid: &str, at: i64, voided: i64) -> J {
        let _ = (site, uuid);
        serde_json::json!({"encounter_id": 1, "encounter_type": 7, "patient_id": 3, "date_created": dt(at), "voided": voided})
    }

    fn value(a: &Aggregator, name: &str, site: &str, start: i64, dim: &str) -> Option<(i64, bool, u32)> {
        a.snapshot().get(&(name.to_string(), site.to_string(), start, dim.to_string())).copied()
    }

    #[test]
    fn provisional_then_final_then_a_late_correction_with_the_next_revision() {
        let mut a = Aggregator::new(spec(), 1000);
        let refs = serde_json::json!({"encounter_type": ET, "patient_id": "p1"});
        a.on_output(&out(change("s", "encounter", "c", "e1", None, Some(enc("s", "e1", 1_000, 0)), refs.clone(), 1_000), Some("p1")));
        let (v, facts) = a.flush(0, 5_000, false);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v.iter().all(|e| matches!(e, HqEvent::Aggregate { is_final: false, revision: 0, value: 1, .. })), "{v:?}");
        assert!(!facts.is_empty());
        // The watermark passes the window's end: final, revision 1.
        let (v, _) = a.flush(10_000, 5_100, false);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|e| matches!(e, HqEvent::Aggregate { is_final: true, revision: 1, value: 1, .. })), "{v:?}");
        // Nothing changed: nothing more.
        assert!(a.flush(12_000, 9_000, true).0.is_empty());
        // A late encounter of the same window (another patient): a correction, revision 2.
        let refs2 = serde_json::json!({"encounter_type": ET, "patient_id": "p2"});
        a.on_output(&out(change("s", "encounter", "c", "e2", None, Some(enc("s", "e2", 2_000, 0)), refs2, 13_000), Some("p2")));
        let (v, _) = a.flush(12_000, 9_100, false);
        assert_eq!(v.len(), 2, "{v:?}");
        for e in &v {
            let HqEvent::Aggregate { is_final, revision, value, .. } = e else { panic!() };
            assert!(*is_final);
            assert_eq!((*revision, *value), (2, 2), "{e:?}");
        }
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, ""), Some((2, true, 2)));
    }

    #[test]
    fn voids_deletes_and_merges_move_counts_the_way_hq_does() {
        let mut a = Aggregator::new(spec(), 1);
        let r = |p: &str| serde_json::json!({"encounter_type": ET, "patient_id": p});
        a.on_output(&out(change("s", "encounter", "c", "e1", None, Some(enc("s", "e1", 1_000, 0)), r("p1"), 1_000), Some("p1")));
        a.on_output(&out(change("s", "encounter", "c", "e2", None, Some(enc("s", "e2", 1_500, 0)), r("p2"), 1_500), Some("p2")));
        a.on_output(&out(change("s", "encounter", "c", "e3", None, Some(enc("s", "e3", 1_600, 0)), r("p2"), 1_600), Some("p2")));
        assert_eq!(value(&a, "hourly_encounters", "s", 0, ET).map(|v| v.0), Some(3));
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, "").map(|v| v.0), Some(2));
        // p2 merged into p1: one active patient.
        a.on_output(&Out::Hq(Box::new(HqEvent::Merge { winner: "p1".into(), loser: "p2".into(), reason: "identifier".into(), evidence: J::Null, site: "s".into(), ts_ms: 2_000 })));
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, "").map(|v| v.0), Some(1));
        // The site moves e2 to p1 (person change only): nothing moves twice.
        a.on_output(&out(change("s", "encounter", "u", "e2", Some(enc("s", "e2", 1_500, 0)), Some(enc("s", "e2", 1_500, 0)), r("p1"), 2_100), Some("p1")));
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, "").map(|v| v.0), Some(1));
        // A void takes the encounter out; a delete of an unvoided one too.
        a.on_output(&out(change("s", "encounter", "u", "e1", Some(enc("s", "e1", 1_000, 0)), Some(enc("s", "e1", 1_000, 1)), r("p1"), 2_200), Some("p1")));
        a.on_output(&out(change("s", "encounter", "d", "e3", Some(enc("s", "e3", 1_600, 0)), None, r("p1"), 2_300), Some("p1")));
        assert_eq!(value(&a, "hourly_encounters", "s", 0, ET).map(|v| v.0), Some(1));
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, "").map(|v| v.0), Some(1));
        a.on_output(&out(change("s", "encounter", "u", "e2", Some(enc("s", "e2", 1_500, 0)), Some(enc("s", "e2", 1_500, 1)), r("p1"), 2_400), Some("p1")));
        assert_eq!(value(&a, "monthly_active_patients", "s", 0, "").map(|v| v.0), Some(0));
        // Obs by class: the class comes from the concept rows.
        let concept = change("s", "concept", "r", "c1", None, Some(serde_json::json!({"concept_id": 5, "class_id": 2})), serde_json::json!({"class_id": "class-uuid"}), 100);
        a.on_output(&out(concept, None));
        let obs = change("s", "obs", "c", "o1", None, Some(serde_json::json!({"obs_id": 1, "concept_id": 5, "date_created": dt(3_000), "voided": 0})), serde_json::json!({"concept_id": "c1"}), 3_000);
        a.on_output(&out(obs, Some("p1")));
        assert_eq!(value(&a, "daily_obs_by_class", "s", 0, "class-uuid").map(|v| v.0), Some(1));
        let _ = Origin { topic: Arc::from("t"), partition: 0, offset: 0 };
    }

    #[test]
    fn the_changelog_restores_the_same_windows() {
        let mut a = Aggregator::new(spec(), 1);
        let r = |p: &str| serde_json::json!({"encounter_type": ET, "patient_id": p});
        let mut facts = Vec::new();
        for (i, p) in ["p1", "p2", "p1"].iter().enumerate() {
            a.on_output(&out(change("s", "encounter", "c", &format!("e{i}"), None, Some(enc("s", "e", 1_000 + i as i64 * 9_000, 0)), r(p), 1_000), Some(p)));
            facts.extend(a.flush(5_000 + i as i64 * 5_000, i as i64 * 10, false).1);
        }
        let mut b = Aggregator::new(spec(), 1);
        let mut latest: BTreeMap<String, AggFact> = BTreeMap::new();
        for f in facts {
            latest.insert(f.key(), f);
        }
        for f in latest.into_values() {
            b.restore(f);
        }
        assert_eq!(a.snapshot(), b.snapshot());
        // And both go on the same way.
        let next = |x: &mut Aggregator| {
            x.on_output(&out(change("s", "encounter", "c", "e9", None, Some(enc("s", "e9", 2_000, 0)), r("p3"), 30_000), Some("p3")));
            x.flush(40_000, 1_000, true).0
        };
        assert_eq!(next(&mut a), next(&mut b));
    }
}
