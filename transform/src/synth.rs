//! A synthetic multi-site input for the transform's tests and benchmark (no database needed):
//! people with a person row, a National ID and obs; every `dup_every`-th person is also
//! registered at the next site with the same National ID, formatted differently; each site
//! ends with a heartbeat one minute after its last event.

use std::collections::BTreeMap;

use omrs_core::envelope::{ChangeEvent, Op, Row, Source};
use serde_json::json;

/// The National ID identifier type of the default config.
pub const NATIONAL_ID: &str = "c5b2e8a4-1f7d-4e5b-9a61-6f1e0a1d2b3c";

fn obj(v: serde_json::Value) -> Row {
    v.as_object().cloned().unwrap_or_default()
}

/// Site name → its events in order.
pub fn input(sites: usize, people: usize, obs_per_person: usize, dup_every: usize) -> BTreeMap<String, Vec<ChangeEvent>> {
    let names: Vec<String> = (0..sites).map(|i| format!("site-{}", (b'a' + (i % 26) as u8) as char)).collect();
    let mut out: BTreeMap<String, Vec<ChangeEvent>> = names.iter().map(|s| (s.clone(), Vec::new())).collect();
    let base = 1_700_000_000_000i64;
    let mut push = |site: &str, table: &str, id: u64, uuid: String, after: Row, refs: Row, ts: i64| {
        let evs = out.entry(site.to_string()).or_default();
        let mut key = Row::new();
        key.insert(format!("{table}_id"), json!(id));
        evs.push(ChangeEvent {
            op: Op::Create,
            site: site.into(),
            table: Some(table.into()),
            key: Some(key),
            uuid: Some(uuid),
            before: None,
            after: Some(after),
            refs,
            source: Source { server_id: 1, gtid: None, file: "binlog.000001".into(), pos: evs.len() as u64 + 1, row: 0, ts_ms: ts, snapshot: false },
            ts_ms: ts,
            oversize: None,
            schema: None,
        });
    };
    for h in 0..people {
        let home = h % sites;
        let mut at = vec![home];
        if sites > 1 && dup_every > 0 && h % dup_every == 0 {
            at.push((h + 1) % sites);
        }
        for (k, &s) in at.iter().enumerate() {
            let site = &names[s];
            let person = format!("p-{site}-{h}");
            let ts = base + (h as i64) * 100 + (k as i64) * 7_000 + (s as i64 % 3) * 1_000;
            let created = format!("20{:02}-01-01 00:00:{:02}", 10 + (h * 7 + k * 3) % 13, h % 60);
            push(site, "person", h as u64, person.clone(), obj(json!({"date_created": created, "voided": 0})), Row::new(), ts);
            let nid = if k == 0 { format!("NID{h:09}") } else { format!("nid-{h:09}") };
            push(site, "patient_identifier", h as u64, format!("i-{site}-{h}"), obj(json!({"identifier": nid, "voided": 0})), obj(json!({"patient_id": person, "identifier_type": NATIONAL_ID})), ts + 1);
            for o in 0..obs_per_person {
                let id = (h * obs_per_person + o) as u64;
                push(
                    site,
                    "obs",
                    id,
                    format!("o-{site}-{id}"),
                    obj(json!({"obs_id": id, "concept_id": 5089, "value_numeric": 60.5 + o as f64, "voided": 0, "obs_datetime": "2024-01-08 09:00:00"})),
                    obj(json!({"person_id": person, "concept_id": "5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "encounter_id": format!("e-{site}-{h}")})),
                    ts + 2 + o as i64,
                );
            }
        }
    }
    for site in &names {
        let evs = out.entry(site.clone()).or_default();
        let last = evs.last().map(|e| e.source.ts_ms).unwrap_or(base) + 60_000;
        let hb = ChangeEvent::heartbeat(site.clone(), Source { server_id: 1, gtid: None, file: "binlog.000001".into(), pos: evs.len() as u64 + 1, row: 0, ts_ms: last, snapshot: false }, last);
        evs.push(hb);
    }
    out
}
