//! `omrs-stream verify`: the reconciliation report an operator runs in production. Read only.
//!
//! Presence, one pass per table and server, set-based: the uuids of every uuid-keyed table at
//! each site and at HQ, compared in memory; FK orphans and identity duplicates as one SQL
//! statement each at HQ; the lake's current keys against HQ's; the lag of each stage from the
//! offsets it stored. Values (`values.rs`): every HQ row against the row the conflict rule and
//! the merges say should win, column by column in uuid space; the lake's current tables
//! against HQ value for value, and its change history for repeated rows (`lake.rs`). With
//! `--manifest` (the simulator's ground truth), every human must be exactly one unvoided
//! patient at HQ. Exit code 1 on any discrepancy.

mod lake;
mod space;
mod values;

pub use lake::{HistoryDuplicates, ReviewCheck};
pub use values::{TableValues, ValueDiff};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::config::{Config, DatabaseConfig};
use omrs_core::kafka::client_config;
use omrs_core::topics::TopicNames;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde::Serialize;

use crate::SinkError;

/// Memory for sorting one lake table into key order; a larger table spills to the temporary
/// directory.
const LAKE_SORT_MEMORY: usize = 512 << 20;

/// `omrs-stream verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The simulator's manifest (`simulate --manifest`): also check identity against it.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The lake, instead of sinks.parquet.path.
    #[arg(long)]
    pub lake: Option<PathBuf>,
    /// Do not compare the lake.
    #[arg(long)]
    pub no_lake: bool,
    /// Sample uuids listed per discrepancy.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Check presence only: do not compare values (faster on a large HQ).
    #[arg(long)]
    pub no_values: bool,
    /// Check one clinic: its rows are at HQ, with HQ's own checks (orphans, identifiers, the
    /// lake, lag). Values and HQ rows no clinic holds need every clinic: not checked.
    #[arg(long)]
    pub site: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub struct TableCheck {
    pub table: String,
    pub hq_rows: usize,
    pub site_rows: BTreeMap<String, usize>,
    /// Site rows not at HQ, by site.
    pub missing: BTreeMap<String, usize>,
    /// HQ rows no site holds (and HQ did not write itself).
    pub extra: usize,
    pub sample_missing: Vec<String>,
    pub sample_extra: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Orphans {
    pub table: String,
    pub column: String,
    pub references: String,
    pub rows: i64,
}

#[derive(Debug, Serialize)]
pub struct Duplicate {
    pub identifier_type: String,
    pub identifier: String,
    pub patients: Vec<String>,
    /// The review that keeps these patients apart (a split, or an open `identifier_shared`
    /// review waiting for a person): listed, not a problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LakeCheck {
    pub table: String,
    pub hq_rows: usize,
    pub lake_rows: usize,
    pub missing: usize,
    pub extra: usize,
    pub sample: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Lag {
    pub stage: String,
    pub topic: String,
    /// Messages behind the topic's end; None when the stage has stored no position.
    pub messages: Option<i64>,
}

#[derive(Debug, Serialize, Default)]
pub struct ManifestCheck {
    pub humans: usize,
    /// Humans without exactly one unvoided HQ patient among their records.
    pub wrong: usize,
    /// Humans whose one unvoided record is not the survivor the manifest names.
    pub wrong_survivor: usize,
    pub sample: Vec<String>,
    pub expected_active_patients: Option<u64>,
    pub active_patients: i64,
}

#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub ok: bool,
    /// With `--site`: what was left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub tables: Vec<TableCheck>,
    pub orphans: Vec<Orphans>,
    pub identity_duplicates: Vec<Duplicate>,
    pub lake: Vec<LakeCheck>,
    pub lake_checked: bool,
    pub lag: Vec<Lag>,
    pub manifest: Option<ManifestCheck>,
    /// Per table: HQ rows compared with the sites' winners, value for value.
    pub values: Vec<TableValues>,
    /// Per table: the lake's current rows compared with HQ's, value for value.
    pub lake_values: Vec<TableValues>,
    /// Repeated rows in the lake's change history.
    pub lake_history_duplicates: Vec<HistoryDuplicates>,
    /// The identity review queue at HQ against the lake's.
    pub lake_reviews: Option<lake::ReviewCheck>,
    /// Merged persons whose chain of survivors never ends (a loop).
    pub merge_loops: Vec<String>,
    /// HQ's own `person_merge_log` rows for a loser that a site's log also names (the site logs
    /// its own merges), and applied HQ merges whose loser no log names.
    pub merge_logs_doubled: i64,
    pub merge_logs_missing: i64,
    /// Time the value checks took.
    pub values_ms: u64,
    pub problems: Vec<String>,
}

async fn connect(d: &DatabaseConfig, what: &str) -> Result<Conn, SinkError> {
    let opts = crate::mysql_opts(d);
    Conn::new(opts).await.map_err(|e| SinkError::db(format!("connecting to {what} ({})", d.redacted_url()), e))
}

fn q(id: &str) -> String {
    format!("`{}`", id.replace('`', "``"))
}

/// Tables with a `uuid` column in `db`.
async fn uuid_tables(c: &mut Conn, db: &str) -> Result<Vec<String>, SinkError> {
    c.exec(
        "SELECT c.table_name FROM information_schema.columns c JOIN information_schema.tables t
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE'
         WHERE c.table_schema = ? AND c.column_name = 'uuid' AND c.table_name NOT LIKE 'omrs\\_%' ORDER BY 1",
        (db,),
    )
    .await
    .map_err(|e| SinkError::db("reading information_schema", e))
}

async fn uuids(c: &mut Conn, table: &str, what: &str) -> Result<HashSet<String>, SinkError> {
    let v: Vec<Option<String>> = c.query(format!("SELECT uuid FROM {}", q(table))).await.map_err(|e| SinkError::db(format!("reading {what}.{table}"), e))?;
    Ok(v.into_iter().flatten().collect())
}

/// Runs every check.
pub async fn run(cfg: &Config, args: &VerifyArgs) -> Result<Report, SinkError> {
    let mut r = Report::default();
    let hq_db = &cfg.hq.database.database;
    let checked: Vec<&omrs_core::config::SiteConfig> = cfg.sites.iter().filter(|s| args.site.as_ref().is_none_or(|one| *one == s.name)).collect();
    if let Some(one) = &args.site {
        if checked.is_empty() {
            let names: Vec<&str> = cfg.sites.iter().map(|s| s.name.as_str()).collect();
            return Err(SinkError::Usage(format!("--site {one}: no such site in the config (its sites: {})", names.join(", "))));
        }
        r.scope = Some(format!("one clinic, {one}: its rows at HQ; values and HQ rows no clinic holds need every clinic and were not checked"));
    }
    let mut hq = connect(&cfg.hq.database, "HQ").await?;
    let mut sites = Vec::new();
    for s in &checked {
        sites.push((s.name.clone(), connect(&s.database, &format!("site {}", s.name)).await?));
    }

    // 1. Every live site row is at HQ; nothing at HQ is unexplained.
    let hq_written: HashSet<String> = hq
        .query::<Option<String>, _>("SELECT merge_log_uuid FROM omrs_sync_merge WHERE merge_log_uuid IS NOT NULL")
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_merge", e))?
        .into_iter()
        .flatten()
        .collect();
    let mut hq_sets: HashMap<String, HashSet<String>> = HashMap::new();
    let mut site_tables: HashMap<String, HashSet<String>> = HashMap::new();
    for ((name, c), s) in sites.iter_mut().zip(&checked) {
        site_tables.insert(name.clone(), uuid_tables(c, &s.database.database).await?.into_iter().collect());
    }
    for table in uuid_tables(&mut hq, hq_db).await? {
        let at_hq = uuids(&mut hq, &table, "HQ").await?;
        let mut check = TableCheck { table: table.clone(), hq_rows: at_hq.len(), ..Default::default() };
        let mut union: HashSet<String> = HashSet::new();
        for (name, c) in sites.iter_mut() {
            if !site_tables.get(name.as_str()).is_some_and(|t| t.contains(&table)) {
                continue;
            }
            let set = uuids(c, &table, name).await?;
            let missing: Vec<&String> = set.iter().filter(|u| !at_hq.contains(*u)).collect();
            if !missing.is_empty() {
                check.missing.insert(name.clone(), missing.len());
                check.sample_missing.extend(missing.iter().take(args.samples).map(|u| format!("{name}:{u}")));
            }
            check.site_rows.insert(name.clone(), set.len());
            union.extend(set);
        }
        // With one clinic, the others' rows would all look unexplained.
        let extra: Vec<&String> = if args.site.is_some() { Vec::new() } else { at_hq.iter().filter(|u| !union.contains(*u) && !hq_written.contains(*u)).collect() };
        check.extra = extra.len();
        check.sample_extra = extra.iter().take(args.samples).map(|u| u.to_string()).collect();
        if !check.missing.is_empty() || check.extra > 0 {
            r.problems.push(format!(
                "{table}: {} site rows missing at HQ ({:?}), {} HQ rows no site holds",
                check.missing.values().sum::<usize>(),
                check.missing,
                check.extra
            ));
        }
        hq_sets.insert(table, at_hq);
        r.tables.push(check);
    }

    // 2. No FK orphans at HQ.
    check_orphans(&mut hq, hq_db, &mut r).await?;

    // 3. No two unvoided HQ patients share a configured identifier.
    check_identifiers(cfg, &mut hq, &mut r).await?;

    // 4. The lake's current tables equal HQ in uuid space, and so does its review queue.
    let lake_root = args.lake.clone().unwrap_or_else(|| cfg.sinks.parquet.path.clone());
    if !args.no_lake {
        let ctx = crate::query::context(&lake_root).await?;
        r.lake_checked = true;
        let lake_tables: HashSet<String> = crate::query::table_names(&ctx).await.iter().filter_map(|n| n.strip_prefix("current.")).map(str::to_string).collect();
        let mut absent: Vec<(&String, usize)> = hq_sets.iter().filter(|(t, rows)| !rows.is_empty() && !lake_tables.contains(*t)).map(|(t, rows)| (t, rows.len())).collect();
        absent.sort();
        for (t, n) in absent {
            r.problems.push(format!("lake: HQ's table {t} ({n} rows) is not in the lake (no current.{t})"));
        }
        for t in crate::query::table_names(&ctx).await.iter().filter_map(|n| n.strip_prefix("current.")) {
            let Some(at_hq) = hq_sets.get(t) else { continue };
            let batches = crate::query::sql(&ctx, &format!("SELECT _row_key FROM current.{t}")).await?;
            let mut lake: HashSet<String> = HashSet::new();
            for b in &batches {
                let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).map_err(|e| SinkError::Query(format!("current.{t}._row_key: {e}")))?;
                if let Some(a) = col.as_any().downcast_ref::<arrow::array::StringArray>() {
                    lake.extend(a.iter().flatten().map(str::to_string));
                }
            }
            let missing: Vec<&String> = at_hq.iter().filter(|u| !lake.contains(*u) && !hq_written.contains(*u)).collect();
            let extra: Vec<&String> = lake.iter().filter(|u| !at_hq.contains(*u)).collect();
            if !missing.is_empty() || !extra.is_empty() {
                r.problems.push(format!("lake current.{t}: {} HQ rows missing, {} rows HQ does not hold", missing.len(), extra.len()));
            }
            r.lake.push(LakeCheck {
                table: t.to_string(),
                hq_rows: at_hq.len(),
                lake_rows: lake.len(),
                missing: missing.len(),
                extra: extra.len(),
                sample: missing.iter().chain(extra.iter()).take(args.samples).map(|u| u.to_string()).collect(),
            });
        }
        let reviews = lake::reviews(&ctx, &mut hq, args.samples).await?;
        if reviews.differing > 0 {
            r.problems.push(format!("identity reviews: {} differ between HQ ({}) and the lake ({}), e.g. {:?}", reviews.differing, reviews.hq, reviews.lake, reviews.sample));
        }
        r.lake_reviews = Some(reviews);
    }

    // 5. Values: HQ against the sites' winners, the lake against HQ, the lake's history.
    if !args.no_values && args.site.is_none() {
        let started = std::time::Instant::now();
        value_checks(cfg, args, &lake_root, &hq_written, &mut r).await?;
        r.values_ms = started.elapsed().as_millis() as u64;
    }

    // 6. Lag of every stage, from the positions they stored.
    r.lag = stage_lags(cfg, Some(&mut hq), (!args.no_lake).then_some(lake_root.as_path())).await?;
    for l in &r.lag {
        if l.messages.is_some_and(|m| m > 0) {
            r.problems.push(format!("{} is {} messages behind on {}", l.stage, l.messages.unwrap_or(0), l.topic));
        }
    }

    // 7. The simulator's ground truth.
    if let Some(path) = &args.manifest {
        r.manifest = Some(check_manifest(&mut hq, path, args.samples, &mut r).await?);
    }
    r.ok = r.problems.is_empty();
    Ok(r)
}

