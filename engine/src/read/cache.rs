//! The two small caches of a [`super::SnapshotReader`]: decompressed frames bounded by their
//! total size, decoded manifest segments bounded by count. Both evict the least recently
//! used entry. Entries are shared (`Arc`), so an entry evicted while a reader still uses it
//! lives until that reader is done; the bound holds for what the cache keeps.
//!
//! Frames are found two ways. By place (pack and offset), which is what the index tells a
//! reader that has looked a chunk up. And by chunk id, for chunks already checked against
//! their id in a kept frame: a read of such a chunk (every read of warm data) needs neither
//! the index nor a hash, only the manifest segment and this map. A chunk is remembered only
//! in the frame object it was checked in, and forgotten with that frame, so the map never
//! points at bytes nobody hashed, nor at a frame that is gone.

use std::collections::HashMap;
use std::sync::Arc;

use super::budget::{Charge, Frame};
use crate::format::ChunkId;

/// Where a frame is: packs are immutable and never renamed, so an entry never goes stale.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct FrameKey {
    pub pack: String,
    pub offset: u64,
}

/// The number a kept frame has in the cache, for as long as it is kept.
pub(super) type FrameNo = u64;

/// A checked chunk: bytes `start..start + len` of cached frame `frame`.
#[derive(Clone, Copy, Debug)]
struct ChunkSpan {
    frame: FrameNo,
    start: u32,
    len: u32,
}

/// A kept frame.
#[derive(Debug)]
struct Cached {
    used: u64,
    key: FrameKey,
    frame: Arc<Frame>,
    /// The chunks checked in this frame (keys of `FrameLru::chunks`).
    chunks: Vec<ChunkId>,
    /// What those chunks' entries cost, charged to the budget (None until the first).
    chunks_charge: Option<Charge>,
}

/// A frame the cache let go, and the charge of its chunk entries; drop it outside the lock.
pub(super) struct Evicted {
    _frame: Arc<Frame>,
    _chunks_charge: Option<Charge>,
}

/// Decompressed frames, at most `capacity` bytes of them, and the checked chunks in them.
#[derive(Debug)]
pub(super) struct FrameLru {
    capacity: usize,
    bytes: usize,
    tick: u64,
    next: FrameNo,
    places: HashMap<FrameKey, FrameNo>,
    frames: HashMap<FrameNo, Cached>,
    chunks: HashMap<ChunkId, ChunkSpan>,
}

/// Memory one checked chunk's entry takes (its slot in the id map at the map's lowest load,
/// and its id in its frame's list); charged to the budget.
pub(super) const CHUNK_ENTRY_BYTES: usize = 160;

impl FrameLru {
    pub fn new(capacity: usize) -> Self {
        FrameLru {
            capacity,
            bytes: 0,
            tick: 0,
            next: 0,
            places: HashMap::new(),
            frames: HashMap::new(),
            chunks: HashMap::new(),
        }
    }

    /// Bytes of the frames kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn touch(&mut self, no: FrameNo) -> Option<&Cached> {
        self.tick += 1;
        let tick = self.tick;
        let c = self.frames.get_mut(&no)?;
        c.used = tick;
        Some(c)
    }

    /// The frame kept at `key`, and its number.
    pub fn get(&mut self, key: &FrameKey) -> Option<(FrameNo, Arc<Frame>)> {
        let no = *self.places.get(key)?;
        self.touch(no).map(|c| (no, Arc::clone(&c.frame)))
    }

    /// The checked chunk `id`: its frame and where it lies in it.
    pub fn chunk(&mut self, id: &ChunkId) -> Option<(Arc<Frame>, usize, usize)> {
        let span = *self.chunks.get(id)?;
        let c = self.touch(span.frame)?;
        Some((Arc::clone(&c.frame), span.start as usize, span.len as usize))
    }

    /// Whether chunk `id` is known checked in a kept frame.
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    /// Whether [`FrameLru::add_chunk`] would take `id` for frame `no` holding `frame`: the
    /// frame is still kept (the very object the chunk was checked in) and `id` is new.
    pub fn wants_chunk(&self, no: FrameNo, frame: &Arc<Frame>, id: &ChunkId) -> bool {
        !self.chunks.contains_key(id)
            && self
                .frames
                .get(&no)
                .is_some_and(|c| Arc::ptr_eq(&c.frame, frame))
    }

    /// Remembers chunk `id` as checked at `start..start + len` of frame `no`, its entry paid
    /// by `charge` (see [`FrameLru::wants_chunk`]; otherwise nothing is remembered).
    pub fn add_chunk(&mut self, no: FrameNo, id: ChunkId, start: u32, len: u32, charge: Charge) {
        if self.chunks.contains_key(&id) {
            return;
        }
        let Some(c) = self.frames.get_mut(&no) else {
            return;
        };
        c.chunks.push(id);
        match &mut c.chunks_charge {
            Some(total) => total.absorb(charge),
            None => c.chunks_charge = Some(charge),
        }
        self.chunks.insert(
            id,
            ChunkSpan {
                frame: no,
                start,
                len,
            },
        );
    }

    /// Keeps `frame`, evicting the least recently used frames to make room; a frame larger
    /// than the whole cache is not kept. Returns its number when it was kept (not when the
    /// cache holds that place already). The evicted frames are returned to be dropped
    /// outside the caller's lock.
    pub fn put(&mut self, key: FrameKey, frame: Arc<Frame>) -> (Option<FrameNo>, Vec<Evicted>) {
        let size = frame.len();
        let mut evicted = Vec::new();
        if size > self.capacity || self.places.contains_key(&key) {
            return (None, evicted);
        }
        while self.bytes + size > self.capacity {
            match self.pop_oldest() {
                Some(e) => evicted.push(e),
                None => break,
            }
        }
        self.tick += 1;
        self.next += 1;
        let no = self.next;
        self.bytes += size;
        self.places.insert(key.clone(), no);
        self.frames.insert(
            no,
            Cached {
                used: self.tick,
                key,
                frame,
                chunks: Vec::new(),
                chunks_charge: None,
            },
        );
        (Some(no), evicted)
    }

    /// Removes and returns the least recently used frame (None when empty), with its chunks.
    pub fn pop_oldest(&mut self) -> Option<Evicted> {
        // A linear scan: a cache of 64 MiB of ~256 KiB frames has a few hundred entries, and
        // an eviction costs far less than the decompression that caused it.
        let oldest = self
            .frames
            .iter()
            .min_by_key(|(_, c)| c.used)
            .map(|(no, _)| *no)?;
        let c = self.frames.remove(&oldest)?;
        self.places.remove(&c.key);
        for id in &c.chunks {
            if self.chunks.get(id).is_some_and(|s| s.frame == oldest) {
                self.chunks.remove(id);
            }
        }
        self.bytes -= c.frame.len();
        Some(Evicted {
            _frame: c.frame,
            _chunks_charge: c.chunks_charge,
        })
    }
}

