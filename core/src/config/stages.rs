//! `[ingest]` and `[transform]`: what the agents read and never ship, and how the transform
//! turns site streams into `omrs.hq.changes` (watermarks, batches).

use serde::Deserialize;

/// What the ingest agents read and what never leaves a site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Tables to capture; empty means every table not excluded.
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default = "default_exclude")]
    pub exclude: Vec<String>,
    /// `table.column` values that are never shipped.
    #[serde(default = "default_scrub")]
    pub scrub: Vec<String>,
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: u32,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// A site transaction with more captured rows than this is committed to Kafka in parts
    /// (each with a checkpoint inside the transaction), so one huge UPDATE cannot exceed what a
    /// Kafka transaction should hold.
    #[serde(default = "default_max_txn_events")]
    pub max_txn_events: usize,
    /// A live site's changes are committed to Kafka in batches (one Kafka transaction each)
    /// that close this long after their first change (or at 20,000 events). Lower is quicker to
    /// HQ and costs the broker more transactions per second per site (docs/BENCHMARKS.md,
    /// "The latency probe", has the figures behind the default).
    #[serde(default = "default_ingest_batch_ms")]
    pub batch_max_ms: u64,
}

fn default_ingest_batch_ms() -> u64 {
    50
}

fn default_max_txn_events() -> usize {
    50_000
}

fn default_exclude() -> Vec<String> {
    [
        "liquibasechangelog",
        "liquibasechangeloglock",
        "scheduler_task_config",
        "scheduler_task_config_property",
        "idgen_pooled_identifier",
        "idgen_log_entry",
        "notification_alert_recipient",
        "hl7_in_queue",
        "hl7_in_archive",
        "hl7_in_error",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn default_scrub() -> Vec<String> {
    ["users.password", "users.salt", "users.secret_question", "users.secret_answer"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_chunk_rows() -> u32 {
    5_000
}

fn default_heartbeat_ms() -> u64 {
    1_000
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            include: Vec::new(),
            exclude: default_exclude(),
            scrub: default_scrub(),
            snapshot_chunk_rows: default_chunk_rows(),
            heartbeat_interval_ms: default_heartbeat_ms(),
            max_txn_events: default_max_txn_events(),
            batch_max_ms: default_ingest_batch_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Bounded out-of-orderness subtracted from each site's latest event time.
    #[serde(default = "default_ooo")]
    pub out_of_orderness_ms: u64,
    /// A site with no event or heartbeat for this long stops holding the global watermark back.
    #[serde(default = "default_idle")]
    pub idle_timeout_s: u64,
    /// How far ahead of the transform's clock a site's event times may carry its watermark: a
    /// clinic clock that jumps forward is capped here, so it cannot finalise windows and
    /// partitions early or make other sites' events late.
    #[serde(default = "default_clock_ahead")]
    pub max_clock_ahead_s: u64,
    /// No longer used: the transform buffers nothing since it emits on arrival (issue #24).
    /// Accepted so that older configs still load; a warning says it is ignored.
    #[serde(default)]
    pub max_buffered_events: Option<usize>,
    /// The transform reads for at most this long (or 20,000 records) per batch, which it then
    /// writes in one Kafka transaction. A batch closes sooner, once it holds a record, nothing
    /// more is ready and the transaction before has committed; an empty batch waits this long
    /// for its first record.
    #[serde(default = "default_transform_batch_ms")]
    pub batch_max_ms: u64,
}

fn default_transform_batch_ms() -> u64 {
    50
}

fn default_ooo() -> u64 {
    2_000
}
fn default_idle() -> u64 {
    180
}
fn default_clock_ahead() -> u64 {
    300
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            out_of_orderness_ms: default_ooo(),
            idle_timeout_s: default_idle(),
            max_clock_ahead_s: default_clock_ahead(),
            max_buffered_events: None,
            batch_max_ms: default_transform_batch_ms(),
        }
    }
}
