//! Golden tests of the transform engine: each scenario in tests/golden/<name>/ is an input
//! file (site events in arrival order, with the processing clock) and the expected output
//! sequence: each event when it arrives (late or not), the merges and reviews it causes, and
//! the global watermark after every tick and at the end. `OMRS_BLESS=1 cargo test -p omrs-transform --test golden` rewrites the expected
//! files; review the diff before committing it.
//!
//! Input lines (JSON):
//! - `{"at":MS,"site":S,"op":"c|u|d|r","table":T,"key":K,"uuid":U,"ts":MS,"after":{..},"before":{..},"refs":{..}}`
//! - `{"at":MS,"site":S,"op":"h","ts":MS}` a heartbeat;
//! - `{"at":MS,"site":S,"op":"s","table":T,"ts":MS,"schema":{..}}` a table's new shape after a DDL;
//! - `{"at":MS,"topic_site":S,"raw":"..."}` raw bytes on S's topic (poison);
//! - `{"tick":MS}` the clock moves with no input.

use std::path::PathBuf;

use omrs_core::config::{IdentifierRule, Normalize};
use omrs_core::envelope::{ChangeEvent, Op, Row, Source};
use omrs_core::zone::{SiteRule, SiteRules, Zone};
use omrs_transform::engine::{Engine, EngineConfig, HqEvent, Origin, Out};
use omrs_transform::runner::decode;
use serde_json::Value as J;

fn config() -> EngineConfig {
    let rule = |t: &str| IdentifierRule {
        identifier_type_uuid: t.into(),
        name: None,
        normalize: vec![Normalize::Trim, Normalize::StripSeparators, Normalize::Upper],
    };
    // `site-ke` writes its DATETIMEs in Nairobi time (UTC+3); every other site in UTC.
    let ke = SiteRule {
        priority: 0,
        zone: Zone::parse("Africa/Nairobi").expect("a zone"),
    };
    let sites = SiteRules::new([("site-ke".to_string(), ke)]);
    EngineConfig {
        out_of_orderness_ms: 1_000,
        idle_timeout_ms: 10_000,
        // The scenarios' processing clock (`at`) is not their event clock: no cap here (the
        // engine's unit tests cover it).
        max_clock_ahead_ms: i64::MAX / 4,
        identifiers: vec![rule("NID"), rule("PASSPORT")],
        sites,
    }
}

fn obj(v: Option<&J>) -> Option<Row> {
    v.and_then(|v| v.as_object().cloned())
}

fn event(line: &J, offset: i64) -> Vec<u8> {
    if let Some(raw) = line.get("raw") {
        return raw.as_str().unwrap().as_bytes().to_vec();
    }
    let site = line["site"].as_str().unwrap().to_string();
    let op: Op = serde_json::from_value(line["op"].clone()).unwrap();
    let source = Source { server_id: 1, gtid: None, file: "binlog.000001".into(), pos: offset as u64, row: 0, ts_ms: line["ts"].as_i64().unwrap(), snapshot: op == Op::Read };
    let ev = if op == Op::Heartbeat {
        ChangeEvent::heartbeat(site, source, 0)
    } else if op == Op::Schema {
        ChangeEvent::schema(site, serde_json::from_value(line["schema"].clone()).unwrap(), source, 0)
    } else {
        let table = line["table"].as_str().unwrap().to_string();
        let mut key = Row::new();
        key.insert(format!("{table}_id"), line["key"].clone());
        // Row images default to just the key, as the op requires.
        let after = obj(line.get("after")).or_else(|| Some(key.clone()));
        let before = obj(line.get("before")).or_else(|| after.clone());
        let (before, after) = match op {
            Op::Create | Op::Read => (None, after),
            Op::Delete => (before, None),
            _ => (before, after),
        };
        ChangeEvent {
            op,
            site,
            table: Some(table),
            key: Some(key),
            uuid: line.get("uuid").and_then(J::as_str).map(str::to_string),
            before,
            after,
            refs: obj(line.get("refs")).unwrap_or_default(),
            source,
            ts_ms: 0,
            oversize: None,
            schema: None,
        }
    };
    ev.to_json()
}

