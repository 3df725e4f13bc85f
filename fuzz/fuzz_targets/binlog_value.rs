//! Binlog value → envelope JSON: a value decoded from rows-event bytes for any column type,
//! written by the ingest agent's direct writer, must be JSON and equal what serde_json writes
//! for the reference conversion (`binlog_value_typed`).
//!
//! The agent turns a panic inside mysql_common's value decoders into a decoding error
//! (`catch_unwind` in `parse_value`). libfuzzer-sys's panic hook aborts on any panic, caught or
//! not, so the default hook is put back: a panic that escapes `check_binlog_value` still aborts
//! (libfuzzer-sys catches the unwind and aborts), one the agent handles does not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| {
        if let Err(e) = omrs_ingest::encode::check_binlog_value(data) {
            panic!("{e}");
        }
    }
);
