//! `omrs-stream sink parquet`: the analytics lake.
//!
//! Delivery guarantee: **exactly once** into the lake's change history. Records of
//! `omrs.hq.changes` are buffered per (table, site, event date) and written as zstd Parquet
//! files under `_tmp/`, fsynced, then committed by one manifest entry that names the files and
//! the Kafka offsets after them ([`lake`]); on start the sink rolls the last commit forward,
//! deletes uncommitted temp files and seeks to the manifest's offsets (never to a group's).
//! The sink holds the lake's writer lock ([`lake::LakeLock`]) for its whole life; `--compact`
//! takes it too, so it is refused while a sink runs on the lake instead of deleting that sink's
//! uncommitted temp files.
//! Dead letters go to `omrs.dlq` before the entry commits: at least once, never lost.
//!
//! The current state (`current/<table>`) and the flattened views (`views/<name>`) are rebuilt
//! by [`compact`] from the previous snapshot plus the files committed since, and published by
//! an atomic symlink swap: readers see the old snapshot or the new one, never a mix. A
//! scheduled compaction runs on a thread of its own beside the loop, from a copy of the
//! manifest's state: the lake's commits go on while it runs.
//!
//! Failure behaviour: the broker away or the disk refusing writes (full, read-only) is
//! transient: the open file set is dropped and the sink retries from the last commit with
//! backoff; the process does not exit. A record that cannot be typed goes to the DLQ with the
//! column and the value named, and the rest of its batch is written.

pub mod aggregates;
pub mod compact;
pub mod fast;
pub mod lake;
pub mod reviews;
pub mod schema;
pub mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use omrs_core::clock::{now_ms, retry_transient};
use omrs_core::config::Config;
use omrs_core::dlq::DeadKind;
use omrs_core::hq::HqEvent;
use omrs_core::metrics::metrics;
use omrs_core::topics::TopicNames;
use omrs_core::zone::SiteRules;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset};

use crate::kafka::DeadLetter;
use crate::SinkError;
use lake::{date_of, failpoint, Entry, FileEntry, Lake, LakeLock, PartKey, State, Writer};
use schema::{convert, LakeSchemaFile, LakeTable};
use write::PartBuf;

/// The dataset of merge events, next to the tables' change history.
pub const MERGE_TABLE: &str = "omrs_merge";

/// `omrs-stream sink parquet`: write omrs.hq.changes to the Parquet lake.
#[derive(Debug, Clone, clap::Args)]
pub struct ParquetSinkArgs {
    /// Exit 0 once everything that was on omrs.hq.changes at start is committed, after one
    /// compaction (batch runs, tests).
    #[arg(long)]
    pub until_idle: bool,
    /// Only rebuild current/ and the views from what the manifest has committed, then exit.
    /// Refused while a sink runs on the lake (it holds the lake's writer lock, and compacts on
    /// its own every sinks.parquet.compact_interval_s).
    #[arg(long, conflicts_with = "until_idle")]
    pub compact: bool,
    /// Do not compact (neither on the schedule of sinks.parquet.compact_interval_s nor at the
    /// end of --until-idle); `--compact` does it later.
    #[arg(long)]
    pub no_compact: bool,
    /// The lake directory, instead of sinks.parquet.path.
    #[arg(long)]
    pub lake: Option<std::path::PathBuf>,
    /// Serve /metrics on this port (0: any free port) instead of metrics.listen's.
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// No progress line on the terminal.
    #[arg(long)]
    pub quiet: bool,
}

/// The lake's tables: `<lake>/_schema.json`, kept for every later start and for readers. A new
/// lake starts with none and takes each table from the shapes in the stream (every agent sends
/// its tables' shapes ahead of its snapshot); with `sinks.parquet.schema_from_hq` it starts from
/// HQ's `information_schema` instead (scrubbed columns left out).
pub async fn load_tables(cfg: &Config, lake: &Lake) -> Result<HashMap<String, Arc<LakeTable>>, SinkError> {
    let file = match LakeSchemaFile::load(&lake.schema_path())? {
        Some(f) => f,
        None => {
            let f = if cfg.sinks.parquet.schema_from_hq { schema_from_hq(cfg).await? } else { LakeSchemaFile { source: "stream".into(), tables: Default::default() } };
            let bytes = serde_json::to_vec_pretty(&f).map_err(|e| SinkError::Lake(format!("encoding the schema: {e}")))?;
            std::fs::create_dir_all(lake.tmp()).map_err(lake::io(format!("creating {}", lake.tmp().display())))?;
            lake::write_atomic(&lake.tmp(), &lake.schema_path(), &bytes)?;
            tracing::info!(tables = f.tables.len(), source = %f.source, "lake schema saved to _schema.json");
            f
        }
    };
    Ok(file.tables.into_values().map(|d| (d.name.clone(), Arc::new(LakeTable::new(d)))).collect())
}

