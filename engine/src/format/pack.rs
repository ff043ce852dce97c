//! Pack files: compressed frames of chunks, then a table of the chunks, then a fixed footer.
//!
//! A pack is self-describing: the footer locates the table, the table lists every chunk
//! (id, frame offset, offset inside the frame, lengths, compression, crc32), and every frame
//! record lists its own chunks, so the index can be rebuilt from packs alone and a damaged
//! table does not lose the chunks. The crc32 of a frame covers its stored bytes, so a scrub
//! can check a pack without decompressing anything.
//!
//! Version 2 (written) groups chunks into frames: chunks that were new in one backup segment,
//! in disk order, compressed together as one zstd frame of up to [`FRAME_TARGET_LEN`] raw
//! bytes. Version 1 (read only) has one record per chunk; a reader treats a version 1 record
//! as a frame of one chunk. See `format-spec/README.md`, "Packs".
//!
//! Version 3 (sealed, written by encrypted repositories) is version 2 with each frame record
//! and the table sealed ([`Protection::seal`]): a frame under `ObjectKind::PackFrame`, the
//! pack's name and the frame's offset, the table under `ObjectKind::PackTable` and the pack's
//! name. A frame is still one ranged read, and it is authenticated before a byte of it is
//! decompressed. In a version 3 table, `stored_len` is the sealed frame's length (what a
//! reader fetches); the plain frame header inside has the compressed length. A repository
//! reads only the version it writes: a plain pack in an encrypted repository (or a sealed
//! one in a plain repository) is damage, never silently trusted.

use std::borrow::Cow;

use super::{ChunkId, Reader, CHUNK_ID_LEN};
use crate::crypto::{ObjectAd, ObjectKind, Protection, SEAL_OVERHEAD};
use crate::error::{Error, Result};

/// Magic at offset 0 of a pack.
pub const PACK_MAGIC: [u8; 8] = *b"SVPACK\0\x01";
/// Magic at the start of the pack footer.
pub const PACK_FOOTER_MAGIC: [u8; 8] = *b"SVPKEND\x01";
/// The pack format version this build writes into a plain repository.
pub const PACK_VERSION: u32 = 2;
/// The sealed pack format version this build writes into an encrypted repository; the newest
/// it reads.
pub const PACK_VERSION_SEALED: u32 = 3;
/// The legacy version (one record per chunk) that is still read.
pub const PACK_VERSION_V1: u32 = 1;

/// Pack header: magic (8), version (4), reserved (4).
pub const PACK_HEADER_LEN: usize = 16;
/// Version 1 record header: id (32), raw_len (4), stored_len (4), compression (1),
/// reserved (3), crc32 (4).
pub const RECORD_HEADER_LEN: usize = CHUNK_ID_LEN + 4 + 4 + 1 + 3 + 4;
/// Version 1 table entry: id (32), record offset (8), raw_len (4), stored_len (4),
/// compression (1), reserved (3), crc32 (4).
pub const TABLE_ENTRY_LEN_V1: usize = CHUNK_ID_LEN + 8 + 4 + 4 + 1 + 3 + 4;
/// Version 2 frame header: chunk count (4), raw_len (4), stored_len (4), compression (1),
/// reserved (3), crc32 of the stored bytes (4), crc32 of the chunk list (4).
pub const FRAME_HEADER_LEN: usize = 4 + 4 + 4 + 1 + 3 + 4 + 4;
/// Version 2 chunk list entry, after a frame's stored bytes: id (32), raw_len (4).
pub const FRAME_LIST_ENTRY_LEN: usize = CHUNK_ID_LEN + 4;
/// Version 2 table entry: id (32), frame offset (8), offset in frame (4), raw_len (4),
/// frame stored_len (4), frame raw_len (4), compression (1), reserved (3), crc32 (4).
pub const TABLE_ENTRY_LEN: usize = CHUNK_ID_LEN + 8 + 4 + 4 + 4 + 4 + 1 + 3 + 4;
/// Footer: magic (8), version (4), chunk count (4), table offset (8), table crc32 (4),
/// footer crc32 (4).
pub const PACK_FOOTER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// Largest raw chunk, and largest raw frame, any pack may hold; bounds allocations when
/// decoding.
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;
/// Writers close a frame before it would exceed this many raw bytes (a single larger chunk
/// is a frame of its own). 256 KiB: on a real ext4 image, 8.6% smaller than one frame per
/// 16 KiB chunk, and a reader of one chunk decompresses at most this much.
pub const FRAME_TARGET_LEN: usize = 256 * 1024;

/// Largest sealed frame (version 3 `stored_len`): a frame of [`MAX_CHUNK_LEN`] raw bytes, its
/// header, a chunk list of at most one entry per 4 KiB and the seal.
pub const MAX_SEALED_FRAME_LEN: u32 = MAX_CHUNK_LEN
    + 1024
    + FRAME_HEADER_LEN as u32
    + (MAX_CHUNK_LEN / 4096) * FRAME_LIST_ENTRY_LEN as u32
    + SEAL_OVERHEAD as u32;

/// The pack version a repository with `protection` writes.
pub fn pack_version_for(protection: &Protection) -> u32 {
    if protection.is_encrypted() {
        PACK_VERSION_SEALED
    } else {
        PACK_VERSION
    }
}

/// Refuses a pack whose version does not match the repository's protection (see the module
/// doc): a plain pack cannot be trusted in an encrypted repository, and a sealed one cannot
/// be read without keys.
pub fn check_protection(
    version: u32,
    protection: &Protection,
    location: &str,
    offset: u64,
) -> Result<()> {
    match (protection.is_encrypted(), version == PACK_VERSION_SEALED) {
        (true, false) => Err(Error::corrupt(
            location,
            offset,
            format!(
                "plain pack (format {version}) in an encrypted repository: not written with \
                 this repository's keys"
            ),
        )),
        (false, true) => Err(Error::corrupt(
            location,
            offset,
            "sealed pack (format 3) in an unencrypted repository: not written by it",
        )),
        _ => Ok(()),
    }
}

