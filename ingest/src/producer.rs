//! The transactional Kafka producer of one site agent. `transactional.id` is derived from the
//! site, so a second agent for the same site fences the first (zombie fencing); every batch of
//! events goes out in one Kafka transaction together with the checkpoint that covers it.
//!
//! The producer runs as its own task: the agent hands it records and goes on decoding the
//! binlog while the task enqueues and commits (and the commit of one transaction overlaps the
//! building of the next). Records can be handed over before their transaction's checkpoint
//! ([`TxProducer::stream`]), so that they travel to Kafka while the agent reads on and the
//! agent's buffers stay small; [`TxProducer::send`] ends the transaction with its checkpoint.
//! Transactions stay strictly ordered, and at most one is open. The first failure stops the
//! task; the agent sees it on its next call and restarts from the last committed checkpoint
//! (an open transaction is then aborted, at the latest by the next agent's fencing).
//!
//! A [`Batch`] carries its records already encoded (Kafka key and JSON value) in one buffer:
//! the binlog reader writes change events straight into it ([`crate::encode`]), and the
//! snapshot and heartbeats push [`ChangeEvent`]s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omrs_core::config::KafkaConfig;
use omrs_core::envelope::{ChangeEvent, Op, MAX_SITE_EVENT_BYTES};
use omrs_core::kafka::transactional_producer;
use omrs_core::metrics::metrics;
use omrs_core::topics::TopicNames;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::Checkpoint;
use crate::IngestError;

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests queued to the producer task; records come in batches of about [`STREAM_BYTES`].
const QUEUE: usize = 16;

/// How large the agent lets its buffer of complete site transactions grow before it streams it
/// to the producer task ahead of the checkpoint.
pub const STREAM_BYTES: usize = 1 << 20;

/// Events per (table, op), for `events_out`.
type Counts = HashMap<(Option<Arc<str>>, Op), u64>;

/// The encoded records of one Kafka transaction (before its checkpoint), in order.
#[derive(Default)]
pub struct Batch {
    /// Every record's key then value, back to back.
    buf: Vec<u8>,
    recs: Vec<Rec>,
}

struct Rec {
    /// Ends of the record's key and value in `buf`; it starts where the previous record ends.
    key_end: usize,
    end: usize,
    table: Option<Arc<str>>,
    op: Op,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Adds one record: `key`, then the value that `payload` writes.
    pub fn push_with(&mut self, key: &[u8], table: Option<&Arc<str>>, op: Op, payload: impl FnOnce(&mut Vec<u8>)) {
        self.buf.extend_from_slice(key);
        let key_end = self.buf.len();
        payload(&mut self.buf);
        self.recs.push(Rec { key_end, end: self.buf.len(), table: table.cloned(), op });
    }

    /// Adds a change event, keyed by [`event_key`].
    pub fn push_event(&mut self, ev: &ChangeEvent) {
        let table: Option<Arc<str>> = ev.table.as_deref().map(Arc::from);
        self.push_with(event_key(ev).as_bytes(), table.as_ref(), ev.op, |buf| {
            // Serialising plain maps and strings into a Vec cannot fail.
            let _ = serde_json::to_writer(buf, ev);
        });
    }

    /// Bytes of keys and values.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Moves the records from index `at` on into `into` (emptied first), and returns it.
    pub fn split_off(&mut self, at: usize, mut into: Batch) -> Batch {
        into.clear();
        if at >= self.recs.len() {
            return into;
        }
        let base = if at == 0 { 0 } else { self.recs[at - 1].end };
        into.buf.extend_from_slice(&self.buf[base..]);
        into.recs.extend(self.recs.drain(at..).map(|r| Rec { key_end: r.key_end - base, end: r.end - base, ..r }));
        self.buf.truncate(base);
        into
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.recs.clear();
    }

    /// The records as (key, value).
    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.recs.iter().map(move |r| {
            let rec = (&self.buf[start..r.key_end], &self.buf[r.key_end..r.end]);
            start = r.end;
            rec
        })
    }
}

impl From<Vec<ChangeEvent>> for Batch {
    fn from(events: Vec<ChangeEvent>) -> Self {
        let mut b = Batch::default();
        for ev in &events {
            b.push_event(ev);
        }
        b
    }
}

enum Req {
    /// Records that go into the open transaction (begun if none is).
    Records(Batch),
    /// Records for the checkpoint topic (the schema history) in the open transaction.
    Aside(Vec<(Vec<u8>, Vec<u8>)>),
    /// A dead letter (`omrs.dlq`), in the open transaction.
    Dead { topic: String, value: Vec<u8> },
    /// Ends the open transaction (begun if none is) with the checkpoint, and commits it.
    Commit(Checkpoint),
    Flush(oneshot::Sender<()>),
}

