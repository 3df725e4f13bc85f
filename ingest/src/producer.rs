//! The transactional Kafka producer of one site agent. `transactional.id` is derived from the
//! site, so a second agent for the same site fences the first (zombie fencing); every batch of
//! events goes out in one Kafka transaction together with the checkpoint that covers it.

use std::time::Duration;

use omrs_core::config::KafkaConfig;
use omrs_core::envelope::ChangeEvent;
use omrs_core::kafka::client_config;
use omrs_core::metrics::metrics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::checkpoint::Checkpoint;
use crate::IngestError;

pub struct TxProducer {
    producer: FutureProducer,
    pub topic: String,
    pub offsets_topic: String,
    site: String,
    /// The commit of the previous transaction, still running while the next batch is built.
    inflight: Option<(tokio::task::JoinHandle<rdkafka::error::KafkaResult<()>>, Vec<(String, &'static str)>)>,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

impl TxProducer {
    pub fn new(kafka: &KafkaConfig, site: &str, topic: String, offsets_topic: String) -> Result<Self, IngestError> {
        let producer: FutureProducer = client_config(kafka)
            .set("transactional.id", format!("{}omrs-ingest-{site}", kafka.topic_prefix))
            .set("transaction.timeout.ms", "60000")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("compression.type", "lz4")
            .set("message.max.bytes", "8000000")
            .create()
            .map_err(|e| IngestError::kafka("creating the transactional producer", e))?;
        producer
            .init_transactions(TXN_TIMEOUT)
            .map_err(|e| IngestError::kafka("initialising transactions (fencing any older agent of this site)", e))?;
        Ok(TxProducer { producer, topic, offsets_topic, site: site.to_string(), inflight: None })
    }

    /// Sends `events` and `checkpoint` in one Kafka transaction. The commit runs in the
    /// background while the caller builds the next batch; the next `send` (or [`Self::wait`])
    /// waits for it first, so transactions stay strictly ordered and at most one is open.
    pub async fn send(&mut self, events: &[ChangeEvent], checkpoint: &Checkpoint) -> Result<(), IngestError> {
        self.wait().await?;
        self.producer.begin_transaction().map_err(|e| IngestError::kafka("beginning a transaction", e))?;
        if let Err(e) = self.send_inner(events, checkpoint).await {
            let _ = self.producer.abort_transaction(TXN_TIMEOUT);
            return Err(e);
        }
        let counts: Vec<(String, &'static str)> = events.iter().map(|ev| (ev.table.clone().unwrap_or_default(), ev.op.as_str())).collect();
        let p = self.producer.clone();
        self.inflight = Some((tokio::task::spawn_blocking(move || p.commit_transaction(TXN_TIMEOUT)), counts));
        Ok(())
    }

    /// Waits for the transaction in flight, if any, to be committed.
    pub async fn wait(&mut self) -> Result<(), IngestError> {
        let Some((handle, counts)) = self.inflight.take() else { return Ok(()) };
        handle
            .await
            .map_err(|e| IngestError::Kafka { context: "committing".into(), message: e.to_string() })?
            .map_err(|e| IngestError::kafka("committing a transaction", e))?;
        metrics().kafka_transactions.with_label_values(&["ingest", &self.site]).inc();
        let mut by: std::collections::HashMap<(String, &'static str), u64> = std::collections::HashMap::new();
        for c in counts {
            *by.entry(c).or_default() += 1;
        }
        for ((table, op), n) in by {
            metrics().events_out.with_label_values(&["ingest", &self.site, &table, op]).inc_by(n);
        }
        Ok(())
    }

    async fn send_inner(&self, events: &[ChangeEvent], checkpoint: &Checkpoint) -> Result<(), IngestError> {
        for ev in events {
            let key = event_key(ev);
            let payload = ev.to_json();
            self.enqueue(&self.topic, &key, &payload).await?;
        }
        self.enqueue(&self.offsets_topic, &self.site, &checkpoint.to_json()).await
    }

    async fn enqueue(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), IngestError> {
        loop {
            match self.producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                // Delivery is confirmed by commit_transaction, which flushes and fails if any
                // message of the transaction failed.
                Ok(_delivery) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(IngestError::kafka(&format!("producing to {topic}"), e)),
            }
        }
    }
}

/// `table:pk1,pk2`, or `~heartbeat`.
pub fn event_key(ev: &ChangeEvent) -> String {
    match (&ev.table, &ev.key) {
        (Some(t), Some(k)) => {
            let vals: Vec<String> = k.values().map(|v| v.to_string()).collect();
            format!("{t}:{}", vals.join(","))
        }
        _ => "~heartbeat".into(),
    }
}
