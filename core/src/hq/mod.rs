//! The HQ side of the contract: the records of `omrs.hq.changes` ([`HqEvent`], written by the
//! transform, read by both sinks) and the one conflict rule of DESIGN.md semantics 6
//! ([`RowVersion`], [`compare`]) that every sink applies against the version it holds.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::envelope::{ChangeEvent, Image, Op, Row, RowImage};

mod decode;
pub mod review;
use crate::zone::{SiteRule, Zone};

/// One record of `omrs.hq.changes`. `R` holds the row images of a change ([`ChangeEvent`]).
///
/// Written with its `type` tag first; read in one pass whatever the field order, without
/// serde's buffering of internally tagged enums (`decode.rs`): the one decoder of the topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", bound(serialize = "R: Serialize + Image"))]
pub enum HqEvent<R = Row> {
    /// A site change, in uuid space, with person references pointing at the survivor.
    Change {
        /// Older than the global watermark when it arrived (an offline site catching up).
        late: bool,
        /// The canonical person this row belongs to, when it is about a person.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        person: Option<String>,
        /// The references this event rewrote to the survivor: column → original uuid.
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        origin_refs: serde_json::Map<String, J>,
        /// The site event, with `refs` canonicalised.
        event: ChangeEvent<R>,
    },
    /// Two person records are one human; `loser` is merged into `winner` the OpenMRS way.
    Merge {
        winner: String,
        loser: String,
        /// `identifier`, `site_merge` or `survivor_change`.
        reason: String,
        evidence: J,
        site: String,
        ts_ms: i64,
    },
    /// A person's decision took `records` away from the component that survived as `from`:
    /// they are now one person surviving as `survivor` (one of them, or the survivor of
    /// another component they join). The rows whose own person is one of `records` follow
    /// them; the rest stays. Emitted by a split (`identity split`) and by a link that a split
    /// re-arranges (the transform rebuilds a split component from its links).
    Split {
        survivor: String,
        from: String,
        records: Vec<String>,
        /// The review whose decision caused it.
        review_id: String,
        site: String,
        ts_ms: i64,
    },
    /// The transform's global watermark: every later record that is not `late` is at or after
    /// it. The Parquet sink finalises date partitions with it.
    Watermark { ts_ms: i64 },
    /// A DDL at `site` gave a table this shape: every later change of that site's table has
    /// it. A sink makes its own table able to hold it (additive changes) or stops that site's
    /// changes of the table with the reason (the rest), before the next change of it.
    Schema {
        site: String,
        schema: crate::shape::TableShape,
        /// The site commit time of the DDL.
        ts_ms: i64,
    },
    /// One version of a dashboard aggregate window (see [`AGGREGATES`]): provisional while the
    /// global watermark is before `window_end`, final after it; a change to a final window is a
    /// correction, a new final version with the next `revision`.
    Aggregate {
        /// One of [`AGGREGATES`]' names.
        name: String,
        site: String,
        window_start_ms: i64,
        window_end_ms: i64,
        /// The grouping value besides site and window (an encounter type or concept class
        /// uuid), empty when the aggregate has none.
        #[serde(default)]
        dim: String,
        value: i64,
        #[serde(rename = "final")]
        is_final: bool,
        /// 0 while provisional; 1 for the first final version, then one more per correction.
        revision: u32,
        /// The global watermark when this version was emitted.
        watermark_ms: i64,
    },
    /// One entry of the identity review queue (see [`review`]): every merge (status
    /// `merged`), every identity change HQ will not act on alone (status `open`), and every
    /// near miss (status `suggested`). Keyed by `review_id`, a function of what it is about,
    /// so that the same finding made twice is one entry.
    IdentityReview {
        review_id: String,
        /// One of [`review::REASONS`].
        reason: String,
        /// One of [`review::STATUSES`]; a sink keeps the status it holds (a decision wins).
        status: String,
        /// The survivor of the component when the review was raised.
        person: String,
        /// The person records the review is about (site person uuids).
        records: Vec<String>,
        evidence: J,
        site: String,
        ts_ms: i64,
        /// Set when a person's decision gave the review its status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decided: Option<review::Decided>,
    },
}

