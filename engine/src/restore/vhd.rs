//! VHD restore targets: fixed (data + footer, Azure-ready) and dynamic (footer copy, header,
//! BAT, then 2 MiB blocks that hold data).
//!
//! Both write their footers last, after the data is durable: until then the file has no
//! `conectix` cookie anywhere the VHD readers look, so a restore interrupted at any point
//! leaves nothing that passes for a valid disk. The dynamic layout is planned from the
//! manifest before any data is written (a block is allocated when any chunk touches it,
//! blocks in disk order), so concurrent writers only compute offsets and never allocate.
//! The disk keeps the source's unique id unless a fresh one is asked for or the source had
//! none; the creator is `win `, one of the creators for which qemu, like Hyper-V, takes the
//! footer's current size as the disk size rather than the CHS geometry.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{restore_into, DiskTarget, OutputFormat, RawFileTarget, RestoreCounts, RestoreOptions};
use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::format::vhd_footer::{
    chs_geometry, parse_uuid, vhd_now, DiskType, Footer, FILE_FORMAT_VERSION, FOOTER_LEN,
    NO_DATA_OFFSET, SECTOR,
};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::source::vhd::dynamic::{
    bitmap_len, DynamicHeader, HEADER_LEN, HEADER_VERSION, UNALLOCATED,
};

/// Block size of dynamic VHDs we write: Hyper-V's and qemu's default.
pub const DYNAMIC_BLOCK_SIZE: u64 = 2 << 20;
/// Largest dynamic VHD the format allows (BAT sector offsets are 32-bit).
pub const MAX_DYNAMIC_SIZE: u64 = 2040 << 30;
const MIB: u64 = 1 << 20;
/// Offset of the dynamic header (after the footer copy) and of the BAT (after the header).
const HEADER_AT: u64 = FOOTER_LEN as u64;
const BAT_AT: u64 = HEADER_AT + HEADER_LEN as u64;

/// The file a VHD is restored into.
pub struct VhdFileTarget<'a> {
    pub file: &'a File,
    pub path: &'a Path,
}

impl VhdFileTarget<'_> {
    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        self.file
            .write_all_at(data, at)
            .map_err(|e| Error::io("write", self.path, e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("size", self.path, e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fsync", self.path, e))
    }
}

/// The footer of a restored disk of `current_size` bytes.
pub fn restored_footer(
    manifest: &Manifest,
    options: &RestoreOptions,
    disk_type: DiskType,
    current_size: u64,
) -> Footer {
    let source_id = manifest
        .meta
        .source
        .vhd
        .as_ref()
        .and_then(|v| parse_uuid(&v.unique_id));
    let unique_id = match source_id {
        Some(id) if !options.new_id => id,
        _ => fresh_uuid(),
    };
    Footer {
        features: 2,
        version: FILE_FORMAT_VERSION,
        data_offset: match disk_type {
            DiskType::Fixed => NO_DATA_OFFSET,
            _ => HEADER_AT,
        },
        timestamp: vhd_now(),
        creator_app: *b"win ",
        creator_version: 0x000a_0000,
        creator_host_os: *b"Wi2k",
        original_size: current_size,
        current_size,
        geometry: chs_geometry(current_size),
        disk_type,
        unique_id,
        saved_state: 0,
    }
}

/// A random (version 4) UUID.
fn fresh_uuid() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // Uniqueness matters, secrecy does not: fall back to the clock and the process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let h = blake3::hash(
            &[
                t.to_le_bytes(),
                u128::from(std::process::id()).to_le_bytes(),
            ]
            .concat(),
        );
        id.copy_from_slice(&h.as_bytes()[..16]);
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// Restores `manifest` into `target` as a fixed or dynamic VHD; returns the counts and the
/// VHD's current size.
pub fn restore_vhd(
    repo: &Repo,
    snapshot_id: &str,
    manifest: &Manifest,
    format: OutputFormat,
    options: &RestoreOptions,
    target: &VhdFileTarget<'_>,
    progress: &dyn Progress,
) -> Result<(RestoreCounts, u64)> {
    match format {
        OutputFormat::VhdFixed => {
            let size = fixed_size(manifest.virtual_size, options.exact_size);
            // Sparse data area first; the footer makes it a VHD only at the very end.
            target.set_len(size)?;
            let data = RawFileTarget {
                file: target.file,
                path: target.path,
            };
            let counts = restore_into(repo, snapshot_id, manifest, &data, progress)?;
            target.sync()?;
            let footer = restored_footer(manifest, options, DiskType::Fixed, size);
            target.write(&footer.encode(), size)?;
            Ok((counts, size))
        }
        OutputFormat::VhdDynamic => {
            let size = manifest.virtual_size.next_multiple_of(SECTOR);
            if size > MAX_DYNAMIC_SIZE {
                return Err(Error::InvalidArgument(format!(
                    "a {size}-byte disk is too large for a dynamic VHD (limit {MAX_DYNAMIC_SIZE}); \
                     restore as vhd-fixed or raw"
                )));
            }
            let layout = DynamicLayout::plan(manifest, size)?;
            target.set_len(layout.end)?;
            let header = DynamicHeader {
                table_offset: BAT_AT,
                version: HEADER_VERSION,
                max_table_entries: layout.blocks.len() as u32,
                block_size: DYNAMIC_BLOCK_SIZE as u32,
                parent_unique_id: [0; 16],
                parent_timestamp: 0,
                parent_name: String::new(),
                locators: Vec::new(),
            };
            target.write(&header.encode(), HEADER_AT)?;
            target.write(&layout.bat(), BAT_AT)?;
            let bitmap = vec![0xffu8; layout.bitmap_len as usize];
            for start in layout.blocks.iter().flatten() {
                target.write(&bitmap, *start)?;
            }
            let data = DynamicTarget {
                target,
                layout: &layout,
            };
            let counts = restore_into(repo, snapshot_id, manifest, &data, progress)?;
            target.sync()?;
            let footer = restored_footer(manifest, options, DiskType::Dynamic, size).encode();
            target.write(&footer, layout.end)?;
            target.write(&footer, 0)?;
            Ok((counts, size))
        }
        OutputFormat::Raw => Err(Error::Internal(
            "restore_vhd called for a raw output".into(),
        )),
    }
}

