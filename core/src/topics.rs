//! Topic names, and `omrs-stream topics apply|check` against the broker's admin API.
//!
//! `apply` creates missing topics, raises partition counts and sets declared configs; it is
//! idempotent (a second run reports everything unchanged). `check` changes nothing and lists
//! every difference between `topics.toml` and the broker.

/// The largest record the change topics take (`max.message.bytes` of `omrs.cdc.*` and
/// `omrs.hq.changes` in topics.toml); producers that write them set `message.max.bytes` to it.
pub const MAX_RECORD_BYTES: usize = 8_388_608;
/// The largest site change the transform passes on: room is left for what it adds (the
/// `change` wrapper, the canonical person, rewritten refs). A larger one is dead-lettered.
pub const MAX_CHANGE_BYTES: usize = MAX_RECORD_BYTES - 65_536;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;

use crate::config::{KafkaConfig, ResolvedTopic};
use crate::error::{CoreError, Result};
use crate::kafka::client_config;

/// The names of the topics of DESIGN.md, with the configured prefix.
#[derive(Debug, Clone, Default)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        TopicNames { prefix: prefix.into() }
    }
    /// `omrs.cdc.<site>`: one site's change events, one partition.
    pub fn cdc(&self, site: &str) -> String {
        format!("{}omrs.cdc.{site}", self.prefix)
    }
    pub fn hq_changes(&self) -> String {
        format!("{}omrs.hq.changes", self.prefix)
    }
    pub fn transform_state(&self) -> String {
        format!("{}omrs.transform.state", self.prefix)
    }
    /// Data managers' decisions on identity reviews (`omrs-stream identity confirm`).
    pub fn identity_decisions(&self) -> String {
        format!("{}omrs.identity.decisions", self.prefix)
    }
    /// What the transform reads: every site topic, and the identity decisions.
    pub fn transform_input_pattern(&self) -> String {
        let p = self.prefix.replace('.', "\\.");
        format!("^({p}omrs\\.cdc\\..+|{p}omrs\\.identity\\.decisions)$")
    }
    pub fn dlq(&self) -> String {
        format!("{}omrs.dlq", self.prefix)
    }
    /// One site agent's checkpoints. One topic per site, so that a site's Kafka credentials
    /// can write its own checkpoints and nobody else's (docs/ARCHITECTURE.md, "Security").
    pub fn ingest_offsets(&self, site: &str) -> String {
        format!("{}omrs.ingest.offsets.{site}", self.prefix)
    }
    /// The shared checkpoint topic of releases before per-site ones; read once, on upgrade.
    pub fn legacy_ingest_offsets(&self) -> String {
        format!("{}omrs.ingest.offsets", self.prefix)
    }
    /// What every site topic's name starts with.
    pub fn cdc_prefix(&self) -> String {
        format!("{}omrs.cdc.", self.prefix)
    }

    // Consumer groups and transactional ids: every stage's, named once here (the ACLs of
    // deploy/kafka/security/KafkaSecurity.java grants them by these names).

    /// The `transactional.id` of one site's agent: a restarted agent fences its predecessor.
    pub fn ingest_transactional_id(&self, site: &str) -> String {
        format!("{}omrs-ingest-{site}", self.prefix)
    }
    /// The transform's consumer group (its offsets are committed in its transactions).
    pub fn transform_group(&self) -> String {
        format!("{}omrs-transform", self.prefix)
    }
    /// The transform's `transactional.id` (the same name as its group).
    pub fn transform_transactional_id(&self) -> String {
        self.transform_group()
    }
    /// The transform's static group membership (`group.instance.id`).
    pub fn transform_instance(&self) -> String {
        format!("{}omrs-transform-1", self.prefix)
    }
    /// A sink's consumer group (`hq-mysql`, `parquet`); sinks store their offsets themselves.
    pub fn sink_group(&self, sink: &str) -> String {
        format!("{}omrs-sink-{sink}", self.prefix)
    }
    /// `omrs-stream verify`'s reads of the topics.
    pub fn verify_group(&self) -> String {
        format!("{}omrs-verify", self.prefix)
    }
    /// `omrs-stream dlq replay`.
    pub fn dlq_replay_group(&self) -> String {
        format!("{}omrs-dlq-replay", self.prefix)
    }
}

/// The partition of `omrs.hq.changes` that `site`'s changes and schema records go to, of `n`:
/// a stable hash of the site's name (FNV-1a), so that a site keeps its partition, and its
/// order, when sites are added or removed. Each site's records stay in order in their
/// partition; nothing is ordered across partitions, so a backlog in one does not hold back
/// the sites of the others (issue #24). Merges, splits, identity reviews and aggregates go to
/// [`IDENTITY_LANE`]; watermarks to every partition.
pub fn hq_partition(site: &str, n: i32) -> i32 {
    if n <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in site.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % n as u32) as i32
}

/// The partition of `omrs.hq.changes` that holds every merge, split, identity review and
/// aggregate version, in the transform's order: the sinks fold merges and keep the latest
/// review or aggregate version by (partition, offset), which is stream order within it.
pub const IDENTITY_LANE: i32 = 0;