/// Bytes of the table entry of a chunk in a pack of `version`.
pub fn table_entry_len(version: u32) -> usize {
    if version == PACK_VERSION_V1 {
        TABLE_ENTRY_LEN_V1
    } else {
        TABLE_ENTRY_LEN
    }
}

/// Bytes a frame of `chunks` chunks and `stored_len` stored bytes occupies in a pack of
/// `version` (a version 1 record is a frame of one chunk).
pub fn frame_record_len(version: u32, stored_len: u32, chunks: u32) -> u64 {
    if version == PACK_VERSION_SEALED {
        // The sealed record is everything: header and list are inside.
        u64::from(stored_len)
    } else if version == PACK_VERSION_V1 {
        RECORD_HEADER_LEN as u64 + u64::from(stored_len)
    } else {
        FRAME_HEADER_LEN as u64
            + u64::from(stored_len)
            + u64::from(chunks) * FRAME_LIST_ENTRY_LEN as u64
    }
}

/// How a frame's stored bytes encode its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (used when zstd does not shrink the frame).
    None = 0,
    /// One zstd frame.
    Zstd = 1,
}

impl Compression {
    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What the pack table says about one chunk (a version 1 entry reads as a chunk alone in
/// its frame: `in_frame` 0, `frame_raw_len` = `raw_len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Offset of the frame record from the start of the pack.
    pub offset: u64,
    /// Offset of the chunk inside the decompressed frame.
    pub in_frame: u32,
    /// Raw length of the chunk.
    pub raw_len: u32,
    /// Stored length of the frame.
    pub stored_len: u32,
    /// Raw length of the frame.
    pub frame_raw_len: u32,
    pub compression: Compression,
    /// crc32 (IEEE) of the frame's stored bytes.
    pub crc32: u32,
}

impl PackEntry {
    /// Where the chunk is and what its frame must contain, in a pack of `version`.
    pub fn location(&self, version: u32) -> RecordLocation {
        RecordLocation {
            version,
            id: self.id,
            offset: self.offset,
            in_frame: self.in_frame,
            raw_len: self.raw_len,
            stored_len: self.stored_len,
            frame_raw_len: self.frame_raw_len,
        }
    }
}

/// What a reader knows about a chunk before reading it (from the index or the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    /// Format version of the pack.
    pub version: u32,
    pub id: ChunkId,
    /// Offset of the frame record from the start of the pack.
    pub offset: u64,
    /// Offset of the chunk inside the decompressed frame.
    pub in_frame: u32,
    /// Raw length of the chunk.
    pub raw_len: u32,
    /// Stored length of the frame.
    pub stored_len: u32,
    /// Raw length of the frame.
    pub frame_raw_len: u32,
}

impl RecordLocation {
    /// Bytes a reader fetches: the frame header and the stored bytes (not the chunk list).
    pub fn read_len(&self) -> u64 {
        self.header_len() + u64::from(self.stored_len)
    }

    fn header_len(&self) -> u64 {
        if self.version == PACK_VERSION_SEALED {
            0
        } else if self.version == PACK_VERSION_V1 {
            RECORD_HEADER_LEN as u64
        } else {
            FRAME_HEADER_LEN as u64
        }
    }
}

/// The pack header of a plain pack.
pub fn encode_header() -> [u8; PACK_HEADER_LEN] {
    encode_header_version(PACK_VERSION)
}

/// The pack header of a pack of `version` (2 plain, 3 sealed).
pub fn encode_header_for(version: u32) -> [u8; PACK_HEADER_LEN] {
    encode_header_version(version)
}

