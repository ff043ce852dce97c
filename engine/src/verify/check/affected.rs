//! The affected-ranges stage of a check: every damaged chunk and manifest mapped to the
//! snapshots it makes unrestorable and, per snapshot, the disk byte ranges (a damaged
//! manifest loses the whole snapshot). It runs last, over the findings of every other stage,
//! and reads only manifests.

use std::collections::{BTreeSet, HashMap};

use crate::error::Result;
use crate::format::manifest::Extent;
use crate::format::SnapshotId;
use crate::index::SnapshotSummary;
use crate::repo::Repo;
use crate::verify::MAX_LISTED_AFFECTED;

use super::{AffectedRange, AffectedSnapshot, Findings};

/// Maps damaged chunks and manifests to the snapshots and disk ranges they make unrestorable.
pub(super) fn affected_snapshots(
    repo: &Repo,
    ids: &BTreeSet<SnapshotId>,
    f: &Findings,
) -> Result<Vec<AffectedSnapshot>> {
    if f.damaged_chunks.is_empty() && f.damaged_manifests.is_empty() {
        return Ok(Vec::new());
    }
    let catalogue: HashMap<SnapshotId, SnapshotSummary> = repo
        .snapshots(None)?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let mut out = Vec::new();
    for id in ids {
        if f.damaged_manifests.contains(id) {
            let known = catalogue.get(id);
            out.push(AffectedSnapshot {
                snapshot_id: id.clone(),
                disk: known.map(|s| s.meta.disk.clone()),
                time: known.map(|s| s.meta.time.clone()),
                whole_snapshot: true,
                damaged_bytes: known.map(|s| s.virtual_size).unwrap_or(0),
                range_count: 0,
                ranges: Vec::new(),
            });
            continue;
        }
        if f.damaged_chunks.is_empty() {
            continue;
        }
        let manifest = repo.load_manifest(id)?;
        let seg = u64::from(manifest.segment_size);
        let mut a = AffectedSnapshot {
            snapshot_id: id.clone(),
            disk: Some(manifest.meta.disk.clone()),
            time: Some(manifest.meta.time.clone()),
            whole_snapshot: false,
            damaged_bytes: 0,
            range_count: 0,
            ranges: Vec::new(),
        };
        for (i, extents) in manifest.segments().enumerate() {
            let mut offset = i as u64 * seg;
            for e in extents? {
                if let Extent::Chunk { id: chunk, len } = e {
                    if f.damaged_chunks.contains(&chunk) {
                        a.damaged_bytes += u64::from(len);
                        a.range_count += 1;
                        if a.ranges.len() < MAX_LISTED_AFFECTED {
                            a.ranges.push(AffectedRange {
                                offset,
                                len: u64::from(len),
                                chunk: chunk.to_hex(),
                            });
                        }
                    }
                }
                offset += u64::from(e.len());
            }
        }
        if a.range_count > 0 {
            out.push(a);
        }
    }
    Ok(out)
}
