//! The agent's binlog decoder on real MySQL (and one MariaDB) binlog files: the files of
//! mysql_common's test data (MySQL's own test suite among them), read in place from
//! `../shared/mysql-binlogs/` (or `$OMRS_MYSQL_BINLOGS`); they are not part of this repository.
//!
//! Each row event is decoded three ways:
//! - by the agent's encoder (`omrs_ingest::encode::TablePlan`, the code that runs at a site),
//!   with column names from the table map (FULL metadata) or from the schema history built from
//!   the file's own DDL (`omrs_ingest::schema`), or `@1`, `@2`… when the file has none;
//! - by mysql_common's row decoder, rendered with the agent's value rules: every value must be
//!   equal;
//! - by `mariadb-binlog -v` (MariaDB's C decoder) where it can read the file: integers and
//!   strings must be equal to ours, column by column (`@N`).
//!
//! The truncated and corrupt files must give an error naming the file and the event, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mysql_common::binlog::events::{EventData, PreviousGtidsEvent, QueryEvent, RowsEventData, TableMapEvent, TransactionPayloadEvent};
use mysql_common::binlog::consts::BinlogVersion;
use mysql_common::binlog::EventStreamReader;
use mysql_common::io::ParseBuf;
use omrs_core::model::{ColumnInfo, Model, TableModel};
use omrs_ingest::encode::{RowEncoder, TablePlan};
use omrs_ingest::refs::Resolver;
use omrs_ingest::schema::{apply_ddl, Applied, Scope};
use base64::Engine;
use serde_json::{Map, Value as J};

/// Where the files are; None when this machine has none (then the test says so, and fails if
/// `OMRS_REQUIRE_MYSQL_BINLOGS` is set, as scripts/test sets it when it finds them).
fn dir() -> Option<PathBuf> {
    let d = match std::env::var("OMRS_MYSQL_BINLOGS") {
        Ok(d) => PathBuf::from(d),
        Err(_) => PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("../../shared/mysql-binlogs"),
    };
    if d.is_dir() {
        return Some(d);
    }
    assert!(std::env::var("OMRS_REQUIRE_MYSQL_BINLOGS").is_err(), "no MySQL binlog files at {} (set OMRS_MYSQL_BINLOGS)", d.display());
    eprintln!("SKIPPED: no MySQL binlog files at {}; set OMRS_MYSQL_BINLOGS to run this test", d.display());
    None
}

const BROKEN: [&str; 3] = ["binlog_truncated_event.000001", "binlog_truncated_prev_gtid_event.000001", "corrupt-relay-bin.000624"];

/// A row as decoded: table, before and after images.
#[derive(Debug, Clone)]
struct Row {
    before: Option<Map<String, J>>,
    after: Option<Map<String, J>>,
}

#[derive(Debug, Default)]
struct Decoded {
    rows: Vec<Row>,
    gtids: Vec<String>,
    /// The file's Previous_gtids: (uuid, tag, first, last) per interval.
    previous: Vec<(String, String, u64, u64)>,
    /// Its GTIDs as the agent writes them (`uuid:gno`, `uuid:tag:gno`).
    agent_gtids: Vec<(String, String, u64)>,
    /// Tables whose column names came from the file's DDL (the schema history).
    named_by_history: Vec<String>,
    ddl_followed: usize,
    payloads: usize,
}

struct Reader {
    models: HashMap<String, Model>,
    resolver: Resolver,
    out: Decoded,
    name: String,
}

