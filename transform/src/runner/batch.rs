//! The transform's loop, one phase per method: [`Runner::read_batch`] (consume, decode, the
//! engine), [`Runner::aggregates_and_watermark`] and [`Runner::commit`] (one Kafka
//! transaction: outputs, state facts, dead letters and the consumer offsets).
//!
//! Delivery guarantee: exactly once. The engine emits every event it reads, so a batch's
//! outputs, its changelog facts, its dead letters and the offsets after every record it read
//! commit in one transaction; a restart resumes from the last committed one. Back-pressure is
//! the loop itself: a batch is read only once the one before it is produced, with one commit in
//! flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use omrs_core::clock::now_ms;
use omrs_core::config::Config;
use omrs_core::dlq::DeadKind;
use omrs_core::kafka::{read_committed_consumer, transactional_producer, LagContext};
use omrs_core::metrics::metrics;
use omrs_core::topics::{TopicNames, MAX_CHANGE_BYTES, MAX_RECORD_BYTES};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{aggregator, await_commit, dlq_record, engine_config, enqueue, restore, Counts, Phases, TxProducer, TXN_TIMEOUT};
use crate::aggregate::{AggFact, Aggregator};
use crate::engine::{Engine, HqEvent, Origin, Out};
use crate::event::InEvent;
use crate::{TransformArgs, TransformError};

type TopicPart = (String, i32);

/// How many partitions `topic` has: a missing topic is a definite error with the fix.
fn partitions_of(producer: &TxProducer, topic: &str) -> Result<i32, TransformError> {
    let n = omrs_core::kafka::topic_partitions(producer.client(), topic, Duration::from_secs(30)).map_err(|e| TransformError::kafka(&format!("reading the metadata of {topic}"), e))?.len();
    if n == 0 {
        return Err(TransformError::Kafka { context: format!("topic {topic}"), message: "does not exist: create the topics first with `omrs-stream topics apply`".into() });
    }
    Ok(n as i32)
}

/// A record that cannot be transformed: where it was, why, and its bytes.
type Dead = (Origin, DeadKind, String, Vec<u8>);

/// What one batch read and produced.
pub(super) struct Batch {
    outputs: Vec<Out>,
    dead: Vec<Dead>,
    /// Records read.
    n: usize,
    now: i64,
    started: Instant,
}

/// The loop's state between batches.
pub(super) struct Runner {
    out_topic: String,
    state_topic: String,
    dlq_topic: String,
    cdc_prefix: String,
    producer: TxProducer,
    consumer: StreamConsumer<LagContext>,
    engine: Engine,
    agg: Option<Aggregator>,
    /// End offsets at start, for `--until-idle`.
    targets: Option<HashMap<TopicPart, i64>>,
    consumed: HashMap<TopicPart, i64>,
    committed: HashMap<TopicPart, i64>,
    inflight: Option<tokio::task::JoinHandle<Result<(), TransformError>>>,
    in_counts: Counts,
    out_counts: Counts,
    /// Per topic: the shared topic and site names, so a record allocates neither.
    topic_names: Vec<(Arc<str>, Arc<str>)>,
    /// The last offset read per (topic, partition) in this batch, folded into `consumed` after it.
    batch_last: Vec<(Arc<str>, i32, i64)>,
    buf: Vec<u8>,
    key: String,
    prof: Phases,
    /// The last global watermark written to omrs.hq.changes (for the Parquet sink's partitions).
    wm_out: i64,
    /// `omrs.identity.decisions`: read with the site topics, handled by [`Engine::decide`].
    decisions_topic: String,
    /// A batch reads for at most this long (`transform.batch_max_ms`).
    batch_max: Duration,
    /// The partitions of `omrs.hq.changes` at start (a site's records go to one of them).
    out_partitions: i32,
}

