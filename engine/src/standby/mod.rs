//! Standby disks: keep a disk in the recovery site (a file, a block device, a page blob) equal
//! to the latest snapshot of a disk, writing only what changed since the snapshot it holds.
//!
//! The first sync is a full restore (sparse, footer last). Every later sync compares the held
//! snapshot's manifest with the new one ([`changes`]) and writes only the ranges that differ:
//! data with pwrite or Put Page, ranges that became zero as punched holes, device zeroing or
//! Clear Pages; a disk that grew or shrank is resized first. No chunk outside the changed
//! ranges is read.
//!
//! Invariants:
//! - The target's record ([`record`], `format-spec/standby.md`) says which snapshot it holds
//!   and whether it is clean. It says `applying` (listing every snapshot whose data may be on
//!   the target) before the first byte is written, and `clean` only after the data is durable,
//!   so an interrupted sync is seen by every reader and completed by the next sync, which
//!   writes the union of the changes from every listed snapshot.
//! - A target holding another disk, another repository's snapshot, a snapshot this repository
//!   no longer has, or found changed behind our back by `--verify` is refused unless `--full`;
//!   so is an existing target without a record.
//! - Two syncs of one target never run at once: file and device targets hold an OS lock beside
//!   their record; a page blob sync holds the blob's lease, renewed while it runs, and
//!   updates its record only with `If-Match` on its ETag; a lease left by a sync that died
//!   on this host is broken by the next sync, any other is waited out.
//! - The pause hook point is `standby-segment` (before each segment of an incremental sync).

pub mod changes;
pub mod check;
pub mod coalesce;
pub mod local;
#[cfg(feature = "azure")]
pub mod pageblob;
pub mod record;
#[cfg(feature = "azure")]
pub mod regions;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::azure::{self, BlobOptions};
use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::format::SnapshotId;
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::read::FrameCache;
use crate::repo::Repo;
use crate::restore::OutputFormat;
use record::{Record, State, MAX_APPLYING, RECORD_VERSION};

/// Options of `standby sync`.
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Rewrite the whole target whatever it holds.
    pub full: bool,
    /// File targets: `raw` or `vhd-fixed`; default from the record, else the name (`.vhd`).
    pub format: Option<OutputFormat>,
    /// After the sync, compare this share (0 < s <= 1) of the target's segments with the
    /// snapshot's chunk ids.
    pub verify_share: Option<f64>,
    /// Page blobs: keep this many blob snapshots, one taken after each clean sync.
    pub keep_blob_snapshots: u32,
    /// Device targets: directory of device records; default [`record::default_state_dir`].
    pub state_dir: Option<PathBuf>,
    /// Page blobs: how to reach the blob.
    pub blob: BlobOptions,
    /// Page blobs: coalescing gap, `None` for the writer's default.
    pub coalesce_gap: Option<u64>,
    /// Page blobs: requests in flight, 0 for the writer's default.
    pub parallel: usize,
    /// Page blobs: directory of the full restore's resume journal.
    pub journal_dir: Option<PathBuf>,
}

crate::stored_name_enum! {
    /// What kind of standby target a report is about (the name of a [`TargetKind`]).
    pub enum TargetKindName {
        File => "file",
        Device => "device",
        PageBlob => "page-blob",
    }
}

crate::name_enum! {
    /// Whether a sync wrote the whole disk or the snapshots' differences.
    pub enum SyncMode {
        Full => "full",
        Incremental => "incremental",
    }
}

crate::stored_name_enum! {
    /// A target's state as a report gives it: its record's [`State`], or what stands in
    /// for a record.
    pub enum ReportState {
        /// No record.
        None => "none",
        Clean => "clean",
        Applying => "applying",
        Diverged => "diverged",
        /// A record of another file or device.
        Unknown => "unknown",
    }
}

