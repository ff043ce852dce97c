//! Page blob standby targets (Azure, Azure Stack Hub): a fixed VHD in a page blob whose
//! metadata is the standby record, every update conditional on the ETag read just before.
//!
//! A sync holds the blob's lease ([`crate::azure::lease`]) from before its first write to
//! after its last, so no other writer can interleave with it. A lease left by a sync that
//! died on this host (the record says `applying`, by this host and a pid that is gone) is
//! broken and taken over; any other holder is waited out (`format-spec/standby.md`, "Leases").
//!
//! The first sync creates the blob (or keeps one of the right size), marks it applying and
//! runs `restore` onto it with `--existing` semantics (stale pages cleared, footer last).
//! Later syncs cut each changed range out to whole pages (4 KiB for Stack Hub), merge the
//! regions that lie within the coalescing gap of each other (up to 4 MiB, across segments;
//! the gap chosen per sync to keep the rewritten bytes within budget, see
//! [`super::regions`]), fill them with the snapshot's bytes (the unchanged bytes between
//! merged changes included), a few regions in parallel, and hand them to the [`PageWriter`],
//! which sends data pages with Put
//! Page and clears the zero runs; a disk that grew or shrank resizes the blob first and gets a
//! new footer (same unique id) at the end. After a clean sync `--keep-blob-snapshots N` takes
//! a blob snapshot and deletes the oldest of ours beyond N (Stack Hub allows 1,000 per blob).

use std::sync::Mutex;
use std::time::Instant;

use super::changes::{walk, ChunkSource, Part};
use super::record::{self, Record, State};
use super::regions::RegionSource;
use super::{decide, Counts, LeaseReport, Plan, StatusReport, SyncOptions, SyncReport};
use crate::azure::lease::{lease_seconds, HeldLease, LeaseState};
use crate::azure::pagereader::{PageReader, DEFAULT_READ_PARALLEL};
use crate::azure::pagewriter::{
    PageWriter, Window, WriterOptions, DEFAULT_COALESCE_GAP, DEFAULT_PARALLEL,
};
use crate::azure::BlobClient;
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use crate::format::vhd_footer::{Footer, FOOTER_LEN};
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::read::FrameCache;
use crate::repo::Repo;
use crate::restore::pageblob::{
    check_limits, page_blob_footer, restore_with_client, source_unique_id, PageBlobRestoreOptions,
};

const MIB: u64 = 1 << 20;
/// Most blob snapshots a blob may keep (Azure Stack Hub's limit).
pub const MAX_BLOB_SNAPSHOTS: u32 = 1000;

pub(crate) fn status(url: &str, options: &SyncOptions) -> Result<StatusReport> {
    let client = BlobClient::new(url, &options.blob)?;
    let shown = client.display_url().to_string();
    let (record, lease, mut notes) = match client.properties_and_metadata()? {
        Some((p, m)) => (
            Record::from_metadata(&m, &shown)?,
            Some(p.lease),
            Vec::new(),
        ),
        None => (None, None, vec![format!("{shown} does not exist")]),
    };
    let lease = lease.map(|l| lease_report(l, record.as_ref()));
    if let Some(note) = lease.as_ref().and_then(lease_note) {
        notes.push(note);
    }
    let mut report = super::status_report(
        &shown,
        "page-blob",
        std::path::Path::new("blob metadata"),
        record,
        notes,
    );
    report.lease = lease;
    Ok(report)
}

/// Whose the blob's lease is, from its standby record (see [`LeaseReport::holder`]).
fn lease_report(lease: LeaseState, record: Option<&Record>) -> LeaseReport {
    let sync = record.filter(|r| r.state == State::Applying && lease.is_held());
    let holder = if !lease.is_held() {
        None
    } else {
        Some(match sync {
            Some(r) if r.host != crate::host::hostname() => "remote-sync",
            Some(r) if record::other_process_alive(r.pid) => "running-sync",
            Some(_) => "dead-sync",
            None => "other",
        })
    };
    LeaseReport {
        holder: holder.map(str::to_string),
        host: sync.map(|r| r.host.clone()),
        pid: sync.map(|r| r.pid),
        state: lease.state,
        status: lease.status,
        duration: lease.duration,
    }
}

