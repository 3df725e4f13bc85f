//! The synthetic omrs.hq.changes workload of the sink benchmarks: an obs-heavy OpenMRS mix in
//! uuid space that references HQ's metadata, and how to pre-fill a topic with it.
#![allow(dead_code)]

use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::hq::HqEvent;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Map, Value as J};

pub struct Meta {
    pub user: String,
    pub location: String,
    pub concept: Vec<String>,
    pub enc_type: String,
    pub visit_type: String,
}

pub fn obj(v: J) -> Map<String, J> {
    match v {
        J::Object(m) => m,
        _ => Map::new(),
    }
}

pub fn change(site: &str, table: &str, uuid: &str, mut after: J, refs: J, seq: &mut u64, ts: i64) -> HqEvent {
    *seq += 1;
    if table != "patient" {
        after["uuid"] = J::String(uuid.to_string());
    }
    HqEvent::Change {
        late: false,
        person: None,
        origin_refs: Map::new(),
        event: ChangeEvent {
            op: Op::Create,
            site: site.into(),
            table: Some(table.into()),
            key: Some(obj(json!({ format!("{table}_id"): after.get(format!("{table}_id")).cloned().unwrap_or(J::Null) }))),
            uuid: Some(uuid.into()),
            before: None,
            after: Some(obj(after)),
            refs: obj(refs),
            source: Source { server_id: 11, gtid: None, file: "binlog.000001".into(), pos: *seq, row: 0, ts_ms: ts, snapshot: false },
            ts_ms: ts,
            oversize: None,
            schema: None,
        },
    }
}

/// One patient's registration, visit, encounters and obs: 30 rows.
pub fn patient(site: &str, m: &Meta, i: u64, seq: &mut u64, ts: i64) -> Vec<HqEvent> {
    let u = |_: &str| uuid::Uuid::new_v4().to_string();
    let person = u("");
    let now = "2026-11-26 10:00:00";
    let mut out: Vec<HqEvent> = vec![
        change(site, "person", &person, json!({"person_id": i, "gender": "F", "birthdate": "1990-01-01", "dead": 0, "creator": 1, "date_created": now, "voided": 0, "uuid": person}), json!({"creator": m.user}), seq, ts),
        change(site, "person_name", &u("n"), json!({"person_name_id": i, "preferred": 1, "person_id": i, "given_name": "Amina", "family_name": format!("Bench{i}"), "creator": 1, "date_created": now, "voided": 0}), json!({"person_id": person, "creator": m.user}), seq, ts),
        change(site, "patient", &person, json!({"patient_id": i, "creator": 1, "date_created": now, "voided": 0, "allergy_status": "Unknown"}), json!({"patient_id": person, "creator": m.user}), seq, ts),
    ];
    let visit = u("v");
    out.push(change(site, "visit", &visit, json!({"visit_id": i, "patient_id": i, "visit_type_id": 1, "date_started": now, "location_id": 1, "creator": 1, "date_created": now, "voided": 0}), json!({"patient_id": person, "visit_type_id": m.visit_type, "location_id": m.location, "creator": m.user}), seq, ts));
    for e in 0..2 {
        let enc = u("e");
        out.push(change(site, "encounter", &enc, json!({"encounter_id": i * 2 + e, "encounter_type": 1, "patient_id": i, "location_id": 1, "encounter_datetime": now, "creator": 1, "date_created": now, "voided": 0, "visit_id": i}), json!({"encounter_type": m.enc_type, "patient_id": person, "location_id": m.location, "creator": m.user, "visit_id": visit}), seq, ts));
        for o in 0..12 {
            let concept = &m.concept[(o as usize) % m.concept.len()];
            out.push(change(site, "obs", &u("o"), json!({"obs_id": i * 100 + o, "person_id": i, "concept_id": 1, "encounter_id": 1, "obs_datetime": now, "location_id": 1, "value_numeric": 36.5 + o as f64, "creator": 1, "date_created": now, "voided": 0}), json!({"person_id": person, "concept_id": concept, "encounter_id": enc, "location_id": m.location, "creator": m.user}), seq, ts));
        }
    }
    out
}


/// The HQ metadata the workload references.
pub async fn meta(c: &mut Conn) -> Meta {
    let one = |sql: &'static str| sql;
    let user: String = c.query_first(one("SELECT uuid FROM users ORDER BY user_id LIMIT 1")).await.unwrap().unwrap();
    let location: String = c.query_first(one("SELECT uuid FROM location ORDER BY location_id LIMIT 1")).await.unwrap().unwrap();
    let enc_type: String = c.query_first(one("SELECT uuid FROM encounter_type ORDER BY encounter_type_id LIMIT 1")).await.unwrap().unwrap();
    let visit_type: String = c.query_first(one("SELECT uuid FROM visit_type ORDER BY visit_type_id LIMIT 1")).await.unwrap().unwrap();
    let concept: Vec<String> = c.query(one("SELECT c.uuid FROM concept c JOIN concept_numeric n ON n.concept_id = c.concept_id ORDER BY c.concept_id LIMIT 12")).await.unwrap();
    Meta { user, location, concept, enc_type, visit_type }
}

#[allow(clippy::too_many_arguments)]
/// Produces `patients` patients' events from `site` to `topic`; returns the events sent.
/// The partition of `omrs.hq.changes` (`topic`) the transform gives `site`'s changes.
pub fn site_partition(producer: &FutureProducer, topic: &str, site: &str) -> i32 {
    let n = omrs_core::kafka::topic_partitions(producer.client(), topic, Duration::from_secs(10)).map(|p| p.len() as i32).unwrap_or(1);
    omrs_core::topics::hq_partition(site, n)
}

#[allow(clippy::too_many_arguments)] // the bench's knobs, named at each call
pub async fn prefill(producer: &FutureProducer, topic: &str, site: &str, meta: &Meta, patients: u64, first: u64, seq: &mut u64, ts: i64) -> u64 {
    // The site's partition, as the transform routes it: a site's changes are in order in one
    // partition (spread by key, children would arrive before their parents and wait).
    let partition = site_partition(producer, topic, site);
    let mut rows = 0;
    for i in 0..patients {
        for ev in patient(site, meta, first + i, seq, ts) {
            let payload = ev.to_json();
            loop {
                match producer.send_result(FutureRecord::to(topic).partition(partition).key(&ev.key()).payload(&payload)) {
                    Ok(_) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            rows += 1;
        }
    }
    rows
}
