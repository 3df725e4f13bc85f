//! The ground-truth manifest every downstream stage judges itself against.
//! Its format is documented in `simulate/README.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub seed: u64,
    pub patients: usize,
    pub dup_fraction: f64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Row changes (inserts, updates, deletes) written, all sites together.
    pub row_changes: u64,
    /// Seconds spent writing (after provisioning), until the last site finished.
    pub write_seconds: f64,
    pub sites: Vec<SiteManifest>,
    /// One entry per identity HQ can establish: the site records of one real human that share
    /// a National ID or are joined by a site merge. A record whose National ID was not yet entered
    /// when the run ended stands alone (it is the same human, but nothing says so yet).
    pub humans: Vec<HumanManifest>,
    pub site_merges: Vec<SiteMergeManifest>,
    pub offline: Vec<OfflineWindow>,
    pub expected_hq: ExpectedHq,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteManifest {
    pub name: String,
    /// Connection URL without the password.
    pub url: String,
    pub database: String,
    /// Whether the 100 demo patients of the OpenMRS dump live at this site.
    pub demo_patients: bool,
    pub registrations: u64,
    pub row_changes: u64,
    /// Rows per table at the end of the run (every base table).
    pub counts: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HumanManifest {
    /// Canonical (normalised) National ID, if the person has one.
    pub national_id: Option<String>,
    pub records: Vec<RecordManifest>,
    /// The record HQ keeps alive (DESIGN.md semantics 5): the earliest `person.date_created`
    /// as the simulator's sites stored it, then the smallest uuid. Absent in manifests of
    /// format 1 written before it existed.
    #[serde(default)]
    pub survivor_uuid: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordManifest {
    pub site: String,
    pub person_uuid: String,
    /// `primary`, `cross_site` (same person at another site), `local_dup` (registered twice at
    /// the same site) or `existing` (a patient that was there before the run).
    pub kind: String,
    /// The National ID exactly as typed at this site, if it was ever entered here.
    pub national_id_raw: Option<String>,
    /// False when the National ID was added by a later update (identity known late).
    pub national_id_at_registration: bool,
    /// Every National ID this record has held, in the simulator's canonical form (a misprinted
    /// number and its correction both count: HQ joins on any number a record ever held, when
    /// its agents were there to see it; a snapshot taken after a correction only shows the
    /// corrected number, so the manifest assumes the agents ran before the work was done).
    #[serde(default)]
    pub national_ids: Vec<String>,
    /// Corrections made to this record after registration, in order: `identifier_updated`,
    /// `identifier_voided_and_replaced`, `identifier_deleted_and_replaced`,
    /// `date_created_backdated`, `date_created_restored`.
    #[serde(default)]
    pub fixes: Vec<String>,
    /// Voided by a site-side merge into this person uuid.
    pub merged_into: Option<String>,
    /// The preferred name this site holds at the end, as typed there (`given family`), with the
    /// human's sex and birthdate (`F|1980-02-03`): what a near-miss suggestion compares.
    /// Absent for patients that were there before the run, and in older manifests.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub sex_birthdate: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteMergeManifest {
    pub site: String,
    pub winner_uuid: String,
    pub loser_uuid: String,
    /// The uuids of the loser's visits and encounters (voided ones too) that the merge moved to
    /// the winner, by the simulator's own record. Their obs moved with the encounters.
    #[serde(default)]
    pub moved_visits: Vec<String>,
    #[serde(default)]
    pub moved_encounters: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfflineWindow {
    pub site: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// What HQ must hold after consolidation, computed from the truth above.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpectedHq {
    /// Distinct real humans: the number of non-voided patients at HQ.
    pub active_patients: u64,
    /// Site records that HQ merges into another record of the same human (cross-site
    /// duplicates), one `person_merge_log` row each.
    pub hq_merges: u64,
    /// Rows per patient-data table at HQ (voided rows included; HQ never deletes a merged
    /// duplicate, it voids it). Metadata tables equal any one site's counts.
    pub tables: BTreeMap<String, i64>,
}
