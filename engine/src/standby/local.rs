//! File and block-device standby targets.
//!
//! A file target is a raw image or a fixed VHD (data at the disk's offsets, footer after the
//! MiB-rounded data area); its record is the state file beside it, bound to the file's inode.
//! A device target gets the raw disk; its record lives in the state directory, named by the
//! device's identity. The first sync is `restore` itself (a file is written under a temporary
//! name and renamed, footer last; a device in place). Later syncs pwrite changed data and
//! zero ranges that became zero: punched holes where the file system or device guarantees
//! zeros, else `ZERO_RANGE`, else written zeros; whole 4 KiB pages go to the kernel, the
//! unaligned ends are written, so a page never mixes a zeroed range with data in the cache.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use super::changes::{walk, ChunkSource, Part};
use super::check;
use super::record::{self, Record, State, SyncLock};
use super::{decide, Counts, Plan, StatusReport, SyncOptions, SyncReport};
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::format::vhd_footer::{DiskType, Footer, FOOTER_LEN};
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::vhd::{fixed_size, restored_footer};
use crate::restore::{restore_to_file, DeviceTarget, DiskTarget, OutputFormat, RestoreOptions};

/// Largest pwrite of a sync: consecutive chunk pieces are gathered up to this.
const RUN_MAX: usize = 1 << 20;

/// Where a local target's record is, and what binds it to the target.
fn record_location(
    path: &Path,
    device: bool,
    options: &SyncOptions,
) -> Result<(std::path::PathBuf, Option<String>)> {
    if device {
        let identity = record::device_identity(path)?;
        let dir = options
            .state_dir
            .clone()
            .unwrap_or_else(record::default_state_dir);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        Ok((record::device_record_path(&dir, &identity), Some(identity)))
    } else {
        let identity = match fs::symlink_metadata(path) {
            Ok(_) => Some(record::file_identity(path)?),
            Err(_) => None,
        };
        Ok((record::state_path(path), identity))
    }
}

/// Why the device record `record` does not describe the device at `path` (its size and
/// signature, [`record::DeviceSignature`]), if it does not.
fn device_mismatch(record: Option<&Record>, path: &Path) -> Result<Option<String>> {
    match record {
        Some(r) => Ok(record::DeviceSignature::of(path)?.mismatch(r)),
        None => Ok(None),
    }
}

/// A device record as a sync leaves it: bound to the device's size and, once the sync is
/// over, to the signature of what it wrote. File records pass unchanged.
fn signed(record: Record, path: &Path, device: bool) -> Result<Record> {
    if !device {
        return Ok(record);
    }
    let sig = record::DeviceSignature::of(path)?;
    let done = record.state != State::Applying;
    Ok(Record {
        device_size: Some(sig.size),
        signature: done.then_some(sig.signature),
        ..record
    })
}

/// A record whose identity is not the target's describes something else: it is ignored,
/// with a note.
fn bound_record(
    record: Option<Record>,
    identity: Option<&str>,
    shown: &str,
    notes: &mut Vec<String>,
) -> Option<Record> {
    match record {
        // A first sync that did not finish: whatever the target is now, it is rewritten.
        Some(r) if r.snapshot_id.is_none() && r.state == State::Applying => Some(r),
        Some(r) if Some(r.identity.as_str()) != identity => {
            notes.push(format!(
                "the standby record beside {shown} describes another file or device ({}): \
                 {shown} was replaced since the last sync",
                r.identity
            ));
            None
        }
        other => other,
    }
}

pub(crate) fn status(
    path: &Path,
    device: Option<()>,
    options: &SyncOptions,
) -> Result<StatusReport> {
    let shown = path.display().to_string();
    let (location, identity) = record_location(path, device.is_some(), options)?;
    let mut notes = Vec::new();
    let raw = Record::read_file(&location)?;
    let had_record = raw.is_some();
    let mut record = bound_record(raw, identity.as_deref(), &shown, &mut notes);
    if device.is_some() {
        if let Some(why) = device_mismatch(record.as_ref(), path)? {
            notes.push(format!(
                "the device record does not describe {shown}: {why}"
            ));
            record = None;
        }
    }
    let kind = if device.is_some() { "device" } else { "file" };
    let mut report = super::status_report(&shown, kind, &location, record, notes);
    if had_record && report.record.is_none() {
        report.state = "unknown".into();
    }
    Ok(report)
}

