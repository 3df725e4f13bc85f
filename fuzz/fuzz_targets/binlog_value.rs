//! Binlog value → envelope JSON: a value decoded from rows-event bytes for any column type,
//! written by the ingest agent's direct writer, must be JSON and equal what serde_json writes
//! for the reference conversion (`binlog_value_typed`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = omrs_ingest::encode::check_binlog_value(data) {
        panic!("{e}");
    }
});
