//! Configuration: `omrs-stream.toml` (sites, databases, identity rules, sinks) and `topics.toml`.
//!
//! Loading is three steps, all before anything connects:
//! 1. parse the TOML;
//! 2. substitute `${NAME}` / `${NAME:-default}` in every string value (secrets stay out of
//!    the file; `$${` is a literal `${`);
//! 3. deserialize with unknown keys rejected, then [`Config::validate`].
//!
//! Every error names the file, the dotted key (`sites[1].database.port`) and what is wrong.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{CoreError, Result};

mod aggregates;
mod debezium;
mod env;
mod identity;
mod sinks;
mod stages;
pub use aggregates::*;
pub use debezium::*;
pub use identity::*;
pub use sinks::*;
pub use stages::*;

/// `omrs-stream.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    pub sites: Vec<SiteConfig>,
    pub hq: HqConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub transform: TransformConfig,
    #[serde(default)]
    pub sinks: SinksConfig,
    #[serde(default)]
    pub aggregates: AggregatesConfig,
}

/// Kafka connection. Every librdkafka setting not named here goes in `properties`.
///
/// Secrets come from the environment (`${NAME}`) or from a file (`sasl_password_file`), never
/// from the file's own text in production; `Debug` prints them as `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    #[serde(default = "default_bootstrap")]
    pub bootstrap_servers: String,
    /// Prepended to every topic name (for shared brokers, and for isolated test runs).
    #[serde(default)]
    pub topic_prefix: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER` or `GSSAPI`.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// A file holding the SASL password (trailing newline ignored); read at load time.
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    #[serde(default)]
    pub ssl_certificate_location: Option<String>,
    #[serde(default)]
    pub ssl_key_location: Option<String>,
    #[serde(default)]
    pub ssl_key_password: Option<String>,
    /// Raw librdkafka properties, passed through unchanged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_bootstrap() -> String {
    "127.0.0.1:9092".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: default_bootstrap(),
            topic_prefix: String::new(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            properties: BTreeMap::new(),
        }
    }
}

/// The Prometheus endpoint (`/metrics`, `/health`) every process serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port`. Each process needs its own port; the subcommands accept `--metrics-listen`.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: default_metrics_listen() }
    }
}

impl MetricsConfig {
    pub fn addr(&self) -> Result<SocketAddr> {
        self.listen.parse().map_err(|e| CoreError::Config {
            file: PathBuf::from("<metrics>"),
            key: "metrics.listen".into(),
            message: format!("`{}` is not host:port ({e})", self.listen),
        })
    }
}

/// One clinic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Lower-case letters, digits and `-`; used in topic names (`omrs.cdc.<name>`).
    pub name: String,
    pub database: DatabaseConfig,
    /// Conflict tie-break: higher wins when change times are equal (DESIGN.md semantics 6).
    #[serde(default)]
    pub priority: i32,
    /// The site server's time zone, in which OpenMRS writes its DATETIMEs: `UTC` (the
    /// default), an offset such as `+03:00`, or an IANA name such as `Africa/Nairobi`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Read this clinic's changes from an existing Debezium deployment's topics instead of its
    /// binlog (`omrs-stream ingest --site S --from-debezium`).
    #[serde(default)]
    pub debezium: Option<DebeziumConfig>,
}

/// A MySQL/MariaDB database. `Debug` prints the password as `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// A file holding the password (trailing newline ignored); read at load time.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Schema name, e.g. `openmrs`.
    pub database: String,
    /// TLS to the server. Absent: plain TCP.
    #[serde(default)]
    pub tls: Option<DbTlsConfig>,
    /// Which server a site runs, and so which snapshot and binlog paths its agent takes:
    /// `auto` (the default: read from `VERSION()`), `mariadb` or `mysql`. Ignored for HQ.
    #[serde(default)]
    pub flavor: Flavor,
}

/// A site server's kind (`[sites.database] flavor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    #[default]
    Auto,
    Mariadb,
    Mysql,
}

