//! Random access to a snapshot's disk: [`SnapshotReader::read_at`] and an allocation map.
//!
//! A restore walks a manifest from the first byte to the last; a served disk (`serve --nbd`)
//! is read wherever a client asks, in any order, by many threads. The reader finds the
//! extents of the segment that holds an offset (decoded segments are kept in a small cache),
//! looks each chunk up in the index, takes its frame from a bounded cache of decompressed
//! frames or reads and decompresses it, and checks the chunk's BLAKE3 against its id before
//! it serves any byte of it: a damaged chunk fails that read with [`Error::Corrupt`] naming
//! the pack and offset, and never yields wrong data. Zero runs are served without touching
//! any pack, and [`SnapshotReader::map`] reports them (data or zero) from the manifest alone.
//!
//! A chunk that passed its check is remembered, by id, with the cached frame it lies in
//! (until that frame is evicted): a later read of it, the warm path, is the segment from the
//! segment cache, one lookup in that map under the cache's lock, and a copy after the lock is
//! released. No index lookup (SQLite), no hash, no I/O, no allocation. The check is not
//! repeated on bytes that have not left memory since they passed it.
//!
//! Memory is bounded by one [`MemoryBudget`] of `cache_bytes` ([`budget`]): every decoded
//! frame, whether cached, being decoded (its compressed bytes too) or being copied from by a
//! reader, is charged to it until dropped, and so is each remembered chunk's entry; the
//! readers of a served VM share one. The segment cache keeps a fixed number of decoded
//! segments besides.
//!
//! Sequential readers (a `qemu-img convert`, a VM booting) get read-ahead. A client's reads
//! go through a [`SequentialReads`]: once two reads in a row each started where the one before
//! ended (or a little after: a client skips the holes it knows of), it asks
//! [`SnapshotReader::read_ahead_worker`], when one runs, to keep the next
//! [`SnapshotReader::read_ahead_window`] bytes loaded while the client consumes this answer.
//! One lucky random read that lands just after the previous one starts nothing. The worker
//! keeps a frontier (how far it has loaded) and loads only what lies past it, in batches of
//! half a window, so each chunk of a stream is looked up, decoded and hashed once. Without a
//! worker the requests are dropped; reads stay correct.
//!
//! [`SnapshotReader::prefetch`] (the read-ahead's work, and a large read's first step) does a
//! range's work on every core (rayon's pool): the index lookups of the chunks not yet
//! checked (only the first of each frame: the rest are placed after it and hashed, as a
//! restore does, see `prefetch.rs`), then per frame the read, the decompression and the
//! BLAKE3 check of each chunk wanted from it, which it remembers as checked. A read that follows finds every chunk
//! checked: it only copies. A frame is loaded by one thread at a time; another that wants it
//! meanwhile waits for it instead of decoding it a second time ([`budget`]).
//!
//! Every reader takes chunk bytes from one place, [`verified`]: the frame fetch and decode,
//! the index lookup (learning another host's packs, looking again after a prune), and the
//! check of each chunk against its id before a byte of it is used. This reader caches what
//! it verified for random access; sequential readers (restore, verify, standby, copy) use a
//! [`ChunkWalker`] per worker ([`walk`]), whose frame cache is its own and takes no lock.

pub mod budget;
mod cache;
mod prefetch;
pub mod verified;
pub mod walk;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::format::{ChunkId, SnapshotId};
use crate::repo::Repo;

use budget::Frame;
pub use budget::{BudgetStats, MemoryBudget};
use cache::{FrameKey, FrameNo, SegmentLru};
pub use verified::FrameCache;
pub use walk::{ChunkWalker, Piece};

/// Default size of the decompressed-frame cache: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Default read-ahead of a sequential reader: 32 MiB, and at most a quarter of the cache
/// ([`SnapshotReader::read_ahead_window`]).
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 32 << 20;
/// A read that starts at most this far after the previous one's end continues a sequential
/// stream: a client copying a disk skips the holes block status showed it.
pub const SEQUENTIAL_GAP: u64 = 64 << 20;
/// Decoded segments kept at most (a 4 MiB segment of 16 KiB chunks decodes to ~12 KiB); the
/// budget may allow fewer.
const SEGMENT_SLOTS: usize = 256;
/// What a cached segment costs besides its extents: its `Arc`, its slot in the cache's map.
const SEGMENT_OVERHEAD: usize = 128;