pub(crate) fn sync(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    path: &Path,
    device: Option<bool>,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let started = Instant::now();
    let shown = path.display().to_string();
    let (location, identity) = record_location(path, device.is_some(), options)?;
    let _lock = SyncLock::acquire(&location, &shown)?;
    let mut notes = Vec::new();
    let old = bound_record(
        Record::read_file(&location)?,
        identity.as_deref(),
        &shown,
        &mut notes,
    );
    if device.is_some() {
        if let Some(why) = device_mismatch(old.as_ref(), path)? {
            if !options.full {
                return Err(Error::TargetMismatch {
                    target: shown.clone(),
                    snapshot: snapshot.id.to_string(),
                    offset: 0,
                    what: format!(
                        "its standby record ({}) does not describe this device: {why}; \
                         nothing was written: pass --full to rewrite it",
                        location.display()
                    ),
                });
            }
            notes.push(format!("rewritten in full: {why}"));
        }
    }
    let format = match (device, options.format) {
        (Some(_), Some(OutputFormat::Raw) | None) => OutputFormat::Raw,
        (Some(_), Some(f)) => {
            return Err(Error::Usage(format!(
                "{shown} is a device: it gets the raw disk, not {}; drop --format",
                f.as_str()
            )))
        }
        (None, Some(OutputFormat::VhdDynamic)) => {
            return Err(Error::Usage(
                "a standby file is raw or vhd-fixed (a dynamic VHD cannot be updated in place)"
                    .into(),
            ))
        }
        (None, Some(f)) => f,
        (None, None) => match old.as_ref().map(|r| r.target_format.as_str()) {
            Some("vhd-fixed") => OutputFormat::VhdFixed,
            Some(_) => OutputFormat::Raw,
            None if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vhd")) =>
            {
                OutputFormat::VhdFixed
            }
            None => OutputFormat::Raw,
        },
    };
    let exists = identity.is_some() && (device.is_some() || path.exists());
    if !options.full
        && old
            .as_ref()
            .is_some_and(|r| r.target_format != format.as_str())
    {
        return Err(Error::Usage(format!(
            "{shown} holds a {} disk; pass --full to rewrite it as {}",
            old.as_ref().map(|r| r.target_format.as_str()).unwrap_or(""),
            format.as_str()
        )));
    }
    let plan = decide(repo, old.as_ref(), snapshot, options.full, exists, &shown)?;
    let manifest = repo.load_manifest(&snapshot.id)?;
    if device == Some(true) {
        let size = device_size(path)?;
        if size < manifest.virtual_size {
            return Err(Error::Usage(format!(
                "device {shown} is {size} bytes, smaller than the {} bytes of snapshot {}'s \
                 disk; nothing was written: use a device of at least that size",
                manifest.virtual_size, snapshot.id
            )));
        }
    }
    let incremental = matches!(plan, Plan::Incremental { .. });
    let applying = super::applying_record(
        repo,
        old.as_ref(),
        incremental,
        snapshot,
        format.as_str(),
        identity.as_deref().unwrap_or(""),
    );
    let applying = signed(applying, path, device.is_some())?;
    applying.write_file(&location)?;

    let (counts, resized) = match plan {
        Plan::Full => {
            let r = restore_to_file(
                repo,
                snapshot,
                path,
                &RestoreOptions {
                    force: true,
                    output_format: Some(format),
                    ..Default::default()
                },
                progress,
            )
            .map_err(|e| interrupted(e, &shown))?;
            let c = Counts {
                written_bytes: r.bytes_written,
                written_ranges: r.chunks,
                zeroed_bytes: r.zero_bytes,
                ..Default::default()
            };
            (c, false)
        }
        Plan::Incremental { olds } => apply(
            Incremental {
                repo,
                snapshot,
                manifest: &manifest,
                olds: &olds,
                path,
                device: device.is_some(),
                format,
            },
            progress,
        )
        .map_err(|e| interrupted(e, &shown))?,
    };
    // A full file sync renamed a new file into place: the record binds to its inode.
    let identity = match device {
        Some(_) => identity.unwrap_or_default(),
        None => record::file_identity(path)?,
    };
    let applying = Record {
        identity,
        ..applying
    };
    let mut report = super::report(
        &super::ReportBase {
            shown: &shown,
            kind: if device.is_some() { "device" } else { "file" },
            format: format.as_str(),
            snapshot,
            old: old.as_ref(),
            full: !incremental,
            resized,
        },
        counts,
        started,
    );
    report.notes = notes;
    let verified = match options.verify_share {
        Some(share) => {
            let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
            let read = |offset: u64, buf: &mut [u8]| {
                file.read_exact_at(buf, offset)
                    .map_err(|e| Error::io("read", path, e))
            };
            match check::verify_sample(
                repo.protection(),
                &manifest,
                &snapshot.id,
                &shown,
                share,
                &read,
                progress,
            ) {
                Ok(v) => Some(v),
                Err(e @ Error::TargetMismatch { .. }) => {
                    let diverged = super::finished_record(&applying, snapshot, State::Diverged);
                    signed(diverged, path, device.is_some())?.write_file(&location)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        None => None,
    };
    let clean = super::finished_record(&applying, snapshot, State::Clean);
    signed(clean, path, device.is_some())?.write_file(&location)?;
    report.verify = verified;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// An interrupted sync leaves the record `applying`; the message says so.
fn interrupted(e: Error, shown: &str) -> Error {
    match e {
        Error::Cancelled(_) => Error::Cancelled(format!(
            "standby sync stopped; {shown} is marked applying: run the sync again to complete it"
        )),
        e => e,
    }
}

fn device_size(path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| Error::io("open device", path, e))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("size device", path, e))
}

/// What an incremental sync of a file or device applies, and where.
struct Incremental<'a, 'r> {
    repo: &'r Repo,
    snapshot: &'a SnapshotSummary,
    manifest: &'a Manifest<'r>,
    olds: &'a [Manifest<'r>],
    path: &'a Path,
    device: bool,
    format: OutputFormat,
}

/// The incremental sync of a file or device: resize, write the changed ranges, footer.
fn apply(job: Incremental<'_, '_>, progress: &dyn Progress) -> Result<(Counts, bool)> {
    let Incremental {
        repo,
        snapshot,
        manifest,
        olds,
        path,
        device,
        format,
    } = job;
    let source = ChunkSource {
        repo,
        snapshot_id: &snapshot.id,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let vhd = format == OutputFormat::VhdFixed;
    // The target's size, not the record's: a sync interrupted around its resize left the
    // record and the file disagreeing.
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let (cur_end, new_end) = if vhd {
        (
            len.saturating_sub(FOOTER_LEN as u64),
            fixed_size(manifest.virtual_size, false),
        )
    } else {
        (len, manifest.virtual_size)
    };
    let resized = cur_end != new_end && !device;
    // Restore's device target writes and zeroes files just as well (holes punched where the
    // file system guarantees zeros).
    let sink = DeviceTarget::new(&file, path);
    let footer = if vhd {
        let mut bytes = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut bytes, cur_end)
            .ok()
            .and_then(|()| Footer::decode(&bytes, &path.display().to_string(), cur_end).ok())
            .map(|(f, _)| f)
    } else {
        None
    };
    // A footer of the right size stays; otherwise (resized, or a sync interrupted between
    // the resize and the footer) a new one, with the same unique id, is written last.
    let footer_ok = !resized && footer.as_ref().is_some_and(|f| f.current_size == new_end);
    let unique_id = footer.map(|f| f.unique_id);
    if resized {
        if vhd {
            // The old footer would lie inside the new data area: it goes first.
            sink.zero_at(cur_end, FOOTER_LEN as u64)?;
            set_len(&file, path, new_end + FOOTER_LEN as u64)?;
        } else {
            set_len(&file, path, new_end)?;
        }
    }
    let counts =
        super::for_changed_segments(manifest, olds, progress, |frames, extents, base, ranges| {
            let mut c = super::tally(extents, base, ranges);
            c.requests = 0;
            let mut run: Vec<u8> = Vec::new();
            let mut run_start = 0u64;
            let mut requests = 0u64;
            for &(start, end) in ranges {
                walk(&source, frames, extents, base, (start, end), &mut |part| {
                    match part {
                        Part::Zero { offset, len } => {
                            if !run.is_empty() {
                                sink.write_at(run_start, &run)?;
                                requests += 1;
                                run.clear();
                            }
                            sink.zero_at(offset, len)?;
                            requests += 1;
                        }
                        Part::Data { offset, data } => {
                            let contiguous = run_start + run.len() as u64 == offset;
                            if !run.is_empty() && (!contiguous || run.len() + data.len() > RUN_MAX)
                            {
                                sink.write_at(run_start, &run)?;
                                requests += 1;
                                run.clear();
                            }
                            if run.is_empty() {
                                run_start = offset;
                            }
                            run.extend_from_slice(data);
                        }
                    }
                    Ok(())
                })?;
            }
            if !run.is_empty() {
                sink.write_at(run_start, &run)?;
                requests += 1;
            }
            c.requests = requests;
            Ok(c)
        })?;
    if vhd && !footer_ok {
        let mut footer = restored_footer(
            manifest,
            &RestoreOptions::default(),
            DiskType::Fixed,
            new_end,
        );
        if let Some(id) = unique_id {
            footer.unique_id = id;
        }
        file.sync_data().map_err(|e| Error::io("fsync", path, e))?;
        sink.write_at(new_end, &footer.encode())?;
    }
    file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    Ok((counts, resized))
}

fn set_len(file: &File, path: &Path, len: u64) -> Result<()> {
    file.set_len(len).map_err(|e| Error::io("resize", path, e))
}
