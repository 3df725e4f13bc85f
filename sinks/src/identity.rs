//! `omrs-stream identity`: the data manager's view of cross-site patient identity at HQ. It
//! reads HQ's review queue (`omrs_sync_identity_review`), its merges
//! (`omrs_sync_identity_merge`) and the OpenMRS rows of the persons involved. It never writes
//! HQ: `confirm` writes a decision to `omrs.identity.decisions` (an idempotent producer), the
//! transform reads it in its transaction, and both sinks apply it exactly once, as any change.

// Rows read from SQL come back as tuples named by their SELECT.
#![allow(clippy::type_complexity)]

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::config::Config;
use omrs_core::hq::review;
use serde::Serialize;

use crate::SinkError;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum IdentityCommand {
    /// The review queue at HQ: every merge the pipeline made (status merged), every identity
    /// change it would not act on alone (open), and what people decided (confirmed). Open
    /// reviews first, then the newest.
    List(ListArgs),
    /// One person as HQ holds it: the records joined into it, per clinic, with their names,
    /// birthdates and identifiers; why they were joined; what HQ did; and its reviews. Takes a
    /// person uuid (any record of the person, at any clinic) or a review id.
    Show(ShowArgs),
    /// Keep a merge, or close an open review while keeping the merge: the decision (who, when,
    /// why) goes to omrs.identity.decisions, and the transform passes it to HQ and the lake.
    /// Waits until HQ shows it.
    Confirm(DecideArgs),
    /// Undo a merge: the records given (or those the review names) are not the same person as
    /// the rest. The decision goes to omrs.identity.decisions; the transform keeps the two sides
    /// apart from then on (a later link between them opens a review instead of merging), and HQ
    /// and the lake move each side's rows back to its own patient. Waits until HQ shows it.
    Split(SplitArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct DecideArgs {
    /// The review id (from `identity list`).
    pub review: String,
    #[command(flatten)]
    pub decision: DecisionArgs,
}

/// Who decides, why, and how long to wait for HQ to show it.
#[derive(Debug, Clone, clap::Args)]
pub struct DecisionArgs {
    /// Why, in a few words; kept with the decision.
    #[arg(long)]
    pub note: Option<String>,
    /// Who decides (default: $OMRS_USER, else $USER).
    #[arg(long)]
    pub by: Option<String>,
    /// Wait this many seconds for HQ to show the decision (0: send and return).
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only reviews with this status.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(review::STATUSES))]
    pub status: Option<String>,
    /// Only reviews raised by this clinic's data.
    #[arg(long)]
    pub site: Option<String>,
    /// Only reviews with this reason.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(review::REASONS.map(|(r, _)| r)))]
    pub reason: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// The rows as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// A person uuid (from any clinic) or a review id.
    pub target: String,
    /// The component as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One entry of the review queue.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    pub review_id: String,
    pub status: String,
    pub reason: String,
    pub explanation: &'static str,
    pub site: String,
    pub first_seen: String,
    pub person: String,
    pub records: Vec<String>,
    pub evidence: serde_json::Value,
}

/// `identity list` as data: the counts per status and the rows asked for.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub counts: BTreeMap<String, i64>,
    pub reviews: Vec<Review>,
}

const REVIEW_COLUMNS: &str = "review_id, status, reason, site, DATE_FORMAT(first_seen, '%Y-%m-%d %H:%i:%s'), person_uuid, records, evidence";

type ReviewTuple = (String, String, String, String, String, String, String, Option<String>);

fn review_of(t: ReviewTuple) -> Review {
    let (review_id, status, reason, site, first_seen, person, records, evidence) = t;
    Review {
        explanation: review::describe(&reason),
        review_id,
        status,
        reason,
        site,
        first_seen,
        person,
        records: serde_json::from_str(&records).unwrap_or_default(),
        evidence: json_or_null(evidence),
    }
}