/// What one sync did (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct SyncReport {
    /// The target as it may be shown (URL without query).
    pub target: String,
    pub target_kind: TargetKindName,
    /// `raw` or `vhd-fixed`.
    pub target_format: String,
    pub disk: String,
    /// The snapshot the target now holds.
    pub snapshot_id: SnapshotId,
    /// The snapshot it held before (clean or not), if any.
    pub previous_snapshot_id: Option<SnapshotId>,
    /// Snapshots an interrupted sync had been applying, completed by this one.
    pub completed_interrupted: Vec<SnapshotId>,
    pub mode: SyncMode,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: u64,
    /// The target was resized first (the disk grew or shrank).
    pub resized: bool,
    /// Bytes of data written (the changed ranges that hold data in the snapshot).
    pub written_bytes: u64,
    pub written_ranges: u64,
    /// Bytes made zero (holes punched, device ranges zeroed, pages cleared).
    pub zeroed_bytes: u64,
    pub zeroed_ranges: u64,
    /// Requests sent to the target: writes and zeroings (pwrite/fallocate, Put Page/clears).
    pub requests: u64,
    /// Page blobs: bytes sent with Put Page (data rounded out to pages, coalesced zeros,
    /// footer).
    pub uploaded_bytes: Option<u64>,
    /// Page blobs: unchanged bytes between nearby changed ranges, rewritten (with the new
    /// snapshot's bytes, equal to the target's) so that the changes go out in fewer requests;
    /// part of `uploaded_bytes`, not of `written_bytes` (see [`coalesce`]).
    pub gap_bytes: u64,
    /// Page blob incremental syncs: the coalescing gap used, chosen so that `gap_bytes` plus
    /// the page rounding stay within 10 % of the changed bytes unless `--coalesce-gap` gave
    /// it (see [`regions`]).
    pub coalesce_gap_bytes: Option<u64>,
    /// Page blob incremental syncs: the most bytes of regions handed to the page writer and
    /// not yet sent at any time (bounded by the writer's budget, whatever the disk's size).
    pub peak_bytes_in_flight: Option<u64>,
    /// Page blob incremental syncs: of `requests`, the Put Page `clear` requests (zero runs).
    pub clear_requests: Option<u64>,
    pub duration_ms: u64,
    /// `clean`, or `diverged` when `--verify` found a difference.
    pub state: ReportState,
    /// Page blobs: the blob snapshot taken after this sync.
    pub blob_snapshot: Option<String>,
    pub blob_snapshots_deleted: u64,
    pub verify: Option<check::VerifySummary>,
    pub notes: Vec<String>,
}

/// What `standby status` says about a target.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub target: String,
    pub target_kind: TargetKindName,
    /// Where the record is: the state file, the device record, or `blob metadata`.
    pub record_location: String,
    /// `none` (no record), `clean`, `applying`, `diverged`, or `unknown` (a record of another
    /// file or device).
    pub state: ReportState,
    pub disk: Option<String>,
    pub snapshot_id: Option<SnapshotId>,
    pub applying: Vec<SnapshotId>,
    pub since: Option<String>,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: Option<u64>,
    pub target_format: Option<String>,
    /// A sync of this target is running now (its process is alive on this host).
    pub sync_running: bool,
    /// Page blobs: the blob's lease and who holds it; `None` for files and devices.
    pub lease: Option<LeaseReport>,
    pub record: Option<Record>,
    pub notes: Vec<String>,
}

/// A page blob's lease as Get Blob Properties reports it, and whose it is as far as the
/// standby record tells (a sync takes the lease before it records `applying` and releases it
/// after `clean`, so only an `applying` record names the lease's holder).
#[derive(Clone, Debug, Serialize)]
pub struct LeaseReport {
    /// `available`, `leased`, `expired`, `breaking` or `broken` (`x-ms-lease-state`).
    pub state: Option<String>,
    /// `locked` or `unlocked` (`x-ms-lease-status`).
    pub status: Option<String>,
    /// `fixed` or `infinite` while leased (`x-ms-lease-duration`).
    pub duration: Option<String>,
    /// Who holds an active lease: `running-sync` (a sync running on this host),
    /// `dead-sync` (the record names a sync on this host whose process is gone), `remote-sync`
    /// (the record names a sync on another host: whether it still runs cannot be told from
    /// here), `other` (the record is not `applying`: not a sync of ours); `None` when no
    /// lease is active.
    pub holder: Option<String>,
    /// Host and process of the sync the record names, when `holder` is a sync.
    pub host: Option<String>,
    pub pid: Option<u32>,
}

