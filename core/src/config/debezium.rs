//! `[sites.debezium]`: the settings of a clinic read from an existing Debezium deployment's
//! topics (`omrs-stream ingest --from-debezium`).

use serde::Deserialize;

use super::{KafkaConfig, SiteConfig};

/// `[sites.debezium]`: a clinic already streamed by Debezium's MariaDB or MySQL connector
/// (Kafka Connect, or OpenMRS DB Sync), read from its topics (docs/OPERATIONS.md, "Using an
/// existing Debezium deployment").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// The connector's `topic.prefix`: a table's changes are in `<topic_prefix>.<database>.<table>`,
    /// its DDL in `<topic_prefix>`.
    pub topic_prefix: String,
    /// The captured database as the topics name it (default: `[sites.database] database`).
    #[serde(default)]
    pub database: Option<String>,
    /// The connector's JsonConverter writes schemas (`value.converter.schemas.enable=true`:
    /// `{"schema":…,"payload":…}`). Both forms are read either way; this says which to expect.
    #[serde(default)]
    pub schemas: bool,
    /// Where the table model (columns, keys, foreign keys) is read at start: `hq` (HQ's
    /// database, which holds the programme's OpenMRS schema; the default) or `site` (the
    /// clinic's database, when HQ can reach it). The connector's DDL records keep it current.
    #[serde(default)]
    pub model: ModelSource,
    /// The connector's heartbeat topic (`heartbeat.interval.ms` set): a quiet clinic's
    /// watermark moves with it. Default `__debezium-heartbeat.<topic_prefix>`.
    #[serde(default)]
    pub heartbeat_topic: Option<String>,
    /// How long a change waits for a table topic that has nothing yet, in case an earlier change
    /// of that table is still on its way from Connect (the topics are written independently).
    #[serde(default = "default_order_grace_ms")]
    pub order_grace_ms: u64,
    /// How long a change whose foreign key names a row not seen yet waits for it before it is
    /// dead-lettered with the reason.
    #[serde(default = "default_ref_wait_ms")]
    pub ref_wait_ms: u64,
    /// The cluster the Debezium topics are on, when it is not `[kafka]`'s. The input's position
    /// is kept in this project's checkpoint topic either way.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
}

fn default_order_grace_ms() -> u64 {
    500
}

fn default_ref_wait_ms() -> u64 {
    30_000
}

/// `[sites.debezium] model`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    #[default]
    Hq,
    Site,
}

impl DebeziumConfig {
    /// The database part of the topic names.
    pub fn database<'a>(&'a self, site: &'a SiteConfig) -> &'a str {
        self.database.as_deref().unwrap_or(&site.database.database)
    }

    /// The topic of `table`'s changes.
    pub fn table_topic(&self, site: &SiteConfig, table: &str) -> String {
        format!("{}.{}.{table}", self.topic_prefix, self.database(site))
    }

    /// The topic of the connector's heartbeats.
    pub fn heartbeats(&self) -> String {
        self.heartbeat_topic.clone().unwrap_or_else(|| format!("__debezium-heartbeat.{}", self.topic_prefix))
    }
}