/// No HQ row references a row HQ lacks.
async fn check_orphans(hq: &mut Conn, hq_db: &str, r: &mut Report) -> Result<(), SinkError> {
    let fks: Vec<(String, String, String, String)> = hq
        .exec(
            "SELECT table_name, column_name, referenced_table_name, referenced_column_name FROM information_schema.key_column_usage
             WHERE table_schema = ? AND referenced_table_name IS NOT NULL AND table_name NOT LIKE 'omrs\\_%'",
            (hq_db,),
        )
        .await
        .map_err(|e| SinkError::db("reading the foreign keys", e))?;
    for (t, col, rt, rc) in fks {
        let n: Option<i64> = hq
            .query_first(format!(
                "SELECT COUNT(*) FROM {} c LEFT JOIN {} p ON c.{} = p.{} WHERE c.{} IS NOT NULL AND p.{} IS NULL",
                q(&t),
                q(&rt),
                q(&col),
                q(&rc),
                q(&col),
                q(&rc)
            ))
            .await
            .map_err(|e| SinkError::db(format!("counting orphans of {t}.{col}"), e))?;
        if let Some(n) = n.filter(|n| *n > 0) {
            r.problems.push(format!("{t}.{col}: {n} rows reference a missing {rt}"));
            r.orphans.push(Orphans { table: t, column: col, references: rt, rows: n });
        }
    }
    Ok(())
}

