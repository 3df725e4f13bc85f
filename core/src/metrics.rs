//! Every Prometheus metric of omrs-stream, by name, in one place ([`crate::endpoint`] serves
//! them). Besides the `omrs_stream_*` metrics, the registry holds the standard `process_*`
//! metrics of the process (CPU, memory, open files).
//!
//! Names follow `omrs_stream_<stage>_<what>_<unit>`. Stages register nothing themselves: they
//! use the handles of [`metrics()`].

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const EVENTS_IN: &str = "omrs_stream_events_in_total";
pub const EVENTS_OUT: &str = "omrs_stream_events_out_total";
pub const CONSUMER_LAG: &str = "omrs_stream_consumer_lag_messages";
pub const SITE_WATERMARK: &str = "omrs_stream_site_watermark_ms";
pub const GLOBAL_WATERMARK: &str = "omrs_stream_global_watermark_ms";
pub const WATERMARK_DELAY: &str = "omrs_stream_watermark_delay_ms";
pub const SITE_IDLE: &str = "omrs_stream_site_idle";
pub const LATE_EVENTS: &str = "omrs_stream_late_events_total";
pub const MERGES: &str = "omrs_stream_identity_merges_total";
pub const SPLITS: &str = "omrs_stream_identity_splits_total";
pub const CONFLICTS: &str = "omrs_stream_conflicts_total";
pub const PARKED_ROWS: &str = "omrs_stream_parked_rows";
pub const DEAD_LETTERED: &str = "omrs_stream_dead_lettered_total";
pub const BATCH_LATENCY: &str = "omrs_stream_batch_latency_seconds";
pub const SITE_CLOCK_AHEAD: &str = "omrs_stream_site_clock_ahead_ms";
pub const CLOCK_CAPPED: &str = "omrs_stream_clock_capped_events_total";
pub const SNAPSHOT_ROWS: &str = "omrs_stream_snapshot_rows_total";
pub const SNAPSHOT_TABLES_DONE: &str = "omrs_stream_snapshot_tables_done";
pub const SNAPSHOT_LOCK_MS: &str = "omrs_stream_snapshot_lock_ms";
pub const SCHEMA_CHANGES: &str = "omrs_stream_ingest_schema_changes_total";
pub const INGEST_SITE_RUNNING: &str = "omrs_stream_ingest_site_running";
pub const SIMULATED_ROWS: &str = "omrs_stream_simulate_rows_total";
pub const UP: &str = "omrs_stream_up";
pub const BUILD_INFO: &str = "omrs_stream_build_info";
pub const UNRESOLVED_REFS: &str = "omrs_stream_unresolved_refs_total";
pub const SITE_CLOCK_SKEW: &str = "omrs_stream_site_clock_skew_seconds";
pub const INGEST_POSITION: &str = "omrs_stream_ingest_binlog_position";
pub const INGEST_BINLOG_MARGIN: &str = "omrs_stream_ingest_binlog_margin_files";
pub const INGEST_RETRIES: &str = "omrs_stream_ingest_retries_total";
pub const INGEST_BINLOG_RETENTION: &str = "omrs_stream_ingest_binlog_retention_seconds";
pub const INGEST_OVERSIZE: &str = "omrs_stream_ingest_oversize_events_total";
pub const KAFKA_TRANSACTIONS: &str = "omrs_stream_kafka_transactions_total";
pub const HEARTBEATS: &str = "omrs_stream_heartbeats_total";
pub const REF_CACHE_ENTRIES: &str = "omrs_stream_ingest_ref_cache_entries";
pub const IDENTITY_RECORDS: &str = "omrs_stream_identity_records";
pub const IDENTITY_BYTES: &str = "omrs_stream_identity_index_bytes";
pub const IDENTITY_REVIEWS: &str = "omrs_stream_identity_reviews_total";
pub const IDENTITY_REVIEWS_OPEN: &str = "omrs_stream_identity_reviews_open";
pub const IDENTITY_REVIEW_OLDEST_AGE: &str = "omrs_stream_identity_review_oldest_open_age_seconds";
pub const HQ_ROWS_APPLIED: &str = "omrs_stream_hq_rows_applied_total";
pub const HQ_PENDING_OLDEST_AGE: &str = "omrs_stream_hq_pending_oldest_age_seconds";
pub const HQ_LOOKUPS_SKIPPED: &str = "omrs_stream_hq_lookups_skipped_total";
pub const HQ_E2E_LATENCY: &str = "omrs_stream_hq_end_to_end_latency_seconds";
pub const LAKE_E2E_LATENCY: &str = "omrs_stream_lake_end_to_end_latency_seconds";
pub const SINK_ERRORS: &str = "omrs_stream_sink_errors_total";
pub const LAKE_ROWS_WRITTEN: &str = "omrs_stream_lake_rows_written_total";
pub const LAKE_FILES_WRITTEN: &str = "omrs_stream_lake_files_written_total";
pub const LAKE_BYTES_WRITTEN: &str = "omrs_stream_lake_bytes_written_total";
pub const LAKE_COMPACTION_SECONDS: &str = "omrs_stream_lake_compaction_seconds";
pub const LAKE_MANIFEST_LAG: &str = "omrs_stream_lake_manifest_lag_messages";
pub const LAKE_LATE_FILES: &str = "omrs_stream_lake_late_files_total";
pub const AGGREGATE_VERSIONS: &str = "omrs_stream_aggregate_versions_total";
pub const AGGREGATE_OPEN_WINDOWS: &str = "omrs_stream_aggregate_open_windows";
pub const AGGREGATE_UNATTRIBUTED: &str = "omrs_stream_aggregate_unattributed_total";

