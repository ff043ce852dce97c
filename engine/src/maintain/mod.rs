//! Maintenance: what happens to a repository after backups land in it.
//!
//! [`forget`] removes snapshots by a retention policy (it never deletes chunk data),
//! [`prune`] deletes the packs and chunks no snapshot references any more (repacking what is
//! partly used), and [`stats`] says what each snapshot costs. All three run under the
//! repository's maintenance lock when they write; `stats` only reads.

pub mod forget;
pub mod prune;
pub mod stats;

pub use forget::{apply_policy, ForgetReport, RetentionPolicy};
pub use prune::{prune, PruneOptions, PruneReport};
pub use stats::{stats, StatsReport};