impl Runner {
    /// The producer (transactions initialised, fencing an older instance), the engine restored
    /// from the changelog, and the consumer subscribed to every site topic.
    pub(super) async fn open(cfg: &Config, args: &TransformArgs) -> Result<Runner, TransformError> {
        let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
        let producer: TxProducer = transactional_producer(&cfg.kafka, names.transform_transactional_id(), MAX_RECORD_BYTES)
            .create()
            .map(Arc::new)
            .map_err(|e| TransformError::kafka("creating the producer", e))?;
        producer.init_transactions(TXN_TIMEOUT).map_err(|e| TransformError::kafka("initialising transactions", e))?;

        if let Some(n) = cfg.transform.max_buffered_events {
            tracing::warn!(max_buffered_events = n, "transform.max_buffered_events is no longer used: the transform emits every event on arrival and buffers none (remove it from the config)");
        }
        let mut engine = Engine::new(engine_config(cfg));
        let mut agg = aggregator(cfg)?;
        let restored = restore(cfg, &names.transform_state(), &mut engine, &mut agg)?;
        let now = now_ms();
        for s in engine.sites.values_mut() {
            s.last_seen = now;
        }
        for site in cfg.site_names() {
            engine.expect_site(&site, now);
        }
        tracing::info!(facts = restored, identities = engine.identity.len(), "state restored");

        let consumer: StreamConsumer<LagContext> = read_committed_consumer(&cfg.kafka, names.transform_group())
            // Static membership: a restarted transform takes its place at once instead of
            // waiting for the killed one's session to time out.
            .set("group.instance.id", names.transform_instance())
            .set("session.timeout.ms", "10000")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "2000")
            // Prefetch per partition; the default (64 MiB each) dominated memory with many
            // sites. 4 MiB keeps up now that a drained queue is refilled at once
            // (fetch.queue.backoff.ms).
            .set("queued.max.messages.kbytes", "4096")
            .create_with_context(LagContext::new("transform"))
            .map_err(|e| TransformError::kafka("creating the consumer", e))?;
        consumer.subscribe(&[&names.transform_input_pattern()]).map_err(|e| TransformError::kafka("subscribing to the site topics", e))?;
        let out_partitions = partitions_of(&producer, &names.hq_changes())?;
        tracing::info!(topic = %names.hq_changes(), partitions = out_partitions, "each site's changes go to one partition");
        omrs_core::endpoint::ready();
        let cdc_prefix = names.cdc_prefix();
        let targets = if args.until_idle { Some(end_offsets(&consumer, &cdc_prefix, &names.identity_decisions())?) } else { None };
        Ok(Runner {
            out_topic: names.hq_changes(),
            decisions_topic: names.identity_decisions(),
            batch_max: Duration::from_millis(cfg.transform.batch_max_ms.max(1)),
            state_topic: names.transform_state(),
            dlq_topic: names.dlq(),
            cdc_prefix,
            producer,
            consumer,
            engine,
            agg,
            targets,
            consumed: HashMap::new(),
            committed: HashMap::new(),
            inflight: None,
            in_counts: Counts::default(),
            out_counts: Counts::default(),
            topic_names: Vec::new(),
            batch_last: Vec::new(),
            buf: Vec::with_capacity(4096),
            key: String::with_capacity(128),
            prof: Phases::default(),
            wm_out: i64::MIN,
            out_partitions,
        })
    }

    /// Stopped: the transaction in flight commits; the next start reads on from its offsets.
    pub(super) async fn stop(mut self) -> Result<(), TransformError> {
        if let Some(h) = self.inflight.take() {
            await_commit(h).await?;
        }
        tracing::info!(merges = self.engine.merges, batches = self.prof.batches, "stopped; every transaction begun is committed");
        Ok(())
    }

    /// Every site topic read to its end (`--until-idle`): the last commit, and the phases' times.
    pub(super) async fn finish(mut self) -> Result<(), TransformError> {
        if let Some(h) = self.inflight.take() {
            await_commit(h).await?;
        }
        let p = &self.prof;
        tracing::info!(
            merges = self.engine.merges,
            identities = self.engine.identity.len(),
            batches = p.batches,
            read_ms = p.read.as_millis() as u64,
            commit_wait_ms = p.commit_wait.as_millis() as u64,
            produce_ms = p.produce.as_millis() as u64,
            "all site topics read to their end; done"
        );
        Ok(())
    }

    /// Reads up to 20,000 records through the engine: until nothing more is ready once the
    /// commit before has finished, and for `transform.batch_max_ms` (50 ms by default) at most.
    pub(super) async fn read_batch(&mut self) -> Result<Batch, TransformError> {
        let started = Instant::now();
        self.prof.batches += 1;
        let mut b = Batch { outputs: Vec::with_capacity(4096), dead: Vec::new(), n: 0, now: now_ms(), started };
        let deadline = Instant::now() + self.batch_max;
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        while b.n < 20_000 {
            // The clock is read every 256 records, not per record.
            if b.n % 256 == 255 && Instant::now() >= deadline {
                break;
            }
            // A batch that holds a record closes once nothing more is ready and the transaction
            // before has committed (its own cannot begin sooner): under load batches fill while
            // the commit runs, and a lone live change goes out at once instead of waiting out a
            // fixed window. An empty batch waits up to `batch_max` for its first record.
            let ready = if b.n == 0 {
                None
            } else {
                tokio::select! {
                    biased;
                    m = self.consumer.recv() => Some(m),
                    _ = std::future::ready(()) => None,
                }
            };
            let msg = match ready {
                Some(m) => m.map_err(|e| TransformError::kafka("consuming", e))?,
                None if b.n > 0 && self.inflight.as_ref().is_none_or(|h| h.is_finished()) => break,
                None => tokio::select! {
                    biased;
                    m = self.consumer.recv() => m.map_err(|e| TransformError::kafka("consuming", e))?,
                    _ = &mut timer => break,
                    // The commit in flight is looked at again every millisecond.
                    _ = tokio::time::sleep(Duration::from_millis(1)), if b.n > 0 => continue,
                },
            };
            b.n += 1;
            if b.n.is_multiple_of(512) {
                b.now = now_ms();
            }
            let (topic, site) = names_of(&mut self.topic_names, &self.cdc_prefix, msg.topic());
            let origin = Origin { topic, partition: msg.partition(), offset: msg.offset() };
            match self.batch_last.iter_mut().find(|(t, p, _)| Arc::ptr_eq(t, &origin.topic) && *p == origin.partition) {
                Some(e) => e.2 = origin.offset,
                None => self.batch_last.push((origin.topic.clone(), origin.partition, origin.offset)),
            }
            if self.engine.already_handled(&origin) {
                // Emitted or dead-lettered past the committed offset by an earlier version.
                continue;
            }
            if *origin.topic == *self.decisions_topic {
                let payload = msg.payload().unwrap_or(&[]);
                let decided = serde_json::from_slice::<omrs_core::hq::review::Decision>(payload)
                    .map_err(|e| format!("not an identity decision: {e}"))
                    .and_then(|d| self.engine.decide(d, &mut b.outputs));
                if let Err(reason) = decided {
                    b.dead.push((origin, DeadKind::InvalidRecord, reason, payload.to_vec()));
                }
                continue;
            }
            // Decode from the borrowed record; the event keeps one copy of its bytes, and a
            // dead letter its own.
            let decoded = decode_record(msg.payload().unwrap_or(&[]), &site, &origin.topic);
            drop(msg);
            match decoded {
                Err((kind, reason, payload)) => {
                    b.dead.push((origin, kind, reason, payload));
                }
                Ok(ev) => {
                    self.in_counts.bump(&ev.site, ev.table_str(), ev.op.as_str());
                    self.engine.push_into(ev, origin, b.now, &mut b.outputs);
                }
            }
        }
        self.prof.read += started.elapsed();
        self.engine.tick(now_ms());
        self.in_counts.flush(|site, table, op, n| metrics().events_in.with_label_values(&["transform", site, table, op]).inc_by(n));
        for (t, p, o) in self.batch_last.drain(..) {
            self.consumed.insert((t.to_string(), p), o);
        }
        Ok(b)
    }

    /// Batch mode: every site topic read to its end seen at start, and this batch read nothing.
    pub(super) fn finished(&mut self, b: &Batch) -> bool {
        let Some(t) = &self.targets else { return false };
        // Positions, not the last offsets seen: a transactional topic ends with a commit marker
        // that the consumer skips but that counts in the end offset.
        let positions = self.consumer.position().ok();
        let at = |topic: &str, part: i32| {
            positions.as_ref().and_then(|p| p.find_partition(topic, part)).and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None })
        };
        let all = t.iter().all(|((topic, part), high)| {
            *high == 0 || at(topic, *part).is_some_and(|o| o >= *high) || self.consumed.get(&(topic.clone(), *part)).is_some_and(|o| o + 1 >= *high)
        });
        all && b.n == 0
    }

    /// Aggregates: the windows this batch changed, and those the watermark closed; then the
    /// global watermark, after the events it releases, at most once a second (and at the end
    /// of a batch run). Returns the aggregates' state facts.
    pub(super) fn aggregates_and_watermark(&mut self, b: &mut Batch, finished: bool) -> Vec<AggFact> {
        let mut agg_facts = Vec::new();
        if let Some(a) = self.agg.as_mut() {
            for o in &b.outputs {
                a.on_output(o);
            }
            let (versions, f) = a.flush(self.engine.global_watermark(), now_ms(), finished);
            b.outputs.extend(versions.into_iter().map(|v| Out::Hq(Box::new(v))));
            agg_facts = f;
        }
        let gwm = self.engine.global_watermark();
        if gwm > i64::MIN / 4 && (gwm >= self.wm_out.saturating_add(1000) || (finished && gwm > self.wm_out)) {
            b.outputs.push(Out::Hq(Box::new(HqEvent::Watermark { ts_ms: gwm })));
            self.wm_out = gwm;
        }
        agg_facts
    }

    /// Offsets: after the last record read of each partition (every one was emitted or
    /// dead-lettered). Ranges an earlier version emitted past its offsets go once passed.
    fn offsets(&mut self) -> (TopicPartitionList, Vec<(TopicPart, i64)>) {
        let mut tpl = TopicPartitionList::new();
        let mut new_committed = Vec::new();
        for ((topic, part), last) in &self.consumed {
            let next = last + 1;
            if self.committed.get(&(topic.clone(), *part)) != Some(&next) {
                let _ = tpl.add_partition_offset(topic, *part, Offset::Offset(next));
                new_committed.push(((topic.clone(), *part), next));
            }
        }
        for ((topic, part), next) in &new_committed {
            self.engine.committing(topic, *part, *next);
        }
        (tpl, new_committed)
    }

    /// One Kafka transaction for the batch, when it has anything to write: outputs, state
    /// facts, dead letters, and the offsets. Its commit runs off the loop's thread while the
    /// next batch is read; the next transaction waits for it.
    pub(super) async fn commit(&mut self, b: Batch, agg_facts: Vec<AggFact>) -> Result<(), TransformError> {
        let (tpl, new_committed) = self.offsets();
        let mut facts = self.engine.take_facts();
        if !b.outputs.is_empty() || !new_committed.is_empty() {
            facts.extend(self.engine.watermark_facts());
        }
        if b.outputs.is_empty() && b.dead.is_empty() && facts.is_empty() && agg_facts.is_empty() && new_committed.is_empty() {
            return Ok(());
        }
        // The previous transaction's commit ran while this batch was read and transformed.
        let t = Instant::now();
        if let Some(h) = self.inflight.take() {
            await_commit(h).await?;
        }
        self.prof.commit_wait += t.elapsed();
        let t = Instant::now();
        let p = &self.producer;
        p.begin_transaction().map_err(|e| TransformError::kafka("beginning a transaction", e))?;
        for o in &b.outputs {
            self.buf.clear();
            o.write_json(&mut self.buf);
            o.write_key(&mut self.key);
            match o.partition(self.out_partitions) {
                Some(part) => enqueue(p, &self.out_topic, Some(part), &self.key, &self.buf).await?,
                None => {
                    for part in 0..self.out_partitions {
                        enqueue(p, &self.out_topic, Some(part), &self.key, &self.buf).await?;
                    }
                }
            }
        }
        for f in &facts {
            enqueue(p, &self.state_topic, None, &f.key(), &serde_json::to_vec(f).unwrap_or_default()).await?;
        }
        for f in &agg_facts {
            enqueue(p, &self.state_topic, None, &f.key(), &serde_json::to_vec(f).unwrap_or_default()).await?;
        }
        for (origin, kind, reason, payload) in &b.dead {
            tracing::warn!(topic = %origin.topic, offset = origin.offset, kind = kind.as_str(), reason = %reason, "record dead-lettered");
            enqueue(p, &self.dlq_topic, None, &format!("{}:{}", origin.topic, origin.offset), &dlq_record(*kind, reason, origin, payload)).await?;
        }
        let cgm = if new_committed.is_empty() {
            None
        } else {
            Some(self.consumer.group_metadata().ok_or_else(|| TransformError::Kafka { context: "group metadata".into(), message: "not available".into() })?)
        };
        self.prof.produce += t.elapsed();
        // The offsets join this transaction and it commits off the loop's thread (both are
        // broker round trips); the next batch is read meanwhile and waits for this commit
        // before it begins its own transaction.
        let p = p.clone();
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            if let Some(cgm) = cgm {
                p.send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT).map_err(|e| TransformError::kafka("adding offsets to the transaction", e))?;
            }
            p.commit_transaction(TXN_TIMEOUT).map_err(|e| TransformError::kafka("committing a transaction", e))
        }));
        self.committed.extend(new_committed);
        self.count(&b);
        Ok(())
    }

    /// The metrics of a batch begun: transactions, latency, events out, late, merges, dead.
    fn count(&mut self, b: &Batch) {
        let m = metrics();
        m.kafka_transactions.with_label_values(&["transform", ""]).inc();
        m.batch_latency.with_label_values(&["transform"]).observe(b.started.elapsed().as_secs_f64());
        let mut late_counts: HashMap<&str, u64> = HashMap::new();
        for o in &b.outputs {
            match o {
                Out::Change { event, late, .. } => {
                    self.out_counts.bump(&event.site, event.table_str(), event.op.as_str());
                    if *late {
                        *late_counts.entry(&event.site).or_default() += 1;
                    }
                }
                Out::Hq(h) => match &**h {
                    HqEvent::Merge { .. } => m.merges.inc(),
                    HqEvent::Split { .. } => m.splits.inc(),
                    HqEvent::IdentityReview { reason, status, .. } => m.identity_reviews.with_label_values(&[reason.as_str(), status.as_str()]).inc(),
                    HqEvent::Watermark { .. } | HqEvent::Aggregate { .. } | HqEvent::Change { .. } | HqEvent::Schema { .. } => {}
                },
            }
        }
        self.out_counts.flush(|site, table, op, n| m.events_out.with_label_values(&["transform", site, table, op]).inc_by(n));
        for (site, n) in late_counts {
            m.late_events.with_label_values(&[site]).inc_by(n);
        }
        for (_, kind, _, _) in &b.dead {
            m.dead_lettered.with_label_values(&["transform", kind.as_str()]).inc();
        }
    }

    /// Watermark, clock and identity gauges.
    pub(super) fn gauges(&self) {
        let m = metrics();
        let e = &self.engine;
        let gwm = e.global_watermark();
        if gwm > i64::MIN {
            m.global_watermark.set(gwm);
            m.watermark_delay.set(now_ms() - gwm);
        }
        m.identity_records.set(e.identity.len() as i64);
        m.identity_bytes.set(e.identity_bytes() as i64);
        for (site, st) in &e.sites {
            m.site_watermark.with_label_values(&[site]).set(st.max_ts);
            m.site_idle.with_label_values(&[site]).set(st.idle as i64);
            m.site_clock_ahead.with_label_values(&[site]).set(st.clock_ahead_ms);
        }
        // The engine counts since this process started, as the counter does.
        for (site, n) in &e.clock_capped {
            let c = m.clock_capped.with_label_values(&[site]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }
}

/// The shared (topic, site) names of a topic.
fn names_of(known: &mut Vec<(Arc<str>, Arc<str>)>, cdc_prefix: &str, topic: &str) -> (Arc<str>, Arc<str>) {
    if let Some((t, s)) = known.iter().find(|(t, _)| **t == *topic) {
        return (t.clone(), s.clone());
    }
    let t: Arc<str> = Arc::from(topic);
    let s: Arc<str> = Arc::from(topic.strip_prefix(cdc_prefix).unwrap_or(""));
    known.push((t.clone(), s.clone()));
    (t, s)
}

/// A record's event, or why it is dead-lettered (with its bytes).
fn decode_record(payload: &[u8], site: &Arc<str>, topic: &str) -> Result<InEvent, (DeadKind, String, Vec<u8>)> {
    if payload.len() > MAX_CHANGE_BYTES {
        return Err((
            DeadKind::TooLarge,
            format!("record too large: {} bytes, over the {MAX_CHANGE_BYTES} bytes a change may have to fit omrs.hq.changes ({MAX_RECORD_BYTES} bytes)", payload.len()),
            payload.to_vec(),
        ));
    }
    InEvent::decode(payload, site, topic).map_err(|reason| (DeadKind::InvalidEvent, reason, payload.to_vec()))
}

/// The end offset of every site topic's partitions at start, for `--until-idle`; partitions
/// already committed to their end count as done (0).
fn end_offsets(consumer: &StreamConsumer<LagContext>, cdc_prefix: &str, decisions: &str) -> Result<HashMap<TopicPart, i64>, TransformError> {
    let md = consumer.fetch_metadata(None, Duration::from_secs(30)).map_err(|e| TransformError::kafka("reading metadata", e))?;
    let mut t = HashMap::new();
    for topic in md.topics().iter().filter(|t| t.name().starts_with(cdc_prefix) || t.name() == decisions) {
        for p in topic.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(30)).map_err(|e| TransformError::kafka("reading end offsets", e))?;
            t.insert((topic.name().to_string(), p.id()), high);
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, part) in t.keys() {
        let _ = tpl.add_partition(topic, *part);
    }
    if let Ok(c) = consumer.committed_offsets(tpl, Duration::from_secs(30)) {
        for e in c.elements() {
            if let Offset::Offset(o) = e.offset() {
                if t.get(&(e.topic().to_string(), e.partition())).is_some_and(|h| o >= *h) {
                    t.insert((e.topic().to_string(), e.partition()), 0);
                }
            }
        }
    }
    Ok(t)
}
