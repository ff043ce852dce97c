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

use super::dynamic::{bitmap_len, DynamicHeader, HEADER_LEN, UNALLOCATED};
use super::footer::{
    DiskType, Footer, FOOTER_COOKIE, FOOTER_LEN, NO_DATA_OFFSET, SECTOR, SHORT_FOOTER_LEN,
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

/// Returns true when `reader` looks like a VHD (a footer cookie at its end or start).
pub fn has_vhd_cookie<R: ReadAt + ?Sized>(reader: &R) -> bool {
    let size = reader.size();
    let mut cookie = [0u8; 8];
    let mut at = |o: u64| reader.read_exact_at(&mut cookie, o).is_ok() && cookie == FOOTER_COOKIE;
    (size >= FOOTER_LEN as u64 && (at(size - FOOTER_LEN as u64) || at(0)))
        || (size >= SHORT_FOOTER_LEN as u64 && at(size - SHORT_FOOTER_LEN as u64))
}

impl<R: ReadAt> VhdImage<R> {
    /// Reads `buf` at `offset`; running past the end is corruption of `what`.
    pub fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        read_at(&self.reader, &self.location, buf, offset, what)
    }

    /// Opens and validates a VHD.
    pub fn open(reader: R, location: &str) -> Result<Self> {
        let size = reader.size();
        let loc = location;
        if size < SHORT_FOOTER_LEN as u64 {
            return Err(Error::corrupt(
                loc,
                0,
                format!("file is {size} bytes, too small to hold a VHD footer"),
            ));
        }
        let mut warnings = Vec::new();
        let (raw, footer_at, footer_len) = find_footer(&reader, loc, &mut warnings)?;
        let (footer, warn) = Footer::decode(&raw, loc, footer_at)?;
        let checksum_bad = warn.is_some();
        warnings.extend(warn);
        let insane = |offset: u64, what: String| {
            let what = if checksum_bad {
                format!("{what} (and the footer checksum is wrong)")
            } else {
                what
            };
            Error::corrupt(loc, offset, what)
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
        // Data, header and blocks all end before the trailing footer (or the file's end, when
        // only the copy at offset 0 survived).
        let data_end = if footer_at == 0 { size } else { footer_at };
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
                    return Err(Error::corrupt(
                        loc,
                        size.saturating_sub(FOOTER_LEN as u64),
                        "no VHD footer at the end of the file",
                    ));
                }
                if image.footer.current_size > data_end {
                    return Err(insane(
                        size_at,
                        format!(
                            "truncated fixed VHD: current size {} but only {data_end} bytes \
                             before the footer",
                            image.footer.current_size
                        ),
                    ));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let dynamic = image.open_dynamic(data_end, checksum_bad)?;
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
            return Err(Error::corrupt(
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
            return Err(Error::corrupt(
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
            return Err(Error::corrupt(loc, entries_at, what));
        }
        let table_at = header.table_offset;
        let table_len = needed * 4;
        if table_at.checked_add(table_len).is_none_or(|e| e > data_end) {
            return Err(Error::corrupt(
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
                return Err(Error::corrupt(
                    loc,
                    entry_at,
                    format!(
                        "BAT entry {i} puts a block at {start:#x}..{end:#x}, past the end of the \
                         data ({data_end:#x})"
                    ),
                ));
            }
            if let Some((_, _, name)) = meta.iter().find(|(s, e, _)| start < *e && *s < end) {
                return Err(Error::corrupt(
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
                return Err(Error::corrupt(
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
            Error::corrupt(
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

/// Finds the footer: the last 512 bytes, else the last 511 (pre-2004 Virtual PC), else the
/// copy at offset 0 that dynamic disks carry (then a warning: the end was lost).
fn find_footer<R: ReadAt>(
    reader: &R,
    loc: &str,
    warnings: &mut Vec<String>,
) -> Result<([u8; FOOTER_LEN], u64, usize)> {
    let size = reader.size();
    let mut buf = [0u8; FOOTER_LEN];
    if size >= FOOTER_LEN as u64 {
        let at = size - FOOTER_LEN as u64;
        read_at(reader, loc, &mut buf, at, "footer")?;
        if buf[..8] == FOOTER_COOKIE {
            return Ok((buf, at, FOOTER_LEN));
        }
    }
    let at = size - SHORT_FOOTER_LEN as u64;
    let mut short = [0u8; FOOTER_LEN];
    read_at(reader, loc, &mut short[..SHORT_FOOTER_LEN], at, "footer")?;
    if short[..8] == FOOTER_COOKIE {
        return Ok((short, at, SHORT_FOOTER_LEN));
    }
    if size >= FOOTER_LEN as u64 {
        read_at(reader, loc, &mut buf, 0, "footer copy")?;
        if buf[..8] == FOOTER_COOKIE {
            warnings.push(format!(
                "{loc}: no footer at the end of the file (truncated or interrupted?); using the \
                 copy at offset 0"
            ));
            return Ok((buf, 0, FOOTER_LEN));
        }
    }
    Err(Error::corrupt(
        loc,
        size.saturating_sub(FOOTER_LEN as u64),
        "bad VHD footer cookie: \"conectix\" is neither at the end of the file nor at offset 0",
    ))
}