/// The reviews that keep patients apart on purpose: split merges, and open `identifier_shared`
/// reviews (a person decides). Per review, the survivors at HQ of the records it names.
async fn kept_apart(hq: &mut Conn) -> Result<Vec<(String, std::collections::BTreeSet<String>)>, SinkError> {
    let rows: Vec<(String, String)> = hq
        .query("SELECT review_id, records FROM omrs_sync_identity_review WHERE status = 'split' OR (status = 'open' AND reason = 'identifier_shared')")
        .await
        .map_err(|e| SinkError::db("reading the identity reviews", e))?;
    let mut out = Vec::new();
    for (id, records) in rows {
        let mut survivors = std::collections::BTreeSet::new();
        for rec in serde_json::from_str::<Vec<String>>(&records).unwrap_or_default() {
            let w: Option<String> = hq.exec_first("SELECT winner_uuid FROM omrs_sync_merge WHERE loser_uuid = ?", (rec.as_str(),)).await.map_err(|e| SinkError::db("reading the merges", e))?;
            survivors.insert(w.unwrap_or(rec));
        }
        out.push((id, survivors));
    }
    Ok(out)
}

/// No two unvoided HQ patients share a configured identifier (normalised as the transform
/// normalises it).
async fn check_identifiers(cfg: &Config, hq: &mut Conn, r: &mut Report) -> Result<(), SinkError> {
    for rule in &cfg.identity.identifiers {
        let rows: Vec<(String, String)> = hq
            .exec(
                "SELECT pi.identifier, p.uuid FROM patient_identifier pi
                 JOIN patient_identifier_type t ON t.patient_identifier_type_id = pi.identifier_type
                 JOIN patient pa ON pa.patient_id = pi.patient_id AND pa.voided = 0
                 JOIN person p ON p.person_id = pi.patient_id
                 WHERE pi.voided = 0 AND t.uuid = ?",
                (rule.identifier_type_uuid.as_str(),),
            )
            .await
            .map_err(|e| SinkError::db("reading identifiers", e))?;
        let mut by: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (value, person) in rows {
            by.entry(rule.normalize(&value)).or_default().insert(person);
        }
        let apart = kept_apart(hq).await?;
        for (identifier, persons) in by.into_iter().filter(|(_, p)| p.len() > 1) {
            let review = apart.iter().find(|(_, survivors)| persons.is_subset(survivors)).map(|(id, _)| id.clone());
            if review.is_none() {
                r.problems.push(format!("identifier {identifier} ({}) is on {} unvoided patients", rule.identifier_type_uuid, persons.len()));
            }
            r.identity_duplicates.push(Duplicate { identifier_type: rule.identifier_type_uuid.clone(), identifier, patients: persons.into_iter().collect(), review });
        }
    }
    Ok(())
}