impl Reader {
    fn event(&mut self, reader: &EventStreamReader, ev: &mysql_common::binlog::events::Event, i: usize) -> Result<(), String> {
        let name = self.name.clone();
        let at = |e: &dyn std::fmt::Display| format!("{name}: event {i} (type {}): {e}", ev.header().event_type_raw());
        match ev.header().event_type_raw() {
            2 => {
                let q = ev.read_event::<QueryEvent>().map_err(|e| at(&e))?;
                let schema = q.schema().into_owned();
                let text = q.query().into_owned();
                let t = text.trim_start().to_ascii_uppercase();
                if ["CREATE TABLE", "ALTER TABLE", "DROP TABLE", "RENAME TABLE"].iter().any(|p| t.starts_with(p)) {
                    let model = self.models.entry(schema.clone()).or_insert_with(|| Model { database: schema.clone(), ..Default::default() });
                    // A statement the history cannot follow is left out, as the agent falls back then.
                    if let Ok(Applied::Tables(_)) = apply_ddl(model, Scope { db: &schema, default: &schema }, &text, &|_| true) {
                        self.out.ddl_followed += 1;
                    }
                }
            }
            35 => {
                let p = ev.read_event::<PreviousGtidsEvent>().map_err(|e| at(&e))?;
                for s in p.sids() {
                    for i in s.intervals() {
                        self.out.previous.push((hyphenated(&s.uuid()), s.tag().map(|t| t.as_str().to_string()).unwrap_or_default(), i.start(), i.end() - 1));
                    }
                }
            }
            33 | 42 => {
                if let Ok(Some(EventData::GtidEvent(g))) = ev.read_data() {
                    self.out.agent_gtids.push((hyphenated(&g.sid()), g.tag().map(|t| t.as_str().to_string()).unwrap_or_default(), g.gno()));
                    let sid: String = g.sid().iter().map(|b| format!("{b:02x}")).collect();
                    self.out.gtids.push(match g.tag() {
                        Some(t) => format!("{sid}:{}:{}", t.as_str(), g.gno()),
                        None => format!("{sid}:{}", g.gno()),
                    });
                }
            }
            23 | 24 | 25 | 30 | 31 | 32 => {
                let Some(EventData::RowsEvent(re)) = ev.read_data().map_err(|e| at(&e))? else { return Ok(()) };
                let tme = reader.get_tme(re.table_id()).ok_or_else(|| at(&"a row event without its table map"))?;
                self.rows(tme, &re).map_err(|e| at(&e))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The table as the agent would know it: the history's, else `@1`… for a table map without
    /// names (MINIMAL metadata and no DDL in the file).
    fn table(&mut self, tme: &TableMapEvent<'_>) -> Arc<TableModel> {
        let (db, name) = (tme.database_name().into_owned(), tme.table_name().into_owned());
        let n = tme.columns_count() as usize;
        if let Some(t) = self.models.get(&db).and_then(|m| m.tables.get(&name)).filter(|t| t.columns.len() == n) {
            if !self.out.named_by_history.contains(&name) {
                self.out.named_by_history.push(name.clone());
            }
            return t.clone();
        }
        let columns = (1..=n).map(|i| ColumnInfo { name: format!("@{i}"), ..Default::default() }).collect();
        Arc::new(TableModel { name, columns, pk: vec![], has_uuid: false, fks: vec![], shared_parent: None, enums: HashMap::new() })
    }

    fn rows(&mut self, tme: &TableMapEvent<'_>, re: &RowsEventData<'_>) -> Result<(), String> {
        let table = self.table(tme);
        let model = Model::default();
        let plan = TablePlan::new(tme, table.clone(), &[], "site", &model, &mut self.resolver).map_err(|e| e.to_string())?;
        let before: Option<Vec<bool>> = re.columns_before_image().map(|b| b.iter().by_vals().collect());
        let after: Option<Vec<bool>> = re.columns_after_image().map(|b| b.iter().by_vals().collect());
        let mut buf = ParseBuf(re.rows_data());
        let mut enc = RowEncoder::default();
        let image = |enc: &RowEncoder, after: bool| -> Result<Option<Map<String, J>>, String> {
            enc.image_json(after).map(|b| serde_json::from_slice::<Map<String, J>>(b).map_err(|e| format!("the encoder's JSON: {e}"))).transpose()
        };
        let mut ours = Vec::new();
        while !buf.is_empty() {
            plan.decode_row(&mut buf, before.as_deref(), after.as_deref(), &mut enc).map_err(|e| format!("decoding a row of {}: {e}", table.name))?;
            ours.push(Row { before: image(&enc, false)?, after: image(&enc, true)? });
        }
        // mysql_common's decoder, the agent's value rules.
        let mut theirs = Vec::new();
        for row in re.rows(tme) {
            let (b, a) = row.map_err(|e| format!("mysql_common: {e}"))?;
            let img = |r: Option<mysql_common::binlog::row::BinlogRow>| -> Option<Map<String, J>> {
                let r = r?;
                let mut m = Map::new();
                for (i, col) in r.columns_ref().iter().enumerate() {
                    let name = col_name(col, &table);
                    let v = r.as_ref(i).map(|v| omrs_ingest::convert::binlog_value(v, col, table.enums.get(&name))).unwrap_or(J::Null);
                    m.insert(name, v);
                }
                Some(m)
            };
            theirs.push((img(b), img(a)));
        }
        if ours.len() != theirs.len() {
            return Err(format!("{} rows decoded, mysql_common read {}", ours.len(), theirs.len()));
        }
        for (o, (tb, ta)) in ours.iter().zip(theirs) {
            if o.before != tb || o.after != ta {
                return Err(format!("{}: the agent decoded {:?} / {:?}, mysql_common {:?} / {:?}", table.name, o.before, o.after, tb, ta));
            }
        }
        self.out.rows.extend(ours);
        Ok(())
    }
}

/// The name the agent gives the `i`th column of a row image: the binlog's, else the table's at
/// that index (mysql_common names a column it has no name for `@<index from 0>`).
fn col_name(col: &mysql_common::packets::Column, table: &TableModel) -> String {
    let name = col.name_str();
    match name.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => table.columns.get(n).map(|c| c.name.clone()).unwrap_or_default(),
        None => name.into_owned(),
    }
}

/// Decodes every event of a file; Err names the file and the event.
fn decode_file(path: &Path) -> Result<Decoded, String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let data = std::fs::read(path).map_err(|e| format!("{name}: {e}"))?;
    if data.get(..4) != Some(&b"\xfebin"[..]) {
        return Err(format!("{name}: not a binlog file (no magic number)"));
    }
    // Event by event, so that a cut event is an error (a file iterator would stop quietly).
    let mut input = &data[4..];
    let mut reader = EventStreamReader::new(BinlogVersion::Version4);
    let mut r = Reader { models: HashMap::new(), resolver: Resolver::new(1000), out: Decoded::default(), name: name.clone() };
    let mut i = 0;
    loop {
        let offset = data.len() - input.len();
        i += 1;
        let ev = match reader.read(&mut input) {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => return Err(format!("{name}: event {i} at byte {offset}: {e}")),
        };
        if ev.header().event_type_raw() == 40 {
            // A compressed transaction: its events, decompressed, in the same reader.
            let tpe = ev.read_event::<TransactionPayloadEvent>().map_err(|e| format!("{name}: event {i}: {e}"))?;
            let mut payload = tpe.decompressed().map_err(|e| format!("{name}: event {i}: decompressing: {e}"))?;
            r.out.payloads += 1;
            while let Some(inner) = reader.read_decompressed(&mut payload).map_err(|e| format!("{name}: event {i}, inside the payload: {e}"))? {
                r.event(&reader, &inner, i)?;
            }
            continue;
        }
        r.event(&reader, &ev, i)?;
    }
    Ok(r.out)
}

/// `mariadb-binlog -v`'s rows: (table, [(column number, printed value)]) per image, in order.
/// One image as mariadb-binlog prints it: the table, and (column number, printed value)s.
type Printed = (String, Vec<(usize, String)>);

fn mariadb_rows(path: &Path) -> Option<Vec<Printed>> {
    let out = std::process::Command::new("mariadb-binlog").args(["-v", "--base64-output=DECODE-ROWS"]).arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<Printed> = Vec::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("### INSERT INTO ").or_else(|| line.strip_prefix("### UPDATE ")).or_else(|| line.strip_prefix("### DELETE FROM ")) {
            table = rest.rsplit('.').next().unwrap_or("").trim_matches('`').to_string();
        } else if line == "### SET" || line == "### WHERE" {
            rows.push((table.clone(), Vec::new()));
        } else if let Some(v) = line.strip_prefix("###   @") {
            let (n, val) = v.split_once('=')?;
            rows.last_mut()?.1.push((n.parse().ok()?, val.to_string()));
        }
    }
    Some(rows)
}

