//! The VHD reader (footer, dynamic header, BAT, bitmaps, locators) must return an error, never
//! panic, on any input, and must never allocate from an unchecked length.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::vhd(data));