/// The simulator's ground truth: each human is exactly one unvoided patient at HQ, its survivor.
async fn check_manifest(hq: &mut Conn, path: &std::path::Path, samples: usize, r: &mut Report) -> Result<ManifestCheck, SinkError> {
    let text = std::fs::read(path).map_err(|e| SinkError::io(format!("reading {}", path.display()), e))?;
    let m: serde_json::Value = serde_json::from_slice(&text).map_err(|e| SinkError::Usage(format!("{}: not a simulator manifest ({e})", path.display())))?;
    let mut check = ManifestCheck { expected_active_patients: m["expected_hq"]["active_patients"].as_u64(), ..Default::default() };
    let voided: HashMap<String, i64> = hq
        .query::<(String, i64), _>("SELECT uuid, voided FROM person")
        .await
        .map_err(|e| SinkError::db("reading person", e))?
        .into_iter()
        .collect();
    for h in m["humans"].as_array().into_iter().flatten() {
        check.humans += 1;
        let records: Vec<&str> = h["records"].as_array().into_iter().flatten().filter_map(|r| r["person_uuid"].as_str()).collect();
        let alive = records.iter().filter(|u| voided.get(**u) == Some(&0)).count();
        let absent = records.iter().filter(|u| !voided.contains_key(**u)).count();
        if alive != 1 || absent > 0 {
            check.wrong += 1;
            if check.sample.len() < samples {
                check.sample.push(format!("{}: {alive} unvoided, {absent} absent of {records:?}", h["national_id"].as_str().unwrap_or("?")));
            }
        } else if let Some(want) = h["survivor_uuid"].as_str() {
            if voided.get(want) != Some(&0) {
                check.wrong_survivor += 1;
                if check.sample.len() < samples {
                    let kept = records.iter().find(|u| voided.get(**u) == Some(&0)).copied().unwrap_or("?");
                    check.sample.push(format!("{}: HQ kept {kept}, the survivor is {want}", h["national_id"].as_str().unwrap_or("?")));
                }
            }
        }
    }
    check.active_patients = hq.query_first("SELECT COUNT(*) FROM patient WHERE voided = 0").await.map_err(|e| SinkError::db("counting patients", e))?.unwrap_or(0);
    if check.wrong > 0 {
        r.problems.push(format!("{} of {} humans are not exactly one unvoided patient at HQ", check.wrong, check.humans));
    }
    if check.wrong_survivor > 0 {
        r.problems.push(format!("{} of {} humans kept another record than their survivor at HQ", check.wrong_survivor, check.humans));
    }
    if check.expected_active_patients.is_some_and(|e| e as i64 != check.active_patients) {
        r.problems.push(format!("{} active patients at HQ, the manifest expects {:?}", check.active_patients, check.expected_active_patients));
    }
    Ok(check)
}

