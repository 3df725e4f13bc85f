//! The Kafka loop of the transform: pattern subscription to every site topic, read_committed
//! consumption, and one Kafka transaction per batch holding the output events, the changelog
//! facts, dead letters and the consumer offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use omrs_core::clock::{now_ms, retry_transient};
use omrs_core::config::Config;
use omrs_core::dlq::{DeadKind, DeadRecord};
use omrs_core::kafka::{read_committed_consumer, transactional_producer};
use omrs_core::metrics::metrics;
use omrs_core::topics::{TopicNames, MAX_CHANGE_BYTES, MAX_RECORD_BYTES};
use omrs_core::kafka::LagContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::aggregate::{AggFact, Aggregator};
use crate::engine::{Engine, EngineConfig, Fact, HqEvent, Origin, Out};
use crate::event::InEvent;
use crate::{TransformArgs, TransformError};

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        out_of_orderness_ms: cfg.transform.out_of_orderness_ms as i64,
        idle_timeout_ms: cfg.transform.idle_timeout_s as i64 * 1000,
        max_buffered: cfg.transform.max_buffered_events,
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
    /// Back-pressure pauses.
    pauses: u64,
}

async fn await_commit(h: tokio::task::JoinHandle<Result<(), TransformError>>) -> Result<(), TransformError> {
    h.await.map_err(|e| TransformError::Kafka { context: "committing".into(), message: e.to_string() })?
}

/// The transactional producer. Deliveries are not awaited one by one: a failed delivery fails
/// the transaction's commit, and the loop restarts from the last committed transaction.
type TxProducer = Arc<ThreadedProducer<DefaultProducerContext>>;

async fn enqueue(producer: &TxProducer, topic: &str, key: &str, payload: &[u8]) -> Result<(), TransformError> {
    loop {
        match producer.send(BaseRecord::<str, [u8]>::to(topic).key(key).payload(payload)) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err((e, _)) => return Err(TransformError::kafka(&format!("producing to {topic}"), e)),
        }
    }
}

