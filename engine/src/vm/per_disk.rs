//! One restore per disk of a VM snapshot, all at once: each disk on its own thread, the
//! reports in the record's disk order.
//!
//! Invariant: every disk's restore runs to its end (success, error or panic) before the
//! first error is returned, so no thread outlives the call and no target is left half
//! written by a thread nobody waits for. A panicked restore is [`Error::Internal`] naming
//! the disk, never a panic of the caller.

use crate::error::{Error, Result};
use crate::index::SnapshotSummary;

/// Runs `restore_one(disk name, its snapshot)` for every disk of `summaries` in parallel and
/// returns the reports in the same order, or the first disk's error (in that order).
pub(super) fn restore_each_disk<R, F>(
    summaries: &[(String, SnapshotSummary)],
    restore_one: F,
) -> Result<Vec<R>>
where
    R: Send,
    F: Fn(&str, &SnapshotSummary) -> Result<R> + Sync,
{
    let restore_one = &restore_one;
    let results: Vec<Result<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = summaries
            .iter()
            .map(|(name, s)| (name, scope.spawn(move || restore_one(name, s))))
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Internal(format!(
                        "the restore of disk {name} panicked"
                    )))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}