/// Handles to every metric; registered once in one registry.
pub struct Metrics {
    pub registry: Registry,
    /// Change events read, by stage, site, table and op.
    pub events_in: IntCounterVec,
    /// Change events written, by stage, site, table and op.
    pub events_out: IntCounterVec,
    /// Messages between the committed offset and the end of a partition.
    pub consumer_lag: IntGaugeVec,
    pub site_watermark: IntGaugeVec,
    pub global_watermark: IntGauge,
    pub watermark_delay: IntGauge,
    /// 1 while a site is idle (not holding the global watermark back).
    pub site_idle: IntGaugeVec,
    pub late_events: IntCounterVec,
    pub merges: IntCounter,
    /// Groups of records that left a merged person (a split decision).
    pub splits: IntCounter,
    pub conflicts: IntCounterVec,
    pub parked_rows: IntGauge,
    pub dead_lettered: IntCounterVec,
    pub batch_latency: HistogramVec,
    /// How far a site's latest event time is ahead of the transform's clock (0 when behind).
    pub site_clock_ahead: IntGaugeVec,
    /// Events whose time the transform capped at its clock plus `max_clock_ahead_s`.
    pub clock_capped: IntCounterVec,
    pub snapshot_rows: IntCounterVec,
    pub snapshot_tables_done: IntGaugeVec,
    pub snapshot_lock_ms: IntGaugeVec,
    pub schema_changes: IntCounterVec,
    pub ingest_site_running: IntGaugeVec,
    pub simulated_rows: IntCounterVec,
    pub up: IntGaugeVec,
    /// 1, labelled with the version and stage of the running build.
    pub build_info: IntGaugeVec,
    /// Foreign keys sent as null because the referenced row has no uuid.
    pub unresolved_refs: IntCounterVec,
    /// Site clock minus this host's clock, seconds (from heartbeats).
    pub site_clock_skew: prometheus::GaugeVec,
    /// Committed binlog position (byte offset in the current file), by site.
    pub ingest_position: IntGaugeVec,
    /// Binlog files the server still retains behind the agent's position; 0 means the next
    /// purge loses data the agent has not read.
    pub ingest_binlog_margin: IntGaugeVec,
    /// Restarts of the agent's loop after a transient error (site or Kafka unreachable).
    pub ingest_retries: IntCounterVec,
    /// Row changes too large for a site event, sent without their images (then dead-lettered).
    pub ingest_oversize: IntCounterVec,
    /// The site server's binlog retention (0: never purged), read when streaming starts.
    pub ingest_binlog_retention: IntGaugeVec,
    pub kafka_transactions: IntCounterVec,
    pub heartbeats: IntCounterVec,
    /// Rows whose id → uuid the agent keeps for FK resolution.
    pub ref_cache_entries: IntGaugeVec,
    /// Person records in the transform's identity index.
    pub identity_records: IntGauge,
    /// Approximate heap bytes of the identity index.
    pub identity_bytes: IntGauge,
    /// Identifiers voided on merged persons, left for a person to review.
    pub identity_reviews: IntCounterVec,
    pub identity_reviews_open: IntGaugeVec,
    pub identity_review_oldest_age: IntGaugeVec,
    /// Rows written at HQ, by table and op (`c`, `u`, `d`, `r`).
    pub hq_rows_applied: IntCounterVec,
    pub hq_pending_oldest_age: IntGauge,
    /// Rows new to HQ by the uuid filter, inserted without a lookup first.
    pub hq_lookups_skipped: IntCounter,
    /// Site commit → HQ commit, seconds.
    pub hq_e2e_latency: HistogramVec,
    /// Site commit to the lake's commit of the file set holding the change (visible to queries).
    pub lake_e2e_latency: HistogramVec,
    /// Sink errors by sink and kind (`transient`, `deadlock`, `row_rejected`, …).
    pub sink_errors: IntCounterVec,
    /// Rows committed to the lake's change history, by table.
    pub lake_rows_written: IntCounterVec,
    /// Parquet files committed to the lake, by dataset (`changes`, `current`, `views`).
    pub lake_files_written: IntCounterVec,
    pub lake_bytes_written: IntCounterVec,
    pub lake_compaction_seconds: HistogramVec,
    /// End of omrs.hq.changes minus the offset the lake's manifest has committed.
    pub lake_manifest_lag: IntGauge,
    /// Files written into date partitions that were already complete (late data).
    pub lake_late_files: IntCounter,
    /// Aggregate window versions emitted, by aggregate and kind (`provisional`, `final`,
    /// `correction`).
    pub aggregate_versions: IntCounterVec,
    /// Aggregate windows the global watermark has not passed yet.
    pub aggregate_open_windows: IntGauge,
    /// Rows an aggregate could not attribute (a grouping value with no known uuid), by aggregate.
    pub aggregate_unattributed: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone())).expect("metric registered once");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone())).expect("metric registered once");
    m
}

