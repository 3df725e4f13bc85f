//! A Debezium row change → this project's change event: values by the table model's column
//! types ([`super::values`]), the key, the uuid, and every foreign key resolved to a uuid from
//! the ids the input has seen ([`super::ids`]).

use std::collections::HashSet;

use omrs_core::clock::now_ms;
use omrs_core::envelope::{ChangeEvent, Row, Source};
use omrs_core::model::{Model, TableModel};
use serde_json::{Map, Value as J};

use super::ids::Ids;
use super::record::DbzChange;

/// A change that cannot be sent yet: a foreign key names a row not seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miss {
    pub column: String,
    pub ref_table: String,
    pub id: i64,
}

/// Every table whose ids another row names (a foreign key's target, a shared key's owner).
pub fn targets(model: &Model) -> HashSet<String> {
    let mut out = HashSet::new();
    for t in model.tables.values() {
        out.extend(t.fks.iter().map(|f| f.ref_table.clone()));
        out.extend(t.shared_parent.iter().cloned());
    }
    out
}

/// True when rows of `table` are named by a uuid (their own, or a shared key's).
fn has_uuids(model: &Model, table: &str) -> bool {
    let mut table = table;
    for _ in 0..4 {
        let Some(t) = model.table(table) else { return false };
        if t.has_uuid {
            return true;
        }
        let Some(p) = t.shared_parent.as_deref() else { return false };
        table = p;
    }
    false
}

/// Learns the uuid of the row in `image` when its table is a target. `save`: the record is
/// sent (its id goes into the checkpoint topic with it).
pub fn learn(ids: &mut Ids, table: &TableModel, image: &Map<String, J>, save: bool) {
    if !table.has_uuid {
        return;
    }
    let id = table.int_pk().and_then(|pk| image.get(pk)).and_then(J::as_i64);
    if let (Some(id), Some(uuid)) = (id, image.get("uuid").and_then(J::as_str)) {
        ids.learn(&table.name, id, uuid, save);
    }
}