/// `sinks.parquet.schema_from_hq`: the table model of HQ's database.
async fn schema_from_hq(cfg: &Config) -> Result<LakeSchemaFile, SinkError> {
    let d = &cfg.hq.database;
    let mut conn = mysql_async::Conn::new(crate::mysql_opts(d)).await.map_err(|e| match &e {
        mysql_async::Error::Server(s) if s.code == 1049 => SinkError::Schema(format!(
            "sinks.parquet.schema_from_hq takes the lake's table model from HQ, and the HQ database `{}` does not exist: create it with `omrs-stream sink hq-mysql --init`",
            d.database
        )),
        _ => SinkError::db(format!("reading the table model from {}", d.redacted_url()), e),
    })?;
    let model = omrs_core::model::Model::load(&mut conn, &d.database, &[], &[]).await.map_err(|e| SinkError::Schema(format!("reading the table model from HQ: {e}")))?;
    let _ = conn.disconnect().await;
    let mut f = LakeSchemaFile::from_model(&model, format!("hq:{}", d.database));
    // The sink's bookkeeping and the dashboard tables are HQ's, not OpenMRS data.
    f.tables.retain(|name, _| !name.starts_with("omrs_sync_") && !name.starts_with("omrs_dash_"));
    for (name, t) in f.tables.iter_mut() {
        t.columns.retain(|c| !cfg.ingest.scrub.iter().any(|s| s == &format!("{name}.{}", c.name)));
    }
    if f.tables.is_empty() {
        return Err(SinkError::Schema(format!("HQ database `{}` has no tables: run `omrs-stream sink hq-mysql --init`", d.database)));
    }
    Ok(f)
}

pub fn merge_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("_event_time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("_site", DataType::Utf8, false),
        Field::new("_kafka_partition", DataType::Int32, false),
        Field::new("_kafka_offset", DataType::Int64, false),
        Field::new("winner", DataType::Utf8, false),
        Field::new("loser", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("evidence", DataType::Utf8, true),
    ]))
}

struct MergeRow {
    ts_ms: i64,
    site: String,
    partition: i32,
    offset: i64,
    winner: String,
    loser: String,
    reason: String,
    evidence: String,
}

fn merge_batch(rows: Vec<MergeRow>) -> Result<RecordBatch, SinkError> {
    let n = rows.len();
    let (mut ts, mut site, mut kp, mut ko) =
        (TimestampMicrosecondBuilder::with_capacity(n), StringBuilder::new(), Int32Builder::with_capacity(n), Int64Builder::with_capacity(n));
    let (mut w, mut l, mut r, mut e) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    for m in rows {
        ts.append_value(m.ts_ms * 1000);
        site.append_value(&m.site);
        kp.append_value(m.partition);
        ko.append_value(m.offset);
        w.append_value(&m.winner);
        l.append_value(&m.loser);
        r.append_value(&m.reason);
        e.append_value(&m.evidence);
    }
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(ts.finish().with_timezone("UTC")),
        Arc::new(site.finish()),
        Arc::new(kp.finish()),
        Arc::new(ko.finish()),
        Arc::new(w.finish()),
        Arc::new(l.finish()),
        Arc::new(r.finish()),
        Arc::new(e.finish()),
    ];
    RecordBatch::try_new(merge_schema(), arrays).map_err(|e| SinkError::Lake(format!("building the merge batch: {e}")))
}

/// What is buffered for the next commit: one column builder set per (table, site, date).
#[derive(Default)]
struct Buffer {
    parts: Vec<(PartKey, PartBuf)>,
    index: HashMap<PartKey, usize>,
    /// The partition of the last row and its day: consecutive rows nearly always share it.
    last: Option<(usize, i64)>,
    merges: BTreeMap<(String, String), Vec<MergeRow>>,
    /// Aggregate versions by aggregate name.
    aggs: BTreeMap<String, Vec<aggregates::AggVersion>>,
    /// Identity review versions.
    reviews: Vec<reviews::ReviewVersion>,
    dead: Vec<DeadLetter>,
    next: BTreeMap<i32, i64>,
    /// Kafka partition → the latest watermark record read in it.
    watermarks: BTreeMap<i32, i64>,
    bytes: usize,
    records: u64,
    first_at: Option<Instant>,
    /// (site, site commit time) of the rows, a run of rows with the same ones counted once:
    /// observed into `omrs_stream_lake_end_to_end_latency_seconds` when the set commits.
    commits: Vec<(String, i64)>,
}

impl Buffer {
    /// The partition buffer of `table`, `site` and the day of `event_ms`.
    fn part(&mut self, table: &Arc<LakeTable>, site: &str, event_ms: i64) -> &mut PartBuf {
        if self.commits.last().is_none_or(|(s, t)| *t != event_ms || s != site) {
            self.commits.push((site.to_string(), event_ms));
        }
        let day = event_ms.div_euclid(86_400_000);
        if let Some((i, d)) = self.last {
            let (k, _) = &self.parts[i];
            if d == day && k.0 == table.def.name && k.1 == site {
                return &mut self.parts[i].1;
            }
        }
        let key = (table.def.name.clone(), site.to_string(), date_of(event_ms));
        let i = match self.index.get(&key) {
            Some(i) => *i,
            None => {
                self.parts.push((key.clone(), PartBuf::new(table.clone())));
                self.index.insert(key, self.parts.len() - 1);
                self.parts.len() - 1
            }
        };
        self.last = Some((i, day));
        &mut self.parts[i].1
    }

