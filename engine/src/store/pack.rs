//! Building packs in memory and reading chunks back out of them.
//!
//! A pack is assembled in memory up to the repository's target size (bounded memory), then
//! handed to the backend whole, so it is either completely stored or absent. In an encrypted
//! repository each frame is sealed under the pack's name (drawn when the writer starts) and
//! its offset, and the table after them (format version 3, see `format::pack`). A frame is
//! encoded into the pack where it will stay, between room for its nonce and its tag, and
//! sealed there as soon as it is added, while its bytes are still in the writer's cache: one
//! copy per frame, as for a plain pack, and one cipher pass. (Sealing whole packs later on
//! rayon's threads, as before, read every frame back from memory and woke two more threads
//! per pack to compete with the compressing workers.) Reading chunks back
//! (one frame fetched and checked end to end before any byte is used) is `read::verified`'s
//! job, the one verified chunk path; this module only reads a pack's table.

use std::cell::RefCell;

use super::{pack_key, Backend};
use crate::crypto::Protection;
use crate::error::{Error, Result};

use crate::crypto::{NONCE_LEN, TAG_LEN};
use crate::format::pack::{
    decode_footer, decode_table, encode_frame, encode_header_for, encode_sealed_table_and_footer,
    encode_table_and_footer, pack_version_for, seal_frame_in_place, Compression, PackEntry,
    PACK_FOOTER_LEN, PACK_HEADER_LEN, PACK_VERSION_SEALED,
};
use crate::format::{hex, ChunkId};

/// A pack being filled.
#[derive(Debug)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    /// The pack's random name, drawn when the writer starts: sealed frames are bound to it.
    name: String,
    /// The pack's format version: 3 (sealed) when the repository is encrypted.
    version: u32,
}

