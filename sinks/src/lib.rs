//! omrs-sinks: the consumers of `omrs.hq.changes`.
//!
//! - [`hq_mysql`]: the consolidated HQ OpenMRS database. Delivery guarantee: exactly once —
//!   the consumed offsets are stored in the HQ database in the same transaction as the rows.
//! - [`parquet`]: the analytics lake. Delivery guarantee: exactly once — files are committed
//!   by a manifest entry that names them and the offsets they cover (write, fsync, rename).
//! - [`query`]: DataFusion SQL over the lake (read only).
//! - [`verify`]: the reconciliation of sites, HQ and the lake (read only).

pub mod dlq;
pub mod failpoint;
pub mod hq_mysql;
pub mod identity;
pub mod kafka;
pub mod parquet;
pub mod query;
pub mod status;
pub mod verify;

/// Errors of the sinks. Transient ones (the database or the broker unreachable, a deadlock) are
/// retried from the last committed batch; definite ones stop the process with the reason.
/// Errors of a single record are not errors of the sink: the record goes to `omrs.dlq`.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The MySQL error is part of the message (not a `source`), so it is printed once.
    #[error("HQ database: {context}: {source}")]
    Db { context: String, source: mysql_async::Error },
    #[error("kafka: {context}: {message}")]
    Kafka { context: String, message: String, transient: bool },
    #[error("HQ schema: {0}")]
    Schema(String),
    /// HQ could not be reached while reading something; a retry may succeed.
    #[error("HQ unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Usage(String),
    /// The lake's disk: full, read-only, gone. Retried from the last commit.
    #[error("lake: {context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The lake's content is not what the sink wrote (a definite error).
    #[error("lake: {0}")]
    Lake(String),
    /// A query over the lake failed (bad SQL, unknown table…).
    #[error("{0}")]
    Query(String),
    /// HQ refused a row the uuid filter took for new: its uuid is at HQ after all (a writer
    /// other than the sink). The batch rolls back and the sink starts again from its stored
    /// offsets, with `table`'s rows looked up ([`hq_mysql::apply`]'s `new_rows`).
    #[error("HQ already holds a {table} uuid that the sink took for new: {detail}")]
    UuidTaken { table: String, detail: String },
}

impl From<omrs_core::CoreError> for SinkError {
    /// A database error stays one (and keeps its transient or definite kind).
    fn from(e: omrs_core::CoreError) -> Self {
        match e {
            omrs_core::CoreError::Db { context, source } => SinkError::Db { context, source },
            omrs_core::CoreError::Kafka { context, message, transient } => SinkError::Kafka { context, message, transient },
            other => SinkError::Schema(other.to_string()),
        }
    }
}

impl SinkError {
    pub fn db(context: impl Into<String>, source: mysql_async::Error) -> Self {
        SinkError::Db { context: context.into(), source }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SinkError::Io { context: context.into(), source }
    }

    pub fn kafka(context: impl Into<String>, e: rdkafka::error::KafkaError) -> Self {
        SinkError::Kafka { context: context.into(), message: e.to_string(), transient: true }
    }

    /// Worth a retry: connection problems, deadlocks and lock waits, a broker that is away.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Db { source, .. } => is_transient_db(source),
            SinkError::Kafka { transient, .. } => *transient,
            SinkError::Unavailable(_) => true,
            SinkError::Io { .. } => true,
            _ => false,
        }
    }
}

/// Connection options for a configured database (TCP, not the socket; TLS when configured).
pub fn mysql_opts(d: &omrs_core::config::DatabaseConfig) -> mysql_async::OptsBuilder {
    d.opts()
}

/// A sink's progress line on a terminal (none with `--quiet` or when stderr is a file).
pub(crate) fn spinner(sink: &str, quiet: bool) -> Option<indicatif::ProgressBar> {
    (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        let template = format!("{{spinner}} {sink} {{msg}}");
        b.set_style(indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    })
}

/// MySQL errors that a retry of the whole transaction can fix.
pub use omrs_core::error::is_transient_db;