/// The value checks (see `values.rs` and `lake.rs`), on connections of their own.
async fn value_checks(cfg: &Config, args: &VerifyArgs, lake_root: &std::path::Path, hq_written: &HashSet<String>, r: &mut Report) -> Result<(), SinkError> {
    let hq = connect(&cfg.hq.database, "HQ").await?;
    let mut sites = Vec::new();
    for s in &cfg.sites {
        sites.push(connect(&s.database, &format!("site {}", s.name)).await?);
    }
    let mut hq_logs = connect(&cfg.hq.database, "HQ").await?;
    r.merge_logs_doubled = hq_logs
        .query_first::<i64, _>(
            "SELECT COUNT(*) FROM person_merge_log h JOIN omrs_sync_merge m ON m.merge_log_uuid = h.uuid
               JOIN person_merge_log s ON s.loser_person_id = h.loser_person_id AND s.uuid <> h.uuid",
        )
        .await
        .map_err(|e| SinkError::db("reading person_merge_log", e))?
        .unwrap_or(0);
    r.merge_logs_missing = hq_logs
        .query_first::<i64, _>(
            "SELECT COUNT(*) FROM omrs_sync_merge m JOIN person p ON p.uuid = m.loser_uuid
             WHERE m.applied = 1 AND NOT EXISTS (SELECT 1 FROM person_merge_log l WHERE l.loser_person_id = p.person_id)",
        )
        .await
        .map_err(|e| SinkError::db("reading person_merge_log", e))?
        .unwrap_or(0);
    drop(hq_logs);
    if r.merge_logs_doubled + r.merge_logs_missing > 0 {
        r.problems.push(format!(
            "person_merge_log: {} of HQ's own rows log a merge a site logs too, {} merged persons have no log",
            r.merge_logs_doubled, r.merge_logs_missing
        ));
    }
    let (tables, merges) = values::run(cfg, hq, sites, hq_written, args.samples).await?;
    for t in tables.iter().filter(|t| t.differing > 0) {
        r.problems.push(format!("{}: {} of {} HQ rows differ from the rows that should have won", t.table, t.differing, t.compared));
    }
    r.values = tables;
    if !merges.loops.is_empty() {
        r.problems.push(format!("{} merged persons have no survivor (their merge chain loops), e.g. {:?}", merges.loops.len(), &merges.loops[..merges.loops.len().min(args.samples)]));
        r.merge_loops = merges.loops.clone();
    }
    if args.no_lake {
        return Ok(());
    }
    // Sorting a large table for the merge spills to disk past this much memory.
    let ctx = crate::query::context_within(lake_root, Some(LAKE_SORT_MEMORY)).await?;
    let mut hq = connect(&cfg.hq.database, "HQ").await?;
    let scrub: HashSet<String> = cfg.ingest.scrub.iter().cloned().collect();
    r.lake_values = lake::current_values(&ctx, &mut hq, &cfg.hq.database.database, &scrub, &merges, args.samples).await?;
    for t in r.lake_values.iter().filter(|t| t.differing > 0) {
        r.problems.push(format!("lake current.{}: {} of {} rows differ from HQ", t.table, t.differing, t.compared));
    }
    for t in r.lake_values.iter().filter(|t| !t.missing_columns.is_empty()) {
        r.problems.push(format!("lake current.{}: HQ's columns {} are not in the lake", t.table, t.missing_columns.join(", ")));
    }
    r.lake_history_duplicates = lake::history_duplicates(&ctx, args.samples).await?;
    for d in &r.lake_history_duplicates {
        r.problems.push(format!("lake changes.{}: {} repeated rows (same {})", d.table, d.rows, d.by));
    }
    Ok(())
}