pub async fn list(cfg: &Config, args: &ListArgs) -> Result<Listing, SinkError> {
    let mut conn = crate::hq_mysql::connect(cfg, true).await?;
    let counts: Vec<(String, i64)> = conn
        .query("SELECT status, COUNT(*) FROM omrs_sync_identity_review GROUP BY status")
        .await
        .map_err(|e| no_queue(e, "counting the identity reviews"))?;
    let mut sql = format!("SELECT {REVIEW_COLUMNS} FROM omrs_sync_identity_review WHERE 1 = 1");
    let mut params: Vec<mysql_async::Value> = Vec::new();
    for (col, v) in [("status", &args.status), ("site", &args.site), ("reason", &args.reason)] {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            params.push(v.as_str().into());
        }
    }
    sql.push_str(&format!(" ORDER BY status = 'open' DESC, status = 'suggested' DESC, first_seen_ms DESC, review_id LIMIT {}", args.limit));
    let rows: Vec<ReviewTuple> = conn.exec(sql, params).await.map_err(|e| no_queue(e, "reading the identity reviews"))?;
    let mut c: BTreeMap<String, i64> = review::STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
    c.extend(counts);
    Ok(Listing { counts: c, reviews: rows.into_iter().map(review_of).collect() })
}

/// A JSON column's value (NULL or unreadable: null).
fn json_or_null(text: Option<String>) -> serde_json::Value {
    text.and_then(|e| serde_json::from_str(&e).ok()).unwrap_or(serde_json::Value::Null)
}

/// A table missing from an HQ that no sink of this version has run against yet.
fn no_queue(e: mysql_async::Error, what: &str) -> SinkError {
    match &e {
        mysql_async::Error::Server(s) if s.code == 1146 => {
            SinkError::Schema(format!("{what}: HQ has no review queue yet ({}); start the HQ sink of this version once", s.message))
        }
        _ => SinkError::db(what, e),
    }
}

/// What a review's evidence says, in a few words.
fn gist(r: &Review) -> String {
    let e = &r.evidence;
    let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
    match r.reason.as_str() {
        review::IDENTIFIER_CORRECTED => format!("{} → {}", s("value"), s("new_value")),
        review::SITE_MERGE => format!("{}'s merge log {}", r.site, s("person_merge_log")),
        review::SURVIVOR_CHANGE => format!("{} registered {}", s("record"), s("date_created")),
        review::NEAR_MISS => {
            let sites: Vec<&str> = e.get("sites").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
            format!("namesakes at {}", sites.join(" and "))
        }
        _ => s("value").to_string(),
    }
}

pub fn render_list(l: &Listing) -> String {
    let counts: Vec<String> = review::STATUSES.iter().map(|s| format!("{} {s}", l.counts.get(*s).copied().unwrap_or(0))).collect();
    let mut out = format!("Identity reviews at HQ: {}.\n", counts.join(", "));
    if l.reviews.is_empty() {
        out.push_str("No review matches.\n");
        return out;
    }
    out.push_str(&format!(
        "\n{:<36}  {:<9}  {:<20}  {:<10}  {:<19}  {:<36}  {}\n",
        "REVIEW", "STATUS", "REASON", "SITE", "FIRST SEEN (UTC)", "PERSON AT HQ", "EVIDENCE"
    ));
    for r in &l.reviews {
        out.push_str(&format!("{:<36}  {:<9}  {:<20}  {:<10}  {:<19}  {:<36}  {}\n", r.review_id, r.status, r.reason, r.site, r.first_seen, r.person, gist(r)));
    }
    out.push_str("\n`omrs-stream identity show <review or person uuid>` explains one.\n");
    out
}

/// One person record of a component, as HQ holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub uuid: String,
    pub site: Option<String>,
    pub hq_person_id: Option<i64>,
    pub registered: Option<String>,
    pub gender: Option<String>,
    pub birthdate: Option<String>,
    pub voided_at_hq: Option<String>,
    pub names: Vec<String>,
    pub identifiers: Vec<String>,
}

