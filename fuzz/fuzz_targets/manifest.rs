//! The manifest reader must return an error, never panic, on any input: opening it, and
//! reading its segments back.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = stackvault::format::manifest::Manifest::from_bytes(data, "fuzz") {
        for s in m.segments() {
            let _ = s;
        }
    }
});
