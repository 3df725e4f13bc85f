//! Patient identity across sites: a union-find over person records (keyed by person uuid,
//! which is unique per site record; shared metadata persons such as users carry the same uuid
//! everywhere and are one record), joined by configured identifiers and by site-side merges.
//!
//! The survivor of a component is deterministic: the earliest `person.date_created`, then the
//! smallest uuid. It depends only on the set of records in the component, so the final
//! assignment is the same whatever the arrival order.
//!
//! A person's split decision ("these records are not those") cannot be undone in a union-find,
//! so every link is also kept, and a component that holds a record named by a decision is
//! rebuilt from its links: in (uuid, uuid) order, each link joins unless it would put records
//! a decision keeps apart in one component. The components are then a function of the set of
//! links and the set of decisions, whatever the order they came in (the tests check it over
//! permutations). A component with no such record is closed under its links, so the plain
//! union is the same rebuild, done incrementally.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

/// A merge decided by the index: `loser`'s component now survives as `winner`.
const UNKNOWN: i64 = i64::MAX;

/// `YYYY-MM-DD HH:MM:SS[.f]` (as OpenMRS writes `date_created`) → seconds, or UNKNOWN.
fn parse_created(s: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(s.get(..19).unwrap_or(s), "%Y-%m-%d %H:%M:%S")
        .map(|d| d.and_utc().timestamp())
        .unwrap_or(UNKNOWN)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub winner: String,
    pub loser: String,
}

/// What a link or a decision changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The component of `loser` (all of it) now survives as `winner`.
    Merged(Merged),
    /// `records` left the component that survived as `from` and survive as `survivor`.
    Split { survivor: String, from: String, records: Vec<String> },
}

/// A person's decision: no record of `a` is the same person as a record of `b`.
struct Apart {
    a: Vec<u32>,
    b: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Rec {
    uuid: Box<str>,
    /// `date_created` in seconds since the epoch; `UNKNOWN` when not (yet) known.
    created: i64,
    parent: u32,
    /// The next member of the component, in a ring (so a component can be walked).
    next: u32,
    /// At a root: the survivor record of the component.
    survivor: u32,
    size: u32,
}

#[derive(Default)]
pub struct Identity {
    recs: Vec<Rec>,
    /// uuid → record, storing only the record number (the uuid lives once, in `recs`).
    by_uuid: HashTable<u32>,
    /// foldhash, randomly seeded: several refs per event are looked up, so the hash is hot.
    hasher: DefaultHashBuilder,
    /// (identifier type index, normalised value) → a record holding it.
    index: HashMap<(u16, Box<str>), u32>,
    /// Heap bytes of the strings held (uuids twice, creation times, identifier values).
    str_bytes: usize,
    /// Every link, both ways: each linked record's first partner, and in `more_links` the
    /// others (a record linked to several: rare). 5 bytes a record with a third of the records
    /// linked (unit test `links_cost_a_few_bytes_per_record`); a list per record cost 48 with
    /// two thirds linked.
    links: HashMap<u32, u32>,
    more_links: HashMap<u32, Vec<u32>>,
    /// Split decisions, and the decisions naming each record.
    apart: Vec<Apart>,
    constrained: HashMap<u32, Vec<u32>>,
}

impl Identity {
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    fn lookup(&self, uuid: &str) -> Option<u32> {
        let h = self.hasher.hash_one(uuid);
        self.by_uuid.find(h, |&i| &*self.recs[i as usize].uuid == uuid).copied()
    }

    pub fn knows(&self, uuid: &str) -> bool {
        self.lookup(uuid).is_some()
    }

    fn rec(&mut self, uuid: &str) -> u32 {
        if let Some(i) = self.lookup(uuid) {
            return i;
        }
        let i = self.recs.len() as u32;
        self.recs.push(Rec {
            uuid: uuid.into(),
            created: UNKNOWN,
            parent: i,
            next: i,
            survivor: i,
            size: 1,
        });
        let (recs, hasher) = (&self.recs, &self.hasher);
        let h = hasher.hash_one(uuid);
        self.by_uuid.insert_unique(h, i, |&j| hasher.hash_one(&*recs[j as usize].uuid));
        self.str_bytes += uuid.len();
        i
    }

