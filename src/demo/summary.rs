//! The demo's summary: per site, identity, conflicts, pending, dead letters, throughput,
//! end-to-end latency, two queries over the lake, verify, and where everything is.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use mysql_async::prelude::Queryable;
use omrs_core::config::Config;
use omrs_core::metrics as m;
use serde::Serialize;

use super::prom::{self, Sample};
use super::fmt_n;

/// What the run collected on its way, for [`build`].
pub struct Facts {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub config: PathBuf,
    pub logs: PathBuf,
    pub lake: PathBuf,
    pub manifest: PathBuf,
    pub prefix: String,
    pub sites: Vec<String>,
    pub windows: Vec<(String, f64, f64)>,
    pub backlog: bool,
    pub sim_rows: u64,
    pub pipeline_secs: f64,
    /// `--lake-first`: seconds from starting the pipeline until the lake held everything, the
    /// HQ sink off.
    pub lake_secs: Option<f64>,
    pub total_secs: f64,
    pub drained: bool,
    pub problems: Vec<String>,
    pub max_delay_ms: BTreeMap<String, i64>,
    pub transform: Vec<Sample>,
    pub hq: Vec<Sample>,
    pub parquet: Vec<Sample>,
    pub lags: Vec<omrs_sinks::verify::Lag>,
    pub endpoints: Vec<(String, String)>,
    /// The HQ and Parquet sinks' samples when the live workload started (empty in backlog
    /// mode): the summary's latencies are of what came after.
    pub latency_base: (Vec<Sample>, Vec<Sample>),
    /// The probe's figures (live mode; none when every clinic had an offline window).
    pub probe: Option<(String, super::probe::ProbeFigures)>,
    /// Each stage's peak resident set (MB), read at the end of the drain.
    pub peak_rss_mb: BTreeMap<String, f64>,
    /// Each stage's CPU seconds, and the machine's busy fraction (all cores) over the pipeline.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// With `--lake-first`: each stage's and server's CPU seconds until the lake held everything.
    pub lake_cpu: Option<BTreeMap<String, f64>>,
    pub machine_busy: Option<f64>,
    /// Seconds from the end of the workload until every stage had read to the end.
    pub drain_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct SiteSummary {
    pub name: String,
    pub url: String,
    /// Row changes the clinic wrote during the workload.
    pub rows_written: u64,
    /// Change events (snapshot and binlog) in omrs.cdc.<site>, as the transform read them to
    /// the end of the topic.
    pub events_captured: u64,
    /// Events released after the global watermark had passed them (the site was away).
    pub late_events: u64,
    /// The largest distance from now to this site's watermark seen during the run.
    pub max_watermark_delay_s: f64,
    /// Messages of omrs.cdc.<site> the transform had not consumed at the end.
    pub final_lag_messages: Option<i64>,
    pub offline_windows: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryResult {
    pub title: String,
    pub sql: String,
    pub output: String,
}

#[derive(Debug, Serialize)]
pub struct AggSummary {
    pub name: String,
    pub hq_table: String,
    pub windows: i64,
    pub final_windows: i64,
    /// Windows corrected after they were final (revision above 1).
    pub corrected_windows: i64,
    pub max_revision: i64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub run_id: String,
    pub mode: String,
    pub sites: Vec<SiteSummary>,
    pub row_changes_written: u64,
    pub events_captured: u64,
    pub hq_changes: u64,
    pub identity_merges: u64,
    pub hq_merges_logged: i64,
    /// Identity reviews at HQ waiting for a person (status open), and all of them.
    pub reviews_open: i64,
    pub reviews_total: i64,
    pub conflicts: i64,
    pub pending: i64,
    pub dead_letters: u64,
    /// The dead letters by stage and kind, with the first one's reason: the next failure of
    /// this kind names itself in the summary.
    pub dead_letter_kinds: Vec<DeadLetterKind>,
    pub hq_active_patients: i64,
    /// The dashboard aggregates at HQ (`omrs_dash_*`), per aggregate.
    pub aggregates: Vec<AggSummary>,
    pub hq_rows_applied: u64,
    pub lake_rows_written: u64,
    /// Seconds from starting the pipeline to the end of the drain.
    pub pipeline_seconds: f64,
    /// Change events captured per second of pipeline time.
    pub throughput_events_per_s: f64,
    /// `--lake-first`: seconds from starting the pipeline until the lake held everything with
    /// the HQ sink off, and the events captured per second of it (the lake alone, end to end).
    pub lake_only_seconds: Option<f64>,
    pub lake_only_events_per_s: Option<f64>,
    pub e2e_latency_p50_s: Option<f64>,
    pub e2e_latency_p99_s: Option<f64>,
    pub e2e_latency_observations: u64,
    /// Site commit → the lake's commit of the file set holding the change (queryable).
    pub lake_latency_p50_s: Option<f64>,
    pub lake_latency_p99_s: Option<f64>,
    /// The same p99 per clinic: a clinic whose clock is behind puts its own changes in the
    /// histogram's top bucket, and the figure of all clinics says nothing of the others.
    pub lake_latency_p99_by_site_s: BTreeMap<String, f64>,
    pub lake_latency_observations: u64,
    /// The clinic the latency probe wrote at, and its figures: site commit → visible at HQ,
    /// measured from outside the pipeline (`super::probe`).
    pub probe_site: Option<String>,
    pub probe_hq: Option<super::probe::ProbeFigures>,
    /// Each stage's peak resident set (MB; VmHWM at the end of the drain): agents that stopped
    /// for an offline window count from their last start.
    pub peak_rss_mb: BTreeMap<String, f64>,
    /// Each stage's CPU seconds (user + system, summed over its runs) until the end of the
    /// drain, and the fraction of the machine's cores busy over the pipeline's time (the
    /// MariaDB servers and the broker included): where a replay's time goes.
    pub cpu_seconds: BTreeMap<String, f64>,
    pub machine_cpu_busy: Option<f64>,
    /// With `--lake-first`: the CPU seconds each stage and server used until the lake held
    /// everything (the HQ sink not yet started): the lake path's cost per event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lake_only_cpu_seconds: Option<BTreeMap<String, f64>>,
    pub drained: bool,
    /// Seconds from the end of the workload (or of the backlog's writing) until every stage
    /// had read to the end.
    pub drain_seconds: f64,
    pub verify_ok: bool,
    pub problems: Vec<String>,
    pub queries: Vec<QueryResult>,
    pub hq_url: String,
    pub lake: PathBuf,
    pub run_dir: PathBuf,
    pub config: PathBuf,
    pub logs: PathBuf,
    pub manifest: PathBuf,
    pub topic_prefix: String,
    pub metrics_endpoints: BTreeMap<String, String>,
    pub total_seconds: f64,
    #[serde(skip)]
    pub verify_text: String,
}

/// Records readable in `topic` (read_committed), counted by reading them, every partition.
/// Dead letters of one stage and kind.
#[derive(Debug, Serialize)]
pub struct DeadLetterKind {
    pub stage: String,
    pub kind: String,
    pub count: u64,
    pub first_reason: String,
}

/// The dead-letter topic's records counted by stage and kind (a record that is not the DLQ's
/// JSON counts as stage and kind `?`).
fn dead_letters(cfg: &Config, topic: &str) -> anyhow::Result<(u64, Vec<DeadLetterKind>)> {
    let mut kinds: std::collections::BTreeMap<(String, String), DeadLetterKind> = Default::default();
    let mut n = 0u64;
    omrs_core::kafka::read_to_end(&cfg.kafka, topic, |_, payload, _| {
        n += 1;
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
        let (stage, kind) = (field("stage"), field("kind"));
        let entry = kinds.entry((stage.clone(), kind.clone())).or_insert_with(|| DeadLetterKind { stage, kind, count: 0, first_reason: field("reason") });
        entry.count += 1;
        Ok(())
    })?;
    Ok((n, kinds.into_values().collect()))
}

const QUERIES: [(&str, &str); 2] = [
    (
        "encounters per site and month (encounters_flat)",
        "SELECT site, to_char(date_trunc('month', encounter_datetime), '%Y-%m') AS month, COUNT(*) AS encounters FROM encounters_flat GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 12",
    ),
    (
        "latest weight of 5 patients (obs_flat)",
        "SELECT patient_uuid, value_numeric AS kg, obs_datetime FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY patient_uuid ORDER BY obs_datetime DESC) AS rn FROM obs_flat WHERE concept_uuid = '5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA') w WHERE rn = 1 ORDER BY patient_uuid LIMIT 5",
    ),
];

pub async fn build(cfg: &Config, f: Facts, hq: &mut mysql_async::Conn, verify: omrs_sinks::verify::Report) -> anyhow::Result<Summary> {
    let manifest: omrs_simulate::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(&f.manifest).with_context(|| format!("reading {}", f.manifest.display()))?).context("the run's manifest")?;
    let names = omrs_core::topics::TopicNames::new(f.prefix.clone());
    let t = &f.transform;
    let transformed = prom::by_label(t, m::EVENTS_IN, "site", |s| s.label("op") != Some("heartbeat"));
    let late = prom::by_label(t, m::LATE_EVENTS, "site", |_| true);
    let mut sites = Vec::new();
    for (i, name) in f.sites.iter().enumerate() {
        let sm = manifest.sites.iter().find(|s| &s.name == name);
        sites.push(SiteSummary {
            name: name.clone(),
            url: cfg.sites.get(i).map(|s| s.database.redacted_url()).unwrap_or_default(),
            rows_written: sm.map(|s| s.row_changes).unwrap_or(0),
            events_captured: transformed.get(name).copied().unwrap_or(0.0) as u64,
            late_events: late.get(name).copied().unwrap_or(0.0) as u64,
            max_watermark_delay_s: f.max_delay_ms.get(name).copied().unwrap_or(0) as f64 / 1000.0,
            final_lag_messages: f.lags.iter().find(|l| l.stage == "transform" && l.topic == names.cdc(name)).and_then(|l| l.messages),
            offline_windows: f.windows.iter().filter(|w| &w.0 == name).map(|w| format!("from {:.0} s for {:.0} s", w.1, w.2)).collect(),
        });
    }
    let count = |v: Option<i64>| v.unwrap_or(0);
    let conflicts = count(hq.query_first("SELECT COUNT(*) FROM omrs_sync_conflict").await.context("counting conflicts")?);
    let pending = count(hq.query_first("SELECT COUNT(*) FROM omrs_sync_pending").await.context("counting pending rows")?);
    let merges_logged = count(hq.query_first("SELECT COUNT(*) FROM omrs_sync_merge").await.context("counting merges")?);
    let active = count(hq.query_first("SELECT COUNT(*) FROM patient WHERE voided = 0").await.context("counting patients")?);
    let reviews_open = count(hq.query_first("SELECT COUNT(*) FROM omrs_sync_identity_review WHERE status = 'open'").await.context("counting open identity reviews")?);
    let reviews_total = count(hq.query_first("SELECT COUNT(*) FROM omrs_sync_identity_review").await.context("counting identity reviews")?);
    let (dead_letters, dead_letter_kinds) = dead_letters(cfg, &names.dlq())?;
    let mut aggregates = Vec::new();
    for def in omrs_core::hq::AGGREGATES.iter() {
        // (windows, final, revised, highest revision)
        type Counts = (i64, Option<i64>, Option<i64>, Option<i64>);
        let row: Option<Counts> = hq
            .query_first(format!("SELECT COUNT(*), SUM(is_final), SUM(revision > 1), MAX(revision) FROM {}", def.hq_table))
            .await
            .with_context(|| format!("reading {}", def.hq_table))?;
        let (windows, fin, corrected, max_rev) = row.unwrap_or((0, None, None, None));
        aggregates.push(AggSummary {
            name: def.name.to_string(),
            hq_table: def.hq_table.to_string(),
            windows,
            final_windows: fin.unwrap_or(0),
            corrected_windows: corrected.unwrap_or(0),
            max_revision: max_rev.unwrap_or(0),
        });
    }
    let mut queries = Vec::new();
    for (title, sql) in QUERIES {
        let args = omrs_sinks::query::QueryArgs { sql: Some(sql.to_string()), tables: false, format: omrs_sinks::query::Format::Table, lake: None, server: Default::default() };
        let output = match omrs_sinks::query::run(&f.lake, &args).await {
            Ok(o) => o.trim_end().to_string(),
            Err(e) => format!("(query failed: {e})"),
        };
        queries.push(QueryResult { title: title.to_string(), sql: sql.to_string(), output });
    }
    let captured: f64 = transformed.values().sum();
    let latency = prom::minus(&f.hq, &f.latency_base.0);
    let lake_latency = prom::minus(&f.parquet, &f.latency_base.1);
    let e2e_count = prom::sum(&latency, &format!("{}_count", m::HQ_E2E_LATENCY), &[]) as u64;
    let mut problems = f.problems;
    problems.extend(verify.problems.iter().cloned());
    let verify_ok = verify.ok && f.drained;
    Ok(Summary {
        ok: verify_ok,
        run_id: f.run_id,
        mode: if f.backlog { "backlog (cold replay)".into() } else { "live".into() },
        sites,
        row_changes_written: f.sim_rows,
        events_captured: captured as u64,
        hq_changes: prom::sum(t, m::EVENTS_OUT, &[("stage", "transform")]) as u64,
        identity_merges: prom::sum(t, m::MERGES, &[]) as u64,
        hq_merges_logged: merges_logged,
        reviews_open,
        reviews_total,
        conflicts,
        pending,
        dead_letters,
        dead_letter_kinds,
        hq_active_patients: active,
        aggregates,
        hq_rows_applied: prom::sum(&f.hq, m::HQ_ROWS_APPLIED, &[]) as u64,
        lake_rows_written: prom::sum(&f.parquet, m::LAKE_ROWS_WRITTEN, &[]) as u64,
        pipeline_seconds: f.pipeline_secs,
        throughput_events_per_s: captured / f.pipeline_secs.max(0.001),
        lake_only_seconds: f.lake_secs,
        lake_only_events_per_s: f.lake_secs.map(|l| captured / l.max(0.001)),
        e2e_latency_p50_s: prom::quantile(&latency, m::HQ_E2E_LATENCY, 0.5),
        e2e_latency_p99_s: prom::quantile(&latency, m::HQ_E2E_LATENCY, 0.99),
        e2e_latency_observations: e2e_count,
        lake_latency_p50_s: prom::quantile(&lake_latency, m::LAKE_E2E_LATENCY, 0.5),
        lake_latency_p99_s: prom::quantile(&lake_latency, m::LAKE_E2E_LATENCY, 0.99),
        lake_latency_p99_by_site_s: f
            .sites
            .iter()
            .filter_map(|site| {
                let of_site: Vec<prom::Sample> = lake_latency.iter().filter(|x| x.label("site") == Some(site.as_str())).cloned().collect();
                prom::quantile(&of_site, m::LAKE_E2E_LATENCY, 0.99).map(|q| (site.clone(), (q * 100.0).round() / 100.0))
            })
            .collect(),
        lake_latency_observations: prom::sum(&lake_latency, &format!("{}_count", m::LAKE_E2E_LATENCY), &[]) as u64,
        probe_site: f.probe.as_ref().map(|(site, _)| site.clone()),
        probe_hq: f.probe.map(|(_, figures)| figures),
        peak_rss_mb: f.peak_rss_mb,
        cpu_seconds: tenths(&f.cpu_seconds),
        machine_cpu_busy: f.machine_busy.map(|b| (b * 100.0).round() / 100.0),
        lake_only_cpu_seconds: f.lake_cpu.as_ref().map(tenths),
        drained: f.drained,
        drain_seconds: f.drain_secs,
        verify_ok,
        problems,
        queries,
        hq_url: cfg.hq.database.redacted_url(),
        lake: f.lake,
        run_dir: f.run_dir,
        config: f.config,
        logs: f.logs,
        manifest: f.manifest,
        topic_prefix: f.prefix,
        metrics_endpoints: f.endpoints.into_iter().collect(),
        total_seconds: f.total_secs,
        verify_text: omrs_sinks::verify::render(&verify),
    })
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into())
}