/// One merge of the component.
#[derive(Debug, Clone, Serialize)]
pub struct MergeLine {
    pub loser: String,
    pub survivor: String,
    pub rule: String,
    pub evidence: serde_json::Value,
    pub site: String,
    pub applied: bool,
    pub status: String,
}

/// `identity show` as data.
#[derive(Debug, Serialize)]
pub struct Component {
    pub survivor: String,
    pub members: Vec<Member>,
    pub merges: Vec<MergeLine>,
    pub reviews: Vec<Review>,
}

pub async fn show(cfg: &Config, args: &ShowArgs) -> Result<Component, SinkError> {
    let mut conn = crate::hq_mysql::connect(cfg, true).await?;
    let target = args.target.trim();
    let by_review: Option<String> = conn
        .exec_first("SELECT person_uuid FROM omrs_sync_identity_review WHERE review_id = ?", (target,))
        .await
        .map_err(|e| no_queue(e, "reading the identity reviews"))?;
    let start = by_review.unwrap_or_else(|| target.to_string());
    let mut survivor = start.clone();
    for _ in 0..64 {
        let next: Option<String> = conn
            .exec_first("SELECT winner_uuid FROM omrs_sync_merge WHERE loser_uuid = ? AND applied = 1", (survivor.as_str(),))
            .await
            .map_err(|e| SinkError::db("reading omrs_sync_merge", e))?;
        match next {
            Some(n) if n != survivor && n != start => survivor = n,
            _ => break,
        }
    }
    let known: Option<i64> = conn.exec_first("SELECT person_id FROM person WHERE uuid = ?", (survivor.as_str(),)).await.map_err(|e| SinkError::db("reading person", e))?;
    if known.is_none() {
        return Err(SinkError::Usage(format!("{target}: no review and no person with this uuid at HQ (`omrs-stream identity list` shows the reviews)")));
    }
    let losers: Vec<String> = conn
        .exec("SELECT loser_uuid FROM omrs_sync_merge WHERE winner_uuid = ? ORDER BY loser_uuid", (survivor.as_str(),))
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_merge", e))?;
    let mut members = Vec::new();
    for uuid in std::iter::once(survivor.clone()).chain(losers) {
        members.push(member(&mut conn, &uuid).await?);
    }
    let merges: Vec<(String, String, String, Option<String>, String, i64, String)> = conn
        .exec(
            "SELECT loser_uuid, survivor_uuid, rule, evidence, site, applied, status FROM omrs_sync_identity_merge WHERE survivor_uuid = ? ORDER BY first_seen_ms, loser_uuid",
            (survivor.as_str(),),
        )
        .await
        .map_err(|e| no_queue(e, "reading omrs_sync_identity_merge"))?;
    let merges = merges
        .into_iter()
        .map(|(loser, survivor, rule, evidence, site, applied, status)| MergeLine {
            loser,
            survivor,
            rule,
            evidence: json_or_null(evidence),
            site,
            applied: applied == 1,
            status,
        })
        .collect();
    let mut sql = format!("SELECT {REVIEW_COLUMNS} FROM omrs_sync_identity_review WHERE review_id = ?");
    let mut params: Vec<mysql_async::Value> = vec![target.into()];
    for m in &members {
        sql.push_str(" OR person_uuid = ? OR records LIKE ?");
        params.push(m.uuid.as_str().into());
        params.push(format!("%\"{}\"%", m.uuid).into());
    }
    sql.push_str(" ORDER BY first_seen_ms, review_id");
    let reviews: Vec<ReviewTuple> = conn.exec(sql, params).await.map_err(|e| no_queue(e, "reading the identity reviews"))?;
    Ok(Component { survivor, members, merges, reviews: reviews.into_iter().map(review_of).collect() })
}

/// A record's own rows: those on it that did not come from another person, and those that left
/// it for a survivor (`omrs_sync_moved` remembers whose they are).
const OWN: &str = "(x.{col} = ? AND (m.person_uuid IS NULL OR m.person_uuid = ?)) OR m.person_uuid = ?";

