//! The HQ sink plans batch n+1 while batch n is still being written (see "Pipelining" in
//! ARCHITECTURE.md). This drives the applier by hand on real MariaDB, so that the one case its
//! marks exist for happens every time instead of by timing: batch 2 deletes an encounter and is
//! written but not committed; batch 3, planned meanwhile on the read connection (which still
//! sees the encounter), brings an obs of that encounter. The obs must wait in the pending store
//! for the encounter, as it would have had the batches run one after the other, and must not be
//! written against the deleted encounter's old id.

mod common;

use std::collections::HashMap;

use common::*;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use omrs_core::envelope::{ChangeEvent, Op, Source};
use omrs_core::hq::HqEvent;
use omrs_sinks::hq_mysql::apply::{Applier, Outcome, PlannedBatch, Record, Writer};
use serde_json::{json, Map, Value as J};

fn obj(v: J) -> Map<String, J> {
    match v {
        J::Object(m) => m,
        _ => Map::new(),
    }
}

fn record(offset: i64, op: Op, table: &str, uuid: &str, row: J, refs: J) -> Record {
    let key = obj(json!({ format!("{table}_id"): row.get(format!("{table}_id")).cloned().unwrap_or(J::Null) }));
    let (before, after) = if op == Op::Delete { (Some(obj(row)), None) } else { (None, Some(obj(row))) };
    let ev = HqEvent::Change {
        late: false,
        person: None,
        origin_refs: Map::new(),
        event: ChangeEvent {
            op,
            site: "site-a".into(),
            table: Some(table.into()),
            key: Some(key),
            uuid: Some(uuid.into()),
            before,
            after,
            refs: obj(refs),
            source: Source { server_id: 11, gtid: None, file: "binlog.000001".into(), pos: 100 + offset as u64, row: 0, ts_ms: 1_790_000_000_000 + offset, snapshot: false },
            ts_ms: 1_790_000_000_000 + offset,
            oversize: None,
        },
    };
    Record::decode(0, offset, ev.to_json())
}

