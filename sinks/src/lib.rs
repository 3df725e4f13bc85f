//! omrs-sinks: the HQ MySQL sink (`hq_mysql/`), the Parquet lake sink (`parquet/`) and the
//! DataFusion query layer. Delivery guarantee, once built: exactly once (offsets committed with
//! the rows at HQ; Parquet files published atomically with a manifest of offsets).
//!
//! Not built yet: issues #6 and #7. `omrs-stream sink` and `query` say so and exit 2.

/// Errors of the sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the sinks are not built yet (issues #6 and #7)")]
    NotBuilt,
}
