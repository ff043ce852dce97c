//! Unit tests of the VHD reader over in-memory images, including hostile ones: every damaged
//! image must give `Error::SourceDamaged` naming the file and the offset, never a panic.

use super::dynamic::{self, DynamicHeader, HEADER_LEN, HEADER_VERSION, UNALLOCATED};
use super::*;
use crate::format::vhd_footer::{
    self as footer, chs_geometry, DiskType, Footer, FILE_FORMAT_VERSION, NO_DATA_OFFSET,
};

const LOC: &str = "mem.vhd";
const BAT_AT: usize = 1536;

fn footer(disk_type: DiskType, size: u64, id: u8) -> Footer {
    Footer {
        features: 2,
        version: FILE_FORMAT_VERSION,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            512
        },
        timestamp: 1,
        creator_app: *b"test",
        creator_version: 0x0001_0000,
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: chs_geometry(size),
        disk_type,
        unique_id: [id; 16],
        saved_state: 0,
    }
}

/// Sample disk content: pseudo-random blocks with all-zero blocks in between.
fn disk(size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    blake3::Hasher::new()
        .update(b"vhd test disk")
        .finalize_xof()
        .fill(&mut d);
    // Leave every third 4 KiB block... zero in blocks of 8 KiB granularity.
    for (i, c) in d.chunks_mut(8192).enumerate() {
        if i % 3 == 1 {
            c.fill(0);
        }
    }
    d
}

/// A dynamic (or, with a parent id, differencing) VHD of `data`: a block is allocated when
/// `present` says some sector of it is, and its bitmap has exactly those sectors.
fn build(
    data: &[u8],
    block: u32,
    parent: Option<[u8; 16]>,
    id: u8,
    present: &dyn Fn(u64) -> bool,
) -> Vec<u8> {
    let size = data.len() as u64;
    let bs = u64::from(block);
    let blocks = size.div_ceil(bs);
    let bmp = dynamic::bitmap_len(block);
    let bat_len = (blocks * 4).next_multiple_of(512);
    let mut out = vec![0u8; BAT_AT + bat_len as usize];
    let mut bat = Vec::new();
    for b in 0..blocks {
        let sectors: Vec<u64> = (b * bs / 512..((b + 1) * bs).min(size) / 512)
            .filter(|&s| present(s))
            .collect();
        if sectors.is_empty() {
            bat.push(UNALLOCATED);
            continue;
        }
        bat.push((out.len() / 512) as u32);
        let start = out.len();
        out.resize(start + (bmp + bs) as usize, 0);
        for s in sectors {
            let i = (s - b * bs / 512) as usize;
            out[start + i / 8] |= 0x80 >> (i % 8);
            let from = (s * 512) as usize;
            let to = start + bmp as usize + i * 512;
            out[to..to + 512].copy_from_slice(&data[from..from + 512]);
        }
    }
    for (i, e) in bat.iter().enumerate() {
        out[BAT_AT + 4 * i..BAT_AT + 4 * i + 4].copy_from_slice(&e.to_be_bytes());
    }
    for i in bat.len() * 4..bat_len as usize {
        out[BAT_AT + i] = 0xff;
    }
    let header = DynamicHeader {
        table_offset: BAT_AT as u64,
        version: HEADER_VERSION,
        max_table_entries: blocks as u32,
        block_size: block,
        parent_unique_id: parent.unwrap_or([0; 16]),
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Vec::new(),
    };
    out[512..512 + HEADER_LEN].copy_from_slice(&header.encode());
    let kind = if parent.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let f = footer(kind, size, id).encode();
    out[..512].copy_from_slice(&f);
    out.extend_from_slice(&f);
    out
}

fn fixed(data: &[u8], id: u8) -> Vec<u8> {
    let mut out = data.to_vec();
    out.extend_from_slice(&footer(DiskType::Fixed, data.len() as u64, id).encode());
    out
}

fn nonzero_sectors(data: &[u8]) -> impl Fn(u64) -> bool + '_ {
    move |s| {
        data[(s * 512) as usize..(s * 512 + 512) as usize]
            .iter()
            .any(|&b| b != 0)
    }
}

fn read_all<R: ReadAt>(d: &VhdDisk<R>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; d.top().virtual_size() as usize];
    // Odd-sized pieces at odd offsets exercise the run splitting.
    let mut pos = 0;
    while pos < buf.len() {
        let n = 70_001.min(buf.len() - pos);
        d.read_virtual(pos as u64, &mut buf[pos..pos + n])?;
        pos += n;
    }
    Ok(buf)
}

