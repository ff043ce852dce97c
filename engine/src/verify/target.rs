//! Target mode: [`verify_target`] proves that a restored disk equals a snapshot. It reads the
//! target through the [`DiskSource`] trait, compares the BLAKE3 of the target's bytes with
//! each chunk id and checks that zero runs read as zeros. It needs only the manifest, never the
//! packs, and it never writes to the target. A page blob target is opened by
//! `verify::pageblob` (feature `azure`).

use std::path::Path;

use rayon::prelude::*;

use crate::chunker::is_zero;
use crate::error::Result;
use crate::format::manifest::Extent;
use crate::index::SnapshotSummary;
use crate::progress::Progress;

use crate::repo::Repo;
use crate::source::{DiskSource, ExtentKind};

use super::{
    stopped_verify, Tally, VerifyMode, VerifyOptions, VerifyOutcome, VerifyReport, VerifyRun,
};

/// Opens a restored disk for [`verify_target`]. Whatever container [`crate::open_source`]
/// recognises (raw images and block devices; VHD files once that reader lands) is compared
/// by its guest disk contents, so a fixed VHD restore verifies against the same snapshot as
/// a raw one.
pub fn open_target(path: &Path) -> Result<Box<dyn DiskSource>> {
    crate::source::open_source(path, &Default::default())
}

/// Whether `[from, to)` of a target reads as zeros (holes are not read).
fn tail_is_zero(target: &dyn DiskSource, from: u64, to: u64) -> Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    for e in target.extents(from, to - from)? {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut pos = e.offset;
        while pos < e.offset + e.len {
            let n = (e.offset + e.len - pos).min(buf.len() as u64) as usize;
            target.read_at(pos, &mut buf[..n])?;
            if !crate::chunker::is_zero(&buf[..n]) {
                return Ok(false);
            }
            pos += n as u64;
        }
    }
    Ok(true)
}

thread_local! {
    static TARGET_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Proves that `target` holds exactly the virtual disk of `snapshot`, reading it in parallel
/// segment by segment. Differences are reported (outcome `differs`) with the first differing
/// ranges and the chunk each belongs to.
pub fn verify_target(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    target: &dyn DiskSource,
    target_name: &str,
    options: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let run = VerifyRun::start(repo, snapshot, options)?;
    let manifest = &run.manifest;
    let seg = u64::from(manifest.segment_size);
    let target_size = target.virtual_size();
    progress.start("verify", manifest.virtual_size);
    let mut tally = (0..manifest.segment_count())
        .into_par_iter()
        .map(|i| {
            crate::progress::checkpoint(progress, "verify-segment")?;
            let extents = manifest.segment(i)?;
            let start = i * seg;
            let seg_len: u64 = extents.iter().map(|e| u64::from(e.len())).sum();
            let t = TARGET_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                compare_segment(repo, target, start, seg_len, &extents, &mut buf)
            })?;
            progress.advance(seg_len);
            Ok(t)
        })
        .try_reduce(Tally::default, |a, b| Ok(a.merge(b)))
        .map_err(stopped_verify)?;
    progress.finish();
    // A device is usually larger than the disk restored onto it, and a restore leaves its
    // bytes past the disk alone: they are not compared.
    let device = std::fs::metadata(target.info().path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    // A longer target is fine when the tail is zeros: fixed VHDs for Azure are rounded up to
    // a whole MiB.
    if target_size > manifest.virtual_size
        && !device
        && !tail_is_zero(target, manifest.virtual_size, target_size)?
    {
        let mut extra = Tally::default();
        extra.problem(
            manifest.virtual_size,
            target_size - manifest.virtual_size,
            None,
            format!(
                "the target is {target_size} bytes, longer than the snapshot's disk ({} bytes), \
                 and not zero past its end",
                manifest.virtual_size
            ),
        );
        tally = tally.merge(extra);
    }
    let outcome = if tally.problem_count == 0 {
        VerifyOutcome::Ok
    } else {
        VerifyOutcome::Differs
    };
    run.finish(
        VerifyMode::Target,
        Some(target_name.to_string()),
        outcome,
        tally,
    )
}

/// Compares one segment of the target with the manifest's extents for it.
fn compare_segment(
    repo: &Repo,
    target: &dyn DiskSource,
    start: u64,
    seg_len: u64,
    extents: &[Extent],
    buf: &mut Vec<u8>,
) -> Result<Tally> {
    let target_size = target.virtual_size();
    let readable = seg_len.min(target_size.saturating_sub(start));
    buf.clear();
    buf.resize(readable as usize, 0);
    if readable > 0 {
        crate::source::fill_from_map(target, &target.extents(start, readable)?, start, buf)?;
    }
    let mut t = Tally::default();
    let mut offset = start;
    for e in extents {
        let len = u64::from(e.len());
        let from = (offset - start) as usize;
        let end = offset + len;
        let chunk = match e {
            Extent::Chunk { id, .. } => Some(id),
            Extent::Zero { .. } => None,
        };
        match e {
            Extent::Chunk { .. } => {
                t.chunks += 1;
                t.chunk_bytes += len;
            }
            Extent::Zero { .. } => t.zero_bytes += len,
        }
        if end > target_size {
            t.problem(
                offset,
                len,
                chunk,
                format!("beyond the end of the target ({target_size} bytes)"),
            );
        } else {
            let bytes = &buf[from..from + len as usize];
            match e {
                Extent::Chunk { id, .. } => {
                    if repo.protection().chunk_id(bytes) != *id {
                        t.problem(
                            offset,
                            len,
                            Some(id),
                            "content differs from the snapshot's chunk".into(),
                        );
                    }
                }
                Extent::Zero { .. } => {
                    if !is_zero(bytes) {
                        // Narrow the report to the non-zero bytes.
                        let first = bytes.iter().position(|b| *b != 0).unwrap_or(0);
                        let last = bytes.iter().rposition(|b| *b != 0).unwrap_or(first);
                        t.problem(
                            offset + first as u64,
                            (last - first + 1) as u64,
                            None,
                            "must be zero (a zero run in the snapshot) but holds data".into(),
                        );
                    }
                }
            }
        }
        offset = end;
    }
    Ok(t)
}
