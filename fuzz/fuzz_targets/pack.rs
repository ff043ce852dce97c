//! The pack footer, table and record decoders must return an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::format::pack::{decode_footer, decode_record, decode_table, PACK_FOOTER_LEN};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if data.len() >= PACK_FOOTER_LEN {
        let (body, footer) = data.split_at(data.len() - PACK_FOOTER_LEN);
        if let Ok(f) = decode_footer(footer, len, "fuzz") {
            let start = f.table_offset as usize;
            if let Some(table) = body.get(start..) {
                if let Ok(entries) = decode_table(table, &f, "fuzz") {
                    for e in entries {
                        let s = e.offset as usize;
                        let end = s.saturating_add(e.record_len() as usize);
                        if let Some(rec) = data.get(s..end) {
                            let _ = decode_record(rec, &e.location(), "fuzz");
                        }
                    }
                }
            }
        }
    }
});
