//! The manifest reader must return an error, never panic, on any input: opening it, and
//! reading its segments back.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::manifest(data));
