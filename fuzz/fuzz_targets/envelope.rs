//! The envelope decoders (`omrs_transform::event::check_envelope`): a site-topic record as the
//! transform reads it, as a `ChangeEvent`, and as an `omrs.hq.changes` record. No panic; what
//! is accepted is written back as JSON that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = omrs_transform::event::check_envelope(data) {
        panic!("{e}");
    }
});
