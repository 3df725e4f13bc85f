//! A bounded cache by (table, row key) that looks entries up without allocating.


/// Row keys (or uuids) by table, for the lookups made in bulk before a batch is planned.
pub(super) type Wanted<'a> = hashbrown::HashMap<String, hashbrown::HashSet<&'a str>>;

/// [`Wanted`] for one table.
pub(super) fn wanted<'a>(table: &str, keys: impl IntoIterator<Item = &'a str>) -> Wanted<'a> {
    Wanted::from([(table.to_string(), keys.into_iter().collect())])
}

/// (table, row key): the key of the caches and sets that follow rows.
pub(super) type TKey = (String, String);

/// A (table, row key) looked up without building a [`TKey`]: it hashes and compares the same
/// (a derived `Hash` hashes the fields in order, as a tuple does).
#[derive(Hash)]
pub(super) struct Tk<'a>(pub(super) &'a str, pub(super) &'a str);

impl hashbrown::Equivalent<TKey> for Tk<'_> {
    fn equivalent(&self, k: &TKey) -> bool {
        self.0 == k.0 && self.1 == k.1
    }
}

/// A bounded cache by (table, row key), looked up without allocating: two generations, the
/// current one and the one before it. An entry read from the older generation moves to the
/// current one; when the current one is full it becomes the older one and the older one is
/// dropped. It holds between `cap / 2` and `cap` entries, the most recently used of them.
pub(super) struct Cache<V> {
    pub(super) cur: hashbrown::HashMap<TKey, V>,
    pub(super) old: hashbrown::HashMap<TKey, V>,
    pub(super) half: usize,
}

impl<V> Cache<V> {
    pub(super) fn new(cap: usize) -> Self {
        Cache { cur: hashbrown::HashMap::new(), old: hashbrown::HashMap::new(), half: (cap / 2).max(1) }
    }

    pub(super) fn get(&mut self, table: &str, key: &str) -> Option<&V> {
        let q = Tk(table, key);
        if !self.cur.contains_key(&q) {
            let (k, v) = self.old.remove_entry(&q)?;
            self.put(k, v);
        }
        self.cur.get(&q)
    }

    pub(super) fn peek(&self, table: &str, key: &str) -> Option<&V> {
        let q = Tk(table, key);
        self.cur.get(&q).or_else(|| self.old.get(&q))
    }

    pub(super) fn contains(&self, table: &str, key: &str) -> bool {
        self.peek(table, key).is_some()
    }

    pub(super) fn put(&mut self, k: TKey, v: V) {
        self.old.remove(&k);
        if self.cur.len() >= self.half && !self.cur.contains_key(&k) {
            self.old = std::mem::take(&mut self.cur);
        }
        self.cur.insert(k, v);
    }

    /// [`Cache::put`], building the key only when the entry is not in the current generation.
    pub(super) fn put_ref(&mut self, table: &str, key: &str, v: V) {
        match self.cur.get_mut(&Tk(table, key)) {
            Some(slot) => *slot = v,
            None => self.put((table.to_string(), key.to_string()), v),
        }
    }

    pub(super) fn pop(&mut self, table: &str, key: &str) -> Option<V> {
        let q = Tk(table, key);
        let a = self.cur.remove(&q);
        let b = self.old.remove(&q);
        a.or(b)
    }
}

#[cfg(test)]
mod cache_tests {
    use super::{Cache, Tk};

    #[test]
    fn borrowed_keys_find_owned_ones() {
        let mut set: hashbrown::HashSet<(String, String)> = hashbrown::HashSet::new();
        set.insert(("obs".into(), "a-uuid".into()));
        assert!(set.contains(&Tk("obs", "a-uuid")));
        assert!(!set.contains(&Tk("obs", "b-uuid")));
        // The parts are not run together: ("ab", "c") is not ("a", "bc").
        set.insert(("ab".into(), "c".into()));
        assert!(!set.contains(&Tk("a", "bc")));
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_half_to_all_of_its_capacity() {
        let mut c: Cache<i64> = Cache::new(4);
        c.put(("t".into(), "1".into()), 1);
        c.put(("t".into(), "2".into()), 2);
        // The current generation is full (2): it becomes the older one.
        c.put(("t".into(), "3".into()), 3);
        assert_eq!(c.peek("t", "1"), Some(&1));
        // Read from the older generation: it moves to the current one and survives the next turn.
        assert_eq!(c.get("t", "1"), Some(&1));
        c.put(("t".into(), "4".into()), 4);
        c.put(("t".into(), "5".into()), 5);
        assert_eq!(c.peek("t", "1"), Some(&1));
        assert_eq!(c.peek("t", "2"), None, "the least recently used entry is gone");
        assert!(c.contains("t", "5"));
        c.put_ref("t", "5", 50);
        assert_eq!(c.get("t", "5"), Some(&50));
        assert_eq!(c.pop("t", "5"), Some(50));
        assert_eq!(c.get("t", "5"), None);
    }
}