    fn find(&mut self, mut i: u32) -> u32 {
        while self.recs[i as usize].parent != i {
            let p = self.recs[i as usize].parent;
            self.recs[i as usize].parent = self.recs[p as usize].parent;
            i = p;
        }
        i
    }

    /// Orders records: earliest date_created first (unknown last), then uuid.
    fn better(&self, a: u32, b: u32) -> bool {
        let (ra, rb) = (&self.recs[a as usize], &self.recs[b as usize]);
        (ra.created, &ra.uuid) < (rb.created, &rb.uuid)
    }

    /// Registers a person record (and its creation time). Returns a merge when the new
    /// creation time changes the survivor of its component: an earlier one makes this record
    /// the survivor; a later one on the survivor (a registration date fixed forward) hands it
    /// to the next earliest member.
    pub fn person(&mut self, uuid: &str, created: Option<&str>) -> Option<Merged> {
        let i = self.rec(uuid);
        if let Some(c) = created.map(parse_created).filter(|&c| c != UNKNOWN) {
            if self.recs[i as usize].created == c {
                return None;
            }
            self.recs[i as usize].created = c;
        }
        let root = self.find(i);
        let old = self.recs[root as usize].survivor;
        let new = if old == i {
            self.best_member(i)
        } else if self.better(i, old) {
            i
        } else {
            old
        };
        if new == old {
            return None;
        }
        self.recs[root as usize].survivor = new;
        Some(Merged {
            winner: self.recs[new as usize].uuid.to_string(),
            loser: self.recs[old as usize].uuid.to_string(),
        })
    }

    /// The best member of `i`'s component, walking its ring.
    fn best_member(&self, i: u32) -> u32 {
        let (mut best, mut j) = (i, self.recs[i as usize].next);
        while j != i {
            if self.better(j, best) {
                best = j;
            }
            j = self.recs[j as usize].next;
        }
        best
    }

    /// The canonical (survivor) uuid for a person uuid; the uuid itself when unknown.
    pub fn canonical(&mut self, uuid: &str) -> String {
        match self.lookup(uuid) {
            Some(i) => {
                let r = self.find(i);
                let s = self.recs[r as usize].survivor;
                self.recs[s as usize].uuid.to_string()
            }
            None => uuid.to_string(),
        }
    }

    /// The survivor's uuid when `uuid` is a known record merged into another one; None when it
    /// is unknown or its own survivor (so that the common case allocates nothing).
    pub fn survivor_if_other(&mut self, uuid: &str) -> Option<String> {
        let i = self.lookup(uuid)?;
        let r = self.find(i);
        let s = self.recs[r as usize].survivor;
        let su = &self.recs[s as usize].uuid;
        (**su != *uuid).then(|| su.to_string())
    }

    /// Joins the components of roots `ra` and `rb` (distinct): the merge it makes.
    fn join(&mut self, ra: u32, rb: u32) -> Merged {
        let (sa, sb) = (self.recs[ra as usize].survivor, self.recs[rb as usize].survivor);
        let (winner, loser) = if self.better(sa, sb) { (sa, sb) } else { (sb, sa) };
        let (big, small) = if self.recs[ra as usize].size >= self.recs[rb as usize].size { (ra, rb) } else { (rb, ra) };
        self.recs[small as usize].parent = big;
        // Splicing two rings into one: swap the successors of one member of each.
        let (na, nb) = (self.recs[ra as usize].next, self.recs[rb as usize].next);
        self.recs[ra as usize].next = nb;
        self.recs[rb as usize].next = na;
        self.recs[big as usize].size += self.recs[small as usize].size;
        self.recs[big as usize].survivor = winner;
        Merged { winner: self.recs[winner as usize].uuid.to_string(), loser: self.recs[loser as usize].uuid.to_string() }
    }