fn encode_header_version(version: u32) -> [u8; PACK_HEADER_LEN] {
    let mut b = [0u8; PACK_HEADER_LEN];
    b[..8].copy_from_slice(&PACK_MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

/// Checks the pack header; returns the pack's format version.
pub fn decode_header(data: &[u8], location: &str) -> Result<u32> {
    let mut r = Reader::new(data, 0, location);
    if r.array::<8>("pack magic")? != PACK_MAGIC {
        return Err(Error::corrupt(location, 0, "bad pack magic"));
    }
    let version = r.u32("pack version")?;
    check_version(version, location)?;
    Ok(version)
}

fn check_version(version: u32, location: &str) -> Result<()> {
    if version == 0 || version > PACK_VERSION_SEALED {
        return Err(Error::UnsupportedVersion {
            what: format!("pack {location}"),
            found: version,
            supported: PACK_VERSION_SEALED,
        });
    }
    Ok(())
}

/// What a version 2 frame header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub chunk_count: u32,
    pub raw_len: u32,
    pub stored_len: u32,
    pub compression: Compression,
    /// crc32 of the stored bytes.
    pub crc32: u32,
    /// crc32 of the chunk list that follows the stored bytes.
    pub list_crc32: u32,
}

/// Encodes a whole version 2 frame record (header, stored bytes, chunk list) into `out`.
pub fn encode_frame(
    chunks: &[(ChunkId, u32)],
    stored: &[u8],
    compression: Compression,
    out: &mut Vec<u8>,
) -> FrameHeader {
    let mut list = Vec::with_capacity(chunks.len() * FRAME_LIST_ENTRY_LEN);
    for (id, len) in chunks {
        list.extend_from_slice(&id.0);
        list.extend_from_slice(&len.to_le_bytes());
    }
    let h = FrameHeader {
        chunk_count: chunks.len() as u32,
        raw_len: chunks.iter().map(|c| c.1).sum(),
        stored_len: stored.len() as u32,
        compression,
        crc32: crc32fast::hash(stored),
        list_crc32: crc32fast::hash(&list),
    };
    out.extend_from_slice(&h.chunk_count.to_le_bytes());
    out.extend_from_slice(&h.raw_len.to_le_bytes());
    out.extend_from_slice(&h.stored_len.to_le_bytes());
    out.push(compression as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&h.crc32.to_le_bytes());
    out.extend_from_slice(&h.list_crc32.to_le_bytes());
    out.extend_from_slice(stored);
    out.extend_from_slice(&list);
    h
}

/// A compression code this build does not know: a newer writer's (a repository that uses
/// one should have said so in its config's features), so `Unsupported`, not damage.
fn unknown_compression(code: u8, location: &str, offset: u64) -> Error {
    Error::unsupported(format!(
        "{location} at offset {offset}: compression code {code} is unknown to stackvault {}; \
         read this repository with the release that wrote it or a newer one (if no release \
         knows the code, the pack is damaged: `stackvault check --read-data` lists it)",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Decodes a version 2 frame header found at `offset` of a pack.
pub fn decode_frame_header(data: &[u8], offset: u64, location: &str) -> Result<FrameHeader> {
    let mut r = Reader::new(data, offset, location);
    let chunk_count = r.u32("frame chunk count")?;
    let raw_len = r.u32("frame raw length")?;
    let stored_len = r.u32("frame stored length")?;
    let code = r.u8("frame compression")?;
    r.array::<3>("reserved")?;
    let crc32 = r.u32("frame crc32")?;
    let list_crc32 = r.u32("frame list crc32")?;
    let compression = Compression::from_code(code)
        .ok_or_else(|| unknown_compression(code, location, offset + 12))?;
    if chunk_count == 0 || chunk_count > raw_len {
        return Err(Error::corrupt(
            location,
            offset,
            format!("frame of {chunk_count} chunks and {raw_len} raw bytes"),
        ));
    }
    check_lengths(
        PACK_VERSION,
        raw_len,
        stored_len,
        compression,
        offset,
        location,
    )?;
    Ok(FrameHeader {
        chunk_count,
        raw_len,
        stored_len,
        compression,
        crc32,
        list_crc32,
    })
}

/// Decodes and checks the chunk list of a version 2 frame (`data` is the list alone, which
/// starts at `offset` of the pack).
pub fn decode_frame_list(
    data: &[u8],
    header: &FrameHeader,
    offset: u64,
    location: &str,
) -> Result<Vec<(ChunkId, u32)>> {
    if data.len() as u64 != u64::from(header.chunk_count) * FRAME_LIST_ENTRY_LEN as u64 {
        return Err(Error::corrupt(
            location,
            offset,
            "frame chunk list truncated",
        ));
    }
    if crc32fast::hash(data) != header.list_crc32 {
        return Err(Error::corrupt(
            location,
            offset,
            "frame chunk list checksum mismatch",
        ));
    }
    let mut r = Reader::new(data, offset, location);
    let mut out = Vec::with_capacity(header.chunk_count as usize);
    let mut total = 0u64;
    for _ in 0..header.chunk_count {
        let id = r.chunk_id("frame chunk id")?;
        let len = r.u32("frame chunk length")?;
        if len == 0 {
            return Err(r.corrupt("empty chunk in a frame"));
        }
        total += u64::from(len);
        out.push((id, len));
    }
    if total != u64::from(header.raw_len) {
        return Err(Error::corrupt(
            location,
            offset,
            format!(
                "frame chunks add up to {total} bytes, the header says {}",
                header.raw_len
            ),
        ));
    }
    Ok(out)
}

/// Legacy (version 1) record: encoding kept for tests and vectors of old packs.
pub fn encode_record_header_v1(e: &PackEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.id.0);
    out.extend_from_slice(&e.raw_len.to_le_bytes());
    out.extend_from_slice(&e.stored_len.to_le_bytes());
    out.push(e.compression as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&e.crc32.to_le_bytes());
}

/// Decodes a version 1 record header found at `offset` of a pack, as a table entry.
pub fn decode_record_header_v1(data: &[u8], offset: u64, location: &str) -> Result<PackEntry> {
    let mut r = Reader::new(data, offset, location);
    let id = r.chunk_id("record id")?;
    let raw_len = r.u32("record raw length")?;
    let stored_len = r.u32("record stored length")?;
    let code = r.u8("record compression")?;
    r.array::<3>("reserved")?;
    let crc32 = r.u32("record crc32")?;
    let compression = Compression::from_code(code)
        .ok_or_else(|| unknown_compression(code, location, offset + 40))?;
    check_lengths(
        PACK_VERSION_V1,
        raw_len,
        stored_len,
        compression,
        offset,
        location,
    )?;
    Ok(PackEntry {
        id,
        offset,
        in_frame: 0,
        raw_len,
        stored_len,
        frame_raw_len: raw_len,
        compression,
        crc32,
    })
}

fn check_lengths(
    version: u32,
    raw_len: u32,
    stored_len: u32,
    compression: Compression,
    offset: u64,
    location: &str,
) -> Result<()> {
    if version == PACK_VERSION_SEALED {
        // `stored_len` is the sealed record's length.
        let least = (SEAL_OVERHEAD + FRAME_HEADER_LEN + FRAME_LIST_ENTRY_LEN) as u32;
        if raw_len == 0
            || raw_len > MAX_CHUNK_LEN
            || !(least..=MAX_SEALED_FRAME_LEN).contains(&stored_len)
        {
            return Err(Error::corrupt(
                location,
                offset,
                format!("sealed frame lengths out of range: raw {raw_len} sealed {stored_len}"),
            ));
        }
        return Ok(());
    }
    if raw_len == 0 || raw_len > MAX_CHUNK_LEN || stored_len > MAX_CHUNK_LEN + 1024 {
        return Err(Error::corrupt(
            location,
            offset,
            format!("frame lengths out of range: raw {raw_len} stored {stored_len}"),
        ));
    }
    if compression == Compression::None && raw_len != stored_len {
        return Err(Error::corrupt(
            location,
            offset,
            "uncompressed frame whose stored and raw lengths differ",
        ));
    }
    Ok(())
}

/// Encodes the version 2 chunk table followed by the footer. `table_offset` is where the
/// table starts.
pub fn encode_table_and_footer(entries: &[PackEntry], table_offset: u64) -> Vec<u8> {
    let mut out = encode_table_entries(entries);
    let table_crc = crc32fast::hash(&out);
    let footer = encode_footer_version(PACK_VERSION, entries.len() as u32, table_offset, table_crc);
    out.extend_from_slice(&footer);
    out
}

/// Encodes the version 3 table of the pack `pack` (sealed) followed by the footer.
pub fn encode_sealed_table_and_footer(
    entries: &[PackEntry],
    table_offset: u64,
    protection: &Protection,
    pack: &str,
) -> Result<Vec<u8>> {
    let mut out = protection.seal(&table_ad(pack), encode_table_entries(entries))?;
    let table_crc = crc32fast::hash(&out);
    let footer = encode_footer_version(
        PACK_VERSION_SEALED,
        entries.len() as u32,
        table_offset,
        table_crc,
    );
    out.extend_from_slice(&footer);
    Ok(out)
}

/// The associated data of pack `pack`'s sealed table (also what a version 2 index delta
/// seals a table's plaintext again under).
pub(crate) fn table_ad(pack: &str) -> ObjectAd<'_> {
    ObjectAd {
        kind: ObjectKind::PackTable,
        name: pack,
        part: 0,
    }
}

fn frame_ad(pack: &str, offset: u64) -> ObjectAd<'_> {
    ObjectAd {
        kind: ObjectKind::PackFrame,
        name: pack,
        part: offset,
    }
}

/// Seals a version 2 frame record (`plain`, as [`encode_frame`] writes it) as the frame at
/// `offset` of the pack `pack`.
pub fn seal_frame(
    protection: &Protection,
    pack: &str,
    offset: u64,
    plain: Vec<u8>,
) -> Result<Vec<u8>> {
    protection.seal(&frame_ad(pack, offset), plain)
}

/// Opens the sealed frame record at `offset` of the pack `pack` and checks that the plain
/// record inside (a version 2 frame: header, stored bytes, chunk list) is whole. Returns the
/// plain record and its header.
pub fn open_sealed_frame(
    protection: &Protection,
    pack: &str,
    offset: u64,
    sealed: &[u8],
    location: &str,
) -> Result<(Vec<u8>, FrameHeader)> {
    let plain = protection.open(&frame_ad(pack, offset), sealed, location, offset)?;
    let h = check_opened_frame(&plain, offset, location)?;
    Ok((plain, h))
}

/// [`seal_frame`] where the frame lies: `stored` is `[room for the nonce][plain record, as
/// encode_frame writes it][room for the tag]` ([`Protection::overhead`] bytes of room in all)
/// and becomes the sealed frame, the same bytes [`seal_frame`] returns. Lets a pack writer
/// seal each frame as it adds it to the pack, while its bytes are still in cache, without a
/// copy.
pub fn seal_frame_in_place(
    protection: &Protection,
    pack: &str,
    offset: u64,
    stored: &mut [u8],
) -> Result<()> {
    protection.seal_in_place(&frame_ad(pack, offset), stored)
}

/// [`open_sealed_frame`] where the sealed frame lies (it is decrypted in `sealed`): returns
/// the plain record, a part of `sealed`, and its header.
pub fn open_sealed_frame_in_place<'s>(
    protection: &Protection,
    pack: &str,
    offset: u64,
    sealed: &'s mut [u8],
    location: &str,
) -> Result<(&'s [u8], FrameHeader)> {
    let plain = protection.open_in_place(&frame_ad(pack, offset), sealed, location, offset)?;
    let h = check_opened_frame(plain, offset, location)?;
    Ok((plain, h))
}

