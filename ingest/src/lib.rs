//! omrs-ingest: the per-site agent (consistent snapshot, binlog tailing, FK-to-uuid resolution,
//! heartbeats, offsets in Kafka). Delivery guarantee, once built: exactly once from the site's
//! binlog into `omrs.cdc.<site>`, events and binlog position in one Kafka transaction.
//!
//! Not built yet: issue #4. `omrs-stream ingest` says so and exits 2.

/// Errors of the ingest agent.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The agent is not implemented in this build.
    #[error("the ingest agent is not built yet (issue #4)")]
    NotBuilt,
}
