//! The VHD reader (footer, dynamic header, BAT, bitmaps, locators) must return an error, never
//! panic, on any input, and must never allocate from an unchecked length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stackvault::source::vhd::{dynamic, DiskType, Place, VhdDisk, VhdImage};
use stackvault::source::DiskSource;

/// Virtual bytes walked per input: enough to cross blocks, small enough to stay fast.
const WALK: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
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
});
