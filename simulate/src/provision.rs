//! Site provisioning: a fresh database per site with the real OpenMRS schema and metadata from
//! the demo dump (same concept, location, encounter-type and identifier-type uuids everywhere),
//! the 100 demo patients at the seed site only, and the "National ID" identifier type.
//! Then the state the generator starts from is read back: metadata ids, next free ids,
//! existing patients and per-table baseline counts.

use std::collections::BTreeMap;
use std::path::Path;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::SimError;

/// `patient_identifier_type.uuid` of "National ID", the same at every site.
pub const NATIONAL_ID_TYPE_UUID: &str = "c5b2e8a4-1f7d-4e5b-9a61-6f1e0a1d2b3c";

/// The tables the simulator writes, with their primary keys.
pub const PATIENT_TABLES: &[(&str, &str)] = &[
    ("person", "person_id"),
    ("person_name", "person_name_id"),
    ("person_address", "person_address_id"),
    ("patient", "patient_id"),
    ("patient_identifier", "patient_identifier_id"),
    ("visit", "visit_id"),
    ("encounter", "encounter_id"),
    ("encounter_provider", "encounter_provider_id"),
    ("obs", "obs_id"),
    ("person_merge_log", "person_merge_log_id"),
];

#[derive(Debug, Clone)]
pub struct NumericConcept {
    pub id: i64,
    pub lo: f64,
    pub hi: f64,
    pub precise: bool,
}

#[derive(Debug, Clone)]
pub struct Coded {
    pub question: i64,
    pub answers: Vec<i64>,
}

/// Visit Diagnoses: a group obs with a coded diagnosis, its certainty and its order.
#[derive(Debug, Clone)]
pub struct DiagnosisGroup {
    pub group: i64,
    pub diagnosis: Coded,
    pub certainty: Coded,
    pub order: Coded,
}

/// Metadata ids the generator writes against, read from the site itself.
#[derive(Debug, Clone)]
pub struct Meta {
    pub user_id: i64,
    pub locations: Vec<i64>,
    pub visit_type: i64,
    pub providers: Vec<i64>,
    pub encounter_role: i64,
    pub enc_vitals: i64,
    pub enc_note: i64,
    pub openmrs_id_type: i64,
    pub national_id_type: i64,
    pub numeric: Vec<NumericConcept>,
    pub diagnosis: Option<DiagnosisGroup>,
    pub text_note: Option<i64>,
    pub date_concept: Option<i64>,
}

/// A patient already in the site database (the demo patients, or an earlier run's).
#[derive(Debug, Clone)]
pub struct ExistingPatient {
    pub person_id: i64,
    pub uuid: String,
    pub name_id: Option<i64>,
    pub address_id: Option<i64>,
}

/// Everything the generator needs to start on a site.
pub struct SiteStart {
    pub meta: Meta,
    /// Next free primary key per patient table.
    pub next_ids: BTreeMap<&'static str, i64>,
    pub existing: Vec<ExistingPatient>,
    /// Row count per table when the run starts.
    pub baseline: BTreeMap<String, i64>,
    /// Rows that are the same at every site (persons and names of users and providers).
    pub shared: BTreeMap<String, i64>,
}

fn db_err(site: &str, context: &str) -> impl FnOnce(mysql_async::Error) -> SimError {
    let site = site.to_string();
    let context = context.to_string();
    move |source| SimError::Db { site, context, source }
}

/// Drops and recreates `database`, loads the demo dump into it, strips the demo patients unless
/// `keep_demo_patients`, and adds the National ID identifier type.
pub async fn provision(
    conn: &mut Conn,
    site: &str,
    database: &str,
    dump: &Path,
    keep_demo_patients: bool,
) -> Result<(), SimError> {
    omrs_core::openmrs::load_dump(conn, database, dump, keep_demo_patients).await.map_err(|e| match e {
        omrs_core::openmrs::DumpError::Read { path, source } => SimError::Dump { path, source },
        omrs_core::openmrs::DumpError::Db { context, source } => SimError::Db { site: site.to_string(), context: context.to_string(), source },
    })?;

    conn.query_drop(format!(
        "INSERT INTO patient_identifier_type
           (name, description, format, check_digit, creator, date_created, required,
            format_description, validator, location_behavior, retired, uuid, uniqueness_behavior)
         SELECT 'National ID', 'National identity number issued by the civil registry; identifies a person across facilities',
                NULL, 0, 1, NOW(), 0, 'NID followed by 9 digits', NULL, 'NOT_USED', 0, '{NATIONAL_ID_TYPE_UUID}', 'NON_UNIQUE'
         FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM patient_identifier_type WHERE uuid = '{NATIONAL_ID_TYPE_UUID}')"
    ))
    .await
    .map_err(db_err(site, "adding the National ID identifier type"))?;
    Ok(())
}