async fn member(conn: &mut Conn, uuid: &str) -> Result<Member, SinkError> {
    let row: Option<(i64, Option<String>, Option<String>, Option<String>, i64, Option<String>)> = conn
        .exec_first(
            "SELECT person_id, DATE_FORMAT(date_created, '%Y-%m-%d %H:%i:%s'), gender, DATE_FORMAT(birthdate, '%Y-%m-%d'), voided, void_reason FROM person WHERE uuid = ?",
            (uuid,),
        )
        .await
        .map_err(|e| SinkError::db("reading person", e))?;
    let site: Option<String> = conn
        .exec_first("SELECT site FROM omrs_sync_row_version WHERE tbl = 'person' AND row_key = ?", (uuid,))
        .await
        .map_err(|e| SinkError::db("reading omrs_sync_row_version", e))?;
    let Some((id, registered, gender, birthdate, voided, void_reason)) = row else {
        return Ok(Member { uuid: uuid.into(), site, hq_person_id: None, registered: None, gender: None, birthdate: None, voided_at_hq: None, names: vec![], identifiers: vec![] });
    };
    let names: Vec<(Option<String>, Option<String>, Option<String>, i64, i64)> = conn
        .exec(
            format!(
                "SELECT x.given_name, x.middle_name, x.family_name, x.preferred, x.voided FROM person_name x
                   LEFT JOIN omrs_sync_moved m ON m.tbl = 'person_name' AND m.hq_id = x.person_name_id
                  WHERE {} ORDER BY x.person_name_id",
                OWN.replace("{col}", "person_id")
            ),
            (id, uuid, uuid),
        )
        .await
        .map_err(|e| SinkError::db("reading person_name", e))?;
    let idents: Vec<(String, String, i64)> = conn
        .exec(
            format!(
                "SELECT t.name, x.identifier, x.voided FROM patient_identifier x
                   JOIN patient_identifier_type t ON t.patient_identifier_type_id = x.identifier_type
                   LEFT JOIN omrs_sync_moved m ON m.tbl = 'patient_identifier' AND m.hq_id = x.patient_identifier_id
                  WHERE {} ORDER BY x.patient_identifier_id",
                OWN.replace("{col}", "patient_id")
            ),
            (id, uuid, uuid),
        )
        .await
        .map_err(|e| SinkError::db("reading patient_identifier", e))?;
    let flag = |voided: i64| if voided == 1 { " (voided)" } else { "" };
    Ok(Member {
        uuid: uuid.into(),
        site,
        hq_person_id: Some(id),
        registered,
        gender,
        birthdate,
        voided_at_hq: (voided == 1).then(|| void_reason.unwrap_or_else(|| "voided".into())),
        names: names
            .into_iter()
            .map(|(g, m, f, p, v)| {
                let full: Vec<String> = [g, m, f].into_iter().flatten().filter(|s| !s.is_empty()).collect();
                format!("{}{}{}", full.join(" "), if p == 1 { " (preferred)" } else { "" }, flag(v))
            })
            .collect(),
        identifiers: idents.into_iter().map(|(t, v, voided)| format!("{t} {v}{}", flag(voided))).collect(),
    })
}