/// The header of an opened frame record, checked to describe the whole record.
fn check_opened_frame(plain: &[u8], offset: u64, location: &str) -> Result<FrameHeader> {
    let header = plain
        .get(..FRAME_HEADER_LEN)
        .ok_or_else(|| Error::corrupt(location, offset, "sealed frame holds no frame header"))?;
    let h = decode_frame_header(header, offset, location)?;
    let whole = FRAME_HEADER_LEN as u64
        + u64::from(h.stored_len)
        + u64::from(h.chunk_count) * FRAME_LIST_ENTRY_LEN as u64;
    if plain.len() as u64 != whole {
        return Err(Error::corrupt(
            location,
            offset,
            format!(
                "sealed frame holds {} bytes, its header describes {whole}",
                plain.len()
            ),
        ));
    }
    Ok(h)
}

fn encode_table_entries(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * TABLE_ENTRY_LEN + PACK_FOOTER_LEN);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.in_frame.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.frame_raw_len.to_le_bytes());
        out.push(e.compression as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&e.crc32.to_le_bytes());
    }
    out
}

/// Encodes a complete version 1 pack of uncompressed chunks: for tests and vectors of the
/// legacy format, never written by the engine.
pub fn encode_pack_v1(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = encode_header_version(PACK_VERSION_V1).to_vec();
    let mut entries = Vec::new();
    for c in chunks {
        let e = PackEntry {
            id: ChunkId::of(c),
            offset: out.len() as u64,
            in_frame: 0,
            raw_len: c.len() as u32,
            stored_len: c.len() as u32,
            frame_raw_len: c.len() as u32,
            compression: Compression::None,
            crc32: crc32fast::hash(c),
        };
        encode_record_header_v1(&e, &mut out);
        out.extend_from_slice(c);
        entries.push(e);
    }
    let table_offset = out.len() as u64;
    let mut table = Vec::new();
    for e in &entries {
        table.extend_from_slice(&e.id.0);
        table.extend_from_slice(&e.offset.to_le_bytes());
        table.extend_from_slice(&e.raw_len.to_le_bytes());
        table.extend_from_slice(&e.stored_len.to_le_bytes());
        table.push(e.compression as u8);
        table.extend_from_slice(&[0; 3]);
        table.extend_from_slice(&e.crc32.to_le_bytes());
    }
    let crc = crc32fast::hash(&table);
    out.extend_from_slice(&table);
    out.extend_from_slice(&encode_footer_version(
        PACK_VERSION_V1,
        entries.len() as u32,
        table_offset,
        crc,
    ));
    out
}

