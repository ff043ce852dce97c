//! Prune's removal of the unfinished uploads a shared store holds (`verify::leftovers` lists
//! them): uploads started by writers that were killed before completing them.
//!
//! Prune on a shared store runs beside writers (`format-spec/locks.md`, the two-phase rule),
//! so an upload may belong to a backup writing right now. A writer holds an upload open only
//! while it sends one object, and the grace period is already the bound the two-phase rule
//! puts on a backup's writes in flight: an upload started more than the grace period (plus the
//! clock skew allowed between hosts, since the start time is the store's) ago is dead and is
//! discarded; a younger one, or one whose start the store does not say, is left.

use std::time::Duration;

use crate::error::Result;
use crate::repo::Repo;
use crate::store::UnfinishedUpload;

/// Discards (or, `dry`, only counts) the unfinished uploads older than `grace` plus
/// [`CLOCK_SKEW`](crate::lock::lease::CLOCK_SKEW); returns how many.
pub(super) fn discard_old(repo: &Repo, grace: Duration, dry: bool) -> Result<u64> {
    let old_after = grace + crate::lock::lease::CLOCK_SKEW;
    let mut discarded = 0;
    for upload in repo.backend().unfinished_uploads()? {
        if !dead(&upload, old_after) {
            continue;
        }
        if !dry {
            repo.backend().discard_upload(&upload)?;
        }
        discarded += 1;
    }
    Ok(discarded)
}

/// Whether `upload` was started more than `old_after` ago (one of unknown age never is).
fn dead(upload: &UnfinishedUpload, old_after: Duration) -> bool {
    upload.age().is_some_and(|a| a > old_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn only_uploads_older_than_grace_and_skew_are_dead() {
        let at = |ago: Option<u64>| UnfinishedUpload {
            key: "packs/ab/ab".into(),
            id: "u".into(),
            started: ago.and_then(|s| SystemTime::now().checked_sub(Duration::from_secs(s))),
        };
        let old_after = Duration::from_secs(600) + crate::lock::lease::CLOCK_SKEW;
        assert!(!dead(&at(Some(0)), old_after), "just started");
        assert!(!dead(&at(Some(620)), old_after), "within grace and skew");
        assert!(dead(&at(Some(700)), old_after));
        assert!(!dead(&at(None), old_after), "of unknown age");
    }
}
