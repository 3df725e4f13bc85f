//! The site's binlog order, put back together from Debezium's topics (no I/O: driven by the
//! records the input reads, each topic's end as the consumer last saw it, and the clock).
//!
//! Debezium writes each table to its own topic, and Kafka Connect's producer sends them
//! independently: an insert of an encounter and of its obs, one after the other in the clinic's
//! binlog, can become readable in either order. Each topic partition (a *lane*) is in binlog
//! order. The merge hands out the record with the least position of all lanes' heads:
//!
//! - snapshot reads (`r`) first, by table in the model's dependency order (parents first: every
//!   snapshot read carries the same binlog position), then by offset;
//! - binlog changes by (file, position, row within the event), ties by lane.
//!
//! A record goes out only when no lane could still deliver an earlier one: every other lane has
//! a record waiting (whose position is then later), or has been read to its end and the record
//! has waited `grace_ms` since it arrived, the time allowed for an earlier record of that lane
//! still on its way from Connect. A lane with unread records blocks the merge, however long.

use std::collections::VecDeque;

/// Where a record stands in the site's order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A snapshot read: before every binlog change; parent tables first.
    Snapshot { rank: u32, offset: i64 },
    /// A binlog change (a row, or a DDL).
    Binlog { file: String, pos: u64, row: u32 },
}

/// One record waiting in its lane.
#[derive(Debug)]
pub struct Item<T> {
    pub key: Key,
    pub offset: i64,
    pub arrived_ms: i64,
    pub value: T,
}

struct Lane<T> {
    queue: VecDeque<Item<T>>,
    /// The offset after the last record pushed (the consumer's position in this lane).
    next_offset: i64,
    /// The lane's end as the consumer last saw it (high watermark), -1 when unknown.
    end: i64,
}

/// What [`Merge::next`] found.
#[derive(Debug)]
pub enum Next<T> {
    /// The next record in the site's order, from this lane.
    Ready(usize, Item<T>),
    /// A record is waiting for quiet lanes' grace, until this time (ms).
    WaitUntil(i64),
    /// A lane with unread records must be read first, or nothing waits at all.
    Blocked,
}

pub struct Merge<T> {
    lanes: Vec<Lane<T>>,
    grace_ms: i64,
}

impl<T> Merge<T> {
    pub fn new(grace_ms: u64) -> Self {
        Merge { lanes: Vec::new(), grace_ms: grace_ms as i64 }
    }

    /// A new lane read from `offset` on; its index.
    pub fn add_lane(&mut self, offset: i64) -> usize {
        self.lanes.push(Lane { queue: VecDeque::new(), next_offset: offset, end: -1 });
        self.lanes.len() - 1
    }

    /// The offset after the last record pushed to `lane` (where it was started, before any).
    pub fn next_offset(&self, lane: usize) -> i64 {
        self.lanes.get(lane).map_or(0, |l| l.next_offset)
    }