fn open(bytes: &[u8]) -> Result<VhdDisk<&[u8]>> {
    VhdDisk::from_chain(vec![VhdImage::open(bytes, LOC)?])
}

/// The (offset, what) of a SourceDamaged error naming our file; panics on anything else.
fn corrupt<T: std::fmt::Debug>(r: Result<T>) -> (u64, String) {
    match r {
        Err(Error::SourceDamaged {
            source_name,
            offset,
            what,
        }) => {
            assert_eq!(source_name, LOC);
            (offset, what)
        }
        other => panic!("expected SourceDamaged, got {other:?}"),
    }
}

fn set_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn refresh_header_checksum(img: &mut [u8]) {
    let h = &mut img[512..512 + HEADER_LEN];
    let sum = footer::checksum(h, dynamic::off::CHECKSUM);
    set_be32(h, dynamic::off::CHECKSUM, sum);
}

fn refresh_footers(img: &mut [u8]) {
    let end = img.len() - 512;
    for at in [0, end] {
        let f = &mut img[at..at + 512];
        let sum = footer::checksum(f, footer::off::CHECKSUM);
        set_be32(f, footer::off::CHECKSUM, sum);
    }
}

#[test]
fn fixed_dynamic_and_raw_read_the_same() -> Result<()> {
    let data = disk(5 << 20);
    let f = fixed(&data, 1);
    let fd = open(&f)?;
    assert_eq!(read_all(&fd)?, data);
    let dy = build(&data, 1 << 20, None, 2, &nonzero_sectors(&data));
    let dd = open(&dy)?;
    assert_eq!(read_all(&dd)?, data);
    assert_eq!(dd.info().format.as_str(), "vhd-dynamic");
    assert_eq!(fd.info().vhd.map(|v| v.disk_type), Some(DiskType::Fixed));
    // Zero sectors were left out of the bitmap: they are holes, never read.
    let ext = dd.extents(0, data.len() as u64)?;
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), data.len() as u64);
    for e in &ext {
        let bytes = &data[e.offset as usize..(e.offset + e.len) as usize];
        if e.kind == ExtentKind::Zero {
            assert!(bytes.iter().all(|&b| b == 0));
        } else {
            // Data extents are exactly the non-zero 8 KiB pieces: never a zero sector.
            assert!(bytes.chunks(512).all(|s| s.iter().any(|&b| b != 0)));
        }
    }
    Ok(())
}

#[test]
fn unallocated_blocks_are_zero_extents() -> Result<()> {
    let mut data = disk(4 << 20);
    data[(1 << 20)..(3 << 20)].fill(0);
    let dy = build(&data, 1 << 20, None, 2, &nonzero_sectors(&data));
    let d = open(&dy)?;
    let ext = d.extents(1 << 20, 2 << 20)?;
    assert_eq!(
        ext,
        vec![SourceExtent {
            offset: 1 << 20,
            len: 2 << 20,
            kind: ExtentKind::Zero
        }]
    );
    Ok(())
}

#[test]
fn cleared_bitmap_bit_reads_zero() -> Result<()> {
    let data = disk(1 << 20);
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    // Sector 0 is present with data; clear its bit: it must read as zeros now.
    let block_at = u32::from_be_bytes([dy[BAT_AT], dy[BAT_AT + 1], dy[BAT_AT + 2], dy[BAT_AT + 3]])
        as usize
        * 512;
    dy[block_at] &= 0x7f;
    let d = open(&dy)?;
    let got = read_all(&d)?;
    assert!(got[..512].iter().all(|&b| b == 0));
    assert_eq!(got[512..], data[512..]);
    assert_eq!(d.extents(0, 4096)?[0].kind, ExtentKind::Zero);
    Ok(())
}