/// Whether mariadb-binlog's printed value is the agent's JSON value: integers (signed, or the
/// unsigned value it prints in parentheses) and plain strings; None when not comparable.
fn same_value(printed: &str, ours: &J) -> Option<bool> {
    if let Some(text) = printed.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        let s = ours.as_str()?;
        if text.contains('\\') || s.contains('\'') {
            return None; // escapes: not comparable as printed
        }
        // A binary column's value is base64 in the agent's JSON.
        let decoded = base64::engine::general_purpose::STANDARD.decode(s).ok();
        return Some(text == s || decoded.as_deref() == Some(text.as_bytes()));
    }
    let mut parts = printed.split_whitespace();
    let signed: i128 = parts.next()?.parse().ok()?;
    let unsigned: Option<i128> = parts.next().and_then(|p| p.trim_matches(|c| c == '(' || c == ')').parse().ok());
    let v = ours.as_i64().map(i128::from).or_else(|| ours.as_u64().map(i128::from))?;
    Some(v == signed || Some(v) == unsigned)
}

#[test]
fn every_row_event_of_the_real_files_decodes_to_the_values_they_hold() {
    let Some(dir) = dir() else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut decoded: BTreeMap<String, Decoded> = BTreeMap::new();
    let (mut compared, mut files_compared) = (0usize, 0usize);
    for path in files.iter().filter(|p| !p.to_string_lossy().ends_with(".txt")) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if BROKEN.contains(&name.as_str()) {
            continue;
        }
        let d = match decode_file(path) {
            Ok(d) => d,
            // MySQL's own "broken XID" test file (mysql_common skips it too).
            Err(e) if name == "ver_5_1-wl2325_r.001" && e.contains("type 16") => continue,
            Err(e) => panic!("{e}"),
        };
        if let Some(theirs) = mariadb_rows(path) {
            // mariadb-binlog prints every image; ours, in the same order.
            let ours: Vec<&Map<String, J>> = d.rows.iter().flat_map(|r| r.before.iter().chain(r.after.iter())).collect();
            if theirs.len() == ours.len() && !theirs.is_empty() {
                files_compared += 1;
                for ((table, vals), img) in theirs.iter().zip(&ours) {
                    let cols: Vec<&J> = img.values().collect();
                    for (k, (n, printed)) in vals.iter().enumerate() {
                        let Some(v) = img.get(&format!("@{n}")).or(cols.get(k).copied()) else { continue };
                        match same_value(printed, v) {
                            Some(true) => compared += 1,
                            Some(false) => panic!("{name}: {table} @{n}: mariadb-binlog reads {printed}, the agent {v}"),
                            None => {}
                        }
                    }
                }
            }
        }
        decoded.insert(name, d);
    }
    let rows: usize = decoded.values().map(|d| d.rows.len()).sum();
    eprintln!("decoded {rows} rows of {} files; {compared} values equal to mariadb-binlog's in {files_compared} files", decoded.len());
    // The pinned files hold 85 row images (mysql_common reads as many).
    assert!(rows >= 85, "only {rows} rows decoded");
    assert!(compared >= 150 && files_compared >= 12, "only {compared} values in {files_compared} files compared with mariadb-binlog");

    // MINIMAL row metadata: no names in the table map; @1, @3, @5 of a partial image.
    let m = &decoded["minimal_row_metadata.000001"].rows;
    assert_eq!(m.len(), 1);
    let after = m[0].after.as_ref().unwrap();
    assert_eq!((after["@1"].as_i64(), after["@3"].as_str()), (Some(1), Some("a")));
    // Names from the file's own DDL where it has some (the schema history on MySQL's DDL).
    let with_history: Vec<&String> = decoded.iter().filter(|(_, d)| !d.named_by_history.is_empty()).map(|(n, _)| n).collect();
    assert!(!with_history.is_empty(), "no file named its columns through the schema history");
    // Tagged GTIDs (MySQL 8.4): uuid:tag:gno.
    let tagged = &decoded["binlog_transaction_with_GTID_TAG.000001"].gtids;
    assert!(tagged.iter().any(|g| g.ends_with(":mytag:3")), "tagged GTIDs: {tagged:?}");
    assert!(!decoded["binlog_transaction_with_GTID.000001"].gtids.is_empty());
    // A compressed transaction's rows.
    let c = &decoded["transaction_compression.000001"];
    assert!(c.payloads >= 1 && !c.rows.is_empty(), "compressed transaction: {} payloads, {} rows", c.payloads, c.rows.len());
}

