//! The index delta reader must return an error, never panic, whatever its compressed table
//! holds; an accepted delta lists as many chunks as it says.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::delta(data));