/// What the footer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackFooter {
    pub version: u32,
    pub chunk_count: u32,
    pub table_offset: u64,
    pub table_crc32: u32,
}

impl PackFooter {
    /// Length of the chunk table.
    pub fn table_len(&self) -> u64 {
        let entries = u64::from(self.chunk_count) * table_entry_len(self.version) as u64;
        if self.version == PACK_VERSION_SEALED {
            entries + SEAL_OVERHEAD as u64
        } else {
            entries
        }
    }
}

/// Encodes a footer of the current version.
pub fn encode_footer(
    chunk_count: u32,
    table_offset: u64,
    table_crc32: u32,
) -> [u8; PACK_FOOTER_LEN] {
    encode_footer_version(PACK_VERSION, chunk_count, table_offset, table_crc32)
}

fn encode_footer_version(
    version: u32,
    chunk_count: u32,
    table_offset: u64,
    table_crc32: u32,
) -> [u8; PACK_FOOTER_LEN] {
    let mut b = [0u8; PACK_FOOTER_LEN];
    b[0..8].copy_from_slice(&PACK_FOOTER_MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&chunk_count.to_le_bytes());
    b[16..24].copy_from_slice(&table_offset.to_le_bytes());
    b[24..28].copy_from_slice(&table_crc32.to_le_bytes());
    let crc = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the footer of a pack of `pack_len` bytes; checks that the table fits exactly
/// between the records and the footer.
pub fn decode_footer(data: &[u8], pack_len: u64, location: &str) -> Result<PackFooter> {
    let footer_offset = pack_len.saturating_sub(PACK_FOOTER_LEN as u64);
    if pack_len < (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64 || data.len() != PACK_FOOTER_LEN {
        return Err(Error::corrupt(
            location,
            footer_offset,
            format!("pack too short ({pack_len} bytes) to hold a header and footer"),
        ));
    }
    let mut r = Reader::new(data, footer_offset, location);
    if r.array::<8>("footer magic")? != PACK_FOOTER_MAGIC {
        return Err(Error::corrupt(
            location,
            footer_offset,
            "bad pack footer magic (truncated or unfinished pack?)",
        ));
    }
    let version = r.u32("footer version")?;
    let chunk_count = r.u32("chunk count")?;
    let table_offset = r.u64("table offset")?;
    let table_crc32 = r.u32("table crc32")?;
    let footer_crc = r.u32("footer crc32")?;
    if crc32fast::hash(&data[..28]) != footer_crc {
        return Err(Error::corrupt(
            location,
            footer_offset + 28,
            "pack footer checksum mismatch",
        ));
    }
    check_version(version, location)?;
    let footer = PackFooter {
        version,
        chunk_count,
        table_offset,
        table_crc32,
    };
    if table_offset < PACK_HEADER_LEN as u64
        || table_offset.checked_add(footer.table_len()) != Some(footer_offset)
    {
        return Err(Error::corrupt(
            location,
            footer_offset + 16,
            format!(
                "table of {chunk_count} entries at offset {table_offset} does not end at the footer ({footer_offset})"
            ),
        ));
    }
    Ok(footer)
}

/// Checks a table as the pack stores it (sealed or not) against the footer: its length and
/// crc32, all that a sealed one allows without keys.
pub fn check_stored_table(data: &[u8], footer: &PackFooter, location: &str) -> Result<()> {
    if data.len() as u64 != footer.table_len() {
        return Err(Error::corrupt(
            location,
            footer.table_offset,
            "chunk table length does not match the footer",
        ));
    }
    if crc32fast::hash(data) != footer.table_crc32 {
        return Err(Error::corrupt(
            location,
            footer.table_offset,
            "chunk table checksum mismatch",
        ));
    }
    Ok(())
}

/// The plaintext of a stored chunk table, after [`check_stored_table`]: a version 3 table is
/// opened (with the pack's name `pack` as its associated data); the pack's version must match
/// `protection` ([`check_protection`]).
pub fn open_table<'a>(
    data: &'a [u8],
    footer: &PackFooter,
    protection: &Protection,
    pack: &str,
    location: &str,
) -> Result<Cow<'a, [u8]>> {
    check_protection(footer.version, protection, location, footer.table_offset)?;
    check_stored_table(data, footer, location)?;
    if footer.version == PACK_VERSION_SEALED {
        let opened = protection.open(&table_ad(pack), data, location, footer.table_offset)?;
        return Ok(Cow::Owned(opened));
    }
    Ok(Cow::Borrowed(data))
}

/// Decodes the chunk table as the pack stores it: [`open_table`], then
/// [`decode_plain_table`].
pub fn decode_table(
    data: &[u8],
    footer: &PackFooter,
    protection: &Protection,
    pack: &str,
    location: &str,
) -> Result<Vec<PackEntry>> {
    decode_plain_table(
        &open_table(data, footer, protection, pack, location)?,
        footer,
        location,
    )
}