/// What an operator should know of a lease that is not a running sync's.
fn lease_note(l: &LeaseReport) -> Option<String> {
    let who = format!(
        "pid {} on host {}",
        l.pid.unwrap_or(0),
        l.host.as_deref().unwrap_or("?")
    );
    let lapse = format!(
        "a lease lapses at most {} s after its last renewal",
        crate::azure::lease::LEASE_SECONDS
    );
    match l.holder.as_deref()? {
        "dead-sync" => Some(format!(
            "the blob is leased by a sync that is no longer running ({who}); the next sync \
             on this host breaks that lease and completes the blob ({lapse})"
        )),
        "remote-sync" => Some(format!(
            "the blob is leased by a sync on another host ({who}); whether it still runs \
             cannot be told from here: if it died, {lapse}, and the next sync completes it"
        )),
        "other" => Some(format!(
            "the blob is leased by a writer that is not a running standby sync; syncs refuse \
             until it releases the lease ({lapse} unless it is infinite)"
        )),
        _ => None,
    }
}

/// Writes `record` as the blob's metadata if the blob is still at `etag`.
fn set_record(client: &BlobClient, record: &Record, etag: &str) -> Result<String> {
    client
        .set_metadata_if_match(&record.to_metadata(), etag)
        .map_err(|e| match e {
            Error::VersionMismatch { object } => Error::Locked(format!(
                "{object} changed while its standby record was being updated: another sync \
                 of it runs (or ran) at the same time; check `standby status` and try again"
            )),
            e => e,
        })
}

/// The blob's ETag and record now; fails if the record is no longer the one we wrote.
fn still_ours(client: &BlobClient, ours: &Record) -> Result<String> {
    let shown = client.display_url();
    let (props, m) = client
        .properties_and_metadata()?
        .ok_or_else(|| Error::Locked(format!("{shown} disappeared during the sync")))?;
    let now = Record::from_metadata(&m, shown)?;
    if now.as_ref() != Some(ours) {
        return Err(Error::Locked(format!(
            "the standby record of {shown} changed during the sync: another sync took it over"
        )));
    }
    props
        .etag
        .ok_or_else(|| Error::Internal(format!("{shown}: no ETag in its properties")))
}

pub(crate) fn sync(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    url: &str,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let started = Instant::now();
    if options
        .format
        .is_some_and(|f| f != crate::restore::OutputFormat::VhdFixed)
    {
        return Err(Error::Usage(
            "a page blob standby is a fixed VHD; drop --format".into(),
        ));
    }
    if options.keep_blob_snapshots > MAX_BLOB_SNAPSHOTS {
        return Err(Error::Usage(format!(
            "--keep-blob-snapshots {}: at most {MAX_BLOB_SNAPSHOTS} (Azure Stack Hub's limit \
             per blob)",
            options.keep_blob_snapshots
        )));
    }
    let client = BlobClient::new(url, &options.blob)?;
    let shown = client.display_url().to_string();
    let manifest = repo.load_manifest(&snapshot.id)?;
    check_limits(options.blob.profile, manifest.virtual_size, true)?;
    if !manifest.segment_size.is_multiple_of(4096) {
        return Err(Error::Unsupported {
            what: format!(
                "segment size {} is not a multiple of 4 KiB",
                manifest.segment_size
            ),
        });
    }
    let data_size = manifest.virtual_size.div_ceil(MIB) * MIB;
    let blob_size = data_size + FOOTER_LEN as u64;

    let found = client.properties_and_metadata()?;
    let old = match &found {
        Some((p, m)) => {
            if !p.blob_type.is_empty() && p.blob_type != "PageBlob" {
                return Err(Error::Usage(format!(
                    "{shown} is a {}, not a page blob",
                    p.blob_type
                )));
            }
            Record::from_metadata(m, &shown)?
        }
        None => None,
    };
    if let Some(r) = old.as_ref().filter(|r| {
        r.state == State::Applying
            && r.host == crate::host::hostname()
            && record::other_process_alive(r.pid)
    }) {
        return Err(Error::Locked(format!(
            "another standby sync of {shown} is running (pid {} on this host, since {})",
            r.pid, r.since
        )));
    }
    let plan = decide(
        repo,
        old.as_ref(),
        snapshot,
        options.full,
        found.is_some(),
        &shown,
    )?;
    if found.is_none() {
        client.create_page_blob(blob_size)?;
    }
    let mut notes = take_lease(&client, old.as_ref(), &shown)?;
    let renewal_failure = Mutex::new(None);
    let result = std::thread::scope(|scope| {
        let lease = HeldLease::keep(scope, &client, &renewal_failure);
        let synced = sync_leased(
            repo,
            snapshot,
            &client,
            Leased {
                old: old.as_ref(),
                plan,
                manifest,
                blob_size,
                started,
            },
            options,
            progress,
        );
        (synced, lease.release(&client))
    });
    match result {
        (Ok(mut report), released) => {
            if let Err(e) = released {
                notes.push(format!("the lease was not released cleanly: {e}"));
            }
            report.notes.splice(0..0, notes);
            Ok(report)
        }
        (Err(e), _) => Err(e),
    }
}