/// CPU seconds rounded to a tenth, for the summary.
fn tenths(cpu: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    cpu.iter().map(|(n, s)| (n.clone(), (s * 10.0).round() / 10.0)).collect()
}

/// The summary for a terminal.
pub fn render(s: &Summary) -> String {
    let mut o = String::new();
    o.push_str(&format!("\n== omrs-stream demo {} ({}): {}\n", s.run_id, s.mode, if s.ok { "VERIFIED" } else { "FAILED" }));
    o.push_str("\nsites\n");
    o.push_str(&format!(
        "  {:<8} {:>12} {:>12} {:>8} {:>14} {:>10}  {}\n",
        "site", "rows written", "captured", "late", "max wm delay", "final lag", "offline"
    ));
    for x in &s.sites {
        o.push_str(&format!(
            "  {:<8} {:>12} {:>12} {:>8} {:>12.1} s {:>10}  {}\n",
            x.name,
            fmt_n(x.rows_written as f64),
            fmt_n(x.events_captured as f64),
            fmt_n(x.late_events as f64),
            x.max_watermark_delay_s,
            x.final_lag_messages.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            x.offline_windows.join(", ")
        ));
    }
    o.push_str("\npipeline\n");
    o.push_str(&format!("  events captured       {} ({} row changes written during the workload; the rest is the snapshot)\n", fmt_n(s.events_captured as f64), fmt_n(s.row_changes_written as f64)));
    o.push_str(&format!("  throughput            {:.0} events/s over {:.1} s of pipeline time\n", s.throughput_events_per_s, s.pipeline_seconds));
    if let (Some(secs), Some(rate)) = (s.lake_only_seconds, s.lake_only_events_per_s) {
        o.push_str(&format!("  the lake alone        {rate:.0} events/s: every event in the lake {secs:.1} s into the pipeline, the HQ sink off (--lake-first); HQ after it\n"));
    }
    if s.mode == "live" {
        o.push_str(&format!("  end-to-end latency    p50 {} · p99 {} (site commit → HQ commit, {} rows of the live workload)\n", secs(s.e2e_latency_p50_s), secs(s.e2e_latency_p99_s), fmt_n(s.e2e_latency_observations as f64)));
        o.push_str(&format!("  to the lake           p50 {} · p99 {} (site commit → the lake's commit of the change, {} site transactions)\n", secs(s.lake_latency_p50_s), secs(s.lake_latency_p99_s), fmt_n(s.lake_latency_observations as f64)));
        if s.lake_latency_p99_by_site_s.len() > 1 {
            let per: Vec<String> = s.lake_latency_p99_by_site_s.iter().map(|(site, q)| format!("{site} {q:.2} s")).collect();
            o.push_str(&format!("                        p99 per clinic: {}\n", per.join(", ")));
        }
        if let (Some(site), Some(p)) = (&s.probe_site, &s.probe_hq) {
            o.push_str(&format!(
                "  probe to HQ           p50 {} · p99 {} (a change committed at {site} every 100 ms, read back at HQ every 10 ms: {} samples; the rows above date a change by its binlog second)\n",
                secs(p.p50_s),
                secs(p.p99_s),
                p.samples
            ));
            if !p.by_stage.is_empty() {
                let stages: Vec<String> = p.by_stage.iter().map(|(n, p50, p99)| format!("{n} {p50:.2} / {p99:.2} s")).collect();
                o.push_str(&format!("                        by stage, p50 / p99: {}\n", stages.join(" · ")));
            }
            let slowest: Vec<String> = p
                .slowest
                .iter()
                .zip(p.slowest_by_stage.iter().map(Some).chain(std::iter::repeat(None)))
                .map(|((t, l), split)| match split.copied().flatten() {
                    Some([a, tr, hq]) => format!("{l:.2} s at {t:.0} s ({a:.2}/{tr:.2}/{hq:.2})"),
                    None => format!("{l:.2} s at {t:.0} s"),
                })
                .collect();
            o.push_str(&format!("                        slowest: {} (seconds into the workload; agent/transform/HQ sink)\n", slowest.join(", ")));
        }
    } else {
        o.push_str("  end-to-end latency    not meaningful for a backlog (every row waited for the pipeline to start)\n");
    }
    if !s.peak_rss_mb.is_empty() {
        let rss: Vec<String> = s.peak_rss_mb.iter().map(|(n, mb)| format!("{n} {mb:.0} MB")).collect();
        o.push_str(&format!("  peak memory (RSS)     {}\n", rss.join(", ")));
    }
    if !s.cpu_seconds.is_empty() {
        let cpu: Vec<String> = s.cpu_seconds.iter().map(|(n, secs)| format!("{n} {secs:.0} s")).collect();
        let busy = s.machine_cpu_busy.map(|b| format!("; the machine's cores {:.0} % busy", b * 100.0)).unwrap_or_default();
        o.push_str(&format!("  CPU time              {}{busy}\n", cpu.join(", ")));
    }
    if let Some(lake) = &s.lake_only_cpu_seconds {
        let cpu: Vec<String> = lake.iter().map(|(n, secs)| format!("{n} {secs:.0} s")).collect();
        o.push_str(&format!("  CPU, the lake alone   {}\n", cpu.join(", ")));
    }
    o.push_str(&format!("  identity merges       {} (HQ merge log: {})\n", s.identity_merges, s.hq_merges_logged));
    o.push_str(&format!(
        "  identity reviews      {} open of {} (list: omrs-stream --config {} identity list --status open)\n",
        s.reviews_open,
        s.reviews_total,
        s.config.display()
    ));
    o.push_str(&format!("  conflicts             {}\n", s.conflicts));
    o.push_str(&format!("  pending at HQ         {}\n", s.pending));
    o.push_str(&format!("  dead letters          {}\n", s.dead_letters));
    for k in &s.dead_letter_kinds {
        let reason: String = k.first_reason.chars().take(160).collect();
        o.push_str(&format!("    {} {}: {} (first: {reason})\n", k.stage, k.kind, k.count));
    }
    if s.dead_letters > 0 {
        o.push_str(&format!("    list: omrs-stream --config {} dlq list\n", s.config.display()));
    }
    o.push_str(&format!("  HQ                    {} active patients, {} rows applied\n", fmt_n(s.hq_active_patients as f64), fmt_n(s.hq_rows_applied as f64)));
    o.push_str(&format!("  lake                  {} rows written\n", fmt_n(s.lake_rows_written as f64)));
    o.push_str("  aggregates (HQ omrs_dash_*, lake aggregates.*)\n");
    for a in &s.aggregates {
        o.push_str(&format!(
            "    {:<24} {} windows, {} final, {} corrected after final (highest revision {})\n",
            a.name, a.windows, a.final_windows, a.corrected_windows, a.max_revision
        ));
    }
    for q in &s.queries {
        o.push_str(&format!("\nquery: {}\n  omrs-stream query --lake {} \"{}\"\n", q.title, s.lake.display(), q.sql));
        for line in q.output.lines() {
            o.push_str(&format!("  {line}\n"));
        }
    }
    o.push_str("\nverify\n");
    for line in s.verify_text.lines() {
        o.push_str(&format!("  {line}\n"));
    }
    o.push_str("\nwhere\n");
    o.push_str(&format!("  HQ database    {}\n", s.hq_url));
    o.push_str(&format!("  lake           {}\n", s.lake.display()));
    o.push_str(&format!("  config         {}\n", s.config.display()));
    o.push_str(&format!("                 export OMRS_CONFIG={}   # the README's examples then use this run\n", s.config.display()));
    o.push_str(&format!("  logs           {}\n", s.logs.display()));
    o.push_str(&format!("  manifest       {}\n", s.manifest.display()));
    o.push_str(&format!("  topics         {}omrs.*\n", s.topic_prefix));
    o.push_str("  metrics (while the demo runs; Prometheus scrape config in deploy/prometheus/)\n");
    for (name, url) in &s.metrics_endpoints {
        o.push_str(&format!("    {name:<14} {url}\n"));
    }
    if !s.problems.is_empty() {
        o.push_str("\nproblems\n");
        for p in &s.problems {
            o.push_str(&format!("  - {p}\n"));
        }
    }
    o.push_str(&format!("\n{} in {:.0} s\n", if s.ok { "demo verified" } else { "demo FAILED verification" }, s.total_seconds));
    o
}
