//! Pack files: many stored chunks, then a table of them, then a fixed footer.
//!
//! A pack is self-describing: the footer locates the table, the table lists every chunk
//! (id, offset, lengths, compression, crc32), and every record repeats its own header, so the
//! index can be rebuilt from packs alone and a damaged table does not lose the chunks. The
//! crc32 of a record covers its stored bytes, so a scrub can check a pack without
//! decompressing anything.

use super::{ChunkId, Reader, CHUNK_ID_LEN};
use crate::error::{Error, Result};

/// Magic at offset 0 of a pack.
pub const PACK_MAGIC: [u8; 8] = *b"SVPACK\0\x01";
/// Magic at the start of the pack footer.
pub const PACK_FOOTER_MAGIC: [u8; 8] = *b"SVPKEND\x01";
/// The pack format version this build writes and the newest it reads.
pub const PACK_VERSION: u32 = 1;

/// Pack header: magic (8), version (4), reserved (4).
pub const PACK_HEADER_LEN: usize = 16;
/// Record header: id (32), raw_len (4), stored_len (4), compression (1), reserved (3), crc32 (4).
pub const RECORD_HEADER_LEN: usize = CHUNK_ID_LEN + 4 + 4 + 1 + 3 + 4;
/// Table entry: id (32), record offset (8), raw_len (4), stored_len (4), compression (1),
/// reserved (3), crc32 (4).
pub const TABLE_ENTRY_LEN: usize = CHUNK_ID_LEN + 8 + 4 + 4 + 1 + 3 + 4;
/// Footer: magic (8), version (4), chunk count (4), table offset (8), table crc32 (4),
/// footer crc32 (4).
pub const PACK_FOOTER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// Largest raw chunk any pack may hold; bounds allocations when decoding.
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;

/// How a record's stored bytes encode the chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (used when zstd does not shrink the chunk).
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

/// What the pack table (and each record header) says about one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Offset of the record header from the start of the pack.
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
    pub compression: Compression,
    /// crc32 (IEEE) of the stored bytes.
    pub crc32: u32,
}

impl PackEntry {
    /// Bytes the record occupies in the pack: header plus stored bytes.
    pub fn record_len(&self) -> u64 {
        self.location().record_len()
    }

    /// Where the record is and what it must contain.
    pub fn location(&self) -> RecordLocation {
        RecordLocation {
            id: self.id,
            offset: self.offset,
            raw_len: self.raw_len,
            stored_len: self.stored_len,
        }
    }
}

/// What a reader knows about a record before reading it (from the index or the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub id: ChunkId,
    /// Offset of the record header from the start of the pack.
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
}

impl RecordLocation {
    /// Bytes the record occupies in the pack: header plus stored bytes.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// The pack header.
pub fn encode_header() -> [u8; PACK_HEADER_LEN] {
    let mut b = [0u8; PACK_HEADER_LEN];
    b[..8].copy_from_slice(&PACK_MAGIC);
    b[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    b
}

/// Checks the pack header.
pub fn decode_header(data: &[u8], location: &str) -> Result<()> {
    let mut r = Reader::new(data, 0, location);
    if r.array::<8>("pack magic")? != PACK_MAGIC {
        return Err(Error::corrupt(location, 0, "bad pack magic"));
    }
    check_version(r.u32("pack version")?, location)
}

fn check_version(version: u32, location: &str) -> Result<()> {
    if version == 0 || version > PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            what: format!("pack {location}"),
            found: version,
            supported: PACK_VERSION,
        });
    }
    Ok(())
}

/// Encodes a record header into `out`.
pub fn encode_record_header(e: &PackEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&e.id.0);
    out.extend_from_slice(&e.raw_len.to_le_bytes());
    out.extend_from_slice(&e.stored_len.to_le_bytes());
    out.push(e.compression as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&e.crc32.to_le_bytes());
}

