//! VM snapshots: the disks of one virtual machine backed up together, as a unit.
//!
//! [`backup_vm`] reads every disk of a VM in parallel, each through the ordinary
//! [`backup()`](crate::backup()) into a disk snapshot of the repository disk `<vm>:<disk>`
//! (incremental per disk, as `backup` is), and only after every disk manifest is durable
//! writes one VM snapshot record ([`record`], `vms/<id>`). All or nothing: a failure or a
//! kill before the record is written leaves no VM snapshot; the disk snapshots already stored
//! stay as ordinary disk snapshots (and the next VM backup uses them as parents). The record
//! says which consistency across disks it can honestly claim ([`Consistency`]).
//!
//! Records are listed from the repository's objects on each query (local or remote alike),
//! so nothing about VM snapshots needs rebuilding. Retention treats a VM snapshot as a unit
//! (`maintain::forget`). [`restore_vm`] restores every disk of one, in parallel.

pub mod drill;
mod per_disk;
pub mod plan;
pub mod record;
pub mod run;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backup::{backup, validate_disk_name, BackupMode, BackupOptions, BackupReport};
use crate::changes::ChangeList;
use crate::error::{Error, Result};
use crate::format::{SnapshotId, VmSnapshotId};
use crate::host::{hostname, now_rfc3339};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{restore_to_file, OutputFormat, RestoreOptions, RestoreReport};
use crate::source::DiskSource;

pub use record::{Consistency, VmDisk, VmRecord};

/// Separator between the VM's name and the disk's name in a repository disk name.
pub const DISK_SEPARATOR: char = ':';

/// The repository disk that holds disk `disk` of VM `vm`.
pub fn disk_name(vm: &str, disk: &str) -> String {
    format!("{vm}{DISK_SEPARATOR}{disk}")
}

/// A VM or VM-disk name: a disk name without the separator, so `<vm>:<disk>` splits one way.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    validate_disk_name(name).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what} name {name:?}: use 1 to 128 characters from A-Z a-z 0-9 - _ . @"
        ))
    })?;
    if name.contains(DISK_SEPARATOR) {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?}: ':' separates the VM from the disk; leave it out"
        )));
    }
    Ok(())
}

/// One disk to back up as part of a VM.
pub struct VmDiskSource<'a> {
    /// Name within the VM (`os`, `data1`).
    pub name: String,
    pub source: &'a dyn DiskSource,
    /// Change knowledge for this disk, as `backup --changed-ranges` takes it.
    pub changes: Option<ChangeList>,
}

/// Options of [`backup_vm`].
#[derive(Clone, Debug)]
pub struct VmBackupOptions {
    pub vm: String,
    pub mode: BackupMode,
    /// The caller states that the blob snapshots read were taken together (at one point in
    /// time, for example as one restore point); with every disk read from a blob snapshot,
    /// the VM snapshot is then recorded as crash-consistent.
    pub blob_snapshots_taken_together: bool,
}

/// The outcome of [`backup_vm`] (`backup-vm --json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct VmBackupReport {
    pub vm_snapshot_id: VmSnapshotId,
    pub vm: String,
    pub consistency: Consistency,
    pub read_window_ms: u64,
    pub disks: Vec<BackupReport>,
    pub duration_ms: u64,
}

/// Forwards only cancellation: the disks run at once, so no one of them owns the bars.
struct CancelOnly<'a>(&'a dyn Progress);

impl Progress for CancelOnly<'_> {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// One disk's backup: its report, read start and end (RFC 3339), and the same as
/// milliseconds since the VM backup started.
type DiskOutcome = (BackupReport, String, String, u64, u64);

