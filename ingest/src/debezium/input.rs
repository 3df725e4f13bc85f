//! The Debezium input's loop: read the topics, merge them into the site's order, send each
//! change in this project's envelope, commit with the position (see the module above for the
//! guarantee).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use omrs_core::clock::now_ms;
use omrs_core::config::{Config, DebeziumConfig, SiteConfig};
use omrs_core::dlq::{DeadKind, DeadRecord};
use omrs_core::envelope::{ChangeEvent, Source};
use omrs_core::metrics::metrics;
use omrs_core::model::Model;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value as J;

use super::build::{self, Miss};
use super::ids::Ids;
use super::order::{Key, Merge, Next};
use super::record::{self, DbzChange, DbzSource, Record};
use crate::checkpoint::{Checkpoint, Position};
use crate::producer::{Batch, TxProducer};
use crate::IngestError;

/// A lane with more records than this waiting is paused until it is down to half.
const LANE_CAP: usize = 20_000;
/// At most this many changes per Kafka transaction.
const BATCH_EVENTS: usize = 20_000;
/// A batch is committed once its first change is this old.
const BATCH_AGE: Duration = Duration::from_millis(200);
/// How often the topics are listed again (a table created at the clinic gets a topic).
const DISCOVER_EVERY: Duration = Duration::from_secs(5);
/// A quiet site's heartbeats at most this often.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Where a run starts: the checkpoint's position.
#[derive(Default)]
pub struct Resume {
    pub offsets: BTreeMap<String, i64>,
    pub position: Option<Position>,
    pub ts_ms: i64,
}

/// What waits in a lane.
enum Pending {
    Change { table: String, change: DbzChange, raw: Vec<u8> },
    Ddl { ddl: String, database: String, source: DbzSource },
    /// An offset with nothing to send (a tombstone, a truncate): only the position moves.
    Skip,
    Dead { kind: DeadKind, reason: String, raw: Vec<u8> },
}

struct Lane {
    topic: String,
    partition: i32,
    /// The table of a table topic; None for the schema-change topic.
    table: Option<String>,
    /// The key of the lane's last record: a skipped record goes right after it.
    last_key: Key,
    paused: bool,
}

pub struct Input<'a> {
    cfg: &'a Config,
    site: &'a SiteConfig,
    dbz: DebeziumConfig,
    model: Model,
    targets: HashSet<String>,
    /// Each table's place in the model's dependency order (parents first).
    ranks: HashMap<String, u32>,
    ids: Ids,
    producer: TxProducer,
    dlq_topic: String,
    main: BaseConsumer,
    ahead: BaseConsumer,
    lanes: Vec<Lane>,
    by_tp: HashMap<(String, i32), usize>,
    /// Read-ahead lanes (referenced tables): table, next offset.
    ahead_lanes: HashMap<(String, i32), (String, i64)>,
    heartbeat_tp: Option<(String, i32)>,
    merge: Merge<Pending>,
    offsets: BTreeMap<String, i64>,
    position: Option<Position>,
    ts_ms: i64,
    server_id: u32,
    batch: Batch,
    batch_since: Option<Instant>,
    /// Offsets moved (or dead letters written) since the last commit.
    dirty: bool,
    /// The change waiting for a row it names: which, and since when.
    miss: Option<(usize, i64, Miss, Instant)>,
    /// The connector's latest heartbeat time, and when it arrived.
    heartbeat: Option<(i64, Instant)>,
    heartbeat_sent: Instant,
    snapshot_rows: u32,
    sent: u64,
    /// A binlog change has been sent (the snapshot's topics are all known by then).
    streaming: bool,
}