pub struct TxProducer {
    tx: mpsc::Sender<Req>,
    /// Sent batches, emptied, to be filled again.
    spare: Arc<Mutex<Vec<Batch>>>,
    failed: Arc<Mutex<Option<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

struct Worker {
    producer: FutureProducer,
    spare: Arc<Mutex<Vec<Batch>>>,
    topic: String,
    offsets_topic: String,
    site: String,
    /// The open transaction's events so far, when one is open.
    open: Option<Counts>,
    /// The commit under way, and the events it carries.
    inflight: Option<(tokio::task::JoinHandle<Result<(), IngestError>>, Counts)>,
}

impl TxProducer {
    pub fn new(kafka: &KafkaConfig, site: &str, topic: String, offsets_topic: String) -> Result<Self, IngestError> {
        let tx_id = TopicNames::new(kafka.topic_prefix.clone()).ingest_transactional_id(site);
        // Under omrs_core::topics::MAX_CHANGE_BYTES, so every event it sends passes the transform.
        let producer: FutureProducer = transactional_producer(kafka, tx_id, MAX_SITE_EVENT_BYTES)
            .set("enable.idempotence", "true")
            .set("retry.backoff.ms", "10")
            .set("queue.buffering.max.kbytes", "1048576")
            .create()
            .map_err(|e| IngestError::kafka("creating the transactional producer", e))?;
        // init_transactions needs a connection to a known broker; called before there is one,
        // librdkafka retries only after its 500 ms coordinator timer. A first metadata request
        // (through the bootstrap connection) names the brokers, a second connects to one.
        for _ in 0..2 {
            if let Err(e) = producer.client().fetch_metadata(Some(&topic), TXN_TIMEOUT) {
                tracing::debug!(site, error = %e, "metadata before init_transactions failed; init_transactions will retry");
                break;
            }
        }
        producer
            .init_transactions(TXN_TIMEOUT)
            .map_err(|e| IngestError::kafka("initialising transactions (fencing any older agent of this site)", e))?;
        let (tx, mut rx) = mpsc::channel::<Req>(QUEUE);
        let failed = Arc::new(Mutex::new(None));
        let spare = Arc::new(Mutex::new(Vec::new()));
        let mut worker = Worker { producer, spare: spare.clone(), topic, offsets_topic, site: site.to_string(), open: None, inflight: None };
        let flag = failed.clone();
        let task = tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let result = match req {
                    Req::Records(events) => worker.records(events).await,
                    Req::Aside(recs) => worker.aside(recs).await,
                    Req::Dead { topic, value } => worker.dead(&topic, &value).await,
                    Req::Commit(cp) => worker.commit(cp).await,
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
            if worker.open.take().is_some() {
                // The agent stopped in the middle of a transaction.
                let _ = worker.producer.abort_transaction(TXN_TIMEOUT);
            }
        });
        Ok(TxProducer { tx, spare, failed, _task: task })
    }

    /// An empty batch, reusing the buffers of one already sent when there is one.
    pub fn batch(&self) -> Batch {
        self.spare.lock().ok().and_then(|mut s| s.pop()).unwrap_or_default()
    }