/// What `apply` did, topic by topic.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub created: Vec<String>,
    /// Topic and what was changed on it.
    pub changed: Vec<(String, String)>,
    pub unchanged: Vec<String>,
}

impl ApplyReport {
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.changed.is_empty()
    }
}

/// What the broker has for one topic.
#[derive(Debug, Clone)]
pub struct TopicState {
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic configs whose value was set on the topic (not broker defaults).
    pub config: BTreeMap<String, String>,
    /// Every config value, defaults included.
    pub all_config: BTreeMap<String, String>,
}

const TIMEOUT: Duration = Duration::from_secs(30);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>> {
    client_config(cfg)
        .create()
        .map_err(|e| CoreError::kafka("creating admin client", e))
}

fn opts() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT))
}

/// Reads the broker's view of the named topics (None: the topic does not exist).
pub async fn describe(
    cfg: &KafkaConfig,
    names: &[String],
) -> Result<HashMap<String, Option<TopicState>>> {
    let admin = admin(cfg)?;
    let md = admin
        .inner()
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| CoreError::kafka(format!("metadata from {}", cfg.bootstrap_servers), e))?;
    let mut out = HashMap::new();
    let mut existing = Vec::new();
    for name in names {
        match md.topics().iter().find(|t| t.name() == name) {
            Some(t) if t.error().is_none() => {
                let rf = t.partitions().first().map(|p| p.replicas().len() as i32).unwrap_or(0);
                existing.push((name.clone(), t.partitions().len() as i32, rf));
            }
            _ => {
                out.insert(name.clone(), None);
            }
        }
    }
    if existing.is_empty() {
        return Ok(out);
    }
    let specs: Vec<ResourceSpecifier> =
        existing.iter().map(|(n, _, _)| ResourceSpecifier::Topic(n)).collect();
    let results = admin
        .describe_configs(specs.iter(), &opts())
        .await
        .map_err(|e| CoreError::kafka("describing topic configs", e))?;
    for ((name, partitions, rf), res) in existing.into_iter().zip(results) {
        let resource = res.map_err(|e| CoreError::kafka(format!("describing `{name}`"), rdkafka::error::KafkaError::AdminOp(e)))?;
        let mut config = BTreeMap::new();
        let mut all_config = BTreeMap::new();
        for entry in resource.entries {
            if let Some(v) = entry.value {
                if !entry.is_default {
                    config.insert(entry.name.clone(), v.clone());
                }
                all_config.insert(entry.name, v);
            }
        }
        out.insert(name, Some(TopicState { partitions, replication_factor: rf, config, all_config }));
    }
    Ok(out)
}

fn same_value(key: &str, want: &str, have: &str) -> bool {
    if key == "cleanup.policy" {
        let norm = |s: &str| {
            let mut v: Vec<String> = s.split(',').map(|x| x.trim().to_string()).collect();
            v.sort();
            v
        };
        return norm(want) == norm(have);
    }
    want == have
}

/// Every difference between the declared topics and the broker, one line each.
pub fn diff(want: &[ResolvedTopic], have: &HashMap<String, Option<TopicState>>) -> Vec<String> {
    let mut out = Vec::new();
    for t in want {
        match have.get(&t.name).and_then(|s| s.as_ref()) {
            None => out.push(format!("{}: missing", t.name)),
            Some(s) => {
                if s.partitions != t.partitions {
                    out.push(format!("{}: partitions {} (want {})", t.name, s.partitions, t.partitions));
                }
                if s.replication_factor != t.replication_factor {
                    out.push(format!(
                        "{}: replication factor {} (want {})",
                        t.name, s.replication_factor, t.replication_factor
                    ));
                }
                for (k, v) in &t.config {
                    match s.all_config.get(k) {
                        Some(h) if same_value(k, v, h) => {}
                        Some(h) => out.push(format!("{}: {k}={h} (want {v})", t.name)),
                        None => out.push(format!("{}: {k} unset (want {v})", t.name)),
                    }
                }
            }
        }
    }
    out
}

/// Lists mismatches without changing anything. Err(TopicMismatch) when there are any.
pub async fn check(cfg: &KafkaConfig, want: &[ResolvedTopic]) -> Result<()> {
    let names: Vec<String> = want.iter().map(|t| t.name.clone()).collect();
    let have = describe(cfg, &names).await?;
    let mismatches = diff(want, &have);
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(CoreError::TopicMismatch(mismatches))
    }
}