/// Counters of a sync.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub written_bytes: u64,
    pub written_ranges: u64,
    pub zeroed_bytes: u64,
    pub zeroed_ranges: u64,
    pub requests: u64,
    /// Unchanged bytes rewritten to merge nearby changes (page blobs).
    pub gap_bytes: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, b: Counts) -> Counts {
        Counts {
            written_bytes: self.written_bytes + b.written_bytes,
            written_ranges: self.written_ranges + b.written_ranges,
            zeroed_bytes: self.zeroed_bytes + b.zeroed_bytes,
            zeroed_ranges: self.zeroed_ranges + b.zeroed_ranges,
            requests: self.requests + b.requests,
            gap_bytes: self.gap_bytes + b.gap_bytes,
        }
    }
}

/// Where a target is.
pub enum TargetKind {
    File(PathBuf),
    Device { path: PathBuf, block: bool },
    Blob(String),
}

impl TargetKind {
    pub fn of(target: &str) -> TargetKind {
        use std::os::unix::fs::FileTypeExt;
        if azure::is_blob_url(target) {
            return TargetKind::Blob(target.to_string());
        }
        let path = PathBuf::from(target);
        match std::fs::metadata(&path).map(|m| m.file_type()) {
            Ok(t) if t.is_block_device() => TargetKind::Device { path, block: true },
            Ok(t) if t.is_char_device() => TargetKind::Device { path, block: false },
            _ => TargetKind::File(path),
        }
    }
}

/// Brings `target` to hold `snapshot` (see the module documentation).
pub fn sync(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    target: &str,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    if let Some(s) = options.verify_share {
        if !(s > 0.0 && s <= 1.0) {
            return Err(Error::Usage(format!(
                "--verify {}%: give a share above 0% and at most 100%",
                s * 100.0
            )));
        }
    }
    match TargetKind::of(target) {
        #[cfg(feature = "azure")]
        TargetKind::Blob(url) => pageblob::sync(repo, snapshot, &url, options, progress),
        #[cfg(not(feature = "azure"))]
        TargetKind::Blob(_) => Err(crate::features::Feature::Azure.missing()),
        TargetKind::File(path) => local::sync(repo, snapshot, &path, None, options, progress),
        TargetKind::Device { path, block } => {
            local::sync(repo, snapshot, &path, Some(block), options, progress)
        }
    }
}

/// Reads the record of `target` (see [`StatusReport`]).
pub fn status(target: &str, options: &SyncOptions) -> Result<StatusReport> {
    match TargetKind::of(target) {
        #[cfg(feature = "azure")]
        TargetKind::Blob(url) => pageblob::status(&url, options),
        #[cfg(not(feature = "azure"))]
        TargetKind::Blob(_) => Err(crate::features::Feature::Azure.missing()),
        TargetKind::File(path) => local::status(&path, None, options),
        TargetKind::Device { path, .. } => local::status(&path, Some(()), options),
    }
}

/// How a sync proceeds.
pub(crate) enum Plan<'r> {
    Full,
    Incremental {
        /// Manifests of the held snapshot and of every snapshot being applied.
        olds: Vec<Manifest<'r>>,
    },
}

