//! `--verify P%`: compares a sampled share of a standby target's segments with the snapshot,
//! by hashing what the target holds and comparing with the manifest's chunk ids (zero runs
//! must read as zeros). Needs no repository data, only the manifest, so it also catches a
//! target changed behind our back where the last sync wrote nothing.
//!
//! The sample is drawn afresh on every run (a random seed), so repeated syncs cover the disk;
//! 100% checks every segment.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::progress::Progress;

/// What a sampled verification covered.
#[derive(Clone, Debug, Serialize)]
pub struct VerifySummary {
    pub share_percent: f64,
    pub segments_checked: u64,
    pub segments_total: u64,
    pub bytes_checked: u64,
    pub duration_ms: u64,
}

/// Reads `buf.len()` bytes of the target's virtual disk at an offset.
pub type ReadAt<'a> = dyn Fn(u64, &mut [u8]) -> Result<()> + Sync + 'a;

/// Whether segment `index` is in the sample of `share` drawn with `seed`.
fn sampled(seed: &[u8; 8], index: u64, share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    let h = blake3::hash(&[&seed[..], &index.to_le_bytes()].concat());
    let mut x = [0u8; 8];
    x.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(x) >> 11) as f64 / (1u64 << 53) as f64 <= share
}

/// Checks the sample; the first difference is [`Error::TargetMismatch`] with its offset.
pub fn verify_sample(
    protection: &crate::crypto::Protection,
    manifest: &Manifest<'_>,
    snapshot_id: &str,
    shown: &str,
    share: f64,
    read: &ReadAt<'_>,
    progress: &dyn Progress,
) -> Result<VerifySummary> {
    let started = Instant::now();
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::Internal(format!("no randomness for the verify sample: {e}")))?;
    let total = manifest.segment_count();
    let mut picked: Vec<u64> = (0..total).filter(|&i| sampled(&seed, i, share)).collect();
    if picked.is_empty() && total > 0 {
        picked.push(u64::from_le_bytes(seed) % total);
    }
    let seg = u64::from(manifest.segment_size);
    progress.start("verify", picked.len() as u64 * seg);
    let bytes = picked
        .par_iter()
        .map_init(Vec::new, |buf, &i| {
            crate::progress::checkpoint(progress, "verify-segment")?;
            let base = i * seg;
            let len = usize::try_from(seg.min(manifest.virtual_size - base))
                .map_err(|_| Error::Internal("segment larger than memory".into()))?;
            buf.resize(len, 0);
            read(base, buf)?;
            let mismatch = |offset: u64, what: String| Error::TargetMismatch {
                target: shown.to_string(),
                snapshot: snapshot_id.to_string(),
                offset,
                what: format!(
                    "{what}: the target was changed behind stackvault's back; run \
                     `standby sync --full` to rewrite it"
                ),
            };
            let mut at = 0usize;
            for e in manifest.segment(i)? {
                let n = e.len() as usize;
                let part = buf
                    .get(at..at + n)
                    .ok_or_else(|| Error::Internal(format!("extent past segment {i}")))?;
                match e {
                    Extent::Zero { .. } => {
                        if let Some(k) = part.iter().position(|&b| b != 0) {
                            return Err(mismatch(
                                base + (at + k) as u64,
                                "a byte that should be zero is not".into(),
                            ));
                        }
                    }
                    Extent::Chunk { id, .. } => {
                        if protection.chunk_id(part) != id {
                            return Err(mismatch(
                                base + at as u64,
                                format!("the {n} bytes here are not chunk {id}"),
                            ));
                        }
                    }
                }
                at += n;
            }
            progress.advance(len as u64);
            Ok(len as u64)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))?;
    progress.finish();
    Ok(VerifySummary {
        share_percent: share * 100.0,
        segments_checked: picked.len() as u64,
        segments_total: total,
        bytes_checked: bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_share_is_about_right() {
        let seed = *b"12345678";
        let n = (0..10_000).filter(|&i| sampled(&seed, i, 0.05)).count();
        assert!((400..600).contains(&n), "{n}");
        assert!((0..100).all(|i| sampled(&seed, i, 1.0)));
    }
}
