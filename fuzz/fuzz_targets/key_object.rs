//! The key object reader must return an error, never panic, on any input; a key object it
//! accepts must re-encode to the same bytes, and trying a password on it (Argon2id at the
//! parameters it records, bounded by the reader) must not panic either. Costs above the
//! cheap test parameters are skipped so that the fuzzer spends its time on parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::key_object(data));
