//! Deterministic crash points: a test hook.
//!
//! The crash-safety tests kill a real backup at chosen steps of its write path. Setting
//! `STACKVAULT_CRASH_AT=<point>[:<n>]` in a process's environment makes it SIGKILL itself
//! the `n`-th time (default 1) it reaches the named point, as a power cut or an OOM kill
//! would: no destructors, no flushes. The variable is read once; an unset variable costs one
//! atomic load per point. The points, in the order a backup reaches them:
//!
//! - `chunk`: a segment is about to be read and chunked.
//! - `pack-write`: half of a pack has been written to its temporary file.
//! - `pack-stored`: a pack is durable, its chunks are not yet indexed.
//! - `pack-indexed`: a pack's index transaction has committed.
//! - `before-manifest`: every pack is indexed, the manifest is not yet written.
//! - `manifest-write`: the manifest's temporary file is written, not yet fsynced or renamed.
//! - `manifest-stored`: the manifest is durable, the snapshot is not yet catalogued.
//! - `vm-disks-stored`: every disk snapshot of a VM backup is stored, its VM snapshot record
//!   not yet (see `format-spec/vm.md`).
//!
//! Retention reaches these (see `format-spec/retention.md`):
//!
//! - `forget-row-removed`: a forgotten snapshot's catalogue row is gone, its manifest not yet.
//! - `prune-pack-stored`: a replacement pack is durable, not yet indexed.
//! - `prune-pack-indexed`: a replacement pack is indexed (its chunks' rows point at it).
//! - `prune-index-updated`: the old packs' rows are gone from the index, their files not yet.
//! - `prune-pack-deleted`: one old pack file has been deleted.
//!
//! A malformed value is reported on stderr and ignored. This module must never be used for
//! anything but tests: without the `testing` feature `point` is an empty inline function,
//! so release builds neither read the variable nor can be made to kill themselves by it.
//! The integration suite builds the CLI with its `testing` feature, which turns this on.

#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "testing")]
use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const CRASH_ENV: &str = "STACKVAULT_CRASH_AT";

/// Every crash point: a backup's in the order it reaches them, then retention's.
pub const CRASH_POINTS: &[&str] = &[
    "chunk",
    "pack-write",
    "pack-stored",
    "pack-indexed",
    "before-manifest",
    "manifest-write",
    "manifest-stored",
    "vm-disks-stored",
    "forget-row-removed",
    "prune-pack-stored",
    "prune-pack-indexed",
    "prune-index-updated",
    "prune-pack-deleted",
];

#[cfg(feature = "testing")]
static ARMED: OnceLock<Option<(&'static str, u64)>> = OnceLock::new();
#[cfg(feature = "testing")]
static HITS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "testing")]
fn armed() -> Option<(&'static str, u64)> {
    *ARMED.get_or_init(|| {
        let value = std::env::var(CRASH_ENV).ok()?;
        let (name, n) = match value.split_once(':') {
            Some((name, n)) => (name, n.parse::<u64>().ok().filter(|n| *n > 0)),
            None => (value.as_str(), Some(1)),
        };
        let point = CRASH_POINTS.iter().find(|p| **p == name);
        match (point, n) {
            (Some(p), Some(n)) => Some((*p, n)),
            _ => {
                eprintln!(
                    "warning: ignoring {CRASH_ENV}={value:?}: expected one of {} with an optional :N (N >= 1)",
                    CRASH_POINTS.join(", ")
                );
                None
            }
        }
    })
}

/// Marks that the process reached crash point `name`.
#[cfg(feature = "testing")]
pub(crate) fn point(name: &'static str) {
    if let Some((want, n)) = armed() {
        if want == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == n {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            // SIGKILL cannot be caught; should delivery fail, die just as abruptly.
            std::process::abort();
        }
    }
}

/// Without the `testing` feature a crash point is nothing at all.
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub(crate) fn point(_name: &'static str) {}

#[cfg(test)]
mod tests {
    /// Built without `testing` (as `cargo test -p stackvault-engine` and release builds
    /// are), an armed crash point does nothing; with the hook compiled in, this very test
    /// process would SIGKILL itself here.
    #[cfg(not(feature = "testing"))]
    #[test]
    fn crash_points_are_inert_without_the_testing_feature() {
        std::env::set_var(super::CRASH_ENV, "chunk");
        for name in super::CRASH_POINTS {
            super::point(name);
        }
        std::env::remove_var(super::CRASH_ENV);
    }
}
