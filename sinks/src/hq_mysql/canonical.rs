//! Changes point at merge survivors when HQ plans them, as the transform points them (issue
//! #22, hole D).
//!
//! The transform rewrites each reference of a change to the survivor of the merges it knows
//! of, and keeps the value it replaced in `origin_refs`. A change parked in `omrs_sync_pending`
//! keeps its references as they were when it arrived, and a merge applied while it waits moves
//! only the rows that are at HQ. So HQ rewrites a change's references the same way when it
//! plans it: a woken row lands on the survivor, as the lake maps it, not on the voided loser.
//! The row keeps its own key (keys are taken from `origin_refs` first), and a moved name,
//! address or identifier is not preferred (`Applier::force_merge_values`).

use omrs_core::envelope::{FlatRow, Row};
use serde_json::{Map, Value as J};

/// Points each reference of a change of `table` at the final survivor of the person it was
/// written for (its `origin_refs` value, else the reference itself; `survivor_of` gives the
/// final survivor of a merge loser), and records the row's own person in `origin_refs` while it
/// is on another one. A row whose own person survives on its own again (a split) goes back to
/// it. A `person_merge_log` row keeps its own winner and loser. Returns true when a reference
/// changed.
pub(super) fn canonicalise(table: Option<&str>, refs: &mut FlatRow, origin_refs: &mut Map<String, J>, survivor_of: impl Fn(&str) -> Option<String>) -> bool {
    if table == Some("person_merge_log") {
        return false;
    }
    let moved: Vec<(String, String, String)> = refs
        .iter()
        .filter_map(|(col, v)| {
            let cur = v.as_str()?;
            let own = origin_refs.get(col).and_then(J::as_str).unwrap_or(cur);
            let target = survivor_of(own).filter(|s| s != own).unwrap_or_else(|| own.to_string());
            (target != cur).then(|| (col.to_string(), own.to_string(), target))
        })
        .collect();
    if moved.is_empty() {
        return false;
    }
    // A flat row image is read-only: the rare change that moves is rebuilt, in its order.
    let mut row: Row = refs.iter().map(|(c, v)| (c.to_string(), v.clone())).collect();
    for (col, own, target) in moved {
        tracing::debug!(table = table.unwrap_or(""), column = %col, own = %own, survivor = %target, "reference to a merged person points at the survivor");
        if own == target {
            origin_refs.remove(&col);
        } else {
            origin_refs.entry(col.clone()).or_insert(J::String(own));
        }
        row.insert(col, J::String(target));
    }
    *refs = FlatRow::from(&row);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: J) -> FlatRow {
        serde_json::from_value(v).expect("a row image")
    }

    fn survivor(u: &str) -> Option<String> {
        match u {
            "L" | "L2" | "L0" => Some("W".into()),
            // A chain already followed to its end by `survivor_of`; a survivor maps to none.
            _ => None,
        }
    }

    #[test]
    fn references_to_losers_point_at_the_survivor_and_keep_their_origin() {
        let mut refs = flat(json!({"person_id": "L", "encounter_id": "E", "creator": "U", "concept_id": null}));
        let mut origin = Map::new();
        assert!(canonicalise(Some("obs"), &mut refs, &mut origin, survivor));
        assert_eq!(refs.get("person_id"), Some(&json!("W")));
        assert_eq!(refs.get("encounter_id"), Some(&json!("E")));
        assert_eq!(refs.get("concept_id"), Some(&J::Null));
        assert_eq!(refs.iter().map(|(c, _)| c).collect::<Vec<_>>(), vec!["person_id", "encounter_id", "creator", "concept_id"], "the order is kept");
        assert_eq!(origin.get("person_id"), Some(&json!("L")));
        assert_eq!(origin.len(), 1);
    }

    #[test]
    fn an_origin_already_recorded_is_kept_and_canonical_refs_are_left_alone() {
        // The transform pointed the row at L2 (then a survivor) and kept its origin L0.
        let mut refs = flat(json!({"patient_id": "L2"}));
        let mut origin = Map::new();
        origin.insert("patient_id".into(), json!("L0"));
        assert!(canonicalise(Some("patient_identifier"), &mut refs, &mut origin, survivor));
        assert_eq!(refs.get("patient_id"), Some(&json!("W")));
        assert_eq!(origin.get("patient_id"), Some(&json!("L0")), "the row's own origin stays");
        // Already canonical: nothing changes.
        assert!(!canonicalise(Some("patient_identifier"), &mut refs, &mut origin, survivor));
        // Split off again: the row goes back to its own person.
        assert!(canonicalise(Some("patient_identifier"), &mut refs, &mut origin, |_| None));
        assert_eq!((refs.get("patient_id"), origin.get("patient_id")), (Some(&json!("L0")), None));
        // A merge log keeps its loser.
        let mut log = flat(json!({"winner_person_id": "W", "loser_person_id": "L"}));
        let mut origin = Map::new();
        assert!(!canonicalise(Some("person_merge_log"), &mut log, &mut origin, survivor));
        assert_eq!(log.get("loser_person_id"), Some(&json!("L")));
        assert!(origin.is_empty());
    }
}
