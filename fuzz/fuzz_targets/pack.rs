//! The pack header, footer, table and frame decoders must return an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::format::pack::{
    decode_footer, decode_frame_header, decode_frame_list, decode_header, decode_record,
    decode_table, frame_record_len, frames, FRAME_HEADER_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN,
    PACK_VERSION_V1,
};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Some(header) = data.get(..PACK_HEADER_LEN) else {
        return;
    };
    let version = decode_header(header, "fuzz").unwrap_or(2);
    if data.len() >= PACK_FOOTER_LEN {
        let (body, footer) = data.split_at(data.len() - PACK_FOOTER_LEN);
        if let Ok(f) = decode_footer(footer, len, "fuzz") {
            let start = f.table_offset as usize;
            if let Some(table) = body.get(start..) {
                if let Ok(entries) = decode_table(table, &f, "fuzz") {
                    for frame in frames(&entries) {
                        let first = frame[0];
                        let s = first.offset as usize;
                        if f.version != PACK_VERSION_V1 {
                            let n = frame.len() as u32;
                            let end = s.saturating_add(
                                frame_record_len(f.version, first.stored_len, n) as usize,
                            );
                            if let Some(rec) = data.get(s..end) {
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
                                let _ = decode_record(rec, &loc, "fuzz");
                            }
                        }
                    }
                }
            }
        }
    }
});
