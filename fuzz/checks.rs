//! What each fuzz target checks, one function per decoder, shared by the cargo-fuzz targets
//! (`fuzz_targets/*.rs`, which only call these) and by the integration suite, which replays
//! every input of `corpus/` and deterministic mutations of it on every `cargo test`
//! (`tests/fuzz_corpus.rs`). Each function takes arbitrary bytes; a panic is a finding, and
//! the asserts state what an accepted input must satisfy.

/// The change-list parser (Azure Get Page Ranges XML, JSON lists and documents, `diff --json`
/// output) must return an error, never panic, on any input; what it accepts must be a valid
/// list (sorted, non-overlapping, no end past 2^64 or past the size it names) that plans a
/// backup without panicking either.
pub fn changes(data: &[u8]) {
    use stackvault::changes::{parse_xml_page, ChangeList};

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_xml_page(text, "fuzz");
    let Ok(list) = ChangeList::parse(text, "fuzz") else {
        return;
    };
    let mut end = 0u64;
    for r in list.ranges() {
        assert!(r.len > 0 && r.offset >= end, "{list:?}");
        end = r
            .offset
            .checked_add(r.len)
            .expect("validated ranges do not overflow");
        if let Some(size) = list.disk_size() {
            assert!(end <= size);
        }
    }
    // Plan against a disk the list fits and one it may not: an error or a plan, never a panic.
    for size in [list.disk_size().unwrap_or(end), 1 << 20] {
        let size = size.min(1 << 40);
        if let Ok(plan) = list.plan(size, size, 4 << 20) {
            assert_eq!(plan.len() as u64, size.div_ceil(4 << 20));
            for (s, e) in list.changed_blocks(size) {
                assert!(s < e && e <= size);
            }
        }
    }
}

/// The key object reader must return an error, never panic, on any input; a key object it
/// accepts must re-encode to the same bytes, and trying a password on it (Argon2id at the
/// parameters it records, bounded by the reader) must not panic either. Costs above the
/// cheap test parameters are skipped so that the fuzzer spends its time on parsing.
pub fn key_object(data: &[u8]) {
    use stackvault::crypto::keyfile::{KdfParams, KeyObject};

    if let Ok(key) = KeyObject::decode(data, "fuzz") {
        assert_eq!(key.encode(), data);
        let cheap = KdfParams::INSECURE_TEST;
        if key.kdf.m_kib <= cheap.m_kib && key.kdf.t <= cheap.t && key.kdf.p <= cheap.p {
            let _ = key.unwrap(b"password", "fuzz");
        }
    }
}

/// The manifest reader must return an error, never panic, on any input: opening it, and
/// reading its segments back.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = stackvault::format::manifest::Manifest::from_bytes(data, "fuzz") {
        for s in m.segments() {
            let _ = s;
        }
    }
}

/// The index delta reader must return an error, never panic, on any input, whatever its
/// compressed table holds (zstd data from the store). The input's crc is set right and it is
/// read under the key its bytes 16..32 name, so that mutations reach the header fields and the
/// table instead of stopping at the checksum or the name; pack version 3 tables are sealed
/// again and opened with a fixed key. An accepted delta lists exactly the chunks it counts.
pub fn delta(data: &[u8]) {
    use stackvault::crypto::{MasterSecret, Protection, RepoKeys};
    use stackvault::index::delta::{decode_delta, delta_key};

    let mut d = data.to_vec();
    let Some(body) = d.len().checked_sub(4) else {
        return;
    };
    let crc = crc32fast::hash(&d[..body]);
    d[body..].copy_from_slice(&crc.to_le_bytes());
    let name = d
        .get(16..32)
        .map(stackvault::format::hex)
        .unwrap_or_default();
    let key = delta_key(&name);
    let sealed = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [7; 32],
    ))));
    for p in [Protection::Plain, sealed] {
        if let Ok(delta) = decode_delta(&d, &key, &p) {
            let count = d
                .get(48..52)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            assert_eq!(Some(delta.entries.len() as u32), count);
        }
    }
}

