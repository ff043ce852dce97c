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

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::Result;
use crate::format::manifest::Extent;
use crate::format::ChunkId;
use crate::repo::Repo;

/// The chunks of one backup run that the repository has, or is about to have.
pub(super) struct Dedup<'r> {
    repo: &'r Repo,
    /// Ids the writer has accepted into a pack but not yet committed to the index.
    pending: Mutex<HashSet<ChunkId>>,
    /// On a shared store: the packs condemned when the backup started (a chunk the index
    /// places only there counts as absent), and the packs the backup uses (deduplicated
    /// against or wrote), for the re-check before the manifest (`maintain::condemn`).
    shared: Option<Shared>,
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
            pending: Mutex::new(HashSet::new()),
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
            known,
            new: Vec::new(),
        }
    }

    /// The writer's re-check: the chunks of a frame that neither an earlier frame of this run
    /// nor the index holds, as `(id, raw length)`.
    pub(super) fn fresh(&self, chunks: &[(ChunkId, u32)]) -> Result<Vec<(ChunkId, u32)>> {
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
        if let Ok(mut p) = self.pending.lock() {
            p.extend(ids);
        }
    }

    /// The index now lists these chunks: they need not be remembered here any more.
    pub(super) fn now_indexed<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        if let Ok(mut p) = self.pending.lock() {
            for id in ids {
                p.remove(id);
            }
        }
    }

    fn is_pending(&self, id: &ChunkId) -> bool {
        self.pending.lock().map(|p| p.contains(id)).unwrap_or(false)
    }
}

/// Dedup within one segment: the parent's chunks (sorted) and the new chunks seen so far.
pub(super) struct SegmentDedup<'d, 'r> {
    dedup: &'d Dedup<'r>,
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