/// Decodes a chunk table's plaintext; checks that the entries of one frame are consecutive
/// and agree on the frame, that the chunks tile their frame, and that every frame lies inside
/// the data area in increasing order without overlap.
pub fn decode_plain_table(
    data: &[u8],
    footer: &PackFooter,
    location: &str,
) -> Result<Vec<PackEntry>> {
    let v1 = footer.version == PACK_VERSION_V1;
    let mut r = Reader::new(data, footer.table_offset, location);
    let mut entries: Vec<PackEntry> = Vec::with_capacity(footer.chunk_count as usize);
    // The frame being read: its first entry, the raw bytes its entries cover so far, and
    // how many entries it has.
    let mut frame: Option<(PackEntry, u32, u32)> = None;
    let mut next_free = PACK_HEADER_LEN as u64;
    let bad = |at: u64, what: String| Error::corrupt(location, at, what);
    for _ in 0..footer.chunk_count {
        let at = r.offset();
        let id = r.chunk_id("table id")?;
        let offset = r.u64("table frame offset")?;
        let (in_frame, raw_len, stored_len, frame_raw_len) = if v1 {
            let raw = r.u32("table raw length")?;
            let stored = r.u32("table stored length")?;
            (0, raw, stored, raw)
        } else {
            let in_frame = r.u32("table offset in frame")?;
            let raw = r.u32("table raw length")?;
            let stored = r.u32("table frame stored length")?;
            let frame_raw = r.u32("table frame raw length")?;
            (in_frame, raw, stored, frame_raw)
        };
        let code_at = r.offset();
        let code = r.u8("table compression")?;
        r.array::<3>("reserved")?;
        let crc32 = r.u32("table crc32")?;
        let compression = Compression::from_code(code)
            .ok_or_else(|| unknown_compression(code, location, code_at))?;
        check_lengths(
            footer.version,
            frame_raw_len,
            stored_len,
            compression,
            at,
            location,
        )?;
        let e = PackEntry {
            id,
            offset,
            in_frame,
            raw_len,
            stored_len,
            frame_raw_len,
            compression,
            crc32,
        };
        if raw_len == 0 || u64::from(in_frame) + u64::from(raw_len) > u64::from(frame_raw_len) {
            return Err(bad(at, "chunk lies outside its frame".into()));
        }
        match &mut frame {
            Some((first, covered, count)) if first.offset == offset => {
                let same = first.stored_len == stored_len
                    && first.frame_raw_len == frame_raw_len
                    && first.compression == compression
                    && first.crc32 == crc32;
                if v1 || !same || in_frame != *covered {
                    return Err(bad(
                        at,
                        format!("table entries of the frame at {offset} disagree"),
                    ));
                }
                *covered += raw_len;
                *count += 1;
            }
            _ => {
                if let Some((first, covered, count)) = frame.take() {
                    if covered != first.frame_raw_len {
                        return Err(bad(
                            at,
                            format!("the chunks of the frame at {} do not fill it", first.offset),
                        ));
                    }
                    next_free =
                        first.offset + frame_record_len(footer.version, first.stored_len, count);
                }
                if in_frame != 0 || offset < next_free {
                    return Err(bad(
                        at,
                        format!("table entry points at {offset}, overlapping the previous frame"),
                    ));
                }
                frame = Some((e, raw_len, 1));
            }
        }
        entries.push(e);
    }
    if let Some((first, covered, count)) = frame {
        let end = first.offset + frame_record_len(footer.version, first.stored_len, count);
        if covered != first.frame_raw_len || end > footer.table_offset {
            return Err(bad(
                footer.table_offset,
                format!(
                    "the last frame (at {}) is incomplete or runs into the table",
                    first.offset
                ),
            ));
        }
    }
    Ok(entries)
}

/// The table entries of each frame, in pack order.
pub fn frames(entries: &[PackEntry]) -> impl Iterator<Item = &[PackEntry]> {
    entries.chunk_by(|a, b| a.offset == b.offset)
}

/// Checks the start of a frame record (header and stored bytes, as [`RecordLocation::read_len`]
/// fetches them) against what the index or table expects, verifies the crc32 and
/// decompresses. Returns the frame's raw bytes.
/// A sealed frame (version 3) of the pack `pack` is opened (authenticated) first.
pub fn decode_frame(
    record: &[u8],
    expected: &RecordLocation,
    protection: &Protection,
    pack: &str,
    location: &str,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_frame_into(record, expected, protection, pack, location, &mut out)?;
    Ok(out)
}

/// [`decode_frame`] into `out` (cleared first), reusing its allocation.
pub fn decode_frame_into(
    record: &[u8],
    expected: &RecordLocation,
    protection: &Protection,
    pack: &str,
    location: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    check_protection(expected.version, protection, location, expected.offset)?;
    if record.len() as u64 != expected.read_len() {
        return Err(Error::corrupt(
            location,
            expected.offset,
            "frame shorter than its expected length (truncated pack?)",
        ));
    }
    if expected.version == PACK_VERSION_SEALED {
        // Opened in a reused buffer: a fresh one per frame costs page faults.
        return SEALED_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            scratch.clear();
            scratch.extend_from_slice(record);
            decode_sealed_in_place(&mut scratch, expected, protection, pack, location, out)
        });
    }
    let header_len = expected.header_len() as usize;
    let (compression, crc32) = if expected.version == PACK_VERSION_V1 {
        let h = decode_record_header_v1(&record[..header_len], expected.offset, location)?;
        if h.id != expected.id
            || h.raw_len != expected.raw_len
            || h.stored_len != expected.stored_len
        {
            return Err(Error::corrupt(
                location,
                expected.offset,
                format!("record header does not match chunk {}", expected.id),
            ));
        }
        (h.compression, h.crc32)
    } else {
        let h = decode_frame_header(&record[..header_len], expected.offset, location)?;
        if h.raw_len != expected.frame_raw_len || h.stored_len != expected.stored_len {
            return Err(Error::corrupt(
                location,
                expected.offset,
                format!("frame header does not match chunk {}", expected.id),
            ));
        }
        (h.compression, h.crc32)
    };
    unpack_stored(
        &record[header_len..],
        compression,
        crc32,
        expected,
        location,
        out,
    )
}

thread_local! {
    /// Where [`decode_frame_into`] opens a sealed frame it only borrows.
    static SEALED_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`decode_frame_into`] of a frame the caller owns: a sealed frame is opened where it lies
/// (and left decrypted or partly decrypted in `record`), without a copy.
pub fn decode_frame_in_place(
    record: &mut [u8],
    expected: &RecordLocation,
    protection: &Protection,
    pack: &str,
    location: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    if expected.version != PACK_VERSION_SEALED {
        return decode_frame_into(record, expected, protection, pack, location, out);
    }
    out.clear();
    check_protection(expected.version, protection, location, expected.offset)?;
    if record.len() as u64 != expected.read_len() {
        return Err(Error::corrupt(
            location,
            expected.offset,
            "frame shorter than its expected length (truncated pack?)",
        ));
    }
    decode_sealed_in_place(record, expected, protection, pack, location, out)
}