impl<'a> Input<'a> {
    pub fn new(cfg: &'a Config, site: &'a SiteConfig, dbz: DebeziumConfig, model: Model, ids: Ids, producer: TxProducer, resume: Resume) -> Result<Self, IngestError> {
        let kafka = dbz.kafka.clone().unwrap_or_else(|| cfg.kafka.clone());
        let consumer = |role: &str| -> Result<BaseConsumer, IngestError> {
            omrs_core::kafka::client_config(&kafka)
                .set("group.id", format!("omrs-debezium-{}-{role}", site.name))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("enable.partition.eof", "false")
                .create()
                .map_err(|e| IngestError::kafka("creating the Debezium topics' consumer", e))
        };
        let fresh = resume.offsets.is_empty();
        let mut input = Input {
            targets: build::targets(&model),
            ranks: ranks(&model),
            merge: Merge::new(dbz.order_grace_ms),
            dlq_topic: TopicNames::new(cfg.kafka.topic_prefix.clone()).dlq(),
            main: consumer("main")?,
            ahead: consumer("ahead")?,
            cfg,
            site,
            dbz,
            model,
            ids,
            producer,
            lanes: Vec::new(),
            by_tp: HashMap::new(),
            ahead_lanes: HashMap::new(),
            heartbeat_tp: None,
            offsets: resume.offsets,
            position: resume.position,
            ts_ms: resume.ts_ms,
            server_id: 0,
            batch: Batch::default(),
            batch_since: None,
            dirty: false,
            miss: None,
            heartbeat: None,
            heartbeat_sent: Instant::now(),
            snapshot_rows: 0,
            sent: 0,
            streaming: false,
        };
        if fresh {
            input.base_shapes();
        }
        Ok(input)
    }

    /// From the topics' beginning: every table's shape ([`crate::schema::base_shape`]) goes
    /// ahead of the first rows, in their transaction.
    fn base_shapes(&mut self) {
        let now = now_ms();
        for (i, name) in self.model.order.iter().enumerate() {
            let Some(table) = self.model.table(name) else { continue };
            let shape = crate::schema::base_shape(table, &self.cfg.ingest.scrub);
            let at = Source { server_id: 0, gtid: None, file: String::new(), pos: 0, row: i as u32, ts_ms: now, snapshot: true };
            self.batch.push_event(&ChangeEvent::schema(self.site.name.clone(), shape, at, now));
        }
        self.batch_since.get_or_insert_with(Instant::now);
    }

