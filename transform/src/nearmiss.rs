//! Near misses: person records at two clinics with the same name, sex and birthdate, each
//! holding an identifier, that no identifier or site merge joined. Perhaps one person whose
//! numbers differ (a misprint, a second card), perhaps two (namesakes born the same day): a
//! suggestion for a person to look at, never a merge.
//!
//! Records are the identity index's record numbers. A record's key is its latest sex and
//! birthdate (from `person`) with its latest preferred name (from `person_name`), normalised
//! (case, spacing) and hashed; only records whose key is complete are indexed. Two different
//! people whose keys collide (64 bits) would be suggested: a suggestion, never a merge.

use std::collections::{HashMap, HashSet};

/// One part of a record's demographics.
pub enum Part<'a> {
    /// `<gender>|<YYYY-MM-DD>`.
    SexBirth(&'a str),
    /// `<given> <family>`.
    Name(&'a str),
}

/// A record's parts, as hashes (a record costs about 70 bytes; the names themselves are at
/// HQ, where `identity show` reads them).
#[derive(Default, Clone, Copy)]
struct Parts {
    /// Index into `NearMiss::sites`.
    site: u16,
    sex_birth: u64,
    name: u64,
    /// 0: incomplete.
    key: u64,
}

#[derive(Default)]
pub struct NearMiss {
    parts: HashMap<u32, Parts>,
    /// Key → the first record with it; more records with the same key in `more`.
    index: HashMap<u64, u32>,
    more: HashMap<u64, Vec<u32>>,
    holds: HashSet<u32>,
    sites: Vec<Box<str>>,
}

/// Lower case, single spaces, no spaces at the ends.
fn norm(s: &str) -> String {
    s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// FNV-1a: a hash that stays the same across versions and restarts (0 is kept for "none").
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

impl NearMiss {
    fn site_index(&mut self, site: &str) -> u16 {
        match self.sites.iter().position(|s| **s == *site) {
            Some(i) => i as u16,
            None => {
                self.sites.push(site.into());
                (self.sites.len() - 1) as u16
            }
        }
    }

    /// Sets one part of `rec`'s demographics; returns the records it now matches, or None
    /// when the part is what it was (nothing to record or suggest).
    pub fn set(&mut self, rec: u32, site: &str, part: Part<'_>) -> Option<Vec<u32>> {
        let site = self.site_index(site);
        let mut p = self.parts.get(&rec).copied().unwrap_or_default();
        let (slot, h) = match part {
            Part::SexBirth(v) => (&mut p.sex_birth, fnv(&norm(v))),
            Part::Name(v) => (&mut p.name, fnv(&norm(v))),
        };
        if *slot == h && p.site == site && self.parts.contains_key(&rec) {
            return None;
        }
        *slot = h;
        p.site = site;
        let key = if p.sex_birth != 0 && p.name != 0 { (p.sex_birth ^ p.name.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15).max(1) } else { 0 };
        let old = std::mem::replace(&mut p.key, key);
        self.parts.insert(rec, p);
        if old != key {
            self.unindex(old, rec);
            if key != 0 {
                match self.index.get(&key) {
                    None => {
                        self.index.insert(key, rec);
                    }
                    Some(_) => self.more.entry(key).or_default().push(rec),
                }
            }
        }
        Some(self.matches(rec))
    }

    fn unindex(&mut self, key: u64, rec: u32) {
        if key == 0 {
            return;
        }
        if let Some(m) = self.more.get_mut(&key) {
            m.retain(|r| *r != rec);
        }
        if self.index.get(&key) == Some(&rec) {
            match self.more.get_mut(&key).and_then(Vec::pop) {
                Some(next) => {
                    self.index.insert(key, next);
                }
                None => {
                    self.index.remove(&key);
                }
            }
        }
        if self.more.get(&key).is_some_and(Vec::is_empty) {
            self.more.remove(&key);
        }
    }

    /// `rec` holds a configured identifier; returns the records it now matches, or None when
    /// it already held one.
    pub fn holds_identifier(&mut self, rec: u32) -> Option<Vec<u32>> {
        self.holds.insert(rec).then(|| self.matches(rec))
    }

    /// Records of another clinic with `rec`'s key, both holding an identifier.
    fn matches(&self, rec: u32) -> Vec<u32> {
        let Some(p) = self.parts.get(&rec).filter(|p| p.key != 0 && self.holds.contains(&rec)) else { return Vec::new() };
        let first = self.index.get(&p.key).copied();
        first
            .into_iter()
            .chain(self.more.get(&p.key).into_iter().flatten().copied())
            .filter(|r| *r != rec && self.holds.contains(r) && self.parts.get(r).is_some_and(|q| q.site != p.site))
            .collect()
    }

    /// What the suggestion says: the two clinics (the names and birthdates are at HQ).
    pub fn evidence(&self, a: u32, b: u32) -> serde_json::Value {
        let site = |r: u32| self.parts.get(&r).and_then(|p| self.sites.get(p.site as usize)).map(|s| s.to_string());
        serde_json::json!({"matched_on": "name, sex and birthdate", "sites": [site(a), site(b)]})
    }

    /// Approximate heap bytes held (for `omrs_stream_identity_index_bytes`).
    pub fn approx_bytes(&self) -> usize {
        self.parts.capacity() * (std::mem::size_of::<(u32, Parts)>() + 1)
            + self.index.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            + self.more.values().map(|m| m.capacity() * 4 + 48).sum::<usize>()
            + self.holds.capacity() * 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_sex_and_birthdate_at_two_clinics_with_identifiers_match() {
        let mut n = NearMiss::default();
        assert_eq!(n.set(1, "a", Part::SexBirth("F|1980-01-02")), Some(vec![]));
        assert_eq!(n.set(1, "a", Part::Name("Jane  Doe")), Some(vec![]));
        assert_eq!(n.holds_identifier(1), Some(vec![]));
        assert_eq!(n.holds_identifier(1), None, "already held");
        assert_eq!(n.set(1, "a", Part::Name("jane doe")), None, "the same name, normalised");
        // Same clinic: no.
        n.set(2, "a", Part::SexBirth("F|1980-01-02"));
        n.set(2, "a", Part::Name("jane doe"));
        assert_eq!(n.holds_identifier(2), Some(vec![]));
        // Another clinic, no identifier yet: no; with one: both earlier records.
        n.set(3, "b", Part::Name(" JANE doe "));
        assert_eq!(n.set(3, "b", Part::SexBirth("F|1980-01-02")), Some(vec![]));
        let mut m = n.holds_identifier(3).unwrap_or_default();
        m.sort();
        assert_eq!(m, vec![1, 2]);
        // Another birthdate: no longer; back: again.
        n.set(3, "b", Part::SexBirth("F|1980-01-03"));
        assert_eq!(n.set(1, "a", Part::Name("Jane Doe X")), Some(vec![]));
        assert_eq!(n.set(1, "a", Part::Name("Jane Doe")), Some(vec![]), "2 is at the same clinic, 3 born another day");
        let mut m = n.set(3, "b", Part::SexBirth("F|1980-01-02")).unwrap_or_default();
        m.sort();
        assert_eq!(m, vec![1, 2]);
    }

    #[test]
    fn a_record_costs_under_a_hundred_bytes() {
        let mut n = NearMiss::default();
        let people = 100_000u32;
        for r in 0..people {
            n.set(r, if r % 2 == 0 { "site-a" } else { "site-b" }, Part::SexBirth(&format!("F|19{:02}-0{}-1{}", r % 100, r % 9 + 1, r % 10)));
            n.set(r, "site-a", Part::Name(&format!("Given{r} Family{}", r % 997)));
            n.holds_identifier(r);
        }
        let per = n.approx_bytes() / people as usize;
        println!("near-miss bytes per record: {per}");
        assert!(per <= 100, "{per} bytes per record");
    }
}
