//! How many packs a backup uploads at once, and how many pack buffers it holds.
//!
//! One PUT at a time leaves the link idle for a round trip per pack and per index delta (the
//! delta follows its pack, never precedes it), and the writer waits behind it. A pack's buffer
//! (the pack target size, 18 MiB by default, and the largest part of a backup's memory) is
//! held until the store has the pack; its delta and index row follow without it
//! (`WithDeltas::put_pack`). A remote backup holds [`DEFAULT_REMOTE_UPLOADS`] buffers in all,
//! the one being filled included: while they are all uploading, the writer waits for one to
//! come back, and one more uploader than buffers writes a delta meanwhile. A local repository
//! stores one pack at a time while the next is filled: its writes are bounded by the disk, not
//! by round trips.

use crate::error::{Error, Result};

/// Packs a remote backup uploads at once (and pack buffers it holds, the one being filled
/// included) unless [`UPLOADS_ENV`] says otherwise. Three: on the 4 GiB gen0 at 20 ms (moto, 2
/// repetitions) 2, 3 and 4 uploads (each holding its pack until its delta was stored too,
/// plus one being filled) took 13.4, 12.7 and 13.4 s at 109, 125 and 137 MiB peak. Three
/// buffers in all, each given back before its pack's delta, with four uploaders: 12.2 s at
/// 101-103 MiB, against 12.6 s at 116-117 MiB for four buffers and 12.3 s at 124-126 MiB
/// before (medians of 3, moto at 20 ms, alternated); `docs/design.md` has the rest.
pub const DEFAULT_REMOTE_UPLOADS: usize = 3;

/// Most uploads [`UPLOADS_ENV`] may ask for: each holds a pack in memory.
pub const MAX_REMOTE_UPLOADS: usize = 8;

/// The environment variable that sets the packs a remote backup uploads at once (1 to
/// [`MAX_REMOTE_UPLOADS`]), for benches and links where the default does not fit.
pub const UPLOADS_ENV: &str = "STACKVAULT_UPLOADS_IN_FLIGHT";

/// How a backup stores its packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Uploads {
    /// Threads storing packs (and writing their deltas and index rows).
    pub(super) uploaders: usize,
    /// Pack buffers going round between the writer and the uploaders.
    pub(super) buffers: usize,
}

/// A local repository's one pack stored while the next is filled; a remote one's
/// [`UPLOADS_ENV`] or [`DEFAULT_REMOTE_UPLOADS`] packs, with one more uploader for the deltas
/// and at least two buffers (one filled while the other uploads).
pub(super) fn uploads(remote: bool) -> Result<Uploads> {
    if !remote {
        return Ok(Uploads {
            uploaders: 1,
            buffers: 2,
        });
    }
    let packs = match std::env::var(UPLOADS_ENV) {
        Err(_) => DEFAULT_REMOTE_UPLOADS,
        Ok(value) => value
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=MAX_REMOTE_UPLOADS).contains(n))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{UPLOADS_ENV}={value:?}: give a number of uploads from 1 to \
                     {MAX_REMOTE_UPLOADS}, or unset it for the default ({DEFAULT_REMOTE_UPLOADS})"
                ))
            })?,
    };
    Ok(Uploads {
        uploaders: packs + 1,
        buffers: packs.max(2),
    })
}