/// TLS to a MySQL/MariaDB server (`[sites.database.tls]`, `[hq.database.tls]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbTlsConfig {
    /// PEM file of the CA that signed the server's certificate. Absent: the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Check that the certificate names `host` (default true). Turn off only for servers
    /// reached by an address their certificate does not list.
    #[serde(default = "default_true")]
    pub verify_identity: bool,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("password_file", &self.password_file)
            .field("database", &self.database)
            .field("tls", &self.tls)
            .field("flavor", &self.flavor)
            .finish()
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        let props: BTreeMap<&String, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k, if k.contains("password") || k.contains("secret") || k.contains("jaas") { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &hidden(&self.sasl_password))
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &hidden(&self.ssl_key_password))
            .field("properties", &props)
            .finish()
    }
}

/// Reads a secret file: the whole file (at most 64 KiB), one trailing newline (`\n` or `\r\n`)
/// removed. Err is a sentence that starts with the path: a missing, unreadable or empty file.
/// The config's `*_password_file` keys and `query --serve --password-file` read their files so.
pub fn read_secret(path: &Path) -> std::result::Result<String, String> {
    use std::io::Read;
    if !path.is_file() {
        return Err(format!("{} does not exist or is not a regular file", path.display()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
        .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if text.is_empty() {
        return Err(format!("{}: the file is empty", path.display()));
    }
    Ok(text.to_string())
}

/// [`read_secret`] for the config key `key` of `file`.
fn read_secret_file(path: &Path, key: &str, file: &Path) -> Result<String> {
    read_secret(path).map_err(|m| CoreError::Config { file: file.to_path_buf(), key: key.to_string(), message: format!("the secret file {m}") })
}

fn default_host() -> String {
    "127.0.0.1".into()
}

impl DatabaseConfig {
    /// `mysql://user:password@host:port/database` with user and password percent-encoded.
    pub fn url(&self) -> String {
        format!(
            "mysql://{}:{}@{}:{}/{}",
            pct(&self.user),
            pct(&self.password),
            self.host,
            self.port,
            self.database
        )
    }

    /// Connection options (TCP, not the socket), with TLS when `tls` is set.
    pub fn opts(&self) -> mysql_async::OptsBuilder {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(Some(self.database.clone()))
            .prefer_socket(false);
        match &self.tls {
            None => opts,
            Some(tls) => {
                let mut ssl = mysql_async::SslOpts::default().with_danger_skip_domain_validation(!tls.verify_identity);
                if let Some(ca) = &tls.ca_file {
                    ssl = ssl.with_root_certs(vec![ca.clone().into()]);
                }
                opts.ssl_opts(Some(ssl))
            }
        }
    }

    /// The same URL without the password, for logs and manifests.
    pub fn redacted_url(&self) -> String {
        format!("mysql://{}@{}:{}/{}", pct(&self.user), self.host, self.port, self.database)
    }
}

fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqConfig {
    pub database: DatabaseConfig,
}

impl Config {
    /// Reads, substitutes, parses and validates `omrs-stream.toml`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CoreError::ConfigRead { file: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// As [`Config::load`], from text; `file` is used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config> {
        let mut cfg: Config = parse_toml(text, file)?;
        cfg.read_secret_files(file)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Replaces every `*_password_file` by the password it holds. Naming both a password and
    /// a password file is an error: which one wins would be a guess.
    fn read_secret_files(&mut self, file: &Path) -> Result<()> {
        let both = |key: &str| CoreError::Config {
            file: file.to_path_buf(),
            key: key.to_string(),
            message: "set the password or the password file, not both".into(),
        };
        if let Some(path) = self.kafka.sasl_password_file.clone() {
            if self.kafka.sasl_password.is_some() {
                return Err(both("kafka.sasl_password_file"));
            }
            self.kafka.sasl_password = Some(read_secret_file(&path, "kafka.sasl_password_file", file)?);
        }
        let mut dbs: Vec<(String, &mut DatabaseConfig)> =
            self.sites.iter_mut().enumerate().map(|(i, s)| (format!("sites[{i}].database"), &mut s.database)).collect();
        dbs.push(("hq.database".into(), &mut self.hq.database));
        for (key, db) in dbs {
            if let Some(path) = db.password_file.clone() {
                if !db.password.is_empty() {
                    return Err(both(&format!("{key}.password_file")));
                }
                db.password = read_secret_file(&path, &format!("{key}.password_file"), file)?;
            }
        }
        Ok(())
    }

    pub fn site(&self, name: &str) -> Option<&SiteConfig> {
        self.sites.iter().find(|s| s.name == name)
    }

    pub fn site_names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.name.clone()).collect()
    }

    /// Checks what serde cannot: names, ports, uniqueness, enumerations.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let err = |key: String, message: String| CoreError::Config {
            file: file.to_path_buf(),
            key,
            message,
        };
        if self.sites.is_empty() {
            return Err(err("sites".into(), "at least one [[sites]] entry is required".into()));
        }
        let mut seen = HashSet::new();
        for (i, site) in self.sites.iter().enumerate() {
            if !valid_site_name(&site.name) {
                return Err(err(
                    format!("sites[{i}].name"),
                    format!(
                        "`{}` must be 1-48 characters of a-z, 0-9 and `-` (it names a Kafka topic)",
                        site.name
                    ),
                ));
            }
            if !seen.insert(site.name.as_str()) {
                return Err(err(
                    format!("sites[{i}].name"),
                    format!("site `{}` is configured twice", site.name),
                ));
            }
            validate_db(&site.database, &format!("sites[{i}].database"), file)?;
            if let Some(d) = &site.debezium {
                if d.topic_prefix.is_empty() || !d.topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
                    return Err(err(format!("sites[{i}].debezium.topic_prefix"), format!("`{}` is not a Kafka topic prefix (letters, digits, `.`, `_`, `-`)", d.topic_prefix)));
                }
                if d.order_grace_ms > 60_000 {
                    return Err(err(format!("sites[{i}].debezium.order_grace_ms"), format!("{} ms holds every change of the clinic that long; at most 60000", d.order_grace_ms)));
                }
            }
            if let Some(z) = &site.time_zone {
                crate::zone::Zone::parse(z).map_err(|m| err(format!("sites[{i}].time_zone"), m))?;
            }
        }
        validate_db(&self.hq.database, "hq.database", file)?;

        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(err("kafka.bootstrap_servers".into(), "is empty".into()));
        }
        for server in self.kafka.bootstrap_servers.split(',') {
            let server = server.trim();
            let port = server.rsplit_once(':').map(|(_, p)| p);
            match port.map(str::parse::<u16>) {
                Some(Ok(p)) if p != 0 => {}
                _ => {
                    return Err(err(
                        "kafka.bootstrap_servers".into(),
                        format!("`{server}` is not host:port with a port in 1-65535"),
                    ))
                }
            }
        }
        if let Some(p) = &self.kafka.security_protocol {
            if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&p.to_lowercase().as_str())
            {
                return Err(err(
                    "kafka.security_protocol".into(),
                    format!("`{p}` is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"),
                ));
            }
        }
        if let Some(m) = &self.kafka.sasl_mechanism {
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]
                .contains(&m.as_str())
            {
                return Err(err(
                    "kafka.sasl_mechanism".into(),
                    format!("`{m}` is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI"),
                ));
            }
        }
        if !self.kafka.topic_prefix.is_empty() && !valid_topic_chars(&self.kafka.topic_prefix) {
            return Err(err(
                "kafka.topic_prefix".into(),
                format!("`{}` may only hold a-z, A-Z, 0-9, `.`, `_` and `-`", self.kafka.topic_prefix),
            ));
        }
        match self.metrics.listen.parse::<SocketAddr>() {
            Ok(_) => {}
            Err(e) => {
                return Err(err(
                    "metrics.listen".into(),
                    format!("`{}` is not host:port with a port in 0-65535 ({e})", self.metrics.listen),
                ))
            }
        }
        let mut types = HashSet::new();
        for (i, rule) in self.identity.identifiers.iter().enumerate() {
            if !looks_like_uuid(&rule.identifier_type_uuid) {
                return Err(err(
                    format!("identity.identifiers[{i}].identifier_type_uuid"),
                    format!("`{}` is not a uuid", rule.identifier_type_uuid),
                ));
            }
            if !types.insert(rule.identifier_type_uuid.as_str()) {
                return Err(err(
                    format!("identity.identifiers[{i}].identifier_type_uuid"),
                    "the same identifier type is listed twice".into(),
                ));
            }
        }
        for (i, col) in self.ingest.scrub.iter().enumerate() {
            if col.split('.').count() != 2 || col.starts_with('.') || col.ends_with('.') {
                return Err(err(
                    format!("ingest.scrub[{i}]"),
                    format!("`{col}` must be `table.column`"),
                ));
            }
        }
        if self.ingest.snapshot_chunk_rows == 0 {
            return Err(err("ingest.snapshot_chunk_rows".into(), "must be at least 1".into()));
        }
        if self.ingest.max_txn_events == 0 {
            return Err(err("ingest.max_txn_events".into(), "must be at least 1".into()));
        }
        if self.transform.idle_timeout_s == 0 {
            return Err(err("transform.idle_timeout_s".into(), "must be at least 1".into()));
        }
        if let Err((key, message)) = self.aggregates.windows() {
            return Err(err(key, message));
        }
        if self.aggregates.provisional_interval_ms == 0 {
            return Err(err("aggregates.provisional_interval_ms".into(), "must be at least 1".into()));
        }
        let pq = &self.sinks.parquet;
        if pq.path.as_os_str().is_empty() {
            return Err(err("sinks.parquet.path".into(), "is empty".into()));
        }
        if pq.roll_max_bytes < 4096 {
            return Err(err("sinks.parquet.roll_max_bytes".into(), format!("{} is too small (at least 4096)", pq.roll_max_bytes)));
        }
        if pq.roll_interval_ms == 0 {
            return Err(err("sinks.parquet.roll_interval_ms".into(), "must be at least 1".into()));
        }
        if pq.row_group_rows == 0 {
            return Err(err("sinks.parquet.row_group_rows".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

fn validate_db(db: &DatabaseConfig, key: &str, file: &Path) -> Result<()> {
    let err = |k: &str, message: String| CoreError::Config {
        file: file.to_path_buf(),
        key: format!("{key}.{k}"),
        message,
    };
    if db.host.trim().is_empty() {
        return Err(err("host", "is empty".into()));
    }
    if db.port == 0 {
        return Err(err("port", "0 is not a usable TCP port (1-65535)".into()));
    }
    if db.user.trim().is_empty() {
        return Err(err("user", "is empty".into()));
    }
    if let Some(ca) = db.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
        if !ca.is_file() {
            return Err(err("tls.ca_file", format!("`{}` is not a readable file", ca.display())));
        }
    }
    if db.database.trim().is_empty()
        || !db.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(err(
            "database",
            format!("`{}` must be a non-empty name of a-z, A-Z, 0-9 and `_`", db.database),
        ));
    }
    Ok(())
}

pub fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
}