/// A finished pack, ready to be stored.
#[derive(Debug)]
pub struct FinishedPack {
    /// Random 128-bit name in hex.
    pub name: String,
    /// Format version (2 plain, 3 sealed).
    pub version: u32,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

/// A random 128-bit pack name in hex.
fn random_pack_name() -> Result<String> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| {
        Error::io(
            "draw a random pack name",
            "/dev/urandom",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(hex(&id))
}

impl PackWriter {
    /// A writer of a pack of the repository whose protection is `protection` (a sealed pack
    /// when it is encrypted).
    pub fn new(capacity: usize, protection: &Protection) -> Result<Self> {
        Self::reusing(Vec::with_capacity(capacity), protection)
    }

    /// A pack writer that fills `buf` (cleared first), reusing its allocation.
    pub fn reusing(mut buf: Vec<u8>, protection: &Protection) -> Result<Self> {
        let version = pack_version_for(protection);
        buf.clear();
        buf.extend_from_slice(&encode_header_for(version));
        Ok(PackWriter {
            buf,
            entries: Vec::new(),
            name: random_pack_name()?,
            version,
        })
    }

    /// The pack's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn same_protection(&self, protection: &Protection) -> Result<()> {
        if pack_version_for(protection) != self.version {
            return Err(Error::Internal(format!(
                "pack {} of format {} written with another repository's protection",
                self.name, self.version
            )));
        }
        Ok(())
    }

    /// Appends a frame: `chunks` (id, raw length) in frame order, whose concatenation is
    /// `stored` encoded as `compression` says, sealed at once when `protection` (the one the
    /// writer was made with) is encrypted. Returns the table entries of its chunks.
    pub fn add_frame(
        &mut self,
        protection: &Protection,
        chunks: &[(ChunkId, u32)],
        stored: &[u8],
        compression: Compression,
    ) -> Result<&[PackEntry]> {
        self.same_protection(protection)?;
        let offset = self.buf.len() as u64;
        let (h, stored_len) = if self.version == PACK_VERSION_SEALED {
            // Encoded in place between room for its nonce and its tag, and sealed there at
            // once, while the frame is still in this core's cache: one copy of the frame, as
            // in a plain pack, and one pass of the cipher over bytes just written.
            let start = self.buf.len();
            self.buf.resize(start + NONCE_LEN, 0);
            let h = encode_frame(chunks, stored, compression, &mut self.buf);
            self.buf.resize(self.buf.len() + TAG_LEN, 0);
            // `start` was the length before this frame: the slice is the frame just encoded.
            let sealed = &mut self.buf[start..];
            seal_frame_in_place(protection, &self.name, offset, sealed)?;
            let len = u32::try_from(sealed.len())
                .map_err(|_| Error::Internal("sealed frame larger than 4 GiB".into()))?;
            (h, len)
        } else {
            let h = encode_frame(chunks, stored, compression, &mut self.buf);
            (h, h.stored_len)
        };
        let first = self.entries.len();
        let mut in_frame = 0;
        for (id, raw_len) in chunks {
            self.entries.push(PackEntry {
                id: *id,
                offset,
                in_frame,
                raw_len: *raw_len,
                stored_len,
                frame_raw_len: h.raw_len,
                compression,
                crc32: h.crc32,
            });
            in_frame += raw_len;
        }
        Ok(&self.entries[first..])
    }

    /// Bytes so far (without table and footer).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the table (sealed when the pack is) and the footer.
    pub fn finish(mut self, protection: &Protection) -> Result<FinishedPack> {
        self.same_protection(protection)?;
        let table_offset = self.buf.len() as u64;
        let tail = if self.version == PACK_VERSION_SEALED {
            encode_sealed_table_and_footer(&self.entries, table_offset, protection, &self.name)?
        } else {
            encode_table_and_footer(&self.entries, table_offset)
        };
        self.buf.extend_from_slice(&tail);
        Ok(FinishedPack {
            name: self.name,
            version: self.version,
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
        let mut out = c
            .compress(data)
            .map_err(|e| Error::io("compress frame", "zstd", e))?;
        if out.len() < data.len() {
            // zstd allocates the worst case (a little over `data`), and a frame waits in the
            // backup's reorder window until its pack takes it: it keeps only its bytes (a 4 GiB
            // gen0's frames compress to 39%). Shrinking splits the block in place, no copy.
            out.shrink_to_fit();
            Ok((Compression::Zstd, out))
        } else {
            Ok((Compression::None, data.to_vec()))
        }
    })
}

/// A pack the index names but the backend does not have is damage, not an I/O failure.
pub(crate) fn missing_pack(e: Error, pack: &str, offset: u64) -> Error {
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

/// Reads and checks a pack's header, footer and chunk table (opening it when sealed).
pub fn read_pack_table(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
) -> Result<PackTable> {
    let key = pack_key(pack)?;
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
    let entries = decode_table(&table, &footer, protection, pack, &location)?;
    Ok(PackTable { version, entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{MasterSecret, RepoKeys};
    use crate::format::pack::{frame_record_len, PACK_VERSION};
    use crate::read::verified::{read_chunk, with_cached_chunk as with_chunk, FrameCache};
    use crate::store::LocalDir;

    fn encrypted(seed: u8) -> Protection {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [seed; 32],
        ))))
    }

    fn chunks() -> Vec<Vec<u8>> {
        vec![
            vec![7u8; 50_000],
            b"a second chunk in the same frame".repeat(100),
            (0..=255u8).collect(),
        ]
    }

    /// A pack of two frames (the first two chunks, then the third) stored in `backend`.
    fn stored_pack(backend: &dyn Backend, keys: &Protection) -> Result<FinishedPack> {
        let chunks = chunks();
        let mut w = PackWriter::new(1 << 20, keys)?;
        let (comp, stored) = compress(&chunks[..2].concat(), 3)?;
        let list: Vec<(ChunkId, u32)> = chunks[..2]
            .iter()
            .map(|c| (keys.chunk_id(c), c.len() as u32))
            .collect();
        w.add_frame(keys, &list, &stored, comp)?;
        let (comp, stored) = compress(&chunks[2], 3)?;
        w.add_frame(keys, &[(keys.chunk_id(&chunks[2]), 256)], &stored, comp)?;
        let p = w.finish(keys)?;
        backend.put(&pack_key(&p.name)?, &p.bytes)?;
        Ok(p)
    }

    fn tempdir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))
    }

    #[test]
    fn write_and_read_back() -> Result<()> {
        for keys in [Protection::Plain, encrypted(1)] {
            let dir = tempdir()?;
            let backend = LocalDir::new(dir.path());
            let chunks = chunks();
            let p = stored_pack(&backend, &keys)?;
            let version = pack_version_for(&keys);
            assert_eq!(p.version, version);
            assert_eq!(p.entries[0].compression, Compression::Zstd);
            assert_eq!(p.entries[1].in_frame, 50_000);
            assert_eq!(p.entries[2].compression, Compression::None);
            let table = read_pack_table(&backend, &keys, &p.name)?;
            assert_eq!(table.entries, p.entries);
            assert_eq!(table.version, version);
            let mut cache = FrameCache::default();
            for (e, c) in table.entries.iter().zip(&chunks) {
                let loc = e.location(version);
                let got = with_chunk(&backend, &keys, &p.name, &loc, &mut cache, |d| {
                    Ok(d.to_vec())
                })?;
                assert_eq!(&got, c);
                assert_eq!(&read_chunk(&backend, &keys, &p.name, &loc)?, c);
            }
            // Two frames, each decompressed once however many chunks were read from it.
            assert_eq!(cache.decoded, 2);

            // After the first chunk, the second follows in its frame: found without a
            // lookup, and only under its own id and length.
            let mut cache = FrameCache::default();
            let (id0, id1) = (keys.chunk_id(&chunks[0]), keys.chunk_id(&chunks[1]));
            assert!(cache.next_chunk(&id0, 50_000, &keys).is_none());
            let first = table.entries[0].location(version);
            with_chunk(&backend, &keys, &p.name, &first, &mut cache, |_| Ok(()))?;
            let len1 = chunks[1].len() as u32;
            assert!(cache.next_chunk(&id0, len1, &keys).is_none());
            assert!(cache.next_chunk(&id1, len1 - 1, &keys).is_none());
            assert_eq!(
                cache.next_chunk(&id1, len1, &keys),
                Some(chunks[1].as_slice())
            );
            // The frame is used up: nothing follows.
            let id2 = keys.chunk_id(&chunks[2]);
            assert!(cache.next_chunk(&id2, 256, &keys).is_none());
            assert_eq!(cache.decoded, 1);
        }
        Ok(())
    }

    #[test]
    fn a_compressed_frame_holds_only_its_bytes() -> Result<()> {
        // Frames wait in memory for their pack: no worst-case output buffer may come along.
        let data = b"frames of a backup wait in the reorder window\n".repeat(5000);
        let (compression, out) = compress(&data, 3)?;
        assert_eq!(compression, Compression::Zstd);
        assert!(out.len() < data.len() / 10);
        assert_eq!(out.capacity(), out.len());
        Ok(())
    }

    #[test]
    fn plain_packs_are_version_2_byte_for_byte() -> Result<()> {
        let dir = tempdir()?;
        let p = stored_pack(&LocalDir::new(dir.path()), &Protection::Plain)?;
        assert_eq!(p.version, PACK_VERSION);
        assert_eq!(&p.bytes[8..12], &PACK_VERSION.to_le_bytes());
        // Plain frames are where a version 2 reader expects them: the first right after the
        // header, the second right after the first's record.
        assert_eq!(p.entries[0].offset, PACK_HEADER_LEN as u64);
        let first_len = frame_record_len(PACK_VERSION, p.entries[0].stored_len, 2);
        assert_eq!(p.entries[2].offset, PACK_HEADER_LEN as u64 + first_len);
        Ok(())
    }

    /// The error of reading every chunk of `pack` (as `bytes`) under `keys`.
    fn read_all(bytes: &[u8], name: &str, keys: &Protection) -> Vec<Result<Vec<u8>>> {
        let Ok(dir) = tempdir() else {
            return vec![Err(Error::Internal("no tempdir".into()))];
        };
        let backend = LocalDir::new(dir.path());
        if let Err(e) = pack_key(name).and_then(|key| backend.put(&key, bytes)) {
            return vec![Err(e)];
        }
        match read_pack_table(&backend, keys, name) {
            Err(e) => vec![Err(e)],
            Ok(t) => t
                .entries
                .iter()
                .map(|e| read_chunk(&backend, keys, name, &e.location(t.version)))
                .collect(),
        }
    }

    fn corrupt_at(results: &[Result<Vec<u8>>], name: &str) -> Vec<u64> {
        results
            .iter()
            .filter_map(|r| match r {
                Err(Error::Corrupt {
                    location, offset, ..
                }) if location.contains(name) => Some(*offset),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_sealed_part_is_authenticated() -> Result<()> {
        let keys = encrypted(1);
        let dir = tempdir()?;
        let backend = LocalDir::new(dir.path());
        let p = stored_pack(&backend, &keys)?;
        let q = stored_pack(&backend, &keys)?;
        let (f0, f1) = (p.entries[0].offset, p.entries[2].offset);
        let table_at = f1 + u64::from(p.entries[2].stored_len);
        assert!(read_all(&p.bytes, &p.name, &keys).iter().all(Result::is_ok));

        // A flipped byte in any sealed frame: that frame's chunks fail at the frame's offset;
        // the other frame still reads.
        for at in [f0, f0 + 30, f1 - 1, f1 + 24, table_at - 1] {
            let mut bad = p.bytes.clone();
            bad[at as usize] ^= 1;
            let results = read_all(&bad, &p.name, &keys);
            let hit = if at < f1 { f0 } else { f1 };
            assert_eq!(
                corrupt_at(&results, &p.name).first(),
                Some(&hit),
                "byte {at}: {results:?}"
            );
            assert_eq!(
                results.iter().filter(|r| r.is_ok()).count(),
                if at < f1 { 1 } else { 2 }
            );
        }
        // A flipped byte in the sealed table (past its crc: fix the crc up, as an attacker
        // would): authentication fails at the table's offset.
        let mut bad = p.bytes.clone();
        bad[table_at as usize + 30] ^= 1;
        let footer_at = bad.len() - PACK_FOOTER_LEN;
        let crc = crc32fast::hash(&bad[table_at as usize..footer_at]);
        bad[footer_at + 24..footer_at + 28].copy_from_slice(&crc.to_le_bytes());
        let crc = crc32fast::hash(&bad[footer_at..footer_at + 28]);
        bad[footer_at + 28..].copy_from_slice(&crc.to_le_bytes());
        let results = read_all(&bad, &p.name, &keys);
        assert_eq!(corrupt_at(&results, &p.name), vec![table_at], "{results:?}");

        // The same pack under another name (the table and frames are bound to theirs).
        let results = read_all(&p.bytes, &q.name, &keys);
        assert_eq!(corrupt_at(&results, &q.name), vec![table_at], "{results:?}");

        // Frames of another pack at the same offsets: bound to their pack, refused.
        let mut swapped = p.bytes.clone();
        swapped[f0 as usize..table_at as usize]
            .copy_from_slice(&q.bytes[f0 as usize..table_at as usize]);
        let results = read_all(&swapped, &p.name, &keys);
        assert_eq!(
            corrupt_at(&results, &p.name),
            vec![f0, f0, f1],
            "{results:?}"
        );

        // Another key: nothing opens.
        let results = read_all(&p.bytes, &p.name, &encrypted(2));
        assert_eq!(corrupt_at(&results, &p.name), vec![table_at]);
        // A sealed pack in a plain repository, a plain pack in an encrypted one: refused.
        let results = read_all(&p.bytes, &p.name, &Protection::Plain);
        assert_eq!(corrupt_at(&results, &p.name).len(), 1, "{results:?}");
        let plain = stored_pack(&backend, &Protection::Plain)?;
        let results = read_all(&plain.bytes, &plain.name, &keys);
        assert_eq!(corrupt_at(&results, &plain.name).len(), 1, "{results:?}");
        Ok(())
    }

    #[test]
    fn swapped_frames_of_one_pack_are_refused() -> Result<()> {
        // Two frames of equal sealed length, swapped in place: each is bound to its offset.
        let keys = encrypted(1);
        let mut w = PackWriter::new(1 << 16, &keys)?;
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        w.add_frame(&keys, &[(keys.chunk_id(&a), 4096)], &a, Compression::None)?;
        w.add_frame(&keys, &[(keys.chunk_id(&b), 4096)], &b, Compression::None)?;
        let p = w.finish(&keys)?;
        let (f0, f1) = (p.entries[0].offset as usize, p.entries[1].offset as usize);
        let len = f1 - f0;
        assert_eq!(p.entries[1].stored_len as usize, len);
        let mut swapped = p.bytes.clone();
        swapped[f0..f1].copy_from_slice(&p.bytes[f1..f1 + len]);
        swapped[f1..f1 + len].copy_from_slice(&p.bytes[f0..f1]);
        let results = read_all(&swapped, &p.name, &keys);
        assert_eq!(
            corrupt_at(&results, &p.name),
            vec![f0 as u64, f1 as u64],
            "{results:?}"
        );
        Ok(())
    }

    #[test]
    fn a_sealed_pack_holds_no_plaintext_and_no_plain_id() -> Result<()> {
        let keys = encrypted(1);
        let dir = tempdir()?;
        let chunk = b"a very recognisable guest file line\n".repeat(500);
        let mut w = PackWriter::new(1 << 20, &keys)?;
        let id = keys.chunk_id(&chunk);
        w.add_frame(
            &keys,
            &[(id, chunk.len() as u32)],
            &chunk,
            Compression::None,
        )?;
        let p = w.finish(&keys)?;
        LocalDir::new(dir.path()).put(&pack_key(&p.name)?, &p.bytes)?;
        let has = |needle: &[u8]| p.bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(b"recognisable"));
        assert!(!has(&ChunkId::of(&chunk).0));
        // Not even the keyed id appears in the clear.
        assert!(!has(&id.0));
        Ok(())
    }
}