async fn ids(conn: &mut Conn, site: &str, sql: &str) -> Result<Vec<i64>, SimError> {
    conn.query::<i64, _>(sql).await.map_err(db_err(site, "reading metadata"))
}

async fn one(conn: &mut Conn, site: &str, sql: &str, what: &str) -> Result<i64, SimError> {
    ids(conn, site, sql).await?.first().copied().ok_or_else(|| SimError::Schema {
        site: site.to_string(),
        message: format!("{what} not found (query: {sql})"),
    })
}

async fn concept(conn: &mut Conn, site: &str, uuid: &str) -> Result<Option<i64>, SimError> {
    Ok(ids(conn, site, &format!("SELECT concept_id FROM concept WHERE uuid = '{uuid}' AND retired = 0"))
        .await?
        .first()
        .copied())
}

async fn coded(conn: &mut Conn, site: &str, question: i64) -> Result<Coded, SimError> {
    let answers = ids(
        conn,
        site,
        &format!("SELECT answer_concept FROM concept_answer WHERE concept_id = {question} ORDER BY sort_weight, answer_concept"),
    )
    .await?;
    Ok(Coded { question, answers })
}

/// Plausible clinical ranges for the vitals of the demo dictionary (CIEL uuids); other numeric
/// concepts use their absolute bounds.
fn plausible(uuid: &str) -> Option<(f64, f64)> {
    Some(match uuid {
        "5085AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (95.0, 165.0),
        "5086AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (55.0, 100.0),
        "5087AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (55.0, 115.0),
        "5088AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (35.8, 39.4),
        "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (3.0, 110.0),
        "5090AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (50.0, 192.0),
        "5092AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (88.0, 100.0),
        "5242AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (12.0, 30.0),
        "1343AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" => (11.0, 35.0),
        _ => return None,
    })
}

