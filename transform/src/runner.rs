//! The Kafka loop of the transform: pattern subscription to every site topic, read_committed
//! consumption, and one Kafka transaction per batch holding the output events, the changelog
//! facts, dead letters and the consumer offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use omrs_core::config::Config;
use omrs_core::envelope::ChangeEvent;
use omrs_core::kafka::client_config;
use omrs_core::metrics::metrics;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::engine::{Engine, EngineConfig, Fact, HqEvent, Origin};
use crate::{TransformArgs, TransformError};

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        out_of_orderness_ms: cfg.transform.out_of_orderness_ms as i64,
        idle_timeout_ms: cfg.transform.idle_timeout_s as i64 * 1000,
        max_buffered: cfg.transform.max_buffered_events,
        identifiers: cfg.identity.identifiers.clone(),
    }
}

/// Runs until `--until-idle` is satisfied, or forever; transient errors restart from the last
/// committed transaction.
pub async fn run(cfg: &Config, args: &TransformArgs) -> Result<(), TransformError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_once(cfg, args).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "transient error; restarting from the last committed transaction");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the compacted changelog to its end (read_committed) and replays it into the engine.
fn restore(cfg: &Config, topic: &str, engine: &mut Engine) -> Result<usize, TransformError> {
    let mut facts: BTreeMap<String, Fact> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    omrs_core::kafka::read_to_end(&cfg.kafka, topic, |_, payload, _| {
        let f: Fact = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let k = f.key();
        if facts.insert(k.clone(), f).is_none() {
            order.push(k);
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
    Ok(n)
}

/// Parses and checks one input record; Err is the dead-letter reason.
pub fn decode(payload: &[u8], topic: &str, cdc_prefix: &str) -> Result<ChangeEvent, String> {
    let site_of_topic = topic.strip_prefix(cdc_prefix).unwrap_or("");
    let ev = ChangeEvent::from_json(payload).map_err(|e| e.to_string())?;
    if ev.site != site_of_topic {
        return Err(format!("unknown site `{}` on topic {topic} (expected `{site_of_topic}`)", ev.site));
    }
    Ok(ev)
}

fn dlq_record(reason: &str, origin: &Origin, payload: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "stage": "transform",
        "reason": reason,
        "topic": origin.topic,
        "partition": origin.partition,
        "offset": origin.offset,
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload),
        "payload_text": std::str::from_utf8(payload).ok(),
        "ts_ms": now_ms(),
    }))
    .unwrap_or_default()
}

async fn await_commit(h: tokio::task::JoinHandle<rdkafka::error::KafkaResult<()>>) -> Result<(), TransformError> {
    h.await
        .map_err(|e| TransformError::Kafka { context: "committing".into(), message: e.to_string() })?
        .map_err(|e| TransformError::kafka("committing a transaction", e))
}