/// Decodes a record header found at `offset` of a pack.
pub fn decode_record_header(data: &[u8], offset: u64, location: &str) -> Result<PackEntry> {
    let mut r = Reader::new(data, offset, location);
    let id = r.chunk_id("record id")?;
    let raw_len = r.u32("record raw length")?;
    let stored_len = r.u32("record stored length")?;
    let code = r.u8("record compression")?;
    r.array::<3>("reserved")?;
    let crc32 = r.u32("record crc32")?;
    let compression = Compression::from_code(code).ok_or_else(|| {
        Error::corrupt(
            location,
            offset + 40,
            format!("unknown compression code {code}"),
        )
    })?;
    let e = PackEntry {
        id,
        offset,
        raw_len,
        stored_len,
        compression,
        crc32,
    };
    check_lengths(&e, location)?;
    Ok(e)
}

fn check_lengths(e: &PackEntry, location: &str) -> Result<()> {
    if e.raw_len == 0 || e.raw_len > MAX_CHUNK_LEN || e.stored_len > MAX_CHUNK_LEN + 1024 {
        return Err(Error::corrupt(
            location,
            e.offset,
            format!(
                "chunk lengths out of range: raw {} stored {}",
                e.raw_len, e.stored_len
            ),
        ));
    }
    if e.compression == Compression::None && e.raw_len != e.stored_len {
        return Err(Error::corrupt(
            location,
            e.offset,
            "uncompressed chunk whose stored and raw lengths differ",
        ));
    }
    Ok(())
}

/// Encodes the chunk table followed by the footer. `table_offset` is where the table starts.
pub fn encode_table_and_footer(entries: &[PackEntry], table_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * TABLE_ENTRY_LEN + PACK_FOOTER_LEN);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.push(e.compression as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&e.crc32.to_le_bytes());
    }
    let table_crc = crc32fast::hash(&out);
    let footer = encode_footer(entries.len() as u32, table_offset, table_crc);
    out.extend_from_slice(&footer);
    out
}

/// What the footer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackFooter {
    pub chunk_count: u32,
    pub table_offset: u64,
    pub table_crc32: u32,
}

impl PackFooter {
    /// Length of the chunk table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.chunk_count) * TABLE_ENTRY_LEN as u64
    }
}

