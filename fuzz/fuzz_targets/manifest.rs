//! The manifest decoder must return an error, never panic, on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stackvault::format::manifest::Manifest::decode(data, "fuzz");
});