impl<R: Serialize + Image> HqEvent<R> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    /// The record key on `omrs.hq.changes`.
    pub fn key(&self) -> String {
        match self {
            HqEvent::Change { event, .. } => format!("{}:{}", event.table.as_deref().unwrap_or(""), event.uuid.as_deref().unwrap_or("")),
            HqEvent::Merge { loser, .. } => format!("merge:{loser}"),
            HqEvent::Split { from, survivor, .. } => format!("split:{from}:{survivor}"),
            HqEvent::IdentityReview { review_id, .. } => format!("review:{review_id}"),
            HqEvent::Aggregate { name, site, window_start_ms, dim, .. } => format!("agg:{name}:{site}:{window_start_ms}:{dim}"),
            HqEvent::Watermark { .. } => "watermark".to_string(),
            HqEvent::Schema { site, schema, .. } => format!("schema:{site}:{}", schema.table),
        }
    }
}


/// A dashboard aggregate: its name (the lake folder `aggregates/<name>/`), its HQ table, and
/// the column its `dim` is stored in (None: grouped by site and window only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateDef {
    pub name: &'static str,
    pub hq_table: &'static str,
    pub dim_column: Option<&'static str>,
    /// What `value` counts, for `--help`, docs and column comments.
    pub counts: &'static str,
}

/// The four aggregates of issue #9, in the order of `AggregatesConfig::windows`.
pub const AGGREGATES: [AggregateDef; 4] = [
    AggregateDef { name: "daily_registrations", hq_table: "omrs_dash_daily_registrations", dim_column: None, counts: "patients registered (patient rows created)" },
    AggregateDef {
        name: "hourly_encounters",
        hq_table: "omrs_dash_hourly_encounters",
        dim_column: Some("encounter_type_uuid"),
        counts: "unvoided encounters created, per encounter type",
    },
    AggregateDef {
        name: "monthly_active_patients",
        hq_table: "omrs_dash_monthly_active_patients",
        dim_column: None,
        counts: "distinct patients with at least one unvoided encounter",
    },
    AggregateDef {
        name: "daily_obs_by_class",
        hq_table: "omrs_dash_daily_obs_by_class",
        dim_column: Some("concept_class_uuid"),
        counts: "unvoided obs created, per concept class",
    },
];

/// The version of one row change, for last-writer-wins across sites.
///
/// Across sites, ordered by, in turn: the change time (`date_changed`, else `date_created`, else
/// the commit time), the site's configured priority, the site name, then the site commit time
/// and binlog position. Within one site, by the binlog position (see [`compare`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowVersion {
    pub change_ms: i64,
    pub priority: i32,
    pub site: String,
    pub commit_ms: i64,
    /// `file:pos:row`, zero-padded so that it compares as text.
    pub position: String,
}

/// The one comparison of semantics 6: `Greater` means `a` wins over `b`.
///
/// Two versions from the same site are ordered by the site's binlog alone (position, then
/// commit time): within a site, the later change always wins, even when its row times say
/// otherwise. (A delete's change time is its commit second, a snapshot row's commit time is the
/// snapshot's clock in ms: a row inserted, snapshotted and deleted within one second compared
/// the delete as older and HQ kept the row. Found by the SIGKILL chaos run.)
pub fn compare(a: &RowVersion, b: &RowVersion) -> Ordering {
    if a.site == b.site {
        return a.position.cmp(&b.position).then(a.commit_ms.cmp(&b.commit_ms));
    }
    a.change_ms
        .cmp(&b.change_ms)
        .then(a.priority.cmp(&b.priority))
        // Site id: the lower name wins a full tie, so that `a` < `b` reads "a is older".
        .then_with(|| b.site.cmp(&a.site))
        .then(a.commit_ms.cmp(&b.commit_ms))
        .then_with(|| a.position.cmp(&b.position))
}