/// The pack header, footer, table and frame decoders must return an error, never panic.
pub fn pack(data: &[u8]) {
    use stackvault::crypto::{MasterSecret, Protection, RepoKeys};
    use stackvault::format::pack::{
        decode_footer, decode_frame_header, decode_frame_list, decode_header, decode_record,
        decode_table, frame_record_len, frames, FRAME_HEADER_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN,
        PACK_VERSION_SEALED, PACK_VERSION_V1,
    };

    let len = data.len() as u64;
    let Some(header) = data.get(..PACK_HEADER_LEN) else {
        return;
    };
    let version = decode_header(header, "fuzz").unwrap_or(2);
    // Sealed packs (version 3) are read with a fixed key: the fuzzer cannot forge tags, but
    // every length check before and around the seal is exercised.
    let keys = if version == PACK_VERSION_SEALED {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [7; 32],
        ))))
    } else {
        Protection::Plain
    };
    if data.len() >= PACK_FOOTER_LEN {
        let (body, footer) = data.split_at(data.len() - PACK_FOOTER_LEN);
        if let Ok(f) = decode_footer(footer, len, "fuzz") {
            let start = f.table_offset as usize;
            if let Some(table) = body.get(start..) {
                if let Ok(entries) = decode_table(table, &f, &keys, "fuzz", "fuzz") {
                    for frame in frames(&entries) {
                        let first = frame[0];
                        let s = first.offset as usize;
                        if f.version != PACK_VERSION_V1 && f.version != PACK_VERSION_SEALED {
                            let n = frame.len() as u32;
                            let end =
                                s.saturating_add(
                                    frame_record_len(f.version, first.stored_len, n) as usize
                                );
                            if let Some(rec) =
                                data.get(s..end).filter(|r| r.len() >= FRAME_HEADER_LEN)
                            {
                                if let Ok(h) =
                                    decode_frame_header(&rec[..FRAME_HEADER_LEN], 0, "fuzz")
                                {
                                    let at = FRAME_HEADER_LEN + h.stored_len as usize;
                                    if let Some(list) = rec.get(at..) {
                                        let _ = decode_frame_list(list, &h, 0, "fuzz");
                                    }
                                }
                            }
                        }
                        for e in frame {
                            let loc = e.location(version);
                            let end = s.saturating_add(loc.read_len() as usize);
                            if let Some(rec) = data.get(s..end) {
                                let _ = decode_record(rec, &loc, &keys, "fuzz", "fuzz");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Opening a sealed object (`nonce ‖ ciphertext ‖ tag`) must fail cleanly, never panic, on any
/// stored bytes and any associated data: the first byte picks the object kind, the next eight
/// the part, the rest is the stored object.
pub fn sealed(data: &[u8]) {
    use stackvault::crypto::{MasterSecret, ObjectAd, ObjectKind, Protection, RepoKeys};

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
}

/// The VHD reader (footer, dynamic header, BAT, bitmaps, locators) must return an error, never
/// panic, on any input, and must never allocate from an unchecked length.
pub fn vhd(data: &[u8]) {
    use stackvault::source::vhd::{dynamic, DiskType, Place, VhdDisk, VhdImage};
    use stackvault::source::DiskSource;

    /// Virtual bytes walked per input: enough to cross blocks, small enough to stay fast.
    const WALK: u64 = 16 << 20;

    let Ok(image) = VhdImage::open(data, "fuzz") else {
        return;
    };
    let size = image.virtual_size().min(WALK);
    if let Some(d) = &image.dynamic {
        for l in &d.header.locators {
            if l.data_length <= dynamic::MAX_LOCATOR_LEN {
                let mut buf = vec![0u8; l.data_length as usize];
                if image.read(&mut buf, l.data_offset, "locator").is_ok() {
                    let _ = dynamic::locator_path(&l.code, &buf);
                }
            }
        }
    }
    if image.footer.disk_type == DiskType::Differencing {
        // No parent in memory: walk the child's own map and read what it holds.
        let mut places = Vec::new();
        if image.map(0, size, &mut places).is_ok() {
            let mut buf = vec![0u8; 4096];
            for (n, p) in places {
                if let Place::Here(at) = p {
                    let k = (n as usize).min(buf.len());
                    let _ = image.read(&mut buf[..k], at, "data");
                }
            }
        }
        return;
    }
    let Ok(disk) = VhdDisk::from_chain(vec![image]) else {
        return;
    };
    let _ = disk.info();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(buf.len() as u64);
        let Ok(extents) = disk.extents(pos, len) else {
            return;
        };
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), len);
        if disk.read_at(pos, &mut buf[..len as usize]).is_err() {
            return;
        }
        pos += len;
    }
}