    /// Adds a decoder's rows to the file set.
    fn absorb(&mut self, o: Buffer) {
        self.parts.extend(o.parts);
        for (k, rows) in o.merges {
            self.merges.entry(k).or_default().extend(rows);
        }
        for (k, rows) in o.aggs {
            self.aggs.entry(k).or_default().extend(rows);
        }
        self.reviews.extend(o.reviews);
        self.dead.extend(o.dead);
        self.commits.extend(o.commits);
        for (p, w) in o.watermarks {
            lake::raise_watermark(&mut self.watermarks, p, w);
        }
    }
}

/// An encoded partition file: (index, partition, rows, first offset, last offset, bytes).
type Encoded = (usize, PartKey, u64, i64, i64, u64);

/// Records per batch handed to a decoder.
const BATCH: usize = 1024;

/// What the reader hands a decoder thread.
enum Work {
    Batch(Vec<(i32, i64, Vec<u8>)>),
    /// Hand over the rows decoded so far.
    Roll,
    /// The lake's tables after a schema change: every later record is decoded with them.
    Tables(Tables),
}

type Tables = HashMap<String, Arc<LakeTable>>;

/// Schema changes that end a file set (site, new shape), and where the new tables go back.
type SchemaChanges = (Vec<(String, omrs_core::shape::TableShape)>, tokio::sync::oneshot::Sender<Tables>);

/// A file set from the reader task; `at_end`: `--until-idle` has read the topic's end at start.
struct Chunk {
    buf: Buffer,
    at_end: bool,
    /// The file set ends with schema changes (`HqEvent::Schema`): the main loop saves them in
    /// `_schema.json` before it commits the set, then answers with the new tables, which the
    /// reader hands to the decoders before the next record.
    schema: Option<SchemaChanges>,
}

