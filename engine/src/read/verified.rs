//! The one verified chunk path: every byte of a chunk that any reader uses (restore, verify,
//! standby, copy, the [`SnapshotReader`](super::SnapshotReader) behind an NBD export) comes
//! out of [`verified_chunk`], after its frame passed [`fetch_frame`] (authenticated when
//! sealed, crc32, decompression) and the chunk's bytes hashed to its id. No other code cuts a
//! chunk out of a frame for use.
//!
//! Three layers, each used by the next and by readers with their own caching:
//! - [`fetch_frame`] reads one frame record of a pack and decodes it; a pack the index names
//!   but the store lacks is damage ([`Error::Corrupt`]), not an I/O failure.
//! - [`with_located`] finds a chunk through the index: a chunk a remote repository's index
//!   cache does not know yet is looked up again after a refresh (another host's pack), and a
//!   read that finds damage looks the chunk up once more, since readers take no lock and prune
//!   may have moved it to a new pack and deleted the old one since the lookup.
//! - [`with_chunk`] is a sequential reader's whole path, through a per-worker [`FrameCache`]:
//!   the next chunk of the frame last read is found without an index lookup (and still
//!   hashed), a frame is decompressed once for the chunks read from it in order, and a chunk
//!   that is not `len` bytes long, as the manifest says, fails like damage.
//!
//! A [`FrameCache`] is owned by one worker (no lock); an entry never goes stale, because packs
//! are immutable and never renamed, and a cache lives for one pass, so damage done to a pack
//! later is seen by the next pass.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::pack::{chunk_in_frame, decode_frame_in_place, RecordLocation};
use crate::format::ChunkId;
use crate::index::ChunkLocation;
use crate::repo::Repo;
use crate::store::pack::missing_pack;
use crate::store::{pack_key, Backend};

/// The last few decompressed (and checked) frames of one reader, by (pack, offset).
#[derive(Debug, Default)]
pub struct FrameCache {
    frames: Vec<(String, u64, Vec<u8>)>,
    /// A buffer to decompress the next frame into (an evicted frame's).
    spare: Vec<u8>,
    /// The buffer frame records are read into, kept from one frame to the next.
    compressed: Vec<u8>,
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
    /// against `id` (`protection`'s id) like every chunk read; on a mismatch the caller
    /// looks it up.
    pub fn next_chunk(&mut self, id: &ChunkId, len: u32, protection: &Protection) -> Option<&[u8]> {
        let (slot, end) = self.next?;
        let range = end..end.checked_add(len as usize)?;
        let data = self.frames.get(slot)?.2.get(range.clone())?;
        if protection.chunk_id(data) != *id {
            return None;
        }
        self.next = Some((slot, range.end));
        self.frames.get(slot).map(|f| &f.2[range])
    }
}

/// Reads the frame record at `record` of `pack` and decodes it into `out` (cleared first):
/// opened when sealed, crc32 checked, decompressed. Nothing of a frame that fails is usable.
pub fn fetch_frame(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
    record: &RecordLocation,
    out: &mut Vec<u8>,
) -> Result<()> {
    fetch_frame_via(backend, protection, pack, record, &mut Vec::new(), out)
}

/// [`fetch_frame`], reading the record into `compressed` (its bytes replaced), which the
/// caller keeps for the next frame: a fresh buffer per frame costs page faults and an
/// `munmap` (a fifth of a served disk's CPU, with the decompressed frames' own).
pub fn fetch_frame_via(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
    record: &RecordLocation,
    compressed: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let location = || format!("pack {pack}");
    let len = usize::try_from(record.read_len())
        .map_err(|_| Error::corrupt(location(), record.offset, "frame too large"))?;
    backend
        .get_range_into(&pack_key(pack)?, record.offset, len, compressed)
        .map_err(|e| missing_pack(e, pack, record.offset))?;
    // The record is ours: a sealed one is opened where it lies, without a copy.
    decode_frame_in_place(compressed, record, protection, pack, &location(), out)
}

/// Chunk `record` of a frame of `pack` that [`fetch_frame`] (or a ranged fetch that decoded
/// it the same way) produced, checked against its id: the only way chunk bytes leave a frame.
pub fn verified_chunk<'f>(
    frame: &'f [u8],
    record: &RecordLocation,
    protection: &Protection,
    pack: &str,
) -> Result<&'f [u8]> {
    chunk_in_frame(frame, record, protection, &format!("pack {pack}"))
}

