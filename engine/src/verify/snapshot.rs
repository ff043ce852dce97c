//! Repository mode: [`verify_snapshot`] reads back every chunk of one snapshot as a restore
//! would, without writing anywhere, and checks it end to end (manifest hash and root digest on
//! load, then per chunk crc32, decompression and BLAKE3 id). Its measured time is the user's
//! evidence of restore time. Damage is counted in the report, never a panic or an `Err`.

use rayon::prelude::*;

use crate::error::Result;
use crate::format::manifest::Extent;
use crate::index::SnapshotSummary;
use crate::progress::Progress;

use crate::read::ChunkWalker;
use crate::repo::Repo;

use super::{
    stopped_verify, Tally, VerifyMode, VerifyOptions, VerifyOutcome, VerifyReport, VerifyRun,
};

/// Reads back every chunk of `snapshot` from the repository and checks it end to end.
/// Damage is reported in the result (outcome `damaged`); a manifest that cannot be read is an
/// `Err` naming it.
pub fn verify_snapshot(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    options: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let run = VerifyRun::start(repo, snapshot, options)?;
    let manifest = &run.manifest;
    let seg = u64::from(manifest.segment_size);
    progress.start("verify", manifest.virtual_size);
    let tally = (0..manifest.segment_count())
        .into_par_iter()
        // One chunk walker per worker, as a restore reads: each frame is decompressed once,
        // and the chunks that follow one another in a frame are found without an index lookup.
        .map_init(
            || ChunkWalker::new(repo, &snapshot.id),
            |walker, i| {
                crate::progress::checkpoint(progress, "verify-segment")?;
                let extents = manifest.segment(i)?;
                let start = i * seg;
                let mut t = Tally::default();
                let mut offset = start;
                for e in &extents {
                    match *e {
                        Extent::Zero { len } => t.zero_bytes += u64::from(len),
                        Extent::Chunk { id, len } => {
                            t.chunks += 1;
                            t.chunk_bytes += u64::from(len);
                            // Damage (a chunk of another length too) is counted, not fatal.
                            match walker.chunk(&id, len, offset, |_| Ok(())) {
                                Ok(()) => {}
                                Err(e) if e.is_corruption() => {
                                    t.problem(offset, u64::from(len), Some(&id), e.to_string())
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    offset += u64::from(e.len());
                }
                progress.advance(offset - start);
                Ok(t)
            },
        )
        .try_reduce(Tally::default, |a, b| Ok(a.merge(b)))
        .map_err(stopped_verify)?;
    progress.finish();
    let outcome = if tally.problem_count == 0 {
        VerifyOutcome::Ok
    } else {
        VerifyOutcome::Damaged
    };
    run.finish(VerifyMode::Repository, None, outcome, tally)
}
