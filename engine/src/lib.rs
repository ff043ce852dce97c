//! stackvault: incremental block-level backup of virtual-machine disks.
//!
//! Data flows one way, and the module tree follows it. A [`DiskSource`] ([`source`]) presents
//! the guest disk's address space: raw images and block devices, VHD chains, page blobs over
//! the Blob REST transport ([`azure`]), with change knowledge ([`changes`]) when it has some.
//! The backup pipeline ([`backup()`], module [`backup`](mod@backup)) cuts the disk into aligned
//! segments, drops zero runs, cuts the rest into content-defined chunks ([`chunker`]), names
//! each chunk by its BLAKE3 hash, keeps only chunks the repository lacks (`backup::dedup`),
//! compresses them in frames (`backup::frames`) and stores them in packs through the
//! [`Backend`](store::Backend) seam ([`store`]). The SQLite [`index`] maps chunk ids to pack
//! locations; it is derived state that can be rebuilt. Last, the snapshot manifest, a complete
//! map of the disk with a root digest, is written. Every byte stackvault stores is encoded
//! in [`format`](mod@format), which does no I/O. A [`Repo`] ties config, backend, index and
//! [`lock`]s together.
//!
//! Restore ([`restore`]) walks a manifest, verifies every chunk and writes it at its offset
//! into a [`DiskTarget`](restore::DiskTarget): a file, a block device, a VHD, a page blob.
//! [`verify`] proves that snapshots restore and restored disks match, and checks the whole
//! repository. Retention runs the other way ([`maintain`]): [`forget`] removes snapshots by
//! policy, [`prune()`] deletes the data no snapshot references any more, and [`stats()`] says
//! what each snapshot costs. [`diff`] compares two snapshots. Long operations report through
//! [`Progress`] and stop at safe points when cancelled.
//!
//! Module dependencies point one way: `backup`/`restore`/`verify`/`maintain` → `repo` →
//! `lock`, `index` → `store` → `format` → `error`; `source` → `azure`, `changes`; `format`,
//! `source`, `azure`, `chunker` and `changes` know nothing of repositories; `host` and
//! `progress` are leaves. `docs/design.md` ("Where things live") has the map and the rule of
//! each seam.
//!
//! The remote backends are cargo features ([`features`]), both on by default: `azure` (the
//! Blob REST transport in [`azure`] beyond its URL and option types, page blob sources and
//! targets, block-blob repositories) and `s3` (S3-compatible repositories). Without them the
//! engine has no HTTP or TLS crate, and reaching such a store or blob is
//! [`Error::Unsupported`] naming the feature to rebuild with.

pub mod azure;
pub mod backup;
pub mod changes;
pub mod chunker;
pub mod copy;
pub mod crash;
pub mod crypto;
pub mod diff;
pub mod error;
pub mod features;
pub mod format;
pub mod host;
#[cfg(any(feature = "azure", feature = "s3"))]
pub mod http_error;
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
pub mod vm;

pub use backup::{backup, BackupMode, BackupOptions, BackupReport};
pub use changes::ChangeList;
pub use copy::{copy, init_like, CopyOptions, CopyReport};
pub use error::{Error, ErrorClass, Result};
pub use format::config::{ChunkerParams, RepoConfig};
pub use format::manifest::{Manifest, SnapshotKind, SnapshotMeta};
pub use format::{ChunkId, DrillId, SnapshotId, VmSnapshotId};
pub use index::SnapshotSummary;
pub use maintain::{apply_policy, ForgetReport, RetentionPolicy};
pub use maintain::{prune, PruneOptions, PruneReport};
pub use maintain::{stats, StatsReport};
pub use progress::{Cancel, NoProgress, Progress};
pub use read::{ReaderOptions, SnapshotReader};
pub use repo::{InitOptions, Repo};
#[cfg(feature = "azure")]
pub use restore::pageblob::{restore_to_page_blob, PageBlobRestoreOptions, PageBlobRestoreReport};
pub use restore::{restore_to_file, OutputFormat, RestoreOptions, RestoreReport};
pub use source::{open_source, DiskSource, SourceFormat, SourceOptions};
pub use verify::{check, verify_snapshot, verify_target, CheckOptions, CheckReport, VerifyReport};
