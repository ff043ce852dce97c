//! Trust: proving that snapshots restore, and that the repository is sound.
//!
//! - [`verify_snapshot`] reads back every chunk of a snapshot as a restore would, without
//!   writing anywhere: manifest hash and root digest (on load), then per chunk crc32,
//!   decompression and BLAKE3 id. Its measured time is the user's evidence of restore time.
//! - [`verify_target`] proves that a restored disk equals a snapshot: it reads the target
//!   through the [`DiskSource`](crate::source::DiskSource) trait (raw files now; VHD containers plug in by being
//!   recognised by [`open_target`]), compares the BLAKE3 of the target's bytes with each chunk
//!   id and checks that zero runs read as zeros. It needs only the manifest, not the packs.
//! - [`check`] checks the repository's structure (manifests, index, pack footers and tables),
//!   optionally reads every stored chunk or a subset of packs, lists orphan packs, and maps
//!   every piece of damage to the snapshots and disk byte ranges it affects. It also lists
//!   [`leftovers`] of interrupted or crashed runs (temporary objects, stale locks), which are
//!   not damage and which `prune` removes.
//!
//! Both verify modes leave a [`VerificationRecord`] object under `verifications/` (the
//! authority, read back by `index rebuild`) and cache it in the index. Nothing here modifies
//! packs, manifests or the index's chunk map. Damage is reported in the returned reports,
//! never as a panic or silently; errors that stop a run (I/O, a missing target) are `Err`.

mod check;
mod deltas;
#[cfg(feature = "azure")]
mod pageblob;
mod records;
mod snapshot;
mod target;

pub use check::{
    check, leftovers, AffectedRange, AffectedSnapshot, CheckOptions, CheckReport, Damage,
    DamageKind, Leftover, LeftoverKind, Orphan, ReadData, ReadDataKind, Subset,
    LEFTOVER_MIN_AGE_SECS,
};
pub use deltas::OrphanDelta;
#[cfg(feature = "azure")]
pub use pageblob::{open_page_blob_target, PageBlobTarget, READ_PARALLEL};
pub use snapshot::verify_snapshot;
pub use target::{open_target, verify_target};

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::format::verification::{VerificationRecord, VERIFICATION_VERSION};
use crate::format::ChunkId;
use crate::format::SnapshotId;
use crate::host::{hostname, now_rfc3339};
use crate::index::SnapshotSummary;
use crate::repo::Repo;

/// Ranges listed in a verify report (the first ones by disk offset; all are counted).
pub const MAX_LISTED_RANGES: usize = 10;
/// Damage entries listed in a check report (all are counted).
pub const MAX_LISTED_DAMAGE: usize = 1000;
/// Ranges listed per affected snapshot in a check report (all are counted).
pub const MAX_LISTED_AFFECTED: usize = 100;

/// Options of both verify modes.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Store a verification record (the default). Off for read-only repositories.
    pub record: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { record: true }
    }
}

/// A range of the virtual disk that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeProblem {
    /// Offset in the virtual disk.
    pub offset: u64,
    #[serde(rename = "length")]
    pub len: u64,
    /// The snapshot's chunk at this range; `None` for a zero run.
    pub chunk: Option<String>,
    pub what: String,
}

/// What a verify run compared the snapshot with; serialised as today's `mode` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// The snapshot's chunks in the repository, against its manifest.
    Repository,
    /// A restored disk, against the snapshot.
    Target,
}

impl VerifyMode {
    /// The name used in JSON, verification records and text output.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Repository => "repository",
            VerifyMode::Target => "target",
        }
    }
}

/// How a verify run ended; serialised as today's `outcome` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyOutcome {
    /// Nothing wrong found.
    Ok,
    /// Repository mode found damage.
    Damaged,
    /// Target mode found the target different from the snapshot.
    Differs,
}

impl VerifyOutcome {
    /// The name used in JSON, verification records and text output.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyOutcome::Ok => "ok",
            VerifyOutcome::Damaged => "damaged",
            VerifyOutcome::Differs => "differs",
        }
    }
}

/// The outcome of a verify run (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub snapshot_id: SnapshotId,
    pub disk: String,
    pub mode: VerifyMode,
    pub target: Option<String>,
    /// `damaged` only in repository mode, `differs` only in target mode.
    pub outcome: VerifyOutcome,
    pub ok: bool,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: u64,
    /// Virtual disk bytes checked: chunk bytes plus zero-run bytes.
    #[serde(rename = "checked_bytes")]
    pub bytes_checked: u64,
    pub chunk_bytes: u64,
    pub zero_bytes: u64,
    pub chunks_checked: u64,
    pub root_digest: String,
    pub duration_ms: u64,
    /// Virtual disk bytes checked per second of wall time.
    pub throughput_bytes_per_second: u64,
    /// Damaged or differing ranges found.
    pub problem_count: u64,
    /// The first [`MAX_LISTED_RANGES`] of them by offset.
    pub problems: Vec<RangeProblem>,
    /// Key of the stored verification record.
    pub record: Option<String>,
}