/// Looks chunk `id` (needed by `snapshot`) up and hands its location to `read`; see the
/// module doc for the second lookups. `lookups` counts index lookups, for readers that
/// report them.
pub fn with_located<R>(
    repo: &Repo,
    id: &ChunkId,
    snapshot: &str,
    lookups: Option<&AtomicU64>,
    mut read: impl FnMut(&ChunkLocation) -> Result<R>,
) -> Result<R> {
    let lookup = || {
        if let Some(n) = lookups {
            n.fetch_add(1, Ordering::Relaxed);
        }
        repo.readers().lookup(id)
    };
    let loc = match lookup()? {
        Some(loc) => loc,
        // Another host's pack this cache has not learnt of yet.
        None if repo.is_remote() => {
            repo.refresh()?;
            match lookup()? {
                Some(loc) => loc,
                None => return Err(repo.missing_chunk(id, snapshot)),
            }
        }
        None => {
            return Err(Error::MissingChunk {
                id: id.to_hex(),
                snapshot: snapshot.to_string(),
            })
        }
    };
    match read(&loc) {
        Err(e) if e.is_corruption() => match lookup()? {
            Some(again) if again != loc => read(&again),
            _ => Err(e),
        },
        other => other,
    }
}

/// Chunk `record` of `pack`, verified, to `f`: its frame from `cache` or fetched and kept
/// there (a frame that holds only this chunk is not kept: one pass never reads it again).
pub fn with_cached_chunk<R>(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
    record: &RecordLocation,
    cache: &mut FrameCache,
    f: impl FnOnce(&[u8]) -> Result<R>,
) -> Result<R> {
    let end = record.in_frame as usize + record.raw_len as usize;
    if let Some(i) = cache.position(pack, record.offset) {
        cache.next = Some((i, end));
        let frame = cache.frames.get(i).map_or(&[][..], |e| &e.2[..]);
        return f(verified_chunk(frame, record, protection, pack)?);
    }
    // Decompress into a reused buffer: fresh 256 KiB buffers cost page faults.
    let mut frame = std::mem::take(&mut cache.spare);
    fetch_frame_via(
        backend,
        protection,
        pack,
        record,
        &mut cache.compressed,
        &mut frame,
    )?;
    cache.decoded += 1;
    if record.frame_raw_len == record.raw_len {
        let result = verified_chunk(&frame, record, protection, pack).and_then(f);
        cache.spare = frame;
        cache.next = None;
        return result;
    }
    let slot = cache.put(pack, record.offset, frame);
    cache.next = Some((slot, end));
    let frame = cache.frames.get(slot).map_or(&[][..], |e| &e.2[..]);
    f(verified_chunk(frame, record, protection, pack)?)
}

/// Reads one chunk of a pack and verifies it (no index, no cache: tools and tests).
pub fn read_chunk(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
    record: &RecordLocation,
) -> Result<Vec<u8>> {
    let mut cache = FrameCache::default();
    with_cached_chunk(backend, protection, pack, record, &mut cache, |d| {
        Ok(d.to_vec())
    })
}

/// The verified bytes of chunk `id`, `len` bytes long at disk offset `at` of snapshot
/// `snapshot` as its manifest says, handed to `f`: a sequential reader's path (module doc).
pub fn with_chunk<R>(
    repo: &Repo,
    snapshot: &str,
    cache: &mut FrameCache,
    id: &ChunkId,
    len: u32,
    at: u64,
    mut f: impl FnMut(&[u8]) -> Result<R>,
) -> Result<R> {
    let wrong_len = |n: usize| {
        Error::corrupt(
            format!("snapshot {snapshot}"),
            at,
            format!("chunk {id} is {n} bytes, the manifest says {len}"),
        )
    };
    let protection = repo.protection();
    // A hit is exactly `len` bytes long.
    if let Some(data) = cache.next_chunk(id, len, protection) {
        return f(data);
    }
    let backend = repo.backend();
    with_located(repo, id, snapshot, None, |loc| {
        with_cached_chunk(backend, protection, &loc.pack, &loc.record, cache, |d| {
            if d.len() != len as usize {
                return Err(wrong_len(d.len()));
            }
            f(d)
        })
    })
}
