//! The agent's checkpoint: where it is in the snapshot or the binlog. It lives in the compacted
//! `omrs.ingest.offsets` topic, keyed by site, and is written in the same Kafka transaction as
//! the events it covers, so the topic and the checkpoint never disagree.

use std::time::Duration;

use omrs_core::config::KafkaConfig;
use omrs_core::kafka::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::IngestError;

/// A binlog position. Ordered by (file, pos); binlog file names share a prefix and a
/// zero-padded sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub file: String,
    pub pos: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
}

impl Position {
    pub fn key(&self) -> (&str, u64) {
        (&self.file, self.pos)
    }
    pub fn le(&self, other: &Position) -> bool {
        self.key() <= other.key()
    }
}

/// The part of the snapshot read under one consistent view (one per snapshot attempt): rows of
/// `tables[table_idx]` with key > `after_key` (all of them if None), and every later table, up
/// to the next segment. Their state is as of `position`, so binlog changes at or before it are
/// already in them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub table_idx: usize,
    pub after_key: Option<i64>,
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Checkpoint {
    Snapshot {
        /// The snapshot's table order, fixed when it started.
        tables: Vec<String>,
        segments: Vec<Segment>,
        /// Next table to read, and the last key already sent from it.
        next_table: usize,
        after_key: Option<i64>,
        rows: u64,
    },
    Streaming {
        /// Where to resume: the end of the last transaction sent, or the start of a split one.
        position: Position,
        /// Row events of the transaction at `position` already sent (a split transaction).
        #[serde(default)]
        skip_rows: u64,
        /// Snapshot segments still to be honoured until the stream passes their positions.
        #[serde(default)]
        tables: Vec<String>,
        #[serde(default)]
        segments: Vec<Segment>,
    },
}

impl Checkpoint {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Reads the last committed checkpoint of `site` (read_committed), or None.
pub fn read(kafka: &KafkaConfig, topic: &str, site: &str) -> Result<Option<Checkpoint>, IngestError> {
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("omrs-ingest-checkpoint-{site}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| IngestError::kafka("creating the checkpoint reader", e))?;
    let timeout = Duration::from_secs(30);
    let (low, high) = consumer.fetch_watermarks(topic, 0, timeout).map_err(|e| {
        let missing = matches!(
            e.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::UnknownPartition | rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition | rdkafka::types::RDKafkaErrorCode::UnknownTopic)
        );
        if missing {
            IngestError::Usage(format!("topic {topic} does not exist: create the topics first with `omrs-stream topics apply`"))
        } else {
            IngestError::kafka(&format!("reading the end of {topic}"), e)
        }
    })?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| IngestError::kafka("assigning the checkpoint partition", e))?;
    consumer.assign(&tpl).map_err(|e| IngestError::kafka("assigning the checkpoint partition", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.map_err(|e| IngestError::kafka("reading checkpoints", e))?;
            if msg.key() == Some(site.as_bytes()) {
                if let Some(payload) = msg.payload() {
                    let cp: Checkpoint = serde_json::from_slice(payload).map_err(|e| IngestError::Checkpoint(format!("{topic}: {e}")))?;
                    last = Some(cp);
                }
            }
        }
        let pos = consumer
            .position()
            .ok()
            .and_then(|p| p.find_partition(topic, 0).map(|e| e.offset()));
        if let Some(Offset::Offset(o)) = pos {
            if o >= high {
                break;
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(IngestError::Kafka { context: format!("reading checkpoints of {site} from {topic}"), message: "timed out before the end of the topic".into() });
        }
    }
    Ok(last)
}
