//! Golden change events: each example in tests/golden parses, validates, and serialises back to
//! exactly the same bytes; malformed ones are rejected with a reason.

use std::path::PathBuf;

use omrs_core::envelope::{ChangeEvent, Op};

fn golden(name: &str) -> String {
    let p = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("tests/golden").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
}

#[test]
fn every_golden_example_round_trips_byte_for_byte() {
    let cases = [
        ("insert_encounter.json", Op::Create),
        ("update_person_name.json", Op::Update),
        ("delete_obs.json", Op::Delete),
        ("snapshot_patient.json", Op::Read),
        ("heartbeat.json", Op::Heartbeat),
    ];
    for (file, op) in cases {
        let text = golden(file);
        let ev = ChangeEvent::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(ev.op, op, "{file}");
        let back = String::from_utf8(ev.to_json()).unwrap();
        assert_eq!(back, text, "{file} did not round-trip");
        let again = ChangeEvent::from_json(back.as_bytes()).unwrap();
        assert_eq!(again, ev, "{file}");
    }
}

#[test]
fn golden_fields_carry_the_contract() {
    let ev = ChangeEvent::from_json(golden("insert_encounter.json").as_bytes()).unwrap();
    assert_eq!(ev.site, "site-a");
    assert_eq!(ev.table.as_deref(), Some("encounter"));
    assert_eq!(ev.key.as_ref().unwrap()["encounter_id"], 123);
    assert_eq!(ev.refs["patient_id"], "b52ec6f9-0e26-424c-a4a1-c64f9d571eb3");
    assert!(ev.refs["form_id"].is_null());
    assert_eq!(ev.source.gtid.as_deref(), Some("0-11-1042"));
    assert_eq!(ev.event_time_ms(), 1763630102000);
    assert!(ev.before.is_none());

    let snap = ChangeEvent::from_json(golden("snapshot_patient.json").as_bytes()).unwrap();
    assert!(snap.source.snapshot);
    assert_eq!(snap.source.row, 11);
}

#[test]
fn malformed_events_are_rejected_with_the_reason() {
    let insert = golden("insert_encounter.json");
    let cases: Vec<(String, &str)> = vec![
        (insert.replacen(r#""op":"c""#, r#""op":"x""#, 1), "unknown variant `x`"),
        (insert.replacen(r#""op":"c""#, r#""op":"d""#, 1), "needs `before` and no `after`"),
        (insert.replacen(r#""table":"encounter","#, "", 1), "`table` is missing"),
        (insert.replacen(r#""site":"site-a""#, r#""site":"""#, 1), "`site` is empty"),
        (insert.replacen(r#""snapshot":false"#, r#""snapshot":true"#, 1), "`source.snapshot`"),
        (insert.replacen(r#""ts_ms":1763630102117}"#, r#""ts_ms":1,"extra":1}"#, 1), "unknown field `extra`"),
        (insert.replacen(r#""source":{"server_id":11,"#, r#""source":{"#, 1), "missing field `server_id`"),
        ("not json".to_string(), "expected"),
    ];
    for (text, want) in cases {
        let err = ChangeEvent::from_json(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(want), "expected `{want}` in `{err}`");
        assert!(err.starts_with("invalid change event"), "{err}");
    }
}