/// The lag of every stage, in records that can still be read after the position it stored
/// ([`records_after`]): the HQ sink (`omrs_sync_offsets`, when `hq` is given), the Parquet sink
/// (its manifest, when `lake` is given) and the transform (its consumer group) on each site
/// topic. `None`: the stage has stored no position yet.
pub async fn stage_lags(cfg: &Config, hq: Option<&mut Conn>, lake: Option<&std::path::Path>) -> Result<Vec<Lag>, SinkError> {
    let mut lags = Vec::new();
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let hq_topic = names.hq_changes();
    let behind = |topic: &str, stored: Option<i64>, heartbeats: bool| records_after(cfg, topic, stored, heartbeats, None);
    if let Some(hq) = hq {
        let hq_stored = hq_offsets(hq, &hq_topic).await?.unwrap_or_default();
        lags.push(Lag { stage: "hq_mysql".into(), topic: hq_topic.clone(), messages: records_after_all(cfg, &hq_topic, Some(&hq_stored), None)? });
    }
    if let Some(lake_root) = lake {
        let lake = crate::parquet::lake::Lake::new(lake_root);
        let stored = lake.read_manifest().ok().map(|(s, _)| s.offsets).unwrap_or_default();
        lags.push(Lag { stage: "parquet".into(), topic: hq_topic.clone(), messages: records_after_all(cfg, &hq_topic, Some(&stored), None)? });
    }
    for (_, topic, committed) in transform_positions(cfg)? {
        lags.push(Lag { stage: "transform".into(), topic: topic.clone(), messages: behind(&topic, committed, true)? });
    }
    Ok(lags)
}

/// The HQ sink's stored offset of each partition of `topic` (`omrs_sync_offsets`); None
/// before its first batch.
pub async fn hq_offsets(hq: &mut Conn, topic: &str) -> Result<Option<BTreeMap<i32, i64>>, SinkError> {
    let rows: Vec<(i32, i64)> = hq
        .exec("SELECT kafka_partition, next_offset FROM omrs_sync_offsets WHERE topic = ?", (topic,))
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_offsets", e))?;
    Ok((!rows.is_empty()).then(|| rows.into_iter().collect()))
}

/// Per configured site: (site, its topic, the transform's committed offset on it, if any).
pub fn transform_positions(cfg: &Config) -> Result<Vec<(String, String, Option<i64>)>, SinkError> {
    let names = TopicNames::new(cfg.kafka.topic_prefix.clone());
    let group: BaseConsumer = client_config(&cfg.kafka)
        .set("group.id", names.transform_group())
        .create()
        .map_err(|e| SinkError::kafka("creating a consumer", e))?;
    let mut out = Vec::new();
    for s in &cfg.sites {
        let topic = names.cdc(&s.name);
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let committed = group
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok()
            .and_then(|t| t.find_partition(&topic, 0).and_then(|e| if let rdkafka::Offset::Offset(o) = e.offset() { Some(o) } else { None }));
        out.push((s.name.clone(), topic, committed));
    }
    Ok(out)
}

/// Whether `c`'s position on `topic` (partition 0) is at `end` or past it: with nothing left
/// to read, a transactional topic's last offsets are commit markers.
pub fn reached(c: &BaseConsumer, topic: &str, end: i64) -> bool {
    reached_in(c, topic, 0, end)
}

/// As [`reached`], in `partition`.
fn reached_in(c: &BaseConsumer, topic: &str, partition: i32, end: i64) -> bool {
    let at = c.position().ok().and_then(|t| t.find_partition(topic, partition).and_then(|e| if let rdkafka::Offset::Offset(o) = e.offset() { Some(o) } else { None }));
    at.is_some_and(|o| o >= end)
}

/// A consumer that reads committed records where it is assigned, and commits nothing.
pub fn committed_reader(cfg: &Config) -> Result<BaseConsumer, SinkError> {
    client_config(&cfg.kafka)
        .set("group.id", TopicNames::new(cfg.kafka.topic_prefix.clone()).verify_group())
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| SinkError::kafka("creating a consumer", e))
}

/// How many data records of `topic` (partition 0) can be read at or after offset `stored`
/// (None: no position stored yet). Records that carry no data do not count: a site topic's
/// heartbeats (`heartbeats`; a running transform holds a quiet site's last ones until the
/// watermark passes them), and omrs.hq.changes' watermark records (written every second while
/// sites heartbeat). So a live pipeline that has applied everything reads 0 behind. The topics
/// are transactional: their end offset counts commit markers, so the records are read. With
/// `exact_up_to`, a gap larger than that is not read: the offset difference is returned.
pub fn records_after(cfg: &Config, topic: &str, stored: Option<i64>, heartbeats: bool, exact_up_to: Option<i64>) -> Result<Option<i64>, SinkError> {
    records_after_in(cfg, topic, 0, stored, heartbeats, exact_up_to)
}

