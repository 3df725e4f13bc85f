//! omrs-transform: event-time merge of every site stream with watermarks, cross-site patient
//! identity and conflict resolution. Delivery guarantee, once built: exactly once, as a Kafka
//! consume-transform-produce transaction with its state changelog.
//!
//! Not built yet: issue #5. `omrs-stream transform` says so and exits 2.

/// Errors of the transform.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("the transform is not built yet (issue #5)")]
    NotBuilt,
}
