//! Building packs in memory and reading chunks back out of them.
//!
//! A pack is assembled in memory up to the repository's target size (bounded memory), then
//! handed to the backend whole, so it is either completely stored or absent. Chunk reads fetch
//! exactly one record and check it end to end (crc32, decompression, BLAKE3) before returning
//! bytes: restore never sees unverified data.

use std::cell::RefCell;

use super::{pack_key, Backend};
use crate::error::{Error, Result};
use crate::format::pack::{
    decode_footer, decode_record, decode_table, encode_header, encode_record_header,
    encode_table_and_footer, Compression, PackEntry, RecordLocation, PACK_FOOTER_LEN,
    PACK_HEADER_LEN,
};
use crate::format::{hex, ChunkId};

/// A pack being filled.
#[derive(Debug)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to be stored.
#[derive(Debug)]
pub struct FinishedPack {
    /// Random 128-bit name in hex.
    pub name: String,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn new(capacity: usize) -> Self {
        Self::reusing(Vec::with_capacity(capacity))
    }

    /// A pack writer that fills `buf` (cleared first), reusing its allocation.
    pub fn reusing(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&encode_header());
        PackWriter {
            buf,
            entries: Vec::new(),
        }
    }

    /// Appends a chunk. `stored` is the chunk encoded as `compression` says.
    pub fn add(&mut self, id: ChunkId, raw_len: u32, stored: &[u8], compression: Compression) {
        let entry = PackEntry {
            id,
            offset: self.buf.len() as u64,
            raw_len,
            stored_len: stored.len() as u32,
            compression,
            crc32: crc32fast::hash(stored),
        };
        encode_record_header(&entry, &mut self.buf);
        self.buf.extend_from_slice(stored);
        self.entries.push(entry);
    }

    /// Bytes so far (without table and footer).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends table and footer and names the pack.
    pub fn finish(mut self) -> Result<FinishedPack> {
        let table_offset = self.buf.len() as u64;
        let tail = encode_table_and_footer(&self.entries, table_offset);
        self.buf.extend_from_slice(&tail);
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| {
            Error::io(
                "draw a random pack name",
                "/dev/urandom",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(FinishedPack {
            name: hex(&id),
            bytes: self.buf,
            entries: self.entries,
        })
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

/// Compresses a chunk with zstd at `level`, reusing a per-thread context. A chunk that does
/// not shrink is stored as is.
pub fn compress(data: &[u8], level: i32) -> Result<(Compression, Vec<u8>)> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::io("create zstd context", "zstd", e))?;
            *slot = Some((level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return Err(Error::InvalidArgument("zstd context missing".into()));
        };
        let out = c
            .compress(data)
            .map_err(|e| Error::io("compress chunk", "zstd", e))?;
        if out.len() < data.len() {
            Ok((Compression::Zstd, out))
        } else {
            Ok((Compression::None, data.to_vec()))
        }
    })
}

/// Reads one chunk from a pack and verifies it.
pub fn read_chunk(backend: &dyn Backend, pack: &str, entry: &RecordLocation) -> Result<Vec<u8>> {
    let len = usize::try_from(entry.record_len())
        .map_err(|_| Error::corrupt(format!("pack {pack}"), entry.offset, "record too large"))?;
    let record = backend
        .get_range(&pack_key(pack), entry.offset, len)
        .map_err(|e| missing_pack(e, pack, entry.offset))?;
    decode_record(&record, entry, &format!("pack {pack}"))
}

/// A pack the index names but the backend does not have is damage, not an I/O failure.
fn missing_pack(e: Error, pack: &str, offset: u64) -> Error {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::corrupt(format!("pack {pack}"), offset, "the pack file is missing")
        }
        other => other,
    }
}

/// Reads and checks a pack's footer and chunk table.
pub fn read_pack_table(backend: &dyn Backend, pack: &str) -> Result<Vec<PackEntry>> {
    let key = pack_key(pack);
    let location = format!("pack {pack}");
    let size = backend.size(&key).map_err(|e| missing_pack(e, pack, 0))?;
    if size < (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64 {
        return Err(Error::corrupt(
            &location,
            0,
            format!("pack is only {size} bytes"),
        ));
    }
    let header = backend.get_range(&key, 0, PACK_HEADER_LEN)?;
    crate::format::pack::decode_header(&header, &location)?;
    let footer_bytes = backend.get_range(&key, size - PACK_FOOTER_LEN as u64, PACK_FOOTER_LEN)?;
    let footer = decode_footer(&footer_bytes, size, &location)?;
    let table_len = usize::try_from(footer.table_len())
        .map_err(|_| Error::corrupt(&location, footer.table_offset, "table too large"))?;
    let table = backend.get_range(&key, footer.table_offset, table_len)?;
    decode_table(&table, &footer, &location)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalDir;

    #[test]
    fn write_and_read_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let backend = LocalDir::new(dir.path());
        let mut w = PackWriter::new(1 << 20);
        let chunks: Vec<Vec<u8>> = vec![vec![7u8; 50_000], (0..=255u8).collect()];
        for c in &chunks {
            let (comp, stored) = compress(c, 3)?;
            w.add(ChunkId::of(c), c.len() as u32, &stored, comp);
        }
        let p = w.finish()?;
        assert_eq!(p.entries[0].compression, Compression::Zstd);
        assert_eq!(p.entries[1].compression, Compression::None);
        backend.put(&pack_key(&p.name), &p.bytes)?;
        let table = read_pack_table(&backend, &p.name)?;
        assert_eq!(table, p.entries);
        for (e, c) in table.iter().zip(&chunks) {
            assert_eq!(&read_chunk(&backend, &p.name, &e.location())?, c);
        }
        Ok(())
    }
}
