//! The Kafka loop of the transform: pattern subscription to every site topic, read_committed
//! consumption, and one Kafka transaction per batch holding the output events, the changelog
//! facts, dead letters and the consumer offsets. The loop's phases are in `batch.rs`; here are
//! the retries, the state restore and what the phases share.
//!
//! Delivery guarantee: exactly once (see `batch.rs`).

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use omrs_core::clock::{now_ms, retry_transient};
use omrs_core::config::Config;
use omrs_core::dlq::{DeadKind, DeadRecord};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};

use crate::aggregate::{AggFact, Aggregator};
use crate::engine::{Engine, EngineConfig, Fact, Origin};
use crate::event::InEvent;
use crate::{TransformArgs, TransformError};

mod batch;

use batch::Runner;

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        out_of_orderness_ms: cfg.transform.out_of_orderness_ms as i64,
        idle_timeout_ms: cfg.transform.idle_timeout_s as i64 * 1000,
        max_clock_ahead_ms: cfg.transform.max_clock_ahead_s as i64 * 1000,
        identifiers: cfg.identity.identifiers.clone(),
        sites: omrs_core::zone::SiteRules::of(cfg),
    }
}

/// Runs until `--until-idle` is satisfied, or forever; transient errors restart from the last
/// committed transaction.
pub async fn run(cfg: &Config, args: &TransformArgs) -> Result<(), TransformError> {
    retry_transient(
        || run_once(cfg, args),
        TransformError::is_transient,
        |e, wait| tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "transient error; restarting from the last committed transaction"),
    )
    .await
}

/// A record of the state changelog: an engine fact or an aggregate fact.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum AnyFact {
    Engine(Fact),
    Agg(AggFact),
}

/// The aggregator `[aggregates]` asks for (None when disabled).
pub fn aggregator(cfg: &Config) -> Result<Option<Aggregator>, TransformError> {
    if !cfg.aggregates.enabled {
        return Ok(None);
    }
    let windows = cfg.aggregates.windows().map_err(|(k, m)| TransformError::Config(format!("{k}: {m}")))?;
    Ok(Some(Aggregator::new(windows, cfg.aggregates.provisional_interval_ms)))
}

/// Reads the compacted changelog to its end (read_committed) and replays it into the engine
/// and the aggregator.
fn restore(cfg: &Config, topic: &str, engine: &mut Engine, agg: &mut Option<Aggregator>) -> Result<usize, TransformError> {
    let mut facts: BTreeMap<String, Fact> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut agg_facts: BTreeMap<String, AggFact> = BTreeMap::new();
    omrs_core::kafka::read_to_end(&cfg.kafka, topic, |_, payload, _| {
        match serde_json::from_slice::<AnyFact>(payload).map_err(|e| format!("a state fact that is neither an engine nor an aggregate fact: {e}"))? {
            AnyFact::Engine(f) => {
                let k = f.key();
                if facts.insert(k.clone(), f).is_none() {
                    order.push(k);
                }
            }
            AnyFact::Agg(f) => {
                agg_facts.insert(f.key(), f);
            }
        }
        Ok(())
    })
    .map_err(|e| {
        if e.is_transient() {
            TransformError::Kafka { context: "restoring state".into(), message: e.to_string() }
        } else {
            TransformError::State(e.to_string())
        }
    })?;
    // Persons first (creation times decide survivors), then identifiers and links.
    let n = facts.len();
    let mut rest = Vec::new();
    for k in order {
        if let Some(f) = facts.remove(&k) {
            match f {
                Fact::Person { .. } => engine.restore(f),
                other => rest.push(other),
            }
        }
    }
    for f in rest {
        engine.restore(f);
    }
    let n = n + agg_facts.len();
    if let Some(a) = agg.as_mut() {
        for f in agg_facts.into_values() {
            a.restore(f);
        }
    }
    Ok(n)
}