    /// Records waiting in `lane`.
    pub fn waiting(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.queue.len())
    }

    /// Records waiting in all lanes.
    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.queue.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| l.queue.is_empty())
    }

    /// A record read from `lane` at `offset`.
    pub fn push(&mut self, lane: usize, key: Key, offset: i64, now_ms: i64, value: T) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.next_offset = offset + 1;
            l.queue.push_back(Item { key, offset, arrived_ms: now_ms, value });
        }
    }

    /// The lane's end (high watermark) as the consumer sees it now.
    pub fn set_end(&mut self, lane: usize, end: i64) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.end = end;
        }
    }

    /// True when every record of `lane` up to its known end has been read.
    pub fn read_to_end(&self, lane: usize) -> bool {
        self.lanes.get(lane).is_some_and(|l| l.end >= 0 && l.next_offset >= l.end)
    }

    /// True when every lane has been read to its known end.
    pub fn all_read(&self) -> bool {
        (0..self.lanes.len()).all(|i| self.read_to_end(i))
    }

    /// The next record in the site's order, if it may go out at `now_ms`.
    pub fn next(&mut self, now_ms: i64) -> Next<T> {
        let mut best: Option<(usize, &Key)> = None;
        for (i, l) in self.lanes.iter().enumerate() {
            if let Some(head) = l.queue.front() {
                if best.is_none_or(|(_, k)| head.key < *k) {
                    best = Some((i, &head.key));
                }
            }
        }
        let Some((lane, _)) = best else { return Next::Blocked };
        let mut wait_until = i64::MIN;
        for (i, l) in self.lanes.iter().enumerate() {
            if i == lane || !l.queue.is_empty() {
                continue;
            }
            if !(l.end >= 0 && l.next_offset >= l.end) {
                return Next::Blocked;
            }
            wait_until = wait_until.max(self.lanes[lane].queue.front().map_or(0, |h| h.arrived_ms) + self.grace_ms);
        }
        if wait_until > now_ms {
            return Next::WaitUntil(wait_until);
        }
        match self.lanes[lane].queue.pop_front() {
            Some(item) => Next::Ready(lane, item),
            None => Next::Blocked,
        }
    }

    /// Puts back a record [`Merge::next`] handed out (it could not go out yet).
    pub fn unread(&mut self, lane: usize, item: Item<T>) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.queue.push_front(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(pos: u64, row: u32) -> Key {
        Key::Binlog { file: "mysql-bin.000001".into(), pos, row }
    }

    fn drain(m: &mut Merge<&'static str>, now: i64) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Next::Ready(_, item) = m.next(now) {
            out.push(item.value);
        }
        out
    }

    #[test]
    fn lanes_are_merged_by_binlog_position_whatever_order_they_arrive_in() {
        let mut m = Merge::new(500);
        let (enc, obs) = (m.add_lane(0), m.add_lane(0));
        // The obs topic is read first; its encounter (earlier in the binlog) is not read yet.
        m.push(obs, bin(200, 0), 0, 0, "obs 1");
        m.push(obs, bin(200, 1), 1, 0, "obs 2");
        m.set_end(enc, 1);
        assert!(matches!(m.next(10_000), Next::Blocked), "the encounter lane has a record unread");
        m.push(enc, bin(100, 0), 0, 5, "encounter");
        m.set_end(obs, 2);
        assert_eq!(drain(&mut m, 10_000), vec!["encounter", "obs 1", "obs 2"]);
    }

    #[test]
    fn a_quiet_lane_holds_a_record_only_for_the_grace() {
        let mut m = Merge::new(500);
        let (a, b) = (m.add_lane(0), m.add_lane(7));
        m.set_end(b, 7);
        m.push(a, bin(100, 0), 0, 1_000, "a");
        m.set_end(a, 1);
        assert!(matches!(m.next(1_200), Next::WaitUntil(1_500)));
        // Within the grace, an earlier record of the quiet lane arrives and goes first.
        m.push(b, bin(50, 0), 7, 1_300, "b");
        m.set_end(b, 8);
        assert_eq!(drain(&mut m, 1_300), vec!["b"]);
        assert_eq!(drain(&mut m, 1_499), Vec::<&str>::new());
        assert_eq!(drain(&mut m, 1_500), vec!["a"]);
    }

    #[test]
    fn snapshot_reads_go_first_parents_first_then_the_binlog() {
        let mut m = Merge::new(0);
        let (person, obs) = (m.add_lane(0), m.add_lane(0));
        m.push(obs, Key::Snapshot { rank: 9, offset: 0 }, 0, 0, "obs r");
        m.push(obs, bin(10, 0), 1, 0, "obs c");
        m.push(person, Key::Snapshot { rank: 1, offset: 0 }, 0, 0, "person r");
        m.push(person, bin(5, 0), 1, 0, "person u");
        m.set_end(person, 2);
        m.set_end(obs, 2);
        assert_eq!(drain(&mut m, 0), vec!["person r", "obs r", "person u", "obs c"]);
    }
}
