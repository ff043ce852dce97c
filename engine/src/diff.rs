//! Differences between two snapshots of a disk, from their manifests alone (no data is read).
//!
//! Two ranges are the same when both are zero runs, or both lie in the same chunk at the same
//! offset of the disk. Anything else is reported as changed, so the result is exact up to
//! chunk granularity: it never misses a change, and may over-report by at most the part of a
//! changed chunk that happens to be equal.

use serde::Serialize;

use crate::error::Result;
use crate::format::manifest::{Extent, Manifest};
use crate::format::ChunkId;

/// A range of the virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// What changed from one snapshot to another (`diff --json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    #[serde(rename = "from_snapshot_id")]
    pub from: String,
    #[serde(rename = "to_snapshot_id")]
    pub to: String,
    #[serde(rename = "from_virtual_size_bytes")]
    pub from_virtual_size: u64,
    #[serde(rename = "to_virtual_size_bytes")]
    pub to_virtual_size: u64,
    /// Total bytes in `changed_ranges`.
    pub changed_bytes: u64,
    /// Segments that differ in any way.
    pub changed_segments: u64,
    /// Sorted, non-overlapping, merged.
    pub changed_ranges: Vec<ByteRange>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Zero,
    /// A chunk and the disk offset where it starts.
    Chunk(ChunkId, u64),
    /// Beyond the end of one of the disks.
    Absent,
}

/// Intervals `(start, end, key)` of one segment, with absolute offsets.
fn intervals(extents: Option<&[Extent]>, base: u64) -> Vec<(u64, u64, Key)> {
    let mut out = Vec::new();
    let mut pos = base;
    for e in extents.into_iter().flatten() {
        let end = pos + u64::from(e.len());
        let key = match *e {
            Extent::Zero { .. } => Key::Zero,
            Extent::Chunk { id, .. } => Key::Chunk(id, pos),
        };
        out.push((pos, end, key));
        pos = end;
    }
    out
}

fn key_at(iv: &[(u64, u64, Key)], at: u64) -> Key {
    iv.iter()
        .find(|(s, e, _)| *s <= at && at < *e)
        .map(|t| t.2)
        .unwrap_or(Key::Absent)
}

fn push(ranges: &mut Vec<ByteRange>, offset: u64, end: u64) {
    if let Some(last) = ranges.last_mut() {
        if last.offset + last.length == offset {
            last.length += end - offset;
            return;
        }
    }
    ranges.push(ByteRange {
        offset,
        length: end - offset,
    });
}

/// Compares two manifests of the same repository, reading both a segment at a time.
pub fn diff(from_id: &str, from: &Manifest, to_id: &str, to: &Manifest) -> Result<DiffReport> {
    let seg = u64::from(to.segment_size);
    let count = from.segment_count().max(to.segment_count());
    let mut ranges = Vec::new();
    let mut changed_segments = 0;
    let comparable = from.segment_size == to.segment_size;
    let (mut from_segments, mut to_segments) = (from.segments(), to.segments());
    for i in 0..count {
        let a = from_segments.next().transpose()?;
        let b = to_segments.next().transpose()?;
        let (a, b) = (a.as_deref(), b.as_deref());
        if comparable && a == b {
            continue;
        }
        changed_segments += 1;
        let base = i * seg;
        let (ia, ib) = (intervals(a, base), intervals(b, base));
        let mut cuts: Vec<u64> = ia
            .iter()
            .chain(ib.iter())
            .flat_map(|(s, e, _)| [*s, *e])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (s, e) = (w[0], w[1]);
            if key_at(&ia, s) != key_at(&ib, s) || !comparable {
                push(&mut ranges, s, e);
            }
        }
    }
    Ok(DiffReport {
        from: from_id.to_string(),
        to: to_id.to_string(),
        from_virtual_size: from.virtual_size,
        to_virtual_size: to.virtual_size,
        changed_bytes: ranges.iter().map(|r| r.length).sum(),
        changed_segments,
        changed_ranges: ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::{encode, tests_support::meta};

    fn manifest(segments: Vec<Vec<Extent>>, size: u64) -> Vec<u8> {
        encode(&mut meta(), size, 4096, &segments)
            .map(|f| f.out)
            .unwrap_or_default()
    }

    #[test]
    fn reports_changed_chunks_and_merges() -> Result<()> {
        let (x, y) = (ChunkId::of(b"x"), ChunkId::of(b"y"));
        let a = manifest(
            vec![
                vec![Extent::Chunk { id: x, len: 4096 }],
                vec![
                    Extent::Zero { len: 1000 },
                    Extent::Chunk { id: x, len: 3096 },
                ],
            ],
            8192,
        );
        let b = manifest(
            vec![
                vec![Extent::Chunk { id: x, len: 4096 }],
                vec![
                    Extent::Zero { len: 1000 },
                    Extent::Chunk { id: y, len: 3096 },
                ],
            ],
            8192,
        );
        let (a, b) = (
            Manifest::from_bytes(&a, "a")?,
            Manifest::from_bytes(&b, "b")?,
        );
        let d = diff("a", &a, "b", &b)?;
        assert_eq!(d.changed_segments, 1);
        assert_eq!(
            d.changed_ranges,
            vec![ByteRange {
                offset: 5096,
                length: 3096
            }]
        );
        assert_eq!(diff("a", &a, "a", &a)?.changed_bytes, 0);
        Ok(())
    }
}
