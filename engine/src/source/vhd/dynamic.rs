//! The 1024-byte dynamic disk header ("cxsparse") with its parent locators, shared by dynamic
//! and differencing VHDs, and the parent-locator decoding (W2ru / W2ku UTF-16LE paths, MacX
//! UTF-8 file URLs).
//!
//! Decoding only checks what a single header can tell (cookie, block size, bounds of the
//! locator fields); where the BAT and blocks lie is checked against the file in `image.rs`.

use crate::error::{Error, Result};
use crate::format::vhd_footer::{be_u32, be_u64, checksum};

/// Length of the dynamic header.
pub const HEADER_LEN: usize = 1024;
/// Dynamic header cookie.
pub const HEADER_COOKIE: [u8; 8] = *b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// BAT entry of a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// Number of parent locator entries.
pub const LOCATORS: usize = 8;
/// Length of one parent locator entry.
pub const LOCATOR_LEN: usize = 24;
/// Smallest block size accepted: one sector.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted; real disks use 512 KiB or 2 MiB, and the per-block sector
/// bitmap read at this size is 64 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Longest parent locator accepted: a path, so a few KiB at most.
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// Field offsets inside the dynamic header.
pub mod off {
    pub const COOKIE: usize = 0;
    pub const DATA_OFFSET: usize = 8;
    pub const TABLE_OFFSET: usize = 16;
    pub const VERSION: usize = 24;
    pub const MAX_TABLE_ENTRIES: usize = 28;
    pub const BLOCK_SIZE: usize = 32;
    pub const CHECKSUM: usize = 36;
    pub const PARENT_UNIQUE_ID: usize = 40;
    pub const PARENT_TIMESTAMP: usize = 56;
    pub const PARENT_NAME: usize = 64;
    pub const PARENT_NAME_LEN: usize = 512;
    pub const LOCATORS: usize = 576;
}

/// One parent locator entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: `W2ru`, `W2ku`, `MacX`...
    pub code: [u8; 4],
    /// Space reserved for the data (sectors per the spec; some writers put bytes).
    pub data_space: u32,
    /// Length of the locator data, bytes.
    pub data_length: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

/// A decoded dynamic header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent's file name (UTF-16BE in the file), lossily decoded.
    pub parent_name: String,
    /// Locators with a non-zero platform code, in entry order.
    pub locators: Vec<Locator>,
}

impl DynamicHeader {
    /// Decodes a header read at `at`. Returns it and, if its checksum is wrong, a warning.
    pub fn decode(
        b: &[u8; HEADER_LEN],
        location: &str,
        at: u64,
    ) -> Result<(DynamicHeader, Option<String>)> {
        if b[off::COOKIE..off::COOKIE + 8] != HEADER_COOKIE {
            return Err(Error::source_damaged(
                location,
                at,
                "bad dynamic header cookie (expected \"cxsparse\")",
            ));
        }
        let stored = be_u32(b, off::CHECKSUM);
        let computed = checksum(b, off::CHECKSUM);
        let warning = (stored != computed).then(|| {
            format!(
                "{location}: dynamic header checksum at offset {} is {stored:#010x}, the header \
                 sums to {computed:#010x}; reading it anyway as qemu does",
                at + off::CHECKSUM as u64
            )
        });
        let block_size = be_u32(b, off::BLOCK_SIZE);
        if !block_size.is_power_of_two() {
            return Err(Error::source_damaged(
                location,
                at + off::BLOCK_SIZE as u64,
                format!("block size {block_size} is not a power of two"),
            ));
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(Error::source_damaged(
                location,
                at + off::BLOCK_SIZE as u64,
                format!(
                    "block size {block_size} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE} bytes"
                ),
            ));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[off::PARENT_UNIQUE_ID..off::PARENT_UNIQUE_ID + 16]);
        let name = &b[off::PARENT_NAME..off::PARENT_NAME + off::PARENT_NAME_LEN];
        let units: Vec<u16> = name
            .chunks_exact(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = Vec::new();
        for i in 0..LOCATORS {
            let e = off::LOCATORS + i * LOCATOR_LEN;
            let mut code = [0u8; 4];
            code.copy_from_slice(&b[e..e + 4]);
            if code == [0; 4] {
                continue;
            }
            locators.push(Locator {
                code,
                data_space: be_u32(b, e + 4),
                data_length: be_u32(b, e + 8),
                data_offset: be_u64(b, e + 16),
            });
        }
        Ok((
            DynamicHeader {
                table_offset: be_u64(b, off::TABLE_OFFSET),
                version: be_u32(b, off::VERSION),
                max_table_entries: be_u32(b, off::MAX_TABLE_ENTRIES),
                block_size,
                parent_unique_id,
                parent_timestamp: be_u32(b, off::PARENT_TIMESTAMP),
                parent_name: String::from_utf16_lossy(&units),
                locators,
            },
            warning,
        ))
    }

    /// Encodes a header (no parent fields: what the dynamic restore target writes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[off::COOKIE..off::COOKIE + 8].copy_from_slice(&HEADER_COOKIE);
        b[off::DATA_OFFSET..off::DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        b[off::TABLE_OFFSET..off::TABLE_OFFSET + 8]
            .copy_from_slice(&self.table_offset.to_be_bytes());
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[off::MAX_TABLE_ENTRIES..off::MAX_TABLE_ENTRIES + 4]
            .copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[off::BLOCK_SIZE..off::BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_be_bytes());
        b[off::PARENT_UNIQUE_ID..off::PARENT_UNIQUE_ID + 16]
            .copy_from_slice(&self.parent_unique_id);
        b[off::PARENT_TIMESTAMP..off::PARENT_TIMESTAMP + 4]
            .copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let sum = checksum(&b, off::CHECKSUM);
        b[off::CHECKSUM..off::CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// Bytes of one block's sector bitmap as stored: one bit per sector, padded to a sector.
pub fn bitmap_len(block_size: u32) -> u64 {
    (u64::from(block_size) / 512)
        .div_ceil(8)
        .next_multiple_of(512)
}

/// Turns a locator's bytes into a path, by platform code: `W2ru`/`W2ku` are UTF-16LE Windows
/// paths (backslashes become slashes), `MacX` a UTF-8 `file://` URL. `None` for other codes
/// or undecodable data.
pub fn locator_path(code: &[u8; 4], data: &[u8]) -> Option<String> {
    let s = match code {
        b"W2ru" | b"W2ku" => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16(&units).ok()?.replace('\\', "/")
        }
        b"MacX" => {
            let text = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            let rest = text.strip_prefix("file://")?;
            // file://localhost/abs/path or file:///abs/path
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            percent_decode(rest)?
        }
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// Decodes `%XX` escapes; `None` for a malformed escape or text that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_decode() {
        let w: Vec<u8> = ".\\dir\\parent.vhd"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(
            locator_path(b"W2ru", &w).as_deref(),
            Some("./dir/parent.vhd")
        );
        assert_eq!(
            locator_path(b"MacX", b"file://localhost/tmp/a%20b.vhd").as_deref(),
            Some("/tmp/a b.vhd")
        );
        assert_eq!(
            locator_path(b"MacX", b"file:///x.vhd").as_deref(),
            Some("/x.vhd")
        );
        assert_eq!(locator_path(b"MacX", b"/x.vhd"), None);
        assert_eq!(locator_path(b"Wi2k", b"x"), None);
        assert_eq!(bitmap_len(2 << 20), 512);
        assert_eq!(bitmap_len(512), 512);
        assert_eq!(bitmap_len(256 << 20), 64 << 10);
    }
}
