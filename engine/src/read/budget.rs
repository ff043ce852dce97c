//! One memory budget for everything a reader decodes: the frames its cache keeps, the frames
//! being fetched and decompressed (by a read, the read-ahead worker or a parallel prefetch),
//! and fixed per-user charges such as a served connection's buffers.
//!
//! Every decoded frame is a [`Frame`] that carries a [`Charge`] from the moment its bytes are
//! reserved (before the pack is read: the compressed bytes count too, until they are
//! decompressed) until its last holder drops it, whether the cache still keeps it or a reader
//! copies from it after eviction. So the sum of live charges, `used`, is the decoded memory
//! of the readers, and [`MemoryBudget::reserve`] keeps it at most `capacity`: it evicts the
//! least recently used cached frames, and when the cache is empty and in-flight frames hold
//! the rest, it waits for them to be dropped.
//!
//! Invariants that keep waiting finite:
//! - nobody holds a frame while reserving another (reads copy out of a frame, then drop it);
//! - fixed charges ([`MemoryBudget::try_reserve_fixed`]) take at most half the capacity, and
//!   are refused rather than waited for;
//! - decoded manifest segments ([`MemoryBudget::try_take_segment`]) take at most an eighth,
//!   only when it is free at once, and are never waited for either: a segment that does not
//!   fit is used and dropped instead of cached;
//! - a reservation proceeds whenever no frame charge is live at all, even if it alone is
//!   larger than what is left (a frame larger than the whole budget is then decoded alone).
//!
//! A frame is loaded by one thread at a time ([`MemoryBudget::cached_or_claim`]): a read that
//! wants a frame the read-ahead is decoding waits for it rather than decoding it again on
//! another core. A waiter holds no frame, and a loader never waits for a claim while it holds
//! one, so claims add no cycle to the waits above.
//!
//! Several readers (the disks of a served VM) share one budget and one frame cache: frames are
//! keyed by pack and offset, and packs are immutable, so readers of one repository can share
//! frames as well as memory.
//!
//! What no charge names (malloc's slack, the threads' decoder contexts, code paged in on first
//! use) a server measures instead: [`MemoryBudget::measured_growth`] takes how much the
//! process grew since it was at rest, and the budget counts what its charges do not cover as
//! taken, up to [`MemoryBudget::outside_limit`].

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::cache::{Evicted, FrameKey, FrameLru, FrameNo, CHUNK_ENTRY_BYTES};
use crate::format::ChunkId;

/// A decoded frame, charged to its budget until dropped.
#[derive(Debug)]
pub struct Frame {
    data: Vec<u8>,
    /// `None` only once dropped.
    charge: Option<Charge>,
    /// Where the buffer goes when the frame is dropped, still charged.
    spare: Option<Arc<SpareBuffers>>,
}

impl Frame {
    /// `data`, charged with `charge` (shrunk to what the data's buffer takes, [`footprint`]).
    pub(super) fn new(mut data: Vec<u8>, mut charge: Charge) -> Frame {
        if footprint(data.capacity()) > charge.bytes() {
            // A buffer grown past its charge (by doubling, in a decoder or a store) is cut to
            // its length, which the charge was reserved for: never more memory than charged.
            data.shrink_to_fit();
        }
        charge.shrink_to(footprint(data.capacity()));
        Frame {
            data,
            charge: Some(charge),
            spare: None,
        }
    }

    /// As [`Frame::new`], and when dropped its buffer (with its charge) becomes a spare of
    /// `budget`, for the next frame to decode into.
    pub(super) fn reusable(data: Vec<u8>, charge: Charge, budget: &MemoryBudget) -> Frame {
        let mut frame = Frame::new(data, charge);
        frame.spare = Some(Arc::clone(&budget.spare));
        frame
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let (Some(spare), Some(charge)) = (self.spare.take(), self.charge.take()) {
            spare.put(std::mem::take(&mut self.data), charge);
        }
    }
}

/// Most buffers kept as spares: enough for the frames decoded at once by a read-ahead batch.
const SPARES_MAX: usize = 4;

/// Page size assumed by [`footprint`].
const PAGE: usize = 4096;
/// What glibc's malloc puts before a block (its size field and alignment).
const MALLOC_HEADER: usize = 16;

