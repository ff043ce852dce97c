//! The two small caches of a [`super::SnapshotReader`]: decompressed frames bounded by their
//! total size, decoded manifest segments bounded by count. Both evict the least recently
//! used entry. Entries are shared (`Arc`), so an entry evicted while a reader still uses it
//! lives until that reader is done; the bound holds for what the cache keeps.

use std::collections::HashMap;
use std::sync::Arc;

use super::budget::Frame;

/// Where a frame is: packs are immutable and never renamed, so an entry never goes stale.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct FrameKey {
    pub pack: String,
    pub offset: u64,
}

/// Decompressed frames, at most `capacity` bytes of them.
#[derive(Debug)]
pub(super) struct FrameLru {
    capacity: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<FrameKey, (u64, Arc<Frame>)>,
}

impl FrameLru {
    pub fn new(capacity: usize) -> Self {
        FrameLru {
            capacity,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&mut self, key: &FrameKey) -> Option<Arc<Frame>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(used, frame)| {
            *used = tick;
            Arc::clone(frame)
        })
    }

    /// Keeps `frame`, evicting the least recently used frames to make room; a frame larger
    /// than the whole cache is not kept.
    pub fn put(&mut self, key: FrameKey, frame: Arc<Frame>) {
        let size = frame.len();
        if size > self.capacity || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.capacity {
            // A linear scan: a cache of 64 MiB of ~256 KiB frames has a few hundred entries,
            // and an eviction costs far less than the decompression that caused it.
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, f)) = self.entries.remove(&oldest) {
                self.bytes -= f.len();
            }
        }
        self.tick += 1;
        self.bytes += size;
        self.entries.insert(key, (self.tick, frame));
    }

    /// Removes and returns the least recently used frame (None when empty).
    pub fn pop_oldest(&mut self) -> Option<Arc<Frame>> {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, (used, _))| *used)
            .map(|(k, _)| k.clone())?;
        let (_, f) = self.entries.remove(&oldest)?;
        self.bytes -= f.len();
        Some(f)
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
}