/// The envelope's image of a Debezium image: each column's value by its type, scrubbed
/// columns left out. A column the model does not have (yet) keeps Debezium's value.
pub fn image(table: &TableModel, raw: &Map<String, J>, scrub: &[&str]) -> Result<Row, String> {
    let mut out = Row::new();
    for (name, v) in raw {
        if scrub.contains(&name.as_str()) {
            continue;
        }
        let value = match table.columns.iter().find(|c| &c.name == name) {
            Some(c) => super::values::value(&c.column_type, v).map_err(|e| format!("column `{name}`: {e}"))?,
            None => v.clone(),
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// The change event of `c`, or the first reference that cannot be resolved yet.
pub fn event(site: &str, model: &Model, ids: &Ids, table: &TableModel, c: &DbzChange, scrub: &[&str], snapshot_row: u32) -> Result<Result<ChangeEvent, Miss>, String> {
    let before = c.before.as_ref().map(|b| image(table, b, scrub)).transpose()?;
    let after = c.after.as_ref().map(|a| image(table, a, scrub)).transpose()?;
    let Some(img) = after.as_ref().or(before.as_ref()) else { return Err("a change without a row image".into()) };
    let key = crate::stream::row_key(table, img);
    let id = table.int_pk().and_then(|pk| img.get(pk)).and_then(J::as_i64);
    let uuid = if table.has_uuid {
        img.get("uuid").and_then(J::as_str).map(str::to_string)
    } else if let (Some(parent), Some(id), true) = (&table.shared_parent, id, table.shared_parent.as_deref().is_some_and(|p| has_uuids(model, p))) {
        match ids.uuid_of(model, parent, id) {
            Some(u) => Some(u),
            None => return Ok(Err(Miss { column: table.int_pk().unwrap_or_default().to_string(), ref_table: parent.clone(), id })),
        }
    } else {
        None
    };
    let mut refs = Row::new();
    for fk in &table.fks {
        let v = match img.get(&fk.column) {
            None => continue, // scrubbed, or not in the image
            Some(v) => match v.as_i64() {
                None => J::Null,
                // A table outside the capture, or one without uuids: as the agent does, null.
                Some(_) if !has_uuids(model, &fk.ref_table) => J::Null,
                Some(id) => match ids.uuid_of(model, &fk.ref_table, id) {
                    Some(u) => J::String(u),
                    None => return Ok(Err(Miss { column: fk.column.clone(), ref_table: fk.ref_table.clone(), id })),
                },
            },
        };
        refs.insert(fk.column.clone(), v);
    }
    let s = &c.source;
    let source = Source {
        server_id: s.server_id,
        gtid: s.gtid.clone(),
        file: s.file.clone(),
        pos: s.pos,
        row: if s.snapshot { snapshot_row } else { s.row },
        ts_ms: s.ts_ms,
        snapshot: s.snapshot,
    };
    Ok(Ok(ChangeEvent {
        op: c.op,
        site: site.to_string(),
        table: Some(table.name.clone()),
        key: Some(key),
        uuid,
        before,
        after,
        refs,
        source,
        ts_ms: now_ms(),
        oversize: None,
        schema: None,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use omrs_core::envelope::Op;
    use omrs_core::model::{ColumnInfo, Fk, TableModel};
    use serde_json::json;

    use super::*;
    use crate::debezium::record::{parse, Record};

    fn table(name: &str, cols: &[(&str, &str)], fks: &[(&str, &str)], shared: Option<&str>) -> TableModel {
        TableModel {
            name: name.into(),
            columns: cols.iter().map(|(n, t)| ColumnInfo { name: n.to_string(), column_type: t.to_string(), not_null: false, default: None }).collect(),
            pk: vec![cols[0].0.to_string()],
            has_uuid: cols.iter().any(|(n, _)| *n == "uuid"),
            fks: fks.iter().map(|(c, t)| Fk { column: c.to_string(), ref_table: t.to_string(), ref_column: format!("{t}_id") }).collect(),
            shared_parent: shared.map(str::to_string),
            enums: Default::default(),
        }
    }

    fn model() -> Model {
        let mut m = Model { database: "openmrs".into(), ..Default::default() };
        for t in [
            table("person", &[("person_id", "int(11)"), ("birthdate", "date"), ("voided", "tinyint(1)"), ("uuid", "char(38)")], &[], None),
            table("patient", &[("patient_id", "int(11)"), ("date_created", "datetime")], &[("patient_id", "person")], Some("person")),
            table("obs", &[("obs_id", "int(11)"), ("person_id", "int(11)"), ("value_numeric", "double"), ("obs_datetime", "datetime"), ("uuid", "char(38)")], &[("person_id", "person")], None),
        ] {
            m.order.push(t.name.clone());
            m.tables.insert(t.name.clone(), Arc::new(t));
        }
        m
    }

    fn change(v: serde_json::Value) -> DbzChange {
        match parse(Some(v.to_string().as_bytes())).unwrap() {
            Record::Change(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn source() -> serde_json::Value {
        json!({"ts_ms": 1_710_498_030_000i64, "snapshot": "false", "server_id": 11, "gtid": "0-11-7", "file": "binlog.000002", "pos": 900, "row": 1})
    }

    #[test]
    fn a_change_reads_as_the_agent_writes_it_with_uuids_for_ids() {
        let m = model();
        let mut ids = Ids::default();
        let person = change(json!({"op": "c", "after": {"person_id": 7, "birthdate": 7489, "voided": 0, "uuid": "1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"}, "source": source()}));
        let ev = event("site-a", &m, &ids, m.table("person").unwrap(), &person, &[], 0).unwrap().unwrap();
        assert_eq!(ev.after.as_ref().unwrap()["birthdate"], json!("1990-07-04"));
        assert_eq!(ev.uuid.as_deref(), Some("1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"));
        assert_eq!((ev.op, ev.source.file.as_str(), ev.source.pos, ev.source.row, ev.source.gtid.as_deref()), (Op::Create, "binlog.000002", 900, 1, Some("0-11-7")));
        // An obs naming person 7 before person 7 is known: a miss, naming the reference.
        let obs = change(json!({"op": "c", "after": {"obs_id": 1, "person_id": 7, "value_numeric": 36.6, "obs_datetime": 1_710_498_360_000i64, "uuid": "aaaaaaaa-0000-4000-8000-000000004001"}, "source": source()}));
        let miss = event("site-a", &m, &ids, m.table("obs").unwrap(), &obs, &[], 0).unwrap().unwrap_err();
        assert_eq!(miss, Miss { column: "person_id".into(), ref_table: "person".into(), id: 7 });
        learn(&mut ids, m.table("person").unwrap(), person.after.as_ref().unwrap(), true);
        let ev = event("site-a", &m, &ids, m.table("obs").unwrap(), &obs, &[], 0).unwrap().unwrap();
        assert_eq!(ev.refs["person_id"], json!("1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"));
        assert_eq!(ev.after.as_ref().unwrap()["obs_datetime"], json!("2024-03-15 10:26:00"));
        // A patient takes its person's uuid; a scrubbed column is left out.
        let patient = change(json!({"op": "u", "before": {"patient_id": 7, "date_created": 0}, "after": {"patient_id": 7, "date_created": 1_710_498_030_000i64}, "source": source()}));
        let ev = event("site-a", &m, &ids, m.table("patient").unwrap(), &patient, &["date_created"], 0).unwrap().unwrap();
        assert_eq!(ev.uuid.as_deref(), Some("1ce3a8f4-3b16-4f66-9ca8-b1c4d1b0b6a1"));
        assert!(!ev.after.as_ref().unwrap().contains_key("date_created"));
        assert_eq!(ev.key.as_ref().unwrap()["patient_id"], json!(7));
        // A value that does not fit its column is named.
        let bad = change(json!({"op": "c", "after": {"person_id": 8, "birthdate": true, "uuid": "x"}, "source": source()}));
        let e = event("site-a", &m, &ids, m.table("person").unwrap(), &bad, &[], 0).unwrap_err();
        assert!(e.contains("birthdate"), "{e}");
    }
}