/// As [`records_after`], summed over every partition of `topic` (`omrs.hq.changes`), each
/// from its offset in `stored` (0 where none is stored; None: no position stored at all).
pub fn records_after_all(cfg: &Config, topic: &str, stored: Option<&BTreeMap<i32, i64>>, exact_up_to: Option<i64>) -> Result<Option<i64>, SinkError> {
    let Some(stored) = stored else { return Ok(None) };
    // One consumer reads every partition with something after its stored offset at once: the
    // drain asks this of both sinks every round, and a consumer per partition, each polling
    // past its partition's trailing commit marker, cost seconds a round with 16 partitions.
    let reader = committed_reader(cfg)?;
    let partitions = omrs_core::kafka::topic_partitions(reader.client(), topic, Duration::from_secs(10)).map_err(|e| SinkError::kafka(format!("reading the metadata of {topic}"), e))?;
    let mut total = 0;
    let mut tpl = rdkafka::TopicPartitionList::new();
    // Partition → (its end, the records counted so far, where it was read from).
    let mut open: BTreeMap<i32, (i64, i64, i64)> = BTreeMap::new();
    for p in partitions {
        let from = stored.get(&p).copied().unwrap_or(0);
        let (_, end) = reader.fetch_watermarks(topic, p, Duration::from_secs(10)).map_err(|e| SinkError::kafka(format!("reading the end of {topic}"), e))?;
        if end <= from {
            continue;
        }
        if exact_up_to.is_some_and(|max| end - from > max) {
            total += end - from;
            continue;
        }
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(from)).map_err(|e| SinkError::kafka("assigning", e))?;
        open.insert(p, (end, 0, from));
    }
    if open.is_empty() {
        return Ok(Some(total));
    }
    reader.assign(&tpl).map_err(|e| SinkError::kafka("assigning", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !open.is_empty() && std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let Some(state) = open.get_mut(&m.partition()) else { continue };
                if !m.payload().is_some_and(|p| is_marker(p, false)) {
                    state.1 += 1;
                }
                if m.offset() + 1 >= state.0 {
                    total += state.1;
                    open.remove(&m.partition());
                }
            }
            Some(Err(e)) => return Err(SinkError::kafka(format!("reading {topic}"), e)),
            // Nothing to read: the consumer has stepped over the commit markers to the end.
            None => open.retain(|p, (end, changes, _)| {
                let at_end = reached_in(&reader, topic, *p, *end);
                if at_end {
                    total += *changes;
                }
                !at_end
            }),
        }
    }
    // Not read to the end in time: every record after the stored offset counts.
    total += open.values().map(|(end, _, from)| end - from).sum::<i64>();
    Ok(Some(total))
}

/// As [`records_after`], in `partition`.
pub fn records_after_in(cfg: &Config, topic: &str, partition: i32, stored: Option<i64>, heartbeats: bool, exact_up_to: Option<i64>) -> Result<Option<i64>, SinkError> {
    let Some(stored) = stored else { return Ok(None) };
    let reader = committed_reader(cfg)?;
    let (_, end) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10)).map_err(|e| SinkError::kafka(format!("reading the end of {topic}"), e))?;
    if end <= stored {
        return Ok(Some(0));
    }
    if exact_up_to.is_some_and(|max| end - stored > max) {
        return Ok(Some(end - stored));
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(stored)).map_err(|e| SinkError::kafka("assigning", e))?;
    reader.assign(&tpl).map_err(|e| SinkError::kafka("assigning", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut changes = 0;
    while std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.payload().is_some_and(|p| is_marker(p, heartbeats)) => {
                if m.offset() + 1 >= end {
                    return Ok(Some(changes));
                }
            }
            Some(Ok(_)) => {
                changes += 1;
            }
            Some(Err(e)) => return Err(SinkError::kafka(format!("reading {topic}"), e)),
            // Nothing to read: the consumer has stepped over the commit markers to the end.
            None => {
                if reached_in(&reader, topic, partition, end) {
                    return Ok(Some(changes));
                }
            }
        }
    }
    Ok(Some(end - stored))
}