/// Opens a sealed frame in place, checks its header against `expected` and unpacks it.
fn decode_sealed_in_place(
    record: &mut [u8],
    expected: &RecordLocation,
    protection: &Protection,
    pack: &str,
    location: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (plain, h) =
        open_sealed_frame_in_place(protection, pack, expected.offset, record, location)?;
    unpack_opened_frame(plain, &h, expected, location, out)
}

/// Checks an opened frame record (`plain` and its header `h`, as [`open_sealed_frame`] or
/// [`open_sealed_frame_in_place`] return them) against `expected` and decompresses its stored
/// bytes into `out` (cleared first).
pub fn unpack_opened_frame(
    plain: &[u8],
    h: &FrameHeader,
    expected: &RecordLocation,
    location: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    if h.raw_len != expected.frame_raw_len {
        return Err(Error::corrupt(
            location,
            expected.offset,
            format!("frame header does not match chunk {}", expected.id),
        ));
    }
    let stored = FRAME_HEADER_LEN
        .checked_add(h.stored_len as usize)
        .and_then(|end| plain.get(FRAME_HEADER_LEN..end))
        .ok_or_else(|| {
            Error::corrupt(
                location,
                expected.offset,
                "sealed frame shorter than its header says",
            )
        })?;
    unpack_stored(stored, h.compression, h.crc32, expected, location, out)
}

/// Checks a frame's stored bytes against their crc32 and decompresses them into `out`.
fn unpack_stored(
    stored: &[u8],
    compression: Compression,
    crc32: u32,
    expected: &RecordLocation,
    location: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let data_offset = expected.offset + expected.header_len();
    if crc32fast::hash(stored) != crc32 {
        return Err(Error::corrupt(
            location,
            data_offset,
            format!("crc32 mismatch in the frame of chunk {}", expected.id),
        ));
    }
    match compression {
        Compression::None => {
            // Exactly: `out` may be a reused buffer a little too small, which growing by
            // doubling would make twice the frame (a frame's memory is charged by its size).
            out.reserve_exact(stored.len());
            out.extend_from_slice(stored);
            Ok(())
        }
        Compression::Zstd => decompress(stored, expected.frame_raw_len as usize, out)
            .map_err(|why| Error::corrupt(location, data_offset, why)),
    }
}

/// Cuts a chunk out of its decompressed frame and checks its id (`protection`'s: keyed in an
/// encrypted repository).
pub fn chunk_in_frame<'a>(
    frame: &'a [u8],
    expected: &RecordLocation,
    protection: &Protection,
    location: &str,
) -> Result<&'a [u8]> {
    let start = expected.in_frame as usize;
    let data = frame
        .get(start..start.saturating_add(expected.raw_len as usize))
        .filter(|d| d.len() == expected.raw_len as usize && protection.chunk_id(d) == expected.id);
    data.ok_or_else(|| {
        Error::corrupt(
            location,
            expected.offset + expected.header_len(),
            format!("chunk {} does not hash to its id", expected.id),
        )
    })
}

/// [`chunk_in_frame`], copied out.
pub fn chunk_of_frame(
    frame: &[u8],
    expected: &RecordLocation,
    protection: &Protection,
    location: &str,
) -> Result<Vec<u8>> {
    chunk_in_frame(frame, expected, protection, location).map(<[u8]>::to_vec)
}

/// Checks a frame read from the pack `pack` (see [`decode_frame`]) and returns the expected
/// chunk, checked against its id.
pub fn decode_record(
    record: &[u8],
    expected: &RecordLocation,
    protection: &Protection,
    pack: &str,
    location: &str,
) -> Result<Vec<u8>> {
    let frame = decode_frame(record, expected, protection, pack, location)?;
    chunk_of_frame(&frame, expected, protection, location)
}