/// Parses and checks one input record; Err is the dead-letter reason.
pub fn decode(payload: &[u8], topic: &str, cdc_prefix: &str) -> Result<InEvent, String> {
    let site_of_topic: Arc<str> = Arc::from(topic.strip_prefix(cdc_prefix).unwrap_or(""));
    InEvent::decode(payload, &site_of_topic, topic)
}

/// A metrics label set (site, table, op), counted per batch without allocating per event.
#[derive(PartialEq, Eq, Hash)]
struct CountKey {
    site: Box<str>,
    table: Box<str>,
    op: &'static str,
}

/// A borrowed [`CountKey`]; hashes the same way (field by field, as `str`).
#[derive(Hash)]
struct CountRef<'a> {
    site: &'a str,
    table: &'a str,
    op: &'static str,
}

impl hashbrown::Equivalent<CountKey> for CountRef<'_> {
    fn equivalent(&self, k: &CountKey) -> bool {
        *k.site == *self.site && *k.table == *self.table && k.op == self.op
    }
}

#[derive(Default)]
struct Counts(hashbrown::HashMap<CountKey, u64>);

impl Counts {
    fn bump(&mut self, site: &str, table: &str, op: &'static str) {
        let r = CountRef { site, table, op };
        match self.0.get_mut(&r) {
            Some(n) => *n += 1,
            None => {
                self.0.insert(CountKey { site: site.into(), table: table.into(), op }, 1);
            }
        }
    }

    /// Hands the counts over as (site, table, op, n) and resets them.
    fn flush(&mut self, mut f: impl FnMut(&str, &str, &str, u64)) {
        for (k, n) in self.0.iter_mut().filter(|(_, n)| **n > 0) {
            f(&k.site, &k.table, k.op, *n);
            *n = 0;
        }
    }
}

fn dlq_record(kind: DeadKind, reason: &str, origin: &Origin, payload: &[u8]) -> Vec<u8> {
    DeadRecord { stage: "transform", kind, reason, topic: &origin.topic, partition: origin.partition, offset: origin.offset, payload }.to_json(now_ms())
}

/// Time spent per phase of the loop, logged when a batch run ends.
#[derive(Default)]
struct Phases {
    batches: u64,
    /// Reading, decoding and the engine.
    read: Duration,
    /// Waiting for the previous transaction's commit.
    commit_wait: Duration,
    /// Writing the outputs, facts and dead letters into the transaction.
    produce: Duration,
}

async fn await_commit(h: tokio::task::JoinHandle<Result<(), TransformError>>) -> Result<(), TransformError> {
    h.await.map_err(|e| TransformError::Kafka { context: "committing".into(), message: e.to_string() })?
}

/// The transactional producer. Deliveries are not awaited one by one: a failed delivery fails
/// the transaction's commit, and the loop restarts from the last committed transaction.
type TxProducer = Arc<ThreadedProducer<DefaultProducerContext>>;

async fn enqueue(producer: &TxProducer, topic: &str, partition: Option<i32>, key: &str, payload: &[u8]) -> Result<(), TransformError> {
    loop {
        let mut record = BaseRecord::<str, [u8]>::to(topic).key(key).payload(payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err((e, _)) => return Err(TransformError::kafka(&format!("producing to {topic}"), e)),
        }
    }
}

/// One run: opened at the last committed transaction, then batch after batch: read (decode,
/// the engine), aggregate, commit (one Kafka transaction with the consumer offsets), pace.
async fn run_once(cfg: &Config, args: &TransformArgs) -> Result<(), TransformError> {
    let mut r = Runner::open(cfg, args).await?;
    loop {
        if omrs_core::stop::requested() {
            return r.stop().await;
        }
        omrs_core::endpoint::beat();
        let mut b = r.read_batch().await?;
        let finished = r.finished(&b);
        let agg_facts = r.aggregates_and_watermark(&mut b, finished);
        r.commit(b, agg_facts).await?;
        r.gauges();
        if finished {
            return r.finish().await;
        }
    }
}
