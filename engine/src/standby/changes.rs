//! What a sync must write: the ranges where the target may differ from the new snapshot,
//! computed from manifests alone, a segment at a time.
//!
//! The target holds, at every offset, the bytes of one of the `olds` snapshots (the one it held
//! clean, plus any an interrupted sync was applying). A range must be written when any of them
//! differs there from the new snapshot: two ranges are equal when both are zero runs, or both
//! lie in the same chunk starting at the same disk offset (as `diff` decides). The result is
//! exact to chunk granularity: never misses a change, over-reports at most the equal part of a
//! changed chunk.

use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::format::ChunkId;
use crate::read::FrameCache;
use crate::repo::Repo;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Zero,
    Chunk(ChunkId, u64),
    /// Past the end of the old disk.
    Absent,
}

fn key(e: &Extent, start: u64) -> Key {
    match *e {
        Extent::Zero { .. } => Key::Zero,
        Extent::Chunk { id, .. } => Key::Chunk(id, start),
    }
}

/// Appends `[start, end)` to sorted `out`, merging with the last range when they touch.
fn push(out: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 >= start => last.1 = last.1.max(end),
        _ => out.push((start, end)),
    }
}

/// Ranges of the segment at `base` where `old` (`None`: nothing comparable) differs from
/// `new`, appended to `out` in order.
fn differing(old: Option<&[Extent]>, new: &[Extent], base: u64, out: &mut Vec<(u64, u64)>) {
    let old = old.unwrap_or_default();
    let (mut i, mut j) = (0usize, 0usize);
    let (mut a_start, mut b_start, mut pos) = (base, base, base);
    while let Some(b) = new.get(j) {
        let b_end = b_start + u64::from(b.len());
        let (a_key, a_end) = match old.get(i) {
            Some(a) => (key(a, a_start), a_start + u64::from(a.len())),
            None => (Key::Absent, u64::MAX),
        };
        let end = a_end.min(b_end);
        if a_key != key(b, b_start) {
            push(out, pos, end);
        }
        pos = end;
        if a_end == end && i < old.len() {
            a_start = a_end;
            i += 1;
        }
        if b_end == end {
            b_start = b_end;
            j += 1;
        }
    }
}

/// The changed ranges of segment `index` of `new` against every manifest in `olds`, merged.
pub fn changed_in_segment(
    olds: &[Manifest<'_>],
    new: &Manifest<'_>,
    index: u64,
    new_extents: &[Extent],
) -> Result<Vec<(u64, u64)>> {
    let base = index * u64::from(new.segment_size);
    let mut all = Vec::new();
    for old in olds {
        let comparable = old.segment_size == new.segment_size && index < old.segment_count();
        let extents = if comparable {
            Some(old.segment(index)?)
        } else {
            None
        };
        if extents.as_deref() == Some(new_extents) {
            continue;
        }
        differing(extents.as_deref(), new_extents, base, &mut all);
    }
    all.sort_unstable();
    let mut merged = Vec::with_capacity(all.len());
    for (s, e) in all {
        push(&mut merged, s, e);
    }
    Ok(merged)
}

/// Part of the new disk inside a changed range.
pub enum Part<'d> {
    /// `[offset, offset + len)` is zero in the snapshot.
    Zero { offset: u64, len: u64 },
    /// Bytes of a chunk, starting at disk `offset`.
    Data { offset: u64, data: &'d [u8] },
}

/// Where [`walk`] reads chunks: the repository, and the snapshot named in its errors.
pub struct ChunkSource<'a> {
    pub repo: &'a Repo,
    pub snapshot_id: &'a str,
}

/// Walks the new segment's extents (`base` its offset) over `[start, end)`, handing each part
/// to `f`: zero runs as ranges, chunk bytes read and verified from the repository.
pub fn walk(
    source: &ChunkSource<'_>,
    frames: &mut FrameCache,
    extents: &[Extent],
    base: u64,
    (start, end): (u64, u64),
    f: &mut dyn FnMut(Part<'_>) -> Result<()>,
) -> Result<()> {
    let ChunkSource { repo, snapshot_id } = *source;
    let mut pos = base;
    for e in extents {
        let e_end = pos + u64::from(e.len());
        let (s, t) = (pos.max(start), e_end.min(end));
        if s < t {
            match *e {
                Extent::Zero { .. } => f(Part::Zero {
                    offset: s,
                    len: t - s,
                })?,
                Extent::Chunk { id, len } => {
                    let (from, to) = ((s - pos) as usize, (t - pos) as usize);
                    let hand = |data: &[u8]| -> Result<()> {
                        let piece = data.get(from..to).filter(|_| data.len() == len as usize);
                        let piece = piece.ok_or_else(|| {
                            Error::corrupt(
                                format!("snapshot {snapshot_id}"),
                                pos,
                                format!("chunk {id} is {} bytes, manifest says {len}", data.len()),
                            )
                        })?;
                        f(Part::Data {
                            offset: s,
                            data: piece,
                        })
                    };
                    crate::read::verified::with_chunk(
                        repo,
                        snapshot_id,
                        frames,
                        &id,
                        len,
                        pos,
                        hand,
                    )?;
                }
            }
        }
        if e_end >= end {
            break;
        }
        pos = e_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_ranges_at_chunk_granularity() {
        let (x, y) = (ChunkId::of(b"x"), ChunkId::of(b"y"));
        let old = [
            Extent::Chunk { id: x, len: 100 },
            Extent::Zero { len: 100 },
            Extent::Chunk { id: x, len: 50 },
        ];
        let new = [
            Extent::Chunk { id: x, len: 100 },
            Extent::Chunk { id: y, len: 100 },
            Extent::Zero { len: 50 },
            Extent::Zero { len: 50 },
        ];
        let mut out = Vec::new();
        differing(Some(&old), &new, 1000, &mut out);
        // 1100..1200 chunk over zeros, 1200..1250 zeros over a chunk, 1250..1300 past the end.
        assert_eq!(out, vec![(1100, 1300)]);
        let mut out = Vec::new();
        differing(None, &new, 0, &mut out);
        assert_eq!(out, vec![(0, 300)]);
        let mut out = Vec::new();
        differing(Some(&new), &new, 0, &mut out);
        assert!(out.is_empty());
    }
}