    /// Links two records (the same identifier, a site's merge). Returns what changed, and
    /// whether a split decision keeps them apart (the link is kept, but does not join).
    pub fn link(&mut self, a: &str, b: &str) -> (Vec<Change>, bool) {
        let (ia, ib) = (self.rec(a), self.rec(b));
        if ia == ib {
            return (Vec::new(), false);
        }
        for (x, y) in [(ia, ib), (ib, ia)] {
            match self.links.get(&x) {
                None => {
                    self.links.insert(x, y);
                }
                Some(&p) if p == y => {}
                Some(_) => {
                    let more = self.more_links.entry(x).or_default();
                    if !more.contains(&y) {
                        more.push(y);
                    }
                }
            }
        }
        let (ra, rb) = (self.find(ia), self.find(ib));
        if ra == rb {
            return (Vec::new(), false);
        }
        if self.apart.is_empty() || (!self.holds_constrained(ra) && !self.holds_constrained(rb)) {
            return (vec![Change::Merged(self.join(ra, rb))], false);
        }
        let changes = self.rebuild(&[ia]);
        let refused = self.find(ia) != self.find(ib);
        (changes, refused)
    }

    /// Joins two records, as [`Identity::link`], returning only a merge.
    #[cfg(test)]
    pub fn union(&mut self, a: &str, b: &str) -> Option<Merged> {
        self.link(a, b).0.into_iter().find_map(|c| match c {
            Change::Merged(m) => Some(m),
            Change::Split { .. } => None,
        })
    }

    /// A person's decision: no record of `keep` is one person with a record of `other`.
    /// Returns what it changed (the splits; nothing when they were apart already).
    pub fn keep_apart(&mut self, keep: &[String], other: &[String]) -> Vec<Change> {
        let a: Vec<u32> = keep.iter().map(|u| self.rec(u)).collect();
        let b: Vec<u32> = other.iter().map(|u| self.rec(u)).collect();
        let d = self.apart.len() as u32;
        for &r in a.iter().chain(&b) {
            let c = self.constrained.entry(r).or_default();
            if !c.contains(&d) {
                c.push(d);
            }
        }
        let seeds: Vec<u32> = a.iter().chain(&b).copied().collect();
        self.apart.push(Apart { a, b });
        self.rebuild(&seeds)
    }

    /// Whether the component of root `r` holds a record a decision names.
    fn holds_constrained(&self, r: u32) -> bool {
        self.members(r).iter().any(|m| self.constrained.contains_key(m))
    }

    /// The members of `i`'s component, walking its ring.
    fn members(&self, i: u32) -> Vec<u32> {
        let mut out = vec![i];
        let mut j = self.recs[i as usize].next;
        while j != i {
            out.push(j);
            j = self.recs[j as usize].next;
        }
        out
    }

    /// For each decision a member of root `r`'s component is named in: (decision, sides
    /// present as bits: 1 = a, 2 = b).
    fn sides(&self, r: u32) -> Vec<(u32, u8)> {
        let mut out: Vec<(u32, u8)> = Vec::new();
        for m in self.members(r) {
            for &d in self.constrained.get(&m).map(Vec::as_slice).unwrap_or(&[]) {
                let ap = &self.apart[d as usize];
                let bit = if ap.a.contains(&m) { 1 } else if ap.b.contains(&m) { 2 } else { 0 };
                match out.iter_mut().find(|(x, _)| *x == d) {
                    Some((_, bits)) => *bits |= bit,
                    None => out.push((d, bit)),
                }
            }
        }
        out
    }

    /// Whether joining the components of roots `ra` and `rb` keeps every decision.
    fn may_join(&self, ra: u32, rb: u32) -> bool {
        let sb = self.sides(rb);
        self.sides(ra).iter().all(|(d, bits)| sb.iter().filter(|(e, _)| e == d).all(|(_, other)| (bits | other) != 3))
    }