    pub async fn run(&mut self, until_caught_up: bool, quiet: bool) -> Result<(), IngestError> {
        // A connector that has only just started has no topics yet: wait for them, saying
        // what is expected (a wrong topic_prefix waits here too, and says so).
        let waiting_since = Instant::now();
        let mut said = None::<Instant>;
        loop {
            self.discover()?;
            if !self.lanes.is_empty() || omrs_core::stop::requested() {
                break;
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                tracing::warn!(
                    site = %self.site.name,
                    waited_s = waiting_since.elapsed().as_secs(),
                    schema_topic = %self.dbz.topic_prefix,
                    table_topics = %self.dbz.table_topic(self.site, "<table>"),
                    bootstrap = %self.dbz.kafka.as_ref().unwrap_or(&self.cfg.kafka).bootstrap_servers,
                    "no Debezium topic of this site yet; waiting for the connector (check [sites.debezium] topic_prefix and database if it is running)"
                );
                said = Some(Instant::now());
            }
            omrs_core::endpoint::beat();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let goal = if until_caught_up { Some(self.ends()?) } else { None };
        let mut discovered = Instant::now();
        let mut logged = Instant::now();
        loop {
            self.read_ahead()?;
            let read = self.read(Duration::from_millis(if self.merge.is_empty() { 50 } else { 5 }))?;
            self.emit().await?;
            self.maybe_heartbeat();
            self.maybe_commit(read == 0).await?;
            omrs_core::endpoint::beat();
            if omrs_core::stop::requested() {
                self.commit().await?;
                self.producer.wait().await?;
                tracing::info!(site = %self.site.name, sent = self.sent, "stopped; the Debezium input resumes from its checkpoint");
                return Ok(());
            }
            if let Some(goal) = &goal {
                if self.merge.is_empty() && goal.iter().all(|(tp, end)| self.offsets.get(tp).copied().unwrap_or(0) >= *end) {
                    self.commit().await?;
                    self.producer.wait().await?;
                    tracing::info!(site = %self.site.name, sent = self.sent, "caught up with the Debezium topics");
                    return Ok(());
                }
            }
            if discovered.elapsed() >= DISCOVER_EVERY {
                self.discover()?;
                discovered = Instant::now();
            }
            if logged.elapsed() >= Duration::from_secs(10) {
                if !quiet {
                    tracing::info!(site = %self.site.name, sent = self.sent, waiting = self.merge.len(), lanes = self.lanes.len(), ids = self.ids.len(), "Debezium input");
                }
                logged = Instant::now();
            }
        }
    }

    /// Lists the source cluster's topics and takes on every partition of this site's not read yet.
    fn discover(&mut self) -> Result<(), IngestError> {
        let md = self.main.fetch_metadata(None, Duration::from_secs(30)).map_err(|e| IngestError::kafka("listing the Debezium topics", e))?;
        let table_prefix = format!("{}.{}.", self.dbz.topic_prefix, self.dbz.database(self.site));
        let heartbeats = self.dbz.heartbeats();
        let mut main_new = TopicPartitionList::new();
        let mut ahead_new = TopicPartitionList::new();
        for t in md.topics() {
            let name = t.name();
            let table = match name.strip_prefix(&table_prefix) {
                Some(table) if self.model.table(table).is_some() => Some(table.to_string()),
                Some(_) => continue,
                None if name == self.dbz.topic_prefix || name == heartbeats => None,
                None => continue,
            };
            for p in t.partitions() {
                let tp = (name.to_string(), p.id());
                if self.by_tp.contains_key(&tp) || self.heartbeat_tp.as_ref() == Some(&tp) {
                    continue;
                }
                let from = self.offsets.get(&tp_key(name, p.id())).copied().unwrap_or(0);
                let offset = Offset::Offset(from);
                add(&mut main_new, name, p.id(), offset)?;
                if name == heartbeats {
                    self.heartbeat_tp = Some(tp);
                    continue;
                }
                if let Some(table) = table.as_ref().filter(|t| self.targets.contains(*t)) {
                    add(&mut ahead_new, name, p.id(), offset)?;
                    self.ahead_lanes.insert(tp.clone(), (table.clone(), from));
                }
                let lane = self.merge.add_lane(from);
                self.lanes.push(Lane { topic: name.to_string(), partition: p.id(), table: table.clone(), last_key: Key::Snapshot { rank: 0, offset: -1 }, paused: false });
                self.by_tp.insert(tp, lane);
                tracing::debug!(site = %self.site.name, topic = name, partition = p.id(), from, "reading a Debezium topic");
            }
        }
        if main_new.count() > 0 {
            self.main.incremental_assign(&main_new).map_err(|e| IngestError::kafka("assigning the Debezium topics", e))?;
        }
        if ahead_new.count() > 0 {
            self.ahead.incremental_assign(&ahead_new).map_err(|e| IngestError::kafka("assigning the Debezium topics (read-ahead)", e))?;
        }
        Ok(())
    }

    /// Every lane's end now (for --until-caught-up).
    fn ends(&self) -> Result<Vec<(String, i64)>, IngestError> {
        let mut out = Vec::new();
        for l in &self.lanes {
            let (_, high) = self.main.fetch_watermarks(&l.topic, l.partition, Duration::from_secs(30)).map_err(|e| IngestError::kafka(&format!("reading the end of {}", l.topic), e))?;
            out.push((tp_key(&l.topic, l.partition), high));
        }
        Ok(out)
    }

    /// Reads what the main consumer has, waiting up to `wait` for the first record.
    fn read(&mut self, wait: Duration) -> Result<usize, IngestError> {
        let mut n = 0;
        let mut timeout = wait;
        while n < 5_000 {
            let Some(msg) = self.main.poll(timeout) else { break };
            timeout = Duration::ZERO;
            let msg = msg.map_err(|e| IngestError::kafka("reading the Debezium topics", e))?;
            let tp = (msg.topic().to_string(), msg.partition());
            n += 1;
            if self.heartbeat_tp.as_ref() == Some(&tp) {
                if let Some(ts) = msg.payload().and_then(heartbeat_ts) {
                    self.heartbeat = Some((ts, Instant::now()));
                }
                self.offsets.insert(tp_key(&tp.0, tp.1), msg.offset() + 1);
                continue;
            }
            let Some(&lane) = self.by_tp.get(&tp) else { continue };
            let (offset, payload) = (msg.offset(), msg.payload().map(<[u8]>::to_vec));
            drop(msg);
            let expected = self.merge.next_offset(lane);
            // One missing offset is a transaction marker (Connect with exactly.once.support);
            // more are records the topic no longer has (retention, compaction).
            if offset > expected + 1 {
                let l = &self.lanes[lane];
                tracing::warn!(site = %self.site.name, topic = %l.topic, partition = l.partition, from = expected, to = offset, "offsets missing from a Debezium topic (retention or compaction removed them): those changes of the clinic are not in the stream; if they mattered, have the connector take a new snapshot");
            }
            self.push(lane, offset, payload);
        }
        for i in 0..self.lanes.len() {
            let l = &self.lanes[i];
            if let Some(high) = cached_end(&self.main, &l.topic, l.partition) {
                self.merge.set_end(i, high);
            }
            self.pace(i)?;
        }
        Ok(n)
    }

    /// Pauses a lane with too much waiting, resumes it at half.
    fn pace(&mut self, lane: usize) -> Result<(), IngestError> {
        let waiting = self.merge.waiting(lane);
        let l = &mut self.lanes[lane];
        let (pause, resume) = (!l.paused && waiting > LANE_CAP, l.paused && waiting < LANE_CAP / 2);
        if !pause && !resume {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&l.topic, l.partition);
        if pause {
            self.main.pause(&tpl).map_err(|e| IngestError::kafka("pausing a Debezium topic", e))?;
            l.paused = true;
        } else {
            self.main.resume(&tpl).map_err(|e| IngestError::kafka("resuming a Debezium topic", e))?;
            l.paused = false;
        }
        Ok(())
    }

    /// One record of a lane into the merge.
    fn push(&mut self, lane: usize, offset: i64, payload: Option<Vec<u8>>) {
        let now = now_ms();
        let table = self.lanes[lane].table.clone();
        let parsed = record::parse(payload.as_deref());
        let (key, pending) = match parsed {
            Ok(Record::Change(change)) => {
                let Some(table) = table else {
                    let reason = "a row change in the schema-change topic".to_string();
                    self.push_dead(lane, offset, now, DeadKind::InvalidRecord, reason, payload);
                    return;
                };
                let key = if change.source.snapshot {
                    Key::Snapshot { rank: self.ranks.get(&table).copied().unwrap_or(u32::MAX), offset }
                } else {
                    binlog_key(&change.source)
                };
                (key, Pending::Change { table, change, raw: payload.unwrap_or_default() })
            }
            // The snapshot's DDL states the tables as they were; the model has them already.
            Ok(Record::Ddl { source, .. }) if source.snapshot => (self.lanes[lane].last_key.clone(), Pending::Skip),
            Ok(Record::Ddl { ddl, database, source }) => (binlog_key(&source), Pending::Ddl { ddl, database, source }),
            Ok(Record::Skip(_)) => (self.lanes[lane].last_key.clone(), Pending::Skip),
            Err(reason) => {
                self.push_dead(lane, offset, now, DeadKind::InvalidRecord, format!("not a Debezium change record: {reason}"), payload);
                return;
            }
        };
        self.lanes[lane].last_key = key.clone();
        self.merge.push(lane, key, offset, now, pending);
    }

    fn push_dead(&mut self, lane: usize, offset: i64, now: i64, kind: DeadKind, reason: String, payload: Option<Vec<u8>>) {
        let key = self.lanes[lane].last_key.clone();
        self.merge.push(lane, key, offset, now, Pending::Dead { kind, reason, raw: payload.unwrap_or_default() });
    }

    /// Learns ids from the referenced tables' topics ahead of the merge.
    fn read_ahead(&mut self) -> Result<(), IngestError> {
        for _ in 0..5_000 {
            let Some(msg) = self.ahead.poll(Duration::ZERO) else { break };
            let msg = msg.map_err(|e| IngestError::kafka("reading the Debezium topics ahead", e))?;
            let tp = (msg.topic().to_string(), msg.partition());
            let Some((table, next)) = self.ahead_lanes.get_mut(&tp) else { continue };
            *next = msg.offset() + 1;
            let Some(t) = self.model.table(table) else { continue };
            let (Some(pk), Some(payload)) = (t.int_pk(), msg.payload()) else { continue };
            if let Some((id, uuid)) = record::row_id(payload, pk) {
                let table = t.name.clone();
                self.ids.learn(&table, id, &uuid, false);
            }
        }
        Ok(())
    }

    /// True when the read-ahead has reached every referenced table's end.
    fn ahead_caught_up(&self) -> bool {
        self.ahead_lanes.iter().all(|((topic, p), (_, next))| cached_end(&self.ahead, topic, *p).is_some_and(|high| *next >= high))
    }

    /// Sends every change the merge lets go.
    async fn emit(&mut self) -> Result<(), IngestError> {
        for _ in 0..BATCH_EVENTS {
            let (lane, item) = match self.merge.next(now_ms()) {
                Next::Ready(lane, item) => (lane, item),
                Next::WaitUntil(_) | Next::Blocked => return Ok(()),
            };
            let offset = item.offset;
            if !self.streaming && matches!(item.key, Key::Binlog { .. }) {
                // Connect creates a table's topic before its first record: once a binlog change
                // exists, every snapshot topic does. Those listed since the last look go first.
                self.streaming = true;
                self.merge.unread(lane, item);
                self.discover()?;
                return Ok(());
            }
            match item.value {
                Pending::Change { table, change, raw } => {
                    match self.change(lane, offset, &table, &change, &raw).await? {
                        true => {}
                        false => {
                            let value = Pending::Change { table, change, raw };
                            self.merge.unread(lane, super::order::Item { value, ..item });
                            return Ok(());
                        }
                    }
                }
                Pending::Ddl { ddl, database, source } => self.ddl(&ddl, &database, &source).await?,
                Pending::Skip => {}
                Pending::Dead { kind, reason, raw } => self.dead(lane, offset, kind, &reason, &raw).await?,
            }
            let l = &self.lanes[lane];
            self.offsets.insert(tp_key(&l.topic, l.partition), offset + 1);
            self.dirty = true;
            if self.batch.len() >= BATCH_EVENTS {
                self.commit().await?;
            }
        }
        Ok(())
    }

    /// Sends one row change; false when it must wait for a row it names.
    async fn change(&mut self, lane: usize, offset: i64, table: &str, c: &DbzChange, raw: &[u8]) -> Result<bool, IngestError> {
        let Some(t) = self.model.table(table).cloned() else {
            let reason = format!("table `{table}` is not in the table model (dropped at the clinic, or excluded)");
            self.dead(lane, offset, DeadKind::UnknownTable, &reason, raw).await?;
            return Ok(true);
        };
        let scrub = crate::convert::scrubbed(&t, &self.cfg.ingest.scrub);
        if c.source.snapshot {
            self.snapshot_rows = self.snapshot_rows.wrapping_add(1);
        }
        let built = build::event(&self.site.name, &self.model, &self.ids, &t, c, &scrub, self.snapshot_rows);
        let ev = match built {
            Err(reason) => {
                self.dead(lane, offset, DeadKind::BadValue, &reason, raw).await?;
                return Ok(true);
            }
            Ok(Err(miss)) => return self.missed(lane, offset, table, miss, raw).await,
            Ok(Ok(ev)) => ev,
        };
        self.miss = None;
        if let Some(img) = c.after.as_ref() {
            build::learn(&mut self.ids, &t, img, true);
        }
        self.server_id = c.source.server_id;
        self.position = Some(Position { file: c.source.file.clone(), pos: c.source.pos, gtid: c.source.gtid.clone(), gtid_set: None });
        self.ts_ms = self.ts_ms.max(c.source.ts_ms);
        metrics().events_in.with_label_values(&["ingest", &self.site.name, table, c.op.as_str()]).inc();
        self.batch.push_event(&ev);
        self.batch_since.get_or_insert_with(Instant::now);
        self.sent += 1;
        Ok(true)
    }

    /// A change names a row not seen yet: wait for it (the read-ahead may bring it), up to
    /// `ref_wait_ms` once the read-ahead has reached the end; then dead-letter the change.
    async fn missed(&mut self, lane: usize, offset: i64, table: &str, miss: Miss, raw: &[u8]) -> Result<bool, IngestError> {
        let since = match &self.miss {
            Some((l, o, m, since)) if *l == lane && *o == offset && *m == miss => *since,
            _ => {
                tracing::debug!(site = %self.site.name, table, column = %miss.column, id = miss.id, ref_table = %miss.ref_table, "waiting for a referenced row");
                Instant::now()
            }
        };
        let caught_up = self.ahead_caught_up();
        let since = if caught_up { since } else { Instant::now() };
        if since.elapsed() < Duration::from_millis(self.dbz.ref_wait_ms) {
            self.miss = Some((lane, offset, miss, since));
            return Ok(false);
        }
        self.miss = None;
        let reason = format!(
            "{table}.{} = {} names a row of {} that the Debezium topics never held (waited {} ms; ref_wait_ms)",
            miss.column, miss.id, miss.ref_table, self.dbz.ref_wait_ms
        );
        metrics().unresolved_refs.with_label_values(&[&self.site.name, table]).inc();
        self.dead(lane, offset, DeadKind::UnresolvedReference, &reason, raw).await?;
        Ok(true)
    }

    /// A DDL at the clinic: the model follows it, and each changed table's new shape is sent
    /// ahead of the rows that have it (`op:"s"`), and kept in the checkpoint topic.
    async fn ddl(&mut self, ddl: &str, database: &str, source: &DbzSource) -> Result<(), IngestError> {
        let db = self.dbz.database(self.site).to_string();
        let scope = crate::schema::Scope { db: &db, default: database };
        let include = self.cfg.ingest.include.clone();
        let exclude = self.cfg.ingest.exclude.clone();
        let captured = move |t: &str| (include.is_empty() || include.iter().any(|i| i == t)) && !exclude.iter().any(|e| e == t);
        let position = Position { file: source.file.clone(), pos: source.pos, gtid: source.gtid.clone(), gtid_set: None };
        let changed = match crate::schema::apply_ddl(&mut self.model, scope, ddl, &captured) {
            Ok(crate::schema::Applied::Tables(changed)) => changed,
            Ok(crate::schema::Applied::Nothing) => return Ok(()),
            Err(e) => {
                metrics().schema_changes.with_label_values(&[&self.site.name, "not_followed"]).inc();
                tracing::error!(site = %self.site.name, ddl, error = %e, "a DDL the Debezium input cannot follow: the tables it changed keep their former columns in the model");
                return Ok(());
            }
        };
        let mut records = Vec::new();
        for (i, name) in changed.iter().enumerate() {
            let schema = match self.model.table(name) {
                Some(t) => crate::schema::TableSchema::of(t, &position, Some(ddl)),
                None => crate::schema::TableSchema::dropped(name, &position, ddl),
            };
            let at = Source { server_id: source.server_id, gtid: source.gtid.clone(), file: source.file.clone(), pos: source.pos, row: i as u32, ts_ms: source.ts_ms, snapshot: false };
            self.batch.push_event(&ChangeEvent::schema(self.site.name.clone(), schema.shape.clone(), at, now_ms()));
            self.batch_since.get_or_insert_with(Instant::now);
            records.push(schema.record());
        }
        metrics().schema_changes.with_label_values(&[&self.site.name, "applied"]).inc();
        tracing::info!(site = %self.site.name, tables = ?changed, "schema change followed from the Debezium topics");
        self.targets = build::targets(&self.model);
        self.ranks = ranks(&self.model);
        self.producer.aside(records).await
    }

    async fn dead(&mut self, lane: usize, offset: i64, kind: DeadKind, reason: &str, raw: &[u8]) -> Result<(), IngestError> {
        let l = &self.lanes[lane];
        tracing::warn!(site = %self.site.name, topic = %l.topic, partition = l.partition, offset, kind = kind.as_str(), reason, "dead-lettered a Debezium record; the site goes on");
        let d = DeadRecord { stage: "ingest", kind, reason, topic: &l.topic, partition: l.partition, offset, payload: raw };
        let value = d.to_json(now_ms());
        metrics().dead_lettered.with_label_values(&["ingest", kind.as_str()]).inc();
        self.dirty = true;
        self.producer.dead(self.dlq_topic.clone(), value).await
    }

    /// A quiet site's heartbeat, at the connector's latest heartbeat time, once everything
    /// before it is sent.
    fn maybe_heartbeat(&mut self) {
        let Some((ts, arrived)) = self.heartbeat else { return };
        let Some(position) = &self.position else { return };
        let quiet = self.merge.is_empty() && self.merge.all_read() && self.batch.is_empty();
        if !quiet || ts <= self.ts_ms || arrived.elapsed() < Duration::from_millis(self.dbz.order_grace_ms) || self.heartbeat_sent.elapsed() < HEARTBEAT_EVERY {
            return;
        }
        let source = Source { server_id: self.server_id, gtid: position.gtid.clone(), file: position.file.clone(), pos: position.pos, row: 0, ts_ms: ts, snapshot: false };
        self.batch.push_event(&ChangeEvent::heartbeat(self.site.name.clone(), source, now_ms()));
        self.batch_since.get_or_insert_with(Instant::now);
        self.ts_ms = ts;
        self.heartbeat_sent = Instant::now();
    }

    async fn maybe_commit(&mut self, idle: bool) -> Result<(), IngestError> {
        let old = self.batch_since.is_some_and(|t| t.elapsed() >= BATCH_AGE);
        if old || (idle && (self.dirty || !self.batch.is_empty())) {
            self.commit().await?;
        }
        Ok(())
    }

    /// Ends the Kafka transaction: the changes, the ids learned from them, the position.
    async fn commit(&mut self) -> Result<(), IngestError> {
        if self.batch.is_empty() && !self.dirty {
            return Ok(());
        }
        self.producer.aside(self.ids.take_fresh(&self.site.name)).await?;
        let batch = std::mem::replace(&mut self.batch, self.producer.batch());
        let cp = Checkpoint::Debezium { offsets: self.offsets.clone(), position: self.position.clone(), ts_ms: self.ts_ms };
        self.producer.send(batch, cp).await?;
        self.batch_since = None;
        self.dirty = false;
        Ok(())
    }
}

/// A partition's end as the consumer last saw it in a fetch response, without a request
/// (librdkafka's `rd_kafka_get_watermark_offsets`, which rust-rdkafka does not wrap): checked
/// for every lane on every turn of the loop, where `fetch_watermarks` would ask the broker.
fn cached_end(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is; `topic` is NUL-terminated and
    // outlives the call; `low` and `high` are valid for writes. The call only reads librdkafka's
    // cached partition state under its own lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high)
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

fn ranks(model: &Model) -> HashMap<String, u32> {
    model.order.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

fn tp_key(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

fn add(tpl: &mut TopicPartitionList, topic: &str, partition: i32, offset: Offset) -> Result<(), IngestError> {
    tpl.add_partition_offset(topic, partition, offset).map_err(|e| IngestError::kafka(&format!("assigning {topic}"), e))
}

fn binlog_key(s: &DbzSource) -> Key {
    Key::Binlog { file: s.file.clone(), pos: s.pos, row: s.row }
}

/// The time of a Debezium heartbeat record (`{"ts_ms":…}`, with or without schemas).
fn heartbeat_ts(payload: &[u8]) -> Option<i64> {
    let v: J = serde_json::from_slice(payload).ok()?;
    v.get("payload").unwrap_or(&v).get("ts_ms")?.as_i64()
}
