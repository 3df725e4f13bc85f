//! What a clinic's own patient merge moved, read from its `person_merge_log.merged_data`
//! (issue #23: a split at HQ undoes a clinic's merge too).
//!
//! OpenMRS's `PatientService.mergePatients` moves the loser's visits and encounters (their obs
//! follow the encounter) and its independent obs to the winner, copies its identifiers, names,
//! addresses and attributes onto the winner, and records the uuids of all of these in a
//! `PersonMergeLogData`, serialised by the default serializer (XStream) into `merged_data`:
//!
//! ```xml
//! <org.openmrs.person.PersonMergeLogData>
//!   <movedEncounters>
//!     <string>5a6e…</string>
//!   </movedEncounters>
//!   …
//! </org.openmrs.person.PersonMergeLogData>
//! ```
//!
//! A row named there belongs to the loser, whichever person the clinic now says: while the
//! merge stands the loser's survivor is the winner's, and a split gives the row back to the
//! loser. An obs belongs to the owner of its encounter when the log names the encounter.

use hashbrown::HashMap;

/// The lists of `PersonMergeLogData` whose rows leave with the loser: (element, table).
pub const MOVED_LISTS: &[(&str, &str)] = &[
    ("movedVisits", "visit"),
    ("movedEncounters", "encounter"),
    ("movedIndependentObservations", "obs"),
    ("createdIdentifiers", "patient_identifier"),
    ("createdNames", "person_name"),
    ("createdAddresses", "person_address"),
    ("createdAttributes", "person_attribute"),
    ("createdPrograms", "patient_program"),
    ("createdOrders", "orders"),
];

/// The (table, uuid) of each row `merged_data` names as moved or created for the loser, in
/// document order. Anything else (a JSON log, HQ's own, a list this version does not know) names
/// nothing.
pub fn moved_rows(merged_data: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (element, table) in MOVED_LISTS {
        let (open, close) = (format!("<{element}"), format!("</{element}>"));
        let mut rest = merged_data;
        while let Some(at) = rest.find(&open) {
            let after = &rest[at + open.len()..];
            // `<movedEncounters>` or `<movedEncounters class="…">`, not `<movedEncountersX>`.
            let Some(gt) = after.find('>') else { break };
            if !matches!(after.as_bytes().first(), Some(b'>' | b' ' | b'/')) {
                rest = after;
                continue;
            }
            if after[..gt].ends_with('/') {
                rest = &after[gt + 1..];
                continue; // an empty list
            }
            let body = &after[gt + 1..];
            let end = body.find(&close).unwrap_or(body.len());
            let mut items = &body[..end];
            while let Some(s) = items.find("<string>") {
                let v = &items[s + "<string>".len()..];
                let Some(e) = v.find("</string>") else { break };
                let uuid = v[..e].trim();
                if !uuid.is_empty() {
                    out.push((*table, uuid.to_string()));
                }
                items = &v[e..];
            }
            rest = &body[end..];
        }
    }
    out
}

/// Every row the clinics' merge logs gave a loser: row uuid → (table, loser person uuid).
/// Uuids are unique across OpenMRS tables; the table guards against a stray match. (foldhash,
/// not SipHash: the HQ sink asks it of every row.)
#[derive(Debug, Default, Clone)]
pub struct SiteMoves {
    owner: HashMap<String, (&'static str, String)>,
}

impl SiteMoves {
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// Adds what one merge log names; returns the rows it named. A row already owned keeps its
    /// first owner (a record merged away twice at its clinic belongs to the first loser).
    pub fn add(&mut self, loser: &str, merged_data: &str) -> Vec<(&'static str, String)> {
        let rows = moved_rows(merged_data);
        for (table, uuid) in &rows {
            self.owner.entry(uuid.clone()).or_insert_with(|| (*table, loser.to_string()));
        }
        rows
    }

    /// The person a row of `table` belongs to by its clinic's merge logs: its own entry, or
    /// for an obs its encounter's.
    pub fn owner(&self, table: &str, uuid: Option<&str>, encounter_uuid: Option<&str>) -> Option<&str> {
        let own = uuid.and_then(|u| self.owner.get(u)).filter(|(t, _)| *t == table);
        let by_encounter = || (table == "obs").then(|| encounter_uuid.and_then(|e| self.owner.get(e)).filter(|(t, _)| *t == "encounter")).flatten();
        own.or_else(by_encounter).map(|(_, l)| l.as_str())
    }

    /// The person column of `table` that a clinic's merge moved (none for tables it does not).
    pub fn column(table: &str) -> Option<&'static str> {
        MOVED_LISTS.iter().any(|(_, t)| *t == table).then(|| crate::openmrs::MOVES.iter().find(|(t, _, _)| *t == table).map(|(_, c, _)| *c)).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "<org.openmrs.person.PersonMergeLogData>
  <movedVisits>
    <string>v-1</string>
  </movedVisits>
  <movedEncounters>
    <string>e-1</string>
    <string>e-2</string>
  </movedEncounters>
  <createdIdentifiers/>
  <movedIndependentObservations class=\"linked-list\">
    <string>o-9</string>
  </movedIndependentObservations>
  <priorGender>M</priorGender>
</org.openmrs.person.PersonMergeLogData>";

    #[test]
    fn reads_the_lists_openmrs_serialises() {
        assert_eq!(
            moved_rows(LOG),
            vec![("visit", "v-1".to_string()), ("encounter", "e-1".into()), ("encounter", "e-2".into()), ("obs", "o-9".into())]
        );
        assert!(moved_rows(r#"{"loser":"x","merged_by":"omrs-stream"}"#).is_empty());
        assert!(moved_rows("<movedEncountersX><string>z</string></movedEncountersX>").is_empty());
    }

    #[test]
    fn an_obs_follows_its_encounter_and_the_first_loser_keeps_a_row() {
        let mut m = SiteMoves::default();
        m.add("L", LOG);
        m.add("L2", "<x><movedEncounters><string>e-1</string></movedEncounters></x>");
        assert_eq!(m.owner("encounter", Some("e-1"), None), Some("L"));
        assert_eq!(m.owner("obs", Some("o-new"), Some("e-2")), Some("L"));
        assert_eq!(m.owner("obs", Some("o-9"), None), Some("L"));
        assert_eq!(m.owner("obs", Some("o-x"), Some("e-9")), None);
        assert_eq!(m.owner("visit", Some("e-1"), None), None, "a uuid of another table");
        assert_eq!(SiteMoves::column("obs"), Some("person_id"));
        assert_eq!(SiteMoves::column("relationship"), None);
    }
}