/// Reads what the generator needs from a provisioned (or existing) site database.
pub async fn load_start(conn: &mut Conn, site: &str) -> Result<SiteStart, SimError> {
    let user_id = one(conn, site, "SELECT user_id FROM users WHERE retired = 0 ORDER BY user_id LIMIT 1", "an active user").await?;
    let mut locations = ids(
        conn,
        site,
        "SELECT location_id FROM location WHERE retired = 0 AND name <> 'Unknown Location' ORDER BY location_id",
    )
    .await?;
    if locations.is_empty() {
        locations = vec![one(conn, site, "SELECT location_id FROM location ORDER BY location_id LIMIT 1", "a location").await?];
    }
    let visit_type = one(conn, site, "SELECT visit_type_id FROM visit_type WHERE retired = 0 ORDER BY visit_type_id LIMIT 1", "a visit type").await?;
    let providers = ids(conn, site, "SELECT provider_id FROM provider WHERE retired = 0 ORDER BY provider_id").await?;
    let encounter_role = one(conn, site, "SELECT encounter_role_id FROM encounter_role ORDER BY (name = 'Clinician') DESC, encounter_role_id LIMIT 1", "an encounter role").await?;
    let enc_vitals = one(conn, site, "SELECT encounter_type_id FROM encounter_type ORDER BY (uuid = '67a71486-1a54-468f-ac3e-7091a9a79584') DESC, encounter_type_id LIMIT 1", "an encounter type").await?;
    let enc_note = one(conn, site, "SELECT encounter_type_id FROM encounter_type ORDER BY (uuid = 'd7151f82-c1f3-4152-a605-2f9ea7414a79') DESC, encounter_type_id LIMIT 1", "an encounter type").await?;
    let openmrs_id_type = one(conn, site, "SELECT patient_identifier_type_id FROM patient_identifier_type WHERE retired = 0 ORDER BY required DESC, patient_identifier_type_id DESC LIMIT 1", "an identifier type").await?;
    let national_id_type = one(
        conn,
        site,
        &format!("SELECT patient_identifier_type_id FROM patient_identifier_type WHERE uuid = '{NATIONAL_ID_TYPE_UUID}'"),
        "the National ID identifier type (provision the site first)",
    )
    .await?;

    // (concept id, uuid, low, high, precise)
    type Numeric = (i64, String, Option<f64>, Option<f64>, Option<i64>);
    let rows: Vec<Numeric> = conn
        .query(
            "SELECT c.concept_id, c.uuid, cn.low_absolute, cn.hi_absolute, cn.precise
             FROM concept_numeric cn JOIN concept c ON c.concept_id = cn.concept_id
             WHERE c.retired = 0 ORDER BY c.concept_id",
        )
        .await
        .map_err(db_err(site, "reading numeric concepts"))?;
    let numeric = rows
        .into_iter()
        .map(|(id, uuid, lo, hi, precise)| {
            let (lo, hi) = plausible(&uuid).unwrap_or((lo.unwrap_or(0.0), hi.unwrap_or(100.0).min(lo.unwrap_or(0.0) + 200.0)));
            NumericConcept { id, lo, hi, precise: precise.unwrap_or(0) != 0 }
        })
        .collect();

    let diagnosis = match (
        concept(conn, site, "159947AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?,
        concept(conn, site, "1284AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?,
        concept(conn, site, "159394AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?,
        concept(conn, site, "159946AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?,
    ) {
        (Some(group), Some(diag), Some(cert), Some(order)) => {
            let diagnoses = ids(
                conn,
                site,
                "SELECT c.concept_id FROM concept c JOIN concept_class cc ON cc.concept_class_id = c.class_id
                 WHERE cc.name = 'Diagnosis' AND c.retired = 0 ORDER BY c.concept_id",
            )
            .await?;
            let certainty = coded(conn, site, cert).await?;
            let order = coded(conn, site, order).await?;
            (!diagnoses.is_empty() && !certainty.answers.is_empty() && !order.answers.is_empty()).then_some(
                DiagnosisGroup { group, diagnosis: Coded { question: diag, answers: diagnoses }, certainty, order },
            )
        }
        _ => None,
    };
    let text_note = concept(conn, site, "162169AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?;
    let date_concept = concept(conn, site, "159948AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await?;

    let mut next_ids = BTreeMap::new();
    for (table, pk) in PATIENT_TABLES {
        let max = one(conn, site, &format!("SELECT COALESCE(MAX({pk}), 0) FROM {table}"), table).await?;
        next_ids.insert(*table, max + 1);
    }

    let existing: Vec<(i64, String, Option<i64>, Option<i64>)> = conn
        .query(
            "SELECT p.patient_id, pe.uuid,
                    (SELECT MIN(person_name_id) FROM person_name n WHERE n.person_id = p.patient_id AND n.voided = 0),
                    (SELECT MIN(person_address_id) FROM person_address a WHERE a.person_id = p.patient_id AND a.voided = 0)
             FROM patient p JOIN person pe ON pe.person_id = p.patient_id
             WHERE p.voided = 0 ORDER BY p.patient_id",
        )
        .await
        .map_err(db_err(site, "reading existing patients"))?;
    let existing = existing
        .into_iter()
        .map(|(person_id, uuid, name_id, address_id)| ExistingPatient { person_id, uuid, name_id, address_id })
        .collect();

    let baseline = table_counts(conn, site).await?;
    let mut shared = BTreeMap::new();
    shared.insert(
        "person".to_string(),
        one(conn, site, "SELECT COUNT(*) FROM person WHERE person_id NOT IN (SELECT patient_id FROM patient)", "persons").await?,
    );
    shared.insert(
        "person_name".to_string(),
        one(conn, site, "SELECT COUNT(*) FROM person_name WHERE person_id NOT IN (SELECT patient_id FROM patient)", "names").await?,
    );
    shared.insert(
        "person_address".to_string(),
        one(conn, site, "SELECT COUNT(*) FROM person_address WHERE person_id NOT IN (SELECT patient_id FROM patient)", "addresses").await?,
    );

    Ok(SiteStart {
        meta: Meta {
            user_id,
            locations,
            visit_type,
            providers,
            encounter_role,
            enc_vitals,
            enc_note,
            openmrs_id_type,
            national_id_type,
            numeric,
            diagnosis,
            text_note,
            date_concept,
        },
        next_ids,
        existing,
        baseline,
        shared,
    })
}

/// `COUNT(*)` of every base table of the current database.
pub async fn table_counts(conn: &mut Conn, site: &str) -> Result<BTreeMap<String, i64>, SimError> {
    let tables: Vec<String> = conn
        .query("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' ORDER BY table_name")
        .await
        .map_err(db_err(site, "listing tables"))?;
    if tables.is_empty() {
        return Ok(BTreeMap::new());
    }
    let sql = tables
        .iter()
        .map(|t| format!("SELECT '{t}', COUNT(*) FROM `{t}`"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows: Vec<(String, i64)> = conn.query(sql).await.map_err(db_err(site, "counting rows"))?;
    Ok(rows.into_iter().collect())
}
