//! The key object reader must return an error, never panic, on any input; a key object it
//! accepts must re-encode to the same bytes, and trying a password on it (Argon2id at the
//! parameters it records, bounded by the reader) must not panic either. Costs above the
//! cheap test parameters are skipped so that the fuzzer spends its time on parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::crypto::keyfile::{KdfParams, KeyObject};

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = KeyObject::decode(data, "fuzz") {
        assert_eq!(key.encode(), data);
        let cheap = KdfParams::INSECURE_TEST;
        if key.kdf.m_kib <= cheap.m_kib && key.kdf.t <= cheap.t && key.kdf.p <= cheap.p {
            let _ = key.unwrap(b"password", "fuzz");
        }
    }
});