async fn session(db: &str) -> Conn {
    let mut c = admin(3310, Some(db)).await;
    c.query_drop("SET time_zone = '+00:00', SESSION sql_mode = 'STRICT_TRANS_TABLES,NO_AUTO_VALUE_ON_ZERO'; SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await
        .unwrap();
    c
}

/// Writes and commits a planned batch, as the sink's write task does, and tells the applier.
async fn write_and_commit(applier: &mut Applier, writer: &Writer, conn: &mut Conn, planned: PlannedBatch) -> Outcome {
    let generation = planned.generation;
    conn.query_drop("START TRANSACTION").await.unwrap();
    let (out, failed) = planned.write(writer, conn).await.expect("write");
    conn.query_drop("COMMIT").await.unwrap();
    applier.forget(&failed);
    applier.written(generation);
    assert!(out.dead.is_empty(), "{:?}", out.dead.iter().map(|d| &d.reason).collect::<Vec<_>>());
    out
}

async fn count(c: &mut Conn, sql: &str) -> i64 {
    c.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_planned_before_a_delete_commits_does_not_use_the_deleted_row() {
    let db = unique("openmrs_hq_pipe");
    let mut init = admin(3310, None).await;
    omrs_sinks::hq_mysql::schema::init(&mut init, &db, &dump(), true).await.expect("HQ --init");
    let mut write = session(&db).await;
    let mut read = session(&db).await;
    let mut applier = Applier::load(&mut write, &db, HashMap::new(), 600_000).await.expect("applier");
    let writer: Writer = applier.writer();

    let user: String = write.query_first("SELECT uuid FROM users ORDER BY user_id LIMIT 1").await.unwrap().unwrap();
    let location: String = write.query_first("SELECT uuid FROM location ORDER BY location_id LIMIT 1").await.unwrap().unwrap();
    let etype: String = write.query_first("SELECT uuid FROM encounter_type ORDER BY encounter_type_id LIMIT 1").await.unwrap().unwrap();
    let concept: String = write.query_first("SELECT uuid FROM concept ORDER BY concept_id LIMIT 1").await.unwrap().unwrap();
    let (p, e, o) = ("44444444-0000-4000-8000-000000000001", "44444444-0000-4000-8000-000000000002", "44444444-0000-4000-8000-000000000003");
    let now = "2026-11-27 10:00:00";
    let encounter = json!({"encounter_id": 7, "encounter_type": 1, "patient_id": 900, "location_id": 1, "encounter_datetime": now, "creator": 1, "date_created": now, "voided": 0, "uuid": e});
    let encounter_refs = json!({"encounter_type": etype, "patient_id": p, "location_id": location, "creator": user});

    // Batch 1, committed: a patient and an encounter.
    let batch1 = vec![
        record(1, Op::Create, "person", p, json!({"person_id": 900, "gender": "F", "dead": 0, "creator": 1, "date_created": now, "voided": 0, "uuid": p}), json!({"creator": user})),
        record(2, Op::Create, "patient", p, json!({"patient_id": 900, "creator": 1, "date_created": now, "voided": 0, "allergy_status": "Unknown"}), json!({"patient_id": p, "creator": user})),
        record(3, Op::Create, "encounter", e, encounter.clone(), encounter_refs.clone()),
    ];
    assert!(!applier.needs_sync(&batch1));
    let planned = applier.plan_batch(&mut read, batch1).await.expect("plan batch 1");
    write_and_commit(&mut applier, &writer, &mut write, planned).await;
    assert_eq!(count(&mut read, &format!("SELECT COUNT(*) FROM encounter WHERE uuid = '{e}'")).await, 1);

    // Batch 2 deletes the encounter: written, not committed yet.
    let batch2 = vec![record(4, Op::Delete, "encounter", e, encounter, encounter_refs)];
    let planned = applier.plan_batch(&mut read, batch2).await.expect("plan batch 2");
    let generation2 = planned.generation;
    write.query_drop("START TRANSACTION").await.unwrap();
    let (out, failed) = planned.write(&writer, &mut write).await.expect("write batch 2");
    assert!(out.dead.is_empty() && failed.is_empty());
    assert_eq!(count(&mut read, &format!("SELECT COUNT(*) FROM encounter WHERE uuid = '{e}'")).await, 1, "the read connection still sees the encounter");

    // Batch 3, planned now, brings an obs of the deleted encounter: it waits for the encounter.
    let batch3 = vec![record(
        5,
        Op::Create,
        "obs",
        o,
        json!({"obs_id": 70, "person_id": 900, "concept_id": 1, "encounter_id": 7, "obs_datetime": now, "location_id": 1, "value_numeric": 37.5, "creator": 1, "date_created": now, "voided": 0, "uuid": o}),
        json!({"person_id": p, "concept_id": concept, "encounter_id": e, "location_id": location, "creator": user}),
    )];
    let planned = applier.plan_batch(&mut read, batch3).await.expect("plan batch 3");
    assert_eq!(planned.out.parked, 1, "the obs must wait for its encounter, which batch 2 deletes");
    assert_eq!(applier.pending_len(), 1);

    write.query_drop("COMMIT").await.unwrap();
    applier.forget(&failed);
    applier.written(generation2);
    write_and_commit(&mut applier, &writer, &mut write, planned).await;

    assert_eq!(count(&mut read, &format!("SELECT COUNT(*) FROM encounter WHERE uuid = '{e}'")).await, 0);
    assert_eq!(count(&mut read, &format!("SELECT COUNT(*) FROM obs WHERE uuid = '{o}'")).await, 0, "no obs written against the deleted encounter");
    assert_eq!(
        count(&mut read, &format!("SELECT COUNT(*) FROM omrs_sync_pending WHERE tbl = 'obs' AND row_key = '{o}' AND waits_for_table = 'encounter' AND waits_for_key = '{e}'")).await,
        1,
        "the obs waits in the pending store for its encounter"
    );
    assert_eq!(count(&mut read, &format!("SELECT deleted FROM omrs_sync_row_version WHERE tbl = 'encounter' AND row_key = '{e}'")).await, 1);

    drop(read);
    drop(write);
    let _ = init.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await;
}
