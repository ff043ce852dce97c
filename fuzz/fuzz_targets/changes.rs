//! The change-list parser (Azure Get Page Ranges XML, JSON lists and documents, `diff --json`
//! output) must return an error, never panic, on any input; what it accepts must be a valid
//! list (sorted, non-overlapping, no end past 2^64 or past the size it names) that plans a
//! backup without panicking either.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::changes::{parse_xml_page, ChangeList};

fuzz_target!(|data: &[u8]| {
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
        end = r.offset.checked_add(r.len).expect("validated ranges do not overflow");
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
});
