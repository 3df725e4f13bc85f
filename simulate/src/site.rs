//! One site's generator and writer.
//!
//! The generator turns the plan into OpenMRS transactions, written the way the OpenMRS app
//! writes them (registration in one transaction; a visit with its encounters and obs in one
//! transaction; edits void the old obs and point `previous_version` at it; merges follow
//! `PatientService.mergePatients`). Every logical value comes from the site's own seeded RNG,
//! so a seed gives the same rows; only wall-clock columns (`date_created`, `date_changed`, …)
//! differ between runs. Primary keys are allocated here (the simulator owns the site while it
//! runs), which lets a whole transaction travel in one round trip.

use std::collections::{BTreeMap, VecDeque};

use chrono::{Duration, NaiveDateTime};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::names;
use crate::plan::{Correction, CorrectionKind, Human, NidMode, PlannedReg, RegKind};
use crate::provision::{Coded, ExistingPatient, Meta, SiteStart};
use crate::sql::{date, dt, io, q, qo, Insert};

mod merge;

/// One SQL transaction and the row changes it makes, per table and op.
#[derive(Debug, Default)]
pub struct Tx {
    pub sql: String,
    pub rows: u64,
    /// (table, op) → rows; op is `c`, `u` or `d`.
    pub changes: Vec<(&'static str, char, u64)>,
}

impl Tx {
    fn new() -> Self {
        let mut t = Tx::default();
        t.sql.push_str("START TRANSACTION;");
        t
    }
    pub fn stmt(&mut self, sql: &str, rows: u64) {
        self.sql.push_str(sql);
        self.sql.push(';');
        self.rows += rows;
    }
    fn change(&mut self, table: &'static str, op: char, rows: u64) {
        self.changes.push((table, op, rows));
    }
    fn update(&mut self, table: &'static str, sql: &str, rows: u64) {
        self.stmt(sql, rows);
        self.change(table, 'u', rows);
    }
    fn insert(&mut self, table: &'static str, ins: Insert) {
        let n = ins.rows();
        ins.finish(self);
        self.change(table, 'c', n);
    }
    fn commit(mut self) -> Self {
        self.sql.push_str("COMMIT;");
        self
    }
}

#[derive(Debug, Clone)]
struct ObsRef {
    id: i64,
    concept: i64,
    encounter: i64,
    datetime: NaiveDateTime,
    location: i64,
    value: f64,
}

#[derive(Debug, Clone)]
struct EncState {
    id: i64,
    uuid: String,
    live_obs: u64,
    voided: bool,
}

#[derive(Debug, Clone)]
pub struct PatientState {
    pub person_id: i64,
    pub uuid: String,
    /// Index into the plan's humans; None for patients that were there before the run.
    pub human: Option<usize>,
    pub kind: Option<RegKind>,
    name_id: Option<i64>,
    /// The preferred name as this site holds it now (given, family), as typed here.
    pub name: Option<(String, String)>,
    address_id: Option<i64>,
    pub voided: bool,
    pub openmrs_id: Option<String>,
    /// The National ID as typed at this site, once it is known here.
    pub national_id_raw: Option<String>,
    pub nid_at_registration: bool,
    /// Canonical National IDs this record has ever held here (the plan's, never normalised).
    pub nids_held: Vec<String>,
    /// The National ID row and what it stands for, while it may still be corrected.
    nid_row: Option<i64>,
    /// What a National ID added later stands for.
    late_canonical: Option<String>,
    correction: Option<Correction>,
    /// Identifier corrections and date fixes done here, for the manifest.
    pub fixes: Vec<&'static str>,
    encounters: Vec<EncState>,
    /// The uuids of this record's visits (a merge log names the ones it moves).
    visits: Vec<String>,
    obs_total: u64,
    /// Numeric obs that may still be edited or deleted (never edited, not voided).
    editable: Vec<ObsRef>,
}

/// A merge done at the site: (winner uuid, loser uuid).
#[derive(Debug, Clone)]
pub struct SiteMerge {
    pub winner_uuid: String,
    pub loser_uuid: String,
    /// What the merge moved, as its log names it: the loser's visits and encounters.
    pub moved_visits: Vec<String>,
    pub moved_encounters: Vec<String>,
}

pub struct SiteGen {
    pub name: String,
    code: char,
    rng: ChaCha8Rng,
    meta: Meta,
    next: BTreeMap<&'static str, i64>,
    pub patients: Vec<PatientState>,
    /// Indices of patients that can receive activity (not voided).
    live: Vec<usize>,
    regs: VecDeque<PlannedReg>,
    /// Non-registration actions left in plan mode.
    budget: u64,
    action_no: u64,
    pending_nid: Vec<(u64, usize, String)>,
    pending_merge: Vec<(u64, usize, usize)>,
    /// Corrections and date fixes due: (action number, patient, fix).
    pending_fix: Vec<(u64, usize, Fix)>,
    /// First registration of each human at this site (winner of a later local merge).
    first_reg: BTreeMap<usize, usize>,
    clock: NaiveDateTime,
    /// Rows inserted (+) and deleted (−) per table since the start.
    pub deltas: BTreeMap<&'static str, i64>,
    pub merges: Vec<SiteMerge>,
    pub registered: u64,
    pub clock_trouble: ClockTrouble,
    planned_regs: u64,
}

/// What is wrong with a site server's clock (its NOW(), so its DATETIMEs and binlog times).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockTrouble {
    None,
    /// Runs this many seconds behind.
    Behind(i64),
    /// Jumps a day ahead from 30 % to 50 % of the site's registrations, then back.
    JumpsADay,
}

