//! The transactional Kafka producer of one site agent. `transactional.id` is derived from the
//! site, so a second agent for the same site fences the first (zombie fencing); every batch of
//! events goes out in one Kafka transaction together with the checkpoint that covers it.
//!
//! The producer runs as its own task: the agent hands it whole batches and goes on decoding the
//! binlog while the task serialises, enqueues and commits (and the commit of one transaction
//! overlaps the building of the next). Transactions stay strictly ordered, and at most one is
//! open. The first failure stops the task; the agent sees it on its next call and restarts from
//! the last committed checkpoint.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use omrs_core::config::KafkaConfig;
use omrs_core::envelope::ChangeEvent;
use omrs_core::kafka::client_config;
use omrs_core::metrics::metrics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::Checkpoint;
use crate::IngestError;

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

enum Req {
    Batch(Vec<ChangeEvent>, Checkpoint),
    Flush(oneshot::Sender<()>),
}

pub struct TxProducer {
    tx: mpsc::Sender<Req>,
    failed: Arc<Mutex<Option<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

struct Worker {
    producer: FutureProducer,
    topic: String,
    offsets_topic: String,
    site: String,
    inflight: Option<(tokio::task::JoinHandle<rdkafka::error::KafkaResult<()>>, Vec<(String, &'static str)>)>,
}

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
        let (tx, mut rx) = mpsc::channel::<Req>(1);
        let failed = Arc::new(Mutex::new(None));
        let mut worker = Worker { producer, topic, offsets_topic, site: site.to_string(), inflight: None };
        let flag = failed.clone();
        let task = tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let result = match req {
                    Req::Batch(events, cp) => worker.send(events, cp).await,
                    Req::Flush(reply) => {
                        let r = worker.wait().await;
                        let _ = reply.send(());
                        r
                    }
                };
                if let Err(e) = result {
                    if let Ok(mut f) = flag.lock() {
                        f.get_or_insert(e.to_string());
                    }
                    break;
                }
            }
        });
        Ok(TxProducer { tx, failed, _task: task })
    }

    fn check(&self) -> Result<(), IngestError> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(message) => Err(IngestError::Kafka { context: "producing".into(), message }),
            None => Ok(()),
        }
    }

    /// Hands `events` and the `checkpoint` that follows them to the producer task, to go out
    /// as one Kafka transaction.
    pub async fn send(&mut self, events: Vec<ChangeEvent>, checkpoint: Checkpoint) -> Result<(), IngestError> {
        self.check()?;
        if self.tx.send(Req::Batch(events, checkpoint)).await.is_err() {
            self.check()?;
            return Err(IngestError::Kafka { context: "producing".into(), message: "the producer task stopped".into() });
        }
        Ok(())
    }

    /// Waits until everything sent so far is committed.
    pub async fn wait(&mut self) -> Result<(), IngestError> {
        self.check()?;
        let (reply, done) = oneshot::channel();
        if self.tx.send(Req::Flush(reply)).await.is_err() || done.await.is_err() {
            self.check()?;
            return Err(IngestError::Kafka { context: "producing".into(), message: "the producer task stopped".into() });
        }
        self.check()
    }
}

impl Worker {
    async fn send(&mut self, events: Vec<ChangeEvent>, checkpoint: Checkpoint) -> Result<(), IngestError> {
        self.wait().await?;
        self.producer.begin_transaction().map_err(|e| IngestError::kafka("beginning a transaction", e))?;
        if let Err(e) = self.enqueue_all(&events, &checkpoint).await {
            let _ = self.producer.abort_transaction(TXN_TIMEOUT);
            return Err(e);
        }
        let counts: Vec<(String, &'static str)> = events.into_iter().map(|ev| (ev.table.unwrap_or_default(), ev.op.as_str())).collect();
        let p = self.producer.clone();
        self.inflight = Some((tokio::task::spawn_blocking(move || p.commit_transaction(TXN_TIMEOUT)), counts));
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), IngestError> {
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

    async fn enqueue_all(&self, events: &[ChangeEvent], checkpoint: &Checkpoint) -> Result<(), IngestError> {
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