impl RowVersion {
    /// The version of a site change; `rule` is the site's priority and time zone.
    pub fn of<R: RowImage>(ev: &ChangeEvent<R>, rule: &SiteRule) -> RowVersion {
        let row = if ev.op == Op::Delete {
            None
        } else {
            ev.after.as_ref()
        };
        let col = |c: &str| row.and_then(|r| r.get(c)).and_then(J::as_str);
        let s = &ev.source;
        RowVersion::from_parts(
            col("date_changed"),
            col("date_created"),
            rule,
            &ev.site,
            s.ts_ms,
            &s.file,
            s.pos,
            s.row,
        )
    }

    /// [`RowVersion::of`] from its parts: the row's `date_changed` and `date_created` (None for
    /// a delete), the site, and the source position.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        date_changed: Option<&str>,
        date_created: Option<&str>,
        rule: &SiteRule,
        site: &str,
        ts_ms: i64,
        file: &str,
        pos: u64,
        row: u32,
    ) -> RowVersion {
        let (change_ms, priority) = (
            change_ms(&rule.zone, date_changed, date_created, ts_ms),
            rule.priority,
        );
        // `{file}:{pos:020}:{row:010}`, written without the formatting machinery (one per row).
        let mut position = String::with_capacity(file.len() + 32);
        position.push_str(file);
        position.push(':');
        push_zero_padded(&mut position, pos, 20);
        position.push(':');
        push_zero_padded(&mut position, u64::from(row), 10);
        RowVersion { change_ms, priority, site: site.to_string(), commit_ms: ts_ms, position }
    }
}

/// Appends `n` in decimal, left-padded with zeros to `width` digits (as `{n:0width$}`).
fn push_zero_padded(s: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in (digits.len() - i)..width {
        s.push('0');
    }
    for &d in &digits[i..] {
        s.push(d as char);
    }
}

/// The change time of a row version in UTC: `date_changed`, else `date_created` (local times of
/// the site's `zone`), else the commit time (UTC already).
pub fn change_ms(
    zone: &Zone,
    date_changed: Option<&str>,
    date_created: Option<&str>,
    ts_ms: i64,
) -> i64 {
    date_changed
        .and_then(parse_datetime)
        .or_else(|| date_created.and_then(parse_datetime))
        .map(|t| zone.utc_ms(t))
        .unwrap_or(ts_ms)
}

/// How a table's rows are keyed in uuid space (DESIGN.md, "The change event"): by their uuid
/// (or the uuid of the row whose key they share), else by their key columns.
pub struct KeyShape<'a> {
    pub table: &'a str,
    /// The table has a uuid column, or shares its key with a table that has one.
    pub by_uuid: bool,
    pub pk: &'a [String],
    /// The key columns that are foreign keys (keyed by the uuid they reference).
    pub fk_columns: &'a [&'a str],
    /// The key is one site-local integer that references nothing: it only means something
    /// together with its site.
    pub site_local: bool,
}

