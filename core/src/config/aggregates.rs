//! `[aggregates]`: the dashboard aggregates' windows.

use super::*;

/// `[aggregates]`: the dashboard aggregates the transform keeps as the stream flows (tumbling
/// windows over each row's `date_created`, final once the global watermark passes their end).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatesConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Window of `daily_registrations` (`1d` by default): `<n>s|m|h|d` or `month`.
    #[serde(default = "default_day")]
    pub registrations_window: String,
    /// Window of `hourly_encounters` (`1h`).
    #[serde(default = "default_hour")]
    pub encounters_window: String,
    /// Window of `monthly_active_patients` (`month`).
    #[serde(default = "default_month")]
    pub active_patients_window: String,
    /// Window of `daily_obs_by_class` (`1d`).
    #[serde(default = "default_day")]
    pub obs_window: String,
    /// Open windows that changed are emitted (provisional) at most this often.
    #[serde(default = "default_provisional_ms")]
    pub provisional_interval_ms: u64,
}

pub(super) fn default_true() -> bool {
    true
}
fn default_day() -> String {
    "1d".into()
}
fn default_hour() -> String {
    "1h".into()
}
fn default_month() -> String {
    "month".into()
}
fn default_provisional_ms() -> u64 {
    1000
}

impl Default for AggregatesConfig {
    fn default() -> Self {
        AggregatesConfig {
            enabled: true,
            registrations_window: default_day(),
            encounters_window: default_hour(),
            active_patients_window: default_month(),
            obs_window: default_day(),
            provisional_interval_ms: default_provisional_ms(),
        }
    }
}

impl AggregatesConfig {
    /// The window of each aggregate, in [`crate::hq::AGGREGATES`] order.
    pub fn windows(&self) -> std::result::Result<[WindowSpec; 4], (String, String)> {
        let one = |key: &str, v: &str| WindowSpec::parse(v).map_err(|m| (format!("aggregates.{key}"), m));
        Ok([
            one("registrations_window", &self.registrations_window)?,
            one("encounters_window", &self.encounters_window)?,
            one("active_patients_window", &self.active_patients_window)?,
            one("obs_window", &self.obs_window)?,
        ])
    }
}

/// A tumbling window: a fixed width aligned on the Unix epoch (UTC), or calendar months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    Fixed(i64),
    Month,
}

impl WindowSpec {
    /// `30s`, `5m`, `1h`, `1d` or `month`.
    pub fn parse(s: &str) -> std::result::Result<WindowSpec, String> {
        let t = s.trim();
        if t == "month" {
            return Ok(WindowSpec::Month);
        }
        let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: i64 = num.parse().map_err(|_| format!("`{s}` is not a window: use <n>s, <n>m, <n>h, <n>d or month"))?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("`{s}` is not a window: use <n>s, <n>m, <n>h, <n>d or month")),
        };
        if n <= 0 || n > 366 * 86_400 {
            return Err(format!("`{s}`: the width must be positive and at most a year"));
        }
        let w = n * ms;
        if w > 366 * 86_400_000 || 86_400_000 % w != 0 && w % 86_400_000 != 0 {
            return Err(format!("`{s}`: the width must divide a day or be whole days"));
        }
        Ok(WindowSpec::Fixed(w))
    }

    /// The window `[start, end)` holding `ms`.
    pub fn window(&self, ms: i64) -> (i64, i64) {
        match *self {
            WindowSpec::Fixed(w) => {
                let start = ms.div_euclid(w) * w;
                (start, start + w)
            }
            WindowSpec::Month => {
                use chrono::{Datelike, TimeZone};
                let Some(t) = chrono::Utc.timestamp_millis_opt(ms).single() else { return (ms, ms + 1) };
                let (y, m) = (t.year(), t.month());
                let start = chrono::Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().map(|d| d.timestamp_millis()).unwrap_or(ms);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = chrono::Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).single().map(|d| d.timestamp_millis()).unwrap_or(ms + 1);
                (start, end)
            }
        }
    }
}