thread_local! {
    /// One decompression context per thread: creating one per chunk costs an allocation and
    /// table setup that showed in restore profiles.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one zstd frame, whose output must be exactly `raw_len` bytes, into `out`
/// (empty).
fn decompress(stored: &[u8], raw_len: usize, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    out.reserve_exact(raw_len);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let Some(d) = slot.as_mut() else {
            return Err("zstd context missing".to_string());
        };
        // The output is bounded by `out`'s capacity, at least raw_len: a frame that
        // inflates past raw_len is an error below, or here when it exceeds the capacity.
        d.decompress_to_buffer(stored, out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if out.len() != raw_len {
        return Err(format!(
            "decompressed to {} bytes, expected {raw_len}",
            out.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored (uncompressed) frame decoded into a reused buffer a little too small grows
    /// it to the frame's size exactly, not by doubling: frame buffers are charged by size.
    #[test]
    fn a_stored_frame_grows_a_reused_buffer_exactly() -> Result<()> {
        let stored = vec![5u8; 300_000];
        let expected = RecordLocation {
            version: PACK_VERSION,
            id: ChunkId::of(b"frame"),
            offset: 0,
            in_frame: 0,
            raw_len: 300_000,
            stored_len: 300_000,
            frame_raw_len: 300_000,
        };
        let mut out = Vec::with_capacity(290_000);
        unpack_stored(
            &stored,
            Compression::None,
            crc32fast::hash(&stored),
            &expected,
            "test",
            &mut out,
        )?;
        assert_eq!((out.len(), out.capacity()), (300_000, 300_000));
        Ok(())
    }

    #[test]
    fn layout_constants_match_spec() {
        assert_eq!(PACK_HEADER_LEN, 16);
        assert_eq!(RECORD_HEADER_LEN, 48);
        assert_eq!(TABLE_ENTRY_LEN_V1, 56);
        assert_eq!(FRAME_HEADER_LEN, 24);
        assert_eq!(FRAME_LIST_ENTRY_LEN, 36);
        assert_eq!(TABLE_ENTRY_LEN, 64);
        assert_eq!(PACK_FOOTER_LEN, 32);
    }

    /// A pack of `frames` (each a list of chunks), stored uncompressed, and its table.
    fn pack_of(frames: &[&[&[u8]]]) -> (Vec<u8>, Vec<PackEntry>) {
        let mut out = encode_header().to_vec();
        let mut entries = Vec::new();
        for f in frames {
            let offset = out.len() as u64;
            let raw: Vec<u8> = f.concat();
            let list: Vec<(ChunkId, u32)> =
                f.iter().map(|c| (ChunkId::of(c), c.len() as u32)).collect();
            let h = encode_frame(&list, &raw, Compression::None, &mut out);
            let mut in_frame = 0;
            for c in f.iter() {
                entries.push(PackEntry {
                    id: ChunkId::of(c),
                    offset,
                    in_frame,
                    raw_len: c.len() as u32,
                    stored_len: h.stored_len,
                    frame_raw_len: h.raw_len,
                    compression: Compression::None,
                    crc32: h.crc32,
                });
                in_frame += c.len() as u32;
            }
        }
        let table_offset = out.len() as u64;
        out.extend_from_slice(&encode_table_and_footer(&entries, table_offset));
        (out, entries)
    }

    fn read(pack: &[u8], e: &PackEntry, version: u32) -> Result<Vec<u8>> {
        let loc = e.location(version);
        let start = loc.offset as usize;
        let rec = &pack[start..start + loc.read_len() as usize];
        decode_record(rec, &loc, &Protection::Plain, "p", "p")
    }

    #[test]
    fn frames_round_trip_and_damage() -> Result<()> {
        let (a, b, c) = (&b"first"[..], &b"second chunk"[..], &b"third"[..]);
        let (pack, entries) = pack_of(&[&[a, b], &[c]]);
        let footer = decode_footer(
            &pack[pack.len() - PACK_FOOTER_LEN..],
            pack.len() as u64,
            "p",
        )?;
        assert_eq!(footer.version, 2);
        let table = decode_table(
            &pack[footer.table_offset as usize..pack.len() - PACK_FOOTER_LEN],
            &footer,
            &Protection::Plain,
            "p",
            "p",
        )?;
        assert_eq!(table, entries);
        assert_eq!(frames(&table).count(), 2);
        for (e, want) in table.iter().zip([a, b, c]) {
            assert_eq!(read(&pack, e, 2)?, want);
        }
        // The list after the stored bytes names the chunks.
        let h = decode_frame_header(&pack[16..40], 16, "p")?;
        let list_at = 16 + FRAME_HEADER_LEN + h.stored_len as usize;
        let list = decode_frame_list(
            &pack[list_at..list_at + 2 * FRAME_LIST_ENTRY_LEN],
            &h,
            list_at as u64,
            "p",
        )?;
        assert_eq!(list, vec![(ChunkId::of(a), 5), (ChunkId::of(b), 12)]);
        // A flipped stored byte fails the crc of the frame, for every chunk in it.
        let mut bad = pack.clone();
        bad[16 + FRAME_HEADER_LEN + 7] ^= 1;
        for e in &table[..2] {
            let err = read(&bad, e, 2).err();
            assert!(
                matches!(&err, Some(Error::Corrupt { offset: 40, .. })),
                "{err:?}"
            );
        }
        assert_eq!(read(&bad, &table[2], 2)?, c);
        // A table entry pointing into the middle of a frame is refused.
        let mut wrong = table[1];
        wrong.in_frame = 1;
        assert!(read(&pack, &wrong, 2).is_err());
        Ok(())
    }

    #[test]
    fn version_1_packs_read_as_frames_of_one_chunk() -> Result<()> {
        let pack = encode_pack_v1(&[b"old one", b"old two"]);
        assert_eq!(decode_header(&pack[..16], "p")?, 1);
        let footer = decode_footer(
            &pack[pack.len() - PACK_FOOTER_LEN..],
            pack.len() as u64,
            "p",
        )?;
        assert_eq!((footer.version, footer.chunk_count), (1, 2));
        let table = decode_table(
            &pack[footer.table_offset as usize..pack.len() - PACK_FOOTER_LEN],
            &footer,
            &Protection::Plain,
            "p",
            "p",
        )?;
        assert_eq!(table[1].offset, 16 + 48 + 7);
        assert_eq!(frames(&table).count(), 2);
        assert_eq!(read(&pack, &table[1], 1)?, b"old two");
        // Read as version 2, the same bytes are garbage, never a chunk.
        assert!(read(&pack, &table[1], 2).is_err());
        Ok(())
    }

    #[test]
    fn unknown_compression_is_unsupported_not_damage() {
        let (pack, _) = pack_of(&[&[b"aaaa", b"bbbbbb"]]);
        let mut header = pack[16..16 + FRAME_HEADER_LEN].to_vec();
        header[12] = 9;
        let err = decode_frame_header(&header, 16, "p").err();
        assert!(
            matches!(&err, Some(Error::Unsupported { what }) if what.contains("compression code 9")),
            "{err:?}"
        );
    }

    #[test]
    fn footer_and_table_damage_is_refused() -> Result<()> {
        let (pack, _) = pack_of(&[&[b"aaaa", b"bbbbbb"]]);
        let len = pack.len() as u64;
        let footer_bytes = &pack[pack.len() - PACK_FOOTER_LEN..];
        // A footer that claims a different pack length is refused.
        assert!(decode_footer(footer_bytes, len + 1, "p").is_err());
        let footer = decode_footer(footer_bytes, len, "p")?;
        let mut table = pack[footer.table_offset as usize..pack.len() - PACK_FOOTER_LEN].to_vec();
        table[40] ^= 1;
        assert!(decode_table(&table, &footer, &Protection::Plain, "p", "p").is_err());
        Ok(())
    }
}
