//! omrs-core: what every stage of omrs-stream shares.
//!
//! - [`envelope`]: the change-event envelope of DESIGN.md (Debezium-shaped JSON).
//! - [`arrow_map`]: the one MySQL → Arrow type map, and envelope values → Arrow values.
//! - [`config`]: `omrs-stream.toml` and `topics.toml`, with `${ENV}` substitution and validation
//!   that runs before anything connects.
//! - [`dlq`]: the dead-letter record every stage writes to `omrs.dlq`.
//! - [`hq`]: the records of `omrs.hq.changes` and the one conflict rule (semantics 6).
//! - [`openmrs`]: loading the OpenMRS schema and metadata from the demo dump (sites and HQ), and
//!   the rules of OpenMRS's own patient merge (what moves, in whose name).
//! - [`model`]: the table model of an OpenMRS database, from its `information_schema`.
//! - [`kafka`]: librdkafka client settings, including TLS/SASL passthrough.
//! - [`topics`]: `omrs-stream topics apply|check` against the broker's admin API.
//! - [`metrics`]: every `omrs_stream_*` metric name.
//! - [`endpoint`]: `/metrics` and `/health` (readiness: connected and not stuck), over axum.
//! - [`error`]: the crate's one error enum, split into transient and definite errors.
//! - [`runtime`]: process-wide settings (transparent huge pages off).
//! - [`clock`]: the wall clock in milliseconds, and retries with capped, jittered backoff.
//! - [`stop`]: a clean stop on SIGTERM/SIGINT, checked by every stage between batches.
//! - [`zone`]: site time zones, and the per-site rules (priority, zone) of the conflict rule.

pub mod arrow_map;
pub mod clock;
pub mod config;
pub mod dlq;
pub mod endpoint;
pub mod envelope;
pub mod error;
pub mod hq;
pub mod image;
pub mod kafka;
pub mod merge_log;
pub mod metrics;
pub mod model;
pub mod openmrs;
pub mod prom;
pub mod runtime;
pub mod shape;
pub mod stop;
pub mod topics;
pub mod zone;

pub use error::{CoreError, Result};