/// Decides full or incremental from the target's record, refusing targets that hold
/// something else unless `--full`.
pub(crate) fn decide<'r>(
    repo: &'r Repo,
    record: Option<&Record>,
    snapshot: &SnapshotSummary,
    full: bool,
    target_exists: bool,
    shown: &str,
) -> Result<Plan<'r>> {
    let mismatch = |what: String| Error::TargetMismatch {
        target: shown.to_string(),
        snapshot: snapshot.id.to_string(),
        offset: 0,
        what: format!("{what}; nothing was written: pass --full to overwrite it"),
    };
    let Some(r) = record else {
        if target_exists && !full {
            return Err(mismatch(
                "it exists and holds no standby record (not written by `standby sync`)".into(),
            ));
        }
        return Ok(Plan::Full);
    };
    if full {
        return Ok(Plan::Full);
    }
    let repo_id = hex(&repo.config().repository_id);
    if r.repository_id != repo_id {
        return Err(mismatch(format!(
            "it holds a snapshot of another repository ({})",
            r.repository_id
        )));
    }
    if r.disk != snapshot.meta.disk {
        return Err(mismatch(format!(
            "it holds disk {:?}, and snapshot {} is of disk {:?}",
            r.disk,
            snapshot.id.short(),
            snapshot.meta.disk
        )));
    }
    if r.state == State::Diverged {
        return Err(mismatch(format!(
            "--verify found it changed behind stackvault's back (since {})",
            r.since
        )));
    }
    let Some(held) = &r.snapshot_id else {
        // A first sync was interrupted: there is nothing to build on.
        return Ok(Plan::Full);
    };
    if r.applying.len() > MAX_APPLYING {
        return Err(mismatch(format!(
            "{} interrupted syncs in a row left it holding parts of {} snapshots",
            r.applying.len(),
            r.applying.len() + 1
        )));
    }
    let mut olds = Vec::new();
    for id in std::iter::once(held).chain(r.applying.iter()) {
        match repo.resolve_snapshot(id, None) {
            Ok(s) if &s.id == id => olds.push(repo.load_manifest(id)?),
            Ok(_) | Err(Error::SnapshotNotFound { .. }) | Err(Error::Usage(_)) => {
                return Err(mismatch(format!(
                    "it holds (data of) snapshot {id}, which this repository does not have \
                     (forgotten?)"
                )))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Plan::Incremental { olds })
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record a sync writes before touching the target: the old record's held snapshot (for
/// an incremental sync) and every snapshot being applied, this one last.
pub(crate) fn applying_record(
    repo: &Repo,
    old: Option<&Record>,
    incremental: bool,
    snapshot: &SnapshotSummary,
    target_format: &str,
    identity: &str,
) -> Record {
    let (held, mut applying) = match old.filter(|_| incremental) {
        Some(r) => (r.snapshot_id.clone(), r.applying.clone()),
        None => (None, Vec::new()),
    };
    applying.retain(|a| a != &snapshot.id && Some(a) != held.as_ref());
    applying.push(snapshot.id.clone());
    Record {
        version: RECORD_VERSION,
        repository_id: hex(&repo.config().repository_id),
        disk: snapshot.meta.disk.clone(),
        snapshot_id: held,
        state: State::Applying,
        applying,
        since: crate::host::now_rfc3339(),
        target_format: target_format.to_string(),
        virtual_size: snapshot.virtual_size,
        host: crate::host::hostname(),
        pid: std::process::id(),
        identity: identity.to_string(),
        device_size: None,
        signature: None,
    }
}

/// The record after a finished sync: `clean` (or `diverged`) holding `snapshot`.
pub(crate) fn finished_record(
    applying: &Record,
    snapshot: &SnapshotSummary,
    state: State,
) -> Record {
    Record {
        snapshot_id: Some(snapshot.id.clone()),
        state,
        applying: Vec::new(),
        since: crate::host::now_rfc3339(),
        ..applying.clone()
    }
}

/// Runs `apply` on every segment of `new` that differs from any of `olds`, in parallel, with
/// the segment's extents, offset and changed ranges; sums what it returns.
pub(crate) fn for_changed_segments<F>(
    new: &Manifest<'_>,
    olds: &[Manifest<'_>],
    progress: &dyn Progress,
    apply: F,
) -> Result<Counts>
where
    F: Fn(&mut FrameCache, &[Extent], u64, &[(u64, u64)]) -> Result<Counts> + Sync,
{
    let seg = u64::from(new.segment_size);
    progress.start("standby", new.virtual_size);
    let counts = (0..new.segment_count())
        .into_par_iter()
        .map_init(FrameCache::default, |frames, i| {
            crate::progress::checkpoint(progress, "standby-segment")?;
            let base = i * seg;
            let extents = new.segment(i)?;
            let ranges = changes::changed_in_segment(olds, new, i, &extents)?;
            let c = if ranges.is_empty() {
                Counts::default()
            } else {
                apply(frames, &extents, base, &ranges)?
            };
            progress.advance(seg.min(new.virtual_size.saturating_sub(base)));
            Ok(c)
        })
        .try_reduce(Counts::default, |a, b| Ok(a + b))?;
    progress.finish();
    Ok(counts)
}

/// Bytes and runs of data and of zeros in `ranges` of a segment (no data is read).
pub(crate) fn tally(extents: &[Extent], base: u64, ranges: &[(u64, u64)]) -> Counts {
    let mut c = Counts::default();
    for &(start, end) in ranges {
        let mut pos = base;
        // Kind of the previous part and where it ended: adjacent parts of a kind are one run.
        let mut last: Option<(bool, u64)> = None;
        for e in extents {
            let e_end = pos + u64::from(e.len());
            let (s, t) = (pos.max(start), e_end.min(end));
            if s < t {
                let data = matches!(e, Extent::Chunk { .. });
                let continues = last == Some((data, s));
                if data {
                    c.written_bytes += t - s;
                    c.written_ranges += u64::from(!continues);
                } else {
                    c.zeroed_bytes += t - s;
                    c.zeroed_ranges += u64::from(!continues);
                }
                last = Some((data, t));
            }
            pos = e_end;
        }
    }
    c
}

/// What every sync report says about the target and the sync, whatever the target.
pub(crate) struct ReportBase<'a> {
    /// The target as it may be shown.
    pub shown: &'a str,
    /// `file`, `device` or `page-blob`.
    pub kind: &'a str,
    /// `raw` or `vhd-fixed`.
    pub format: &'a str,
    pub snapshot: &'a SnapshotSummary,
    /// The record the target had before the sync.
    pub old: Option<&'a Record>,
    pub full: bool,
    pub resized: bool,
}

/// A report's common part.
pub(crate) fn report(base: &ReportBase<'_>, counts: Counts, started: Instant) -> SyncReport {
    let ReportBase {
        shown,
        kind,
        format,
        snapshot,
        old,
        full,
        resized,
    } = *base;
    SyncReport {
        target: shown.to_string(),
        target_kind: kind.into(),
        target_format: format.into(),
        disk: snapshot.meta.disk.clone(),
        snapshot_id: snapshot.id.clone(),
        previous_snapshot_id: old.and_then(|r| r.snapshot_id.clone()),
        completed_interrupted: old
            .filter(|r| r.state == State::Applying)
            .map(|r| r.applying.clone())
            .unwrap_or_default(),
        mode: if full {
            SyncMode::Full
        } else {
            SyncMode::Incremental
        },
        virtual_size: snapshot.virtual_size,
        resized,
        written_bytes: counts.written_bytes,
        written_ranges: counts.written_ranges,
        zeroed_bytes: counts.zeroed_bytes,
        zeroed_ranges: counts.zeroed_ranges,
        requests: counts.requests,
        uploaded_bytes: None,
        gap_bytes: counts.gap_bytes,
        coalesce_gap_bytes: None,
        peak_bytes_in_flight: None,
        clear_requests: None,
        duration_ms: started.elapsed().as_millis() as u64,
        state: ReportState::Clean,
        blob_snapshot: None,
        blob_snapshots_deleted: 0,
        verify: None,
        notes: Vec::new(),
    }
}

/// The status report of a record (or of none).
pub(crate) fn status_report(
    shown: &str,
    kind: &str,
    location: &Path,
    record: Option<Record>,
    notes: Vec<String>,
) -> StatusReport {
    let running = record.as_ref().is_some_and(|r| {
        r.state == State::Applying
            && r.host == crate::host::hostname()
            && record::other_process_alive(r.pid)
    });
    StatusReport {
        target: shown.to_string(),
        target_kind: kind.into(),
        record_location: location.display().to_string(),
        state: record.as_ref().map_or("none", |r| r.state.as_str()).into(),
        disk: record.as_ref().map(|r| r.disk.clone()),
        snapshot_id: record.as_ref().and_then(|r| r.snapshot_id.clone()),
        applying: record
            .as_ref()
            .map(|r| r.applying.clone())
            .unwrap_or_default(),
        since: record.as_ref().map(|r| r.since.clone()),
        virtual_size: record.as_ref().map(|r| r.virtual_size),
        target_format: record.as_ref().map(|r| r.target_format.clone()),
        sync_running: running,
        lease: None,
        record,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkId;

    #[test]
    fn tally_counts_runs_and_bytes() {
        let x = ChunkId::of(b"x");
        let extents = [
            Extent::Chunk { id: x, len: 100 },
            Extent::Chunk { id: x, len: 100 },
            Extent::Zero { len: 100 },
            Extent::Chunk { id: x, len: 100 },
        ];
        let c = tally(&extents, 1000, &[(1050, 1250), (1350, 1400)]);
        assert_eq!(
            (
                c.written_bytes,
                c.written_ranges,
                c.zeroed_bytes,
                c.zeroed_ranges
            ),
            (200, 2, 50, 1)
        );
    }
}