/// How a [`SnapshotReader`] caches.
#[derive(Clone, Copy, Debug)]
pub struct ReaderOptions {
    /// Most bytes of decompressed frames kept.
    pub cache_bytes: usize,
    /// Bytes loaded ahead of a sequential reader (0: none).
    pub read_ahead_bytes: u64,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
        }
    }
}

/// Bytes of a checked chunk in a cached frame, from [`SnapshotReader::hold_checked`]: the
/// frame (charged to the budget) stays alive, and its bytes usable, until this is dropped.
pub struct HeldSlice {
    frame: Arc<Frame>,
    start: usize,
    end: usize,
}

impl std::ops::Deref for HeldSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.frame.get(self.start..self.end).unwrap_or_default()
    }
}

/// A run of the disk that is either stored data or known zeros, from [`SnapshotReader::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRun {
    pub offset: u64,
    pub len: u64,
    /// True for a zero run of the manifest (never stored, reads as zeros).
    pub zero: bool,
}

/// Counters of a reader, for tests and `serve`'s log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Frames read from packs and decompressed.
    pub frames_decoded: u64,
    /// Chunk reads served from a cached frame.
    pub cache_hits: u64,
    /// Frames loaded by read-ahead.
    pub read_ahead_frames: u64,
    /// Read-ahead batches the worker loaded (each up to half a window).
    pub read_ahead_batches: u64,
    /// Chunks looked up in the repository's index (a chunk not yet checked in a cached
    /// frame); reads of cached chunks make none.
    pub index_lookups: u64,
}

impl ReaderStats {
    /// These counters and `other`'s, added (the readers of a served VM).
    pub fn plus(&self, other: &ReaderStats) -> ReaderStats {
        ReaderStats {
            frames_decoded: self.frames_decoded.saturating_add(other.frames_decoded),
            cache_hits: self.cache_hits.saturating_add(other.cache_hits),
            read_ahead_frames: self
                .read_ahead_frames
                .saturating_add(other.read_ahead_frames),
            read_ahead_batches: self
                .read_ahead_batches
                .saturating_add(other.read_ahead_batches),
            index_lookups: self.index_lookups.saturating_add(other.index_lookups),
        }
    }
}

/// A decoded segment: its extents at their disk offsets, and what keeping it costs the
/// budget (None when it was decoded for one read and not cached).
struct Segment {
    placed: Vec<Placed>,
    _charge: Option<budget::Charge>,
}

impl std::ops::Deref for Segment {
    type Target = [Placed];
    fn deref(&self) -> &[Placed] {
        &self.placed
    }
}

/// One extent of a decoded segment, with its disk offset.
#[derive(Clone, Copy, Debug)]
struct Placed {
    offset: u64,
    extent: Extent,
}

/// Random, verified, cached reads of one snapshot's disk. Shared by reference between
/// threads.
pub struct SnapshotReader<'r> {
    repo: &'r Repo,
    snapshot_id: SnapshotId,
    manifest: Manifest<'r>,
    options: ReaderOptions,
    segments: Mutex<SegmentLru<Arc<Segment>>>,
    frames: Arc<MemoryBudget>,
    /// The read-ahead's pending request and frontier.
    ahead: Mutex<Ahead>,
    ahead_ready: Condvar,
    frames_decoded: AtomicU64,
    cache_hits: AtomicU64,
    read_ahead_frames: AtomicU64,
    read_ahead_batches: AtomicU64,
    index_lookups: AtomicU64,
}

/// What the read-ahead worker is asked to do and has done.
#[derive(Debug, Default)]
struct Ahead {
    /// The range to load next (start, end), replaced or extended by newer hints.
    pending: Option<(u64, u64)>,
    /// The range loaded or queued since the stream's last jump (start, end): a hint whose end
    /// lies inside it asks only for what lies past `end`.
    frontier: Option<(u64, u64)>,
}

/// Tells a sequential stream of reads from random ones, for one client: feed it every read;
/// it says when to hint the reader's read-ahead.
#[derive(Clone, Copy, Debug, Default)]
pub struct SequentialReads {
    last_end: Option<u64>,
    /// Reads in a row that continued the one before.
    streak: u32,
}