/// A schema change record (`"type":"schema"`), read in full; None for any other record. The
/// byte pattern cannot occur inside a JSON string (its quotes would be escaped), only as a
/// record's tag or a column named `type` holding `schema`, which the full read tells apart.
fn schema_change(payload: &[u8]) -> Option<(String, omrs_core::shape::TableShape)> {
    memchr::memmem::find(payload, br#""type":"schema""#)?;
    match serde_json::from_slice::<HqEvent>(payload) {
        Ok(HqEvent::Schema { site, schema, .. }) => Some((site, schema)),
        _ => None,
    }
}

/// Saves the schema changes in `_schema.json` (before the file set that ends with them
/// commits) and returns the tables to decode with from now on.
fn evolve_schema(cfg: &Config, lake: &Lake, changes: &[(String, omrs_core::shape::TableShape)], tables: &Tables) -> Result<Option<Tables>, SinkError> {
    let mut file = LakeSchemaFile::load(&lake.schema_path())?.ok_or_else(|| SinkError::Lake("_schema.json is gone".into()))?;
    let scrub = |t: &str, c: &str| cfg.ingest.scrub.iter().any(|s| *s == format!("{t}.{c}"));
    let mut changed = false;
    for (site, shape) in changes {
        if file.evolve(shape, &scrub) {
            tracing::info!(site = %site, table = %shape.table, ddl = shape.ddl.as_deref().unwrap_or(""), "the lake's schema takes the site's change: new files carry it, older ones read it as its default or null");
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| SinkError::Lake(format!("encoding the schema: {e}")))?;
    lake::write_atomic(&lake.tmp(), &lake.schema_path(), &bytes)?;
    let mut next = tables.clone();
    for (_, shape) in changes {
        if let Some(def) = file.tables.get(&shape.table) {
            next.insert(shape.table.clone(), Arc::new(LakeTable::new(def.clone())));
        }
    }
    Ok(Some(next))
}

/// Runs the sink (or `--compact`).
pub async fn run(cfg: &Config, args: &ParquetSinkArgs) -> Result<(), SinkError> {
    let lake = Lake::new(args.lake.clone().unwrap_or_else(|| cfg.sinks.parquet.path.clone()));
    if args.compact {
        let lock = lake.lock(Writer::Compaction)?;
        let state = lake.open(&lock)?;
        let tables = load_tables(cfg, &lake).await?;
        let report = compact::compact(&lake, &lock, &state, &tables, "on_demand").await?;
        tracing::info!(snapshot = report.id, tables_rebuilt = report.rebuilt, seconds = report.seconds, "compaction done");
        return Ok(());
    }
    // Held until the sink exits (the kernel drops it if the process dies), across retries.
    let lock = lake.lock(Writer::Sink)?;
    retry_transient(
        || run_once(cfg, args, &lake, &lock),
        SinkError::is_transient,
        |e, wait| {
            let kind = match e {
                SinkError::Io { .. } => "disk",
                _ => "kafka",
            };
            metrics().sink_errors.with_label_values(&["parquet", kind]).inc();
            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "transient error; retrying from the last commit");
        },
    )
    .await
}

async fn run_once(cfg: &Config, args: &ParquetSinkArgs, lake: &Lake, lock: &LakeLock) -> Result<(), SinkError> {
    let pq = &cfg.sinks.parquet;
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let topic = names.hq_changes();
    let dlq_topic = names.dlq();
    let mut state = lake.open(lock)?;
    let mut tables = load_tables(cfg, lake).await?;
    let rules = SiteRules::of(cfg);

    let consumer = crate::kafka::consumer(cfg, "parquet")?;
    let producer = crate::kafka::producer(cfg, "the dead-letter producer")?;
    // Seek to the offsets the manifest holds (semantics 1), not to a group's.
    let stored: HashMap<i32, i64> = state.offsets.iter().map(|(p, o)| (*p, *o)).collect();
    let partitions = crate::kafka::assign_at(&consumer, &topic, &stored)?;
    tracing::info!(topic = %topic, lake = %lake.root.display(), offsets = ?state.offsets, seq = state.seq, "parquet sink started");
    omrs_core::endpoint::ready();

    let targets = crate::kafka::end_offsets(&consumer, &topic, &partitions)?;
    let bar = crate::spinner("parquet", args.quiet);
    let roll_every = Duration::from_millis(pq.roll_interval_ms);
    let compact_every = (pq.compact_interval_s > 0 && !args.no_compact).then(|| Duration::from_secs(pq.compact_interval_s));
    let mut last_compact = Instant::now();
    // The wait before the next scheduled compaction: the interval, or three times the last
    // compaction's length if that is longer, so that compacting a large lake takes at most a
    // quarter of the sink's time (during a replay each compaction rewrites the grown tables).
    let mut compact_gap = compact_every.unwrap_or_default();
    let mut compaction: Option<compact::Running> = None;
    let mut total_rows: u64 = 0;
    let mut last_lag = Instant::now() - Duration::from_secs(10);

    // The reader task consumes, parses and types records into the column builders of the next
    // file set, while the main loop encodes and commits the previous one.
    let consumer = Arc::new(consumer);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Chunk, SinkError>>(1);
    let (work_txs, done_rx) = spawn_decoders(&tables, &rules);
    let reading = Reading { until_idle: args.until_idle, roll_max: pq.roll_max_bytes, roll_every, targets };
    let _reader = spawn_reader(consumer.clone(), topic.clone(), state.offsets.clone(), reading, (work_txs, done_rx), tx);

    let (mut recv_wait, mut commit_time) = (Duration::ZERO, Duration::ZERO);
    loop {
        if omrs_core::stop::requested() {
            // Every file set received is committed; what the reader holds beyond it is read
            // again from the manifest's offsets at the next start, and its temp files go.
            tracing::info!(rows = total_rows, seq = state.seq, "stopped; every file set begun is committed");
            return Ok(());
        }
        omrs_core::endpoint::beat();
        let t_recv = Instant::now();
        let got = tokio::select! {
            g = tokio::time::timeout(Duration::from_secs(1), rx.recv()) => g,
            _ = omrs_core::stop::wait() => continue,
        };
        recv_wait += t_recv.elapsed();
        let (chunk, at_end) = match got {
            Err(_) => (None, false),
            Ok(None) => return Err(SinkError::Kafka { context: "reading omrs.hq.changes".into(), message: "the reader task stopped".into(), transient: true }),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(c))) => {
                if let Some((changes, ack)) = c.schema {
                    // Saved before the file set (which ends with them) commits its offsets.
                    if let Some(next) = evolve_schema(cfg, lake, &changes, &tables)? {
                        tables = next;
                    }
                    let _ = ack.send(tables.clone());
                }
                (Some(c.buf), c.at_end)
            }
        };
        if let Some(mut buf) = chunk {
            if buf.records > 0 {
                let t_commit = Instant::now();
                total_rows += commit(lake, &mut state, &mut buf, pq.row_group_rows, &producer, &dlq_topic, &topic, &partitions).await?;
                commit_time += t_commit.elapsed();
            }
        }
        if last_lag.elapsed() > Duration::from_secs(5) || at_end {
            let mut lag = 0;
            for p in &partitions {
                if let Ok((_, high)) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(5)) {
                    lag += (high - state.offsets.get(p).copied().unwrap_or(0)).max(0);
                }
            }
            metrics().lake_manifest_lag.set(lag);
            last_lag = Instant::now();
        }
        if let Some(b) = &bar {
            b.set_message(format!("{total_rows} rows committed, manifest entry {}", state.seq));
        }
        // A scheduled compaction runs beside the loop: the lake's commits go on meanwhile. A
        // stop does not wait for it (at nice 19 on a busy host it can take many seconds): the
        // process exits and the compaction with it, which publishes nothing half-made (the
        // snapshot is swapped in whole, or not at all); the next start compacts again.
        if let Some(r) = compaction.as_mut().and_then(compact::finished) {
            compaction = None;
            let took = Duration::from_secs_f64(r?.seconds.max(0.0));
            last_compact = Instant::now();
            compact_gap = compact_every.unwrap_or_default().max(took * 3);
        }
        if compact_every.is_some() && compaction.is_none() && last_compact.elapsed() >= compact_gap && compact::needs(lake, &state) {
            compaction = Some(compact::start_in_background(lake, lock, &state, &tables, "schedule")?);
        }
        if at_end {
            if let Some(running) = compaction.take() {
                compact::wait(running).await?;
            }
            if !args.no_compact && compact::needs(lake, &state) {
                compact::compact(lake, lock, &state, &tables, "until_idle").await?;
            }
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            tracing::info!(rows = total_rows, seq = state.seq, "omrs.hq.changes committed to its end at start; done");
            tracing::debug!(waited_for_reader_ms = recv_wait.as_millis() as u64, committing_ms = commit_time.as_millis() as u64, "writer done");
            return Ok(());
        }
    }
}

