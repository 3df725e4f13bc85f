//! One record of a Debezium topic, read: a row change, a DDL, a heartbeat or a tombstone, with
//! or without the JsonConverter's schemas (`{"schema":…,"payload":…}`).

use omrs_core::envelope::Op;
use serde_json::{Map, Value as J};

/// Where in the clinic's binlog a record comes from (Debezium's `source` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbzSource {
    pub server_id: u32,
    pub gtid: Option<String>,
    pub file: String,
    pub pos: u64,
    pub row: u32,
    pub ts_ms: i64,
    /// Any `snapshot` value but `false` (`true`, `first`, `last`, `last_in_data_collection`…).
    pub snapshot: bool,
    /// `snapshot: "last"`: the last record of the initial snapshot.
    pub snapshot_last: bool,
}

/// A row change.
#[derive(Debug, Clone)]
pub struct DbzChange {
    pub op: Op,
    pub before: Option<Map<String, J>>,
    pub after: Option<Map<String, J>>,
    pub source: DbzSource,
}

/// What a record is.
#[derive(Debug)]
pub enum Record {
    Change(DbzChange),
    /// A DDL from the schema-change topic: its statement, the database it ran in.
    Ddl { ddl: String, database: String, source: DbzSource },
    /// The tombstone after a delete (no value), or an event this input has no use for
    /// (`op:"t"` truncate, `op:"m"` message), with what it was.
    Skip(&'static str),
}

/// Reads a record's value. An Err says what is wrong with it (the record is dead-lettered).
pub fn parse(value: Option<&[u8]>) -> Result<Record, String> {
    let Some(bytes) = value else { return Ok(Record::Skip("tombstone")) };
    let v: J = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let J::Object(mut top) = v else { return Err("not a JSON object".into()) };
    // With schemas: {"schema": …, "payload": …}; a null payload is a tombstone.
    if top.contains_key("schema") && top.contains_key("payload") {
        match top.remove("payload") {
            Some(J::Object(p)) => top = p,
            Some(J::Null) | None => return Ok(Record::Skip("tombstone")),
            Some(_) => return Err("`payload` is not an object".into()),
        }
    }
    let source = match top.get("source") {
        Some(J::Object(s)) => source(s)?,
        _ => return Err("no `source` block".into()),
    };
    if let Some(ddl) = top.get("ddl").and_then(J::as_str) {
        let database = top.get("databaseName").and_then(J::as_str).unwrap_or("").to_string();
        return Ok(Record::Ddl { ddl: ddl.to_string(), database, source });
    }
    let op = match top.get("op").and_then(J::as_str) {
        Some("c") => Op::Create,
        Some("u") => Op::Update,
        Some("d") => Op::Delete,
        Some("r") => Op::Read,
        Some("t") => return Ok(Record::Skip("truncate")),
        Some("m") => return Ok(Record::Skip("message")),
        Some(other) => return Err(format!("unknown op `{other}`")),
        None => return Err("no `op`".into()),
    };
    let mut image = |k: &str| -> Result<Option<Map<String, J>>, String> {
        match top.remove(k) {
            None | Some(J::Null) => Ok(None),
            Some(J::Object(m)) => Ok(Some(m)),
            Some(_) => Err(format!("`{k}` is not an object")),
        }
    };
    let (before, after) = (image("before")?, image("after")?);
    match op {
        Op::Create | Op::Read if after.is_none() => return Err(format!("op `{}` without `after`", op.as_str())),
        Op::Update if after.is_none() || before.is_none() => {
            return Err("op `u` without both `before` and `after` (the clinic's binlog_row_image must be FULL)".into())
        }
        Op::Delete if before.is_none() => return Err("op `d` without `before`".into()),
        _ => {}
    }
    Ok(Record::Change(DbzChange { op, before, after, source }))
}

/// The id (column `pk`) and uuid of a record's row after the change, read without building the
/// row (the read-ahead's only need). None for anything else.
pub fn row_id(value: &[u8], pk: &str) -> Option<(i64, String)> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        after: Option<&'a RawValue>,
        #[serde(borrow, default)]
        payload: Option<&'a RawValue>,
    }
    let top: Top = serde_json::from_slice(value).ok()?;
    let after = match top.payload {
        Some(p) => serde_json::from_str::<Top>(p.get()).ok()?.after?,
        None => top.after?,
    };
    let cols: std::collections::HashMap<&str, &RawValue> = serde_json::from_str(after.get()).ok()?;
    let id = serde_json::from_str::<i64>(cols.get(pk)?.get()).ok()?;
    let uuid = serde_json::from_str::<String>(cols.get("uuid")?.get()).ok()?;
    Some((id, uuid))
}

