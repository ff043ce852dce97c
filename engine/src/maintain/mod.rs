//! Maintenance: what happens to a repository after backups land in it.
//!
//! [`forget`] removes snapshots by a retention policy (it never deletes chunk data),
//! [`prune`](mod@prune) deletes the packs and chunks no snapshot references any more
//! (repacking what is partly used), and [`stats`](mod@stats) says what each snapshot costs.
//! `forget` takes a writer lock and `prune` the maintenance lock (neither with `--dry-run`),
//! so prune never decides what is referenced while snapshots come or go; `stats` only reads.

pub mod condemn;
pub mod forget;
pub mod prune;
pub mod stats;
pub mod two_phase_plan;
mod uploads;

pub use forget::{apply_policy, ForgetReport, RetentionPolicy};
pub use prune::{prune, PruneOptions, PruneReport};
pub use stats::{stats, StatsReport};
