//! The output contract of `omrs.hq.changes`: golden JSON for each record type parses as an
//! `HqEvent` and serialises back to the same bytes. docs/ARCHITECTURE.md documents the fields.

use std::path::PathBuf;

use omrs_transform::engine::HqEvent;

#[test]
fn every_golden_output_record_round_trips() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("tests/contract");
    let mut kinds = Vec::new();
    for name in ["change.json", "change_late.json", "merge.json", "merge_site.json", "identity_review.json", "aggregate.json", "split.json", "schema.json"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap().trim().to_string();
        let ev: HqEvent = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(String::from_utf8(ev.to_json()).unwrap(), text, "{name} did not round-trip");
        if let HqEvent::Change { event, .. } = &ev {
            event.validate().unwrap();
        }
        kinds.push(match ev {
            HqEvent::Change { late, .. } => format!("change late={late}"),
            HqEvent::Merge { reason, .. } => format!("merge {reason}"),
            HqEvent::Split { records, .. } => format!("split {}", records.len()),
            HqEvent::IdentityReview { .. } => "identity_review".into(),
            HqEvent::Watermark { .. } => "watermark".into(),
            HqEvent::Aggregate { name, is_final, revision, .. } => format!("aggregate {name} final={is_final} revision={revision}"),
            HqEvent::Schema { schema, .. } => format!("schema {}", schema.table),
        });
    }
    assert_eq!(kinds, ["change late=false", "change late=true", "merge identifier", "merge site_merge", "identity_review", "aggregate hourly_encounters final=true revision=2", "split 1", "schema hivcare_enrollment"]);
}