/// Non-registration actions per registration in plan mode.
const ACTIONS_PER_PATIENT: u64 = 3;

impl SiteGen {
    pub fn new(name: &str, index: usize, rng: ChaCha8Rng, start: &SiteStart, regs: Vec<PlannedReg>) -> Self {
        let patients: Vec<PatientState> = start.existing.iter().map(existing_state).collect();
        let live = (0..patients.len()).collect();
        let budget = regs.len() as u64 * ACTIONS_PER_PATIENT;
        let regs_len = regs.len() as u64;
        SiteGen {
            name: name.to_string(),
            code: (b'A' + (index % 26) as u8) as char,
            rng,
            meta: start.meta.clone(),
            next: start.next_ids.clone(),
            patients,
            live,
            regs: regs.into(),
            budget,
            action_no: 0,
            pending_nid: Vec::new(),
            pending_merge: Vec::new(),
            pending_fix: Vec::new(),
            first_reg: BTreeMap::new(),
            clock: chrono::NaiveDate::from_ymd_opt(2024, 1, 8)
                .and_then(|d| d.and_hms_opt(8, 0, 0))
                .unwrap_or_default(),
            deltas: BTreeMap::new(),
            merges: Vec::new(),
            registered: 0,
            clock_trouble: ClockTrouble::None,
            planned_regs: regs_len,
        }
    }

    fn id(&mut self, table: &'static str) -> i64 {
        let e = self.next.entry(table).or_insert(1);
        let v = *e;
        *e += 1;
        v
    }