#[test]
fn differencing_chain_merges_and_checks_parent_id() -> Result<()> {
    let base = disk(3 << 20);
    let mut child = base.clone();
    child[100_000..300_000].fill(7);
    child[(2 << 20) + 512..(2 << 20) + 1024].fill(0);
    let changed = |s: u64| {
        let r = (s * 512) as usize..(s * 512 + 512) as usize;
        child[r.clone()] != base[r]
    };
    let p = build(&base, 1 << 20, None, 1, &nonzero_sectors(&base));
    let c = build(&child, 1 << 20, Some([1; 16]), 2, &changed);
    let d = VhdDisk::from_chain(vec![
        VhdImage::open(&c[..], LOC)?,
        VhdImage::open(&p[..], "p")?,
    ])?;
    assert_eq!(read_all(&d)?, child);
    let info = d.vhd_info();
    assert_eq!(info.disk_type, DiskType::Differencing);
    assert_eq!(info.parents.len(), 1);
    // The wrong parent.
    let other = build(&base, 1 << 20, None, 9, &|_| true);
    let r = VhdDisk::from_chain(vec![
        VhdImage::open(&c[..], LOC)?,
        VhdImage::open(&other[..], "p")?,
    ]);
    let (offset, what) = corrupt(r);
    assert_eq!(offset, 512 + dynamic::off::PARENT_UNIQUE_ID as u64);
    assert!(what.contains("parent unique id"), "{what}");
    // A child that is its own ancestor.
    let loop_child = build(&child, 1 << 20, Some([2; 16]), 2, &changed);
    let r = VhdDisk::from_chain(vec![
        VhdImage::open(&loop_child[..], LOC)?,
        VhdImage::open(&loop_child[..], LOC)?,
    ]);
    assert!(corrupt(r).1.contains("cycle"));
    // No parent at all.
    assert!(matches!(
        VhdDisk::from_chain(vec![VhdImage::open(&c[..], LOC)?]),
        Err(Error::InvalidArgument(_))
    ));
    Ok(())
}

#[test]
fn bad_cookie_is_corrupt_at_the_footer() {
    let mut f = fixed(&disk(1 << 20), 1);
    let end = f.len() - 512;
    f[end] = b'X';
    let (offset, what) = corrupt(open(&f));
    assert_eq!(offset, end as u64);
    assert!(what.contains("cookie"), "{what}");
    // A dynamic header with a bad cookie.
    let data = disk(1 << 20);
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    dy[512] = b'X';
    let (offset, what) = corrupt(open(&dy));
    assert_eq!(offset, 512);
    assert!(what.contains("cxsparse"), "{what}");
}

#[test]
fn bad_checksum_warns_but_insane_sizes_refuse() -> Result<()> {
    let data = disk(1 << 20);
    let mut f = fixed(&data, 1);
    let end = f.len() - 512;
    f[end + 100] ^= 1; // reserved byte: only the checksum notices
    let d = open(&f)?;
    assert_eq!(read_all(&d)?, data);
    let warnings = d.vhd_info().warnings;
    assert!(warnings
        .iter()
        .any(|w| w.contains("checksum") && w.contains(LOC)));
    // Same bad checksum, and a current size the file cannot hold.
    f[end + footer::off::CURRENT_SIZE..end + footer::off::CURRENT_SIZE + 8]
        .copy_from_slice(&(2u64 << 20).to_be_bytes());
    let (offset, what) = corrupt(open(&f));
    assert_eq!(offset, (end + footer::off::CURRENT_SIZE) as u64);
    assert!(
        what.contains("cut short") && what.contains("checksum"),
        "{what}"
    );
    // Absurd size with a valid checksum.
    f[end + footer::off::CURRENT_SIZE..end + footer::off::CURRENT_SIZE + 8]
        .copy_from_slice(&u64::MAX.to_be_bytes());
    let sum = footer::checksum(&f[end..], footer::off::CHECKSUM);
    set_be32(&mut f, end + footer::off::CHECKSUM, sum);
    let (_, what) = corrupt(open(&f));
    assert!(what.contains("absurd"), "{what}");
    Ok(())
}

#[test]
fn absurd_dynamic_sizes_never_allocate() {
    let data = disk(1 << 20);
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    // 60 TiB in 512-byte blocks: 2^37 BAT entries, must be refused before any allocation.
    let size: u64 = 60 << 40;
    for at in [0, dy.len() - 512] {
        dy[at + footer::off::CURRENT_SIZE..at + footer::off::CURRENT_SIZE + 8]
            .copy_from_slice(&size.to_be_bytes());
    }
    set_be32(&mut dy, 512 + dynamic::off::BLOCK_SIZE, 512);
    set_be32(&mut dy, 512 + dynamic::off::MAX_TABLE_ENTRIES, u32::MAX);
    refresh_header_checksum(&mut dy);
    refresh_footers(&mut dy);
    let (offset, what) = corrupt(open(&dy));
    assert_eq!(offset, 512 + dynamic::off::MAX_TABLE_ENTRIES as u64);
    assert!(what.contains("absurd"), "{what}");
    // A plausible size but a BAT said to hold far more entries than the file has room for.
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    for at in [0, dy.len() - 512] {
        dy[at + footer::off::CURRENT_SIZE..at + footer::off::CURRENT_SIZE + 8]
            .copy_from_slice(&(1u64 << 40).to_be_bytes());
    }
    set_be32(&mut dy, 512 + dynamic::off::MAX_TABLE_ENTRIES, 1 << 20);
    refresh_header_checksum(&mut dy);
    refresh_footers(&mut dy);
    let (offset, what) = corrupt(open(&dy));
    assert_eq!(offset, 512 + dynamic::off::TABLE_OFFSET as u64);
    assert!(what.contains("past the end"), "{what}");
}

