//! Site time zones. OpenMRS writes `DATETIME` columns (`date_created`, `date_changed`, …) in
//! the site server's local time, with no zone attached. Comparing change times across sites
//! (the conflict rule, the survivor of a merged person) needs them on one clock: each site's
//! `time_zone` (config) turns its local times into UTC. The values themselves are kept as the
//! site wrote them, at HQ and in the lake (an encounter at 08:00 is 08:00 at its clinic).

use std::collections::HashMap;

use chrono::{FixedOffset, NaiveDateTime, Offset, TimeZone, Utc};

/// A site's time zone: a fixed offset (`UTC`, `+03:00`, `-05:30`) or an IANA name
/// (`Africa/Nairobi`), whose daylight-saving rules apply to each date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

impl Default for Zone {
    fn default() -> Self {
        Zone::Fixed(Utc.fix())
    }
}

impl Zone {
    /// `UTC`, `Z`, `+HH:MM`, `-HH:MM` or an IANA zone name.
    pub fn parse(s: &str) -> Result<Zone, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Ok(Zone::default());
        }
        if let Some(sign) = t.chars().next().filter(|c| *c == '+' || *c == '-') {
            let (h, m) = t[1..].split_once(':').unwrap_or((&t[1..], "0"));
            let parsed = h
                .parse::<i32>()
                .ok()
                .zip(m.parse::<i32>().ok())
                .filter(|(h, m)| *h <= 14 && *m < 60);
            let Some((h, m)) = parsed else {
                return Err(format!("`{s}` is not an offset like +03:00"));
            };
            let secs = (h * 3600 + m * 60) * if sign == '-' { -1 } else { 1 };
            return FixedOffset::east_opt(secs)
                .map(Zone::Fixed)
                .ok_or_else(|| format!("`{s}` is out of range"));
        }
        t.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| format!("`{s}` is neither an offset like +03:00 nor a known IANA time zone such as Africa/Nairobi"))
    }

    pub fn is_utc(&self) -> bool {
        matches!(self, Zone::Fixed(o) if o.local_minus_utc() == 0)
    }

    /// A local wall time of this zone in ms since the epoch. A time that a daylight-saving
    /// change skipped is read with the offset before the change; a repeated one as the earlier.
    pub fn utc_ms(&self, local: NaiveDateTime) -> i64 {
        let utc = local.and_utc().timestamp_millis();
        match self {
            Zone::Fixed(o) => utc - i64::from(o.local_minus_utc()) * 1000,
            Zone::Named(tz) => match tz.from_local_datetime(&local).earliest() {
                Some(t) => t.timestamp_millis(),
                None => {
                    utc - i64::from(tz.offset_from_utc_datetime(&local).fix().local_minus_utc())
                        * 1000
                }
            },
        }
    }

    /// The offset in effect now, as MySQL's `time_zone` takes it (`+03:00`).
    pub fn offset_now(&self) -> String {
        let secs = match self {
            Zone::Fixed(o) => o.local_minus_utc(),
            Zone::Named(tz) => tz
                .offset_from_utc_datetime(&Utc::now().naive_utc())
                .fix()
                .local_minus_utc(),
        };
        let sign = if secs < 0 { '-' } else { '+' };
        format!(
            "{sign}{:02}:{:02}",
            secs.abs() / 3600,
            secs.abs() % 3600 / 60
        )
    }
}

impl crate::config::SiteConfig {
    /// The site's zone (validated at load; UTC when absent).
    pub fn zone(&self) -> Zone {
        self.time_zone
            .as_deref()
            .and_then(|z| Zone::parse(z).ok())
            .unwrap_or_default()
    }
}

/// What decides between two sites' versions of a row, per site: its configured priority and
/// its time zone. Sites not listed have priority 0 and UTC.
#[derive(Debug, Clone, Default)]
pub struct SiteRules {
    rules: HashMap<String, SiteRule>,
    default: SiteRule,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SiteRule {
    pub priority: i32,
    pub zone: Zone,
}

impl SiteRules {
    pub fn new(rules: impl IntoIterator<Item = (String, SiteRule)>) -> SiteRules {
        SiteRules {
            rules: rules.into_iter().collect(),
            default: SiteRule::default(),
        }
    }

    /// The rules of every configured site (its zone was validated when the config loaded).
    pub fn of(cfg: &crate::config::Config) -> SiteRules {
        SiteRules::new(cfg.sites.iter().map(|s| {
            (
                s.name.clone(),
                SiteRule {
                    priority: s.priority,
                    zone: s.zone(),
                },
            )
        }))
    }

    pub fn get(&self, site: &str) -> &SiteRule {
        self.rules.get(site).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn zones_parse_and_turn_local_times_into_utc() {
        let utc = at("2024-03-01 12:00:00").and_utc().timestamp_millis();
        assert_eq!(
            Zone::parse("UTC")
                .unwrap()
                .utc_ms(at("2024-03-01 12:00:00")),
            utc
        );
        assert_eq!(
            Zone::parse("+03:00")
                .unwrap()
                .utc_ms(at("2024-03-01 15:00:00")),
            utc
        );
        assert_eq!(
            Zone::parse("-05:30")
                .unwrap()
                .utc_ms(at("2024-03-01 06:30:00")),
            utc
        );
        assert_eq!(
            Zone::parse("Africa/Nairobi")
                .unwrap()
                .utc_ms(at("2024-03-01 15:00:00")),
            utc
        );
        // Daylight saving: New York is UTC-4 in July, UTC-5 in January.
        let ny = Zone::parse("America/New_York").unwrap();
        assert_eq!(
            ny.utc_ms(at("2024-07-01 08:00:00")),
            at("2024-07-01 12:00:00").and_utc().timestamp_millis()
        );
        assert_eq!(
            ny.utc_ms(at("2024-01-01 07:00:00")),
            at("2024-01-01 12:00:00").and_utc().timestamp_millis()
        );
        // 02:30 on 10 March 2024 never happened there; read with the winter offset.
        assert_eq!(
            ny.utc_ms(at("2024-03-10 02:30:00")),
            at("2024-03-10 07:30:00").and_utc().timestamp_millis()
        );
        // Before 1970 too.
        assert!(
            Zone::parse("+03:00")
                .unwrap()
                .utc_ms(at("1966-05-04 10:00:00"))
                < 0
        );
        assert_eq!(Zone::parse("+03:00").unwrap().offset_now(), "+03:00");
        assert_eq!(Zone::parse("-05:30").unwrap().offset_now(), "-05:30");
        for bad in ["+3x", "+25:00", "Mars/Olympus", ""] {
            assert!(Zone::parse(bad).is_err(), "{bad}");
        }
    }
}
