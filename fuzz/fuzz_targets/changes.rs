//! The change-list parser (Azure Get Page Ranges XML, JSON lists and documents, `diff --json`
//! output) must return an error, never panic, on any input; what it accepts must be a valid
//! list (sorted, non-overlapping, no end past 2^64 or past the size it names) that plans a
//! backup without panicking either.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::changes(data));
