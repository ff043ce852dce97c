//! One VHD file: its footer, and for dynamic and differencing disks the header, the block
//! allocation table (BAT) and the per-block sector bitmaps.
//!
//! Opening validates everything whose damage could make a later read wrong or expensive:
//! the footer is found (last 512 bytes, last 511 for pre-2004 files, or the copy at offset 0),
//! sizes are bounded, the BAT lies inside the file and every allocated block lies inside the
//! file, clear of the metadata and of every other block. Nothing is allocated from a length
//! before that length is checked against the file's size and a fixed bound. After opening,
//! [`VhdImage::map`] tells for each range of the virtual disk where its bytes are in this file,
//! whether they read as zeros, or whether a differencing disk leaves them to its parent.

use super::dynamic::{bitmap_len, DynamicHeader, HEADER_COOKIE, HEADER_LEN, UNALLOCATED};
use super::footer::{
    be_u32, checksum, off, DiskType, Footer, FOOTER_COOKIE, FOOTER_LEN, NO_DATA_OFFSET, SECTOR,
    SHORT_FOOTER_LEN,
};
use super::io::ReadAt;
use crate::error::{Error, Result};

/// Largest virtual size accepted (64 TiB): beyond any VHD a hypervisor makes (the format's
/// own limit is 2040 GiB for dynamic disks), small enough that no size computation overflows.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Most BAT entries read (64 MiB of table): 32 TiB at 2 MiB blocks.
pub const MAX_BAT_ENTRIES: u64 = 16 << 20;

/// Where a range of the virtual disk is, as far as one image knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// In this file at this offset.
    Here(u64),
    /// Reads as zeros.
    Zero,
    /// Not in this differencing disk: ask the parent.
    Parent,
}

/// The dynamic part of an image.
#[derive(Debug)]
pub struct Dynamic {
    pub header: DynamicHeader,
    pub header_at: u64,
    /// Block start offsets in the file, one per block of the virtual disk (`UNALLOCATED`
    /// entries kept as `None`).
    pub blocks: Vec<Option<u64>>,
    pub bitmap_len: u64,
}

/// An opened, validated VHD file.
#[derive(Debug)]
pub struct VhdImage<R> {
    pub reader: R,
    pub location: String,
    pub footer: Footer,
    /// Where the footer used was found, and its length (511 or 512).
    pub footer_at: u64,
    pub footer_len: usize,
    pub dynamic: Option<Dynamic>,
    /// Tolerated irregularities, as sentences naming the file.
    pub warnings: Vec<String>,
}

/// Signature at offset 0 of a VHDX file (its file type identifier).
pub const VHDX_SIGNATURE: [u8; 8] = *b"vhdxfile";

/// What a file's content says it is, for `--format auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// A VHD, or what is left of one: a footer cookie at the end or at offset 0, or a dynamic
    /// header at offset 512 (a dynamic VHD that lost both footers).
    Vhd,
    /// A VHDX file (`vhdxfile` at offset 0), which this build cannot read.
    Vhdx,
    /// Anything else: a raw disk.
    Other,
}

/// Tells a VHD, a VHDX and anything else apart by their signatures.
pub fn sniff<R: ReadAt + ?Sized>(reader: &R) -> Sniffed {
    let mut sig = [0u8; 8];
    let mut at = |o: u64, want: &[u8; 8]| reader.read_exact_at(&mut sig, o).is_ok() && &sig == want;
    if at(0, &VHDX_SIGNATURE) {
        return Sniffed::Vhdx;
    }
    if has_vhd_cookie(reader) || at(FOOTER_LEN as u64, &HEADER_COOKIE) {
        return Sniffed::Vhd;
    }
    Sniffed::Other
}

/// The error for a VHDX file: what to do instead.
pub fn vhdx_unsupported(location: &str) -> Error {
    Error::unsupported(format!(
        "{location} is a VHDX file: VHDX is not supported; convert it with \
         `qemu-img convert -O vpc -o subformat=fixed {location} OUT.vhd` and back up OUT.vhd"
    ))
}