/// Encodes a footer.
pub fn encode_footer(
    chunk_count: u32,
    table_offset: u64,
    table_crc32: u32,
) -> [u8; PACK_FOOTER_LEN] {
    let mut b = [0u8; PACK_FOOTER_LEN];
    b[0..8].copy_from_slice(&PACK_FOOTER_MAGIC);
    b[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
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

/// Decodes the chunk table; checks its crc and that every record lies inside the data area
/// in increasing order without overlap.
pub fn decode_table(data: &[u8], footer: &PackFooter, location: &str) -> Result<Vec<PackEntry>> {
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
    let mut r = Reader::new(data, footer.table_offset, location);
    let mut entries = Vec::with_capacity(footer.chunk_count as usize);
    let mut next_free = PACK_HEADER_LEN as u64;
    for _ in 0..footer.chunk_count {
        let at = r.offset();
        let id = r.chunk_id("table id")?;
        let offset = r.u64("table record offset")?;
        let raw_len = r.u32("table raw length")?;
        let stored_len = r.u32("table stored length")?;
        let code = r.u8("table compression")?;
        r.array::<3>("reserved")?;
        let crc32 = r.u32("table crc32")?;
        let compression = Compression::from_code(code).ok_or_else(|| {
            Error::corrupt(location, at + 56, format!("unknown compression {code}"))
        })?;
        let e = PackEntry {
            id,
            offset,
            raw_len,
            stored_len,
            compression,
            crc32,
        };
        check_lengths(&e, location)?;
        if offset < next_free || offset + e.record_len() > footer.table_offset {
            return Err(Error::corrupt(
                location,
                at,
                format!("table entry points at {offset}, outside the record area or overlapping"),
            ));
        }
        next_free = offset + e.record_len();
        entries.push(e);
    }
    Ok(entries)
}

/// Checks a record read from a pack against what the index or table expects, verifies the
/// crc32, decompresses and checks the BLAKE3 id. Returns the chunk's bytes.
pub fn decode_record(record: &[u8], expected: &RecordLocation, location: &str) -> Result<Vec<u8>> {
    if record.len() as u64 != expected.record_len() {
        return Err(Error::corrupt(
            location,
            expected.offset,
            "record shorter than its expected length (truncated pack?)",
        ));
    }
    let header = decode_record_header(&record[..RECORD_HEADER_LEN], expected.offset, location)?;
    if header.id != expected.id
        || header.raw_len != expected.raw_len
        || header.stored_len != expected.stored_len
    {
        return Err(Error::corrupt(
            location,
            expected.offset,
            format!("record header does not match chunk {}", expected.id),
        ));
    }
    let stored = &record[RECORD_HEADER_LEN..];
    let data_offset = expected.offset + RECORD_HEADER_LEN as u64;
    if crc32fast::hash(stored) != header.crc32 {
        return Err(Error::corrupt(
            location,
            data_offset,
            format!("crc32 mismatch in chunk {}", expected.id),
        ));
    }
    let data = match header.compression {
        Compression::None => stored.to_vec(),
        Compression::Zstd => decompress(stored, header.raw_len as usize)
            .map_err(|why| Error::corrupt(location, data_offset, why))?,
    };
    if data.len() != expected.raw_len as usize || ChunkId::of(&data) != expected.id {
        return Err(Error::corrupt(
            location,
            data_offset,
            format!("chunk {} does not hash to its id", expected.id),
        ));
    }
    Ok(data)
}

thread_local! {
    /// One decompression context per thread: creating one per chunk costs an allocation and
    /// table setup that showed in restore profiles.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one zstd frame whose output must be exactly `raw_len` bytes.
fn decompress(stored: &[u8], raw_len: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw_len);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let Some(d) = slot.as_mut() else {
            return Err("zstd context missing".to_string());
        };
        // Capacity raw_len bounds the output: a frame that inflates past it is an error.
        d.decompress_to_buffer(stored, &mut out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if out.len() != raw_len {
        return Err(format!(
            "decompressed to {} bytes, expected {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_constants_match_spec() {
        assert_eq!(PACK_HEADER_LEN, 16);
        assert_eq!(RECORD_HEADER_LEN, 48);
        assert_eq!(TABLE_ENTRY_LEN, 56);
        assert_eq!(PACK_FOOTER_LEN, 32);
    }

    fn entry(data: &[u8], offset: u64) -> PackEntry {
        PackEntry {
            id: ChunkId::of(data),
            offset,
            raw_len: data.len() as u32,
            stored_len: data.len() as u32,
            compression: Compression::None,
            crc32: crc32fast::hash(data),
        }
    }

    #[test]
    fn record_round_trip_and_damage() {
        let data = b"hello pack".to_vec();
        let e = entry(&data, 16);
        let mut rec = Vec::new();
        encode_record_header(&e, &mut rec);
        rec.extend_from_slice(&data);
        assert_eq!(
            decode_record(&rec, &e.location(), "p").ok(),
            Some(data.clone())
        );
        let mut bad = rec.clone();
        bad[RECORD_HEADER_LEN + 2] ^= 0x10;
        let err = decode_record(&bad, &e.location(), "p").err();
        assert!(
            matches!(&err, Some(Error::Corrupt { offset: 64, .. })),
            "{err:?}"
        );
        assert!(decode_record(&rec[..rec.len() - 1], &e.location(), "p").is_err());
    }

    #[test]
    fn footer_and_table_round_trip() {
        let a = entry(b"aaaa", 16);
        let b = entry(b"bbbbbb", 16 + a.record_len());
        let table_offset = b.offset + b.record_len();
        let tail = encode_table_and_footer(&[a, b], table_offset);
        let pack_len = table_offset + tail.len() as u64;
        let f = decode_footer(&tail[tail.len() - PACK_FOOTER_LEN..], pack_len, "p");
        let f = f.ok();
        assert_eq!(f.map(|f| f.chunk_count), Some(2));
        let Some(f) = f else { return };
        let t = decode_table(&tail[..tail.len() - PACK_FOOTER_LEN], &f, "p").ok();
        assert_eq!(t, Some(vec![a, b]));
        // A footer that claims a different pack length is refused.
        assert!(decode_footer(&tail[tail.len() - PACK_FOOTER_LEN..], pack_len + 1, "p").is_err());
    }
}
