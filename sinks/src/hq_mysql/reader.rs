//! The HQ sink's reader task: consumes `omrs.hq.changes` from the offsets stored in HQ and
//! parses each record. A batch is made when the sink asks for it (as the batch before is being
//! written), from what has arrived by then: a batch read ahead would hold a live change behind
//! it for a whole write.
//!
//! Each partition has its own queue (`split_partition_queue`), and a batch takes at most a
//! share of its rows from any one partition while another partition is busy: a site replaying
//! a backlog fills its share, and the live sites' records, in other partitions, go into the
//! same batch instead of waiting behind the backlog (issue #24). Within a partition the records keep their order; across
//! partitions there is none to keep (docs/ARCHITECTURE.md, "omrs.hq.changes").
//!
//! Delivery guarantee: none of its own. The reader hands every record on, in partition order,
//! with the offsets after it; the sink commits those offsets with what it wrote.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset};

use super::apply::Record;
use super::apply::HqEvent;
use super::Batch;
use crate::kafka::{AbortOnDrop, SinkConsumer};
use crate::SinkError;
use omrs_core::kafka::LagContext;

/// How the reader task batches records.
pub(super) struct Reading {
    /// At most this many records a batch (`sinks.hq_mysql.batch_max_rows`, `--batch-rows`).
    pub batch_rows: usize,
    /// How long an empty batch waits for its first record (`batch_max_ms`). A batch that holds
    /// a record closes as soon as nothing more is ready.
    pub batch_max: Duration,
    /// `--until-idle`: a batch says when every partition is read to `targets`.
    pub until_idle: bool,
    /// The end offset of each partition at start (`--until-idle`).
    pub targets: HashMap<i32, i64>,
}

/// The most a batch takes from one partition: a quarter of the batch (at least one record)
/// while another partition is busy, else all of it. With a backlog in one partition and live
/// changes in others, a batch is a quarter of its size, and is written in about a quarter of
/// the time, so the other partitions' records wait that long at most; a backlog alone fills
/// whole batches.
fn share(limit: usize, others_busy: bool) -> usize {
    if others_busy {
        (limit / 4).max(1)
    } else {
        limit
    }
}

/// A partition is busy for this long after it gave a record other than a watermark (and for
/// this long after the start, before anything is known of it).
const BUSY_FOR: Duration = Duration::from_secs(1);

type Queue = StreamPartitionQueue<LagContext>;

/// The reader's state between batches.
struct Reader {
    consumer: Arc<SinkConsumer>,
    topic: String,
    /// Each assigned partition and its own queue.
    queues: Vec<(i32, Queue)>,
    /// What the consumer's own queue held: the first records of their partitions, taken
    /// before anything of those partitions' queues.
    head: VecDeque<Record>,
    /// The offset after the last record taken, per partition.
    next: HashMap<i32, i64>,
    /// The partition a batch's sweep starts at turns, so that no partition is always first.
    first: usize,
    /// Per queue (same index): when it last gave a record other than a watermark.
    last_data: Vec<Instant>,
}

/// Starts the reader: `partitions` of `topic` are assigned (at `stored`) on `consumer`, and
/// each is split into its own queue here, before anything is read.
pub(super) fn spawn_reader(
    consumer: SinkConsumer,
    topic: String,
    partitions: &[i32],
    stored: HashMap<i32, i64>,
    r: Reading,
    mut asks: tokio::sync::mpsc::Receiver<()>,
    tx: tokio::sync::mpsc::Sender<Result<Batch, SinkError>>,
) -> Result<AbortOnDrop, SinkError> {
    let consumer = Arc::new(consumer);
    let mut queues: Vec<(i32, Queue)> = Vec::with_capacity(partitions.len());
    for p in partitions {
        let q = consumer.split_partition_queue(&topic, *p).ok_or_else(|| SinkError::Kafka {
            context: format!("reading {topic} partition {p}"),
            message: "the partition has no queue of its own (is it assigned?)".into(),
            transient: true,
        })?;
        queues.push((*p, q));
    }
    // What was fetched between the assignment and the split is in the consumer's own queue.
    let mut head = VecDeque::new();
    while let Some(m) = consumer.recv().now_or_never() {
        head.push_back(decode(&m.map_err(|e| SinkError::kafka("consuming", e))?));
    }
    let last_data = vec![Instant::now(); queues.len()];
    let mut reader = Reader { consumer, topic, queues, head, next: stored, first: 0, last_data };
    let Reading { batch_rows, batch_max, until_idle, targets } = r;
    Ok(AbortOnDrop(tokio::spawn(async move {
        // The first batches after a start are smaller, doubling up to `batch_rows`: HQ
        // starts writing while the next batch is read and planned, instead of waiting for
        // a whole batch to be read and planned first.
        let mut limit = (batch_rows / 16).max(1);
        // One batch per request of the sink.
        while asks.recv().await.is_some() {
            let records = match reader.batch(limit, batch_max).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let at_end = until_idle && records.is_empty() && reader.at(&targets);
            tracing::debug!(records = records.len(), "batch read");
            if !records.is_empty() {
                limit = (limit * 2).min(batch_rows);
            }
            if tx.send(Ok(Batch { records, next: reader.next.clone(), at_end })).await.is_err() {
                return;
            }
        }
    })))
}