    fn uuid(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.gen()).into_uuid().to_string()
    }

    fn tick(&mut self) -> NaiveDateTime {
        self.clock += Duration::minutes(self.rng.gen_range(1..25));
        self.clock
    }

    /// The next transaction. In plan mode (`ongoing == false`) None once the plan is done; in
    /// ongoing mode activity continues on existing patients after the plan.
    pub fn next_tx(&mut self, humans: &[Human], ongoing: bool) -> Option<Tx> {
        self.action_no += 1;
        let now = self.action_no;
        let drain = self.regs.is_empty() && self.budget == 0;
        if let Some(i) = self.pending_merge.iter().position(|(due, _, _)| *due <= now || drain) {
            let (_, w, l) = self.pending_merge.remove(i);
            return Some(self.commit(|g, tx| g.merge(tx, w, l)));
        }
        if let Some(i) = self.pending_nid.iter().position(|(due, _, _)| *due <= now || drain) {
            let (_, p, raw) = self.pending_nid.remove(i);
            return Some(self.commit(|g, tx| g.add_national_id(tx, p, &raw)));
        }
        if let Some(i) = self.pending_fix.iter().position(|(due, _, _)| *due <= now || drain) {
            let (_, p, fix) = self.pending_fix.remove(i);
            return Some(self.commit(|g, tx| g.fix(tx, p, fix)));
        }
        let remaining_regs = self.regs.len() as u64;
        let other_possible = !self.live.is_empty() && (self.budget > 0 || (ongoing && remaining_regs == 0));
        let do_reg = remaining_regs > 0
            && (!other_possible || self.rng.gen_range(0..remaining_regs + self.budget.max(1)) < remaining_regs);
        if do_reg {
            let reg = self.regs.pop_front()?;
            return Some(self.commit(|g, tx| g.register(tx, &humans[reg.human], &reg)));
        }
        if !other_possible {
            return None;
        }
        self.budget = self.budget.saturating_sub(1);
        let p = *self.live.choose(&mut self.rng)?;
        let roll = self.rng.gen_range(0..100);
        Some(self.commit(|g, tx| match roll {
            0..=54 => g.visit(tx, p),
            55..=66 => {
                if !g.edit_obs(tx, p) {
                    g.visit(tx, p)
                }
            }
            67..=76 => g.correct_name(tx, p),
            77..=86 => g.change_address(tx, p),
            87..=93 => {
                if !g.void_encounter(tx, p) {
                    g.visit(tx, p)
                }
            }
            _ => {
                if !g.delete_obs(tx, p) {
                    g.visit(tx, p)
                }
            }
        }))
    }

    /// Seconds the site's clock is off by, now.
    fn clock_shift(&self) -> i64 {
        match self.clock_trouble {
            ClockTrouble::None => 0,
            ClockTrouble::Behind(s) => -s,
            ClockTrouble::JumpsADay => {
                let done = self.registered * 10;
                if done >= self.planned_regs * 3 && done < self.planned_regs * 5 { 86_400 } else { 0 }
            }
        }
    }

    fn commit(&mut self, f: impl FnOnce(&mut Self, &mut Tx)) -> Tx {
        let mut tx = Tx::new();
        if self.clock_trouble != ClockTrouble::None {
            // The session clock stands in for the server's: NOW() and the binlog follow it.
            let set = match self.clock_shift() {
                0 => "SET timestamp = DEFAULT;".to_string(),
                s => format!("SET timestamp = UNIX_TIMESTAMP(SYSDATE(6)) + {s};"),
            };
            tx.sql.insert_str(0, &set);
        }
        f(self, &mut tx);
        for (table, op, n) in &tx.changes {
            match op {
                'c' => *self.deltas.entry(table).or_insert(0) += *n as i64,
                'd' => *self.deltas.entry(table).or_insert(0) -= *n as i64,
                _ => {}
            }
        }
        tx.commit()
    }

    fn register(&mut self, tx: &mut Tx, h: &Human, reg: &PlannedReg) {
        let user = self.meta.user_id;
        let person_id = self.id("person");
        let person_uuid = self.uuid();
        let (given, family) = match reg.kind {
            RegKind::Primary => (h.given.clone(), h.family.clone()),
            RegKind::CrossSite => {
                let g = if self.rng.gen_bool(0.5) { names::misspell(&mut self.rng, &h.given) } else { h.given.clone() };
                let f = if self.rng.gen_bool(0.3) { names::misspell(&mut self.rng, &h.family) } else { h.family.clone() };
                (g, f)
            }
            RegKind::LocalDup => (names::misspell(&mut self.rng, &h.given), h.family.clone()),
        };
        // Registration takes clinic time too (the logical clock moves; date_created is NOW()).
        self.tick();

        let mut ins = Insert::new(
            "person",
            &["person_id", "gender", "birthdate", "birthdate_estimated", "dead", "creator", "date_created", "voided", "uuid", "deathdate_estimated"],
        );
        ins.row(&[person_id.to_string(), q(h.gender), date(h.birthdate), "0".into(), "0".into(), user.to_string(), "NOW()".into(), "0".into(), q(&person_uuid), "0".into()]);
        tx.insert("person", ins);

        let name_id = self.id("person_name");
        let name_uuid = self.uuid();
        let mut ins = Insert::new(
            "person_name",
            &["person_name_id", "preferred", "person_id", "given_name", "family_name", "creator", "date_created", "voided", "uuid"],
        );
        ins.row(&[name_id.to_string(), "1".into(), person_id.to_string(), q(&given), q(&family), user.to_string(), "NOW()".into(), "0".into(), q(&name_uuid)]);
        tx.insert("person_name", ins);

        let address_id = self.id("person_address");
        let address_uuid = self.uuid();
        let city = names::CITIES.choose(&mut self.rng).copied().unwrap_or("Kisumu");
        let county = names::COUNTIES.choose(&mut self.rng).copied().unwrap_or("Kisumu");
        let plot = format!("Plot {}", self.rng.gen_range(1..999));
        let mut ins = Insert::new(
            "person_address",
            &["person_address_id", "person_id", "preferred", "address1", "city_village", "county_district", "country", "creator", "date_created", "voided", "uuid"],
        );
        ins.row(&[address_id.to_string(), person_id.to_string(), "1".into(), q(&plot), q(city), q(county), q("Kenya"), user.to_string(), "NOW()".into(), "0".into(), q(&address_uuid)]);
        tx.insert("person_address", ins);

        let mut ins = Insert::new("patient", &["patient_id", "creator", "date_created", "voided", "allergy_status"]);
        ins.row(&[person_id.to_string(), user.to_string(), "NOW()".into(), "0".into(), q("Unknown")]);
        tx.insert("patient", ins);

        let seq = self.next.get("patient_identifier").copied().unwrap_or(1);
        let openmrs_id = luhn_id(self.code, seq);
        let location = *self.meta.locations.choose(&mut self.rng).unwrap_or(&1);
        let mut ins = Insert::new(
            "patient_identifier",
            &["patient_identifier_id", "patient_id", "identifier", "identifier_type", "preferred", "location_id", "creator", "date_created", "voided", "uuid"],
        );
        let pid = self.id("patient_identifier");
        let u = self.uuid();
        ins.row(&[pid.to_string(), person_id.to_string(), q(&openmrs_id), self.meta.openmrs_id_type.to_string(), "1".into(), location.to_string(), user.to_string(), "NOW()".into(), "0".into(), q(&u)]);
        let mut nid_raw = None;
        let mut nid_row = None;
        if let NidMode::AtRegistration(raw) = &reg.nid {
            let pid = self.id("patient_identifier");
            let u = self.uuid();
            ins.row(&[pid.to_string(), person_id.to_string(), q(raw), self.meta.national_id_type.to_string(), "0".into(), location.to_string(), user.to_string(), "NOW()".into(), "0".into(), q(&u)]);
            nid_raw = Some(raw.clone());
            nid_row = Some(pid);
        }
        tx.insert("patient_identifier", ins);

        let idx = self.patients.len();
        self.patients.push(PatientState {
            person_id,
            uuid: person_uuid,
            human: Some(h.idx),
            kind: Some(reg.kind),
            name_id: Some(name_id),
            name: Some((given.clone(), family.clone())),
            address_id: Some(address_id),
            voided: false,
            openmrs_id: Some(openmrs_id),
            national_id_raw: nid_raw.clone(),
            nid_at_registration: nid_raw.is_some(),
            nids_held: if nid_raw.is_some() { reg.nid_canonical.iter().cloned().collect() } else { Vec::new() },
            nid_row,
            late_canonical: None,
            correction: reg.correction.clone(),
            fixes: Vec::new(),
            encounters: Vec::new(),
            visits: Vec::new(),
            obs_total: 0,
            editable: Vec::new(),
        });
        self.live.push(idx);
        self.registered += 1;
        let now = self.action_no;
        if let NidMode::Late(raw) = &reg.nid {
            let due = now + self.rng.gen_range(3..40);
            self.pending_nid.push((due, idx, raw.clone()));
            self.patients[idx].late_canonical = reg.nid_canonical.clone();
        } else if reg.correction.is_some() {
            self.schedule_correction(idx);
        }
        if let Some(d) = &reg.date_fix {
            self.pending_fix.push((now + self.rng.gen_range(10..60), idx, Fix::Date(d.to)));
            if d.undone {
                self.pending_fix.push((now + self.rng.gen_range(60..120), idx, Fix::DateBack));
            }
        }
        match reg.kind {
            RegKind::LocalDup => {
                if let Some(&winner) = self.first_reg.get(&h.idx) {
                    let due = now + self.rng.gen_range(3..30);
                    self.pending_merge.push((due, winner, idx));
                }
            }
            _ => {
                self.first_reg.entry(h.idx).or_insert(idx);
            }
        }
    }

    fn add_national_id(&mut self, tx: &mut Tx, p: usize, raw: &str) {
        let id = self.id("patient_identifier");
        let u = self.uuid();
        let location = *self.meta.locations.choose(&mut self.rng).unwrap_or(&1);
        let person_id = self.patients[p].person_id;
        let mut ins = Insert::new(
            "patient_identifier",
            &["patient_identifier_id", "patient_id", "identifier", "identifier_type", "preferred", "location_id", "creator", "date_created", "voided", "uuid"],
        );
        ins.row(&[id.to_string(), person_id.to_string(), q(raw), self.meta.national_id_type.to_string(), "0".into(), location.to_string(), self.meta.user_id.to_string(), "NOW()".into(), "0".into(), q(&u)]);
        tx.insert("patient_identifier", ins);
        // OpenMRS saves the patient too, which stamps it as changed.
        tx.update("patient", &format!("UPDATE patient SET changed_by = {}, date_changed = NOW() WHERE patient_id = {person_id}", self.meta.user_id), 1);
        self.patients[p].national_id_raw = Some(raw.to_string());
        self.patients[p].nid_row = Some(id);
        if let Some(c) = self.patients[p].late_canonical.take() {
            self.patients[p].nids_held.push(c);
        }
        if self.patients[p].correction.is_some() {
            self.schedule_correction(p);
        }
    }

    /// A misprinted number is corrected a while after it was entered: long enough that the
    /// person's other sites have often registered the same misprint, and HQ has joined them on it.
    fn schedule_correction(&mut self, p: usize) {
        if let Some(c) = self.patients[p].correction.take() {
            let due = self.action_no + self.rng.gen_range(10..60);
            self.pending_fix.push((due, p, Fix::Identifier(c)));
        }
    }

    fn fix(&mut self, tx: &mut Tx, p: usize, fix: Fix) {
        let user = self.meta.user_id;
        let person_id = self.patients[p].person_id;
        match fix {
            Fix::Identifier(c) => {
                let Some(row) = self.patients[p].nid_row else { return };
                let new_row = match c.kind {
                    CorrectionKind::Update => {
                        tx.update(
                            "patient_identifier",
                            &format!("UPDATE patient_identifier SET identifier = {}, changed_by = {user}, date_changed = NOW() WHERE patient_identifier_id = {row}", q(&c.raw)),
                            1,
                        );
                        row
                    }
                    CorrectionKind::VoidAndAdd | CorrectionKind::DeleteAndAdd => {
                        if c.kind == CorrectionKind::VoidAndAdd {
                            let void = format!("UPDATE patient_identifier SET voided = 1, voided_by = {user}, date_voided = NOW(), void_reason = 'Entered in error: misprinted card' WHERE patient_identifier_id = {row}");
                            tx.update("patient_identifier", &void, 1);
                        } else {
                            tx.stmt(&format!("DELETE FROM patient_identifier WHERE patient_identifier_id = {row}"), 1);
                            tx.change("patient_identifier", 'd', 1);
                        }
                        let id = self.id("patient_identifier");
                        let u = self.uuid();
                        let location = *self.meta.locations.choose(&mut self.rng).unwrap_or(&1);
                        let mut ins = Insert::new(
                            "patient_identifier",
                            &["patient_identifier_id", "patient_id", "identifier", "identifier_type", "preferred", "location_id", "creator", "date_created", "voided", "uuid"],
                        );
                        ins.row(&[id.to_string(), person_id.to_string(), q(&c.raw), self.meta.national_id_type.to_string(), "0".into(), location.to_string(), user.to_string(), "NOW()".into(), "0".into(), q(&u)]);
                        tx.insert("patient_identifier", ins);
                        id
                    }
                };
                let st = &mut self.patients[p];
                st.nid_row = Some(new_row);
                st.national_id_raw = Some(c.raw);
                st.nids_held.push(c.canonical);
                st.fixes.push(match c.kind {
                    CorrectionKind::Update => "identifier_updated",
                    CorrectionKind::VoidAndAdd => "identifier_voided_and_replaced",
                    CorrectionKind::DeleteAndAdd => "identifier_deleted_and_replaced",
                });
            }
            // A data fix: no date_changed, as an administrator's SQL leaves it.
            Fix::Date(to) => {
                tx.update("person", &format!("UPDATE person SET date_created = {} WHERE person_id = {person_id}", dt(to)), 1);
                self.patients[p].fixes.push("date_created_backdated");
            }
            // Back to when the record was entered (the patient row was created with it).
            Fix::DateBack => {
                tx.update(
                    "person",
                    &format!("UPDATE person p JOIN patient pa ON pa.patient_id = p.person_id SET p.date_created = pa.date_created WHERE p.person_id = {person_id}"),
                    1,
                );
                self.patients[p].fixes.push("date_created_restored");
            }
        }
    }

    fn obs_row(&mut self, ins: &mut Insert, o: ObsRow) -> i64 {
        let id = self.id("obs");
        let u = self.uuid();
        ins.row(&[
            id.to_string(),
            o.person.to_string(),
            o.concept.to_string(),
            o.encounter.to_string(),
            dt(o.datetime),
            o.location.to_string(),
            io(o.group),
            io(o.coded),
            o.datetime_value.map(dt).unwrap_or_else(|| "NULL".into()),
            o.numeric.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into()),
            qo(o.text.as_deref()),
            self.meta.user_id.to_string(),
            "NOW()".into(),
            "0".into(),
            q(&u),
            io(o.previous),
        ]);
        id
    }

    fn visit(&mut self, tx: &mut Tx, p: usize) {
        let user = self.meta.user_id;
        let person = self.patients[p].person_id;
        let start = self.tick();
        let location = *self.meta.locations.choose(&mut self.rng).unwrap_or(&1);
        let visit_id = self.id("visit");
        let visit_uuid = self.uuid();
        let mut ins = Insert::new(
            "visit",
            &["visit_id", "patient_id", "visit_type_id", "date_started", "date_stopped", "location_id", "creator", "date_created", "voided", "uuid"],
        );
        ins.row(&[visit_id.to_string(), person.to_string(), self.meta.visit_type.to_string(), dt(start), dt(start + Duration::minutes(90)), location.to_string(), user.to_string(), "NOW()".into(), "0".into(), q(&visit_uuid)]);
        tx.insert("visit", ins);

        let mut enc = Insert::new(
            "encounter",
            &["encounter_id", "encounter_type", "patient_id", "location_id", "encounter_datetime", "creator", "date_created", "voided", "visit_id", "uuid"],
        );
        let mut prov = Insert::new(
            "encounter_provider",
            &["encounter_provider_id", "encounter_id", "provider_id", "encounter_role_id", "creator", "date_created", "voided", "uuid"],
        );
        let mut obs = Insert::new(
            "obs",
            &["obs_id", "person_id", "concept_id", "encounter_id", "obs_datetime", "location_id", "obs_group_id", "value_coded", "value_datetime", "value_numeric", "value_text", "creator", "date_created", "voided", "uuid", "previous_version"],
        );
        let mut members = Insert::new(
            "obs",
            &["obs_id", "person_id", "concept_id", "encounter_id", "obs_datetime", "location_id", "obs_group_id", "value_coded", "value_datetime", "value_numeric", "value_text", "creator", "date_created", "voided", "uuid", "previous_version"],
        );

        // Vitals.
        let vitals_at = start + Duration::minutes(5);
        let (vitals, vitals_uuid) = self.encounter_row(&mut enc, &mut prov, self.meta.enc_vitals, person, location, vitals_at, visit_id);
        let mut n_vitals = 0;
        let numeric = self.meta.numeric.clone();
        for c in &numeric {
            if !self.rng.gen_bool(0.85) {
                continue;
            }
            let raw = self.rng.gen_range(c.lo..=c.hi);
            let value = if c.precise { (raw * 10.0).round() / 10.0 } else { raw.round() };
            let id = self.obs_row(&mut obs, ObsRow::numeric(person, c.id, vitals, vitals_at, location, value));
            self.patients[p].editable.push(ObsRef { id, concept: c.id, encounter: vitals, datetime: vitals_at, location, value });
            n_vitals += 1;
        }

        // Visit note: diagnoses as obs groups, a free-text note, sometimes a date.
        let note_at = start + Duration::minutes(30);
        let (note, note_uuid) = self.encounter_row(&mut enc, &mut prov, self.meta.enc_note, person, location, note_at, visit_id);
        let mut n_note = 0;
        if let Some(d) = self.meta.diagnosis.clone() {
            for order in 0..self.rng.gen_range(1..=2usize) {
                let group = self.obs_row(&mut obs, ObsRow::group(person, d.group, note, note_at, location));
                let diag = self.pick(&d.diagnosis);
                let cert = self.pick(&d.certainty);
                let ord = d.order.answers.get(order.min(d.order.answers.len() - 1)).copied().unwrap_or(cert);
                self.obs_row(&mut members, ObsRow::coded(person, d.diagnosis.question, note, note_at, location, diag, Some(group)));
                self.obs_row(&mut members, ObsRow::coded(person, d.certainty.question, note, note_at, location, cert, Some(group)));
                self.obs_row(&mut members, ObsRow::coded(person, d.order.question, note, note_at, location, ord, Some(group)));
                n_note += 4;
            }
        }
        if let Some(c) = self.meta.text_note {
            let text = names::note(&mut self.rng);
            self.obs_row(&mut obs, ObsRow::text(person, c, note, note_at, location, text));
            n_note += 1;
        }
        if let (Some(c), true) = (self.meta.date_concept, self.rng.gen_bool(0.2)) {
            let when = note_at + Duration::days(self.rng.gen_range(7..90));
            let mut row = ObsRow::group(person, c, note, note_at, location);
            row.datetime_value = Some(when);
            self.obs_row(&mut obs, row);
            n_note += 1;
        }
        let n_obs = obs.rows() + members.rows();
        tx.insert("encounter", enc);
        tx.insert("encounter_provider", prov);
        tx.insert("obs", obs);
        tx.insert("obs", members);
        let st = &mut self.patients[p];
        st.encounters.push(EncState { id: vitals, uuid: vitals_uuid, live_obs: n_vitals, voided: false });
        st.encounters.push(EncState { id: note, uuid: note_uuid, live_obs: n_note, voided: false });
        st.visits.push(visit_uuid);
        st.obs_total += n_obs;
        if st.editable.len() > 24 {
            let excess = st.editable.len() - 24;
            st.editable.drain(0..excess);
        }
    }

    fn pick(&mut self, c: &Coded) -> i64 {
        *c.answers.choose(&mut self.rng).unwrap_or(&c.question)
    }

    #[allow(clippy::too_many_arguments)]
    fn encounter_row(&mut self, enc: &mut Insert, prov: &mut Insert, etype: i64, person: i64, location: i64, at: NaiveDateTime, visit: i64) -> (i64, String) {
        let id = self.id("encounter");
        let u = self.uuid();
        enc.row(&[id.to_string(), etype.to_string(), person.to_string(), location.to_string(), dt(at), self.meta.user_id.to_string(), "NOW()".into(), "0".into(), visit.to_string(), q(&u)]);
        if let Some(&provider) = self.meta.providers.choose(&mut self.rng) {
            let pid = self.id("encounter_provider");
            let pu = self.uuid();
            prov.row(&[pid.to_string(), id.to_string(), provider.to_string(), self.meta.encounter_role.to_string(), self.meta.user_id.to_string(), "NOW()".into(), "0".into(), q(&pu)]);
        }
        (id, u)
    }

    /// An edit as OpenMRS does it: the old obs is voided and the new one points back at it.
    fn edit_obs(&mut self, tx: &mut Tx, p: usize) -> bool {
        if self.patients[p].editable.is_empty() {
            return false;
        }
        let i = self.rng.gen_range(0..self.patients[p].editable.len());
        let old = self.patients[p].editable.swap_remove(i);
        let person = self.patients[p].person_id;
        let user = self.meta.user_id;
        tx.update(
            "obs",
            &format!("UPDATE obs SET voided = 1, voided_by = {user}, date_voided = NOW(), void_reason = 'Edited: value corrected' WHERE obs_id = {}", old.id),
            1,
        );
        let value = ((old.value * self.rng.gen_range(0.9..1.1)) * 10.0).round() / 10.0;
        let mut ins = Insert::new(
            "obs",
            &["obs_id", "person_id", "concept_id", "encounter_id", "obs_datetime", "location_id", "obs_group_id", "value_coded", "value_datetime", "value_numeric", "value_text", "creator", "date_created", "voided", "uuid", "previous_version"],
        );
        let mut row = ObsRow::numeric(person, old.concept, old.encounter, old.datetime, old.location, value);
        row.previous = Some(old.id);
        self.obs_row(&mut ins, row);
        tx.insert("obs", ins);
        self.patients[p].obs_total += 1;
        true
    }

    fn correct_name(&mut self, tx: &mut Tx, p: usize) {
        let Some(name_id) = self.patients[p].name_id else { return self.change_address(tx, p) };
        let pool = if self.rng.gen_bool(0.5) { names::GIVEN_F } else { names::GIVEN_M };
        let given = pool.choose(&mut self.rng).copied().unwrap_or("Alex");
        tx.update(
            "person_name",
            &format!("UPDATE person_name SET given_name = {}, changed_by = {}, date_changed = NOW() WHERE person_name_id = {name_id}", q(given), self.meta.user_id),
            1,
        );
        if let Some(n) = self.patients[p].name.as_mut() {
            n.0 = given.to_string();
        }
    }

    fn change_address(&mut self, tx: &mut Tx, p: usize) {
        let Some(address_id) = self.patients[p].address_id else { return };
        let city = names::CITIES.choose(&mut self.rng).copied().unwrap_or("Kisumu");
        let plot = format!("Plot {}", self.rng.gen_range(1..999));
        tx.update(
            "person_address",
            &format!(
                "UPDATE person_address SET address1 = {}, city_village = {}, changed_by = {}, date_changed = NOW() WHERE person_address_id = {address_id}",
                q(&plot),
                q(city),
                self.meta.user_id
            ),
            1,
        );
    }

    /// Voids an encounter and, as `EncounterService.voidEncounter` does, its obs.
    fn void_encounter(&mut self, tx: &mut Tx, p: usize) -> bool {
        let live: Vec<usize> = (0..self.patients[p].encounters.len()).filter(|&i| !self.patients[p].encounters[i].voided).collect();
        let Some(&i) = live.choose(&mut self.rng) else { return false };
        let user = self.meta.user_id;
        let e = self.patients[p].encounters[i].clone();
        tx.update(
            "encounter",
            &format!("UPDATE encounter SET voided = 1, voided_by = {user}, date_voided = NOW(), void_reason = 'Entered in error' WHERE encounter_id = {}", e.id),
            1,
        );
        if e.live_obs > 0 {
            tx.update(
                "obs",
                &format!("UPDATE obs SET voided = 1, voided_by = {user}, date_voided = NOW(), void_reason = 'Entered in error' WHERE encounter_id = {} AND voided = 0", e.id),
                e.live_obs,
            );
        }
        let st = &mut self.patients[p];
        st.encounters[i].voided = true;
        st.encounters[i].live_obs = 0;
        st.editable.retain(|o| o.encounter != e.id);
        true
    }

    /// A hard delete (rare in OpenMRS, but it happens: purge of an erroneous obs).
    fn delete_obs(&mut self, tx: &mut Tx, p: usize) -> bool {
        if self.patients[p].editable.is_empty() {
            return false;
        }
        let i = self.rng.gen_range(0..self.patients[p].editable.len());
        let old = self.patients[p].editable.swap_remove(i);
        tx.stmt(&format!("DELETE FROM obs WHERE obs_id = {}", old.id), 1);
        tx.change("obs", 'd', 1);
        let st = &mut self.patients[p];
        st.obs_total = st.obs_total.saturating_sub(1);
        if let Some(e) = st.encounters.iter_mut().find(|e| e.id == old.encounter) {
            e.live_obs = e.live_obs.saturating_sub(1);
        }
        true
    }

}

