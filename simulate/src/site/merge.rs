//! A site's own patient merge, as OpenMRS's `PatientService.mergePatients` writes it: the
//! loser's visits, encounters and obs move to the winner, its OpenMRS ID is copied there, the
//! loser is voided, and `person_merge_log` records what moved (`merged_data`).

use super::{SiteGen, SiteMerge, Tx};
use crate::sql::{q, Insert};

impl SiteGen {
    /// `PatientService.mergePatients(winner, loser)`, as the site's OpenMRS does it.
    pub(super) fn merge(&mut self, tx: &mut Tx, w: usize, l: usize) {
        let user = self.meta.user_id;
        let (wid, lid) = (self.patients[w].person_id, self.patients[l].person_id);
        let reason = q(&format!("Merged with patient #{wid}"));
        let loser = self.patients[l].clone();
        let n_enc = loser.encounters.len() as u64;
        if n_enc > 0 {
            tx.update("encounter", &format!("UPDATE encounter SET patient_id = {wid}, changed_by = {user}, date_changed = NOW() WHERE patient_id = {lid}"), n_enc);
        }
        if !loser.visits.is_empty() {
            tx.update("visit", &format!("UPDATE visit SET patient_id = {wid}, changed_by = {user}, date_changed = NOW() WHERE patient_id = {lid}"), loser.visits.len() as u64);
        }
        if loser.obs_total > 0 {
            tx.update("obs", &format!("UPDATE obs SET person_id = {wid} WHERE person_id = {lid}"), loser.obs_total);
        }
        // The loser's identifiers are copied to the winner as non-preferred ones.
        let mut n_ident = 0;
        let mut created = Vec::new();
        if let Some(openmrs_id) = &loser.openmrs_id {
            let id = self.id("patient_identifier");
            let u = self.uuid();
            let location = *self.meta.locations.first().unwrap_or(&1);
            let mut ins = Insert::new(
                "patient_identifier",
                &["patient_identifier_id", "patient_id", "identifier", "identifier_type", "preferred", "location_id", "creator", "date_created", "voided", "uuid"],
            );
            ins.row(&[id.to_string(), wid.to_string(), q(openmrs_id), self.meta.openmrs_id_type.to_string(), "0".into(), location.to_string(), user.to_string(), "NOW()".into(), "0".into(), q(&u)]);
            tx.insert("patient_identifier", ins);
            created.push(u);
            n_ident += 1;
        }
        if loser.national_id_raw.is_some() {
            n_ident += 1;
        }
        let voided = |table: &str, col: &str| {
            format!("UPDATE {table} SET voided = 1, voided_by = {user}, date_voided = NOW(), void_reason = {reason} WHERE {col} = {lid} AND voided = 0")
        };
        tx.update("patient_identifier", &voided("patient_identifier", "patient_id"), n_ident.max(1));
        tx.update("person_name", &voided("person_name", "person_id"), 1);
        tx.update("person_address", &voided("person_address", "person_id"), 1);
        tx.update("patient", &voided("patient", "patient_id"), 1);
        tx.update("person", &voided("person", "person_id"), 1);
        let log_id = self.id("person_merge_log");
        let u = self.uuid();
        let encounters: Vec<String> = loser.encounters.iter().map(|e| e.uuid.clone()).collect();
        let data = merge_log_data(&loser.visits, &encounters, &created);
        let mut ins = Insert::new(
            "person_merge_log",
            &["person_merge_log_id", "winner_person_id", "loser_person_id", "creator", "date_created", "merged_data", "uuid", "voided"],
        );
        ins.row(&[log_id.to_string(), wid.to_string(), lid.to_string(), user.to_string(), "NOW()".into(), q(&data), q(&u), "0".into()]);
        tx.insert("person_merge_log", ins);

        // Move the loser's state to the winner.
        let moved = std::mem::take(&mut self.patients[l].encounters);
        let editable = std::mem::take(&mut self.patients[l].editable);
        self.patients[l].voided = true;
        self.patients[l].visits = Vec::new();
        self.patients[l].obs_total = 0;
        let ws = &mut self.patients[w];
        ws.encounters.extend(moved);
        ws.editable.extend(editable);
        ws.visits.extend(loser.visits.iter().cloned());
        ws.obs_total += loser.obs_total;
        self.live.retain(|&i| i != l);
        self.merges.push(SiteMerge { winner_uuid: self.patients[w].uuid.clone(), loser_uuid: loser.uuid, moved_visits: loser.visits, moved_encounters: encounters });
    }
}

/// `merged_data` as OpenMRS writes it: its `PersonMergeLogData` through the default (XStream)
/// serializer. Obs in the moved encounters follow them and are not listed.
fn merge_log_data(visits: &[String], encounters: &[String], identifiers: &[String]) -> String {
    let mut xml = String::from("<org.openmrs.person.PersonMergeLogData>\n");
    for (element, uuids) in [("movedVisits", visits), ("movedEncounters", encounters), ("createdIdentifiers", identifiers)] {
        if uuids.is_empty() {
            continue;
        }
        xml.push_str(&format!("  <{element}>\n"));
        for u in uuids {
            xml.push_str(&format!("    <string>{u}</string>\n"));
        }
        xml.push_str(&format!("  </{element}>\n"));
    }
    xml.push_str("</org.openmrs.person.PersonMergeLogData>");
    xml
}