pub fn render_show(c: &Component) -> String {
    let head = c.members.first();
    let id = head.and_then(|m| m.hq_person_id).map(|i| format!("patient #{i}")).unwrap_or_default();
    let mut out = format!(
        "Person {} at HQ ({id}): {} record{} joined; the earliest registration survives.\n\nRecords\n",
        c.survivor,
        c.members.len(),
        if c.members.len() == 1 { "" } else { "s" }
    );
    for m in &c.members {
        let role = if m.uuid == c.survivor { "survivor".to_string() } else { format!("merged at HQ: {}", m.voided_at_hq.as_deref().unwrap_or("not yet applied")) };
        out.push_str(&format!(
            "  {}  {}  registered {}  {}  born {}  [{role}]\n",
            m.uuid,
            m.site.as_deref().unwrap_or("?"),
            m.registered.as_deref().unwrap_or("?"),
            m.gender.as_deref().unwrap_or("?"),
            m.birthdate.as_deref().unwrap_or("?"),
        ));
        out.push_str(&format!("      names: {}\n", if m.names.is_empty() { "none".into() } else { m.names.join("; ") }));
        out.push_str(&format!("      identifiers: {}\n", if m.identifiers.is_empty() { "none".into() } else { m.identifiers.join("; ") }));
    }
    if !c.merges.is_empty() {
        out.push_str("\nWhy they are one person\n");
        for m in &c.merges {
            let why = match m.rule.as_str() {
                "identifier" => format!("same identifier {}", m.evidence.get("value").and_then(|v| v.as_str()).unwrap_or("?")),
                "site_merge" => format!("{} merged them itself", m.site),
                other => other.replace('_', " "),
            };
            let applied = if m.applied { "" } else { ", waiting for both records to reach HQ" };
            out.push_str(&format!("  {} → {}: {why} (seen at {}; {}{applied})\n", m.loser, m.survivor, m.site, m.status));
        }
    }
    if !c.reviews.is_empty() {
        out.push_str("\nReviews\n");
        for r in &c.reviews {
            out.push_str(&format!("  {}  {:<9}  {}  {}  {}: {}", r.review_id, r.status, r.first_seen, r.site, r.reason, r.explanation));
            let g = gist(r);
            out.push_str(&if g.is_empty() { "\n".to_string() } else { format!(" [{g}]\n") });
        }
    }
    out
}

/// A review as HQ holds it: (status, reason, site, first_seen_ms, person, records, evidence,
/// decided_by).
type ReviewRow = (String, String, String, i64, String, String, Option<String>, Option<String>);

async fn review_row(conn: &mut Conn, id: &str) -> Result<Option<ReviewRow>, SinkError> {
    conn.exec_first(
        "SELECT status, reason, site, first_seen_ms, person_uuid, records, evidence, decided_by FROM omrs_sync_identity_review WHERE review_id = ?",
        (id,),
    )
    .await
    .map_err(|e| no_queue(e, "reading the identity reviews"))
}

/// Who decides: `--by`, else $OMRS_USER, else $USER.
fn decider(by: &Option<String>) -> String {
    by.clone().or_else(|| std::env::var("OMRS_USER").ok()).or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into())
}

/// A decision on review `row` (id `id`), sides empty unless it is a split.
fn decision(action: &str, id: &str, row: ReviewRow, by: &str, note: &Option<String>, keep: Vec<String>, other: Vec<String>) -> review::Decision {
    let (_, reason, site, ts_ms, person, records, evidence, _) = row;
    review::Decision {
        action: action.into(),
        review_id: id.to_string(),
        reason,
        person,
        records: serde_json::from_str(&records).unwrap_or_default(),
        evidence: json_or_null(evidence),
        site,
        ts_ms,
        decided: review::Decided { by: by.to_string(), at_ms: omrs_core::clock::now_ms(), note: note.clone() },
        keep,
        other,
    }
}

