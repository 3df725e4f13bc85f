//! `omrs-stream status`: the programme at a glance, one row per clinic and one per stage
//! (issue #27 §3). It reads Kafka (each clinic's topic: how much it captured and when it was
//! last heard from; the transform's position on it; the dead letters) and HQ (rows waiting for
//! a parent, open identity reviews, the HQ sink's position), and the lake's manifest when
//! given. With `--metrics`, it also reads the stages' metrics endpoints: each clinic's agent
//! (running or stopped, binlog files left behind its position, the server's retention) and the
//! transform (each clinic's watermark). It needs no clinic to be reachable, and says what it
//! could not read instead of failing. It writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use omrs_core::config::Config;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::Consumer;
use rdkafka::Message;
use serde::Serialize;
use serde_json::Value as J;

use omrs_core::metrics as m;
use omrs_core::prom::Sample;

use crate::verify::{committed_reader, reached, records_after, records_after_all, records_after_in, transform_positions};
use crate::SinkError;

/// Differences of offsets above this are shown as they are, not counted record by record.
const EXACT_UP_TO: i64 = 50_000;

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The lake to report the Parquet sink's position for (default: the config's
    /// `sinks.parquet.path`, when a lake is there).
    #[arg(long)]
    pub lake: Option<std::path::PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
    /// A stage's metrics endpoint to read too (repeatable), e.g. `--metrics
    /// http://127.0.0.1:9467/metrics`: an agent's gives its clinics' connection and binlog
    /// margin, the transform's each clinic's watermark delay. One ingest process that runs
    /// every clinic (`--all-sites`) is one endpoint.
    #[arg(long = "metrics", value_name = "URL")]
    pub metrics: Vec<String>,
}

/// One clinic.
#[derive(Debug, Clone, Serialize)]
pub struct SiteStatus {
    pub site: String,
    /// `live` (heard from within the transform's idle timeout), `offline` (not since), or
    /// `never heard` (nothing on its topic yet).
    pub state: String,
    /// When its agent last wrote to its topic (a change or a heartbeat), UTC.
    pub last_heard: Option<String>,
    pub last_heard_age_s: Option<i64>,
    /// Records on its topic (the end offset, commit markers included).
    pub captured: i64,
    /// Records of its topic the transform has not consumed (None: it has consumed none yet).
    pub transform_behind: Option<i64>,
    /// Its rows waiting at HQ for a parent row, and the oldest one's age.
    pub pending_at_hq: i64,
    pub oldest_pending_age_s: Option<i64>,
    /// Dead letters of its records.
    pub dead_letters: i64,
    /// Open identity reviews raised by its data.
    pub open_reviews: i64,
    /// When it went quiet (its last record), for a clinic `offline`, UTC.
    pub offline_since: Option<String>,
    /// Records of its partition of `omrs.hq.changes` HQ has not applied (None: HQ has stored
    /// no position). Clinics that share a partition show the partition's figure.
    pub hq_behind: Option<i64>,
    /// From the agents' metrics (`--metrics`; None when no endpoint reports the clinic): its
    /// agent `running` or `stopped`, the binlog files the server still keeps behind the agent's
    /// position, and the server's binlog retention in seconds (0: never purged).
    pub agent: Option<String>,
    pub binlog_margin_files: Option<i64>,
    pub binlog_retention_s: Option<i64>,
    /// The retention less the time since the clinic was last heard from: how long until its
    /// server may purge a binlog the agent has not read (None: no retention known, or never
    /// purged).
    pub retention_margin_s: Option<i64>,
    /// From the transform's metrics: now minus the clinic's watermark, in seconds.
    pub watermark_delay_s: Option<i64>,
}

/// One stage that is not a clinic's.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub topic: String,
    /// Data records of `topic` after its stored position (None: no position stored yet).
    pub behind: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub at: String,
    pub broker: String,
    pub sites: Vec<SiteStatus>,
    pub stages: Vec<StageStatus>,
    /// Dead letters that name no clinic (e.g. a record of omrs.hq.changes a sink refused).
    pub other_dead_letters: i64,
    /// What could not be read, and what looks wrong.
    pub problems: Vec<String>,
}

/// When `topic`'s last record was written (ms), and its end offset. Reads only its tail.
fn tail(cfg: &Config, topic: &str) -> Result<(i64, Option<i64>), SinkError> {
    let c = committed_reader(cfg)?;
    let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(10)).map_err(|e| SinkError::kafka(format!("reading the end of {topic}"), e))?;
    if high <= low {
        return Ok((high, None));
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    // A transaction's commit marker takes an offset: a few back finds the last record.
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset((high - 16).max(low))).map_err(|e| SinkError::kafka("assigning", e))?;
    c.assign(&tpl).map_err(|e| SinkError::kafka("assigning", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => last = m.timestamp().to_millis().or(last),
            Some(Err(e)) => return Err(SinkError::kafka(format!("reading {topic}"), e)),
            None if reached(&c, topic, high) => break,
            None => {}
        }
    }
    Ok((high, last))
}

