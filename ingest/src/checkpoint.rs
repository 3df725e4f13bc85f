//! The agent's checkpoint: where it is in the snapshot or the binlog. It lives in the compacted
//! `omrs.ingest.offsets.<site>` topic (one per site; key = site), and is written in the same Kafka transaction as
//! the events it covers, so the topic and the checkpoint never disagree.

use omrs_core::config::KafkaConfig;
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
    /// MySQL's executed GTID set through this position (`crate::gtid`), when the server has
    /// GTIDs: the agent can resume by it where the file is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid_set: Option<String>,
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
    /// `ingest --from-debezium` ([`crate::debezium`]): the next offset to read of every
    /// Debezium topic partition (`topic:partition`), and the last binlog position sent.
    Debezium {
        offsets: std::collections::BTreeMap<String, i64>,
        #[serde(default)]
        position: Option<Position>,
        #[serde(default)]
        ts_ms: i64,
    },
}

impl Checkpoint {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The checkpoint an agent of an older release left in the shared `omrs.ingest.offsets` topic,
/// read once when the site's own topic has none. A topic that is missing, or that these
/// credentials may not read (a deployment with per-site ACLs never had one), means none: the
/// agent then snapshots, which HQ and the lake absorb (rows are versioned upserts).
pub fn read_legacy(kafka: &KafkaConfig, topic: &str, site: &str) -> Option<Checkpoint> {
    match read(kafka, topic, site) {
        Ok(found) => {
            if found.is_some() {
                tracing::info!(site, topic, "resuming from the checkpoint in the shared topic of an older release");
            }
            found
        }
        Err(e) => {
            tracing::debug!(site, topic, error = %e, "no readable legacy checkpoint topic");
            None
        }
    }
}

/// Reads the last committed checkpoint of `site` (read_committed), or None.
pub fn read(kafka: &KafkaConfig, topic: &str, site: &str) -> Result<Option<Checkpoint>, IngestError> {
    Ok(read_with_schema(kafka, topic, site)?.0)
}

/// Reads the last committed checkpoint of `site` and the schema history beside it
/// ([`crate::schema`]).
pub fn read_with_schema(kafka: &KafkaConfig, topic: &str, site: &str) -> Result<(Option<Checkpoint>, crate::schema::History), IngestError> {
    read_state(kafka, topic, site, None)
}

/// [`read_with_schema`], and the ids the Debezium input saved ([`crate::debezium::ids`]) into
/// `ids` when given.
pub fn read_state(
    kafka: &KafkaConfig,
    topic: &str,
    site: &str,
    mut ids: Option<&mut crate::debezium::ids::Ids>,
) -> Result<(Option<Checkpoint>, crate::schema::History), IngestError> {
    let mut last = None;
    let mut history = crate::schema::History::default();
    omrs_core::kafka::read_to_end(kafka, topic, |key, payload, _| {
        match key {
            Some(k) if k == site.as_bytes() => last = Some(serde_json::from_slice::<Checkpoint>(payload).map_err(|e| e.to_string())?),
            Some(k) if k.starts_with(b"ids:") => {
                if let Some(ids) = ids.as_deref_mut() {
                    ids.load(k, payload)?;
                }
            }
            Some(k) => history.learn(k, payload)?,
            None => {}
        }
        Ok(())
    })
    .map_err(|e| {
        if e.is_transient() {
            IngestError::Kafka { context: "reading checkpoints".into(), message: e.to_string() }
        } else {
            IngestError::Checkpoint(e.to_string())
        }
    })?;
    Ok((last, history))
}