#[test]
fn block_size_not_a_power_of_two() {
    let data = disk(1 << 20);
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    set_be32(&mut dy, 512 + dynamic::off::BLOCK_SIZE, 3 << 19);
    refresh_header_checksum(&mut dy);
    let (offset, what) = corrupt(open(&dy));
    assert_eq!(offset, 512 + dynamic::off::BLOCK_SIZE as u64);
    assert!(what.contains("power of two"), "{what}");
}

#[test]
fn bat_entry_past_end_and_over_metadata() {
    let data = disk(2 << 20);
    let dy = build(&data, 1 << 20, None, 2, &|_| true);
    let mut bad = dy.clone();
    set_be32(&mut bad, BAT_AT + 4, 0x00ff_ffff);
    let (offset, what) = corrupt(open(&bad));
    assert_eq!(offset, BAT_AT as u64 + 4);
    assert!(what.contains("past the end"), "{what}");
    let mut bad = dy.clone();
    set_be32(&mut bad, BAT_AT, 1); // sector 1: the dynamic header
    let (offset, what) = corrupt(open(&bad));
    assert_eq!(offset, BAT_AT as u64);
    assert!(what.contains("dynamic header"), "{what}");
}

#[test]
fn overlapping_blocks() {
    let data = disk(2 << 20);
    let mut dy = build(&data, 1 << 20, None, 2, &|_| true);
    let first = u32::from_be_bytes([dy[BAT_AT], dy[BAT_AT + 1], dy[BAT_AT + 2], dy[BAT_AT + 3]]);
    set_be32(&mut dy, BAT_AT + 4, first + 8);
    let (offset, what) = corrupt(open(&dy));
    assert_eq!(offset, BAT_AT as u64 + 4);
    assert!(what.contains("overlap"), "{what}");
}

#[test]
fn truncated_files_fail_cleanly_at_every_length() -> Result<()> {
    let data = disk(2 << 20);
    let dy = build(&data, 1 << 20, None, 2, &nonzero_sectors(&data));
    let f = fixed(&data, 1);
    for img in [&dy, &f] {
        for cut in (0..img.len())
            .step_by(4099)
            .chain([img.len() - 1, 511, 512])
        {
            let part = &img[..cut];
            // Either a clean error, or a disk that reads completely and correctly: only a
            // file missing the footer's last byte (a 511-byte footer) is whole. A dynamic file
            // cut after its last block still has its footer copy at offset 0, but it lost its
            // end and is refused.
            match open(part) {
                Ok(d) => {
                    assert_eq!(cut, img.len() - 1, "cut at {cut} was accepted");
                    assert_eq!(read_all(&d)?, data, "cut at {cut}");
                }
                Err(e) => assert!(matches!(e, Error::SourceDamaged { .. }), "{e:?}"),
            }
        }
    }
    // Cut exactly after the last block of a dynamic disk: refused, naming the lost end.
    let (_, what) = corrupt(open(&dy[..dy.len() - 512]));
    assert!(what.contains("lost its end"), "{what}");
    // Cut in the middle of the last block: the BAT points past the end.
    let (_, what) = corrupt(open(&dy[..dy.len() - 4096]));
    assert!(
        what.contains("past the end") && what.contains("lost its end"),
        "{what}"
    );
    Ok(())
}

#[test]
fn short_footers() -> Result<()> {
    // Pre-2004 Virtual PC: the footer is 511 bytes.
    let data = disk(1 << 20);
    let mut f = fixed(&data, 1);
    f.pop();
    let d = open(&f)?;
    assert_eq!(d.top().footer_len, 511);
    assert_eq!(read_all(&d)?, data);
    // A 511-byte file of anything else, and files shorter than any footer.
    let (offset, what) = corrupt(open(&[0u8; 511]));
    assert_eq!(offset, 0);
    assert!(what.contains("cookie"), "{what}");
    let (_, what) = corrupt(open(&[0u8; 100]));
    assert!(what.contains("too small"), "{what}");
    Ok(())
}