/// The clinic a dead letter is about: its source topic's, else its payload's event site.
fn dead_letter_site(record: &J, cdc_prefix: &str) -> Option<String> {
    if let Some(site) = record.get("topic").and_then(J::as_str).and_then(|t| t.strip_prefix(cdc_prefix)) {
        return Some(site.to_string());
    }
    let payload: J = serde_json::from_str(record.get("payload_text")?.as_str()?).ok()?;
    payload.pointer("/event/site").or(payload.get("site")).and_then(J::as_str).map(str::to_string)
}

fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

/// What HQ holds per clinic: (pending rows, oldest pending first-seen ms, open reviews), and
/// the HQ sink's stored position.
type HqCounts = (BTreeMap<String, (i64, Option<i64>, i64)>, Option<BTreeMap<i32, i64>>);

async fn hq_counts(cfg: &Config) -> Result<HqCounts, SinkError> {
    let mut conn = crate::hq_mysql::connect(cfg, true).await?;
    let mut per: BTreeMap<String, (i64, Option<i64>, i64)> = BTreeMap::new();
    let pending: Vec<(Option<String>, i64, Option<i64>)> = conn
        .query("SELECT JSON_UNQUOTE(JSON_EXTRACT(event, '$.event.site')), COUNT(*), MIN(first_seen_ms) FROM omrs_sync_pending GROUP BY 1")
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_pending", e))?;
    for (site, n, oldest) in pending {
        let e = per.entry(site.unwrap_or_default()).or_default();
        (e.0, e.1) = (n, oldest);
    }
    let reviews: Vec<(String, i64)> =
        conn.query("SELECT site, COUNT(*) FROM omrs_sync_identity_review WHERE status = 'open' GROUP BY site").await.map_err(|e| SinkError::db("reading the identity reviews", e))?;
    for (site, n) in reviews {
        per.entry(site).or_default().2 = n;
    }
    let topic = TopicNames::new(cfg.kafka.topic_prefix.clone()).hq_changes();
    let stored = crate::verify::hq_offsets(&mut conn, &topic).await?;
    Ok((per, stored))
}