/// The memory a buffer of `capacity` bytes takes, as charged to the budget: a frame-sized
/// buffer is a mapping of its own under the server's malloc settings
/// (`nbd::return_freed_frames_to_the_system`), its capacity and malloc's header rounded up to
/// whole pages. Charging the capacity alone left one page per frame outside the budget: 1 MiB
/// of resident memory past a 64 MiB cache of 256 KiB frames.
pub(super) fn footprint(capacity: usize) -> usize {
    capacity
        .saturating_add(MALLOC_HEADER)
        .div_ceil(PAGE)
        .saturating_mul(PAGE)
}

/// Buffers of dropped frames, kept with their charges (so they stay within the budget) for
/// the next frames to decode into. A fresh frame-sized buffer is its own mapping under the
/// server's malloc settings (`nbd::return_freed_frames_to_the_system`): every page of it
/// faults on first write and is unmapped when freed, which cost a fifth of a sequential
/// read's CPU.
#[derive(Debug, Default)]
pub(super) struct SpareBuffers {
    buffers: Mutex<Vec<(Vec<u8>, Charge)>>,
}

impl SpareBuffers {
    fn lock(&self) -> MutexGuard<'_, Vec<(Vec<u8>, Charge)>> {
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `data` (charged with `charge`) unless enough are kept: then both are given back.
    fn put(&self, data: Vec<u8>, charge: Charge) {
        let mut spares = self.lock();
        if spares.len() < SPARES_MAX && data.capacity() > 0 {
            spares.push((data, charge));
        }
    }

    fn take(&self) -> Option<(Vec<u8>, Charge)> {
        self.lock().pop()
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

#[derive(Debug, Default)]
struct Ledger {
    /// Bytes of all live charges.
    used: usize,
    /// Of `used`, the bytes of fixed charges.
    fixed: usize,
    /// Of `used`, the bytes of cached manifest segments.
    segments: usize,
    /// Memory the process gained that no charge covers, as last measured (at most
    /// [`MemoryBudget::outside_limit`]); taken from the budget like a charge.
    outside: usize,
    /// Highest `outside` seen.
    outside_peak: usize,
    /// Highest `used` seen.
    peak: usize,
}

#[derive(Debug, Default)]
struct Accounts {
    ledger: Mutex<Ledger>,
    freed: Condvar,
}

impl Accounts {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // A poisoned ledger is still a ledger: the counts were updated under the lock.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Charge {
    accounts: Arc<Accounts>,
    bytes: usize,
    kind: Kind,
}

/// What a charge pays for; frames are what a reservation may wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A frame, or an entry that lives and dies with a cached frame.
    Frame,
    /// A connection's buffers.
    Fixed,
    /// A cached manifest segment.
    Segment,
}

impl Ledger {
    /// Bytes the budget has given: charges and the memory measured outside them.
    fn taken(&self) -> usize {
        self.used.saturating_add(self.outside)
    }

    /// Takes `bytes` for a new charge.
    fn charge(&mut self, bytes: usize) {
        self.used = self.used.saturating_add(bytes);
        self.peak = self.peak.max(self.used);
    }

    fn give_back(&mut self, kind: Kind, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
        match kind {
            Kind::Frame => {}
            Kind::Fixed => self.fixed = self.fixed.saturating_sub(bytes),
            Kind::Segment => self.segments = self.segments.saturating_sub(bytes),
        }
    }

    /// Bytes of frames (and their entries) alive: what a waiting reservation waits for.
    fn frames_live(&self) -> usize {
        self.used
            .saturating_sub(self.fixed)
            .saturating_sub(self.segments)
    }
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `other`'s bytes to this charge (both are given back together).
    pub(super) fn absorb(&mut self, mut other: Charge) {
        if other.kind != self.kind {
            // Only frame charges are absorbed, into frame charges (a cached frame's entries,
            // a spare buffer's reservation); anything else is given back at once (dropped
            // here) rather than counted in the wrong column.
            return;
        }
        self.bytes = self.bytes.saturating_add(other.bytes);
        other.bytes = 0;
    }

    /// Gives back what is above `bytes` (a frame whose compressed bytes are gone).
    fn shrink_to(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            return;
        }
        let back = self.bytes - bytes;
        let mut l = self.accounts.lock();
        l.give_back(self.kind, back);
        self.bytes = bytes;
        drop(l);
        self.accounts.freed.notify_all();
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut l = self.accounts.lock();
        l.give_back(self.kind, self.bytes);
        drop(l);
        self.accounts.freed.notify_all();
    }
}

