//! Patient identity across sites: a union-find over person records (keyed by person uuid,
//! which is unique per site record; shared metadata persons such as users carry the same uuid
//! everywhere and are one record), joined by configured identifiers and by site-side merges.
//!
//! The survivor of a component is deterministic: the earliest `person.date_created`, then the
//! smallest uuid. It depends only on the set of records in the component, so the final
//! assignment is the same whatever the arrival order.

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

    /// Joins two records. Returns the merge if they were in different components.
    pub fn union(&mut self, a: &str, b: &str) -> Option<Merged> {
        let (ia, ib) = (self.rec(a), self.rec(b));
        let (ra, rb) = (self.find(ia), self.find(ib));
        if ra == rb {
            return None;
        }
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
        Some(Merged { winner: self.recs[winner as usize].uuid.to_string(), loser: self.recs[loser as usize].uuid.to_string() })
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
}
