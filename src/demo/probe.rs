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
//! After the run, each sample is split by stage from the Kafka timestamps of its change in
//! the clinic's topic (the agent's send) and in `omrs.hq.changes` (the transform's): agent
//! (clinic commit → the agent's send), transform (→ the transform's send) and HQ sink (→ seen
//! at HQ), so the slowest changes say where they waited.
//!
//! Delivery guarantee: none; it writes one row the pipeline carries like any other.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::clock::now_ms;
use omrs_core::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

const PROPERTY: &str = "omrs.demo.latency_probe";
const INTERVAL: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);
/// After the workload, how long the probe's last change may take to show at HQ.
const SETTLE: Duration = Duration::from_secs(60);

/// The probe while it runs.
pub struct Probe {
    stop: tokio::sync::watch::Sender<bool>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<Vec<Sample>>,
}

/// One probe change seen at HQ.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seq: u64,
    /// Seconds into the probe when it was committed at the clinic.
    at_s: f64,
    latency_s: f64,
    /// Wall-clock times (epoch ms): committed at the clinic, first seen at HQ.
    committed_ms: i64,
    seen_ms: i64,
}

/// The stages a probe change went through, in order.
pub const STAGES: [&str; 3] = ["agent", "transform", "hq_sink"];

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
    /// p50 and p99 of each of [`STAGES`] (seconds), over the samples whose change was found in
    /// both topics; empty when none was.
    pub by_stage: Vec<(String, f64, f64)>,
    /// The slowest changes' seconds in each of [`STAGES`] (same order as `slowest`; None where
    /// the change was not found in a topic).
    pub slowest_by_stage: Vec<Option<[f64; 3]>>,
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
    let committed: Arc<Mutex<BTreeMap<u64, (Instant, i64)>>> = Arc::default();
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
                    c.insert(seq, (Instant::now(), now_ms()));
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
            let (at, seen_ms) = (Instant::now(), now_ms());
            if let Ok(mut c) = committed.lock() {
                let shown: Vec<u64> = c.range(seen + 1..=now_seen).map(|(s, _)| *s).collect();
                for s in shown {
                    if let Some((t, committed_ms)) = c.remove(&s) {
                        samples.push(Sample { seq: s, at_s: t.saturating_duration_since(started).as_secs_f64(), latency_s: at.saturating_duration_since(t).as_secs_f64(), committed_ms, seen_ms });
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
    /// figures, split by stage from `site`'s topic and `omrs.hq.changes` (its partition).
    pub async fn finish(self, kafka: &KafkaConfig, site: &str) -> ProbeFigures {
        let _ = self.stop.send(true);
        let _ = self.writer.await;
        let samples = self.reader.await.unwrap_or_default();
        let (kafka, site) = (kafka.clone(), site.to_string());
        let read = tokio::task::spawn_blocking(move || {
            let names = omrs_core::topics::TopicNames::new(kafka.topic_prefix.clone());
            [kafka_times(&kafka, &names.cdc(&site), None), kafka_times(&kafka, &names.hq_changes(), Some(&site))]
        });
        let times = read.await.unwrap_or_else(|e| [Err(format!("{e}")), Err(format!("{e}"))]);
        let times = times.map(|t| {
            t.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the probe's changes could not be read back from Kafka; no split by stage");
                HashMap::new()
            })
        });
        figures_of(&samples, &times)
    }
}

/// The figures of `samples`, split by stage where `times` (the Kafka timestamps of each
/// change's record in the clinic's topic and in `omrs.hq.changes`, by sequence number) have
/// the change.
fn figures_of(samples: &[Sample], times: &[HashMap<u64, i64>; 2]) -> ProbeFigures {
    let mut f = figures(samples.iter().map(|s| (s.at_s, s.latency_s)).collect());
    let split = |s: &Sample| -> Option<[f64; 3]> {
        let (site, hq) = (*times[0].get(&s.seq)?, *times[1].get(&s.seq)?);
        Some([(site - s.committed_ms) as f64 / 1000.0, (hq - site) as f64 / 1000.0, (s.seen_ms - hq) as f64 / 1000.0])
    };
    let splits: Vec<[f64; 3]> = samples.iter().filter_map(split).collect();
    if !splits.is_empty() {
        f.by_stage = STAGES
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let mut v: Vec<f64> = splits.iter().map(|x| x[k]).collect();
                v.sort_by(f64::total_cmp);
                let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
                (name.to_string(), q(0.5), q(0.99))
            })
            .collect();
    }
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    f.slowest_by_stage = f
        .slowest
        .iter()
        .map(|(at, lat)| samples.iter().find(|s| round(s.at_s) == *at && round(s.latency_s) == *lat).and_then(split))
        .collect();
    f
}

