//! Replays every fuzz seed and every input a fuzz run found a crash with (fuzz/seeds/<target>/,
//! fuzz/regressions/<target>/) through the same checks the cargo-fuzz targets run: no panic,
//! no broken promise. A crash found by scripts/fuzz is copied there, so it stays fixed.

mod common;

use std::panic::catch_unwind;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for dir in ["seeds", "regressions"] {
        let d = common::root().join("fuzz").join(dir).join(target);
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep") {
                v.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    v
}

fn replay(target: &str, check: fn(&[u8]) -> Result<(), String>) -> usize {
    let cases = inputs(target);
    assert!(!cases.is_empty(), "no seeds for {target}");
    for (name, data) in &cases {
        match catch_unwind(|| check(data)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{target} {name}: {e}"),
            Err(_) => panic!("{target} {name}: panicked"),
        }
    }
    cases.len()
}

#[test]
fn envelope_inputs_decode_without_panics() {
    replay("envelope", omrs_transform::event::check_envelope);
}

#[test]
fn binlog_value_inputs_are_written_as_serde_writes_them() {
    replay("binlog_value", omrs_ingest::encode::check_binlog_value);
}

#[test]
fn config_inputs_load_or_name_the_file() {
    replay("config", |d| std::str::from_utf8(d).map_or(Ok(()), omrs_core::config::check_config_text));
}