fn render(o: &HqEvent) -> String {
    match o {
        HqEvent::Change { late, person, origin_refs, event } => {
            let mut s = format!(
                "change {} {} {} {} ts={}{}",
                event.site,
                event.table.as_deref().unwrap_or(""),
                event.op.as_str(),
                event.key.as_ref().and_then(|k| k.values().next()).map(|v| v.to_string()).unwrap_or_default(),
                event.source.ts_ms,
                if *late { " LATE" } else { "" }
            );
            if let Some(p) = person {
                s.push_str(&format!(" person={p}"));
            }
            for (col, orig) in origin_refs {
                s.push_str(&format!(" {col}:{}->{}", orig.as_str().unwrap_or(""), event.refs[col].as_str().unwrap_or("")));
            }
            s
        }
        HqEvent::Merge { winner, loser, reason, site, .. } => format!("MERGE winner={winner} loser={loser} reason={reason} at={site}"),
        HqEvent::IdentityReview { reason, status, person, records, site, evidence, .. } => {
            format!("REVIEW {reason} {status} person={person} records={} at={site} value={}", records.join(","), evidence["value"].as_str().unwrap_or(""))
        }
        HqEvent::Split { survivor, from, records, site, .. } => format!("SPLIT from={from} survivor={survivor} records={} at={site}", records.join(",")),
        HqEvent::Watermark { ts_ms } => format!("WATERMARK {ts_ms}"),
        HqEvent::Schema { site, schema, .. } => format!("SCHEMA {} at={site} columns={}", schema.table, schema.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(",")),
        HqEvent::Aggregate { name, site, window_start_ms, dim, value, is_final, revision, .. } => {
            format!("AGGREGATE {name} {site} {window_start_ms} {dim} value={value} final={is_final} revision={revision}")
        }
    }
}

/// Renders an output record from its JSON, as it is written to `omrs.hq.changes`.
fn render_out(o: &Out) -> String {
    render(&o.to_hq().unwrap())
}

fn run(name: &str) {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("tests/golden").join(name);
    let input = std::fs::read_to_string(dir.join("input.jsonl")).unwrap();
    let mut engine = Engine::new(config());
    // The configured sites: every site named in the input, known from the start.
    let start = input
        .lines()
        .filter_map(|l| serde_json::from_str::<J>(l).ok())
        .find_map(|v| v.get("at").and_then(J::as_i64))
        .unwrap_or(0);
    for site in ["site-a", "site-b", "site-c"] {
        if input.contains(&format!("\"{site}\"")) {
            engine.expect_site(site, start);
        }
    }
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with("//")) {
        let v: J = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}:{}: {e}", i + 1));
        if let Some(d) = v.get("decide") {
            // A data manager's decision, as read from omrs.identity.decisions.
            let d: omrs_core::hq::review::Decision = serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{name}:{}: {e}", i + 1));
            let mut o = Vec::new();
            engine.decide(d, &mut o).unwrap_or_else(|e| panic!("{name}:{}: {e}", i + 1));
            out.extend(o.iter().map(render_out));
            continue;
        }
        if let Some(t) = v.get("tick") {
            engine.tick(t.as_i64().unwrap());
            out.push(format!("tick {}: watermark {}", t, engine.global_watermark()));
            continue;
        }
        let at = v["at"].as_i64().unwrap();
        let site = v.get("topic_site").or(v.get("site")).and_then(J::as_str).unwrap();
        let topic = format!("omrs.cdc.{site}");
        let offset = i as i64;
        match decode(&event(&v, offset), &topic, "omrs.cdc.") {
            Err(reason) => out.push(format!("DLQ {topic}@{offset}: {reason}")),
            Ok(ev) => {
                let o = engine.push(ev, Origin { topic: topic.into(), partition: 0, offset }, at);
                out.extend(o.iter().map(render_out));
            }
        }
    }
    out.push(format!("-- end of input: watermark {}", engine.global_watermark()));
    let got = out.join("\n") + "\n";
    let expected_path = dir.join("expected.txt");
    if std::env::var("OMRS_BLESS").is_ok() {
        std::fs::write(&expected_path, &got).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(got, expected, "scenario {name}: output differs from {}", expected_path.display());
}

#[test]
fn identity_split_keeps_the_records_apart() {
    run("identity_split");
}

#[test]
fn interleaved_sites_with_skewed_clocks() {
    run("interleaved_skewed_clocks");
}

#[test]
fn an_idle_site_that_becomes_active() {
    run("idle_site_returns");
}

#[test]
fn a_site_three_days_late() {
    run("three_days_late");
}

#[test]
fn identity_duplicate_known_at_registration() {
    run("identity_at_registration");
}

#[test]
fn identity_identifier_added_later() {
    run("identity_late_identifier");
}

#[test]
fn identity_three_sites_and_a_chain_over_two_identifier_types() {
    run("identity_chain");
}

#[test]
fn identity_survivor_changes_when_an_earlier_record_arrives() {
    run("identity_survivor_change");
}

#[test]
fn identity_survivor_follows_registration_date_fixes_both_ways() {
    run("identity_survivor_date_fixed");
}

#[test]
fn identity_survivor_is_the_earliest_registration_in_utc_across_time_zones() {
    run("identity_survivor_time_zones");
}

#[test]
fn identity_site_merge_and_voided_identifier() {
    run("identity_site_merge_review");
}

#[test]
fn poison_records_go_to_the_dlq() {
    run("poison");
}

#[test]
fn identity_a_corrected_or_deleted_identifier_of_a_merged_person_opens_a_review() {
    run("identity_corrected_review");
}

#[test]
fn identity_namesakes_at_two_clinics_are_suggested_not_merged() {
    run("identity_near_miss");
}

#[test]
fn schema_change() {
    run("schema_change");
}

#[test]
fn a_snapshots_table_shapes_move_no_watermark() {
    run("schema_base");
}