/// Creates or fixes every declared topic. Idempotent.
pub async fn apply(cfg: &KafkaConfig, want: &[ResolvedTopic]) -> Result<ApplyReport> {
    let names: Vec<String> = want.iter().map(|t| t.name.clone()).collect();
    let have = describe(cfg, &names).await?;
    let admin = admin(cfg)?;
    let mut report = ApplyReport::default();
    let mut unfixable = Vec::new();

    let missing: Vec<&ResolvedTopic> =
        want.iter().filter(|t| have.get(&t.name).is_none_or(|s| s.is_none())).collect();
    if !missing.is_empty() {
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                let mut nt = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication_factor));
                for (k, v) in &t.config {
                    nt = nt.set(k, v);
                }
                nt
            })
            .collect();
        let results = admin
            .create_topics(new_topics.iter(), &opts())
            .await
            .map_err(|e| CoreError::kafka("creating topics", e))?;
        for r in results {
            match r {
                Ok(name) => {
                    tracing::info!(topic = %name, "created topic");
                    report.created.push(name);
                }
                Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                    report.unchanged.push(name)
                }
                Err((name, code)) => {
                    return Err(CoreError::Kafka {
                        context: format!("creating `{name}`"),
                        message: code.to_string(),
                        transient: false,
                    })
                }
            }
        }
    }

    for t in want {
        let Some(Some(state)) = have.get(&t.name) else { continue };
        let mut changes = Vec::new();
        if state.replication_factor != t.replication_factor {
            unfixable.push(format!(
                "{}: replication factor {} (want {}); changing it needs a partition reassignment",
                t.name, state.replication_factor, t.replication_factor
            ));
        }
        if state.partitions > t.partitions {
            unfixable.push(format!(
                "{}: partitions {} (want {}); Kafka cannot remove partitions, recreate the topic",
                t.name, state.partitions, t.partitions
            ));
        } else if state.partitions < t.partitions {
            admin
                .create_partitions([NewPartitions::new(&t.name, t.partitions as usize)].iter(), &opts())
                .await
                .map_err(|e| CoreError::kafka(format!("adding partitions to `{}`", t.name), e))?
                .into_iter()
                .try_for_each(|r| {
                    r.map(|_| ()).map_err(|(n, code)| CoreError::Kafka {
                        context: format!("adding partitions to `{n}`"),
                        message: code.to_string(),
                        transient: false,
                    })
                })?;
            if t.name.ends_with("omrs.hq.changes") {
                // The transform and the sinks read the partition count when they start.
                changes.push(format!("partitions {} -> {} (restart the transform, then both sinks)", state.partitions, t.partitions));
            } else {
                changes.push(format!("partitions {} -> {}", state.partitions, t.partitions));
            }
        }
        let config_differs = t.config.iter().any(|(k, v)| {
            state.all_config.get(k).is_none_or(|h| !same_value(k, v, h))
        });
        if config_differs {
            let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&t.name));
            for (k, v) in &t.config {
                alter = alter.set(k, v);
            }
            admin
                .alter_configs([alter].iter(), &opts())
                .await
                .map_err(|e| CoreError::kafka(format!("altering `{}`", t.name), e))?
                .into_iter()
                .try_for_each(|r| {
                    r.map(|_| ()).map_err(|(_, code)| CoreError::Kafka {
                        context: format!("altering configs of `{}`", t.name),
                        message: code.to_string(),
                        transient: false,
                    })
                })?;
            for (k, v) in &t.config {
                let h = state.all_config.get(k).map(String::as_str).unwrap_or("unset");
                if !same_value(k, v, h) {
                    changes.push(format!("{k} {h} -> {v}"));
                }
            }
        }
        if changes.is_empty() {
            report.unchanged.push(t.name.clone());
        } else {
            tracing::info!(topic = %t.name, changes = %changes.join(", "), "altered topic");
            report.changed.push((t.name.clone(), changes.join(", ")));
        }
    }
    if !unfixable.is_empty() {
        return Err(CoreError::TopicMismatch(unfixable));
    }
    await_visible(&admin, &report.created).await?;
    Ok(report)
}

/// Returns once the broker's metadata shows every topic in `names` with a leader for each
/// partition. A CreateTopics answer comes when the controller has committed the topics; the
/// broker serving metadata learns of them a moment later, and a stage started in that moment
/// would be told its topic does not exist.
async fn await_visible(admin: &AdminClient<DefaultClientContext>, names: &[String]) -> Result<()> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let md = admin.inner().fetch_metadata(None, METADATA_TIMEOUT).map_err(|e| CoreError::kafka("metadata after creating topics", e))?;
        let pending: Vec<&String> = names
            .iter()
            .filter(|n| {
                !md.topics().iter().any(|t| {
                    t.name() == n.as_str() && t.error().is_none() && !t.partitions().is_empty() && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let list: Vec<&str> = pending.iter().map(|n| n.as_str()).collect();
            return Err(CoreError::Kafka {
                context: "creating topics".into(),
                message: format!("created, but the broker's metadata still lacks {} after {} s", list.join(", "), TIMEOUT.as_secs()),
                transient: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::hq_partition;

    #[test]
    fn a_site_keeps_its_partition_and_sites_spread() {
        assert_eq!(hq_partition("site-a", 1), 0);
        assert_eq!(hq_partition("site-a", 16), hq_partition("site-a", 16));
        let sites: Vec<String> = (b'a'..=b'j').map(|c| format!("site-{}", c as char)).collect();
        let used: std::collections::BTreeSet<i32> = sites.iter().map(|s| hq_partition(s, 16)).collect();
        assert!(used.iter().all(|p| (0..16).contains(p)));
        assert!(used.len() >= 6, "ten sites over 16 partitions: {used:?}");
    }
}