/// The report for a terminal.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    if let Some(scope) = &r.scope {
        out.push_str(&format!("scope: {scope}\n"));
    }
    let rows: usize = r.tables.iter().map(|t| t.hq_rows).sum();
    out.push_str(&format!("sites → HQ: {} uuid tables, {rows} HQ rows\n", r.tables.len()));
    for t in r.tables.iter().filter(|t| !t.missing.is_empty() || t.extra > 0) {
        out.push_str(&format!("  {}: missing {:?}, extra {}; e.g. {:?} {:?}\n", t.table, t.missing, t.extra, t.sample_missing, t.sample_extra));
    }
    out.push_str(&format!("FK orphans at HQ: {}\n", r.orphans.iter().map(|o| o.rows).sum::<i64>()));
    for o in &r.orphans {
        out.push_str(&format!("  {}.{} → {}: {}\n", o.table, o.column, o.references, o.rows));
    }
    out.push_str(&format!("identifiers shared by unvoided patients: {}\n", r.identity_duplicates.len()));
    for d in r.identity_duplicates.iter().take(10) {
        let why = d.review.as_ref().map(|r| format!(" (kept apart by review {r})")).unwrap_or_default();
        out.push_str(&format!("  {} ({}): {:?}{why}\n", d.identifier, d.identifier_type, d.patients));
    }
    if r.lake_checked {
        let bad: Vec<&LakeCheck> = r.lake.iter().filter(|l| l.missing + l.extra > 0).collect();
        out.push_str(&format!("lake current vs HQ: {} tables compared, {} differ\n", r.lake.len(), bad.len()));
        for l in bad {
            out.push_str(&format!("  current.{}: {} vs HQ {} (missing {}, extra {}), e.g. {:?}\n", l.table, l.lake_rows, l.hq_rows, l.missing, l.extra, l.sample));
        }
    }
    if !r.values.is_empty() {
        render_values(&mut out, "values at HQ vs the sites' winners", "", &r.values);
        out.push_str(&format!("(values compared in {:.1} s)\n", r.values_ms as f64 / 1000.0));
    }
    if !r.lake_values.is_empty() {
        render_values(&mut out, "values in the lake's current tables vs HQ", "current.", &r.lake_values);
    }
    if r.lake_checked && !r.values.is_empty() {
        out.push_str(&format!("repeated rows in the lake's change history: {}\n", r.lake_history_duplicates.iter().map(|d| d.rows).sum::<i64>()));
        for d in &r.lake_history_duplicates {
            out.push_str(&format!("  changes.{} ({}): {}, e.g. {:?}\n", d.table, d.by, d.rows, d.sample));
        }
    }
    if let Some(c) = &r.lake_reviews {
        out.push_str(&format!("identity reviews: {} at HQ, {} in the lake, {} differing\n", c.hq, c.lake, c.differing));
    }
    if !r.merge_loops.is_empty() {
        out.push_str(&format!("merges without a survivor (loops): {}, e.g. {:?}\n", r.merge_loops.len(), &r.merge_loops[..r.merge_loops.len().min(5)]));
    }
    for l in &r.lag {
        out.push_str(&format!("lag {} on {}: {}\n", l.stage, l.topic, l.messages.map(|m| m.to_string()).unwrap_or_else(|| "no position stored".into())));
    }
    if let Some(m) = &r.manifest {
        out.push_str(&format!(
            "manifest: {} humans, {} wrong, {} with another survivor; {} active patients (expected {:?})\n",
            m.humans, m.wrong, m.wrong_survivor, m.active_patients, m.expected_active_patients
        ));
        for s in &m.sample {
            out.push_str(&format!("  {s}\n"));
        }
    }
    out.push_str(if r.ok { "verify: OK\n" } else { "verify: DISCREPANCIES\n" });
    for p in &r.problems {
        out.push_str(&format!("  - {p}\n"));
    }
    out
}

fn render_values(out: &mut String, title: &str, prefix: &str, tables: &[TableValues]) {
    let compared: usize = tables.iter().map(|t| t.compared).sum();
    let differing: usize = tables.iter().map(|t| t.differing).sum();
    out.push_str(&format!("{title}: {} tables, {compared} rows compared, {differing} differ\n", tables.len()));
    for t in tables.iter().filter(|t| t.differing > 0 || t.undecided > 0) {
        out.push_str(&format!("  {prefix}{}: {} compared, {} equal, {} differ, {} undecided\n", t.table, t.compared, t.equal, t.differing, t.undecided));
        for e in &t.examples {
            let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
            out.push_str(&format!("    {} {}:", e.key, e.column));
            if let Some(s) = &e.site {
                out.push_str(&format!(" site {s};"));
            }
            out.push_str(&format!(" HQ {}", v(&e.hq)));
            if e.site.is_none() {
                out.push_str(&format!("; lake {}", v(&e.lake)));
            }
            out.push('\n');
        }
    }
}

/// Is a record a site heartbeat (`heartbeats`) or a transform watermark? Read with core's
/// decoders, images left unread.
fn is_marker(payload: &[u8], heartbeats: bool) -> bool {
    use omrs_core::envelope::{ChangeEvent, Op, RawImage};
    use omrs_core::hq::HqEvent;
    if heartbeats {
        serde_json::from_slice::<ChangeEvent<RawImage<'_>>>(payload).is_ok_and(|e| e.op == Op::Heartbeat)
    } else {
        matches!(serde_json::from_slice::<HqEvent<RawImage<'_>>>(payload), Ok(HqEvent::Watermark { .. }))
    }
}