    /// Rebuilds the components of every record linked (transitively) to `seeds`: from its
    /// links in (uuid, uuid) order, skipping each that would break a decision. Returns the
    /// changes from the components before.
    fn rebuild(&mut self, seeds: &[u32]) -> Vec<Change> {
        let mut region: Vec<u32> = Vec::new();
        let mut seen: hashbrown::HashSet<u32> = hashbrown::HashSet::new();
        let mut stack: Vec<u32> = seeds.to_vec();
        while let Some(r) = stack.pop() {
            if !seen.insert(r) {
                continue;
            }
            region.push(r);
            stack.extend(self.partners(r));
            // Members joined by a link of a version that kept none: their component.
            stack.extend(self.members(r));
        }
        let before: Vec<(u32, u32)> = region.iter().map(|&r| (r, self.survivor_of_rec(r))).collect();
        for &r in &region {
            let x = &mut self.recs[r as usize];
            (x.parent, x.next, x.survivor, x.size) = (r, r, r, 1);
        }
        let mut edges: Vec<(u32, u32)> = Vec::new();
        for &r in &region {
            for n in self.partners(r) {
                if self.recs[r as usize].uuid < self.recs[n as usize].uuid {
                    edges.push((r, n));
                }
            }
        }
        edges.sort_by(|x, y| (&self.recs[x.0 as usize].uuid, &self.recs[x.1 as usize].uuid).cmp(&(&self.recs[y.0 as usize].uuid, &self.recs[y.1 as usize].uuid)));
        for (a, b) in edges {
            let (ra, rb) = (self.find(a), self.find(b));
            if ra != rb && self.may_join(ra, rb) {
                self.join(ra, rb);
            }
        }
        self.changes(before)
    }

    /// The records `r` is linked to.
    fn partners(&self, r: u32) -> Vec<u32> {
        self.links.get(&r).copied().into_iter().chain(self.more_links.get(&r).into_iter().flatten().copied()).collect()
    }

    /// The survivor record of record `r`'s component.
    fn survivor_of_rec(&mut self, r: u32) -> u32 {
        let root = self.find(r);
        self.recs[root as usize].survivor
    }

    /// What a rebuild changed, from each record's survivor before it: per old survivor, each
    /// group of its records that now survives as another record is a split, or a merge when
    /// the group is the whole old component. Splits first, each list in uuid order.
    fn changes(&mut self, before: Vec<(u32, u32)>) -> Vec<Change> {
        let mut old_sizes: HashMap<u32, usize> = HashMap::new();
        let mut moved: Vec<(u32, u32, u32)> = Vec::new();
        for &(r, old) in &before {
            *old_sizes.entry(old).or_default() += 1;
            let new = self.survivor_of_rec(r);
            if new != old {
                moved.push((old, new, r));
            }
        }
        let uuid = |i: u32| -> String { self.recs[i as usize].uuid.to_string() };
        let mut groups: std::collections::BTreeMap<(String, String), (u32, Vec<String>)> = std::collections::BTreeMap::new();
        for (old, new, r) in moved {
            groups.entry((uuid(old), uuid(new))).or_insert_with(|| (old, Vec::new())).1.push(uuid(r));
        }
        let (mut splits, mut merges) = (Vec::new(), Vec::new());
        for ((from, survivor), (old, mut records)) in groups {
            if records.len() == old_sizes.get(&old).copied().unwrap_or(0) {
                merges.push(Change::Merged(Merged { winner: survivor, loser: from }));
            } else {
                records.sort();
                splits.push(Change::Split { survivor, from, records });
            }
        }
        splits.extend(merges);
        splits
    }

    /// Records that `person` holds identifier (type, value). Returns the record it shares the
    /// identifier with, if another one already holds it.
    pub fn identifier(&mut self, type_idx: u16, value: &str, person: &str) -> Option<String> {
        let p = self.rec(person);
        match self.index.get(&(type_idx, value.into())).copied() {
            Some(other) if other != p => Some(self.recs[other as usize].uuid.to_string()),
            Some(_) => None,
            None => {
                self.index.insert((type_idx, value.into()), p);
                self.str_bytes += value.len();
                None
            }
        }
    }

    /// The record number of `uuid` (registering it if new).
    pub fn record(&mut self, uuid: &str) -> u32 {
        self.rec(uuid)
    }

    /// The uuid of record `i`.
    pub fn uuid_of(&self, i: u32) -> &str {
        self.recs.get(i as usize).map_or("", |r| &r.uuid)
    }

    /// Whether records `a` and `b` are one person now.
    pub fn same_component(&mut self, a: u32, b: u32) -> bool {
        self.find(a) == self.find(b)
    }

