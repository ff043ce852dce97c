//! Opening a sealed object (`nonce ‖ ciphertext ‖ tag`) must fail cleanly, never panic, on any
//! stored bytes and any associated data: the first byte picks the object kind, the next eight
//! the part, the rest is the stored object.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::sealed(data));
