//! How many packs a backup into a remote repository uploads at once.
//!
//! One PUT at a time leaves the link idle for a round trip per pack and per index delta (the
//! delta follows its pack, never precedes it), and the writer waits behind it. Each upload in
//! flight holds its pack's buffer (the pack target size, 16 MiB by default) until the store
//! answers, so memory grows by one pack per upload: [`DEFAULT_REMOTE_UPLOADS`] packs plus the
//! one being filled stay within the 128 MiB a backup may use (issue 14). A local repository
//! stores one pack at a time: its writes are bounded by the disk, not by round trips.

use crate::error::{Error, Result};

/// Packs uploaded at once into a remote repository unless [`UPLOADS_ENV`] says otherwise.
/// Three: on the 4 GiB gen0 at 20 ms (moto, 2 repetitions) 2, 3 and 4 uploads took 13.4, 12.7
/// and 13.4 s at 109, 125 and 137 MiB peak: a fourth pack in memory bought no speed and
/// passed the 128 MiB.
pub const DEFAULT_REMOTE_UPLOADS: usize = 3;

/// Most uploads [`UPLOADS_ENV`] may ask for: each holds a pack in memory.
pub const MAX_REMOTE_UPLOADS: usize = 8;

/// The environment variable that sets the packs a remote backup uploads at once (1 to
/// [`MAX_REMOTE_UPLOADS`]), for benches and links where the default does not fit.
pub const UPLOADS_ENV: &str = "STACKVAULT_UPLOADS_IN_FLIGHT";

/// Packs uploaded at once: 1 for a local repository, else [`UPLOADS_ENV`] or the default.
pub(super) fn uploads_in_flight(remote: bool) -> Result<usize> {
    if !remote {
        return Ok(1);
    }
    match std::env::var(UPLOADS_ENV) {
        Err(_) => Ok(DEFAULT_REMOTE_UPLOADS),
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
            }),
    }
}