/// Backs up every disk of a VM in parallel, then writes the VM snapshot record.
pub fn backup_vm(
    repo: &Repo,
    disks: Vec<VmDiskSource<'_>>,
    options: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<VmBackupReport> {
    validate_name("VM", &options.vm)?;
    if disks.is_empty() {
        return Err(Error::Usage(
            "a VM backup needs at least one disk: give DISK=SOURCE".into(),
        ));
    }
    let mut names = BTreeSet::new();
    for d in &disks {
        validate_name("disk", &d.name)?;
        if !names.insert(d.name.as_str()) {
            return Err(Error::Usage(format!(
                "disk {} of VM {} is given twice",
                d.name, options.vm
            )));
        }
    }
    // Held until the record is stored: prune waits, so no data a disk snapshot of this VM
    // needs can be deleted before the record exists (format-spec/vm.md, "Write order").
    let lock = repo.lock("backup")?;
    let started = Instant::now();
    let time = now_rfc3339();
    let quiet = CancelOnly(progress);
    let results: Vec<(String, Result<DiskOutcome>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = disks
            .into_iter()
            .map(|d| {
                let quiet = &quiet;
                let opts = BackupOptions {
                    disk: disk_name(&options.vm, &d.name),
                    mode: options.mode,
                    parent: None,
                    changes: d.changes,
                    fallback_full: false,
                };
                let name = d.name;
                let source = d.source;
                let handle = scope.spawn(move || {
                    let begin = now_rfc3339();
                    let begin_ms = millis(started);
                    let report = backup(repo, source, &opts, quiet)?;
                    Ok((report, begin, now_rfc3339(), begin_ms, millis(started)))
                });
                (name, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::Internal(format!("backup of disk {name} panicked")))
                });
                (name, r)
            })
            .collect()
    });
    let mut done = Vec::with_capacity(results.len());
    let mut first_error = None;
    for (name, r) in results {
        match r {
            Ok(v) => done.push((name, v)),
            Err(e) if first_error.is_none() => first_error = Some((name, e)),
            Err(_) => {}
        }
    }
    if let Some((name, e)) = first_error {
        let kept: Vec<String> = done
            .iter()
            .map(|(n, (r, ..))| format!("{n} {}", r.snapshot_id.short()))
            .collect();
        crate::progress::notice(&format!(
            "VM {}: no VM snapshot written; disk {name} failed; {}",
            options.vm,
            if kept.is_empty() {
                "no disk snapshot was stored".to_string()
            } else {
                format!("these stay as ordinary disk snapshots: {}", kept.join(", "))
            }
        ));
        return Err(e);
    }
    done.sort_by(|a, b| a.0.cmp(&b.0));
    crate::crash::point("vm-disks-stored");
    let mut window_start = u64::MAX;
    let mut window_end = 0;
    let mut all_blob_snapshots = true;
    let mut vm_disks = Vec::with_capacity(done.len());
    let mut reports = Vec::with_capacity(done.len());
    for (name, (report, begin, end, begin_ms, end_ms)) in done {
        window_start = window_start.min(begin_ms);
        window_end = window_end.max(end_ms);
        let manifest = repo.load_manifest(&report.snapshot_id)?;
        let blob_snapshot = manifest
            .meta
            .source
            .blob
            .as_ref()
            .and_then(|b| b.snapshot.clone());
        all_blob_snapshots &= blob_snapshot.is_some();
        vm_disks.push(VmDisk {
            name,
            disk: report.disk.clone(),
            snapshot_id: report.snapshot_id.clone(),
            root_digest: report.root_digest.clone(),
            virtual_size: report.virtual_size,
            source: report.source.clone(),
            blob_snapshot,
            read_started: begin,
            read_finished: end,
        });
        reports.push(report);
    }
    if options.blob_snapshots_taken_together && !all_blob_snapshots {
        crate::progress::notice(
            "not every disk was read from a blob snapshot: the VM snapshot is recorded as \
             per-disk consistent",
        );
    }
    let consistency = if options.blob_snapshots_taken_together && all_blob_snapshots {
        Consistency::CrashConsistent
    } else {
        Consistency::PerDisk
    };
    let read_window_ms = window_end.saturating_sub(window_start);
    let rec = VmRecord {
        format_version: record::VM_RECORD_VERSION,
        vm: options.vm.clone(),
        time,
        finished: now_rfc3339(),
        hostname: hostname(),
        consistency,
        read_window_ms,
        disks: vm_disks,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (bytes, id) = record::encode(&rec, repo.protection())?;
    repo.backend().put(&record::key(&id), &bytes)?;
    drop(lock);
    Ok(VmBackupReport {
        vm_snapshot_id: id,
        vm: options.vm.clone(),
        consistency,
        read_window_ms,
        disks: reports,
        duration_ms: millis(started),
    })
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A VM snapshot as listed: its record, and whether every disk snapshot it names still exists.
#[derive(Clone, Debug, Serialize)]
pub struct VmSnapshot {
    pub id: VmSnapshotId,
    #[serde(flatten)]
    pub record: VmRecord,
    /// False when a disk snapshot it names was forgotten with `--force`.
    pub complete: bool,
}

/// The VM snapshots of the repository (of `vm`, or all), oldest first.
pub fn vm_snapshots(repo: &Repo, vm: Option<&str>) -> Result<Vec<VmSnapshot>> {
    let present: BTreeSet<SnapshotId> = repo.snapshots(None)?.into_iter().map(|s| s.id).collect();
    let mut out = Vec::new();
    for key in repo.backend().list(record::VMS_PREFIX)? {
        let Some(id) = record::id_of_key(&key) else {
            continue;
        };
        let bytes = match repo.backend().get(&key) {
            Ok(b) => b,
            // Forgotten between listing and reading.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let rec = record::decode(&id, &bytes, repo.protection())?;
        if vm.is_some_and(|v| v != rec.vm) {
            continue;
        }
        let complete = rec.disks.iter().all(|d| present.contains(&d.snapshot_id));
        out.push(VmSnapshot {
            id,
            record: rec,
            complete,
        });
    }
    out.sort_by(|a, b| {
        (a.record.vm.as_str(), a.record.time.as_str(), a.id.as_str()).cmp(&(
            b.record.vm.as_str(),
            b.record.time.as_str(),
            b.id.as_str(),
        ))
    });
    Ok(out)
}

/// Finds a VM snapshot of `vm` by id, unique id prefix, or `latest` (the newest complete one).
pub fn resolve_vm_snapshot(repo: &Repo, vm: &str, query: &str) -> Result<VmSnapshot> {
    let all = vm_snapshots(repo, Some(vm))?;
    let found: Vec<VmSnapshot> = if query == "latest" {
        all.into_iter()
            .filter(|s| s.complete)
            .max_by(|a, b| a.record.time.cmp(&b.record.time))
            .into_iter()
            .collect()
    } else {
        all.into_iter()
            .filter(|s| s.id.starts_with(query))
            .collect()
    };
    match <[VmSnapshot; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) if found.is_empty() => Err(Error::SnapshotNotFound {
            query: format!(
                "{query} among the VM snapshots of {vm} (vm-snapshots --vm {vm} lists them)"
            ),
        }),
        Err(found) => Err(Error::AmbiguousSnapshot {
            prefix: query.to_string(),
            candidates: found.iter().map(|s| s.id.short().to_string()).collect(),
        }),
    }
}

/// Which VM snapshots each disk snapshot belongs to: snapshot id → (VM snapshot id, VM).
pub fn membership(repo: &Repo) -> Result<BTreeMap<SnapshotId, Vec<(VmSnapshotId, String)>>> {
    let mut out: BTreeMap<SnapshotId, Vec<(VmSnapshotId, String)>> = BTreeMap::new();
    for s in vm_snapshots(repo, None)? {
        for d in &s.record.disks {
            out.entry(d.snapshot_id.clone())
                .or_default()
                .push((s.id.clone(), s.record.vm.clone()));
        }
    }
    Ok(out)
}

/// Removes VM snapshot record `id` (its disk snapshots stay).
pub fn remove_record(repo: &Repo, id: &VmSnapshotId) -> Result<()> {
    match repo.backend().remove(&record::key(id)) {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Options of [`restore_vm`].
#[derive(Clone, Debug)]
pub struct VmRestoreOptions {
    /// `Raw` or `VhdFixed` (the default, ready for Azure and Azure Stack Hub).
    pub format: OutputFormat,
    /// Replace existing disk files.
    pub force: bool,
}

/// The outcome of [`restore_vm`].
#[derive(Clone, Debug, Serialize)]
pub struct VmRestoreReport {
    pub vm_snapshot_id: VmSnapshotId,
    pub vm: String,
    pub directory: PathBuf,
    pub disks: Vec<RestoreReport>,
    pub duration_ms: u64,
}

/// The file a disk of a VM restores to in `dir`.
pub fn restore_path(dir: &Path, disk: &str, format: OutputFormat) -> PathBuf {
    let ext = match format {
        OutputFormat::Raw => "img",
        OutputFormat::VhdFixed | OutputFormat::VhdDynamic => "vhd",
    };
    dir.join(format!("{disk}.{ext}"))
}

/// Restores every disk of VM snapshot `snapshot` into `dir` (created if missing), in
/// parallel; each disk as `restore` does (every chunk verified against its id).
pub fn restore_vm(
    repo: &Repo,
    snapshot: &VmSnapshot,
    dir: &Path,
    options: &VmRestoreOptions,
    progress: &dyn Progress,
) -> Result<VmRestoreReport> {
    let started = Instant::now();
    let summaries = disk_summaries(repo, snapshot)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let quiet = CancelOnly(progress);
    let restore_options = RestoreOptions {
        force: options.force,
        output_format: Some(options.format),
        exact_size: false,
        new_id: false,
    };
    let disks = per_disk::restore_each_disk(&summaries, |name, s| {
        let out = restore_path(dir, name, options.format);
        restore_to_file(repo, s, &out, &restore_options, &quiet)
    })?;
    Ok(VmRestoreReport {
        vm_snapshot_id: snapshot.id.clone(),
        vm: snapshot.record.vm.clone(),
        directory: dir.to_path_buf(),
        disks,
        duration_ms: millis(started),
    })
}

/// The disk snapshots of a complete VM snapshot, by disk name, each checked against the root
/// digest its record names.
fn disk_summaries(
    repo: &Repo,
    snapshot: &VmSnapshot,
) -> Result<Vec<(String, crate::index::SnapshotSummary)>> {
    if !snapshot.complete {
        return Err(Error::InvalidArgument(format!(
            "VM snapshot {} is incomplete (a disk snapshot of it was forgotten); restore its \
             remaining disks one by one with `stackvault restore`",
            snapshot.id.short()
        )));
    }
    let mut summaries = Vec::with_capacity(snapshot.record.disks.len());
    for d in &snapshot.record.disks {
        let s = repo.resolve_snapshot(&d.snapshot_id, None)?;
        if s.meta.root_digest != d.root_digest {
            return Err(Error::corrupt(
                record::key(&snapshot.id),
                0,
                format!(
                    "disk {} names snapshot {} with root digest {}, but the snapshot has {}",
                    d.name, d.snapshot_id, d.root_digest, s.meta.root_digest
                ),
            ));
        }
        summaries.push((d.name.clone(), s));
    }
    Ok(summaries)
}

/// `https://…/container?sas` + `blob` → `https://…/container/blob?sas`.
#[cfg(any(test, feature = "azure"))]
pub(crate) fn blob_in(container: &str, blob: &str) -> String {
    let (base, query) = match container.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (container, None),
    };
    let base = base.trim_end_matches('/');
    match query {
        Some(q) => format!("{base}/{blob}?{q}"),
        None => format!("{base}/{blob}"),
    }
}

/// The page blob a disk of a VM restores to in a container: `<vm>-<disk>.vhd`.
pub fn restore_blob_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}.vhd")
}