#[test]
fn fixed_footer_only_at_offset_zero_is_not_a_vhd() {
    // "conectix" in the first sector of a raw disk does not make a fixed VHD.
    let mut raw = disk(1 << 20);
    raw[..512].copy_from_slice(&footer(DiskType::Fixed, 1 << 20, 1).encode());
    assert!(corrupt(open(&raw)).1.contains("no VHD footer"));
}

#[test]
fn fixed_footer_size_must_match_the_file() {
    // One flipped bit in the size field: the checksum is wrong and the size smaller than the
    // file. Reading it would back up a disk of the wrong size.
    let data = disk(1 << 20);
    let mut f = fixed(&data, 1);
    let end = f.len() - 512;
    f[end + footer::off::CURRENT_SIZE + 5] ^= 0x08;
    let (offset, what) = corrupt(open(&f));
    assert_eq!(offset, (end + footer::off::CURRENT_SIZE) as u64);
    assert!(
        what.contains(&format!("{}", 1u64 << 20))
            && what.contains(&format!("{}", f.len()))
            && what.contains("checksum"),
        "{what}"
    );
    // The same smaller size with a valid checksum: still not the file's size.
    let mut g = fixed(&data, 1);
    g[end + footer::off::CURRENT_SIZE..end + footer::off::CURRENT_SIZE + 8]
        .copy_from_slice(&(440u64 << 10).to_be_bytes());
    refresh_end_footer(&mut g);
    let (_, what) = corrupt(open(&g));
    assert!(
        what.contains("450560") && what.contains("1049088"),
        "{what}"
    );
}

fn refresh_end_footer(img: &mut [u8]) {
    let end = img.len() - 512;
    let f = &mut img[end..];
    let sum = footer::checksum(f, footer::off::CHECKSUM);
    set_be32(f, footer::off::CHECKSUM, sum);
}

#[test]
fn damaged_end_footer_gives_way_to_the_copy() -> Result<()> {
    let data = disk(2 << 20);
    let good = build(&data, 1 << 20, None, 2, &nonzero_sectors(&data));
    let end = good.len() - 512;
    // A flipped bit in the trailing footer's size: its checksum is wrong, the copy is intact.
    let mut dy = good.clone();
    dy[end + footer::off::CURRENT_SIZE + 4] ^= 0x40;
    let d = open(&dy)?;
    assert_eq!(d.top().footer_at, 0);
    assert_eq!(d.virtual_size(), data.len() as u64);
    assert_eq!(read_all(&d)?, data);
    assert!(
        d.warnings()
            .iter()
            .any(|w| w.contains("copy at offset 0") && w.contains("damaged")),
        "{:?}",
        d.warnings()
    );
    // The trailing footer's cookie is gone: the copy again.
    let mut dy = good.clone();
    dy[end..end + 8].copy_from_slice(b"garbage!");
    let d = open(&dy)?;
    assert_eq!(read_all(&d)?, data);
    assert!(d.warnings().iter().any(|w| w.contains("copy at offset 0")));
    // Both damaged: refused (the trailing one's size cannot be trusted).
    let mut dy = good.clone();
    dy[end + footer::off::CURRENT_SIZE + 4] ^= 0x40;
    dy[footer::off::CURRENT_SIZE + 4] ^= 0x40;
    assert!(open(&dy).is_err());
    // Lost end and damaged copy.
    let mut dy = good[..end].to_vec();
    dy[100] ^= 1;
    let (_, what) = corrupt(open(&dy));
    assert!(what.contains("lost its end"), "{what}");
    // Lost both footers: the dynamic header at 512 still says what it was.
    let mut dy = good[..end].to_vec();
    dy[0] = b'X';
    assert_eq!(sniff(&dy[..]), Sniffed::Vhd);
    let (_, what) = corrupt(open(&dy));
    assert!(what.contains("starts like a dynamic VHD"), "{what}");
    Ok(())
}

#[test]
fn vhdx_is_unsupported() {
    let mut x = vec![0u8; 1 << 20];
    x[..8].copy_from_slice(b"vhdxfile");
    assert_eq!(sniff(&x[..]), Sniffed::Vhdx);
    match open(&x) {
        Err(Error::Unsupported { what }) => {
            assert!(
                what.contains("qemu-img convert -O vpc -o subformat=fixed"),
                "{what}"
            )
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
