//! Deduplication: whether a chunk the backup just hashed must be stored.
//!
//! A chunk is stored once per repository. Four places can already hold it, asked cheapest
//! first: the parent snapshot's extents of the same segment (chunks it references are in the
//! repository, and backups hold a writer lock, so no prune removes them meanwhile), the
//! chunks earlier in the same segment, the chunks the writer has accepted into a pack that
//! the index does not list yet (`pending`), and last the index itself (a SQLite query behind
//! the reader pool's mutex).
//!
//! Workers decide in parallel, so two segments may both compress a chunk neither has seen.
//! The writer, which alone appends to packs, asks again ([`Dedup::fresh`]) and stores a frame
//! only if one of its chunks is still new. Invariant: an id leaves `pending` only after the
//! index lists it, so between the two every lookup finds it in one of them.
//!
//! The writer's re-check needs no index query in the common case. A worker's lookup can only
//! miss a chunk the writer accepted after it (one pending then was found pending, or, moved
//! on, in the index). Such a chunk is pending at the re-check, or was indexed since: with the
//! packs indexed during this run counted, a segment remembers the count before its lookups
//! ([`SegmentDedup::since`]) and the ids of the last [`RECENT_PACKS`] indexed packs are kept,
//! so the writer checks `pending` and the packs indexed since, and asks SQLite only when more
//! packs than that were indexed meanwhile. (Half of a gen0's index queries were the writer's,
//! on its single thread; profiled.)

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::error::Result;
use crate::format::manifest::Extent;
use crate::format::ChunkId;
use crate::repo::Repo;

/// The chunks of one backup run that the repository has, or is about to have.
pub(super) struct Dedup<'r> {
    repo: &'r Repo,
    /// Ids the writer has accepted into a pack but not yet committed to the index, and the
    /// ids of the packs this run indexed last.
    pending: Mutex<Pending>,
    /// On a shared store: the packs condemned when the backup started (a chunk the index
    /// places only there counts as absent), and the packs the backup uses (deduplicated
    /// against or wrote), for the re-check before the manifest (`maintain::condemn`).
    shared: Option<Shared>,
}

/// How many of the last indexed packs' ids the writer's re-check remembers: the workers run
/// at most a few segments (a pack or two) ahead of the writer.
const RECENT_PACKS: usize = 8;

#[derive(Default)]
struct Pending {
    ids: HashSet<ChunkId>,
    /// Packs this run has indexed so far.
    indexed_packs: u64,
    /// The ids of the last [`RECENT_PACKS`] packs indexed, oldest first, each with the value
    /// `indexed_packs` took when it was indexed.
    recent: VecDeque<(u64, HashSet<ChunkId>)>,
}

impl Pending {
    /// One more pack, holding `ids`, is indexed.
    fn pack_indexed<'a>(&mut self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        let mut indexed = HashSet::new();
        for id in ids {
            self.ids.remove(id);
            indexed.insert(*id);
        }
        self.indexed_packs += 1;
        if self.recent.len() == RECENT_PACKS {
            self.recent.pop_front();
        }
        self.recent.push_back((self.indexed_packs, indexed));
    }

    /// Whether `id` was accepted after a lookup made when `since` packs were indexed: it is
    /// pending, or in a pack indexed since. `None` when packs indexed since are forgotten.
    fn accepted_since(&self, id: &ChunkId, since: u64) -> Option<bool> {
        if self.ids.contains(id) {
            return Some(true);
        }
        if self.indexed_packs == since {
            return Some(false);
        }
        // Every pack numbered since+1..=indexed_packs must be remembered to answer "no".
        let oldest = self.recent.front().map(|(n, _)| *n)?;
        if oldest > since + 1 {
            return None;
        }
        Some(
            self.recent
                .iter()
                .any(|(n, ids)| *n > since && ids.contains(id)),
        )
    }
}

struct Shared {
    condemned: HashSet<String>,
    used: Mutex<HashSet<String>>,
}

impl<'r> Dedup<'r> {
    pub(super) fn new(repo: &'r Repo) -> Result<Self> {
        let shared = if repo.is_remote() {
            let records = crate::maintain::condemn::read_all(repo.backend(), repo.protection())?;
            Some(Shared {
                condemned: crate::maintain::condemn::packs_of(&records),
                used: Mutex::new(HashSet::new()),
            })
        } else {
            None
        };
        Ok(Dedup {
            repo,
            pending: Mutex::new(Pending::default()),
            shared,
        })
    }

