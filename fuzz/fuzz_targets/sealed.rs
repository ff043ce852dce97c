//! Opening a sealed object (`nonce ‖ ciphertext ‖ tag`) must fail cleanly, never panic, on any
//! stored bytes and any associated data: the first byte picks the object kind, the next eight
//! the part, the rest is the stored object.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::crypto::{MasterSecret, ObjectAd, ObjectKind, Protection, RepoKeys};

fuzz_target!(|data: &[u8]| {
    let keys = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [0x42; 32],
    ))));
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let kind = match kind % 6 {
        0 => ObjectKind::PackFrame,
        1 => ObjectKind::PackTable,
        2 => ObjectKind::Manifest,
        3 => ObjectKind::IndexDelta,
        4 => ObjectKind::Verification,
        _ => ObjectKind::VmSnapshot,
    };
    let Some((part, stored)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let ad = ObjectAd {
        kind,
        name: "fuzz",
        part: u64::from_le_bytes(*part),
    };
    // Random bytes never carry a valid tag (2^-128); a panic is the only finding.
    if let Ok(plain) = keys.open(&ad, stored, "fuzz", 0) {
        let again = keys.seal(&ad, plain.clone()).ok();
        assert!(again.is_some_and(|s| keys.open(&ad, &s, "fuzz", 0).ok() == Some(plain)));
    }
});
