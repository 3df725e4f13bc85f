//! MySQL's executed GTID set as the agent keeps it (issue #25 §1): read with the snapshot's
//! position (`Executed_Gtid_Set` of `SHOW MASTER STATUS`, under the snapshot's lock, so the two
//! agree), grown by every transaction's GTID the agent reads to its end, and written into each
//! checkpoint's position. With it the agent can ask a MySQL server for "everything after these
//! transactions" (`COM_BINLOG_DUMP_GTID`): after a fail-over to a replica whose binlog files
//! have other names, or when the checkpoint's file was purged but the transactions after it
//! are still in later files.
//!
//! The text form is MySQL's: `uuid:1-5:7,uuid2:1-3`, a tagged part (MySQL 8.3+) as
//! `uuid:tag:1-3`. Pure code, no I/O.

use std::collections::BTreeMap;
use std::fmt;

/// (server uuid, lower case; tag, lower case, "" for none) → closed intervals of transaction
/// numbers, sorted, disjoint and not adjacent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidSet {
    sets: BTreeMap<(String, String), Vec<(u64, u64)>>,
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().enumerate().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() })
}

fn is_tag(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && cs.all(|c| c.is_ascii_alphanumeric() || c == '_') && s.len() <= 32
}

impl GtidSet {
    /// Parses MySQL's text form (whitespace and newlines between parts are allowed, as
    /// `SHOW MASTER STATUS` prints them). The empty string is the empty set.
    pub fn parse(text: &str) -> Result<GtidSet, String> {
        let mut set = GtidSet::default();
        for element in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let mut parts = element.split(':').map(str::trim);
            let uuid = parts.next().unwrap_or("");
            if !is_uuid(uuid) {
                return Err(format!("GTID set `{text}`: `{uuid}` is not a server uuid"));
            }
            let mut tag = String::new();
            let mut any = false;
            for part in parts {
                if is_tag(part) {
                    tag = part.to_ascii_lowercase();
                    continue;
                }
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                let (a, b) = match (a.parse::<u64>(), b.parse::<u64>()) {
                    (Ok(a), Ok(b)) if a >= 1 && a <= b => (a, b),
                    _ => return Err(format!("GTID set `{text}`: `{part}` is neither an interval (`1-5`, `7`) nor a tag")),
                };
                set.add_range(uuid, &tag, a, b);
                any = true;
            }
            if !any {
                return Err(format!("GTID set `{text}`: `{element}` has no transaction numbers"));
            }
        }
        Ok(set)
    }

    /// Adds one GTID as the agent writes it (`uuid:gno` or `uuid:tag:gno`); false when the text
    /// is no MySQL GTID (a MariaDB `domain-server-seq`, say), which leaves the set as it was.
    pub fn add(&mut self, gtid: &str) -> bool {
        let parts: Vec<&str> = gtid.split(':').collect();
        let (uuid, tag, gno) = match parts.as_slice() {
            [u, n] => (*u, "", *n),
            [u, t, n] if is_tag(t) => (*u, *t, *n),
            _ => return false,
        };
        match gno.parse::<u64>() {
            Ok(n) if n >= 1 && is_uuid(uuid) => {
                self.add_range(uuid, &tag.to_ascii_lowercase(), n, n);
                true
            }
            _ => false,
        }
    }

    fn add_range(&mut self, uuid: &str, tag: &str, a: u64, b: u64) {
        let v = self.sets.entry((uuid.to_ascii_lowercase(), tag.to_string())).or_default();
        v.push((a, b));
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for &(s, e) in v.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        *v = merged;
    }

    pub fn contains(&self, uuid: &str, tag: &str, gno: u64) -> bool {
        self.sets.get(&(uuid.to_ascii_lowercase(), tag.to_ascii_lowercase())).is_some_and(|v| v.iter().any(|&(a, b)| a <= gno && gno <= b))
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// The set as the request's sids: one per (uuid, tag), in the form mysql_common parses.
    pub fn sids(&self) -> Result<Vec<mysql_async::Sid<'static>>, String> {
        self.elements().map(|e| e.parse::<mysql_async::Sid<'static>>().map_err(|err| format!("GTID set part `{e}`: {err}"))).collect()
    }

    fn elements(&self) -> impl Iterator<Item = String> + '_ {
        self.sets.iter().map(|((uuid, tag), ranges)| {
            let mut s = uuid.clone();
            if !tag.is_empty() {
                s.push(':');
                s.push_str(tag);
            }
            for &(a, b) in ranges {
                if a == b {
                    s.push_str(&format!(":{a}"));
                } else {
                    s.push_str(&format!(":{a}-{b}"));
                }
            }
            s
        })
    }
}

impl fmt::Display for GtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.elements().collect::<Vec<_>>().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const B: &str = "b9b4712a-df64-11e3-b391-60672090eb04";

    #[test]
    fn mysqls_text_form_round_trips_and_transactions_merge_into_intervals() {
        let printed = format!("{}:1-5:7,\n{B}:1-3", A.to_ascii_uppercase());
        let mut s = GtidSet::parse(&printed).unwrap();
        assert_eq!(s.to_string(), format!("{A}:1-5:7,{B}:1-3"));
        assert!(s.add(&format!("{A}:6")), "6 joins 1-5 and 7");
        assert_eq!(s.to_string(), format!("{A}:1-7,{B}:1-3"));
        assert!(s.add(&format!("{B}:mytag:3")));
        assert!(s.add(&format!("{B}:mytag:1")));
        assert_eq!(s.to_string(), format!("{A}:1-7,{B}:1-3,{B}:mytag:1:3"));
        assert_eq!(GtidSet::parse(&s.to_string()).unwrap(), s);
        assert!(s.contains(&A.to_ascii_uppercase(), "", 4) && !s.contains(A, "", 8) && s.contains(B, "mytag", 3) && !s.contains(B, "mytag", 2));
        // MySQL's grouped form: a uuid, then untagged and tagged intervals.
        let grouped = GtidSet::parse(&format!("{B}:1-3:mytag:1:3")).unwrap();
        assert_eq!(grouped.to_string(), format!("{B}:1-3,{B}:mytag:1:3"));
        assert_eq!(GtidSet::parse("").unwrap(), GtidSet::default());
        assert!(!s.add("0-1-42"), "a MariaDB GTID is not a MySQL one");
    }

    #[test]
    fn bad_text_is_refused_naming_the_part() {
        assert!(GtidSet::parse("not-a-uuid:1-3").unwrap_err().contains("`not-a-uuid` is not a server uuid"));
        assert!(GtidSet::parse(&format!("{A}:5-3")).unwrap_err().contains("`5-3`"));
        assert!(GtidSet::parse(A).unwrap_err().contains("no transaction numbers"));
        assert!(GtidSet::parse(&format!("{A}:0")).is_err(), "transaction numbers start at 1");
    }

    #[test]
    fn the_request_gets_one_sid_per_server_and_tag() {
        let s = GtidSet::parse(&format!("{A}:1-5:7,{B}:mytag:2")).unwrap();
        let sids = s.sids().unwrap();
        assert_eq!(sids.len(), 2);
        assert_eq!(sids[0].to_string(), format!("{A}:1-5:7"));
        assert_eq!(sids[1].to_string(), format!("{B}:mytag:2"));
    }
}