/// The outcome of [`restore_vm_to_container`].
#[cfg(feature = "azure")]
#[derive(Clone, Debug, Serialize)]
pub struct VmBlobRestoreReport {
    pub vm_snapshot_id: VmSnapshotId,
    pub vm: String,
    /// The container, without its query (no SAS).
    pub container: String,
    pub disks: Vec<crate::restore::pageblob::PageBlobRestoreReport>,
    pub duration_ms: u64,
}

/// Restores every disk of VM snapshot `snapshot` into page blobs of the container at
/// `container` (a SAS, if any, in its query), named [`restore_blob_name`], in parallel; each
/// as `restore` into a page blob does (fixed VHD, Azure-ready, footer last, every chunk
/// verified), with `options` for each.
#[cfg(feature = "azure")]
pub fn restore_vm_to_container(
    repo: &Repo,
    snapshot: &VmSnapshot,
    container: &str,
    options: &crate::restore::pageblob::PageBlobRestoreOptions,
    progress: &dyn Progress,
) -> Result<VmBlobRestoreReport> {
    let started = Instant::now();
    let summaries = disk_summaries(repo, snapshot)?;
    let quiet = CancelOnly(progress);
    let vm = snapshot.record.vm.as_str();
    let disks = per_disk::restore_each_disk(&summaries, |name, s| {
        let url = blob_in(container, &restore_blob_name(vm, name));
        crate::restore::pageblob::restore_to_page_blob(repo, s, &url, options, &quiet)
    })?;
    Ok(VmBlobRestoreReport {
        vm_snapshot_id: snapshot.id.clone(),
        vm: vm.to_string(),
        container: crate::azure::redact(container),
        disks,
        duration_ms: millis(started),
    })
}
