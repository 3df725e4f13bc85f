//! The population plan: who exists, where each person is registered, and how their National ID
//! becomes known. It is a pure function of (seed, sites, patients, dup fraction, adversarial
//! rate), so the same seed gives the same people, identifiers and uuids.
//!
//! The adversarial identity mode (`adversarial` > 0, its own random stream, so a plan without it
//! is unchanged) does to identity what real clinics do, each at that rate: a National ID pasted
//! with Unicode dashes, full-width forms, no-break or zero-width spaces (the same person); a
//! person with the same name, sex and birthdate as another but a different National ID (two
//! people); a National ID one digit apart from another person's (two people); a card misprinted
//! with a wrong number, typed at every site the person visits and corrected at some of them
//! later (an UPDATE of the value, a void and a new identifier, or a delete and a new one), often
//! after HQ has already joined the person's records on the wrong number; a registration date
//! fixed after the fact (a paper register's date, sometimes before 1970, sometimes put back
//! again), which changes the survivor of a merged person. The truth stays the plan's own: each
//! human's canonical numbers, never a normaliser's output.

use chrono::NaiveDate;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::names;

/// One real human.
#[derive(Debug, Clone)]
pub struct Human {
    pub idx: usize,
    /// Canonical National ID (`NID` + 9 digits), if the person has one.
    pub national_id: Option<String>,
    pub gender: &'static str,
    pub given: String,
    pub family: String,
    pub birthdate: NaiveDate,
    /// A wrong number printed on the person's card (adversarial mode): typed instead of the
    /// real one, and corrected at some sites. Nobody else's number.
    pub misprint: Option<String>,
}

/// How a registration learns the National ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NidMode {
    /// Typed in at registration (with formatting noise).
    AtRegistration(String),
    /// Added later by an update: the identity becomes known late.
    Late(String),
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegKind {
    /// The person's first registration.
    Primary,
    /// The same person registered at another site (a cross-site duplicate).
    CrossSite,
    /// The same person registered a second time at the same site, later merged there.
    LocalDup,
}

#[derive(Debug, Clone)]
pub struct PlannedReg {
    pub human: usize,
    pub kind: RegKind,
    pub nid: NidMode,
    /// The canonical number `nid` stands for (the human's, or the card's misprint).
    pub nid_canonical: Option<String>,
    /// How the clerk corrects a misprinted number at this site, if they do.
    pub correction: Option<Correction>,
    /// A later fix of the registration date (adversarial mode).
    pub date_fix: Option<DateFix>,
}

/// How a clerk replaces a wrong National ID with the right one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrectionKind {
    /// `UPDATE patient_identifier SET identifier = …` (the edit form).
    Update,
    /// Void the wrong identifier, add the right one.
    VoidAndAdd,
    /// Delete the wrong identifier (a purge), add the right one.
    DeleteAndAdd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub kind: CorrectionKind,
    /// The right number as typed this time.
    pub raw: String,
    /// Its canonical form (the plan's own).
    pub canonical: String,
}

/// A registration date set by hand after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateFix {
    /// The date from the paper register.
    pub to: chrono::NaiveDateTime,
    /// Whether a supervisor later puts the date back to when the record was entered.
    pub undone: bool,
}

pub struct Plan {
    pub humans: Vec<Human>,
    /// Registrations per site, in the order the site performs them.
    pub per_site: Vec<Vec<PlannedReg>>,
}

/// Fraction of single-site people who have a National ID at all.
const NID_COVERAGE: f64 = 0.6;
/// Fraction of cross-site duplicates that appear at three sites (when there are three).
const THREE_SITE: f64 = 0.25;
/// Fraction of a duplicate's non-home registrations whose National ID is added later.
const LATE_NID: f64 = 0.35;
/// Fraction of people registered twice at their home site and merged there.
const LOCAL_DUP: f64 = 0.04;
/// Fraction of a misprinted card's registrations whose number is later corrected.
const MISPRINT_CORRECTED: f64 = 0.7;
/// Fraction of registration-date fixes put back later.
const DATE_FIX_UNDONE: f64 = 0.3;

pub fn seed_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The adversarial choices of one plan (see the module header).
struct Adversary {
    rng: ChaCha8Rng,
    rate: f64,
}

impl Adversary {
    fn roll(&mut self) -> bool {
        self.rate > 0.0 && self.rng.gen_bool(self.rate.clamp(0.0, 1.0))
    }
}

impl Plan {
    pub fn new(seed: u64, sites: usize, patients: usize, dup_fraction: f64) -> Plan {
        Plan::with_adversarial(seed, sites, patients, dup_fraction, 0.0)
    }