    /// Members of `uuid`'s component.
    pub fn component_size(&mut self, uuid: &str) -> u32 {
        match self.lookup(uuid) {
            Some(i) => {
                let r = self.find(i);
                self.recs[r as usize].size
            }
            None => 1,
        }
    }

    /// Approximate heap bytes held, for the bench.
    pub fn approx_bytes(&self) -> usize {
        self.recs.capacity() * std::mem::size_of::<Rec>()
            + self.by_uuid.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.index.capacity() * (std::mem::size_of::<((u16, Box<str>), u32)>() + 1)
            + self.str_bytes
            + self.links.capacity() * (std::mem::size_of::<(u32, u32)>() + 1)
            + self.more_links.capacity() * (std::mem::size_of::<(u32, Vec<u32>)>() + 1)
            + self.more_links.values().map(|l| l.capacity() * 4).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivor_is_earliest_created_then_uuid_whatever_the_order() {
        let people = [("b", "2020-01-02 00:00:00"), ("a", "2020-01-03 00:00:00"), ("c", "2020-01-01 00:00:00")];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut id = Identity::default();
            for &i in &order {
                id.person(people[i].0, Some(people[i].1));
            }
            id.union("a", "b");
            id.union("b", "c");
            for u in ["a", "b", "c"] {
                assert_eq!(id.canonical(u), "c");
            }
        }
    }

    #[test]
    fn an_earlier_record_arriving_later_takes_over() {
        let mut id = Identity::default();
        id.person("x", Some("2021-01-01 00:00:00"));
        id.person("y", Some("2021-02-01 00:00:00"));
        assert_eq!(id.union("x", "y"), Some(Merged { winner: "x".into(), loser: "y".into() }));
        id.person("w", Some("2019-01-01 00:00:00"));
        assert_eq!(id.union("y", "w"), Some(Merged { winner: "w".into(), loser: "x".into() }));
        assert_eq!(id.canonical("y"), "w");
        assert_eq!(id.union("x", "w"), None);
    }

    #[test]
    fn a_survivor_whose_date_is_fixed_forward_hands_over_to_the_next_earliest() {
        let mut id = Identity::default();
        for (u, c) in [
            ("p", "2021-03-01 00:00:00"),
            ("q", "2021-01-01 00:00:00"),
            ("r", "2021-02-01 00:00:00"),
            ("s", "2020-01-01 00:00:00"),
        ] {
            id.person(u, Some(c));
        }
        id.union("p", "q");
        id.union("r", "p");
        assert_eq!(id.canonical("r"), "q");
        // Backdated before 1970 (a paper register), then put back.
        assert_eq!(
            id.person("p", Some("1966-05-04 10:00:00")),
            Some(Merged {
                winner: "p".into(),
                loser: "q".into()
            })
        );
        assert_eq!(
            id.person("p", Some("2021-03-01 00:00:00")),
            Some(Merged {
                winner: "q".into(),
                loser: "p".into()
            })
        );
        assert_eq!(
            id.person("q", Some("2021-04-01 00:00:00")),
            Some(Merged {
                winner: "r".into(),
                loser: "q".into()
            })
        );
        assert_eq!(
            id.person("q", Some("2021-05-01 00:00:00")),
            None,
            "a later date on a non-survivor changes nothing"
        );
        for u in ["p", "q", "r"] {
            assert_eq!(id.canonical(u), "r");
        }
        assert_eq!(id.canonical("s"), "s", "another component is not walked");
    }