/// A correction made some time after the fact.
#[derive(Debug, Clone)]
enum Fix {
    Identifier(Correction),
    Date(NaiveDateTime),
    DateBack,
}

struct ObsRow {
    person: i64,
    concept: i64,
    encounter: i64,
    datetime: NaiveDateTime,
    location: i64,
    group: Option<i64>,
    coded: Option<i64>,
    datetime_value: Option<NaiveDateTime>,
    numeric: Option<f64>,
    text: Option<String>,
    previous: Option<i64>,
}

impl ObsRow {
    fn base(person: i64, concept: i64, encounter: i64, datetime: NaiveDateTime, location: i64) -> Self {
        ObsRow { person, concept, encounter, datetime, location, group: None, coded: None, datetime_value: None, numeric: None, text: None, previous: None }
    }
    fn group(person: i64, concept: i64, encounter: i64, datetime: NaiveDateTime, location: i64) -> Self {
        Self::base(person, concept, encounter, datetime, location)
    }
    fn numeric(person: i64, concept: i64, encounter: i64, datetime: NaiveDateTime, location: i64, v: f64) -> Self {
        ObsRow { numeric: Some(v), ..Self::base(person, concept, encounter, datetime, location) }
    }
    fn coded(person: i64, concept: i64, encounter: i64, datetime: NaiveDateTime, location: i64, v: i64, group: Option<i64>) -> Self {
        ObsRow { coded: Some(v), group, ..Self::base(person, concept, encounter, datetime, location) }
    }
    fn text(person: i64, concept: i64, encounter: i64, datetime: NaiveDateTime, location: i64, v: String) -> Self {
        ObsRow { text: Some(v), ..Self::base(person, concept, encounter, datetime, location) }
    }
}