/// Takes the blob's lease for this sync (see `format-spec/standby.md`, "Leases"): a lease
/// left by a sync that died on this host (the record says `applying` and names this host and
/// a process that is gone) is broken and taken over; any other holder makes the sync refuse
/// until its lease lapses. Returns notes for the report.
fn take_lease(client: &BlobClient, old: Option<&Record>, shown: &str) -> Result<Vec<String>> {
    if client.acquire_lease()? {
        return Ok(Vec::new());
    }
    // Only an `applying` record says whose lease it is: a sync takes the lease before it
    // writes `applying`, and releases it only after `clean`.
    let dead_here = old.filter(|r| {
        r.state == State::Applying
            && r.host == crate::host::hostname()
            && r.pid != 0
            && !record::other_process_alive(r.pid)
    });
    match dead_here {
        Some(r) => {
            client.break_lease()?;
            if !client.acquire_lease()? {
                return Err(Error::Locked(format!(
                    "{shown}: another writer leased the blob the moment the lease of the dead \
                     sync was broken; check `standby status` and try again"
                )));
            }
            Ok(vec![format!(
                "broke the lease left on the blob by a sync that died (pid {} on this host, \
                 {} since {})",
                r.pid,
                r.state.as_str(),
                r.since
            )])
        }
        None => Err(Error::Locked(format!(
            "{shown} is leased by another writer ({}); a sync that died releases it within \
             {} s of its last renewal: try again then",
            match old {
                Some(r) => format!(
                    "its record was last set by host {} pid {} at {}",
                    r.host, r.pid, r.since
                ),
                None => "it holds no standby record".into(),
            },
            lease_seconds()
        ))),
    }
}

/// What [`sync`] decided before it took the lease.
struct Leased<'a, 'r> {
    old: Option<&'a Record>,
    plan: Plan<'r>,
    manifest: Manifest<'r>,
    blob_size: u64,
    started: Instant,
}