impl VerifyReport {
    /// The run's verdict as a result: `Ok` when nothing was found, else the error of whoever
    /// must act, for the exit code: a target that differs from the snapshot
    /// ([`Error::TargetMismatch`]) or damaged repository data ([`Error::Corrupt`]), at the
    /// first range found. The report lists the ranges.
    pub fn verdict(&self) -> Result<()> {
        let Some(first) = self.problems.first() else {
            return Ok(());
        };
        Err(match self.mode {
            VerifyMode::Target => Error::TargetMismatch {
                target: self.target.clone().unwrap_or_default(),
                snapshot: self.snapshot_id.short().to_string(),
                offset: first.offset,
                what: format!("{} differing ranges (listed above)", self.problem_count),
            },
            VerifyMode::Repository => Error::corrupt(
                format!("the disk of snapshot {}", self.snapshot_id.short()),
                first.offset,
                format!(
                    "verification found {} damaged ranges (listed above)",
                    self.problem_count
                ),
            ),
        })
    }
}

/// Per-segment counters, merged across threads.
#[derive(Default)]
struct Tally {
    chunk_bytes: u64,
    zero_bytes: u64,
    chunks: u64,
    problem_count: u64,
    problems: Vec<RangeProblem>,
}

impl Tally {
    fn problem(&mut self, offset: u64, len: u64, chunk: Option<&ChunkId>, what: String) {
        self.problem_count += 1;
        // Segments are disjoint and walked in order: the first few of each suffice.
        if self.problems.len() < MAX_LISTED_RANGES {
            self.problems.push(RangeProblem {
                offset,
                len,
                chunk: chunk.map(ChunkId::to_hex),
                what,
            });
        }
    }

    fn merge(mut self, other: Tally) -> Tally {
        self.chunk_bytes += other.chunk_bytes;
        self.zero_bytes += other.zero_bytes;
        self.chunks += other.chunks;
        self.problem_count += other.problem_count;
        self.problems.extend(other.problems);
        self.problems.sort_by_key(|p| p.offset);
        self.problems.truncate(MAX_LISTED_RANGES);
        self
    }
}

/// The summary of an interrupted verify: it stops before recording anything.
fn stopped_verify(e: Error) -> Error {
    match e {
        Error::Cancelled(_) => {
            Error::Cancelled("verify stopped before the end; nothing was recorded".into())
        }
        e => e,
    }
}

/// One verify run of either mode: what both modes share from their start to their report.
struct VerifyRun<'r> {
    repo: &'r Repo,
    snapshot: &'r SnapshotSummary,
    options: &'r VerifyOptions,
    manifest: Manifest<'r>,
    started: Instant,
    /// When the run started, as its record says.
    time: String,
}

impl<'r> VerifyRun<'r> {
    /// Starts a run: refuses one that could not store its record, then loads the manifest
    /// (checked whole on load).
    fn start(
        repo: &'r Repo,
        snapshot: &'r SnapshotSummary,
        options: &'r VerifyOptions,
    ) -> Result<Self> {
        require_writable_for_record(repo, options)?;
        let started = Instant::now();
        let time = now_rfc3339();
        let manifest = repo.load_manifest(&snapshot.id)?;
        Ok(VerifyRun {
            repo,
            snapshot,
            options,
            manifest,
            started,
            time,
        })
    }

    /// The report of the run, stored as a verification record when the options say so.
    fn finish(
        self,
        mode: VerifyMode,
        target: Option<String>,
        outcome: VerifyOutcome,
        tally: Tally,
    ) -> Result<VerifyReport> {
        let elapsed = self.started.elapsed();
        let manifest = &self.manifest;
        let mut report = VerifyReport {
            snapshot_id: self.snapshot.id.clone(),
            disk: manifest.meta.disk.clone(),
            mode,
            target,
            outcome,
            ok: outcome == VerifyOutcome::Ok,
            virtual_size: manifest.virtual_size,
            bytes_checked: tally.chunk_bytes + tally.zero_bytes,
            chunk_bytes: tally.chunk_bytes,
            zero_bytes: tally.zero_bytes,
            chunks_checked: tally.chunks,
            root_digest: manifest.meta.root_digest.clone(),
            duration_ms: elapsed.as_millis() as u64,
            throughput_bytes_per_second: crate::progress::bytes_per_second(
                tally.chunk_bytes + tally.zero_bytes,
                elapsed,
            ),
            problem_count: tally.problem_count,
            problems: tally.problems,
            record: None,
        };
        if self.options.record {
            report.record = Some(record_verification(self.repo, &report, self.time)?);
        }
        Ok(report)
    }
}

/// Refuses, before any work, a verify that would store its record in a read-only repository.
fn require_writable_for_record(repo: &Repo, options: &VerifyOptions) -> Result<()> {
    if options.record {
        repo.require_writable("verify (it stores a verification record; pass --no-record)")?;
    }
    Ok(())
}

/// Stores the record of a verify run as an immutable object, then caches it in the index.
fn record_verification(repo: &Repo, report: &VerifyReport, time: String) -> Result<String> {
    let record = VerificationRecord {
        version: VERIFICATION_VERSION,
        snapshot_id: report.snapshot_id.clone(),
        time,
        mode: report.mode.as_str().into(),
        target: report.target.clone(),
        outcome: report.outcome.as_str().into(),
        bytes_checked: report.bytes_checked,
        chunks_checked: report.chunks_checked,
        duration_ms: report.duration_ms,
        // The stored record keeps its MB/s (10^6) of virtual disk bytes (format-spec).
        throughput_mb_s: report.virtual_size as f64
            / (report.duration_ms.max(1) as f64 / 1000.0)
            / 1e6,
        problems: report.problem_count,
        hostname: hostname(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let key = record.key(&crate::format::hex(&r));
    repo.backend()
        .put(&key, &record.seal(repo.protection(), &key)?)?;
    repo.index().add_verification(&key, &record)?;
    Ok(key)
}