    /// [`Plan::new`] with the adversarial identity mode at `adversarial` (0 to 1).
    pub fn with_adversarial(seed: u64, sites: usize, patients: usize, dup_fraction: f64, adversarial: f64) -> Plan {
        let mut rng = seed_for(seed, 0);
        let mut adv = Adversary { rng: seed_for(seed, 7), rate: adversarial };
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut humans = Vec::with_capacity(patients);
        let mut per_site: Vec<Vec<PlannedReg>> = vec![Vec::new(); sites];
        let mut local_dups: Vec<(usize, usize)> = Vec::new();
        for idx in 0..patients {
            let female = rng.gen_bool(0.5);
            let given = if female { names::GIVEN_F } else { names::GIVEN_M }
                .choose(&mut rng)
                .copied()
                .unwrap_or("Alex")
                .to_string();
            let family = names::FAMILY.choose(&mut rng).copied().unwrap_or("Doe").to_string();
            let birthdate = NaiveDate::from_ymd_opt(1940, 1, 1)
                .and_then(|d| d.checked_add_days(chrono::Days::new(rng.gen_range(0..30_000))))
                .unwrap_or_default();
            // A near miss: another person with the previous one's name, sex and birthdate.
            let twin = humans.last().filter(|_| adv.roll()).map(|p: &Human| (p.gender == "F", p.given.clone(), p.family.clone(), p.birthdate));
            let (female, given, family, birthdate) = twin.unwrap_or((female, given, family, birthdate));
            let home = rng.gen_range(0..sites);
            let dup = sites >= 2 && rng.gen_bool(dup_fraction.clamp(0.0, 1.0));
            let has_nid = dup || rng.gen_bool(NID_COVERAGE);
            // Unique by construction: idx in the high digits, noise in the low ones.
            let mut national_id = has_nid
                .then(|| format!("NID{:09}", 100_000_000 + idx as u64 * 1000 + rng.gen_range(0..1000)));
            // A near miss: one digit apart from the previous person's number (its last three
            // digits, so it stays in the previous person's range and is nobody else's).
            if national_id.is_some() && adv.roll() {
                if let Some(prev) = humans.last().and_then(|p: &Human| p.national_id.clone()) {
                    let near = names::one_digit_apart(&mut adv.rng, &prev);
                    if !taken.contains(&near) {
                        national_id = Some(near);
                    }
                }
            }

            // A misprinted card: a number one digit off, nobody's, typed wherever the person goes.
            let misprint = national_id.as_ref().filter(|_| adv.roll()).map(|n| names::one_digit_apart(&mut adv.rng, n)).filter(|m| !taken.contains(m));

            let mut at = vec![home];
            if dup {
                let copies = if sites >= 3 && rng.gen_bool(THREE_SITE) { 2 } else { 1 };
                let mut others: Vec<usize> = (0..sites).filter(|&s| s != home).collect();
                others.shuffle(&mut rng);
                at.extend(others.into_iter().take(copies));
            }
            for (i, &site) in at.iter().enumerate() {
                let (mut nid, mut nid_canonical, mut correction) = (NidMode::None, None, None);
                if let Some(n) = &national_id {
                    let mut raw = names::noisy_national_id(&mut rng, n);
                    if adv.roll() {
                        raw = names::pasted_national_id(&mut adv.rng, n);
                    }
                    nid_canonical = Some(n.clone());
                    if let Some(m) = &misprint {
                        if adv.rng.gen_bool(MISPRINT_CORRECTED) {
                            let kind = [CorrectionKind::Update, CorrectionKind::VoidAndAdd, CorrectionKind::DeleteAndAdd][adv.rng.gen_range(0..3)];
                            correction = Some(Correction { kind, raw: raw.clone(), canonical: n.clone() });
                        }
                        raw = names::noisy_national_id(&mut adv.rng, m);
                        nid_canonical = Some(m.clone());
                    }
                    nid = if i > 0 && rng.gen_bool(LATE_NID) { NidMode::Late(raw) } else { NidMode::AtRegistration(raw) };
                }
                let date_fix = adv.roll().then(|| {
                    let day = NaiveDate::from_ymd_opt(1965, 1, 1).and_then(|d| d.checked_add_days(chrono::Days::new(adv.rng.gen_range(0..21_500))));
                    let to = day.and_then(|d| d.and_hms_opt(adv.rng.gen_range(7..18), adv.rng.gen_range(0..60), 0)).unwrap_or_default();
                    DateFix { to, undone: adv.rng.gen_bool(DATE_FIX_UNDONE) }
                });
                let kind = if i == 0 { RegKind::Primary } else { RegKind::CrossSite };
                per_site[site].push(PlannedReg { human: idx, kind, nid, nid_canonical, correction, date_fix });
            }
            if rng.gen_bool(LOCAL_DUP) {
                local_dups.push((home, idx));
            }
            taken.extend(national_id.clone());
            taken.extend(misprint.clone());
            humans.push(Human {
                idx,
                national_id,
                gender: if female { "F" } else { "M" },
                given,
                family,
                birthdate,
                misprint,
            });
        }
        // A local duplicate is registered again a little after the first registration.
        for (site, human) in local_dups {
            let list = &mut per_site[site];
            let Some(first) = list.iter().position(|r| r.human == human) else { continue };
            let at = (first + 1 + rng.gen_range(0..8)).min(list.len());
            list.insert(at, PlannedReg { human, kind: RegKind::LocalDup, nid: NidMode::None, nid_canonical: None, correction: None, date_fix: None });
        }
        Plan { humans, per_site }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let a = Plan::new(42, 3, 500, 0.2);
        let b = Plan::new(42, 3, 500, 0.2);
        let key = |p: &Plan| {
            p.per_site
                .iter()
                .map(|regs| regs.iter().map(|r| (r.human, format!("{:?}{:?}", r.kind, r.nid))).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&Plan::new(43, 3, 500, 0.2)));
    }