fn existing_state(e: &ExistingPatient) -> PatientState {
    PatientState {
        person_id: e.person_id,
        uuid: e.uuid.clone(),
        human: None,
        kind: None,
        name_id: e.name_id,
        name: None,
        address_id: e.address_id,
        voided: false,
        openmrs_id: None,
        national_id_raw: None,
        nid_at_registration: false,
        nids_held: Vec::new(),
        nid_row: None,
        late_canonical: None,
        correction: None,
        fixes: Vec::new(),
        encounters: Vec::new(),
        visits: Vec::new(),
        obs_total: 0,
        editable: Vec::new(),
    }
}

/// A site-prefixed OpenMRS-style identifier with a Luhn check digit, e.g. `A100023-7`.
fn luhn_id(code: char, seq: i64) -> String {
    let body = format!("{}", 100_000 + seq);
    let mut sum = 0;
    for (i, c) in body.chars().rev().enumerate() {
        let mut d = c.to_digit(10).unwrap_or(0);
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    format!("{code}{body}-{}", (10 - sum % 10) % 10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn luhn_ids_are_site_prefixed_and_checked() {
        assert_eq!(super::luhn_id('A', 1), "A100001-7"); // 1000017 passes the Luhn check
        assert!(super::luhn_id('B', 42).starts_with("B100042-"));
    }
}