/// The key of a row in uuid space, the same in every sink: its uuid, the uuid of the row whose
/// key it shares, or its key columns through their references (`origin_refs` first, so that
/// a row rewritten to a survivor keeps its own key). Keys over 255 bytes are hashed.
pub fn row_key<R: RowImage>(shape: &KeyShape<'_>, ev: &ChangeEvent<R>, origin_refs: &serde_json::Map<String, J>) -> Result<String, String> {
    if shape.by_uuid {
        return match ev.uuid.as_deref() {
            Some(u) if !u.is_empty() => Ok(u.to_string()),
            _ => Err(format!("{} change without a uuid", shape.table)),
        };
    }
    let row = ev.after.as_ref().or(ev.before.as_ref()).or(ev.key.as_ref());
    let mut parts = Vec::with_capacity(shape.pk.len());
    for col in shape.pk {
        // A reference by uuid where the site resolved one; a natural key (role names,
        // privilege names) as it is.
        let by_ref = shape
            .fk_columns
            .contains(&col.as_str())
            .then(|| origin_refs.get(col).or_else(|| ev.refs.get(col)))
            .flatten()
            .filter(|v| v.is_string());
        let v = by_ref
            .or_else(|| ev.key.as_ref().and_then(|k| k.get(col)))
            .or_else(|| row.and_then(|r| r.get(col)))
            .cloned()
            .unwrap_or(J::Null);
        if v.is_null() {
            return Err(format!("{}: key column `{col}` is missing", shape.table));
        }
        let text = match v {
            J::String(s) => s,
            other => other.to_string(),
        };
        parts.push(format!("{col}={text}"));
    }
    let key = if shape.site_local { format!("{}:{}", ev.site, parts.join("|")) } else { parts.join("|") };
    if key.len() > 255 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        return Ok(format!("h:{h:016x}"));
    }
    Ok(key)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (the envelope's DATETIME form, site time taken as UTC) → ms.
pub fn parse_datetime_ms(s: &str) -> Option<i64> {
    parse_datetime(s).map(|t| t.and_utc().timestamp_millis())
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (the envelope's DATETIME form) → a wall time.
pub fn parse_datetime(s: &str) -> Option<chrono::NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let mut micros = 0u32;
    if b.len() > 20 && b[19] == b'.' {
        let frac = s.get(20..)?;
        let digits: String = frac.chars().take(6).collect();
        micros = digits.parse::<u32>().ok()? * 10u32.pow(6 - digits.len() as u32);
    }
    date.and_hms_micro_opt(num(11..13)?, num(14..16)?, num(17..19)?, micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(priority: i32) -> SiteRule {
        SiteRule {
            priority,
            zone: Zone::default(),
        }
    }

    fn v(change_ms: i64, priority: i32, site: &str, commit_ms: i64) -> RowVersion {
        RowVersion { change_ms, priority, site: site.into(), commit_ms, position: String::new() }
    }

    #[test]
    fn positions_are_written_as_the_format_string_writes_them() {
        for (file, pos, row) in [
            ("mysql-bin.000001", 0u64, 0u32),
            ("b.000123", 4, 17),
            ("f", u64::MAX, u32::MAX),
            ("", 1234567890123, 99),
        ] {
            let v =
                RowVersion::from_parts(None, None, &SiteRule::default(), "s", 0, file, pos, row);
            assert_eq!(v.position, format!("{file}:{pos:020}:{row:010}"));
        }
    }

    #[test]
    fn across_sites_later_change_then_priority_then_lower_site_name() {
        // The later change wins, whatever the priorities and commit times.
        assert_eq!(compare(&v(2, 0, "site-b", 0), &v(1, 9, "site-a", 9)), Ordering::Greater);
        assert_eq!(compare(&v(1, 9, "site-a", 9), &v(2, 0, "site-b", 0)), Ordering::Less);
        // Two sites, the same change time: the higher priority wins, whatever the commit times.
        assert_eq!(compare(&v(1, 2, "site-b", 0), &v(1, 1, "site-a", 99)), Ordering::Greater);
        assert_eq!(compare(&v(1, 1, "site-a", 99), &v(1, 2, "site-b", 0)), Ordering::Less);
        // Two sites, the same change time and priority: the lower site name wins, whatever the
        // commit times and positions (so the site id is the last word across sites).
        let a = RowVersion { position: "binlog.000001:00000000000000000004:0000000000".into(), ..v(1, 1, "site-a", 0) };
        let b = RowVersion { position: "binlog.000009:00000000000000000999:0000000000".into(), ..v(1, 1, "site-b", 99) };
        assert_eq!(compare(&a, &b), Ordering::Greater);
        assert_eq!(compare(&b, &a), Ordering::Less);
        // Never equal across sites: two sites' changes are never "the same change".
        assert_ne!(compare(&v(1, 1, "site-a", 5), &v(1, 1, "site-b", 5)), Ordering::Equal);
        // The same site: the binlog (position, then commit) decides, not the row's times.
        assert_eq!(compare(&v(1, 1, "site-a", 5), &v(1, 1, "site-a", 4)), Ordering::Greater);
        assert_eq!(compare(&v(1, 1, "site-a", 5), &v(1, 1, "site-a", 5)), Ordering::Equal);
        assert_eq!(compare(&v(1, 1, "site-a", 5), &v(2, 1, "site-a", 4)), Ordering::Greater);
    }

    #[test]
    fn within_a_site_the_binlog_decides() {
        // A snapshot row (read at 49312836, clock in ms) and the delete that followed it in the
        // same second (commit second, no row time): the delete is the later change.
        let snap = RowVersion::from_parts(
            None,
            Some("2026-11-26 18:14:18"),
            &p(2),
            "site-b",
            1_795_716_858_806,
            "binlog.000043",
            49_312_836,
            8167,
        );
        let delete = RowVersion::from_parts(
            None,
            None,
            &p(2),
            "site-b",
            1_795_716_858_000,
            "binlog.000043",
            49_345_533,
            0,
        );
        assert_eq!(compare(&delete, &snap), Ordering::Greater);
        // An update whose date_changed went back (an app-server clock) still wins at its site.
        let first = RowVersion::from_parts(
            Some("2026-11-26 18:00:00"),
            None,
            &p(1),
            "site-a",
            1_000,
            "binlog.000001",
            100,
            0,
        );
        let later = RowVersion::from_parts(
            Some("2026-11-26 17:00:00"),
            None,
            &p(1),
            "site-a",
            2_000,
            "binlog.000001",
            200,
            0,
        );
        assert_eq!(compare(&later, &first), Ordering::Greater);
        // Across sites the change time still decides.
        let other = RowVersion::from_parts(
            Some("2026-11-26 17:30:00"),
            None,
            &p(9),
            "site-b",
            3_000,
            "binlog.000009",
            1,
            0,
        );
        assert_eq!(compare(&first, &other), Ordering::Greater);
    }

    #[test]
    fn across_sites_change_times_are_compared_in_utc() {
        // 18:00 in Nairobi (UTC+3) is 15:00 UTC: older than 17:00 at a UTC site, whatever the
        // wall clocks say; and 10:00 in Lima (UTC-5) is 15:00 UTC, a tie that priority breaks.
        let nairobi = SiteRule {
            priority: 0,
            zone: Zone::parse("Africa/Nairobi").unwrap(),
        };
        let lima = SiteRule {
            priority: 1,
            zone: Zone::parse("-05:00").unwrap(),
        };
        let ke = RowVersion::from_parts(
            Some("2026-11-26 18:00:00"),
            None,
            &nairobi,
            "site-a",
            9_000,
            "b.1",
            1,
            0,
        );
        let utc = RowVersion::from_parts(
            Some("2026-11-26 17:00:00"),
            None,
            &p(0),
            "site-b",
            1_000,
            "b.1",
            1,
            0,
        );
        let pe = RowVersion::from_parts(
            None,
            Some("2026-11-26 10:00:00"),
            &lima,
            "site-c",
            1_000,
            "b.1",
            1,
            0,
        );
        assert_eq!(compare(&utc, &ke), Ordering::Greater);
        assert_eq!(ke.change_ms, pe.change_ms);
        assert_eq!(compare(&pe, &ke), Ordering::Greater);
    }

    #[test]
    fn datetimes_parse() {
        assert_eq!(parse_datetime_ms("1970-01-01 00:00:01"), Some(1000));
        assert_eq!(parse_datetime_ms("1970-01-01 00:00:01.5"), Some(1500));
        assert_eq!(parse_datetime_ms("0000-00-00 00:00:00"), None);
        assert_eq!(parse_datetime_ms("garbage"), None);
    }
}