/// Current size of a fixed VHD: a whole MiB (Azure's rule), or the exact size in sectors.
pub fn fixed_size(virtual_size: u64, exact: bool) -> u64 {
    if exact {
        virtual_size.next_multiple_of(SECTOR)
    } else {
        virtual_size.next_multiple_of(MIB)
    }
}

/// Where each block of a dynamic VHD goes in the file.
#[derive(Debug)]
pub struct DynamicLayout {
    /// File offset of each block's bitmap, `None` for blocks without data.
    pub blocks: Vec<Option<u64>>,
    pub bitmap_len: u64,
    /// End of the last block: where the trailing footer goes.
    pub end: u64,
}

impl DynamicLayout {
    /// Allocates every block that some chunk of `manifest` touches, in disk order.
    pub fn plan(manifest: &Manifest, size: u64) -> Result<Self> {
        let count = size.div_ceil(DYNAMIC_BLOCK_SIZE) as usize;
        let mut used = vec![false; count];
        let seg = u64::from(manifest.segment_size);
        for (i, extents) in manifest.segments().enumerate() {
            let mut offset = i as u64 * seg;
            for e in extents? {
                if let Extent::Chunk { len, .. } = e {
                    let first = offset / DYNAMIC_BLOCK_SIZE;
                    let last = (offset + u64::from(len) - 1) / DYNAMIC_BLOCK_SIZE;
                    for b in first..=last {
                        if let Some(u) = used.get_mut(b as usize) {
                            *u = true;
                        }
                    }
                }
                offset += u64::from(e.len());
            }
        }
        let bitmap_len = bitmap_len(DYNAMIC_BLOCK_SIZE as u32);
        let bat_end = BAT_AT + (count as u64 * 4).next_multiple_of(SECTOR);
        // Block data starts 4 KiB-aligned: the bitmap sits in the sector before it.
        let mut next = (bat_end + bitmap_len).next_multiple_of(4096) - bitmap_len;
        let blocks = used
            .into_iter()
            .map(|u| {
                u.then(|| {
                    let at = next;
                    next += bitmap_len + DYNAMIC_BLOCK_SIZE;
                    at
                })
            })
            .collect();
        Ok(DynamicLayout {
            blocks,
            bitmap_len,
            end: next,
        })
    }

    /// The BAT as stored: big-endian sector numbers, padded to a sector with unallocated
    /// entries.
    pub fn bat(&self) -> Vec<u8> {
        let len = (self.blocks.len() * 4).next_multiple_of(SECTOR as usize);
        let mut out = Vec::with_capacity(len);
        for b in &self.blocks {
            let sector = b.map_or(UNALLOCATED, |at| (at / SECTOR) as u32);
            out.extend_from_slice(&sector.to_be_bytes());
        }
        out.resize(len, 0xff);
        out
    }
}

/// Writes virtual-disk bytes into the planned blocks.
struct DynamicTarget<'a> {
    target: &'a VhdFileTarget<'a>,
    layout: &'a DynamicLayout,
}

impl DiskTarget for DynamicTarget<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / DYNAMIC_BLOCK_SIZE;
            let within = pos % DYNAMIC_BLOCK_SIZE;
            let n = ((DYNAMIC_BLOCK_SIZE - within) as usize).min(data.len() - done);
            let Some(Some(start)) = self.layout.blocks.get(block as usize).copied() else {
                return Err(Error::InvalidArgument(format!(
                    "restore wrote to block {block} that the dynamic VHD layout left unallocated"
                )));
            };
            self.target.write(
                &data[done..done + n],
                start + self.layout.bitmap_len + within,
            )?;
            done += n;
        }
        Ok(())
    }
}