fn valid_topic_chars(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

// ---------------------------------------------------------------------------------------------
// topics.toml

/// `topics.toml`: every Kafka topic of DESIGN.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsFile {
    pub topics: Vec<TopicSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name; `{site}` expands to one topic per configured site.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic-level configs (`cleanup.policy`, `retention.ms`, …) as strings.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// A topic after `{site}` expansion and prefixing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTopic {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
}

impl TopicsFile {
    pub fn load(path: &Path) -> Result<TopicsFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CoreError::ConfigRead { file: path.to_path_buf(), source })?;
        TopicsFile::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<TopicsFile> {
        let tf: TopicsFile = parse_toml(text, file)?;
        tf.validate(file)?;
        Ok(tf)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let err = |key: String, message: String| CoreError::Config {
            file: file.to_path_buf(),
            key,
            message,
        };
        let mut names = HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            let bare = t.name.replace("{site}", "x");
            if bare.is_empty() || !valid_topic_chars(&bare) || t.name.matches('{').count() > t.name.matches("{site}").count() {
                return Err(err(
                    format!("topics[{i}].name"),
                    format!("`{}` is not a valid topic name (a-z, 0-9, `.`, `_`, `-`, and `{{site}}`)", t.name),
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(err(format!("topics[{i}].name"), format!("`{}` is declared twice", t.name)));
            }
            if t.partitions < 1 {
                return Err(err(format!("topics[{i}].partitions"), "must be at least 1".into()));
            }
            if t.replication_factor < 1 {
                return Err(err(format!("topics[{i}].replication_factor"), "must be at least 1".into()));
            }
            if let Some(p) = t.config.get("cleanup.policy") {
                if !["delete", "compact", "compact,delete", "delete,compact"].contains(&p.as_str()) {
                    return Err(err(
                        format!("topics[{i}].config.\"cleanup.policy\""),
                        format!("`{p}` is not delete, compact or compact,delete"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Expands `{site}` for every site and applies the prefix.
    pub fn resolve(&self, sites: &[String], prefix: &str) -> Vec<ResolvedTopic> {
        let mut out = Vec::new();
        for t in &self.topics {
            let names: Vec<String> = if t.name.contains("{site}") {
                sites.iter().map(|s| t.name.replace("{site}", s)).collect()
            } else {
                vec![t.name.clone()]
            };
            for name in names {
                out.push(ResolvedTopic {
                    name: format!("{prefix}{name}"),
                    partitions: t.partitions,
                    replication_factor: t.replication_factor,
                    config: t.config.clone(),
                });
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// shared parsing

fn parse_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T> {
    let mut value: toml::Value = toml::from_str(text).map_err(|e| CoreError::Config {
        file: file.to_path_buf(),
        key: "(syntax)".into(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    env::substitute_env(&mut value, &mut String::new(), file)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        CoreError::Config {
            file: file.to_path_buf(),
            key: if path == "." { "(top level)".into() } else { path },
            message: clean_message(&e.into_inner().to_string()),
        }
    })
}

/// toml's deserializer appends "in `table`" lines that repeat the key path; drop them.
fn clean_message(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("in `"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fuzz target `config` (fuzz/) and its regression test: any text loads and validates as
/// `omrs-stream.toml` / `topics.toml`, or is refused with an error naming the file. Err names a
/// refusal that does not.
pub fn check_config_text(text: &str) -> std::result::Result<(), String> {
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            let _ = cfg.aggregates.windows();
            let _ = cfg.metrics.addr();
        }
        Err(e) if !e.to_string().contains("fuzz.toml") => return Err(format!("an error that does not name the file: {e}")),
        Err(_) => {}
    }
    if let Err(e) = TopicsFile::parse(text, Path::new("topics.toml")) {
        if !e.to_string().contains("topics.toml") {
            return Err(format!("an error that does not name the file: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `transform.max_buffered_events` went with the ordered merge (issue #24); a config that
    /// still sets it loads, and the new setting has its default.
    #[test]
    fn an_older_config_with_max_buffered_events_still_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../omrs-stream.toml");
        // Read at build time: a test binary built in another checkout of the repository (a
        // shared target directory) still finds it.
        let text = include_str!("../../../omrs-stream.toml");
        let old = text.replace("max_clock_ahead_s = 300", "max_buffered_events = 200000");
        assert_ne!(old, text);
        let cfg = Config::parse(&old, &root).expect("loads");
        assert_eq!((cfg.transform.max_buffered_events, cfg.transform.max_clock_ahead_s), (Some(200_000), 300));
    }

    #[test]
    fn password_is_encoded_in_url_and_hidden_in_redacted() {
        let db = DatabaseConfig {
            host: "h".into(),
            port: 1,
            user: "u".into(),
            password: "p@ss:/".into(),
            password_file: None,
            database: "d".into(),
            tls: None,
            flavor: Flavor::Auto,
        };
        assert_eq!(db.url(), "mysql://u:p%40ss%3A%2F@h:1/d");
        assert!(!db.redacted_url().contains("ss"));
        assert!(!format!("{db:?}").contains("p@ss"), "Debug must not print the password");
    }
}
