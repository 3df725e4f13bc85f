//! `omrs-stream dlq list|replay`: the dead-letter topic for operators.
//!
//! - `list` prints the dead letters (stage, kind, where the record came from, the reason), with
//!   filters; `--json` prints them whole.
//! - `replay` puts the selected records back into the topic they came from, read whole from
//!   that topic at the offset the dead letter names (a dead letter's own copy may be cut), once
//!   the cause is fixed: a parent that arrived after the FK wait, a table HQ lacked, a column too
//!   short. Each replayed record is a new record at the end of its source topic; a stage that
//!   already took it applies it idempotently (HQ compares versions; the lake's current state
//!   takes one version per row, its change history shows both).
//!
//! Delivery guarantee: at least once per replay command (a replay repeated puts the records
//! back again, which the stages absorb as above). It never changes or deletes a dead letter.

use std::time::Duration;

use omrs_core::config::Config;
use omrs_core::kafka::client_config;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value as J;

use crate::SinkError;

/// `omrs-stream dlq`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters (oldest first): offset, stage, kind, source topic@offset, reason.
    List(DlqFilter),
    /// Put the selected records back into their source topics, read whole from there.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Say what would be replayed, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqFilter {
    /// Only this stage (`transform`, `hq_mysql`, `parquet`).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only this kind (`fk_wait_timeout`, `row_rejected`, `invalid_record`, …).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only these dead-letter offsets (repeatable).
    #[arg(long = "offset")]
    pub offsets: Vec<i64>,
    /// At most this many (the newest are dropped).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print each dead letter as one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// One dead letter and where it is on `omrs.dlq`.
#[derive(Debug, Clone)]
pub struct Dead {
    pub dlq_offset: i64,
    pub record: J,
}

impl Dead {
    fn str(&self, k: &str) -> &str {
        self.record.get(k).and_then(J::as_str).unwrap_or("")
    }
}

/// The dead letters the filter selects.
pub fn read(cfg: &Config, f: &DlqFilter) -> Result<Vec<Dead>, SinkError> {
    let topic = TopicNames::new(cfg.kafka.topic_prefix.clone()).dlq();
    let mut out = Vec::new();
    omrs_core::kafka::read_to_end(&cfg.kafka, &topic, |_, payload, offset| {
        let record: J = serde_json::from_slice(payload).unwrap_or_else(|e| serde_json::json!({"stage": "?", "reason": format!("not a dead-letter record: {e}")}));
        let d = Dead { dlq_offset: offset, record };
        let keep = f.stage.as_deref().is_none_or(|s| d.str("stage") == s)
            && f.kind.as_deref().is_none_or(|k| d.str("kind") == k)
            && (f.offsets.is_empty() || f.offsets.contains(&offset));
        if keep && f.limit.is_none_or(|l| out.len() < l) {
            out.push(d);
        }
        Ok(())
    })
    .map_err(|e| SinkError::Kafka { context: format!("reading {topic}"), message: e.to_string(), transient: e.is_transient() })?;
    Ok(out)
}

/// The text of `list`.
pub fn render(dead: &[Dead], json: bool) -> String {
    let mut s = String::new();
    if json {
        for d in dead {
            let mut r = d.record.clone();
            r["dlq_offset"] = J::from(d.dlq_offset);
            s.push_str(&r.to_string());
            s.push('\n');
        }
        return s;
    }
    s.push_str(&format!("{:>8}  {:<10} {:<18} {:<40} reason\n", "offset", "stage", "kind", "from"));
    for d in dead {
        let from = format!("{}@{}", d.str("topic"), d.record.get("offset").and_then(J::as_i64).unwrap_or(-1));
        let reason: String = d.str("reason").chars().take(160).collect();
        s.push_str(&format!("{:>8}  {:<10} {:<18} {:<40} {}\n", d.dlq_offset, d.str("stage"), d.str("kind"), from, reason));
    }
    s.push_str(&format!("{} dead letters\n", dead.len()));
    s
}

/// The one reader a replay fetches its source records with.
fn reader(cfg: &Config) -> Result<BaseConsumer, SinkError> {
    client_config(&cfg.kafka)
        .set("group.id", TopicNames::new(cfg.kafka.topic_prefix.clone()).dlq_replay_group())
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| SinkError::kafka("creating a reader", e))
}

/// Reads the record at (topic, partition, offset), whole.
fn fetch(c: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> Result<Option<Vec<u8>>, SinkError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).map_err(|e| SinkError::kafka("assigning", e))?;
    c.assign(&tpl).map_err(|e| SinkError::kafka("assigning", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(300)) {
            Some(Ok(m)) if m.offset() == offset && m.topic() == topic && m.partition() == partition => {
                return Ok(Some(m.payload().unwrap_or(&[]).to_vec()))
            }
            // Fetched for an earlier assignment: not this record's answer.
            Some(Ok(m)) if m.topic() != topic || m.partition() != partition || m.offset() < offset => {}
            // The record is gone (retention) or was a transaction marker: the next one is later.
            Some(Ok(_)) => return Ok(None),
            Some(Err(e)) => return Err(SinkError::kafka(format!("reading {topic}@{offset}"), e)),
            None => {}
        }
    }
    Ok(None)
}

/// Replays the selected dead letters; returns (replayed, skipped with the reason).
pub async fn replay(cfg: &Config, dead: &[Dead], dry_run: bool) -> Result<(usize, Vec<String>), SinkError> {
    let producer: FutureProducer = client_config(&cfg.kafka)
        .set("message.max.bytes", omrs_core::topics::MAX_RECORD_BYTES.to_string())
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| SinkError::kafka("creating the producer", e))?;
    let source = reader(cfg)?;
    let mut done = 0;
    let mut skipped = Vec::new();
    for d in dead {
        let topic = d.str("topic").to_string();
        let partition = d.record.get("partition").and_then(J::as_i64).unwrap_or(0) as i32;
        let Some(offset) = d.record.get("offset").and_then(J::as_i64).filter(|o| *o >= 0) else {
            skipped.push(format!("dead letter {}: it names no source offset", d.dlq_offset));
            continue;
        };
        if topic.is_empty() {
            skipped.push(format!("dead letter {}: it names no source topic", d.dlq_offset));
            continue;
        }
        let Some(payload) = fetch(&source, &topic, partition, offset)? else {
            skipped.push(format!("dead letter {}: {topic}@{offset} is no longer in its topic", d.dlq_offset));
            continue;
        };
        if dry_run {
            tracing::info!(dlq_offset = d.dlq_offset, topic = %topic, offset, bytes = payload.len(), "would replay");
            done += 1;
            continue;
        }
        let key = format!("replay:{}:{}", topic, offset);
        producer
            .send(FutureRecord::to(&topic).partition(partition).key(&key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| SinkError::kafka(format!("replaying into {topic}"), e))?;
        tracing::info!(dlq_offset = d.dlq_offset, topic = %topic, offset, "replayed");
        done += 1;
    }
    Ok((done, skipped))
}