/// Decoded segments by index, at most `slots` of them.
#[derive(Debug)]
pub(super) struct SegmentLru<T> {
    slots: usize,
    tick: u64,
    entries: HashMap<u64, (u64, T)>,
}

impl<T: Clone> SegmentLru<T> {
    pub fn new(slots: usize) -> Self {
        SegmentLru {
            slots,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub fn get(&mut self, index: u64) -> Option<T> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&index).map(|(used, v)| {
            *used = tick;
            v.clone()
        })
    }

    pub fn put(&mut self, index: u64, value: T) {
        if self.entries.len() >= self.slots && !self.entries.contains_key(&index) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(index, (self.tick, value));
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<T> {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, (used, _))| *used)
            .map(|(k, _)| *k)?;
        self.entries.remove(&oldest).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(offset: u64) -> FrameKey {
        FrameKey {
            pack: "p".into(),
            offset,
        }
    }

    fn frame_of(len: usize) -> Arc<Frame> {
        let budget = super::super::budget::MemoryBudget::new(1 << 20);
        Arc::new(Frame::new(vec![0; len], budget.reserve(len)))
    }

    #[test]
    fn frame_cache_stays_within_its_bytes_and_evicts_least_recent() {
        let mut c = FrameLru::new(300);
        for i in 0..3 {
            c.put(key(i), frame_of(100));
        }
        assert_eq!(c.bytes(), 300);
        assert!(c.get(&key(0)).is_some()); // 1 is now the least recent
        c.put(key(3), frame_of(100));
        assert_eq!(c.bytes(), 300);
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(0)).is_some());
        c.put(key(4), frame_of(301));
        assert!(
            c.get(&key(4)).is_none(),
            "a frame larger than the cache is not kept"
        );
        assert!(c.bytes() <= 300);
    }

    #[test]
    fn segment_cache_keeps_its_slot_count() {
        let mut c = SegmentLru::new(2);
        c.put(1, 'a');
        c.put(2, 'b');
        c.get(1);
        c.put(3, 'c');
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(1), Some('a'));
        assert_eq!(c.get(3), Some('c'));
    }

    #[test]
    fn checked_chunks_are_found_by_id_and_forgotten_with_their_frame() {
        let budget = super::super::budget::MemoryBudget::new(1 << 20);
        let entry = || {
            budget
                .try_take(CHUNK_ENTRY_BYTES)
                .expect("room for an entry")
        };
        let mut c = FrameLru::new(200);
        let f0 = frame_of(100);
        let no = c.put(key(0), Arc::clone(&f0)).0.expect("kept");
        let id = ChunkId([1; 32]);
        assert!(c.wants_chunk(no, &f0, &id));
        c.add_chunk(no, id, 10, 20, entry());
        assert_eq!(budget.stats().used_bytes, CHUNK_ENTRY_BYTES);
        let (f, start, len) = c.chunk(&id).expect("found by id");
        assert!(Arc::ptr_eq(&f, &f0) && start == 10 && len == 20);
        drop(f);
        // Bytes of another object at the same place were not checked: not taken.
        assert!(!c.wants_chunk(no, &frame_of(100), &ChunkId([2; 32])));
        assert!(!c.wants_chunk(no, &f0, &id), "known already");
        c.put(key(1), frame_of(100));
        let (_, evicted) = c.put(key(2), frame_of(100));
        assert_eq!(evicted.len(), 1, "frame 0, the least recent, made room");
        assert!(c.chunk(&id).is_none() && !c.has_chunk(&id));
        drop(evicted);
        assert_eq!(
            budget.stats().used_bytes,
            0,
            "the entry's charge went with its frame"
        );
    }
}