    #[test]
    fn the_adversarial_mode_makes_near_misses_and_pasted_ids_and_changes_nothing_else() {
        let plain = Plan::new(5, 3, 1000, 0.2);
        assert_eq!(
            plain.per_site.iter().flatten().map(|r| format!("{}{:?}{:?}", r.human, r.kind, r.nid)).collect::<Vec<_>>(),
            Plan::with_adversarial(5, 3, 1000, 0.2, 0.0).per_site.iter().flatten().map(|r| format!("{}{:?}{:?}", r.human, r.kind, r.nid)).collect::<Vec<_>>(),
            "rate 0 is the plain plan"
        );
        let p = Plan::with_adversarial(5, 3, 1000, 0.2, 0.3);
        // Numbers stay unique: every human is one identity.
        let ids: Vec<&String> = p.humans.iter().filter_map(|h| h.national_id.as_ref()).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let one_apart = p.humans.windows(2).filter(|w| match (&w[0].national_id, &w[1].national_id) {
            (Some(a), Some(b)) => a.len() == b.len() && a.chars().zip(b.chars()).filter(|(x, y)| x != y).count() == 1,
            _ => false,
        });
        assert!(one_apart.count() > 30);
        let twins = p.humans.windows(2).filter(|w| (&w[0].given, &w[0].family, w[0].birthdate, w[0].gender) == (&w[1].given, &w[1].family, w[1].birthdate, w[1].gender)).count();
        assert!(twins > 100, "{twins}");
        let pasted = p.per_site.iter().flatten().filter(|r| matches!(&r.nid, NidMode::AtRegistration(s) | NidMode::Late(s) if !s.is_ascii())).count();
        assert!(pasted > 50, "{pasted}");
        // Misprinted cards: nobody's number, typed at the person's sites, corrected at most.
        let misprints: Vec<&Human> = p.humans.iter().filter(|h| h.misprint.is_some()).collect();
        assert!(misprints.len() > 50, "{}", misprints.len());
        for h in &misprints {
            assert!(!unique.contains(&h.misprint.as_ref().unwrap()), "a misprint is nobody's number");
        }
        let regs: Vec<&PlannedReg> = p.per_site.iter().flatten().filter(|r| p.humans[r.human].misprint.is_some() && r.nid != NidMode::None).collect();
        assert!(regs.iter().all(|r| r.nid_canonical == p.humans[r.human].misprint));
        let corrected: Vec<&Correction> = regs.iter().filter_map(|r| r.correction.as_ref()).collect();
        assert!(corrected.len() > regs.len() / 2, "{} of {}", corrected.len(), regs.len());
        for kind in [CorrectionKind::Update, CorrectionKind::VoidAndAdd, CorrectionKind::DeleteAndAdd] {
            assert!(corrected.iter().filter(|c| c.kind == kind).count() > 5, "{kind:?}");
        }
        let fixes: Vec<&DateFix> = p.per_site.iter().flatten().filter_map(|r| r.date_fix.as_ref()).collect();
        assert!(fixes.iter().any(|f| f.to.and_utc().timestamp() < 0), "some registration dates before 1970");
        assert!(fixes.iter().filter(|f| f.undone).count() > 10);
    }

    #[test]
    fn duplicates_cover_the_requested_fraction_and_three_site_people() {
        let p = Plan::new(7, 3, 2000, 0.2);
        let mut sites_per_human = vec![std::collections::HashSet::new(); 2000];
        for (s, regs) in p.per_site.iter().enumerate() {
            for r in regs {
                sites_per_human[r.human].insert(s);
            }
        }
        let dups = sites_per_human.iter().filter(|s| s.len() >= 2).count();
        let three = sites_per_human.iter().filter(|s| s.len() == 3).count();
        assert!((300..500).contains(&dups), "{dups}");
        assert!(three > 30, "{three}");
        let late = p.per_site.iter().flatten().filter(|r| matches!(r.nid, NidMode::Late(_))).count();
        assert!(late > 50, "{late}");
        let local = p.per_site.iter().flatten().filter(|r| r.kind == RegKind::LocalDup).count();
        assert!(local > 40, "{local}");
        let ids: std::collections::HashSet<_> = p.humans.iter().filter_map(|h| h.national_id.clone()).collect();
        assert_eq!(ids.len(), p.humans.iter().filter(|h| h.national_id.is_some()).count());
    }
}
