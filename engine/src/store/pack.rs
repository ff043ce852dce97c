//! Building packs in memory and reading chunks back out of them.
//!
//! A pack is assembled in memory up to the repository's target size (bounded memory), then
//! handed to the backend whole, so it is either completely stored or absent. Chunk reads fetch
//! exactly one frame and check it end to end (crc32, decompression, BLAKE3) before returning
//! bytes: restore never sees unverified data. A [`FrameCache`] keeps the last decompressed
//! frames of one reader, so reading the chunks of a frame in order decompresses it once.

use std::cell::RefCell;

use super::{pack_key, Backend};
use crate::error::{Error, Result};
use crate::format::pack::{
    chunk_in_frame, decode_footer, decode_frame_into, decode_table, encode_frame, encode_header,
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

    /// Appends a frame: `chunks` (id, raw length) in frame order, whose concatenation is
    /// `stored` encoded as `compression` says. Returns the table entries of its chunks.
    pub fn add_frame(
        &mut self,
        chunks: &[(ChunkId, u32)],
        stored: &[u8],
        compression: Compression,
    ) -> &[PackEntry] {
        let offset = self.buf.len() as u64;
        let h = encode_frame(chunks, stored, compression, &mut self.buf);
        let first = self.entries.len();
        let mut in_frame = 0;
        for (id, raw_len) in chunks {
            self.entries.push(PackEntry {
                id: *id,
                offset,
                in_frame,
                raw_len: *raw_len,
                stored_len: h.stored_len,
                frame_raw_len: h.raw_len,
                compression,
                crc32: h.crc32,
            });
            in_frame += raw_len;
        }
        &self.entries[first..]
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

/// Compresses a frame with zstd at `level`, reusing a per-thread context. A frame that does
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
            return Err(Error::Internal("zstd context missing".into()));
        };
        let out = c
            .compress(data)
            .map_err(|e| Error::io("compress frame", "zstd", e))?;
        if out.len() < data.len() {
            Ok((Compression::Zstd, out))
        } else {
            Ok((Compression::None, data.to_vec()))
        }
    })
}

/// The last few decompressed (and crc-checked) frames of one reader, by (pack, offset).
/// Packs are immutable and never renamed, so an entry never goes stale; a cache lives as long
/// as one reader's pass (a segment of a restore or verify), so damage done to a pack later is
/// seen by the next pass.
#[derive(Debug, Default)]
pub struct FrameCache {
    frames: Vec<(String, u64, Vec<u8>)>,
    /// A buffer to decompress the next frame into (an evicted frame's).
    spare: Vec<u8>,
    /// Frames decompressed (cache misses), for tests and profiles.
    pub decoded: u64,
    /// Where the last chunk served from a kept frame ended: (slot, offset in the frame). A
    /// sequential read's next chunk usually starts there (see [`FrameCache::next_chunk`]).
    next: Option<(usize, usize)>,
}

/// Frames a [`FrameCache`] keeps: chunks of one segment's frames are read in order, so one
/// would do; a few more catch chunks deduplicated against recently read frames.
const FRAME_CACHE_SLOTS: usize = 4;

impl FrameCache {
    fn position(&self, pack: &str, offset: u64) -> Option<usize> {
        self.frames
            .iter()
            .position(|(p, o, _)| *o == offset && p == pack)
    }

    /// Keeps `frame`, evicting the oldest into `spare`; returns its slot.
    fn put(&mut self, pack: &str, offset: u64, frame: Vec<u8>) -> usize {
        if self.frames.len() >= FRAME_CACHE_SLOTS {
            self.spare = self.frames.remove(0).2;
            self.next = match self.next {
                Some((slot, end)) if slot > 0 => Some((slot - 1, end)),
                _ => None,
            };
        }
        self.frames.push((pack.to_string(), offset, frame));
        self.frames.len() - 1
    }

    /// The chunk `id` of `len` bytes if it directly follows the last chunk served from a kept
    /// frame, found without an index lookup: consecutive new chunks of a backup share frames
    /// in disk order, so a restore's next chunk is mostly there. The bytes are checked
    /// against `id` (BLAKE3) like every chunk read; on a mismatch the caller looks it up.
    pub fn next_chunk(&mut self, id: &ChunkId, len: u32) -> Option<&[u8]> {
        let (slot, end) = self.next?;
        let range = end..end.checked_add(len as usize)?;
        let data = self.frames.get(slot)?.2.get(range.clone())?;
        if ChunkId::of(data) != *id {
            return None;
        }
        self.next = Some((slot, range.end));
        self.frames.get(slot).map(|f| &f.2[range])
    }
}

/// Reads one chunk from a pack and verifies it.
pub fn read_chunk(backend: &dyn Backend, pack: &str, entry: &RecordLocation) -> Result<Vec<u8>> {
    with_chunk(backend, pack, entry, &mut FrameCache::default(), |d| {
        Ok(d.to_vec())
    })
}