/// The Kafka timestamp (ms) of each probe change in `topic`, by its sequence number (the first
/// record of each: a change written again after a restart keeps its first time). The topic's
/// partition 0, or with `site` the partition of `omrs.hq.changes` that carries the site's.
fn kafka_times(kafka: &KafkaConfig, topic: &str, site: Option<&str>) -> Result<HashMap<u64, i64>, String> {
    let consumer: BaseConsumer = omrs_core::kafka::client_config(kafka)
        .set("group.id", format!("omrs-probe-{topic}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("a reader for {topic}: {e}"))?;
    let partition = match site {
        None => 0,
        Some(site) => {
            let n = omrs_core::kafka::topic_partitions(consumer.client(), topic, Duration::from_secs(30)).map_err(|e| format!("the metadata of {topic}: {e}"))?.len();
            omrs_core::topics::hq_partition(site, n as i32)
        }
    };
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(30)).map_err(|e| format!("the end of {topic}: {e}"))?;
    let mut times = HashMap::new();
    if high <= low {
        return Ok(times);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning).map_err(|e| format!("{topic}: {e}"))?;
    consumer.assign(&tpl).map_err(|e| format!("{topic}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let marker = PROPERTY.as_bytes();
    while Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.map_err(|e| format!("reading {topic}: {e}"))?;
            if let (Some(payload), Some(ts)) = (m.payload(), m.timestamp().to_millis()) {
                if payload.windows(marker.len()).any(|w| w == marker) {
                    if let Some(seq) = probe_seq(payload) {
                        times.entry(seq).or_insert(ts);
                    }
                }
            }
        }
        let pos = consumer.position().ok().and_then(|p| p.find_partition(topic, partition).map(|e| e.offset()));
        if matches!(pos, Some(Offset::Offset(o)) if o >= high) {
            break;
        }
    }
    Ok(times)
}

/// The probe's sequence number in a change record: the new image's `property_value`, in a
/// clinic's topic (`after`) or in `omrs.hq.changes` (`event.after`).
fn probe_seq(payload: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let after = v.get("after").or_else(|| v.get("event").and_then(|e| e.get("after")))?;
    if after.get("property")?.as_str()? != PROPERTY {
        return None;
    }
    after.get("property_value")?.as_str()?.parse().ok()
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
    ProbeFigures {
        samples: lat.len(),
        p50_s: q(0.5),
        p99_s: q(0.99),
        max_s: lat.last().copied(),
        slowest: slowest.into_iter().map(|(t, l)| (round(t), round(l))).collect(),
        ..Default::default()
    }
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

    #[test]
    fn samples_split_by_stage_from_the_kafka_times() {
        use super::{figures_of, probe_seq, Sample};
        let s = |seq: u64, lat: f64| Sample { seq, at_s: seq as f64, latency_s: lat, committed_ms: 1_000 * seq as i64, seen_ms: 1_000 * seq as i64 + (lat * 1000.0).round() as i64 };
        let samples = [s(1, 0.3), s(2, 1.2), s(3, 0.4)];
        // Change 2 waited 0.9 s in the HQ sink; change 3 is not in omrs.hq.changes.
        let site: std::collections::HashMap<u64, i64> = [(1, 1_050), (2, 2_100), (3, 3_050)].into();
        let hq: std::collections::HashMap<u64, i64> = [(1, 1_200), (2, 2_300)].into();
        let f = figures_of(&samples, &[site, hq]);
        assert_eq!(f.slowest[0], (2.0, 1.2));
        assert_eq!(f.slowest_by_stage[0], Some([0.1, 0.2, 0.9]));
        assert_eq!(f.slowest_by_stage[1], None, "change 3 (the second slowest) is not in omrs.hq.changes");
        assert_eq!(f.by_stage.len(), 3);
        assert_eq!((f.by_stage[2].0.as_str(), f.by_stage[2].2), ("hq_sink", 0.9));
        let site_rec = br#"{"op":"u","after":{"property":"omrs.demo.latency_probe","property_value":"17"},"before":{"property":"omrs.demo.latency_probe","property_value":"16"}}"#;
        let hq_rec = br#"{"type":"change","event":{"op":"u","before":{"property":"omrs.demo.latency_probe","property_value":"16"},"after":{"property":"omrs.demo.latency_probe","property_value":"17"}}}"#;
        assert_eq!((probe_seq(site_rec), probe_seq(hq_rec)), (Some(17), Some(17)));
        assert_eq!(probe_seq(br#"{"after":{"property":"other","property_value":"3"}}"#), None);
    }
}
