//! Byte encodings of everything stackvault stores: repository config, packs, snapshot
//! manifests. Pure functions over byte slices, no I/O.
//!
//! This module mirrors `format-spec/README.md`; the offsets here are named constants derived
//! from each other and checked against the spec's tables by tests. Every decoder treats its
//! input as hostile: lengths are checked before anything is allocated from them, and damage
//! is reported as [`Error::Corrupt`] with the location and offset.
//! All integers are little-endian.

pub mod config;
pub mod hex_id;
pub mod manifest;
pub mod pack;
pub mod page_list;
pub mod snapshot_id;
pub mod stored_name;
pub mod verification;
pub mod vhd_footer;

use std::fmt;

use crate::error::{Error, Result};

pub use snapshot_id::{DrillId, SnapshotId, VmSnapshotId};

/// Length of a chunk id (BLAKE3-256 of the uncompressed chunk).
pub const CHUNK_ID_LEN: usize = 32;

/// A chunk's identity: BLAKE3-256 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; CHUNK_ID_LEN]);

impl ChunkId {
    /// Hashes `data` into its chunk id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex of the full id.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", short_chunk_id(&self.to_hex()))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Characters of a snapshot id shown to people (`snapshots`, reports, errors).
pub const SHORT_SNAPSHOT_ID_CHARS: usize = 12;

/// Characters of a chunk id shown to people (check and verify damage lists).
pub const SHORT_CHUNK_ID_CHARS: usize = 16;

/// The first [`SHORT_SNAPSHOT_ID_CHARS`] characters of a snapshot id, for display. Ids come
/// from disk, manifests and the command line, so a shorter or non-ASCII id is returned as it
/// is (up to a character boundary) instead of panicking like a byte slice would.
pub fn short_id(id: &str) -> &str {
    prefix_chars(id, SHORT_SNAPSHOT_ID_CHARS)
}

/// The first [`SHORT_CHUNK_ID_CHARS`] characters of a chunk id in hex, for display; never
/// panics, like [`short_id`].
pub fn short_chunk_id(id: &str) -> &str {
    prefix_chars(id, SHORT_CHUNK_ID_CHARS)
}

/// At most `n` characters from the start of `s`, cut on a character boundary.
fn prefix_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((end, _)) => s.get(..end).unwrap_or(s),
        None => s,
    }
}

/// Lower-case hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Decodes lower- or upper-case hex; `None` on odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// A bounds-checked little-endian reader over a byte slice. Every read past the end is a
/// [`Error::Corrupt`] naming `location` and the absolute offset.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    base: u64,
    location: &'a str,
}

impl<'a> Reader<'a> {
    /// `base` is the absolute offset of `data[0]` in the file, for error messages.
    pub(crate) fn new(data: &'a [u8], base: u64, location: &'a str) -> Self {
        Reader {
            data,
            pos: 0,
            base,
            location,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::corrupt(self.location, self.offset(), what)
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.corrupt(format!(
                "truncated {what}: need {n} bytes, {} left",
                self.remaining()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn chunk_id(&mut self, what: &str) -> Result<ChunkId> {
        Ok(ChunkId(self.array(what)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001ABff").as_deref(), Some(&b[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn short_ids_never_panic() {
        let full = "0123456789abcdef0123";
        assert_eq!(short_id(full), "0123456789ab");
        assert_eq!(short_chunk_id(full), "0123456789abcdef");
        assert_eq!(short_id(""), "");
        assert_eq!(short_id("abc"), "abc");
        // A multi-byte character across byte 12 would panic a `[..12]` byte slice.
        assert_eq!(short_id("ab2ab2ab2ab\u{e9}cd"), "ab2ab2ab2ab\u{e9}");
    }

    #[test]
    fn reader_reports_truncation_with_offset() {
        let data = [1u8, 2, 3];
        let mut r = Reader::new(&data, 100, "test");
        assert_eq!(r.u16("a").ok(), Some(0x0201));
        let err = r
            .u32("field")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("offset 102"), "{err}");
        assert!(err.contains("truncated field"), "{err}");
    }
}