async fn run_once(cfg: &Config, args: &TransformArgs) -> Result<(), TransformError> {
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let out_topic = names.hq_changes();
    let state_topic = names.transform_state();
    let dlq_topic = names.dlq();
    let cdc_prefix = names.cdc_prefix();

    let producer: TxProducer = transactional_producer(&cfg.kafka, names.transform_transactional_id(), MAX_RECORD_BYTES)
        .create()
        .map(Arc::new)
        .map_err(|e| TransformError::kafka("creating the producer", e))?;
    producer.init_transactions(TXN_TIMEOUT).map_err(|e| TransformError::kafka("initialising transactions", e))?;

    let mut engine = Engine::new(engine_config(cfg));
    let mut agg = aggregator(cfg)?;
    let restored = restore(cfg, &state_topic, &mut engine, &mut agg)?;
    let now = now_ms();
    for s in engine.sites.values_mut() {
        s.last_seen = now;
    }
    for site in cfg.site_names() {
        engine.expect_site(&site, now);
    }
    tracing::info!(facts = restored, identities = engine.identity.len(), "state restored");

    let consumer: StreamConsumer<LagContext> = read_committed_consumer(&cfg.kafka, names.transform_group())
        // Static membership: a restarted transform takes its place at once instead of waiting
        // for the killed one's session to time out.
        .set("group.instance.id", names.transform_instance())
        .set("session.timeout.ms", "10000")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "2000")
        // Prefetch per partition; the default (64 MiB each) dominated memory with many sites.
        // 4 MiB keeps up now that a drained queue is refilled at once (fetch.queue.backoff.ms).
        .set("queued.max.messages.kbytes", "4096")
        .create_with_context(LagContext::new("transform"))
        .map_err(|e| TransformError::kafka("creating the consumer", e))?;
    consumer.subscribe(&[&names.cdc_pattern()]).map_err(|e| TransformError::kafka("subscribing to the site topics", e))?;
    omrs_core::endpoint::ready();

    // End offsets at start, for --until-idle.
    let mut targets: Option<HashMap<(String, i32), i64>> = None;
    if args.until_idle {
        let md = consumer.fetch_metadata(None, Duration::from_secs(30)).map_err(|e| TransformError::kafka("reading metadata", e))?;
        let mut t = HashMap::new();
        for topic in md.topics().iter().filter(|t| t.name().starts_with(&cdc_prefix)) {
            for p in topic.partitions() {
                let (_, high) = consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(30)).map_err(|e| TransformError::kafka("reading end offsets", e))?;
                t.insert((topic.name().to_string(), p.id()), high);
            }
        }
        // Partitions already committed to their end count as done.
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
        targets = Some(t);
    }

    let mut consumed: HashMap<(String, i32), i64> = HashMap::new();
    let mut committed: HashMap<(String, i32), i64> = HashMap::new();
    let mut paused: HashSet<(String, i32)> = HashSet::new();
    let mut inflight: Option<tokio::task::JoinHandle<Result<(), TransformError>>> = None;
    let mut in_counts = Counts::default();
    let mut out_counts = Counts::default();
    // Per topic: the shared topic and site names, so a record allocates neither.
    let mut topic_names: Vec<(Arc<str>, Arc<str>)> = Vec::new();
    // The last offset read per (topic, partition) in this batch, folded into `consumed` after it.
    let mut batch_last: Vec<(Arc<str>, i32, i64)> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut key = String::with_capacity(128);
    let mut prof = Phases::default();
    // The last global watermark written to omrs.hq.changes (for the Parquet sink's partitions).
    let mut wm_out = i64::MIN;
    loop {
        if omrs_core::stop::requested() {
            // Stopped: the transaction in flight commits; events the engine still buffers are
            // read again from the committed offsets at the next start.
            if let Some(h) = inflight.take() {
                await_commit(h).await?;
            }
            tracing::info!(merges = engine.merges, batches = prof.batches, "stopped; every transaction begun is committed");
            return Ok(());
        }
        omrs_core::endpoint::beat();
        let started = Instant::now();
        prof.batches += 1;
        let mut outputs: Vec<Out> = Vec::with_capacity(4096);
        let mut dead: Vec<(Origin, DeadKind, String, Vec<u8>)> = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut n = 0;
        let mut now = now_ms();
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        let t_batch = Instant::now();
        while n < 20_000 {
            // The clock is read every 256 records, not per record.
            if n % 256 == 255 && Instant::now() >= deadline {
                break;
            }
            let msg = tokio::select! {
                biased;
                m = consumer.recv() => match m {
                    Err(e) => return Err(TransformError::kafka("consuming", e)),
                    Ok(m) => m,
                },
                _ = &mut timer => break,
            };
            n += 1;
            if n % 512 == 0 {
                now = now_ms();
            }
            let (topic, site) = match topic_names.iter().find(|(t, _)| **t == *msg.topic()) {
                Some((t, s)) => (t.clone(), s.clone()),
                None => {
                    let t: Arc<str> = Arc::from(msg.topic());
                    let s: Arc<str> = Arc::from(msg.topic().strip_prefix(&cdc_prefix).unwrap_or(""));
                    topic_names.push((t.clone(), s.clone()));
                    (t, s)
                }
            };
            let origin = Origin { topic, partition: msg.partition(), offset: msg.offset() };
            match batch_last.iter_mut().find(|(t, p, _)| Arc::ptr_eq(t, &origin.topic) && *p == origin.partition) {
                Some(e) => e.2 = origin.offset,
                None => batch_last.push((origin.topic.clone(), origin.partition, origin.offset)),
            }
            if engine.already_handled(&origin) {
                // Emitted or dead-lettered past the committed offset before a restart.
                continue;
            }
            // Decode from the borrowed record; the event keeps one copy of its bytes, and a dead
            // letter its own.
            let payload = msg.payload().unwrap_or(&[]);
            let decoded = if payload.len() > MAX_CHANGE_BYTES {
                Err((
                    DeadKind::TooLarge,
                    format!(
                        "record too large: {} bytes, over the {MAX_CHANGE_BYTES} bytes a change may have to fit omrs.hq.changes ({MAX_RECORD_BYTES} bytes)",
                        payload.len()
                    ),
                    payload.to_vec(),
                ))
            } else {
                InEvent::decode(payload, &site, &origin.topic).map_err(|reason| (DeadKind::InvalidEvent, reason, payload.to_vec()))
            };
            drop(msg);
            match decoded {
                Err((kind, reason, payload)) => {
                    engine.dead_lettered(&origin);
                    dead.push((origin, kind, reason, payload));
                }
                Ok(ev) => {
                    in_counts.bump(&ev.site, ev.table_str(), ev.op.as_str());
                    engine.push_into(ev, origin, now, &mut outputs);
                }
            }
        }
        prof.read += t_batch.elapsed();
        outputs.extend(engine.tick(now_ms()));
        in_counts.flush(|site, table, op, n| metrics().events_in.with_label_values(&["transform", site, table, op]).inc_by(n));
        for (t, p, o) in batch_last.drain(..) {
            consumed.insert((t.to_string(), p), o);
        }

        // Done (batch mode)?
        let mut finished = false;
        if let Some(t) = &targets {
            // Positions, not the last offsets seen: a transactional topic ends with a commit
            // marker that the consumer skips but that counts in the end offset.
            let positions = consumer.position().ok();
            let at = |topic: &str, part: i32| {
                positions
                    .as_ref()
                    .and_then(|p| p.find_partition(topic, part))
                    .and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None })
            };
            let all = t.iter().all(|((topic, part), high)| {
                *high == 0 || at(topic, *part).is_some_and(|o| o >= *high) || consumed.get(&(topic.clone(), *part)).is_some_and(|o| o + 1 >= *high)
            });
            if all && n == 0 {
                outputs.extend(engine.drain());
                finished = true;
            }
        }

        // Aggregates: the windows this batch changed, and those the watermark closed.
        let mut agg_facts: Vec<AggFact> = Vec::new();
        if let Some(a) = agg.as_mut() {
            for o in &outputs {
                a.on_output(o);
            }
            let (versions, f) = a.flush(engine.global_watermark(), now_ms(), finished);
            outputs.extend(versions.into_iter().map(|v| Out::Hq(Box::new(v))));
            agg_facts = f;
        }

        // The global watermark, after the events it releases, at most once a second (and at the
        // end of a batch run).
        let gwm = engine.global_watermark();
        if gwm > i64::MIN / 4 && (gwm >= wm_out.saturating_add(1000) || (finished && gwm > wm_out)) {
            outputs.push(Out::Hq(Box::new(HqEvent::Watermark { ts_ms: gwm })));
            wm_out = gwm;
        }

        // Offsets: up to what was emitted. Records handled past that point (snapshot rows
        // emitted while a binlog event waits) are kept as ranges in the engine's facts, so that
        // a restart skips them; the ranges below the new offsets are dropped.
        let pending = engine.pending_offsets();
        let mut tpl = TopicPartitionList::new();
        let mut new_committed = Vec::new();
        for ((topic, part), last) in &consumed {
            let next = match pending.get(&(topic.clone(), *part)) {
                Some(&first_buffered) => first_buffered,
                None => last + 1,
            };
            if committed.get(&(topic.clone(), *part)) != Some(&next) {
                let _ = tpl.add_partition_offset(topic, *part, Offset::Offset(next));
                new_committed.push(((topic.clone(), *part), next));
            }
        }
        for ((topic, part), next) in &new_committed {
            engine.committing(topic, *part, *next);
        }
        let mut facts = engine.take_facts();
        if !outputs.is_empty() || !new_committed.is_empty() {
            facts.extend(engine.watermark_facts());
        }
        if !outputs.is_empty() || !dead.is_empty() || !facts.is_empty() || !agg_facts.is_empty() || !new_committed.is_empty() {
            // The previous transaction's commit ran while this batch was read and transformed.
            let t = Instant::now();
            if let Some(h) = inflight.take() {
                await_commit(h).await?;
            }
            prof.commit_wait += t.elapsed();
            let t = Instant::now();
            producer.begin_transaction().map_err(|e| TransformError::kafka("beginning a transaction", e))?;
            for o in &outputs {
                buf.clear();
                o.write_json(&mut buf);
                o.write_key(&mut key);
                enqueue(&producer, &out_topic, &key, &buf).await?;
            }
            for f in &facts {
                enqueue(&producer, &state_topic, &f.key(), &serde_json::to_vec(f).unwrap_or_default()).await?;
            }
            for f in &agg_facts {
                enqueue(&producer, &state_topic, &f.key(), &serde_json::to_vec(f).unwrap_or_default()).await?;
            }
            for (origin, kind, reason, payload) in &dead {
                tracing::warn!(topic = %origin.topic, offset = origin.offset, kind = kind.as_str(), reason = %reason, "record dead-lettered");
                enqueue(&producer, &dlq_topic, &format!("{}:{}", origin.topic, origin.offset), &dlq_record(*kind, reason, origin, payload)).await?;
            }
            let cgm = if new_committed.is_empty() {
                None
            } else {
                Some(consumer.group_metadata().ok_or_else(|| TransformError::Kafka { context: "group metadata".into(), message: "not available".into() })?)
            };
            prof.produce += t.elapsed();
            // The offsets join this transaction and it commits off the loop's thread (both are
            // broker round trips); the next batch is read meanwhile and waits for this commit
            // before it begins its own transaction.
            let p = producer.clone();
            inflight = Some(tokio::task::spawn_blocking(move || {
                if let Some(cgm) = cgm {
                    p.send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT).map_err(|e| TransformError::kafka("adding offsets to the transaction", e))?;
                }
                p.commit_transaction(TXN_TIMEOUT).map_err(|e| TransformError::kafka("committing a transaction", e))
            }));
            for (k, v) in new_committed {
                committed.insert(k, v);
            }
            let m = metrics();
            m.kafka_transactions.with_label_values(&["transform", ""]).inc();
            m.batch_latency.with_label_values(&["transform"]).observe(started.elapsed().as_secs_f64());
            let mut late_counts: HashMap<&str, u64> = HashMap::new();
            for o in &outputs {
                match o {
                    Out::Change { event, late, .. } => {
                        out_counts.bump(&event.site, event.table_str(), event.op.as_str());
                        if *late {
                            *late_counts.entry(&event.site).or_default() += 1;
                        }
                    }
                    Out::Hq(h) => match **h {
                        HqEvent::Merge { .. } => m.merges.inc(),
                        HqEvent::IdentityReview { .. } => m.identity_reviews.inc(),
                        HqEvent::Watermark { .. } | HqEvent::Aggregate { .. } | HqEvent::Change { .. } => {}
                    },
                }
            }
            out_counts.flush(|site, table, op, n| m.events_out.with_label_values(&["transform", site, table, op]).inc_by(n));
            for (site, n) in late_counts {
                m.late_events.with_label_values(&[site]).inc_by(n);
            }
            for (_, kind, _, _) in &dead {
                m.dead_lettered.with_label_values(&["transform", kind.as_str()]).inc();
            }
        }

        // Metrics and back-pressure.
        let m = metrics();
        let gwm = engine.global_watermark();
        if gwm > i64::MIN {
            m.global_watermark.set(gwm);
            m.watermark_delay.set(now_ms() - gwm);
        }
        m.identity_records.set(engine.identity.len() as i64);
        m.identity_bytes.set(engine.identity.approx_bytes() as i64);
        let (be, bb) = engine.buffered();
        m.buffered_events.set(be as i64);
        m.buffered_bytes.set(bb as i64);
        for (site, st) in &engine.sites {
            m.site_watermark.with_label_values(&[site]).set(st.max_ts);
            m.site_idle.with_label_values(&[site]).set(st.idle as i64);
        }
        // Back-pressure: when the buffer is full, only the slowest active site keeps flowing;
        // below half, everything flows again. The slowest site is never left paused (it is the
        // one the watermark waits for), and paused sites are not idle, only unread.
        let slowest = engine.sites.iter().filter(|(_, s)| !s.idle).min_by_key(|(_, s)| s.max_ts).map(|(n, _)| n.clone());
        let max = cfg.transform.max_buffered_events;
        // Pausing drops a partition's prefetched records (they are fetched again on resume), so
        // only the sites holding more than their share of the buffer are paused.
        let active = engine.sites.values().filter(|s| !s.idle).count().max(1);
        let share = max / active;
        let desired: HashSet<(String, i32)> = if engine.is_full() {
            let over = |t: &str| {
                let site = t.strip_prefix(&cdc_prefix).unwrap_or("");
                Some(site) != slowest.as_deref() && engine.sites.get(site).is_some_and(|s| s.buffered >= share)
            };
            consumed.keys().filter(|(t, _)| over(t)).chain(paused.iter()).filter(|(t, _)| Some(t.strip_prefix(&cdc_prefix).unwrap_or("")) != slowest.as_deref()).cloned().collect()
        } else if be < max / 2 {
            HashSet::new()
        } else {
            paused.iter().filter(|(t, _)| Some(t.strip_prefix(&cdc_prefix).unwrap_or("").to_string()) != slowest).cloned().collect()
        };
        let mut to_pause = TopicPartitionList::new();
        for (t, p) in desired.difference(&paused) {
            let _ = to_pause.add_partition(t, *p);
        }
        let mut to_resume = TopicPartitionList::new();
        for (t, p) in paused.difference(&desired) {
            let _ = to_resume.add_partition(t, *p);
        }
        if to_pause.count() > 0 {
            prof.pauses += 1;
            tracing::debug!(buffered = be, "buffer full: pausing the sites that are ahead");
            consumer.pause(&to_pause).map_err(|e| TransformError::kafka("pausing", e))?;
        }
        if to_resume.count() > 0 {
            consumer.resume(&to_resume).map_err(|e| TransformError::kafka("resuming", e))?;
        }
        paused = desired;
        let now = now_ms();
        for (t, _) in &paused {
            engine.touch(t.strip_prefix(&cdc_prefix).unwrap_or(""), now);
        }
        if finished {
            if let Some(h) = inflight.take() {
                await_commit(h).await?;
            }
            tracing::info!(
                merges = engine.merges,
                identities = engine.identity.len(),
                batches = prof.batches,
                pauses = prof.pauses,
                read_ms = prof.read.as_millis() as u64,
                commit_wait_ms = prof.commit_wait.as_millis() as u64,
                produce_ms = prof.produce.as_millis() as u64,
                "all site topics read to their end; done"
            );
            return Ok(());
        }
    }
}
