//! The config loader (`omrs_core::config::check_config_text`): any text loads and validates, or
//! is refused with an error that names the file; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = omrs_core::config::check_config_text(text) {
        panic!("{e}");
    }
});