/// Site commit → a sink's commit, per site: the buckets span sub-second live changes to the
/// minutes an offline site's backlog waits.
fn e2e_histogram(r: &Registry, name: &str, help: &str) -> HistogramVec {
    let buckets = vec![0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["site"]).expect("static metric definition");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(m.clone())).expect("metric registered once");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(m.clone())).expect("metric registered once");
    m
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        // Registered once, on a fresh registry: cannot clash.
        let _ = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        let merges = IntCounter::new(MERGES, "Cross-site patient merges performed").expect("static");
        r.register(Box::new(merges.clone())).expect("metric registered once");
        let splits = IntCounter::new(SPLITS, "Groups of person records that left a merged person (split decisions)").expect("static");
        r.register(Box::new(splits.clone())).expect("metric registered once");
        let batch_latency = HistogramVec::new(
            HistogramOpts::new(BATCH_LATENCY, "Time to process one batch, by stage").buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["stage"],
        )
        .expect("static metric definition");
        r.register(Box::new(batch_latency.clone())).expect("metric registered once");
        Metrics {
            events_in: counter_vec(&r, EVENTS_IN, "Change events read", &["stage", "site", "table", "op"]),
            events_out: counter_vec(&r, EVENTS_OUT, "Change events written", &["stage", "site", "table", "op"]),
            consumer_lag: gauge_vec(&r, CONSUMER_LAG, "Consumer lag in messages", &["stage", "topic", "partition"]),
            site_watermark: gauge_vec(&r, SITE_WATERMARK, "Per-site watermark (ms since epoch)", &["site"]),
            global_watermark: gauge(&r, GLOBAL_WATERMARK, "Global watermark: minimum over active sites (ms since epoch)"),
            watermark_delay: gauge(&r, WATERMARK_DELAY, "Now minus the global watermark (ms)"),
            site_idle: gauge_vec(&r, SITE_IDLE, "1 while the site is idle and does not hold the watermark back", &["site"]),
            late_events: counter_vec(&r, LATE_EVENTS, "Events older than the global watermark, emitted late", &["site"]),
            merges,
            splits,
            conflicts: counter_vec(&r, CONFLICTS, "Changes overwritten by a later writer (last writer wins)", &["sink", "table"]),
            parked_rows: gauge(&r, PARKED_ROWS, "Rows waiting at the HQ sink for a referenced row"),
            dead_lettered: counter_vec(&r, DEAD_LETTERED, "Records sent to the dead-letter topic", &["stage", "reason"]),
            batch_latency,
            site_clock_ahead: gauge_vec(&r, SITE_CLOCK_AHEAD, "Site's latest event time minus the transform's clock, ms (0 when behind)", &["site"]),
            clock_capped: counter_vec(&r, CLOCK_CAPPED, "Events whose time was capped: the site's clock ran ahead of the transform's by more than max_clock_ahead_s", &["site"]),
            snapshot_rows: counter_vec(&r, SNAPSHOT_ROWS, "Rows read by the initial snapshot", &["site", "table"]),
            snapshot_tables_done: gauge_vec(&r, SNAPSHOT_TABLES_DONE, "Tables whose snapshot is complete", &["site"]),
            snapshot_lock_ms: gauge_vec(&r, SNAPSHOT_LOCK_MS, "How long the last snapshot held the site's global read lock (MySQL path), ms", &["site"]),
            ingest_site_running: gauge_vec(&r, INGEST_SITE_RUNNING, "1 while a site's agent runs in a multi-site ingest process, 0 once it stopped", &["site"]),
            schema_changes: counter_vec(&r, SCHEMA_CHANGES, "DDL statements read from a site's binlog, by how the schema history followed them (applied, information_schema; the Debezium input: applied, not_followed)", &["site", "how"]),
            simulated_rows: counter_vec(&r, SIMULATED_ROWS, "Row changes written by the simulator", &["site", "table", "op"]),
            up: gauge_vec(&r, UP, "1 while the process runs", &["stage"]),
            build_info: gauge_vec(&r, BUILD_INFO, "1; the labels name the running build", &["version", "stage"]),
            unresolved_refs: counter_vec(&r, UNRESOLVED_REFS, "Foreign keys that could not be resolved to a uuid (sent as null)", &["site", "table"]),
            site_clock_skew: {
                let m = prometheus::GaugeVec::new(Opts::new(SITE_CLOCK_SKEW, "Site clock minus the agent host's clock, seconds"), &["site"]).expect("static metric definition");
                r.register(Box::new(m.clone())).expect("metric registered once");
                m
            },
            ingest_position: gauge_vec(&r, INGEST_POSITION, "Committed binlog position within its file", &["site", "file"]),
            ingest_binlog_margin: gauge_vec(&r, INGEST_BINLOG_MARGIN, "Binlog files retained behind the agent's position", &["site"]),
            ingest_retries: counter_vec(&r, INGEST_RETRIES, "Agent restarts after a transient error", &["site", "reason"]),
            ingest_binlog_retention: gauge_vec(&r, INGEST_BINLOG_RETENTION, "The site server's binlog retention in seconds (binlog_expire_logs_seconds or expire_logs_days; 0 = never purged)", &["site"]),
            ingest_oversize: counter_vec(&r, INGEST_OVERSIZE, "Row changes too large for a site event, sent without their row images and dead-lettered by the transform", &["site"]),
            kafka_transactions: counter_vec(&r, KAFKA_TRANSACTIONS, "Kafka transactions committed", &["stage", "site"]),
            heartbeats: counter_vec(&r, HEARTBEATS, "Heartbeats sent by a quiet site", &["site"]),
            ref_cache_entries: gauge_vec(&r, REF_CACHE_ENTRIES, "Rows tracked for FK to uuid resolution", &["site"]),
            identity_records: gauge(&r, IDENTITY_RECORDS, "Person records in the identity index"),
            identity_bytes: gauge(&r, IDENTITY_BYTES, "Approximate heap bytes of the identity index and the near-miss demographics"),
            identity_reviews: counter_vec(&r, IDENTITY_REVIEWS, "Entries raised in the identity review queue (merges included, status merged)", &["reason", "status"]),
            identity_reviews_open: gauge_vec(&r, IDENTITY_REVIEWS_OPEN, "Reviews at HQ waiting for a person (status open), per reason", &["reason"]),
            identity_review_oldest_age: gauge_vec(&r, IDENTITY_REVIEW_OLDEST_AGE, "Age of the oldest open review at HQ, per reason (0: none)", &["reason"]),
            aggregate_versions: counter_vec(&r, AGGREGATE_VERSIONS, "Aggregate window versions emitted", &["aggregate", "kind"]),
            aggregate_open_windows: gauge(&r, AGGREGATE_OPEN_WINDOWS, "Aggregate windows not final yet"),
            aggregate_unattributed: counter_vec(&r, AGGREGATE_UNATTRIBUTED, "Rows counted under `unknown` for want of a grouping uuid", &["aggregate"]),
            hq_rows_applied: counter_vec(&r, HQ_ROWS_APPLIED, "Rows written to the HQ database", &["table", "op"]),
            hq_pending_oldest_age: gauge(&r, HQ_PENDING_OLDEST_AGE, "Age of the oldest row waiting at the HQ sink for its parent"),
            hq_lookups_skipped: counter(&r, HQ_LOOKUPS_SKIPPED, "Rows new to HQ by the uuid filter, inserted without a lookup first"),
            hq_e2e_latency: e2e_histogram(&r, HQ_E2E_LATENCY, "Site commit to HQ commit, seconds"),
            lake_e2e_latency: e2e_histogram(&r, LAKE_E2E_LATENCY, "Site commit to the lake's commit of the change, seconds"),
            sink_errors: counter_vec(&r, SINK_ERRORS, "Sink errors by kind", &["sink", "kind"]),
            lake_rows_written: counter_vec(&r, LAKE_ROWS_WRITTEN, "Rows committed to the lake's change history", &["table"]),
            lake_files_written: counter_vec(&r, LAKE_FILES_WRITTEN, "Parquet files committed to the lake", &["dataset"]),
            lake_bytes_written: counter_vec(&r, LAKE_BYTES_WRITTEN, "Parquet bytes committed to the lake", &["dataset"]),
            lake_compaction_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(LAKE_COMPACTION_SECONDS, "Time to build and publish one current-state snapshot").buckets(vec![
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ]),
                    &["trigger"],
                )
                .expect("static metric definition");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            lake_manifest_lag: gauge(&r, LAKE_MANIFEST_LAG, "omrs.hq.changes end offset minus the lake manifest's committed offset"),
            lake_late_files: {
                let c = IntCounter::new(LAKE_LATE_FILES, "Files written into already-complete date partitions").expect("static");
                r.register(Box::new(c.clone())).expect("metric registered once");
                c
            },
            registry: r,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding in-memory metrics into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metric handles.
pub fn metrics() -> &'static Metrics {
    &METRICS
}