impl Reader {
    /// One batch: up to `limit` records of what is ready, at most a share of them from any one
    /// partition while another is busy. An empty batch waits up to `batch_max` for its first
    /// record; one that holds a record closes when nothing more is ready.
    async fn batch(&mut self, limit: usize, batch_max: Duration) -> Result<Vec<Record>, SinkError> {
        let deadline = Instant::now() + batch_max;
        let mut records: Vec<Record> = Vec::with_capacity(limit.min(8192));
        let caps: Vec<usize> = (0..self.queues.len()).map(|i| share(limit, self.others_busy(i))).collect();
        let mut taken = vec![0usize; self.queues.len()];
        // Events and errors that are not a partition's (librdkafka's statistics, a broker
        // gone) come through the consumer's own queue, which must be served too.
        if let Some(m) = self.consumer.recv().now_or_never() {
            self.head.push_back(decode(&m.map_err(|e| SinkError::kafka("consuming", e))?));
        }
        while records.len() < limit {
            let Some(rec) = self.head.pop_front() else { break };
            self.accept(rec, &mut records)?;
        }
        // A partition with records left in `head` is not read from its queue yet.
        let held: Vec<i32> = self.head.iter().map(|r| r.partition).collect();
        let open = |i: usize, taken: &[usize], queues: &[(i32, Queue)]| taken[i] < caps[i] && !held.contains(&queues[i].0);
        while records.len() < limit {
            // A sweep takes what each partition has ready, up to its share of the batch.
            let mut got = false;
            for k in 0..self.queues.len() {
                let i = (self.first + k) % self.queues.len();
                while open(i, &taken, &self.queues) && records.len() < limit {
                    let rec = match self.queues[i].1.recv().now_or_never() {
                        Some(m) => decode(&m.map_err(|e| SinkError::kafka("consuming", e))?),
                        None => break,
                    };
                    self.accept(rec, &mut records)?;
                    taken[i] += 1;
                    got = true;
                }
            }
            if got {
                continue;
            }
            if !records.is_empty() {
                // Nothing more ready: the batch goes as it is.
                break;
            }
            // Nothing at all yet: wait for the first record of a partition, or the deadline.
            let waiting: Vec<usize> = (0..self.queues.len()).filter(|i| open(*i, &taken, &self.queues)).collect();
            if waiting.is_empty() {
                break;
            }
            let Some(rec) = wait_any(&self.consumer, &self.queues, &waiting, deadline).await? else { break };
            if let Some(i) = self.queues.iter().position(|(p, _)| *p == rec.partition) {
                taken[i] += 1;
            }
            self.accept(rec, &mut records)?;
        }
        self.first = self.first.wrapping_add(1);
        Ok(records)
    }

    /// Whether a partition other than queue `i`'s gave data within [`BUSY_FOR`].
    fn others_busy(&self, i: usize) -> bool {
        self.last_data.iter().enumerate().any(|(j, t)| j != i && t.elapsed() < BUSY_FOR)
    }

    /// Takes `rec` into `records`, with the offset after it. A record behind one already taken
    /// of its partition would put the batch out of order: the sink starts again from the
    /// offsets it stored (nothing is written out of order).
    fn accept(&mut self, rec: Record, records: &mut Vec<Record>) -> Result<(), SinkError> {
        if self.next.get(&rec.partition).is_some_and(|n| rec.offset < *n) {
            return Err(SinkError::Kafka {
                context: format!("reading {} partition {}", self.topic, rec.partition),
                message: format!("offset {} came after a later one of its partition", rec.offset),
                transient: true,
            });
        }
        self.next.insert(rec.partition, rec.offset + 1);
        if !matches!(rec.decoded, Ok(HqEvent::Watermark { .. })) {
            if let Some(i) = self.queues.iter().position(|(p, _)| *p == rec.partition) {
                self.last_data[i] = Instant::now();
            }
        }
        records.push(rec);
        Ok(())
    }

    /// `--until-idle`: every partition is read up to its end offset at start (`targets`).
    fn at(&self, targets: &HashMap<i32, i64>) -> bool {
        let pos = self.consumer.position().ok();
        targets.iter().all(|(p, high)| {
            let at = pos.as_ref().and_then(|tp| tp.find_partition(&self.topic, *p)).and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None });
            *high == 0 || at.is_some_and(|o| o >= *high) || self.next.get(p).is_some_and(|o| *o >= *high)
        })
    }
}

fn decode(m: &BorrowedMessage<'_>) -> Record {
    Record::decode(m.partition(), m.offset(), m.payload().unwrap_or(&[]).to_vec())
}

/// The first message of the partitions `open` (indexes into `queues`) or of the consumer's own
/// queue; None at `deadline`.
async fn wait_any(consumer: &SinkConsumer, queues: &[(i32, Queue)], open: &[usize], deadline: Instant) -> Result<Option<Record>, SinkError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(None);
    }
    let firsts = futures::future::select_all(open.iter().map(|i| queues[*i].1.recv().boxed()));
    let m = tokio::select! {
        (m, _, _) = firsts => m,
        // A record fetched before the partitions were split: none are, as the queues are
        // split before the first read; taken as it is if one is.
        m = consumer.recv() => m,
        _ = tokio::time::sleep(left) => return Ok(None),
    };
    Ok(Some(decode(&m.map_err(|e| SinkError::kafka("consuming", e))?)))
}
