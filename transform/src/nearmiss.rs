//! Near misses: person records at two clinics with the same name, sex and birthdate, each
//! holding an identifier, that no identifier or site merge joined. Perhaps one person whose
//! numbers differ (a misprint, a second card), perhaps two (namesakes born the same day): a
//! suggestion for a person to look at, never a merge.
//!
//! Records are the identity index's record numbers. A record's key is its latest sex and
//! birthdate (from `person`) with its latest preferred name (from `person_name`), normalised
//! (case, spacing); only records whose key is complete are indexed.

use std::collections::{HashMap, HashSet};

/// One part of a record's demographics.
pub enum Part<'a> {
    /// `<gender>|<YYYY-MM-DD>`.
    SexBirth(&'a str),
    /// `<given> <family>`.
    Name(&'a str),
}

#[derive(Default)]
struct Parts {
    site: Box<str>,
    sex_birth: Option<Box<str>>,
    name: Option<Box<str>>,
    /// 0: incomplete.
    key: u64,
}

#[derive(Default)]
pub struct NearMiss {
    parts: HashMap<u32, Parts>,
    index: HashMap<u64, Vec<u32>>,
    holds: HashSet<u32>,
}

/// Lower case, single spaces, no spaces at the ends.
fn norm(s: &str) -> String {
    s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// FNV-1a: a key that stays the same across versions and restarts.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h = (h ^ 0x1f).wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.max(1)
}

impl NearMiss {
    /// Sets one part of `rec`'s demographics; returns the records it now matches, or None
    /// when the part is what it was (nothing to record or suggest).
    pub fn set(&mut self, rec: u32, site: &str, part: Part<'_>) -> Option<Vec<u32>> {
        let p = self.parts.entry(rec).or_default();
        let (slot, v) = match part {
            Part::SexBirth(v) => (&mut p.sex_birth, norm(v)),
            Part::Name(v) => (&mut p.name, norm(v)),
        };
        if slot.as_deref() == Some(v.as_str()) && *p.site == *site {
            return None;
        }
        *slot = Some(v.into());
        if *p.site != *site {
            p.site = site.into();
        }
        let key = match (&p.sex_birth, &p.name) {
            (Some(sb), Some(n)) if !n.is_empty() => fnv(&[n, sb]),
            _ => 0,
        };
        let old = std::mem::replace(&mut p.key, key);
        if old != key {
            if let Some(b) = self.index.get_mut(&old) {
                b.retain(|r| *r != rec);
                if b.is_empty() {
                    self.index.remove(&old);
                }
            }
            if key != 0 {
                self.index.entry(key).or_default().push(rec);
            }
        }
        Some(self.matches(rec))
    }

    /// `rec` holds a configured identifier; returns the records it now matches, or None when
    /// it already held one.
    pub fn holds_identifier(&mut self, rec: u32) -> Option<Vec<u32>> {
        self.holds.insert(rec).then(|| self.matches(rec))
    }

    /// Records of another clinic with `rec`'s key, both holding an identifier.
    fn matches(&self, rec: u32) -> Vec<u32> {
        let Some(p) = self.parts.get(&rec).filter(|p| p.key != 0 && self.holds.contains(&rec)) else { return Vec::new() };
        self.index
            .get(&p.key)
            .map(|b| b.iter().copied().filter(|r| *r != rec && self.holds.contains(r) && self.parts.get(r).is_some_and(|q| q.site != p.site)).collect())
            .unwrap_or_default()
    }

    /// What the suggestion says: the normalised name and sex and birthdate, and the two sites.
    pub fn evidence(&self, a: u32, b: u32) -> serde_json::Value {
        let get = |r: u32| self.parts.get(&r);
        serde_json::json!({
            "name": get(a).and_then(|p| p.name.as_deref()),
            "sex_birthdate": get(a).and_then(|p| p.sex_birth.as_deref()),
            "sites": [get(a).map(|p| &*p.site), get(b).map(|p| &*p.site)],
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
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
}
