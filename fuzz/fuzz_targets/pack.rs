//! The pack header, footer, table and frame decoders must return an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::format::pack::{
    decode_footer, decode_frame_header, decode_frame_list, decode_header, decode_record,
    decode_table, frame_record_len, frames, FRAME_HEADER_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN,
    PACK_VERSION_SEALED, PACK_VERSION_V1,
};
use stackvault::crypto::{MasterSecret, Protection, RepoKeys};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Some(header) = data.get(..PACK_HEADER_LEN) else {
        return;
    };
    let version = decode_header(header, "fuzz").unwrap_or(2);
    // Sealed packs (version 3) are read with a fixed key: the fuzzer cannot forge tags, but
    // every length check before and around the seal is exercised.
    let keys = if version == PACK_VERSION_SEALED {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes([7; 32]))))
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
                            let end = s.saturating_add(
                                frame_record_len(f.version, first.stored_len, n) as usize,
                            );
                            if let Some(rec) = data.get(s..end).filter(|r| r.len() >= FRAME_HEADER_LEN) {
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
});