/// Decoding is spread over this many threads, each with its own column builders; at a roll each
/// hands its builders over and the file set holds a file per decoder per partition.
const DECODERS: usize = 2;

/// The decoder threads: each takes batches of records ([`Work::Batch`]) into its column
/// builders and hands them over at a [`Work::Roll`]. Returns their inboxes and where the
/// builders come back.
fn spawn_decoders(tables: &HashMap<String, Arc<LakeTable>>, rules: &SiteRules) -> (Vec<tokio::sync::mpsc::Sender<Work>>, tokio::sync::mpsc::Receiver<Buffer>) {
    let (done_tx, done_rx) = tokio::sync::mpsc::channel::<Buffer>(DECODERS);
    let mut work_txs = Vec::with_capacity(DECODERS);
    for _ in 0..DECODERS {
        let (wtx, mut wrx) = tokio::sync::mpsc::channel::<Work>(8);
        let (mut tables, rules, done_tx) = (tables.clone(), rules.clone(), done_tx.clone());
        tokio::task::spawn_blocking(move || {
            let mut buf = Buffer::default();
            while let Some(w) = wrx.blocking_recv() {
                match w {
                    Work::Tables(t) => tables = t,
                    Work::Batch(records) => {
                        for (p, o, payload) in records {
                            take(&mut buf, &tables, &rules, p, o, &payload);
                        }
                    }
                    Work::Roll => {
                        if done_tx.blocking_send(std::mem::take(&mut buf)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        work_txs.push(wtx);
    }
    (work_txs, done_rx)
}

/// How the reader rolls file sets.
struct Reading {
    until_idle: bool,
    /// A file set closes at this many bytes of records (`roll_max_bytes`)...
    roll_max: usize,
    /// ... or this long after its first record (`roll_interval_ms`).
    roll_every: Duration,
    /// `--until-idle`: the end offsets at start.
    targets: HashMap<i32, i64>,
}

/// The reader task: consumes from `next`, hands records to the decoders in batches, and at each
/// roll gathers their builders into one file set for the main loop (`tx`).
fn spawn_reader(
    consumer: Arc<crate::kafka::SinkConsumer>,
    topic: String,
    mut next: BTreeMap<i32, i64>,
    r: Reading,
    (work_txs, mut done_rx): (Vec<tokio::sync::mpsc::Sender<Work>>, tokio::sync::mpsc::Receiver<Buffer>),
    tx: tokio::sync::mpsc::Sender<Result<Chunk, SinkError>>,
) -> crate::kafka::AbortOnDrop {
    let Reading { until_idle, roll_max, roll_every, targets } = r;
    crate::kafka::AbortOnDrop(tokio::spawn(async move {
    let mut turn = 0usize;
    let mut batch: Vec<(i32, i64, Vec<u8>)> = Vec::with_capacity(BATCH);
    // The record that ended a run of schema changes: the first of the next file set.
    let mut carry: Option<(i32, i64, Vec<u8>)> = None;
    loop {
        let mut set = Buffer::default();
        let mut at_end = false;
        let mut schema_changes: Vec<(String, omrs_core::shape::TableShape)> = Vec::new();
        if let Some((p, o, payload)) = carry.take() {
            take_record(&mut set, &mut next, &mut batch, (p, o, payload));
        }
        // One timer for the whole file set (not one per record): it ticks every 200 ms
        // to roll by time and, when nothing came since the last tick, to look for the end.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut seen_since_tick = false;
        while set.bytes < roll_max {
            tokio::select! {
                biased;
                m = consumer.recv() => match m {
                    Err(e) => {
                        let _ = tx.send(Err(SinkError::kafka("consuming", e))).await;
                        return;
                    }
                    Ok(m) => {
                        seen_since_tick = true;
                        let (p, o) = (m.partition(), m.offset());
                        let payload = m.payload().unwrap_or(&[]).to_vec();
                        let schema = schema_change(&payload);
                        if schema.is_none() && !schema_changes.is_empty() {
                            // The file set ends after a run of schema changes (a snapshot sends
                            // every table's shape at once): later records take the new shapes.
                            carry = Some((p, o, payload));
                            break;
                        }
                        take_record(&mut set, &mut next, &mut batch, (p, o, payload));
                        if let Some(change) = schema {
                            schema_changes.push(change);
                            continue;
                        }
                        if batch.len() >= BATCH {
                            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            if work_txs[turn % DECODERS].send(Work::Batch(full)).await.is_err() {
                                return;
                            }
                            turn += 1;
                            // A steady stream keeps recv() ready and the tick unpolled.
                            if set.first_at.is_some_and(|t| t.elapsed() >= roll_every) {
                                break;
                            }
                        }
                    }
                },
                _ = tick.tick() => {
                    if !schema_changes.is_empty() || set.first_at.is_some_and(|t| t.elapsed() >= roll_every) {
                        break;
                    }
                    if !seen_since_tick && until_idle && reached(&consumer, &topic, &targets, &next) {
                        at_end = true;
                        break;
                    }
                    seen_since_tick = false;
                }
            }
        }
        if !batch.is_empty() {
            let rest = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if work_txs[turn % DECODERS].send(Work::Batch(rest)).await.is_err() {
                return;
            }
            turn += 1;
        }
        for w in &work_txs {
            if w.send(Work::Roll).await.is_err() {
                return;
            }
        }
        for _ in 0..DECODERS {
            match done_rx.recv().await {
                Some(b) => set.absorb(b),
                None => return,
            }
        }
        let (ack, new_tables) = if schema_changes.is_empty() {
            (None, None)
        } else {
            let (a, r) = tokio::sync::oneshot::channel();
            (Some((schema_changes, a)), Some(r))
        };
        if tx.send(Ok(Chunk { buf: set, at_end, schema: ack })).await.is_err() || at_end {
            return;
        }
        if let Some(r) = new_tables {
            // The main loop saved the schema; nothing more is decoded before the decoders have it.
            let Ok(t) = r.await else { return };
            for w in &work_txs {
                if w.send(Work::Tables(t.clone())).await.is_err() {
                    return;
                }
            }
        }
    }
    }))
}

/// Counts a record into the file set and queues it for the decoders.
fn take_record(set: &mut Buffer, next: &mut BTreeMap<i32, i64>, batch: &mut Vec<(i32, i64, Vec<u8>)>, (p, o, payload): (i32, i64, Vec<u8>)) {
    set.next.insert(p, o + 1);
    next.insert(p, o + 1);
    set.records += 1;
    set.first_at.get_or_insert_with(Instant::now);
    set.bytes += payload.len();
    batch.push((p, o, payload));
}

/// `--until-idle`: every partition is read up to its end offset at start.
fn reached(consumer: &crate::kafka::SinkConsumer, topic: &str, targets: &HashMap<i32, i64>, next: &BTreeMap<i32, i64>) -> bool {
    let pos = consumer.position().ok();
    targets.iter().all(|(p, high)| {
        let at = pos.as_ref().and_then(|tp| tp.find_partition(topic, *p)).and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None });
        *high == 0 || at.is_some_and(|o| o >= *high) || next.get(p).is_some_and(|o| *o >= *high)
    })
}

/// Buffers one record (or its dead letter).
fn take(buf: &mut Buffer, tables: &HashMap<String, Arc<LakeTable>>, rules: &SiteRules, p: i32, o: i64, payload: &[u8]) {
    let dead = |kind: DeadKind, reason: String| DeadLetter { partition: p, offset: o, kind, reason, payload: payload.to_vec() };
    let fast = fast::decode(payload, tables, rules, p, o, |t, m, cells| buf.part(t, m.site, m.event_ms).push(m, cells));
    match fast {
        Some(Ok(())) => return,
        Some(Err(reason)) => {
            buf.dead.push(dead(DeadKind::BadValue, reason));
            return;
        }
        None => {}
    }
    // The general path: core's decoder, row images as maps.
    let parsed = serde_json::from_slice::<HqEvent>(payload);
    let ev: HqEvent = match parsed {
        Ok(e) => e,
        Err(e) => {
            buf.dead.push(dead(DeadKind::InvalidRecord, format!("not an omrs.hq.changes record: {e}")));
            return;
        }
    };
    match ev {
        HqEvent::Change { late, person, origin_refs, event } => {
            if let Err(e) = event.validate() {
                buf.dead.push(dead(DeadKind::InvalidEvent, e.to_string()));
                return;
            }
            if event.op == omrs_core::envelope::Op::Heartbeat {
                return;
            }
            let name = event.table.clone().unwrap_or_default();
            let Some(t) = tables.get(&name) else {
                buf.dead.push(dead(
                    DeadKind::UnknownTable,
                    format!("table `{name}` is not in the lake schema (_schema.json): no shape of it came before its rows (agents send one ahead of their snapshot; for topics without shapes set sinks.parquet.schema_from_hq at the lake's first start)"),
                ));
                return;
            };
            match convert(t, &event, late, person, &origin_refs, rules.get(&event.site), p, o) {
                Ok(row) => buf.part(t, &row.site, row.event_ms).push_row(&row),
                Err(reason) => buf.dead.push(dead(DeadKind::BadValue, reason)),
            }
        }
        HqEvent::Merge { winner, loser, reason, evidence, site, ts_ms } => {
            buf.merges.entry((site.clone(), date_of(ts_ms))).or_default().push(MergeRow {
                ts_ms,
                site,
                partition: p,
                offset: o,
                winner,
                loser,
                reason,
                evidence: evidence.to_string(),
            });
        }
        // A split in the merge history: the survivor is released (a row merging it into
        // itself), then each record leaving follows it (`compact::Merges` folds them).
        HqEvent::Split { survivor, from, records, review_id, site, ts_ms } => {
            let evidence = serde_json::json!({"from": from, "review_id": review_id}).to_string();
            let rows = buf.merges.entry((site.clone(), date_of(ts_ms))).or_default();
            for loser in std::iter::once(survivor.clone()).chain(records.into_iter().filter(|r| *r != survivor)) {
                rows.push(MergeRow { ts_ms, site: site.clone(), partition: p, offset: o, winner: survivor.clone(), loser, reason: "split".into(), evidence: evidence.clone() });
            }
        }
        HqEvent::Watermark { ts_ms } => {
            lake::raise_watermark(&mut buf.watermarks, p, ts_ms);
        }
        // Taken by the reader and the main loop (`evolve_schema`) before the next record.
        HqEvent::Schema { .. } => {}
        HqEvent::IdentityReview { review_id, reason, status, person, records, evidence, site, ts_ms, decided } => {
            let records = serde_json::to_string(&records).unwrap_or_default();
            let evidence = evidence.to_string();
            buf.reviews.push(reviews::ReviewVersion { review_id, reason, status, person, records, evidence, site, ts_ms, decided, partition: p, offset: o });
        }
        HqEvent::Aggregate { name, site, window_start_ms, window_end_ms, dim, value, is_final, revision, watermark_ms } => {
            if !omrs_core::hq::AGGREGATES.iter().any(|a| a.name == name) {
                buf.dead.push(dead(DeadKind::UnknownAggregate, format!("aggregate `{name}` is not one this sink knows")));
                return;
            }
            buf.aggs.entry(name).or_default().push(aggregates::AggVersion {
                site,
                start_ms: window_start_ms,
                end_ms: window_end_ms,
                dim,
                value,
                is_final,
                revision,
                watermark_ms,
                partition: p,
                offset: o,
            });
        }
    }
}

/// Writes the buffered file set and commits it with its offsets. Returns the rows written.
#[allow(clippy::too_many_arguments)]
async fn commit(
    lake: &Lake,
    state: &mut State,
    buf: &mut Buffer,
    row_group_rows: usize,
    producer: &FutureProducer,
    dlq_topic: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<u64, SinkError> {
    let started = Instant::now();
    let b = std::mem::take(buf);
    let seq = state.seq + 1;
    let mut files = Vec::new();
    let mut renames = Vec::new();
    let mut rows_by_table: BTreeMap<String, u64> = BTreeMap::new();
    let mut parts: Vec<(PartKey, PartBuf)> = b.parts.into_iter().filter(|(_, pb)| pb.rows > 0).collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut new_keys = BTreeSet::new();
    // Encoding and compressing is most of a commit's work: two threads take the partitions,
    // largest first.
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(parts[*i].1.rows));
    let queue = std::sync::Mutex::new(order);
    let slots: Vec<std::sync::Mutex<Option<(PartKey, PartBuf)>>> = parts.into_iter().map(|kp| std::sync::Mutex::new(Some(kp))).collect();
    let encode = |n: usize| -> Result<Encoded, SinkError> {
        let Some((key, pb)) = slots[n].lock().ok().and_then(|mut s| s.take()) else {
            return Err(SinkError::Lake("a partition was encoded twice".into()));
        };
        let (first, last, count) = (pb.first_offset, pb.last_offset, pb.rows);
        let schema = pb.table.schema.clone();
        let batch = pb.finish()?;
        let tmp = lake.root.join(format!("_tmp/{seq:010}-{n:04}.parquet"));
        let bytes = write::write_file(&tmp, &schema, &[batch], row_group_rows)?;
        Ok((n, key, count, first, last, bytes))
    };
    let results: Vec<Result<Encoded, SinkError>> = tokio::task::block_in_place(|| {
        std::thread::scope(|sc| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    sc.spawn(|| {
                        let mut out = Vec::new();
                        while let Some(n) = queue.lock().ok().and_then(|mut q| if q.is_empty() { None } else { Some(q.remove(0)) }) {
                            out.push(encode(n));
                        }
                        out
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|_| vec![Err(SinkError::Lake("an encoder thread panicked".into()))])).collect()
        })
    });
    let mut encoded = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    encoded.sort_by_key(|e| e.0);
    let mut add = |key: PartKey, n: usize, rows: u64, first_offset: i64, last_offset: i64, bytes: u64| {
        let fin = format!("changes/{}/site={}/date={}/part-{seq:010}-{n:04}.parquet", key.0, key.1, key.2);
        files.push(FileEntry {
            seq,
            path: fin.clone(),
            table: key.0.clone(),
            site: key.1.clone(),
            date: key.2.clone(),
            rows,
            bytes,
            first_offset,
            last_offset,
            late: state.complete.contains_key(&key),
        });
        renames.push((format!("_tmp/{seq:010}-{n:04}.parquet"), fin));
        new_keys.insert(key);
    };
    let mut n = encoded.len();
    for (i, key, count, first, last, bytes) in encoded {
        *rows_by_table.entry(key.0.clone()).or_default() += count;
        add(key, i, count, first, last, bytes);
    }
    for ((site, date), rows) in b.merges {
        // The decoder threads hand rows over out of order: the range, not the ends.
        let (first, last) = (rows.iter().map(|r| r.offset).min().unwrap_or(0), rows.iter().map(|r| r.offset).max().unwrap_or(0));
        let count = rows.len() as u64;
        let batch = merge_batch(rows)?;
        let bytes = write::write_file(&lake.root.join(format!("_tmp/{seq:010}-{n:04}.parquet")), &merge_schema(), &[batch], row_group_rows)?;
        add((MERGE_TABLE.to_string(), site, date), n, count, first, last, bytes);
        n += 1;
    }
    // Files outside the date partitions (no site or date, never "complete"): one per set.
    let mut side_file = |table: String, batch: RecordBatch, schema: &SchemaRef, range: (i64, i64), n: usize| -> Result<(), SinkError> {
        let tmp = format!("_tmp/{seq:010}-{n:04}.parquet");
        let rows = batch.num_rows() as u64;
        let bytes = write::write_file(&lake.root.join(&tmp), schema, &[batch], row_group_rows)?;
        let fin = format!("{}/part-{seq:010}-{n:04}.parquet", table.replace('.', "/"));
        files.push(FileEntry { seq, path: fin.clone(), table, site: String::new(), date: String::new(), rows, bytes, first_offset: range.0, last_offset: range.1, late: false });
        renames.push((tmp, fin));
        Ok(())
    };
    for (name, rows) in b.aggs {
        let Some(def) = omrs_core::hq::AGGREGATES.iter().find(|a| a.name == name) else { continue };
        let range = (rows.first().map(|r| r.offset).unwrap_or(0), rows.last().map(|r| r.offset).unwrap_or(0));
        side_file(format!("{}.{name}", aggregates::DIR), aggregates::batch(def, &rows)?, &aggregates::schema(def), range, n)?;
        n += 1;
    }
    if !b.reviews.is_empty() {
        let mut rows = b.reviews;
        // Decoder threads hand rows over out of order.
        rows.sort_by_key(|r| (r.partition, r.offset));
        let range = (rows.first().map(|r| r.offset).unwrap_or(0), rows.last().map(|r| r.offset).unwrap_or(0));
        side_file(format!("{}.{}", reviews::DIR, reviews::REVIEWS), reviews::batch(&rows)?, &reviews::schema(), range, n)?;
    }
    if !renames.is_empty() {
        // (A file set of table shapes alone has no data files to leave behind.)
        failpoint("lake:after-data-tmp");
    }
    crate::kafka::send_dead_letters(producer, dlq_topic, "parquet", topic, &b.dead).await?;
    let (watermark, partition_watermarks) = state.next_watermark(&b.watermarks, partitions);
    let completed = match watermark {
        Some(w) => state.newly_complete(w, &new_keys),
        None => Vec::new(),
    };
    let late_files = files.iter().filter(|f| f.late).count();
    let total: u64 = files.iter().map(|f| f.rows).sum();
    let bytes_total: u64 = files.iter().map(|f| f.bytes).sum();
    let nfiles = files.len();
    let entry = Entry { seq, files, renames, offsets: b.next, watermark, partition_watermarks, completed, committed_at_ms: now_ms() };
    lake.commit(state, entry)?;
    let m = metrics();
    for (t, k) in rows_by_table {
        m.lake_rows_written.with_label_values(&[&t]).inc_by(k);
    }
    m.lake_files_written.with_label_values(&["changes"]).inc_by(nfiles as u64);
    m.lake_bytes_written.with_label_values(&["changes"]).inc_by(bytes_total);
    m.lake_late_files.inc_by(late_files as u64);
    m.batch_latency.with_label_values(&["parquet"]).observe(started.elapsed().as_secs_f64());
    let committed = now_ms();
    for (site, ts) in &b.commits {
        m.lake_e2e_latency.with_label_values(&[site]).observe((committed - ts).max(0) as f64 / 1000.0);
    }
    if let Some(w) = watermark {
        m.global_watermark.set(w);
    }
    tracing::debug!(seq, files = nfiles, rows = total, late_files, "file set committed");
    Ok(total)
}