/// Reads one chunk from a pack, verifies it and hands it to `f`, decompressing its frame
/// only if `cache` does not hold it already.
pub fn with_chunk<R>(
    backend: &dyn Backend,
    pack: &str,
    entry: &RecordLocation,
    cache: &mut FrameCache,
    f: impl FnOnce(&[u8]) -> Result<R>,
) -> Result<R> {
    let location = format!("pack {pack}");
    let end = entry.in_frame as usize + entry.raw_len as usize;
    if let Some(i) = cache.position(pack, entry.offset) {
        cache.next = Some((i, end));
        return f(chunk_in_frame(&cache.frames[i].2, entry, &location)?);
    }
    let len = usize::try_from(entry.read_len())
        .map_err(|_| Error::corrupt(&location, entry.offset, "frame too large"))?;
    let record = backend
        .get_range(&pack_key(pack), entry.offset, len)
        .map_err(|e| missing_pack(e, pack, entry.offset))?;
    // Decompress into a reused buffer: fresh 256 KiB buffers cost page faults.
    let mut frame = std::mem::take(&mut cache.spare);
    decode_frame_into(&record, entry, &location, &mut frame)?;
    cache.decoded += 1;
    // A chunk alone in its frame is never read again by the same pass.
    if entry.frame_raw_len == entry.raw_len {
        let result = chunk_in_frame(&frame, entry, &location).and_then(f);
        cache.spare = frame;
        cache.next = None;
        return result;
    }
    let slot = cache.put(pack, entry.offset, frame);
    cache.next = Some((slot, end));
    f(chunk_in_frame(&cache.frames[slot].2, entry, &location)?)
}

/// A pack the index names but the backend does not have is damage, not an I/O failure.
fn missing_pack(e: Error, pack: &str, offset: u64) -> Error {
    match e {
        Error::NotFound { .. } => {
            Error::corrupt(format!("pack {pack}"), offset, "the pack file is missing")
        }
        other => other,
    }
}

/// A pack's table: its format version and one entry per chunk, in pack order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackTable {
    pub version: u32,
    pub entries: Vec<PackEntry>,
}

/// Reads and checks a pack's header, footer and chunk table.
pub fn read_pack_table(backend: &dyn Backend, pack: &str) -> Result<PackTable> {
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
    let version = crate::format::pack::decode_header(&header, &location)?;
    let footer_bytes = backend.get_range(&key, size - PACK_FOOTER_LEN as u64, PACK_FOOTER_LEN)?;
    let footer = decode_footer(&footer_bytes, size, &location)?;
    let table_len = usize::try_from(footer.table_len())
        .map_err(|_| Error::corrupt(&location, footer.table_offset, "table too large"))?;
    if footer.version != version {
        return Err(Error::corrupt(
            &location,
            size - PACK_FOOTER_LEN as u64,
            format!(
                "footer version {} differs from header version {version}",
                footer.version
            ),
        ));
    }
    let table = backend.get_range(&key, footer.table_offset, table_len)?;
    let entries = decode_table(&table, &footer, &location)?;
    Ok(PackTable { version, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::PACK_VERSION;
    use crate::store::LocalDir;

    #[test]
    fn write_and_read_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let backend = LocalDir::new(dir.path());
        let mut w = PackWriter::new(1 << 20);
        let chunks: Vec<Vec<u8>> = vec![
            vec![7u8; 50_000],
            b"a second chunk in the same frame".repeat(100),
            (0..=255u8).collect(),
        ];
        let (comp, stored) = compress(&chunks[..2].concat(), 3)?;
        let list: Vec<(ChunkId, u32)> = chunks[..2]
            .iter()
            .map(|c| (ChunkId::of(c), c.len() as u32))
            .collect();
        w.add_frame(&list, &stored, comp);
        let (comp, stored) = compress(&chunks[2], 3)?;
        w.add_frame(&[(ChunkId::of(&chunks[2]), 256)], &stored, comp);
        let p = w.finish()?;
        assert_eq!(p.entries[0].compression, Compression::Zstd);
        assert_eq!(p.entries[1].in_frame, 50_000);
        assert_eq!(p.entries[2].compression, Compression::None);
        backend.put(&pack_key(&p.name), &p.bytes)?;
        let table = read_pack_table(&backend, &p.name)?;
        assert_eq!(table.entries, p.entries);
        let mut cache = FrameCache::default();
        for (e, c) in table.entries.iter().zip(&chunks) {
            let loc = e.location(PACK_VERSION);
            let got = with_chunk(&backend, &p.name, &loc, &mut cache, |d| Ok(d.to_vec()))?;
            assert_eq!(&got, c);
            assert_eq!(&read_chunk(&backend, &p.name, &loc)?, c);
        }
        // Two frames, each decompressed once however many chunks were read from it.
        assert_eq!(cache.decoded, 2);

        // After the first chunk, the second follows in its frame: found without a lookup,
        // and only under its own id and length.
        let mut cache = FrameCache::default();
        let (id0, id1) = (ChunkId::of(&chunks[0]), ChunkId::of(&chunks[1]));
        assert!(cache.next_chunk(&id0, 50_000).is_none());
        let first = table.entries[0].location(PACK_VERSION);
        with_chunk(&backend, &p.name, &first, &mut cache, |_| Ok(()))?;
        assert!(cache.next_chunk(&id0, chunks[1].len() as u32).is_none());
        assert!(cache.next_chunk(&id1, chunks[1].len() as u32 - 1).is_none());
        assert_eq!(
            cache.next_chunk(&id1, chunks[1].len() as u32),
            Some(chunks[1].as_slice())
        );
        // The frame is used up: nothing follows.
        let id2 = ChunkId::of(&chunks[2]);
        assert!(cache.next_chunk(&id2, 256).is_none());
        assert_eq!(cache.decoded, 1);
        Ok(())
    }
}