/// Sends a decision to `omrs.identity.decisions` and waits up to `wait` seconds for HQ to show
/// its review with `status`. Returns whether it did.
async fn send(cfg: &Config, conn: &mut Conn, d: &review::Decision, status: &str, wait: u64) -> Result<bool, SinkError> {
    use rdkafka::producer::FutureRecord;
    let topic = omrs_core::topics::TopicNames::new(cfg.kafka.topic_prefix.clone()).identity_decisions();
    let producer = crate::kafka::producer(cfg, "the decisions producer")?;
    let payload = serde_json::to_vec(d).unwrap_or_default();
    producer
        .send(FutureRecord::to(&topic).key(&d.review_id).payload(&payload), std::time::Duration::from_secs(30))
        .await
        .map_err(|(e, _)| SinkError::Kafka {
            context: format!("sending the decision to {topic} (does it exist? `omrs-stream topics apply` creates it)"),
            message: e.to_string(),
            transient: false,
        })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    while std::time::Instant::now() < deadline {
        let now: Option<String> = conn
            .exec_first("SELECT status FROM omrs_sync_identity_review WHERE review_id = ?", (&d.review_id,))
            .await
            .map_err(|e| SinkError::db("reading the identity reviews", e))?;
        if now.as_deref() == Some(status) {
            return Ok(true);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Ok(false)
}

fn not_yet(id: &str, by: &str) -> String {
    format!("review {id}: decision by {by} sent; HQ and the lake show it once the transform and the sinks have applied it (they are not running, or behind)")
}

/// `identity confirm`: the decision sent, and what HQ shows. Returns the line to print.
pub async fn confirm(cfg: &Config, args: &DecideArgs) -> Result<String, SinkError> {
    let mut conn = crate::hq_mysql::connect(cfg, true).await?;
    let id = args.review.trim();
    let Some(row) = review_row(&mut conn, id).await? else {
        return Err(SinkError::Usage(format!("{id}: no such review at HQ (`omrs-stream identity list` shows them)")));
    };
    if row.0 == review::CONFIRMED {
        return Ok(format!("review {id} is already confirmed (by {})", row.7.unwrap_or_default()));
    }
    let by = decider(&args.decision.by);
    let d = decision("confirm", id, row, &by, &args.decision.note, Vec::new(), Vec::new());
    Ok(if send(cfg, &mut conn, &d, review::CONFIRMED, args.decision.wait).await? {
        format!("review {id} confirmed by {by}: HQ keeps the merge; the lake follows")
    } else {
        not_yet(id, &by)
    })
}

#[derive(Debug, Clone, clap::Args)]
pub struct SplitArgs {
    /// A review id (a merge's, or an open review's, from `identity list`) or a person uuid
    /// (a record that should not be part of its merged person).
    pub target: String,
    /// The records that stay together with each other (default: all but the ones the review
    /// names, or all but the person given). The others become a person of their own.
    #[arg(long, num_args = 1..)]
    pub keep: Vec<String>,
    #[command(flatten)]
    pub decision: DecisionArgs,
}

/// The merged person `uuid` belongs to at HQ: (survivor, every record of it, survivor first).
async fn component_of(conn: &mut Conn, uuid: &str) -> Result<(String, Vec<String>), SinkError> {
    let winner: Option<String> = conn
        .exec_first("SELECT winner_uuid FROM omrs_sync_merge WHERE loser_uuid = ?", (uuid,))
        .await
        .map_err(|e| no_queue(e, "reading the merges"))?;
    let survivor = winner.unwrap_or_else(|| uuid.to_string());
    let losers: Vec<String> = conn
        .exec("SELECT loser_uuid FROM omrs_sync_merge WHERE winner_uuid = ? ORDER BY loser_uuid", (survivor.as_str(),))
        .await
        .map_err(|e| SinkError::db("reading the merges", e))?;
    Ok((survivor.clone(), std::iter::once(survivor).chain(losers).collect()))
}

/// `identity split`: undoes a merge. The decision names two sides of the merged person; the
/// transform keeps them apart from then on (a later link between them is a review, not a
/// merge), and both sinks move each side's rows to its own survivor.
pub async fn split(cfg: &Config, args: &SplitArgs) -> Result<String, SinkError> {
    let mut conn = crate::hq_mysql::connect(cfg, true).await?;
    let target = args.target.trim();
    let reviewed = review_row(&mut conn, target).await?;
    let (survivor, members) = match &reviewed {
        Some(r) if r.0 == review::SPLIT => return Ok(format!("review {target} is already split (by {})", r.7.clone().unwrap_or_default())),
        Some(r) if r.1 == review::NEAR_MISS || r.1 == review::IDENTIFIER_SHARED => {
            return Err(SinkError::Usage(format!("review {target} ({}): these records were not merged; there is nothing to split (`identity confirm` closes it)", r.1)))
        }
        Some(r) => component_of(&mut conn, &r.4).await?,
        None => component_of(&mut conn, target).await?,
    };
    if members.len() < 2 {
        return Err(SinkError::Usage(format!("{target}: no merged person at HQ has this review or record (`identity show {target}`)")));
    }
    let (keep, other): (Vec<String>, Vec<String>) = if !args.keep.is_empty() {
        if let Some(stray) = args.keep.iter().find(|k| !members.contains(k)) {
            return Err(SinkError::Usage(format!("--keep {stray}: not a record of person {survivor} (its records: {})", members.join(", "))));
        }
        members.iter().cloned().partition(|m| args.keep.contains(m))
    } else {
        let named: Vec<String> = match &reviewed {
            Some(r) => serde_json::from_str(&r.5).unwrap_or_default(),
            None => vec![target.to_string()],
        };
        let leaving: Vec<String> = named.into_iter().filter(|n| *n != survivor && members.contains(n)).collect();
        if leaving.is_empty() {
            return Err(SinkError::Usage(format!("{target}: which records leave person {survivor}? Name the ones that stay with --keep (its records: {})", members.join(", "))));
        }
        members.iter().cloned().partition(|m| !leaving.contains(m))
    };
    if other.is_empty() {
        return Err(SinkError::Usage(format!("--keep names every record of person {survivor}: nothing would leave")));
    }
    // A clinic's own merge: HQ takes back the rows its merge log names; the clinic still holds
    // them as one person until someone un-merges them there.
    let site_merges: Vec<(String, Option<String>)> = conn
        .exec("SELECT site, evidence FROM omrs_sync_merge WHERE winner_uuid = ? AND reason = 'site_merge'", (survivor.as_str(),))
        .await
        .map_err(|e| SinkError::db("reading the merges", e))?;
    let mut clinics: Vec<String> = Vec::new();
    for (site, evidence) in site_merges {
        let ev = json_or_null(evidence);
        let pair = [ev.get("site_winner"), ev.get("site_loser")].map(|v| v.and_then(|v| v.as_str()).unwrap_or("").to_string());
        if keep.contains(&pair[0]) != keep.contains(&pair[1]) && !pair[0].is_empty() && !clinics.contains(&site) {
            clinics.push(site);
        }
    }
    // The decision is recorded on a review: the one given, else the merge of a record leaving.
    let id = match reviewed {
        Some(_) => target.to_string(),
        None => {
            let mut id = None;
            for r in other.iter().chain(&keep) {
                let rid: Option<Option<String>> = conn.exec_first("SELECT review_id FROM omrs_sync_merge WHERE loser_uuid = ?", (r.as_str(),)).await.map_err(|e| SinkError::db("reading the merges", e))?;
                if let Some(Some(rid)) = rid {
                    id = Some(rid);
                    break;
                }
            }
            id.ok_or_else(|| SinkError::Usage(format!("{target}: no review at HQ for the merges of person {survivor} (merged by an earlier version?)")))?
        }
    };
    let Some(row) = review_row(&mut conn, &id).await? else {
        return Err(SinkError::Usage(format!("{id}: no such review at HQ")));
    };
    let by = decider(&args.decision.by);
    let d = decision("split", &id, row, &by, &args.decision.note, keep.clone(), other.clone());
    let at_clinics = if clinics.is_empty() {
        String::new()
    } else {
        format!(". {} merged them itself: HQ took back the rows its merge log names; the clinic still has them as one patient until it is undone there", clinics.join(", "))
    };
    Ok(if send(cfg, &mut conn, &d, review::SPLIT, args.decision.wait).await? {
        format!("review {id} split by {by}: {} and {} are two people now; HQ moved each record's rows to its own patient, the lake follows{at_clinics}", other.join(", "), keep.join(", "))
    } else {
        format!("{}{at_clinics}", not_yet(&id, &by))
    })
}