/// The status now.
pub async fn status(cfg: &Config, lake: Option<&std::path::Path>, metrics: &[String]) -> Status {
    let now = omrs_core::clock::now_ms();
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let mut problems = Vec::new();
    let (hq, hq_stored) = match hq_counts(cfg).await {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("HQ: {e}"));
            (BTreeMap::new(), None)
        }
    };
    let mut dead: BTreeMap<String, i64> = BTreeMap::new();
    let cdc_prefix = names.cdc_prefix();
    let all = crate::dlq::DlqFilter { stage: None, kind: None, offsets: Vec::new(), limit: None, json: false };
    match crate::dlq::read(cfg, &all) {
        Ok(letters) => {
            for d in letters {
                *dead.entry(dead_letter_site(&d.record, &cdc_prefix).unwrap_or_default()).or_default() += 1;
            }
        }
        Err(e) => problems.push(format!("dead letters: {e}")),
    }
    let positions = transform_positions(cfg).unwrap_or_else(|e| {
        problems.push(format!("the transform's positions: {e}"));
        cfg.sites.iter().map(|s| (s.name.clone(), names.cdc(&s.name), None)).collect()
    });
    let idle_ms = cfg.transform.idle_timeout_s as i64 * 1000;
    let hq_topic = names.hq_changes();
    let hq_partitions = committed_reader(cfg)
        .and_then(|c| omrs_core::kafka::topic_partitions(c.client(), &hq_topic, Duration::from_secs(10)).map_err(|e| SinkError::kafka("reading the metadata of omrs.hq.changes", e)))
        .map(|p| p.len() as i32)
        .unwrap_or(1);
    let mut scraped = Vec::new();
    for url in metrics {
        match omrs_core::prom::scrape_url(url).await {
            Ok(samples) => scraped.extend(samples),
            Err(e) => problems.push(e.to_string()),
        }
    }
    let mut sites = Vec::new();
    let mut broker = "reachable".to_string();
    for (site, topic, committed) in positions {
        let (captured, last) = match tail(cfg, &topic) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{site}: {e}"));
                broker = "unreachable or incomplete (see problems)".into();
                (0, None)
            }
        };
        let behind = records_after(cfg, &topic, committed, true, Some(EXACT_UP_TO)).unwrap_or(None);
        let age = last.map(|l| ((now - l) / 1000).max(0));
        let state = match last {
            None => "never heard",
            Some(l) if now - l <= idle_ms => "live",
            Some(_) => "offline",
        };
        let (pending, oldest, reviews) = hq.get(&site).copied().unwrap_or_default();
        let partition = omrs_core::topics::hq_partition(&site, hq_partitions);
        let hq_behind = hq_stored.as_ref().and_then(|s| records_after_in(cfg, &hq_topic, partition, Some(s.get(&partition).copied().unwrap_or(0)), false, Some(EXACT_UP_TO)).ok().flatten());
        let from = Scraped::of(&scraped, &site, now);
        sites.push(SiteStatus {
            offline_since: if state == "offline" { last.map(utc) } else { None },
            hq_behind,
            agent: from.agent,
            binlog_margin_files: from.margin,
            binlog_retention_s: from.retention,
            retention_margin_s: from.retention.filter(|r| *r > 0).map(|r| r - age.unwrap_or(0)),
            watermark_delay_s: from.watermark_delay,
            state: state.into(),
            last_heard: last.map(utc),
            last_heard_age_s: age,
            captured,
            transform_behind: behind,
            pending_at_hq: pending,
            oldest_pending_age_s: oldest.map(|o| ((now - o) / 1000).max(0)),
            dead_letters: dead.remove(&site).unwrap_or(0),
            open_reviews: reviews,
            site,
        });
    }
    let transform_behind = sites.iter().filter_map(|s| s.transform_behind).reduce(|a, b| a + b);
    let mut stages = vec![
        StageStatus { stage: "transform".into(), topic: format!("{}*", names.cdc_prefix()), behind: transform_behind },
        StageStatus { stage: "hq_mysql".into(), topic: hq_topic.clone(), behind: records_after_all(cfg, &hq_topic, hq_stored.as_ref(), Some(EXACT_UP_TO)).unwrap_or(None) },
    ];
    // The lake named by --lake, else the config's `sinks.parquet.path` when a lake is there
    // (a deployment without the Parquet sink has none, and gets no row for it).
    let config_lake = Some(cfg.sinks.parquet.path.as_path()).filter(|p| crate::parquet::lake::Lake::new(p).read_manifest().is_ok());
    if let Some(root) = lake.or(config_lake) {
        let stored = crate::parquet::lake::Lake::new(root).read_manifest().ok().map(|(s, _)| s.offsets).filter(|o| !o.is_empty());
        stages.push(StageStatus { stage: "parquet".into(), topic: hq_topic.clone(), behind: records_after_all(cfg, &hq_topic, stored.as_ref(), Some(EXACT_UP_TO)).unwrap_or(None) });
    }
    for s in sites.iter().filter(|s| s.state == "offline") {
        problems.push(format!("{} offline since {} ({} ago)", s.site, s.offline_since.clone().unwrap_or_default(), age_text(s.last_heard_age_s)));
        if let (Some(left), Some(ret)) = (s.retention_margin_s, s.binlog_retention_s) {
            if left < ret / 2 {
                problems.push(format!("{}: silent for more than half its binlog retention; its server may purge unread binlogs in {}", s.site, age_text(Some(left.max(0)))));
            }
        }
    }
    Status { at: utc(now), broker, sites, stages, other_dead_letters: dead.values().sum(), problems }
}

/// What the scraped metrics say of one clinic.
#[derive(Default)]
struct Scraped {
    agent: Option<String>,
    margin: Option<i64>,
    retention: Option<i64>,
    watermark_delay: Option<i64>,
}

impl Scraped {
    fn of(samples: &[Sample], site: &str, now_ms: i64) -> Scraped {
        let get = |name: &str| samples.iter().find(|x| x.name == name && x.label("site") == Some(site)).map(|x| x.value);
        let margin = get(m::INGEST_BINLOG_MARGIN);
        // A multi-site process says whether each clinic's agent runs; a one-clinic agent that
        // answers and reports the clinic's binlog is running.
        let agent = match get(m::INGEST_SITE_RUNNING) {
            Some(v) if v >= 1.0 => Some("running".to_string()),
            Some(_) => Some("stopped".to_string()),
            None => margin.or(get(m::INGEST_POSITION)).map(|_| "running".to_string()),
        };
        Scraped {
            agent,
            margin: margin.map(|v| v as i64),
            retention: get(m::INGEST_BINLOG_RETENTION).map(|v| v as i64),
            watermark_delay: get(m::SITE_WATERMARK).filter(|w| *w > 0.0).map(|w| ((now_ms - w as i64) / 1000).max(0)),
        }
    }
}

/// `90 s`, `12 min`, `3.5 h`, `2.1 d`.
fn age_text(s: Option<i64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s} s"),
        Some(s) if s < 7_200 => format!("{} min", s / 60),
        Some(s) if s < 172_800 => format!("{:.1} h", s as f64 / 3_600.0),
        Some(s) => format!("{:.1} d", s as f64 / 86_400.0),
    }
}