/// Returns true when `reader` has a VHD footer cookie at its end or start.
pub fn has_vhd_cookie<R: ReadAt + ?Sized>(reader: &R) -> bool {
    let size = reader.size();
    let mut cookie = [0u8; 8];
    let mut at = |o: u64| reader.read_exact_at(&mut cookie, o).is_ok() && cookie == FOOTER_COOKIE;
    (size >= FOOTER_LEN as u64 && (at(size - FOOTER_LEN as u64) || at(0)))
        || (size >= SHORT_FOOTER_LEN as u64 && at(size - SHORT_FOOTER_LEN as u64))
}

/// The footer an image is read with, and where its data must end.
struct Chosen {
    raw: [u8; FOOTER_LEN],
    /// Where this footer was read (0 for the copy).
    at: u64,
    len: usize,
    /// Data, header and blocks all end here: at the trailing footer's place, even when the
    /// copy at offset 0 is used because the trailing one is damaged.
    data_end: u64,
    /// No footer cookie at the end: the trailing footer is damaged or the file lost its end.
    end_missing: bool,
}

impl<R: ReadAt> VhdImage<R> {
    /// Reads `buf` at `offset`; running past the end is damage of `what`.
    pub fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        read_at(&self.reader, &self.location, buf, offset, what)
    }

    /// Opens and validates a VHD.
    pub fn open(reader: R, location: &str) -> Result<Self> {
        let size = reader.size();
        let loc = location;
        if size < SHORT_FOOTER_LEN as u64 {
            return Err(Error::source_damaged(
                loc,
                0,
                format!("file is {size} bytes, too small to hold a VHD footer"),
            ));
        }
        if sniff(&reader) == Sniffed::Vhdx {
            return Err(vhdx_unsupported(loc));
        }
        let mut warnings = Vec::new();
        let chosen = choose_footer(&reader, loc, &mut warnings)?;
        let (footer_at, footer_len, data_end) = (chosen.at, chosen.len, chosen.data_end);
        let end_missing = chosen.end_missing;
        let (footer, warn) = Footer::decode(&chosen.raw, loc, footer_at)?;
        let checksum_bad = warn.is_some();
        warnings.extend(warn);
        let insane = |offset: u64, what: String| {
            let what = if checksum_bad {
                format!("{what} (and the footer checksum is wrong)")
            } else {
                what
            };
            Error::source_damaged(loc, offset, what)
        };
        let size_at = footer_at + super::footer::off::CURRENT_SIZE as u64;
        if footer.current_size > MAX_VIRTUAL_SIZE {
            return Err(insane(
                size_at,
                format!(
                    "current size {} is absurd (limit {MAX_VIRTUAL_SIZE})",
                    footer.current_size
                ),
            ));
        }
        let mut image = VhdImage {
            reader,
            location: loc.to_string(),
            footer,
            footer_at,
            footer_len,
            dynamic: None,
            warnings,
        };
        match image.footer.disk_type {
            DiskType::Fixed => {
                if footer_at == 0 && size > FOOTER_LEN as u64 {
                    // A fixed disk has no copy at the start: "conectix" there is guest data.
                    return Err(Error::source_damaged(
                        loc,
                        size.saturating_sub(FOOTER_LEN as u64),
                        "no VHD footer at the end of the file, only a fixed-disk footer at \
                         offset 0 (guest data, or a fixed VHD that lost its end); pass \
                         --format raw to back up the file as a raw disk",
                    ));
                }
                // A fixed disk is its data followed by the footer: any other length means the
                // file or the footer's size field is damaged, and reading it would back up a
                // disk of the wrong size.
                if image.footer.current_size != data_end {
                    return Err(insane(
                        size_at,
                        format!(
                            "fixed VHD footer says the disk is {} bytes, but the file is {size} \
                             bytes: {data_end} bytes of data before its {footer_len}-byte footer; \
                             the file was cut short or extended, or the footer is damaged",
                            image.footer.current_size
                        ),
                    ));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let dynamic = image.open_dynamic(data_end, checksum_bad);
                let dynamic = match dynamic {
                    Err(Error::SourceDamaged {
                        source_name,
                        offset,
                        what,
                    }) if end_missing => {
                        return Err(Error::SourceDamaged {
                            source_name,
                            offset,
                            what: format!(
                                "{what}; the file has no VHD footer at its end: it lost its end \
                                 (an interrupted copy or export?); copy or export it again"
                            ),
                        })
                    }
                    other => other?,
                };
                image.dynamic = Some(dynamic);
            }
        }
        Ok(image)
    }

    fn open_dynamic(&mut self, data_end: u64, checksum_bad: bool) -> Result<Dynamic> {
        let loc = self.location.clone();
        let loc = loc.as_str();
        let header_at = self.footer.data_offset;
        let data_offset_at = self.footer_at + super::footer::off::DATA_OFFSET as u64;
        if header_at == NO_DATA_OFFSET
            || header_at
                .checked_add(HEADER_LEN as u64)
                .is_none_or(|e| e > data_end)
        {
            return Err(Error::source_damaged(
                loc,
                data_offset_at,
                format!("dynamic header offset {header_at:#x} lies outside the file"),
            ));
        }
        let mut hb = [0u8; HEADER_LEN];
        self.read(&mut hb, header_at, "dynamic header")?;
        let (header, warn) = DynamicHeader::decode(&hb, loc, header_at)?;
        self.warnings.extend(warn);
        let bs = u64::from(header.block_size);
        let current = self.footer.current_size;
        let needed = current.div_ceil(bs);
        let entries_at = header_at + super::dynamic::off::MAX_TABLE_ENTRIES as u64;
        if needed > MAX_BAT_ENTRIES {
            return Err(Error::source_damaged(
                loc,
                entries_at,
                format!("{needed} blocks of {bs} bytes is absurd (limit {MAX_BAT_ENTRIES})"),
            ));
        }
        if u64::from(header.max_table_entries) < needed {
            let mut what = format!(
                "BAT has {} entries, the current size {current} needs {needed}",
                header.max_table_entries
            );
            if checksum_bad {
                what.push_str(" (and the footer checksum is wrong)");
            }
            return Err(Error::source_damaged(loc, entries_at, what));
        }
        let table_at = header.table_offset;
        let table_len = needed * 4;
        if table_at.checked_add(table_len).is_none_or(|e| e > data_end) {
            return Err(Error::source_damaged(
                loc,
                header_at + super::dynamic::off::TABLE_OFFSET as u64,
                format!(
                    "BAT at {table_at:#x} ({table_len} bytes) extends past the end of the file"
                ),
            ));
        }
        // Bounded above: needed <= MAX_BAT_ENTRIES and the table lies inside the file.
        let mut table = vec![0u8; table_len as usize];
        self.read(&mut table, table_at, "BAT")?;
        let bmp = bitmap_len(header.block_size);
        // Metadata regions no block may overlap.
        let meta: [(u64, u64, &str); 3] = [
            (0, FOOTER_LEN as u64, "the footer copy"),
            (
                header_at,
                header_at + HEADER_LEN as u64,
                "the dynamic header",
            ),
            (table_at, table_at + table_len, "the BAT"),
        ];
        let mut blocks = Vec::with_capacity(needed as usize);
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        for (i, e) in table.chunks_exact(4).enumerate() {
            let sector = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
            if sector == UNALLOCATED {
                blocks.push(None);
                continue;
            }
            let i = i as u64;
            let entry_at = table_at + 4 * i;
            let start = u64::from(sector) * SECTOR;
            // The last block may be cut short by the disk's end; its bytes beyond need not exist.
            let used = bs.min(current - i * bs);
            let end = start + bmp + used;
            if end > data_end {
                return Err(Error::source_damaged(
                    loc,
                    entry_at,
                    format!(
                        "BAT entry {i} puts a block at {start:#x}..{end:#x}, past the end of the \
                         data ({data_end:#x})"
                    ),
                ));
            }
            if let Some((_, _, name)) = meta.iter().find(|(s, e, _)| start < *e && *s < end) {
                return Err(Error::source_damaged(
                    loc,
                    entry_at,
                    format!("BAT entry {i} puts a block at {start:#x} over {name}"),
                ));
            }
            spans.push((start, end, i));
            blocks.push(Some(start));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            let ((_, a_end, a), (b_start, _, b)) = (w[0], w[1]);
            if b_start < a_end {
                return Err(Error::source_damaged(
                    loc,
                    table_at + 4 * b,
                    format!("blocks {a} and {b} overlap at {b_start:#x}"),
                ));
            }
        }
        Ok(Dynamic {
            header,
            header_at,
            blocks,
            bitmap_len: bmp,
        })
    }

    /// Virtual size of this image.
    pub fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    /// Appends to `out` where each part of `[offset, offset + len)` is, in order, merging
    /// neighbours. Beyond the virtual size reads as zeros (a parent smaller than its child).
    pub fn map(&self, offset: u64, len: u64, out: &mut Vec<(u64, Place)>) -> Result<()> {
        let end = offset.saturating_add(len);
        let size = self.virtual_size();
        let mut pos = offset;
        let push = |n: u64, p: Place, out: &mut Vec<(u64, Place)>| {
            if n == 0 {
                return;
            }
            if let Some((last_len, last)) = out.last_mut() {
                let merged = match (*last, p) {
                    (Place::Here(a), Place::Here(b)) => a + *last_len == b,
                    (Place::Zero, Place::Zero) | (Place::Parent, Place::Parent) => true,
                    _ => false,
                };
                if merged {
                    *last_len += n;
                    return;
                }
            }
            out.push((n, p));
        };
        let Some(dynamic) = &self.dynamic else {
            let inside = end.min(size).saturating_sub(pos);
            push(inside, Place::Here(pos), out);
            push(end - pos - inside, Place::Zero, out);
            return Ok(());
        };
        let missing = if self.footer.disk_type == DiskType::Differencing {
            Place::Parent
        } else {
            Place::Zero
        };
        let bs = u64::from(dynamic.header.block_size);
        let mut bitmap = Vec::new();
        while pos < end {
            if pos >= size {
                push(end - pos, Place::Zero, out);
                break;
            }
            let block = pos / bs;
            let block_end = ((block + 1) * bs).min(end).min(size);
            let Some(Some(start)) = dynamic.blocks.get(block as usize).copied() else {
                push(block_end - pos, missing, out);
                pos = block_end;
                continue;
            };
            // Bounded by MAX_BLOCK_SIZE / 4096 (64 KiB), checked at open.
            bitmap.resize(dynamic.bitmap_len as usize, 0);
            self.read(&mut bitmap, start, "sector bitmap")?;
            let data = start + dynamic.bitmap_len;
            while pos < block_end {
                let in_block = pos - block * bs;
                let sector = in_block / SECTOR;
                let present = bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0;
                let run_end = ((sector + 1) * SECTOR + block * bs).min(block_end);
                let p = if present {
                    Place::Here(data + in_block)
                } else {
                    missing
                };
                push(run_end - pos, p, out);
                pos = run_end;
            }
        }
        Ok(())
    }
}