fn source(s: &Map<String, J>) -> Result<DbzSource, String> {
    let int = |k: &str| s.get(k).and_then(J::as_i64);
    let snapshot = match s.get("snapshot") {
        None | Some(J::Null) => "false",
        Some(J::String(v)) => v.as_str(),
        Some(J::Bool(true)) => "true",
        Some(J::Bool(false)) => "false",
        Some(other) => return Err(format!("`source.snapshot` is {other}")),
    };
    Ok(DbzSource {
        server_id: int("server_id").unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        gtid: s.get("gtid").and_then(J::as_str).map(str::to_string),
        file: s.get("file").and_then(J::as_str).ok_or("no `source.file`")?.to_string(),
        pos: int("pos").ok_or("no `source.pos`")?.max(0) as u64,
        row: int("row").unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        ts_ms: int("ts_ms").ok_or("no `source.ts_ms`")?,
        snapshot: snapshot != "false",
        snapshot_last: snapshot == "last",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#""source":{"version":"3.5.0.Final","connector":"mariadb","name":"dbz.site-a","ts_ms":1764921600000,"snapshot":"false","db":"openmrs","table":"obs","server_id":11,"gtid":"0-11-42","file":"mysql-bin.000003","pos":1234,"row":1,"thread":7,"query":null}"#;

    #[test]
    fn a_change_with_and_without_schemas() {
        let plain = format!(r#"{{"before":null,"after":{{"obs_id":7,"value_numeric":36.6}},{SOURCE},"op":"c","ts_ms":1764921600123}}"#);
        let wrapped = format!(r#"{{"schema":{{"type":"struct"}},"payload":{plain}}}"#);
        for v in [plain, wrapped] {
            let Record::Change(c) = parse(Some(v.as_bytes())).unwrap() else { panic!("not a change") };
            assert_eq!(c.op, Op::Create);
            assert_eq!(c.after.unwrap()["obs_id"], 7);
            assert_eq!((c.source.file.as_str(), c.source.pos, c.source.row, c.source.server_id), ("mysql-bin.000003", 1234, 1, 11));
            assert!(!c.source.snapshot);
        }
    }

    #[test]
    fn tombstones_ddl_and_bad_records() {
        assert!(matches!(parse(None).unwrap(), Record::Skip("tombstone")));
        assert!(matches!(parse(Some(br#"{"schema":{},"payload":null}"#)).unwrap(), Record::Skip("tombstone")));
        let ddl = format!(r#"{{{SOURCE},"ts_ms":1,"databaseName":"openmrs","ddl":"ALTER TABLE person ADD COLUMN x INT","tableChanges":[]}}"#);
        assert!(matches!(parse(Some(ddl.as_bytes())).unwrap(), Record::Ddl { ref database, .. } if database == "openmrs"));
        assert!(parse(Some(b"not json")).unwrap_err().contains("not JSON"));
        let no_before = format!(r#"{{"before":null,"after":{{"a":1}},{SOURCE},"op":"u"}}"#);
        assert!(parse(Some(no_before.as_bytes())).unwrap_err().contains("binlog_row_image"));
        let row = format!(r#"{{"before":null,"after":{{"obs_id":7,"uuid":"u-7","value_text":"a \"b\""}},{SOURCE},"op":"c"}}"#);
        assert_eq!(row_id(row.as_bytes(), "obs_id"), Some((7, "u-7".into())));
        assert_eq!(row_id(format!(r#"{{"schema":{{}},"payload":{row}}}"#).as_bytes(), "obs_id"), Some((7, "u-7".into())));
        assert_eq!(row_id(no_before.as_bytes(), "obs_id"), None, "no uuid");
        let odd = format!(r#"{{"before":null,"after":{{"a":1}},{SOURCE},"op":"x"}}"#);
        assert!(parse(Some(odd.as_bytes())).unwrap_err().contains("unknown op `x`"));
    }
}