/// The memory budget and frame cache shared by one or more [`super::SnapshotReader`]s.
#[derive(Debug)]
pub struct MemoryBudget {
    capacity: usize,
    accounts: Arc<Accounts>,
    frames: Mutex<FrameLru>,
    /// Buffers of dropped frames, still charged, for the next frames to decode into.
    spare: Arc<SpareBuffers>,
    /// Buffers frame records were read into (compressed, sealed), still charged, for the
    /// next records to be read into: one per loader that ran at once, at most [`SPARES_MAX`].
    reads: SpareBuffers,
    /// Frames being loaded, each by the thread that claimed it.
    loading: Mutex<HashSet<FrameKey>>,
    loaded: Condvar,
}

/// A frame found in the cache, or the claim to load it.
pub(super) enum Claim<'b> {
    Cached(FrameNo, Arc<Frame>),
    Load(LoadClaim<'b>),
}

/// The right to load one frame; others that want it wait until this is dropped (the frame
/// kept, or the load failed).
pub(super) struct LoadClaim<'b> {
    budget: &'b MemoryBudget,
    key: FrameKey,
}

impl Drop for LoadClaim<'_> {
    fn drop(&mut self) {
        self.budget.loading().remove(&self.key);
        self.budget.loaded.notify_all();
    }
}

/// Counters of a budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BudgetStats {
    pub capacity_bytes: usize,
    /// Bytes charged now: live frames and fixed charges.
    pub used_bytes: usize,
    /// Highest `used_bytes` since the budget was made.
    pub peak_bytes: usize,
    /// Of `used_bytes`, frames the cache keeps.
    pub cached_bytes: usize,
    /// Of `used_bytes`, fixed charges (connection buffers, a server's SQLite allowance).
    pub fixed_bytes: usize,
    /// Of `used_bytes`, decoded manifest segments kept by the readers.
    pub segment_bytes: usize,
    /// Memory the process gained beyond its charges, as last measured by the server
    /// ([`MemoryBudget::measured_growth`]), counted as taken; not part of `used_bytes`.
    pub outside_bytes: usize,
    /// Highest `outside_bytes` since the budget was made.
    pub outside_peak_bytes: usize,
}

