//! The merges HQ knows of, by loser, with the losers of each survivor beside them: "whose
//! survivor is X" is a lookup, not a pass over every merge. (A pass per merge made a cold
//! replay's 29,000 merges quadratic: a profile of the HQ sink put 37 % of its CPU in comparing
//! uuids there.) The maps hash with foldhash (hashbrown's default): every reference of every
//! change asks them for its survivor, and SipHash put 2–3 % of the sink's CPU there.

use hashbrown::{HashMap, HashSet};

use super::merge::MergeRec;

#[derive(Default)]
pub(super) struct MergeMap {
    by_loser: HashMap<String, MergeRec>,
    /// Losers by the survivor their record names (the direct one, not the end of its chain).
    by_winner: HashMap<String, HashSet<String>>,
    /// Merges not applied yet.
    waiting: usize,
    /// Records a split made survivors again (`omrs_sync_released`): alive at HQ though their
    /// clinic voided them by merging them (issue #23 §4), until they are merged again.
    released: HashSet<String>,
}

impl MergeMap {
    pub(super) fn get(&self, loser: &str) -> Option<&MergeRec> {
        self.by_loser.get(loser)
    }

    pub(super) fn contains_key(&self, loser: &str) -> bool {
        self.by_loser.contains_key(loser)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &MergeRec)> {
        self.by_loser.iter()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_loser.is_empty()
    }

    /// Whether a merge is waiting for its persons (not applied yet).
    pub(super) fn any_waiting(&self) -> bool {
        self.waiting > 0
    }

    /// Whether some record names `uuid` as its survivor.
    pub(super) fn is_survivor(&self, uuid: &str) -> bool {
        self.by_winner.get(uuid).is_some_and(|s| !s.is_empty())
    }

    /// The records that name `winner` as their survivor.
    pub(super) fn losers_of(&self, winner: &str) -> Vec<String> {
        self.by_winner.get(winner).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    pub(super) fn is_released(&self, uuid: &str) -> bool {
        self.released.contains(uuid)
    }

    pub(super) fn release(&mut self, uuid: &str) {
        self.released.insert(uuid.to_string());
    }

    /// A record merged again is no longer released ([`MergeMap::insert`] forgets it too).
    pub(super) fn insert(&mut self, loser: String, rec: MergeRec) -> Option<MergeRec> {
        self.released.remove(&loser);
        self.by_winner.entry(rec.winner.clone()).or_default().insert(loser.clone());
        self.waiting += usize::from(!rec.applied);
        let old = self.by_loser.insert(loser.clone(), rec);
        if let Some(o) = &old {
            self.unindex(&loser, o);
        }
        old
    }

    pub(super) fn remove(&mut self, loser: &str) -> Option<MergeRec> {
        let old = self.by_loser.remove(loser)?;
        self.unindex(loser, &old);
        Some(old)
    }

    /// Points `loser`'s record at another survivor.
    pub(super) fn set_winner(&mut self, loser: &str, winner: &str) {
        if let Some(mut rec) = self.remove(loser) {
            rec.winner = winner.to_string();
            self.insert(loser.to_string(), rec);
        }
    }

    /// Forgets `old`, the record `loser` had, in the index and the count (unless `loser` now
    /// has a record naming the same survivor).
    fn unindex(&mut self, loser: &str, old: &MergeRec) {
        self.waiting -= usize::from(!old.applied);
        if self.by_loser.get(loser).is_some_and(|now| now.winner == old.winner) {
            return;
        }
        if let Some(s) = self.by_winner.get_mut(&old.winner) {
            s.remove(loser);
            if s.is_empty() {
                self.by_winner.remove(&old.winner);
            }
        }
    }
}

impl FromIterator<(String, MergeRec)> for MergeMap {
    fn from_iter<I: IntoIterator<Item = (String, MergeRec)>>(iter: I) -> Self {
        let mut m = MergeMap::default();
        for (l, r) in iter {
            m.insert(l, r);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(winner: &str, applied: bool) -> MergeRec {
        MergeRec { winner: winner.into(), ts_ms: 0, reason: "r".into(), applied, evidence: String::new(), site: "s".into(), review_id: None }
    }

    /// The index and the waiting count follow every insert, re-point and remove.
    #[test]
    fn the_survivor_index_follows_every_change() {
        let mut m: MergeMap = [("a".to_string(), rec("w", false)), ("b".to_string(), rec("w", true))].into_iter().collect();
        let mut l = m.losers_of("w");
        l.sort();
        assert_eq!(l, ["a", "b"]);
        assert!(m.any_waiting() && m.is_survivor("w") && !m.is_survivor("a"));
        m.set_winner("a", "x");
        assert_eq!(m.losers_of("w"), ["b"]);
        assert_eq!(m.losers_of("x"), ["a"]);
        assert!(m.any_waiting());
        // Re-recorded as applied, same survivor: still indexed, no longer waiting.
        m.insert("a".into(), rec("x", true));
        assert_eq!(m.losers_of("x"), ["a"]);
        assert!(!m.any_waiting());
        m.remove("b");
        assert!(!m.is_survivor("w"));
        m.remove("a");
        assert!(m.is_empty() && !m.is_survivor("x") && !m.any_waiting());
    }
}