/// The sync under the blob's lease: record `applying`, write, record `clean`.
fn sync_leased(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    client: &BlobClient,
    leased: Leased<'_, '_>,
    options: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let Leased {
        old,
        plan,
        manifest,
        blob_size,
        started,
    } = leased;
    let shown = client.display_url().to_string();
    let data_size = blob_size - FOOTER_LEN as u64;
    // Read again under the lease: a sync that ran between our first look and the lease has
    // changed the record, and what we decided from it no longer holds.
    let (props, m) = client
        .properties_and_metadata()?
        .ok_or_else(|| Error::Locked(format!("{shown} disappeared before the sync began")))?;
    if Record::from_metadata(&m, &shown)?.as_ref() != old {
        return Err(Error::Locked(format!(
            "the standby record of {shown} changed while this sync took the blob's lease: \
             another sync ran meanwhile; run this one again"
        )));
    }
    let old_size = props.size;
    let etag = props
        .etag
        .ok_or_else(|| Error::Internal(format!("{shown}: no ETag")))?;
    let incremental = matches!(plan, Plan::Incremental { .. });
    let applying = super::applying_record(repo, old, incremental, snapshot, "vhd-fixed", "");
    set_record(client, &applying, &etag)?;
    let resized = old_size != blob_size;

    let writer_options = WriterOptions {
        coalesce_gap: options.coalesce_gap.unwrap_or(DEFAULT_COALESCE_GAP),
        parallel: if options.parallel == 0 {
            DEFAULT_PARALLEL
        } else {
            options.parallel
        },
    };
    let mut coalesce_gap = None;
    let mut peak_in_flight = None;
    let mut clear_requests = None;
    let (counts, uploaded) = match plan {
        Plan::Full => {
            if resized {
                client.resize(blob_size)?;
            }
            let r = restore_with_client(
                repo,
                snapshot,
                client,
                &PageBlobRestoreOptions {
                    blob: options.blob.clone(),
                    existing: true,
                    journal_dir: options.journal_dir.clone(),
                    parallel: writer_options.parallel,
                    coalesce_gap: Some(writer_options.coalesce_gap),
                    ..Default::default()
                },
                progress,
            )
            .map_err(|e| interrupted(e, &shown))?;
            let c = Counts {
                written_bytes: r.restore.bytes_written,
                written_ranges: r.restore.chunks,
                zeroed_bytes: r.restore.zero_bytes,
                zeroed_ranges: 0,
                requests: r.requests,
                gap_bytes: 0,
            };
            (c, r.uploaded_bytes)
        }
        Plan::Incremental { olds } => {
            let old_data = old_size.saturating_sub(FOOTER_LEN as u64);
            let mut extra_requests = 1;
            let mut old_footer = [0u8; FOOTER_LEN];
            let footer = client
                .read_range(old_data, &mut old_footer, None)
                .ok()
                .and_then(|()| Footer::decode(&old_footer, &shown, old_data).ok())
                .map(|(f, _)| f);
            // A footer of the right size stays; otherwise (resized, or a sync interrupted
            // between the resize and the footer) a new one with the same id goes last.
            let footer_ok =
                !resized && footer.as_ref().is_some_and(|f| f.current_size == data_size);
            let unique_id = footer.map(|f| f.unique_id);
            if resized {
                client.resize(blob_size)?;
                extra_requests += 1;
                if data_size > old_data {
                    // The old footer now lies inside the data area.
                    client.clear_pages(old_data, FOOTER_LEN as u64)?;
                    extra_requests += 1;
                }
            }
            // Every page may hold old data: zero runs inside a changed range are cleared.
            let writer = PageWriter::new(client, writer_options, vec![(0, data_size)]);
            let source = RegionSource {
                new: &manifest,
                olds: &olds,
                align: writer.align(),
                data_size,
            };
            // Nearby changes go out as one region; the gap between them is chosen so that
            // the unchanged bytes rewritten stay within the budget, unless given.
            let gap = match options.coalesce_gap {
                Some(g) => g,
                None => source.choose_gap(progress)?.gap,
            };
            coalesce_gap = Some(gap);
            let confirm = |_: u64| Ok(());
            let mut counts = writer
                .run(&confirm, |submitter| {
                    source.write_merged(gap, progress, |frames, (rs, re)| {
                        let len = usize::try_from(re - rs)
                            .map_err(|_| Error::Internal("region larger than memory".into()))?;
                        let mut buf = vec![0u8; len];
                        fill(repo, &snapshot.id, &manifest, frames, rs, &mut buf)?;
                        submitter.submit(Window {
                            offset: rs,
                            data: buf,
                        })
                    })
                })
                .map_err(|e| interrupted(e, &shown))?;
            if !footer_ok {
                let id = unique_id
                    .or_else(|| source_unique_id(repo, &snapshot.id))
                    .unwrap_or_else(|| {
                        *blake3::hash(snapshot.id.as_bytes())
                            .as_bytes()
                            .first_chunk::<16>()
                            .unwrap_or(&[0; 16])
                    });
                writer.put(data_size, &page_blob_footer(data_size, id).encode())?;
            }
            let s = writer.stats();
            counts.requests = s.put_requests + s.clear_requests + extra_requests;
            peak_in_flight = Some(s.peak_bytes_in_flight);
            clear_requests = Some(s.clear_requests);
            (counts, s.put_bytes)
        }
    };
    let mut report = super::report(
        &super::ReportBase {
            shown: &shown,
            kind: "page-blob",
            format: "vhd-fixed",
            snapshot,
            old,
            full: !incremental,
            resized,
        },
        counts,
        started,
    );
    report.uploaded_bytes = Some(uploaded);
    report.coalesce_gap_bytes = coalesce_gap;
    report.peak_bytes_in_flight = peak_in_flight;
    report.clear_requests = clear_requests;
    report.notes = client.notes();

    let etag = still_ours(client, &applying)?;
    if let Some(share) = options.verify_share {
        // The shared page reader: only written pages are fetched, several GETs in flight.
        let reader = PageReader::new(client, None, DEFAULT_READ_PARALLEL);
        let read = |offset: u64, buf: &mut [u8]| reader.read(offset, buf).map(drop);
        match super::check::verify_sample(
            repo.protection(),
            &manifest,
            &snapshot.id,
            &shown,
            share,
            &read,
            progress,
        ) {
            Ok(v) => report.verify = Some(v),
            Err(e @ Error::TargetMismatch { .. }) => {
                set_record(
                    client,
                    &super::finished_record(&applying, snapshot, State::Diverged),
                    &etag,
                )?;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    set_record(
        client,
        &super::finished_record(&applying, snapshot, State::Clean),
        &etag,
    )?;
    if options.keep_blob_snapshots > 0 {
        report.blob_snapshot = Some(client.snapshot_blob()?);
        let ours: Vec<_> = client
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.metadata.contains_key("stackvault_standby"))
            .collect();
        let excess = ours
            .len()
            .saturating_sub(options.keep_blob_snapshots as usize);
        for s in ours.iter().take(excess) {
            client.delete_snapshot(&s.snapshot)?;
            report.blob_snapshots_deleted += 1;
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Fills `buf` with the snapshot's bytes at disk offset `start`, over as many segments as it
/// spans; zero extents stay as the (zeroed) buffer has them.
fn fill(
    repo: &Repo,
    snapshot_id: &str,
    manifest: &Manifest<'_>,
    frames: &mut FrameCache,
    start: u64,
    buf: &mut [u8],
) -> Result<()> {
    let seg = u64::from(manifest.segment_size);
    let end = start + buf.len() as u64;
    let source = ChunkSource { repo, snapshot_id };
    let mut index = start / seg;
    while index * seg < end {
        let extents = manifest.segment(index)?;
        let base = index * seg;
        let range = (start.max(base), end.min(base + seg));
        walk(&source, frames, &extents, base, range, &mut |part| {
            if let Part::Data { offset, data } = part {
                let at = (offset - start) as usize;
                buf.get_mut(at..at + data.len())
                    .ok_or_else(|| {
                        Error::Internal(format!("piece at {offset} outside its region"))
                    })?
                    .copy_from_slice(data);
            }
            Ok(())
        })?;
        index += 1;
    }
    Ok(())
}

fn interrupted(e: Error, shown: &str) -> Error {
    match e {
        Error::Cancelled(_) => Error::Cancelled(format!(
            "standby sync stopped; {shown} is marked applying in its metadata: run the sync \
             again to complete it"
        )),
        e => e,
    }
}
