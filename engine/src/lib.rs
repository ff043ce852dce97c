//! stackvault: incremental block-level backup of virtual-machine disks.
//!
//! Data flows one way. A [`DiskSource`] presents the guest disk's address space (raw image
//! or block device; VHD containers and page blobs plug in behind the same trait). The backup
//! pipeline ([`backup()`]) cuts it into aligned segments, drops zero runs, cuts the rest into
//! content-defined chunks ([`chunker`]), names each chunk by its BLAKE3 hash, and stores only
//! chunks the repository lacks, zstd-compressed, in packs ([`store`]). The SQLite [`index`]
//! maps chunk ids to pack locations; it is derived state that can be rebuilt. Last, the
//! snapshot manifest, a complete map of the disk with a root digest, is written. Restore
//! ([`restore`]) walks a manifest, verifies every chunk and writes it at its offset.
//! Retention runs the other way: [`forget`] removes snapshots by policy, [`prune`] deletes
//! the data no snapshot references any more, and [`stats`] says what each snapshot costs.
//! [`copy()`] moves snapshots between repositories, sending only the chunks the destination
//! lacks.
//!
//! Module dependencies point one way: `backup`/`restore` → `repo` → `store`, `index` →
//! `format` → `error`; `source` and `chunker` know nothing of repositories.

pub mod azure;
pub mod backup;
pub mod changes;
pub mod chunker;
pub mod copy;
pub mod crash;
pub mod diff;
pub mod error;
pub mod format;
pub mod index;
pub mod lock;
pub mod maintain;
pub mod nbd;
pub mod progress;
pub mod read;
pub mod repo;
pub mod restore;
pub mod source;
pub mod standby;
pub mod store;
pub mod verify;

pub use backup::{backup, BackupMode, BackupOptions, BackupReport};
pub use changes::ChangeList;
pub use copy::{copy, init_like, CopyOptions, CopyReport};
pub use error::{Error, ErrorClass, Result};
pub use format::config::{ChunkerParams, RepoConfig};
pub use format::manifest::{Manifest, SnapshotKind, SnapshotMeta};
pub use format::ChunkId;
pub use index::SnapshotSummary;
pub use maintain::{apply_policy, ForgetReport, RetentionPolicy};
pub use maintain::{prune, PruneOptions, PruneReport};
pub use maintain::{stats, StatsReport};
pub use progress::{Cancel, NoProgress, Progress};
pub use read::{ReaderOptions, SnapshotReader};
pub use repo::{InitOptions, Repo};
pub use restore::pageblob::{restore_to_page_blob, PageBlobRestoreOptions, PageBlobRestoreReport};
pub use restore::{restore_to_file, OutputFormat, RestoreOptions, RestoreReport};
pub use source::{open_source, DiskSource, SourceFormat, SourceOptions};
// The modules' former paths, so that code written against them keeps compiling.
#[doc(hidden)]
pub use maintain::forget;
#[doc(hidden)]
pub use restore::pageblob as restore_pageblob;

pub use verify::{check, verify_snapshot, verify_target, CheckOptions, CheckReport, VerifyReport};
