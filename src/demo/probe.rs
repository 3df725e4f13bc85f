//! A latency probe beside the demo's live workload: the ground truth of "a clinic commits a
//! change → HQ shows it", measured from outside the pipeline.
//!
//! The stages' own histograms date a change by its binlog event, whose timestamp has whole
//! seconds only (MariaDB), so their figures run up to a second high. The probe commits a
//! change of its own at the first clinic every `INTERVAL` (one `global_property` row, the
//! value naming its sequence number), notes the time `COMMIT` returned, and reads HQ every
//! `POLL`: a sequence number seen at HQ for the first time gives one latency sample, and every
//! number it overtook (they come in the clinic's order) gets the same moment. Error: at most
//! one poll late.
//!
//! Delivery guarantee: none; it writes one row the pipeline carries like any other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

const PROPERTY: &str = "omrs.demo.latency_probe";
const INTERVAL: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);
/// After the workload, how long the probe's last change may take to show at HQ.
const SETTLE: Duration = Duration::from_secs(60);

/// The probe while it runs.
pub struct Probe {
    stop: tokio::sync::watch::Sender<bool>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

/// Latency samples (seconds) and their quantiles.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProbeFigures {
    pub samples: usize,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
    /// The slowest changes: (seconds into the probe when committed, latency in seconds), the
    /// slowest first, to see what the tail coincides with (an offline site's return…).
    pub slowest: Vec<(f64, f64)>,
}

/// Starts the probe: `site` is a clinic database it may write (the admin user), `hq` HQ's.
pub async fn start(site: OptsBuilder, hq: OptsBuilder) -> anyhow::Result<Probe> {
    let mut w = Conn::new(site).await?;
    w.exec_drop(
        "INSERT INTO global_property (property, property_value, description, uuid) VALUES (?, '0', 'omrs-stream demo: latency probe', UUID())
         ON DUPLICATE KEY UPDATE property_value = '0'",
        (PROPERTY,),
    )
    .await?;
    let mut r = Conn::new(hq).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let committed: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (committed, stopped, last) = (committed.clone(), stopped.clone(), last.clone());
        async move {
            let mut tick = tokio::time::interval(INTERVAL);
            for seq in 1u64.. {
                tick.tick().await;
                if *stopped.borrow() {
                    break;
                }
                let sent = w.exec_drop("UPDATE global_property SET property_value = ? WHERE property = ?", (seq.to_string(), PROPERTY)).await;
                if sent.is_err() {
                    break;
                }
                if let Ok(mut c) = committed.lock() {
                    c.insert(seq, Instant::now());
                }
                last.store(seq, Ordering::SeqCst);
            }
        }
    });
    let reader = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut seen = 0u64;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut deadline: Option<Instant> = None;
        loop {
            tick.tick().await;
            if *stopped.borrow() {
                // The writer has stopped: read on until its last change shows, or SETTLE.
                let d = *deadline.get_or_insert_with(|| Instant::now() + SETTLE);
                if seen >= last.load(Ordering::SeqCst) || Instant::now() >= d {
                    break;
                }
            }
            let value: Option<String> = r.exec_first("SELECT property_value FROM global_property WHERE property = ?", (PROPERTY,)).await.ok().flatten();
            let Some(now_seen) = value.and_then(|v| v.parse::<u64>().ok()) else { continue };
            if now_seen <= seen {
                continue;
            }
            let at = Instant::now();
            if let Ok(mut c) = committed.lock() {
                let shown: Vec<u64> = c.range(seen + 1..=now_seen).map(|(s, _)| *s).collect();
                for s in shown {
                    if let Some(t) = c.remove(&s) {
                        samples.push((t.saturating_duration_since(started).as_secs_f64(), at.saturating_duration_since(t).as_secs_f64()));
                    }
                }
            }
            seen = now_seen;
        }
        samples
    });
    Ok(Probe { stop, writer, reader })
}

impl Probe {
    /// Stops writing, reads HQ until the last change shows (at most `SETTLE`), and returns the
    /// figures.
    pub async fn finish(self) -> ProbeFigures {
        let _ = self.stop.send(true);
        let _ = self.writer.await;
        let samples = self.reader.await.unwrap_or_default();
        figures(samples)
    }
}

/// `samples`: (seconds into the probe, latency) per change seen at HQ.
fn figures(samples: Vec<(f64, f64)>) -> ProbeFigures {
    let mut lat: Vec<f64> = samples.iter().map(|(_, l)| *l).collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
    let mut slowest = samples;
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    slowest.truncate(5);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    ProbeFigures { samples: lat.len(), p50_s: q(0.5), p99_s: q(0.99), max_s: lat.last().copied(), slowest: slowest.into_iter().map(|(t, l)| (round(t), round(l))).collect() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_of_the_samples() {
        let f = super::figures((1..=100).rev().map(|i| (i as f64, i as f64 / 100.0)).collect());
        assert_eq!((f.samples, f.p50_s, f.p99_s, f.max_s), (100, Some(0.51), Some(0.99), Some(1.0)));
        assert_eq!(f.slowest[..2], [(100.0, 1.0), (99.0, 0.99)]);
        assert_eq!(super::figures(Vec::new()).p50_s, None);
    }
}