fn hyphenated(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The executed GTID set the agent keeps (`omrs_ingest::gtid`) after reading a whole file: the
/// file's Previous_gtids plus each of its transactions, as MySQL writes such a set. The
/// expectation is worked out here from the transaction numbers themselves.
#[test]
fn the_gtid_set_after_each_real_file_is_its_previous_set_and_its_transactions() {
    let Some(dir) = dir() else { return };
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if BROKEN.contains(&name.as_str()) || name.ends_with(".txt") {
            continue;
        }
        let Ok(d) = decode_file(&entry.path()) else { continue };
        if d.agent_gtids.is_empty() {
            continue;
        }
        let mut want: BTreeMap<(String, String), std::collections::BTreeSet<u64>> = BTreeMap::new();
        let mut text = Vec::new();
        for (uuid, tag, a, b) in &d.previous {
            assert!(b - a < 1_000_000, "{name}: an interval too long to expand");
            want.entry((uuid.clone(), tag.clone())).or_default().extend(*a..=*b);
            text.push(if tag.is_empty() { format!("{uuid}:{a}-{b}") } else { format!("{uuid}:{tag}:{a}-{b}") });
        }
        let mut ours = omrs_ingest::gtid::GtidSet::parse(&text.join(",")).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (uuid, tag, gno) in &d.agent_gtids {
            want.entry((uuid.clone(), tag.clone())).or_default().insert(*gno);
            let g = if tag.is_empty() { format!("{uuid}:{gno}") } else { format!("{uuid}:{tag}:{gno}") };
            assert!(ours.add(&g), "{name}: {g} is a GTID");
        }
        // MySQL's form: per server (and tag) its runs of consecutive numbers.
        let expected: Vec<String> = want
            .iter()
            .map(|((uuid, tag), gnos)| {
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for &n in gnos {
                    match runs.last_mut() {
                        Some(r) if r.1 + 1 == n => r.1 = n,
                        _ => runs.push((n, n)),
                    }
                }
                let runs: Vec<String> = runs.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
                if tag.is_empty() { format!("{uuid}:{}", runs.join(":")) } else { format!("{uuid}:{tag}:{}", runs.join(":")) }
            })
            .collect();
        assert_eq!(ours.to_string(), expected.join(","), "{name}");
        assert_eq!(omrs_ingest::gtid::GtidSet::parse(&ours.to_string()).unwrap(), ours, "{name}: the checkpoint's text reads back");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} files with GTIDs");
}

#[test]
fn truncated_and_corrupt_files_give_a_clear_error_never_a_panic() {
    let Some(dir) = dir() else { return };
    for name in BROKEN {
        let path = dir.join(name);
        let result = std::panic::catch_unwind(|| decode_file(&path)).unwrap_or_else(|_| panic!("{name}: the decoder panicked"));
        match result {
            Err(e) => assert!(e.starts_with(name), "the error names the file: {e}"),
            // A file cut at an event boundary reads to its end: what it holds must still decode.
            Ok(d) => eprintln!("{name}: read to its end ({} rows)", d.rows.len()),
        }
    }
    // At least the cut event is an error.
    assert!(decode_file(&dir.join("binlog_truncated_event.000001")).is_err());
}