impl SequentialReads {
    /// Notes a read of `len` bytes at `offset`; true when it is the second (or later) read in
    /// a row to continue the one before, within [`SEQUENTIAL_GAP`]: then read-ahead pays.
    /// A single random read that happens to land just after the previous one is no stream.
    pub fn note(&mut self, offset: u64, len: u64) -> bool {
        let continues = self
            .last_end
            .is_some_and(|e| offset >= e && offset - e <= SEQUENTIAL_GAP);
        self.streak = if continues {
            self.streak.saturating_add(1)
        } else {
            0
        };
        self.last_end = Some(offset.saturating_add(len));
        self.streak >= 2
    }
}

impl std::fmt::Debug for SnapshotReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("snapshot_id", &self.snapshot_id)
            .field("size", &self.manifest.virtual_size)
            .finish()
    }
}

impl<'r> SnapshotReader<'r> {
    /// Opens snapshot `snapshot_id` of `repo` (its manifest is read and checked whole).
    pub fn open(repo: &'r Repo, snapshot_id: &str, options: ReaderOptions) -> Result<Self> {
        Self::open_with_budget(
            repo,
            snapshot_id,
            options,
            MemoryBudget::new(options.cache_bytes),
        )
    }

    /// [`SnapshotReader::open`] with a budget (and frame cache) shared with other readers of
    /// the same repository; `options.cache_bytes` should be its capacity.
    pub fn open_with_budget(
        repo: &'r Repo,
        snapshot_id: &str,
        options: ReaderOptions,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self> {
        let snapshot_id = SnapshotId::parse(snapshot_id)?;
        let manifest = repo.load_manifest(&snapshot_id)?;
        Ok(SnapshotReader {
            repo,
            snapshot_id,
            manifest,
            options,
            segments: Mutex::new(SegmentLru::new(SEGMENT_SLOTS)),
            frames: budget,
            ahead: Mutex::new(Ahead::default()),
            ahead_ready: Condvar::new(),
            frames_decoded: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            read_ahead_frames: AtomicU64::new(0),
            read_ahead_batches: AtomicU64::new(0),
            index_lookups: AtomicU64::new(0),
        })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.virtual_size
    }

    pub fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            frames_decoded: self.frames_decoded.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            read_ahead_frames: self.read_ahead_frames.load(Ordering::Relaxed),
            read_ahead_batches: self.read_ahead_batches.load(Ordering::Relaxed),
            index_lookups: self.index_lookups.load(Ordering::Relaxed),
        }
    }

    /// Bytes of decompressed frames the cache holds now (at most `cache_bytes`).
    pub fn cached_bytes(&self) -> usize {
        self.frames.stats().cached_bytes
    }

    /// The memory budget (and frame cache) of this reader.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.frames
    }

    /// Opens every index connection lookups may use now (see [`IndexReaders::open_all`]), so
    /// that a long-lived reader's memory does not grow by them later.
    pub fn open_index_connections(&self) -> Result<()> {
        self.repo.readers().open_all()
    }

    /// Checks that `len` bytes at `offset` lie inside the disk.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "read of {len} bytes at offset {offset} is past the end of the {}-byte disk \
                 of snapshot {}",
                self.size(),
                self.snapshot_id.short()
            ))),
        }
    }

    /// The extents of segment `index`, placed at their disk offsets. Decoded segments are
    /// kept (at most [`SEGMENT_SLOTS`]) while the budget has room for them: they are charged
    /// to it, within an eighth of it ([`MemoryBudget::try_take_segment`]).
    fn segment(&self, index: u64) -> Result<Arc<Segment>> {
        if let Some(s) = self.segments.lock().ok().and_then(|mut c| c.get(index)) {
            return Ok(s);
        }
        let extents = self.manifest.segment(index)?;
        let mut offset = index.saturating_mul(u64::from(self.manifest.segment_size));
        let mut placed = Vec::with_capacity(extents.len());
        for extent in extents {
            placed.push(Placed { offset, extent });
            offset = offset.saturating_add(u64::from(extent.len()));
        }
        let bytes = placed
            .capacity()
            .saturating_mul(std::mem::size_of::<Placed>())
            .saturating_add(SEGMENT_OVERHEAD);
        let Ok(mut cache) = self.segments.lock() else {
            return Ok(Arc::new(Segment {
                placed,
                _charge: None,
            }));
        };
        let mut charge = self.frames.try_take_segment(bytes);
        if charge.is_none() {
            // Make room from this reader's own segments (another reader's are its own).
            if let Some(oldest) = cache.pop_oldest() {
                drop(oldest);
                charge = self.frames.try_take_segment(bytes);
            }
        }
        let kept = charge.is_some();
        let segment = Arc::new(Segment {
            placed,
            _charge: charge,
        });
        if kept {
            cache.put(index, Arc::clone(&segment));
        }
        Ok(segment)
    }

    /// Calls `f` with each extent that overlaps `offset..offset + len`, in disk order, with
    /// the overlapping part as (disk offset, offset inside the extent, length).
    fn for_each_extent(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Placed, u64, u32, u32) -> Result<bool>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let seg_size = u64::from(self.manifest.segment_size);
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let segment = self.segment(at / seg_size)?;
            // The last extent that starts at or before `at`.
            let first = segment
                .partition_point(|p| p.offset <= at)
                .saturating_sub(1);
            let mut progressed = false;
            for p in segment.get(first..).unwrap_or_default() {
                let extent_end = p.offset + u64::from(p.extent.len());
                if p.offset >= end {
                    break;
                }
                if extent_end <= at {
                    continue;
                }
                let piece_end = extent_end.min(end);
                // Both fit in u32: they lie inside one extent.
                let within = u32::try_from(at - p.offset).unwrap_or(u32::MAX);
                let piece = u32::try_from(piece_end - at).unwrap_or(u32::MAX);
                if !f(p, at, within, piece)? {
                    return Ok(());
                }
                at = piece_end;
                progressed = true;
            }
            if !progressed {
                return Err(Error::corrupt(
                    format!("snapshot {}", self.snapshot_id),
                    at,
                    "the manifest's segment does not cover this offset",
                ));
            }
        }
        Ok(())
    }

    /// Fills `buf` with the disk's bytes at `offset`. Every chunk is checked against its
    /// BLAKE3 id first; a damaged or missing one fails the read (the error names the pack and
    /// offset) and nothing of it is returned as good data.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut filled = 0usize;
        self.for_each_extent(offset, buf.len() as u64, |p, _at, within, piece| {
            let dest = buf
                .get_mut(filled..filled + piece as usize)
                .ok_or_else(|| Error::Internal("read_at: piece past the buffer".into()))?;
            match p.extent {
                Extent::Zero { .. } => dest.fill(0),
                Extent::Chunk { id, len } => {
                    self.with_chunk(&id, len, p.offset, |data| {
                        let src = data
                            .get(within as usize..within as usize + piece as usize)
                            .ok_or_else(|| {
                                Error::corrupt(
                                    format!("snapshot {}", self.snapshot_id),
                                    p.offset,
                                    format!("chunk {id} is shorter than its extent"),
                                )
                            })?;
                        dest.copy_from_slice(src);
                        Ok(())
                    })?;
                }
            }
            filled += piece as usize;
            Ok(true)
        })
    }

    /// Holds the disk's bytes from `offset` on, up to `len` of them, where they lie in memory
    /// already: slices of chunks checked in cached frames (adjacent ones of one frame merged),
    /// appended to `held` in disk order, at most `max_slices` of them. Stops at the first
    /// byte that is not such a chunk (a zero run, a chunk not checked or not cached); returns
    /// the bytes held. Nothing is loaded or reserved, so holding frames here keeps the
    /// budget's rule that nobody holds a frame while reserving one; drop `held` before any
    /// read that may load (`read_at`). A sender writes these slices straight to its socket
    /// instead of copying them into a buffer first.
    pub fn hold_checked(
        &self,
        offset: u64,
        len: u64,
        max_slices: usize,
        held: &mut Vec<HeldSlice>,
    ) -> Result<u64> {
        let mut covered = 0u64;
        self.for_each_extent(offset, len, |p, _at, within, piece| {
            let Extent::Chunk { id, len: chunk_len } = p.extent else {
                return Ok(false);
            };
            let Some((frame, start, checked_len)) = self.frames.checked_chunk(&id) else {
                return Ok(false);
            };
            if checked_len != chunk_len as usize {
                // `read_at` reports it, with its place.
                return Ok(false);
            }
            let from = start.saturating_add(within as usize);
            let to = from.saturating_add(piece as usize);
            if to > start.saturating_add(checked_len) || to > frame.len() {
                return Ok(false);
            }
            let continues = held
                .last()
                .is_some_and(|last| Arc::ptr_eq(&last.frame, &frame) && last.end == from);
            if continues {
                if let Some(last) = held.last_mut() {
                    last.end = to;
                }
            } else if held.len() >= max_slices {
                return Ok(false);
            } else {
                held.push(HeldSlice {
                    frame,
                    start: from,
                    end: to,
                });
            }
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            covered += u64::from(piece);
            Ok(true)
        })?;
        Ok(covered)
    }

    /// The disk between `offset` and `offset + len` as runs of data and zeros, adjacent runs
    /// of one kind merged, straight from the manifest (no pack is read). At most `max_runs`
    /// runs are returned; the last may then end before `offset + len`.
    pub fn map(&self, offset: u64, len: u64, max_runs: usize) -> Result<Vec<MapRun>> {
        let mut runs = Vec::new();
        self.map_into(offset, len, max_runs, &mut runs)?;
        Ok(runs)
    }

    /// [`SnapshotReader::map`] into `runs` (cleared first), so that a caller can keep one
    /// vector for every request.
    pub fn map_into(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
        runs: &mut Vec<MapRun>,
    ) -> Result<()> {
        runs.clear();
        self.for_each_extent(offset, len, |p, at, _within, piece| {
            let zero = matches!(p.extent, Extent::Zero { .. });
            let count = runs.len();
            match runs.last_mut() {
                Some(last) if last.zero == zero => last.len += u64::from(piece),
                _ if count >= max_runs => return Ok(false),
                _ => runs.push(MapRun {
                    offset: at,
                    len: u64::from(piece),
                    zero,
                }),
            }
            Ok(true)
        })
    }

    /// Bytes kept loaded ahead of a sequential reader: `read_ahead_bytes`, at most a quarter
    /// of the cache, so that what is loaded ahead is not evicted before it is read (frames
    /// hold more than the stream's bytes where the snapshot shares chunks with older ones).
    pub fn read_ahead_window(&self) -> u64 {
        self.options
            .read_ahead_bytes
            .min((self.options.cache_bytes / 4) as u64)
    }

    /// Asks the read-ahead worker to keep the `read_ahead_window` bytes after `end` (where a
    /// sequential read ended) loaded. What it has loaded or been asked for already is not
    /// asked again; it is asked for more once less than half a window lies ahead.
    pub fn hint_sequential(&self, end: u64) {
        let window = self.read_ahead_window();
        if window == 0 || end >= self.size() {
            return;
        }
        let target = end.saturating_add(window).min(self.size());
        let Ok(mut ahead) = self.ahead.lock() else {
            return;
        };
        let from = match ahead.frontier {
            // Inside what is loaded (or queued): only past its end, once it runs short.
            Some((start, loaded)) if start <= end && end <= loaded => {
                if loaded.saturating_sub(end) >= window / 2 || loaded >= target {
                    return;
                }
                ahead.frontier = Some((start, target));
                loaded
            }
            // A jump (or the first hint): start over at `end`.
            _ => {
                ahead.frontier = Some((end, target));
                end
            }
        };
        ahead.pending = match ahead.pending {
            // Not taken yet and contiguous: one larger batch.
            Some((start, stop)) if start <= from && from <= stop => Some((start, target)),
            _ => Some((from, target)),
        };
        drop(ahead);
        self.ahead_ready.notify_one();
    }

    /// Loads the frames of read-ahead requests into the cache, and checks their chunks,
    /// until `stop` is set. Run it on a thread of its own next to the readers; errors are
    /// left for the real read to report.
    pub fn read_ahead_worker(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let request = match self.ahead.lock() {
                Ok(mut ahead) => match ahead.pending.take() {
                    Some(r) => Some(r),
                    None => self
                        .ahead_ready
                        .wait_timeout(ahead, Duration::from_millis(100))
                        .ok()
                        .and_then(|(mut a, _)| a.pending.take()),
                },
                Err(_) => return,
            };
            let Some((start, end)) = request else {
                continue;
            };
            self.read_ahead_batches.fetch_add(1, Ordering::Relaxed);
            let before = self.frames_decoded.load(Ordering::Relaxed);
            // Errors are left for the real read to report.
            let _ = self.prefetch(start, end.saturating_sub(start));
            let loaded = self
                .frames_decoded
                .load(Ordering::Relaxed)
                .saturating_sub(before);
            self.read_ahead_frames.fetch_add(loaded, Ordering::Relaxed);
        }
    }

    /// Verifies chunk `id` (`len` bytes, at disk offset `at`) and hands its bytes to `f`.
    ///
    /// A chunk already checked in a cached frame is served from it: no index lookup, no
    /// hash, and the cache's lock only for the map lookups (the copy happens outside it).
    /// Otherwise the index says where its frame is, the frame comes from the cache by place
    /// or is read and decoded, the chunk is hashed against its id, and remembered as checked.
    fn with_chunk<R>(
        &self,
        id: &ChunkId,
        len: u32,
        at: u64,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let short = || {
            Error::corrupt(
                format!("snapshot {}", self.snapshot_id),
                at,
                format!("chunk {id} is not {len} bytes long, as the manifest says"),
            )
        };
        if let Some((frame, start, chunk_len)) = self.frames.checked_chunk(id) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            if chunk_len != len as usize {
                return Err(short());
            }
            let data = frame
                .get(start..start.saturating_add(chunk_len))
                .ok_or_else(|| Error::Internal(format!("checked chunk {id} outside its frame")))?;
            return f(data);
        }
        // The frame of the chunk's location, from the cache or fetched, and the chunk checked
        // in it (see `verified`); its bytes are that checked range of the frame.
        let (record, no, frame) = verified::with_located(
            self.repo,
            id,
            &self.snapshot_id,
            Some(&self.index_lookups),
            |loc| {
                let (no, frame) = self.frame(&loc.pack, &loc.record)?;
                verified::verified_chunk(&frame, &loc.record, self.repo.protection(), &loc.pack)?;
                Ok((loc.record, no, frame))
            },
        )?;
        let data = frame
            .get(record.in_frame as usize..)
            .and_then(|d| d.get(..record.raw_len as usize))
            .ok_or_else(|| Error::Internal(format!("checked chunk {id} outside its frame")))?;
        if data.len() != len as usize {
            return Err(short());
        }
        if let Some(no) = no {
            self.frames
                .remember_checked(no, &frame, *id, record.in_frame, record.raw_len);
        }
        f(data)
    }

    /// The decompressed frame that holds the chunk at `record` of `pack`, from the cache or
    /// read, checked (crc32, decompression) and kept; with its number in the cache when it
    /// is kept there.
    fn frame(
        &self,
        pack: &str,
        record: &crate::format::pack::RecordLocation,
    ) -> Result<(Option<FrameNo>, Arc<Frame>)> {
        let key = FrameKey {
            pack: pack.to_string(),
            offset: record.offset,
        };
        let claim = match self.frames.cached_or_claim(&key) {
            budget::Claim::Cached(no, frame) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok((Some(no), frame));
            }
            budget::Claim::Load(claim) => claim,
        };
        // The compressed and the decompressed bytes, charged before either exists, into
        // buffers used before (a loader's read buffer, a dropped frame's) when there are:
        // fresh ones are mapped, faulted in page by page and unmapped again.
        let read_len = usize::try_from(record.read_len()).unwrap_or(usize::MAX);
        let (mut compressed, read_charge) = self.frames.read_buffer(read_len);
        let (mut frame, charge) = self
            .frames
            .frame_buffer(record.frame_raw_len as usize, read_charge.bytes());
        verified::fetch_frame_via(
            self.repo.backend(),
            self.repo.protection(),
            pack,
            record,
            &mut compressed,
            &mut frame,
        )?;
        self.frames.keep_read_buffer(compressed, read_charge);
        self.frames_decoded.fetch_add(1, Ordering::Relaxed);
        let frame = Arc::new(Frame::reusable(frame, charge, &self.frames));
        let no = self.frames.keep(key, Arc::clone(&frame));
        drop(claim);
        Ok((no, frame))
    }
}