fn count_text(n: Option<i64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// The status for a terminal.
pub fn render(s: &Status) -> String {
    let mut out = format!("omrs-stream status at {} UTC (broker {})\n\n", s.at, s.broker);
    out.push_str(&format!(
        "{:<12} {:<11} {:>10} {:>10} {:>9} {:>7} {:>8} {:>7} {:>7} {:>5} {:>7} {:>8} {:>11}\n",
        "clinic", "state", "last heard", "captured", "to trans.", "to HQ", "wm delay", "pending", "oldest", "dead", "reviews", "agent", "retention"
    ));
    for r in &s.sites {
        let binlog = match (r.binlog_retention_s, r.retention_margin_s) {
            (Some(0), _) => "never purged".to_string(),
            (_, Some(left)) => age_text(Some(left.max(0))),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<12} {:<11} {:>10} {:>10} {:>9} {:>7} {:>8} {:>7} {:>7} {:>5} {:>7} {:>8} {:>11}\n",
            r.site,
            r.state,
            age_text(r.last_heard_age_s),
            r.captured,
            count_text(r.transform_behind),
            count_text(r.hq_behind),
            age_text(r.watermark_delay_s),
            r.pending_at_hq,
            age_text(r.oldest_pending_age_s),
            r.dead_letters,
            r.open_reviews,
            r.agent.as_deref().unwrap_or("-"),
            binlog
        ));
    }
    out.push_str(
        "\n(last heard: age of the clinic's last change or heartbeat; to trans. / to HQ: its records the transform has yet to take / HQ has yet to apply; \
wm delay: now minus its watermark; pending: rows waiting at HQ for a parent; reviews: open identity reviews; agent, retention: from --metrics, \
its agent, and how long until its server may purge a binlog the agent has not read)\n\n",
    );
    for st in &s.stages {
        out.push_str(&format!("{:<10} {} records behind on {}\n", st.stage, count_text(st.behind), st.topic));
    }
    if s.other_dead_letters > 0 {
        out.push_str(&format!("dead letters naming no clinic: {} (omrs-stream dlq list)\n", s.other_dead_letters));
    }
    if !s.problems.is_empty() {
        out.push_str("\nproblems:\n");
        for p in &s.problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_names_its_clinic_by_topic_or_payload() {
        let from_topic = serde_json::json!({"topic": "x.omrs.cdc.site-b", "payload_text": "{"});
        assert_eq!(dead_letter_site(&from_topic, "x.omrs.cdc.").as_deref(), Some("site-b"));
        let from_payload = serde_json::json!({"topic": "x.omrs.hq.changes", "payload_text": "{\"type\":\"change\",\"event\":{\"site\":\"site-c\"}}"});
        assert_eq!(dead_letter_site(&from_payload, "x.omrs.cdc.").as_deref(), Some("site-c"));
        let none = serde_json::json!({"topic": "x.omrs.hq.changes", "payload_text": null});
        assert_eq!(dead_letter_site(&none, "x.omrs.cdc."), None);
        assert_eq!((age_text(Some(59)), age_text(Some(600)), age_text(Some(36_000)), age_text(None)), ("59 s".into(), "10 min".into(), "10.0 h".into(), "-".into()));
    }

    #[test]
    fn the_stages_metrics_say_whose_agent_runs_and_how_far_each_watermark_is() {
        let page = "omrs_stream_ingest_site_running{site=\"site-a\"} 1\n\
                    omrs_stream_ingest_site_running{site=\"site-b\"} 0\n\
                    omrs_stream_ingest_binlog_margin_files{site=\"site-a\"} 3\n\
                    omrs_stream_ingest_binlog_retention_seconds{site=\"site-a\"} 1209600\n\
                    omrs_stream_ingest_binlog_position{file=\"binlog.000002\",site=\"site-d\"} 4\n\
                    omrs_stream_site_watermark_ms{site=\"site-a\"} 1000000\n\
                    omrs_stream_site_watermark_ms{site=\"site-b\"} 0\n";
        let samples = omrs_core::prom::parse(page);
        let a = Scraped::of(&samples, "site-a", 1_030_500);
        assert_eq!((a.agent.as_deref(), a.margin, a.retention, a.watermark_delay), (Some("running"), Some(3), Some(1_209_600), Some(30)));
        let b = Scraped::of(&samples, "site-b", 1_030_500);
        assert_eq!((b.agent.as_deref(), b.watermark_delay), (Some("stopped"), None), "a zero watermark is none yet");
        // A one-clinic agent has no running gauge: it answers and reports its clinic.
        assert_eq!(Scraped::of(&samples, "site-d", 0).agent.as_deref(), Some("running"));
        let c = Scraped::of(&samples, "site-c", 0);
        assert_eq!((c.agent, c.margin, c.retention, c.watermark_delay), (None, None, None, None));
    }
}