    fn check(&self) -> Result<(), IngestError> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(message) => Err(IngestError::Kafka { context: "producing".into(), message }),
            None => Ok(()),
        }
    }

    /// Hands `events` and the `checkpoint` that follows them to the producer task: they end
    /// the Kafka transaction that holds the events streamed since the last checkpoint.
    pub async fn send(&mut self, events: Batch, checkpoint: Checkpoint) -> Result<(), IngestError> {
        self.stream(events).await?;
        self.request(Req::Commit(checkpoint)).await
    }

    /// Hands `events` to the producer task ahead of their checkpoint: they go into the open
    /// Kafka transaction, which commits only with the next [`TxProducer::send`].
    pub async fn stream(&mut self, events: Batch) -> Result<(), IngestError> {
        if events.is_empty() {
            return Ok(());
        }
        self.request(Req::Records(events)).await
    }

    async fn request(&mut self, req: Req) -> Result<(), IngestError> {
        self.check()?;
        if self.tx.send(req).await.is_err() {
            self.check()?;
            return Err(IngestError::Kafka { context: "producing".into(), message: "the producer task stopped".into() });
        }
        Ok(())
    }

    /// Hands records for the checkpoint topic (the schema history, [`crate::schema`]) to the
    /// producer task: they commit with the next checkpoint.
    pub async fn aside(&mut self, records: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), IngestError> {
        if records.is_empty() {
            return Ok(());
        }
        self.request(Req::Aside(records)).await
    }

    /// Hands a dead letter for `topic` (the dead-letter topic) to the producer task: it commits
    /// with the next checkpoint, so a record is dead-lettered exactly once as it is sent once.
    pub async fn dead(&mut self, topic: String, value: Vec<u8>) -> Result<(), IngestError> {
        self.request(Req::Dead { topic, value }).await
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
    /// The open transaction, begun after the previous commit completed if none is open.
    async fn begin(&mut self) -> Result<&mut Counts, IngestError> {
        if self.open.is_none() {
            self.wait().await?;
            self.producer.begin_transaction().map_err(|e| IngestError::kafka("beginning a transaction", e))?;
        }
        Ok(self.open.get_or_insert_with(Counts::new))
    }

    /// Aborts the open transaction after a failure.
    fn abort(&mut self, e: IngestError) -> IngestError {
        if self.open.take().is_some() {
            let _ = self.producer.abort_transaction(TXN_TIMEOUT);
        }
        e
    }

    async fn records(&mut self, mut events: Batch) -> Result<(), IngestError> {
        let counts = self.begin().await?;
        for r in &events.recs {
            *counts.entry((r.table.clone(), r.op)).or_default() += 1;
        }
        for (key, payload) in events.records() {
            let sent = if payload.len() + key.len() + OVERHEAD > MAX_SITE_EVENT_BYTES {
                match oversize_stub(&self.site, payload) {
                    Ok(stub) => self.enqueue(&self.topic, key, &stub).await,
                    Err(e) => Err(e),
                }
            } else {
                self.enqueue(&self.topic, key, payload).await
            };
            if let Err(e) = sent {
                return Err(self.abort(e));
            }
        }
        events.clear();
        // Kept for reuse: as many as can be queued, and none much larger than a streamed batch
        // (the snapshot's and a split transaction's can be far larger).
        if let (Ok(mut spare), true) = (self.spare.lock(), events.buf.capacity() <= 4 * STREAM_BYTES) {
            if spare.len() < QUEUE + 2 {
                spare.push(events);
            }
        }
        Ok(())
    }

    async fn aside(&mut self, records: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), IngestError> {
        self.begin().await?;
        for (key, value) in &records {
            if let Err(e) = self.enqueue(&self.offsets_topic, key, value).await {
                return Err(self.abort(e));
            }
        }
        Ok(())
    }

    async fn dead(&mut self, topic: &str, value: &[u8]) -> Result<(), IngestError> {
        self.begin().await?;
        if let Err(e) = self.enqueue(topic, self.site.as_bytes(), value).await {
            return Err(self.abort(e));
        }
        Ok(())
    }

    async fn commit(&mut self, checkpoint: Checkpoint) -> Result<(), IngestError> {
        self.begin().await?;
        if let Err(e) = self.enqueue(&self.offsets_topic, self.site.as_bytes(), &checkpoint.to_json()).await {
            return Err(self.abort(e));
        }
        let counts = self.open.take().unwrap_or_default();
        let p = self.producer.clone();
        self.inflight = Some((
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                // rust-rdkafka's commit_transaction flushes first, and its flush polls for up to
                // 100 ms whenever a message is still in flight, while the producer's own polling
                // thread takes the delivery reports: every commit would take at least 100 ms.
                // Wait here until every message is delivered, so that flush finds none.
                while p.in_flight_count() > 0 && t.elapsed() < TXN_TIMEOUT {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let delivered_ms = t.elapsed().as_millis() as u64;
                let r = match tokio::task::spawn_blocking(move || p.commit_transaction(TXN_TIMEOUT)).await {
                    Ok(r) => r.map_err(|e| IngestError::kafka("committing a transaction", e)),
                    Err(e) => Err(IngestError::Kafka { context: "committing".into(), message: e.to_string() }),
                };
                tracing::debug!(delivered_ms, commit_ms = t.elapsed().as_millis() as u64, "transaction committed");
                r
            }),
            counts,
        ));
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), IngestError> {
        let Some((handle, counts)) = self.inflight.take() else { return Ok(()) };
        handle
            .await
            .map_err(|e| IngestError::Kafka { context: "committing".into(), message: e.to_string() })??;
        metrics().kafka_transactions.with_label_values(&["ingest", &self.site]).inc();
        for ((table, op), n) in counts {
            metrics().events_out.with_label_values(&["ingest", &self.site, table.as_deref().unwrap_or_default(), op.as_str()]).inc_by(n);
        }
        Ok(())
    }

    async fn enqueue(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), IngestError> {
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

/// Room for the record's framing within the producer's `message.max.bytes`.
const OVERHEAD: usize = 1024;

/// A row change too large for a site event goes as its stand-in (no images, and its size), which
/// the transform dead-letters naming the row: the site's stream goes on, and nothing is dropped
/// without a trace.
fn oversize_stub(site: &str, payload: &[u8]) -> Result<Vec<u8>, IngestError> {
    let ev = ChangeEvent::from_json(payload).map_err(|e| IngestError::Usage(format!("an oversize event of site {site} that does not read back: {e}")))?;
    tracing::warn!(site, table = ev.table.as_deref().unwrap_or(""), uuid = ev.uuid.as_deref().unwrap_or(""), bytes = payload.len(), limit = MAX_SITE_EVENT_BYTES, "row change too large for a site event: sending it without its row images (it will be dead-lettered, naming the row)");
    metrics().ingest_oversize.with_label_values(&[site]).inc();
    Ok(ev.oversize_stub(payload.len()).to_json())
}

/// `table:pk1,pk2`, `~schema:table`, or `~heartbeat`.
pub fn event_key(ev: &ChangeEvent) -> String {
    match (&ev.table, &ev.key) {
        (Some(t), Some(k)) => {
            let vals: Vec<String> = k.values().map(|v| v.to_string()).collect();
            format!("{t}:{}", vals.join(","))
        }
        (Some(t), None) if ev.op == Op::Schema => format!("~schema:{t}"),
        _ => "~heartbeat".into(),
    }
}
