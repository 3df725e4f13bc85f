//! The one error type of `omrs-core`.
//!
//! Every variant is either *transient* (a retry or reconnect may succeed: the broker is down, a
//! timeout) or *definite* (retrying cannot help: a malformed record, an invalid config). Callers
//! retry the first kind and dead-letter or report the second.

use std::path::PathBuf;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A config file could not be read.
    #[error("{file}: cannot read: {source}")]
    ConfigRead {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{file}: {key}: {message}")]
    Config {
        file: PathBuf,
        /// Dotted path of the offending key, e.g. `sites[1].database.url`.
        key: String,
        message: String,
    },
    /// A change event that does not follow the envelope contract.
    #[error("invalid change event: {0}")]
    Envelope(String),
    /// A Kafka operation failed. `transient` says whether a retry may succeed.
    #[error("kafka: {context}: {message}")]
    Kafka {
        context: String,
        message: String,
        transient: bool,
    },
    /// Topics on the broker do not match `topics.toml`.
    #[error("{} topic mismatch(es):\n  {}", .0.len(), .0.join("\n  "))]
    TopicMismatch(Vec<String>),
    /// A database (a site's or HQ's) refused or failed a statement.
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    /// The metrics endpoint could not bind or serve.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Another stage's metrics endpoint could not be read (`omrs-stream status`).
    #[error("metrics endpoint {url}: {message}")]
    Scrape { url: String, message: String },
}

impl CoreError {
    /// True when retrying (reconnecting, backing off) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CoreError::Kafka { transient, .. } => *transient,
            CoreError::Metrics { .. } | CoreError::Scrape { .. } => true,
            CoreError::Db { source, .. } => is_transient_db(source),
            CoreError::ConfigRead { .. }
            | CoreError::Config { .. }
            | CoreError::Envelope(_)
            | CoreError::TopicMismatch(_) => false,
        }
    }

    /// A database error, with what was being done.
    pub fn db(context: impl Into<String>, source: mysql_async::Error) -> Self {
        CoreError::Db { context: context.into(), source }
    }

    pub(crate) fn kafka(context: impl Into<String>, err: rdkafka::error::KafkaError) -> Self {
        let transient = match err.rdkafka_error_code() {
            Some(code) => matches!(
                code,
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                    | rdkafka::types::RDKafkaErrorCode::AllBrokersDown
                    | rdkafka::types::RDKafkaErrorCode::OperationTimedOut
                    | rdkafka::types::RDKafkaErrorCode::RequestTimedOut
                    | rdkafka::types::RDKafkaErrorCode::NetworkException
                    | rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable
                    | rdkafka::types::RDKafkaErrorCode::NotLeaderForPartition
                    | rdkafka::types::RDKafkaErrorCode::NotCoordinator
                    | rdkafka::types::RDKafkaErrorCode::CoordinatorNotAvailable
            ),
            None => true,
        };
        CoreError::Kafka { context: context.into(), message: err.to_string(), transient }
    }
}

/// True when a MariaDB/MySQL error may go away on a retry: the connection broke, or the server
/// reported a deadlock, a lock wait timeout, a shutdown or too many connections.
pub fn is_transient_db(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => true,
        // 1213 deadlock, 1205 lock wait timeout, 2006/2013 gone away, 1927 connection killed,
        // 1053 server shutdown, 1040 too many connections.
        mysql_async::Error::Server(s) => matches!(s.code, 1213 | 1205 | 2006 | 2013 | 1927 | 1053 | 1040),
        _ => false,
    }
}