async fn enqueue(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) -> Result<(), TransformError> {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
            Ok(_) => return Ok(()),
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
    let cdc_prefix = format!("{}omrs.cdc.", cfg.kafka.topic_prefix);

    let producer: FutureProducer = client_config(&cfg.kafka)
        .set("transactional.id", format!("{}omrs-transform", cfg.kafka.topic_prefix))
        .set("transaction.timeout.ms", "60000")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .map_err(|e| TransformError::kafka("creating the producer", e))?;
    producer.init_transactions(TXN_TIMEOUT).map_err(|e| TransformError::kafka("initialising transactions", e))?;

    let mut engine = Engine::new(engine_config(cfg));
    let restored = restore(cfg, &state_topic, &mut engine)?;
    let now = now_ms();
    for s in engine.sites.values_mut() {
        s.last_seen = now;
    }
    for site in cfg.site_names() {
        engine.expect_site(&site, now);
    }
    tracing::info!(facts = restored, identities = engine.identity.len(), "state restored");

    let consumer: StreamConsumer = client_config(&cfg.kafka)
        .set("group.id", format!("{}omrs-transform", cfg.kafka.topic_prefix))
        // Static membership: a restarted transform takes its place at once instead of waiting
        // for the killed one's session to time out.
        .set("group.instance.id", format!("{}omrs-transform-1", cfg.kafka.topic_prefix))
        .set("session.timeout.ms", "10000")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", "52428800")
        // Prefetch per partition; the default (64 MiB each) dominated memory with many sites.
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .map_err(|e| TransformError::kafka("creating the consumer", e))?;
    consumer.subscribe(&[&names.cdc_pattern()]).map_err(|e| TransformError::kafka("subscribing to the site topics", e))?;

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
    let mut inflight: Option<tokio::task::JoinHandle<rdkafka::error::KafkaResult<()>>> = None;
    let mut in_counts: HashMap<(String, String, &'static str), u64> = HashMap::new();
    loop {
        let started = Instant::now();
        let mut outputs: Vec<HqEvent> = Vec::new();
        let mut dead: Vec<(Origin, String, Vec<u8>)> = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut n = 0;
        let mut now = now_ms();
        while n < 20_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let msg = match tokio::time::timeout(left, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(TransformError::kafka("consuming", e)),
                Ok(Ok(m)) => m,
            };
            n += 1;
            if n % 512 == 0 {
                now = now_ms();
            }
            let origin = Origin { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset() };
            consumed.insert((origin.topic.clone(), origin.partition), origin.offset);
            // Decode from the borrowed record; the bytes are copied only for a dead letter.
            let payload = msg.payload().unwrap_or(&[]);
            let decoded = decode(payload, &origin.topic, &cdc_prefix).map_err(|reason| (reason, payload.to_vec()));
            drop(msg);
            match decoded {
                Err((reason, payload)) => dead.push((origin, reason, payload)),
                Ok(ev) => {
                    *in_counts.entry((ev.site.clone(), ev.table.clone().unwrap_or_default(), ev.op.as_str())).or_default() += 1;
                    outputs.extend(engine.push(ev, origin, now));
                }
            }
        }
        outputs.extend(engine.tick(now_ms()));
        for ((site, table, op), n) in in_counts.drain() {
            metrics().events_in.with_label_values(&["transform", &site, &table, op]).inc_by(n);
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

        // Offsets: up to what was emitted.
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
        let mut facts = engine.take_facts();
        if !outputs.is_empty() || !new_committed.is_empty() {
            facts.extend(engine.watermark_facts());
        }
        if !outputs.is_empty() || !dead.is_empty() || !facts.is_empty() || !new_committed.is_empty() {
            // The previous transaction's commit ran while this batch was read and transformed.
            if let Some(h) = inflight.take() {
                await_commit(h).await?;
            }
            producer.begin_transaction().map_err(|e| TransformError::kafka("beginning a transaction", e))?;
            for o in &outputs {
                enqueue(&producer, &out_topic, &o.key(), &o.to_json()).await?;
            }
            for f in &facts {
                enqueue(&producer, &state_topic, &f.key(), &serde_json::to_vec(f).unwrap_or_default()).await?;
            }
            for (origin, reason, payload) in &dead {
                tracing::warn!(topic = %origin.topic, offset = origin.offset, reason = %reason, "record dead-lettered");
                enqueue(&producer, &dlq_topic, &format!("{}:{}", origin.topic, origin.offset), &dlq_record(reason, origin, payload)).await?;
            }
            if !new_committed.is_empty() {
                let cgm = consumer.group_metadata().ok_or_else(|| TransformError::Kafka { context: "group metadata".into(), message: "not available".into() })?;
                producer.send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT).map_err(|e| TransformError::kafka("adding offsets to the transaction", e))?;
            }
            let p = producer.clone();
            inflight = Some(tokio::task::spawn_blocking(move || p.commit_transaction(TXN_TIMEOUT)));
            for (k, v) in new_committed {
                committed.insert(k, v);
            }
            let m = metrics();
            m.kafka_transactions.with_label_values(&["transform", ""]).inc();
            m.batch_latency.with_label_values(&["transform"]).observe(started.elapsed().as_secs_f64());
            let mut out_counts: HashMap<(String, String, &'static str), u64> = HashMap::new();
            let mut late_counts: HashMap<String, u64> = HashMap::new();
            for o in &outputs {
                match o {
                    HqEvent::Change { event, late, .. } => {
                        *out_counts.entry((event.site.clone(), event.table.clone().unwrap_or_default(), event.op.as_str())).or_default() += 1;
                        if *late {
                            *late_counts.entry(event.site.clone()).or_default() += 1;
                        }
                    }
                    HqEvent::Merge { .. } => m.merges.inc(),
                    HqEvent::IdentityReview { .. } => m.identity_reviews.inc(),
                }
            }
            for ((site, table, op), n) in out_counts {
                m.events_out.with_label_values(&["transform", &site, &table, op]).inc_by(n);
            }
            for (site, n) in late_counts {
                m.late_events.with_label_values(&[&site]).inc_by(n);
            }
            for (_, reason, _) in &dead {
                let kind = reason.split(':').next().unwrap_or("invalid").chars().take(40).collect::<String>();
                m.dead_lettered.with_label_values(&["transform", &kind]).inc();
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
        let desired: HashSet<(String, i32)> = if engine.is_full() {
            consumed.keys().filter(|(t, _)| Some(t.strip_prefix(&cdc_prefix).unwrap_or("").to_string()) != slowest).cloned().collect()
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
            tracing::info!(merges = engine.merges, identities = engine.identity.len(), "all site topics read to their end; done");
            return Ok(());
        }
    }
}
