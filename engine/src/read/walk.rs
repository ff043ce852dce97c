//! Sequential reads of a snapshot's manifest: a [`ChunkWalker`] per worker goes through
//! segments in disk order and yields each extent as verified chunk bytes or a zero run.
//!
//! Restore, verify and standby walk whole segments in parallel (rayon's `map_init` gives each
//! worker its own walker); random reads go through [`SnapshotReader`](super::SnapshotReader)
//! instead. Both take chunk bytes only from [`verified`](super::verified), so every chunk is
//! checked against its id before a byte of it is used, in one place. A walker's frame cache
//! is its own (no lock): the chunks of a frame are read in order, so each frame is
//! decompressed once per pass, and a chunk that directly follows the previous one in its
//! frame is found without an index lookup.
//!
//! Invariants: pieces come in disk order, without gaps or overlaps, clipped to the range
//! asked for; a [`Piece::Data`] holds only bytes of a chunk that hashed to its id and has the
//! manifest's length; the first damaged chunk ends the walk with its error.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::format::manifest::Extent;
use crate::format::ChunkId;
use crate::repo::Repo;

use super::verified::{self, FrameCache};

/// Part of a snapshot's disk, as a walk yields it.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'d> {
    /// `len` bytes at disk `offset` are zeros (a zero run of the manifest, never stored).
    Zero { offset: u64, len: u64 },
    /// Verified chunk bytes at disk `offset` (part of a chunk when the range cuts it).
    Data { offset: u64, data: &'d [u8] },
}

/// One worker's sequential, verified reader of one snapshot's chunks.
#[derive(Debug)]
pub struct ChunkWalker<'r> {
    repo: &'r Repo,
    snapshot_id: &'r str,
    frames: FrameCache,
}

impl<'r> ChunkWalker<'r> {
    /// A walker over the chunks of snapshot `snapshot_id` of `repo` (named in errors).
    pub fn new(repo: &'r Repo, snapshot_id: &'r str) -> Self {
        ChunkWalker {
            repo,
            snapshot_id,
            frames: FrameCache::default(),
        }
    }

    /// Frames this walker decompressed so far.
    pub fn frames_decoded(&self) -> u64 {
        self.frames.decoded
    }

    /// The bytes of chunk `id` (`len` bytes at disk offset `at`, as the manifest says),
    /// verified, handed to `f`. Damage is an error naming the pack and offset; a chunk of
    /// another length is damage at `at` of the snapshot.
    pub fn chunk<R>(
        &mut self,
        id: &ChunkId,
        len: u32,
        at: u64,
        f: impl FnMut(&[u8]) -> Result<R>,
    ) -> Result<R> {
        verified::with_chunk(
            self.repo,
            self.snapshot_id,
            &mut self.frames,
            id,
            len,
            at,
            f,
        )
    }

    /// Walks `extents` (a segment's, the first at disk offset `base`) over `range` of the
    /// disk, handing each piece to `f` in disk order; extents outside the range are skipped
    /// without reading their chunks.
    pub fn walk(
        &mut self,
        extents: &[Extent],
        base: u64,
        range: Range<u64>,
        f: &mut dyn FnMut(Piece<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut pos = base;
        for e in extents {
            let len = u64::from(e.len());
            let end = pos.checked_add(len).ok_or_else(|| {
                Error::corrupt(
                    format!("snapshot {}", self.snapshot_id),
                    pos,
                    "extent past the end of the address space",
                )
            })?;
            let (s, t) = (pos.max(range.start), end.min(range.end));
            if s < t {
                match *e {
                    Extent::Zero { .. } => f(Piece::Zero {
                        offset: s,
                        len: t - s,
                    })?,
                    Extent::Chunk { id, len } => {
                        // Both lie inside the chunk: they fit its u32 length.
                        let (from, to) = ((s - pos) as usize, (t - pos) as usize);
                        self.chunk(&id, len, pos, |data| {
                            let data = data.get(from..to).ok_or_else(|| {
                                Error::Internal(format!("piece {from}..{to} of chunk {id}"))
                            })?;
                            f(Piece::Data { offset: s, data })
                        })?;
                    }
                }
            }
            if end >= range.end {
                break;
            }
            pos = end;
        }
        Ok(())
    }
}