    /// Every order of the same links and split decisions ends in the same components.
    #[test]
    fn a_split_gives_the_same_components_whatever_the_order() {
        #[derive(Clone, Copy)]
        enum Ev {
            L(&'static str, &'static str),
            D(&'static [&'static str], &'static [&'static str]),
        }
        let evs = [Ev::L("a", "b"), Ev::L("b", "c"), Ev::L("c", "d"), Ev::L("a", "x"), Ev::L("x", "c"), Ev::D(&["a", "b"], &["c"])];
        let people = [("a", "2020-03-01 00:00:00"), ("b", "2020-01-01 00:00:00"), ("c", "2019-01-01 00:00:00"), ("d", "2021-01-01 00:00:00"), ("x", "2018-01-01 00:00:00")];
        let mut first: Option<Vec<String>> = None;
        let mut order: Vec<usize> = (0..evs.len()).collect();
        let mut count = 0;
        // Heap's algorithm over the 720 orders.
        let mut c = vec![0usize; order.len()];
        let mut run = |order: &[usize]| {
            let mut id = Identity::default();
            for (u, t) in people {
                id.person(u, Some(t));
            }
            for &i in order {
                match evs[i] {
                    Ev::L(a, b) => {
                        id.link(a, b);
                    }
                    Ev::D(k, o) => {
                        let (k, o): (Vec<String>, Vec<String>) = (k.iter().map(|s| s.to_string()).collect(), o.iter().map(|s| s.to_string()).collect());
                        id.keep_apart(&k, &o);
                    }
                }
            }
            let got: Vec<String> = ["a", "b", "c", "d", "x"].iter().map(|u| id.canonical(u)).collect();
            match &first {
                Some(f) => assert_eq!(&got, f, "order {order:?}"),
                None => first = Some(got),
            }
            count += 1;
        };
        run(&order);
        let mut i = 0;
        while i < order.len() {
            if c[i] < i {
                if i % 2 == 0 { order.swap(0, i) } else { order.swap(c[i], i) }
                run(&order);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        assert_eq!(count, 720);
        // (a,b) and (a,x) join first; (b,c) and (x,c) would put c with a and b; (c,d) joins.
        assert_eq!(first.unwrap_or_default(), ["x", "x", "c", "c", "x"]);
    }

    #[test]
    fn a_split_reports_what_moved_and_refuses_a_later_link() {
        let mut id = Identity::default();
        for (u, t) in [("h", "2020-01-01 00:00:00"), ("s", "2021-01-01 00:00:00"), ("t", "2022-01-01 00:00:00")] {
            id.person(u, Some(t));
        }
        assert_eq!(id.link("h", "s").0, vec![Change::Merged(Merged { winner: "h".into(), loser: "s".into() })]);
        assert_eq!(id.link("s", "t").0, vec![Change::Merged(Merged { winner: "h".into(), loser: "t".into() })]);
        let changes = id.keep_apart(&["h".into()], &["s".into(), "t".into()]);
        assert_eq!(changes, vec![Change::Split { survivor: "s".into(), from: "h".into(), records: vec!["s".into(), "t".into()] }]);
        assert_eq!((id.canonical("t"), id.canonical("h")), ("s".into(), "h".into()));
        assert!(id.keep_apart(&["h".into()], &["s".into()]).is_empty(), "already apart");
        // The same identifier again: kept apart, and said so.
        let (changes, refused) = id.link("t", "h");
        assert!(changes.is_empty() && refused);
        // A new record linked to s joins s's side.
        id.person("u", Some("2017-01-01 00:00:00"));
        let (changes, refused) = id.link("u", "s");
        assert_eq!(changes, vec![Change::Merged(Merged { winner: "u".into(), loser: "s".into() })]);
        assert!(!refused);
    }

    /// 100 k records, a third of them in pairs (the bench's share of duplicates): what
    /// keeping the links for splits costs per record.
    #[test]
    fn links_cost_a_few_bytes_per_record() {
        let mut with = Identity::default();
        let mut without = Identity::default();
        for i in 0..100_000u32 {
            let u = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
            for id in [&mut with, &mut without] {
                id.person(&u, Some("2020-01-01 00:00:00"));
            }
            if i % 6 == 1 {
                let prev = format!("{:08x}-0000-4000-8000-{:012x}", i - 1, i - 1);
                with.link(&u, &prev);
                without.link(&u, &prev);
            }
        }
        (without.links, without.more_links) = Default::default();
        let per = (with.approx_bytes() - without.approx_bytes()) as f64 / 100_000.0;
        println!("BENCH identity_link_bytes_per_record {per:.1} bytes");
        assert!(per < 8.0, "{per} bytes per record for the links");
    }
}
