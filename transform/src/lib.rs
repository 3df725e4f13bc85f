//! omrs-transform: `omrs-stream transform`, the merge stage.
//!
//! Delivery guarantee: **exactly once**. Consume (read_committed) → transform → produce runs
//! in Kafka transactions: the output events, the state changelog facts
//! (`omrs.transform.state`) and the consumer offsets commit together. Every event read is
//! emitted (or dead-lettered) in the transaction of its batch, so the offsets committed are
//! those after every record read; a crash re-reads what no transaction committed. Offset ranges
//! that an earlier, buffering version emitted past its offsets are restored from the changelog
//! and skipped when read again. State is restored from the changelog before consuming.
//!
//! - [`aggregate`]: the dashboard aggregates, tumbling windows finalised by the watermark.
//! - [`engine`]: emit on arrival, watermarks, late data, identity (no Kafka).
//! - [`event`]: input events held with raw row images, and the output records written from them.
//! - [`identity`]: the union-find over person records.
//! - [`runner`]: the Kafka loop.
//!
//! Runs as a single instance (one consumer in its group); a second one is fenced by the shared
//! `transactional.id`.

pub mod aggregate;
pub mod engine;
pub mod event;
pub mod identity;
pub mod nearmiss;
pub mod runner;
pub mod synth;

/// Errors of the transform. Kafka errors are transient (the loop restarts from the last
/// committed transaction); a bad input record is not an error at all (it is dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("kafka: {context}: {message}")]
    Kafka { context: String, message: String },
    #[error("state changelog: {0}")]
    State(String),
    #[error("config: {0}")]
    Config(String),
}

impl TransformError {
    pub fn kafka(context: &str, e: rdkafka::error::KafkaError) -> Self {
        TransformError::Kafka { context: context.to_string(), message: e.to_string() }
    }
    pub fn is_transient(&self) -> bool {
        matches!(self, TransformError::Kafka { .. })
    }
}

/// `omrs-stream transform`.
#[derive(Debug, Clone, clap::Args)]
pub struct TransformArgs {
    /// Serve /metrics and /health on this port (overrides metrics.listen).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Exit 0 once every site topic has been read to its end (as of start) and everything
    /// buffered has been emitted; for batch runs and tests.
    #[arg(long)]
    pub until_idle: bool,
}