/// Reads `buf` at `offset` of `reader`; past the end is corruption of `what` in `location`.
pub fn read_at<R: ReadAt + ?Sized>(
    reader: &R,
    location: &str,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    reader.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::source_damaged(
                location,
                offset,
                format!(
                    "truncated file: {what} ({} bytes) runs past the end of the file",
                    buf.len()
                ),
            )
        } else {
            Error::io("read", location, e)
        }
    })
}

/// Chooses the footer to read the image with.
///
/// The trailing footer (the last 512 bytes, or the last 511 of pre-2004 Virtual PC files) is
/// used when its checksum is right. A dynamic or differencing disk also carries a copy at
/// offset 0, which the VHD specification keeps for recovery: when the trailing footer is
/// damaged (wrong checksum, or no cookie) and the copy is intact, the copy is used, with a
/// warning. The data must then still end where the trailing footer starts; a file whose
/// blocks run into its last 512 bytes lost its end and is refused when the image is opened.
fn choose_footer<R: ReadAt>(reader: &R, loc: &str, warnings: &mut Vec<String>) -> Result<Chosen> {
    let size = reader.size();
    let mut end = None;
    if size >= FOOTER_LEN as u64 {
        let at = size - FOOTER_LEN as u64;
        let mut buf = [0u8; FOOTER_LEN];
        read_at(reader, loc, &mut buf, at, "footer")?;
        if buf[..8] == FOOTER_COOKIE {
            end = Some((buf, at, FOOTER_LEN));
        }
    }
    if end.is_none() {
        let at = size - SHORT_FOOTER_LEN as u64;
        let mut short = [0u8; FOOTER_LEN];
        read_at(reader, loc, &mut short[..SHORT_FOOTER_LEN], at, "footer")?;
        if short[..8] == FOOTER_COOKIE {
            end = Some((short, at, SHORT_FOOTER_LEN));
        }
    }
    // The copy at offset 0, when it is a distinct, intact footer of a dynamic or
    // differencing disk.
    let copy = (size > FOOTER_LEN as u64)
        .then(|| {
            let mut buf = [0u8; FOOTER_LEN];
            read_at(reader, loc, &mut buf, 0, "footer copy").ok()?;
            let (f, warn) = Footer::decode(&buf, loc, 0).ok()?;
            (warn.is_none() && f.disk_type != DiskType::Fixed).then_some(buf)
        })
        .flatten();
    let use_copy = |data_end: u64, why: String, warnings: &mut Vec<String>| {
        let end_missing = end.is_none();
        warnings.push(format!(
            "{loc}: {why}; using the intact footer copy at offset 0 (the VHD format keeps it \
             for this)"
        ));
        copy.map(|raw| Chosen {
            raw,
            at: 0,
            len: FOOTER_LEN,
            data_end,
            end_missing,
        })
    };
    match end {
        Some((raw, at, len)) => {
            let stored = be_u32(&raw, off::CHECKSUM);
            let computed = checksum(&raw, off::CHECKSUM);
            if stored != computed && copy.is_some() {
                let why = format!(
                    "the footer at the end of the file (offset {at}) is damaged: its checksum \
                     is {stored:#010x}, it sums to {computed:#010x}"
                );
                if let Some(c) = use_copy(at, why, warnings) {
                    return Ok(c);
                }
            }
            Ok(Chosen {
                raw,
                at,
                len,
                data_end: at,
                end_missing: false,
            })
        }
        None => {
            let at = size.saturating_sub(FOOTER_LEN as u64);
            if copy.is_some() {
                let why = format!(
                    "there is no footer at the end of the file (offset {at}): it is damaged, or \
                     the file lost its end"
                );
                if let Some(c) = use_copy(at, why, warnings) {
                    return Ok(c);
                }
            }
            let mut start = [0u8; FOOTER_LEN];
            let starts_like_vhd = read_at(reader, loc, &mut start, 0, "footer copy").is_ok()
                && start[..8] == FOOTER_COOKIE;
            if starts_like_vhd {
                // A fixed-type footer at 0 is refused by the caller with its own message; any
                // other footer copy at 0 that is not intact leaves nothing to read with.
                let (f, _) = Footer::decode(&start, loc, 0)?;
                if f.disk_type == DiskType::Fixed {
                    return Ok(Chosen {
                        raw: start,
                        at: 0,
                        len: FOOTER_LEN,
                        data_end: size,
                        end_missing: true,
                    });
                }
                return Err(Error::source_damaged(
                    loc,
                    at,
                    "no VHD footer at the end of the file, and the footer copy at offset 0 has a \
                     wrong checksum: the file lost its end (an interrupted copy or export?) or \
                     both footers are damaged; copy or export it again",
                ));
            }
            let mut header = [0u8; 8];
            if read_at(
                reader,
                loc,
                &mut header,
                FOOTER_LEN as u64,
                "dynamic header",
            )
            .is_ok()
                && header == HEADER_COOKIE
            {
                return Err(Error::source_damaged(
                    loc,
                    at,
                    "the file starts like a dynamic VHD (a dynamic header at offset 512) but has \
                     no VHD footer, neither at its end nor at offset 0: it lost its end (an \
                     interrupted copy or export?); copy or export it again",
                ));
            }
            Err(Error::source_damaged(
                loc,
                at,
                "bad VHD footer cookie: \"conectix\" is neither at the end of the file nor at \
                 offset 0",
            ))
        }
    }
}
