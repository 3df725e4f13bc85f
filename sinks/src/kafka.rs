//! The Kafka side that both sinks share: the `omrs.hq.changes` consumer (assigned at the
//! offsets the sink stored itself, never a group's), the dead-letter producer, and how a batch's
//! dead letters are made durable before the batch commits.

use std::collections::HashMap;
use std::time::Duration;

use omrs_core::config::Config;
use omrs_core::dlq::{DeadKind, DeadRecord};
use omrs_core::kafka::{client_config, read_committed_consumer};
use omrs_core::metrics::metrics;
use omrs_core::kafka::LagContext;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::{Consumer, StreamConsumer};

/// The sinks' consumer of `omrs.hq.changes`, publishing its lag.
pub type SinkConsumer = StreamConsumer<LagContext>;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::SinkError;

/// A record a sink could not process: it goes to `omrs.dlq` with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub kind: DeadKind,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// Stops a task when the sink's loop ends, however it ends.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A read-committed consumer of `omrs.hq.changes` for the sink `name`; offsets are not
/// committed to Kafka (each sink stores its own, with what it wrote).
pub fn consumer(cfg: &Config, name: &'static str) -> Result<SinkConsumer, SinkError> {
    read_committed_consumer(&cfg.kafka, TopicNames::new(cfg.kafka.topic_prefix.clone()).sink_group(name))
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.max.messages.kbytes", "65536")
        .create_with_context(LagContext::new(if name == "hq-mysql" { "hq_mysql" } else { name }))
        .map_err(|e| SinkError::kafka("creating the consumer", e))
}

/// An idempotent producer (acks from every replica, no duplicates on retry): the sinks' dead
/// letters, and the data manager's identity decisions. `what` names it in an error.
pub fn producer(cfg: &Config, what: &str) -> Result<FutureProducer, SinkError> {
    client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| SinkError::kafka(format!("creating {what}"), e))
}

/// Assigns every partition of `topic` at the offset in `stored` (the beginning where none is
/// stored). Returns the partitions; a missing topic is a definite error with the fix.
pub fn assign_at(consumer: &SinkConsumer, topic: &str, stored: &HashMap<i32, i64>) -> Result<Vec<i32>, SinkError> {
    let partitions = omrs_core::kafka::topic_partitions(consumer.client(), topic, Duration::from_secs(30)).map_err(|e| SinkError::kafka("reading metadata", e))?;
    if partitions.is_empty() {
        return Err(SinkError::Kafka {
            context: format!("topic {topic}"),
            message: "does not exist: create the topics first with `omrs-stream topics apply`".into(),
            transient: false,
        });
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let off = stored.get(p).map(|o| Offset::Offset(*o)).unwrap_or(Offset::Beginning);
        tpl.add_partition_offset(topic, *p, off).map_err(|e| SinkError::kafka("assigning", e))?;
    }
    consumer.assign(&tpl).map_err(|e| SinkError::kafka("assigning", e))?;
    Ok(partitions)
}

/// Produces the dead letters of a batch read from `topic` and waits until the broker has them,
/// so that they are durable before the batch commits (at least once: never lost).
pub async fn send_dead_letters(producer: &FutureProducer, dlq_topic: &str, stage: &str, topic: &str, dead: &[DeadLetter]) -> Result<(), SinkError> {
    for d in dead {
        tracing::warn!(offset = d.offset, kind = d.kind.as_str(), reason = %d.reason, "record dead-lettered");
        let payload = DeadRecord { stage, kind: d.kind, reason: &d.reason, topic, partition: d.partition, offset: d.offset, payload: &d.payload }
            .to_json(chrono::Utc::now().timestamp_millis());
        let key = format!("{topic}:{}:{}", d.partition, d.offset);
        producer
            .send(FutureRecord::to(dlq_topic).key(&key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| SinkError::kafka("producing a dead letter", e))?;
        metrics().dead_lettered.with_label_values(&[stage, d.kind.as_str()]).inc();
    }
    if !dead.is_empty() {
        producer.flush(Duration::from_secs(30)).map_err(|e| SinkError::kafka("flushing dead letters", e))?;
    }
    Ok(())
}

/// The end offset of each of `partitions` of `topic` now (for `--until-idle`).
pub fn end_offsets(consumer: &SinkConsumer, topic: &str, partitions: &[i32]) -> Result<HashMap<i32, i64>, SinkError> {
    let mut ends = HashMap::new();
    for p in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(30)).map_err(|e| SinkError::kafka("reading end offsets", e))?;
        ends.insert(*p, high);
    }
    Ok(ends)
}