    /// Whether the index holds `id` in a pack the backup may use; notes the pack as used.
    fn indexed(&self, id: &ChunkId) -> Result<bool> {
        let Some(shared) = &self.shared else {
            return self.repo.readers().contains(id);
        };
        match self.repo.readers().lookup(id)? {
            Some(loc) if !shared.condemned.contains(&loc.pack) => {
                if let Ok(mut used) = shared.used.lock() {
                    used.insert(loc.pack);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The backup stored pack `name`.
    pub(super) fn wrote_pack(&self, name: &str) {
        if let Some(shared) = &self.shared {
            if let Ok(mut used) = shared.used.lock() {
                used.insert(name.to_string());
            }
        }
    }

    /// The packs the backup uses, on a shared store (`None` on a local repository).
    pub(super) fn used_packs(&self) -> Option<HashSet<String>> {
        let shared = self.shared.as_ref()?;
        Some(shared.used.lock().map(|u| u.clone()).unwrap_or_default())
    }

    /// The dedup state of one segment whose parent extents are `parent` (empty without a
    /// parent).
    pub(super) fn segment(&self, parent: &[Extent]) -> SegmentDedup<'_, 'r> {
        let mut known: Vec<ChunkId> = parent
            .iter()
            .filter_map(|e| match *e {
                Extent::Chunk { id, .. } => Some(id),
                Extent::Zero { .. } => None,
            })
            .collect();
        known.sort_unstable();
        SegmentDedup {
            dedup: self,
            since: self.indexed_packs(),
            known,
            new: Vec::new(),
        }
    }

    /// The writer's re-check: the chunks of a frame that neither an earlier frame of this run
    /// nor the index holds, as `(id, raw length)`; `since` is the frame's segment's
    /// [`SegmentDedup::since`].
    pub(super) fn fresh(
        &self,
        chunks: &[(ChunkId, u32)],
        since: u64,
    ) -> Result<Vec<(ChunkId, u32)>> {
        let mut fresh = Vec::with_capacity(chunks.len());
        let mut ask_index = Vec::new();
        {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for &(id, raw_len) in chunks {
                match pending.accepted_since(&id, since) {
                    Some(true) => {}
                    Some(false) => fresh.push((id, raw_len)),
                    None => ask_index.push((id, raw_len)),
                }
            }
        }
        if ask_index.is_empty() {
            return Ok(fresh);
        }
        // Too many packs indexed since the worker's lookups: ask as before, in frame order.
        let mut fresh = Vec::with_capacity(chunks.len());
        for &(id, raw_len) in chunks {
            if !self.is_pending(&id) && !self.indexed(&id)? {
                fresh.push((id, raw_len));
            }
        }
        Ok(fresh)
    }

    /// The writer put these chunks into the open pack.
    pub(super) fn accept(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.ids.extend(ids);
    }

    /// The index now lists the chunks of one more pack: they need not be pending any more.
    pub(super) fn now_indexed<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.pack_indexed(ids);
    }

    fn is_pending(&self, id: &ChunkId) -> bool {
        self.pending
            .lock()
            .map(|p| p.ids.contains(id))
            .unwrap_or(false)
    }

    /// Packs indexed so far by this run.
    fn indexed_packs(&self) -> u64 {
        self.pending
            .lock()
            .map(|p| p.indexed_packs)
            .unwrap_or_else(|p| p.into_inner().indexed_packs)
    }
}

/// Dedup within one segment: the parent's chunks (sorted) and the new chunks seen so far.
pub(super) struct SegmentDedup<'d, 'r> {
    dedup: &'d Dedup<'r>,
    /// Packs this run had indexed before the segment's first lookup: what the writer's
    /// re-check of the segment's frames starts from.
    pub(super) since: u64,
    known: Vec<ChunkId>,
    new: Vec<ChunkId>,
}

impl SegmentDedup<'_, '_> {
    /// Whether `id` must be stored: no place holds it yet. A chunk reported new is remembered,
    /// so a repeat in the same segment is not.
    pub(super) fn is_new(&mut self, id: &ChunkId) -> Result<bool> {
        let have = self.known.binary_search(id).is_ok()
            || self.new.contains(id)
            || self.dedup.is_pending(id)
            || self.dedup.indexed(id)?;
        if !have {
            self.new.push(*id);
        }
        Ok(!have)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    fn index(p: &mut Pending, ids: &[u8]) {
        let ids: Vec<ChunkId> = ids.iter().map(|i| id(*i)).collect();
        p.pack_indexed(&ids);
    }

    /// A chunk accepted after a lookup is found pending or in a pack indexed since; one
    /// indexed before the lookup is not the re-check's business (the lookup saw it); packs
    /// indexed since and forgotten send the re-check to the index.
    #[test]
    fn accepted_since_covers_pending_and_recent_packs_or_says_it_cannot() {
        let mut p = Pending::default();
        p.ids.insert(id(1));
        assert_eq!(p.accepted_since(&id(1), 0), Some(true));
        assert_eq!(p.accepted_since(&id(2), 0), Some(false));
        index(&mut p, &[1]);
        assert_eq!(
            p.accepted_since(&id(1), 0),
            Some(true),
            "indexed since the lookup"
        );
        assert_eq!(
            p.accepted_since(&id(1), 1),
            Some(false),
            "indexed before the lookup"
        );
        for n in 0..RECENT_PACKS as u8 {
            index(&mut p, &[10 + n]);
        }
        // Pack 1 (id 1) is forgotten: a lookup from before it cannot be answered here.
        assert_eq!(p.accepted_since(&id(1), 0), None);
        assert_eq!(p.accepted_since(&id(2), 0), None);
        assert_eq!(p.accepted_since(&id(10), 1), Some(true));
        assert_eq!(p.accepted_since(&id(2), 1), Some(false));
    }
}