impl MemoryBudget {
    pub fn new(capacity: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            capacity,
            accounts: Arc::new(Accounts::default()),
            frames: Mutex::new(FrameLru::new(capacity)),
            spare: Arc::default(),
            reads: SpareBuffers::default(),
            loading: Mutex::new(HashSet::new()),
            loaded: Condvar::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> BudgetStats {
        let cached_bytes = self.frames().bytes();
        let l = self.accounts.lock();
        BudgetStats {
            capacity_bytes: self.capacity,
            used_bytes: l.used,
            peak_bytes: l.peak,
            cached_bytes,
            fixed_bytes: l.fixed,
            segment_bytes: l.segments,
            outside_bytes: l.outside,
            outside_peak_bytes: l.outside_peak,
        }
    }

    /// Most of the budget that memory measured outside the charges may take: a sixteenth.
    /// That measure (about 4 MiB on a served 4 GiB disk: malloc's heap, code paged in) would
    /// leave a small budget no room for the frames a read needs.
    pub fn outside_limit(&self) -> usize {
        self.capacity / 16
    }

    /// Takes the measure of the process: its memory grew by `growth` bytes since it was at
    /// rest (a server's resident memory when it became ready). What the charges do not cover
    /// of it is counted as taken (at most [`MemoryBudget::outside_limit`]), and cached frames
    /// are evicted until the charges and it fit the capacity again.
    pub fn measured_growth(&self, growth: usize) {
        let excess = {
            let mut l = self.accounts.lock();
            l.outside = growth.saturating_sub(l.used).min(self.outside_limit());
            l.outside_peak = l.outside_peak.max(l.outside);
            l.taken().saturating_sub(self.capacity)
        };
        // Frames worth the excess at most: an evicted frame that a reader holds frees its
        // bytes only when dropped, and the cache should not empty itself meanwhile.
        let mut evicted_bytes = 0;
        while evicted_bytes < excess && self.accounts.lock().taken() > self.capacity {
            // Given back outside the cache's lock; the spares first, as a reservation does.
            if self.drop_spare() {
                continue;
            }
            let mut frames = self.frames();
            let before = frames.bytes();
            let evicted = frames.pop_oldest();
            evicted_bytes += before.saturating_sub(frames.bytes());
            drop(frames);
            if evicted.is_none() {
                break;
            }
            drop(evicted);
        }
        self.accounts.freed.notify_all();
    }

    fn frames(&self) -> MutexGuard<'_, FrameLru> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loading(&self) -> MutexGuard<'_, HashSet<FrameKey>> {
        self.loading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached frame at `key`, or the claim to load it; while another thread loads it,
    /// waits for that load to end. The caller must hold no frame (see the module's
    /// invariants) and keep the loaded frame before dropping the claim.
    pub(super) fn cached_or_claim(&self, key: &FrameKey) -> Claim<'_> {
        loop {
            if let Some((no, frame)) = self.cached(key) {
                return Claim::Cached(no, frame);
            }
            let mut loading = self.loading();
            if loading.insert(key.clone()) {
                drop(loading);
                let claim = LoadClaim {
                    budget: self,
                    key: key.clone(),
                };
                // Kept by a loader that finished between the look above and the claim.
                if let Some((no, frame)) = self.cached(key) {
                    return Claim::Cached(no, frame);
                }
                return Claim::Load(claim);
            }
            // A timeout as well: a loader whose frame was not kept (no room) ends without
            // it, and this thread then loads it itself.
            let _ = self.loaded.wait_timeout(loading, Duration::from_millis(50));
        }
    }

    /// The cached frame at `key`, if kept, and its number in the cache.
    pub(super) fn cached(&self, key: &FrameKey) -> Option<(FrameNo, Arc<Frame>)> {
        self.frames().get(key)
    }

    /// Keeps `frame` in the cache (it is charged already); its number when it was kept.
    pub(super) fn keep(&self, key: FrameKey, frame: Arc<Frame>) -> Option<FrameNo> {
        let (kept, evicted) = self.frames().put(key, frame);
        // Frames are given back (and their charges) outside the cache's lock.
        drop(evicted);
        kept
    }

    /// The checked chunk `id` of a kept frame: the frame, and where the chunk lies in it.
    /// Takes the cache's lock for two map lookups; nothing is read or hashed.
    pub(super) fn checked_chunk(&self, id: &ChunkId) -> Option<(Arc<Frame>, usize, usize)> {
        self.frames().chunk(id)
    }

    /// Whether chunk `id` is known checked in a kept frame.
    pub(super) fn has_checked_chunk(&self, id: &ChunkId) -> bool {
        self.frames().has_chunk(id)
    }

    /// Remembers that chunk `id`, at `start..start + len` of `frame` (kept as number `no`),
    /// hashed to its id, so that reads of it need neither the index nor a hash again. The
    /// entry is charged to the budget. A full budget (the steady state of a sequential
    /// reader: the cache fills it) makes room by evicting its least recently used frame once;
    /// when there is still no room, or the frame has left the cache, nothing is remembered
    /// (reads stay correct, only slower: they look the chunk up and hash it again).
    pub(super) fn remember_checked(
        &self,
        no: FrameNo,
        frame: &Arc<Frame>,
        id: ChunkId,
        start: u32,
        len: u32,
    ) {
        for attempt in 0..2 {
            let mut frames = self.frames();
            if !frames.wants_chunk(no, frame, &id) {
                return;
            }
            if let Some(charge) = self.try_take(CHUNK_ENTRY_BYTES) {
                frames.add_chunk(no, id, start, len, charge);
                return;
            }
            if attempt > 0 {
                return;
            }
            let evicted = frames.pop_oldest();
            // Given back outside the cache's lock.
            drop(frames);
            drop(evicted);
        }
    }

    /// A buffer to decode a frame of `raw_len` bytes into, charged for it; the caller holds
    /// no other charge but `held` bytes (see [`MemoryBudget::reserve_beyond`]). A dropped
    /// frame's buffer when one is spare; when none is and the budget is full, the least
    /// recently used frame is evicted for its buffer, which is then reused rather than
    /// unmapped and a fresh one faulted in (a full cache is a sequential reader's steady
    /// state: every frame loaded evicts one).
    pub(super) fn frame_buffer(&self, raw_len: usize, held: usize) -> (Vec<u8>, Charge) {
        let wanted = footprint(raw_len);
        loop {
            if let Some((buffer, mut charge)) = self.spare.take() {
                if charge.bytes() < wanted {
                    let more = self.reserve_beyond(
                        held.saturating_add(charge.bytes()),
                        wanted - charge.bytes(),
                    );
                    charge.absorb(more);
                }
                return (buffer, charge);
            }
            if let Some(c) = self.take(wanted, false) {
                return (Vec::new(), c);
            }
            // A frame no reader holds becomes a spare as it is dropped here, outside the
            // cache's lock.
            let evicted = self.frames().pop_oldest();
            if evicted.is_none() {
                return (Vec::new(), self.reserve_beyond(held, wanted));
            }
            drop(evicted);
        }
    }

    /// A buffer to read a frame record of `len` bytes into, charged for it: one a loader
    /// gave back ([`MemoryBudget::keep_read_buffer`]), or a new one. The caller holds no
    /// other charge.
    pub(super) fn read_buffer(&self, len: usize) -> (Vec<u8>, Charge) {
        let wanted = footprint(len);
        match self.reads.take() {
            Some((buffer, mut charge)) => {
                if charge.bytes() < wanted {
                    let more = self.reserve_beyond(charge.bytes(), wanted - charge.bytes());
                    charge.absorb(more);
                }
                (buffer, charge)
            }
            None => (Vec::new(), self.reserve(wanted)),
        }
    }

    /// Keeps a read buffer, with its charge, for the next record; one that grew past its
    /// charge (a store that replaced it) is given back instead.
    pub(super) fn keep_read_buffer(&self, buffer: Vec<u8>, mut charge: Charge) {
        let needs = footprint(buffer.capacity());
        if needs <= charge.bytes() {
            charge.shrink_to(needs);
            self.reads.put(buffer, charge);
        }
    }

    /// Gives back one spare buffer's memory and charge (a frame's, else a read's); false
    /// when none is kept.
    fn drop_spare(&self) -> bool {
        self.spare.take().is_some() || self.reads.take().is_some()
    }

    /// Takes `bytes` for a frame about to be fetched and decoded, giving back spare buffers,
    /// then evicting cached frames, then waiting for in-flight ones as needed.
    pub fn reserve(&self, bytes: usize) -> Charge {
        self.reserve_beyond(0, bytes)
    }

    /// [`MemoryBudget::reserve`] for a caller that holds `held` bytes of frame charges
    /// already (a spare buffer it is about to decode into): those are not waited for, so a
    /// reservation proceeds when they are all that is live, as one of `held + bytes` would.
    fn reserve_beyond(&self, held: usize, bytes: usize) -> Charge {
        loop {
            if let Some(c) = self.take_beyond(held, bytes) {
                return c;
            }
            if self.drop_spare() {
                continue;
            }
            // Evict the least recently used frame; when the cache is empty, what holds the
            // budget is frames in use, which their readers drop shortly.
            let evicted: Option<Evicted> = self.frames().pop_oldest();
            if evicted.is_none() {
                let l = self.accounts.lock();
                if !self.fits_beyond(&l, held, bytes) {
                    // A timeout, not only the notification: an eviction whose frame was still
                    // held frees its bytes later, from another thread, without this lock.
                    let _ = self
                        .accounts
                        .freed
                        .wait_timeout(l, Duration::from_millis(20));
                }
            }
            drop(evicted);
        }
    }

    /// Takes `bytes` for as long as a user (a connection) lives, or None when fixed charges
    /// would pass half the budget. Cached frames are evicted to make room; in-flight frames
    /// are waited for.
    pub fn try_reserve_fixed(&self, bytes: usize) -> Option<Charge> {
        loop {
            {
                let l = self.accounts.lock();
                if l.fixed.saturating_add(bytes) > self.capacity / 2 {
                    return None;
                }
            }
            if let Some(c) = self.take(bytes, true) {
                return Some(c);
            }
            if self.drop_spare() {
                continue;
            }
            let evicted = self.frames().pop_oldest();
            if evicted.is_none() {
                let l = self.accounts.lock();
                if !self.fits(&l, bytes, true) {
                    let _ = self
                        .accounts
                        .freed
                        .wait_timeout(l, Duration::from_millis(20));
                }
            }
            drop(evicted);
        }
    }

    /// Takes `bytes` for an entry of a cached frame only if they fit now, without evicting
    /// or waiting.
    pub(super) fn try_take(&self, bytes: usize) -> Option<Charge> {
        self.take_now(bytes, Kind::Frame)
    }

    /// Takes `bytes` for a decoded manifest segment to be cached, only if they fit now and
    /// segments stay within an eighth of the capacity; None otherwise (the caller evicts one
    /// of its own segments, or does not cache).
    pub fn try_take_segment(&self, bytes: usize) -> Option<Charge> {
        {
            let l = self.accounts.lock();
            if l.segments.saturating_add(bytes) > self.capacity / 8 {
                return None;
            }
        }
        self.take_now(bytes, Kind::Segment)
    }

    fn take_now(&self, bytes: usize, kind: Kind) -> Option<Charge> {
        let mut l = self.accounts.lock();
        if l.taken().saturating_add(bytes) > self.capacity {
            return None;
        }
        l.charge(bytes);
        if kind == Kind::Segment {
            l.segments = l.segments.saturating_add(bytes);
        }
        Some(Charge {
            accounts: Arc::clone(&self.accounts),
            bytes,
            kind,
        })
    }

    fn fits(&self, l: &Ledger, bytes: usize, fixed: bool) -> bool {
        l.taken().saturating_add(bytes) <= self.capacity || (!fixed && l.frames_live() == 0)
    }

    /// Whether a frame reservation of `bytes` by a caller holding `held` bytes of frame
    /// charges may proceed. Such a caller (a loader holding its read buffer) is not held back
    /// by memory measured outside the charges: loaders that each hold a read buffer and wait
    /// for a frame buffer could wait for each other for ever, since none of them can give
    /// that memory back. Only reservations by callers holding nothing, and the cache's
    /// evictions, answer for it.
    fn fits_beyond(&self, l: &Ledger, held: usize, bytes: usize) -> bool {
        let limit = if held > 0 { l.used } else { l.taken() };
        limit.saturating_add(bytes) <= self.capacity || l.frames_live() <= held
    }

    fn take_beyond(&self, held: usize, bytes: usize) -> Option<Charge> {
        if held == 0 {
            return self.take(bytes, false);
        }
        let mut l = self.accounts.lock();
        if !self.fits_beyond(&l, held, bytes) {
            return None;
        }
        l.charge(bytes);
        Some(Charge {
            accounts: Arc::clone(&self.accounts),
            bytes,
            kind: Kind::Frame,
        })
    }

    fn take(&self, bytes: usize, fixed: bool) -> Option<Charge> {
        let mut l = self.accounts.lock();
        if !self.fits(&l, bytes, fixed) {
            return None;
        }
        l.charge(bytes);
        if fixed {
            l.fixed = l.fixed.saturating_add(bytes);
        }
        Some(Charge {
            accounts: Arc::clone(&self.accounts),
            bytes,
            kind: if fixed { Kind::Fixed } else { Kind::Frame },
        })
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

    fn frame(budget: &MemoryBudget, len: usize) -> Arc<Frame> {
        let charge = budget.reserve(len);
        Arc::new(Frame::new(vec![7; len], charge))
    }

    #[test]
    fn frames_in_use_and_cached_count_against_one_capacity() {
        let budget = MemoryBudget::new(1000);
        for i in 0..3 {
            budget.keep(key(i), frame(&budget, 300));
        }
        assert_eq!(budget.stats().used_bytes, 900);
        // A frame held by a reader stays charged after eviction, until it is dropped.
        let held = budget.cached(&key(0)).expect("cached");
        let f = frame(&budget, 300); // evicts 1 (the least recent), keeps 0 (just used)
        assert!(budget.cached(&key(1)).is_none());
        assert_eq!(budget.stats().used_bytes, 900);
        budget.keep(key(3), f);
        let _g = frame(&budget, 300); // evicts 2, then 0 leaves the cache but is held
        let s = budget.stats();
        assert!(s.used_bytes <= 1000, "{s:?}");
        drop(held);
        assert!(budget.stats().peak_bytes <= 1000);
    }

    /// Growth the charges do not cover takes room from the frames: the cache gives up frames
    /// at once, and a reservation finds less room; growth the charges cover takes none.
    #[test]
    fn measured_growth_beyond_the_charges_is_taken_from_the_frames() {
        let budget = MemoryBudget::new(1600);
        for i in 0..5 {
            budget.keep(key(i), frame(&budget, 300));
        }
        assert_eq!(budget.stats().used_bytes, 1500);
        // Within the charges: nothing outside.
        budget.measured_growth(1400);
        let s = budget.stats();
        assert_eq!((s.outside_bytes, s.used_bytes), (0, 1500), "{s:?}");
        // 100 beyond them (within the limit, a sixteenth): fits 1600 with the frames.
        budget.measured_growth(1600);
        assert_eq!(budget.stats().outside_bytes, 100);
        assert_eq!(budget.stats().used_bytes, 1500);
        assert!(
            budget.try_take(1).is_none(),
            "the room left was measured as taken"
        );
        // 200 beyond counts as the limit (a sixteenth: 100).
        budget.measured_growth(1500 + 200);
        assert_eq!(budget.stats().outside_bytes, 100);
        // A reservation evicts to make room for itself and the measure.
        budget.keep(key(5), frame(&budget, 100));
        assert!(budget.cached(&key(0)).is_none());
        let s = budget.stats();
        assert_eq!((s.used_bytes, s.outside_bytes), (1300, 100), "{s:?}");
        // A measure that leaves no room evicts at once, without waiting for a reservation.
        budget.measured_growth(0);
        budget.keep(key(6), frame(&budget, 300));
        assert_eq!(budget.stats().used_bytes, 1600);
        budget.measured_growth(1600 + 100);
        assert!(budget.cached(&key(1)).is_none());
        let s = budget.stats();
        assert_eq!((s.used_bytes, s.outside_bytes), (1300, 100), "{s:?}");
        assert_eq!(s.outside_peak_bytes, 100);
    }

    /// A frame whose buffer grew past its charge keeps no more memory than it is charged.
    #[test]
    fn a_frame_never_holds_more_than_its_charge() {
        let budget = MemoryBudget::new(1 << 20);
        let charge = budget.reserve(footprint(3000));
        let mut data = Vec::with_capacity(64 * 1024);
        data.resize(3000, 1);
        let frame = Frame::new(data, charge);
        assert!(
            footprint(frame.data.capacity()) <= frame.charge.as_ref().map_or(0, Charge::bytes),
            "capacity {}",
            frame.data.capacity()
        );
        assert_eq!(budget.stats().used_bytes, footprint(3000));
    }

    /// Loaders that each hold a read buffer and then want a frame buffer all proceed, one
    /// after the other, when only memory measured outside the charges stands in their way
    /// (nobody of them could give it back: they would wait for each other for ever).
    #[test]
    fn loaders_holding_read_buffers_are_not_stopped_by_measured_growth() {
        let budget = MemoryBudget::new(1600);
        budget.measured_growth(1600);
        assert_eq!(budget.stats().outside_bytes, 100);
        let all_hold = Arc::new(std::sync::Barrier::new(3));
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..3 {
            let (budget, all_hold, done) =
                (Arc::clone(&budget), Arc::clone(&all_hold), done.clone());
            // Detached: on failure they would wait for ever, and the test must still end.
            std::thread::spawn(move || {
                let read = budget.reserve(400);
                all_hold.wait();
                // 3 × 400 held + 100 outside + 350 > 1600; without the outside it fits.
                let frame = budget.reserve_beyond(read.bytes(), 350);
                drop((read, frame));
                let _ = done.send(());
            });
        }
        for _ in 0..3 {
            assert!(
                finished.recv_timeout(Duration::from_secs(10)).is_ok(),
                "loaders wait for each other: {:?}",
                budget.stats()
            );
        }
    }

    /// A buffer length whose footprint is exactly one page.
    const LEN: usize = PAGE - MALLOC_HEADER;

    fn reusable(budget: &MemoryBudget, fill: u8) -> Arc<Frame> {
        let charge = budget.reserve(footprint(LEN));
        Arc::new(Frame::reusable(vec![fill; LEN], charge, budget))
    }

    #[test]
    fn a_dropped_frames_buffer_is_kept_charged_and_given_back_before_any_eviction() {
        let budget = MemoryBudget::new(3 * PAGE);
        let first = reusable(&budget, 7);
        let ptr = first.as_ptr();
        budget.keep(key(0), Arc::clone(&first));
        drop(first);
        // Evicted and dropped: its buffer is a spare, still charged.
        let evicted = budget.frames().pop_oldest();
        drop(evicted);
        assert_eq!(budget.stats().used_bytes, PAGE);
        let (buffer, charge) = budget.frame_buffer(LEN, 0);
        assert_eq!((buffer.as_ptr(), charge.bytes()), (ptr, PAGE));
        let second = Arc::new(Frame::reusable(buffer, charge, &budget));
        budget.keep(key(1), second);
        // A cached frame and, once dropped, a spare: a reservation of two pages gives the
        // spare back rather than evicting the cached frame.
        drop(reusable(&budget, 1));
        assert_eq!(budget.stats().used_bytes, 2 * PAGE);
        let big = budget.reserve(2 * PAGE);
        assert!(
            budget.cached(&key(1)).is_some(),
            "evicted while a spare was kept"
        );
        assert_eq!(budget.stats().used_bytes, 3 * PAGE);
        assert!(budget.spare.take().is_none(), "no spare was left");
        drop(big);
    }

    #[test]
    fn a_full_budget_decodes_into_the_buffer_of_the_frame_it_evicts() {
        // Before: the evicted frame's buffer went to the spares and was unmapped at once to
        // make room, and the next frame faulted in a fresh one.
        let budget = MemoryBudget::new(3 * PAGE);
        let oldest = reusable(&budget, 0);
        let ptr = oldest.as_ptr();
        budget.keep(key(0), oldest);
        budget.keep(key(1), reusable(&budget, 1));
        budget.keep(key(2), reusable(&budget, 2));
        assert_eq!(budget.stats().used_bytes, 3 * PAGE);
        let (buffer, charge) = budget.frame_buffer(LEN, 0);
        assert_eq!(buffer.as_ptr(), ptr, "not the evicted frame's buffer");
        assert_eq!(charge.bytes(), PAGE);
        assert!(budget.cached(&key(0)).is_none() && budget.cached(&key(1)).is_some());
        assert_eq!(budget.stats().used_bytes, 3 * PAGE);
    }

    #[test]
    fn read_buffers_are_kept_charged_and_given_back_under_pressure() {
        let budget = MemoryBudget::new(4 * PAGE);
        let (mut read, charge) = budget.read_buffer(LEN);
        assert_eq!(charge.bytes(), PAGE);
        read.reserve_exact(LEN);
        read.resize(LEN, 3);
        let ptr = read.as_ptr();
        budget.keep_read_buffer(read, charge);
        assert_eq!(
            budget.stats().used_bytes,
            PAGE,
            "a kept read buffer stays charged"
        );
        let (read, charge) = budget.read_buffer(LEN);
        assert_eq!((read.as_ptr(), charge.bytes()), (ptr, PAGE));
        // One that grew past its charge (a store replaced it) is not kept.
        budget.keep_read_buffer(vec![0; 2 * PAGE], charge);
        drop(read);
        assert_eq!(budget.stats().used_bytes, 0);
        let (mut read, charge) = budget.read_buffer(LEN);
        read.reserve_exact(LEN);
        budget.keep_read_buffer(read, charge);
        let all = budget.reserve(4 * PAGE);
        assert_eq!(budget.stats().used_bytes, 4 * PAGE);
        drop(all);
    }

    #[test]
    fn a_frame_is_charged_its_pages_not_only_its_capacity() {
        let budget = MemoryBudget::new(1 << 20);
        let len = 256 << 10;
        let frame = Frame::new(vec![0; len], budget.reserve(2 * len));
        assert_eq!(budget.stats().used_bytes, len + PAGE);
        drop(frame);
        assert_eq!(footprint(PAGE - MALLOC_HEADER), PAGE);
        assert_eq!(footprint(PAGE), 2 * PAGE);
    }

    #[test]
    fn fixed_charges_take_at_most_half_and_are_given_back() {
        let budget = MemoryBudget::new(1000);
        let a = budget.try_reserve_fixed(400).expect("first");
        assert!(budget.try_reserve_fixed(200).is_none(), "past half");
        drop(a);
        let b = budget.try_reserve_fixed(500).expect("after release");
        assert_eq!(budget.stats().fixed_bytes, 500);
        // Frames fill the rest; one more frame waits for a reader to drop one.
        let f1 = frame(&budget, 500);
        let waiting = std::thread::scope(|s| {
            let h = s.spawn(|| frame(&budget, 400).len());
            std::thread::sleep(Duration::from_millis(100));
            assert!(!h.is_finished(), "a reservation past the budget must wait");
            drop(f1);
            h.join().expect("join")
        });
        assert_eq!(waiting, 400);
        drop(b);
        assert!(budget.stats().peak_bytes <= 1000);
    }

    #[test]
    fn a_frame_larger_than_the_budget_is_decoded_alone() {
        let budget = MemoryBudget::new(100);
        budget.keep(key(1), frame(&budget, 60));
        let big = frame(&budget, 500);
        assert_eq!(big.len(), 500);
        assert!(
            budget.cached(&key(1)).is_none(),
            "the cache was emptied first"
        );
    }
}
