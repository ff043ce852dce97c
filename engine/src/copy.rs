//! Copying snapshots from one repository into another (`stackvault copy`), and creating a
//! repository that chunks like another one (`init --like`).
//!
//! Two repositories that cut disks the same way ([`same_chunking`]: chunker, segment size,
//! zero-run minimum) name every chunk and every manifest the same: a snapshot is copied by
//! sending the chunks the destination lacks and then its manifest byte for byte, so the
//! snapshot id is the same on both sides. Chunks are read verified (crc32, decompression,
//! BLAKE3) from the source, compressed at the destination's zstd level into frames and packs
//! as a backup would, and written in the backup's order: pack → index → manifest. A manifest
//! waits for the pack holding its last new chunks, so many small snapshots share packs.
//!
//! Between repositories that chunk differently, the snapshot is restored as a stream
//! ([`SnapshotSource`], a [`DiskSource`] over a snapshot) and backed up into the destination
//! by the normal [`backup()`](crate::backup::backup); the new snapshot keeps the source's disk
//! name, time, host and source description, and records where it came from in its
//! `change_source` (`copy-of:<source snapshot id>`), which is how a rerun knows it is there.
//!
//! Between two encrypted repositories that share their naming secret (`init --like`,
//! [`same_chunk_naming`]) chunk ids, cut points and snapshot ids are the same on both sides, so
//! the copy keeps them and sends only what the destination lacks: each frame holding a
//! missing chunk is fetched whole, opened with the source's data key and sealed again with
//! the destination's ([`crate::store::reseal`]: no decompression, no recompression, no
//! re-chunking), and each manifest is opened block by block and sealed again under the same
//! id. VM records keep their ids too (`plan run`'s off-site copy seals the same plaintext).
//!
//! Into an encrypted repository from a plain one, or from one with other naming keys, the
//! copy re-chunks ([`same_chunk_naming`]): the destination's chunker cut is keyed, so keeping
//! the source's boundaries would carry the source's (plain, fingerprintable) cut points and need a
//! second naming; re-chunking through the normal backup gives chunks cut and named with the
//! destination's keys only, so its next backups deduplicate against the copy. Such a copy is
//! then verified at the destination: every chunk of the new snapshot is read back, opened and
//! checked against its keyed id, before the copy counts as done.
//!
//! Resumable: snapshots the destination has (same id, or a `copy-of` record) are skipped,
//! chunks it has are not sent, and packs stored by an interrupted run are indexed and reused
//! (a killed run can leave a stored pack that is not indexed yet: [`adopt_stored_packs`]).
//! A damaged chunk at the source fails the copy of its snapshot only: no manifest is written
//! for it, and the chunks already sent are valid, indexed data the next run reuses.
//!
//! The copy only reads the source (it may be read-only) and only adds objects to the
//! destination, under a writer lock there.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backup::{backup, BackupMode, BackupOptions};
use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::config::RepoConfig;
use crate::format::manifest::sealed::BlockSealer;
use crate::format::manifest::{
    ChangeSource, Extent, Manifest, ManifestWriter, SnapshotKind, SnapshotMeta,
};
use crate::format::manifest::{ObjectRead, SealedObject};
use crate::format::pack::{Compression, FRAME_TARGET_LEN};
use crate::format::SnapshotId;
use crate::format::{hex, ChunkId};
use crate::index::SnapshotSummary;
use crate::progress::{checkpoint, Progress};
use crate::read::FrameCache;
use crate::repo::{InitOptions, Repo};
use crate::source::{DiskSource, ExtentKind, SourceExtent};
use crate::store::pack::{compress, read_pack_table, PackWriter};
use crate::store::reseal::open_frame;
use crate::store::{pack_key, snapshot_key, StoredObject};

/// What to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Only snapshots of this disk (and `latest` means this disk's latest).
    pub disk: Option<String>,
    /// Snapshot ids, prefixes or `latest` at the source; empty: every snapshot (of `disk`).
    pub snapshots: Vec<String>,
}

/// What happened to one source snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyOutcome {
    /// Manifest copied byte for byte: the same id at the destination.
    Copied,
    /// Re-chunked into a new snapshot (the repositories chunk differently).
    Rechunked,
    /// The destination already had it.
    Skipped,
    /// Not copied; `error` says why.
    Failed,
}

/// One source snapshot in a [`CopyReport`].
#[derive(Clone, Debug, Serialize)]
pub struct CopiedSnapshot {
    /// The snapshot at the source.
    pub snapshot_id: SnapshotId,
    /// Its copy at the destination (the same id unless re-chunked); `null` when it failed.
    pub destination_snapshot_id: Option<SnapshotId>,
    pub disk: String,
    pub time: String,
    pub outcome: CopyOutcome,
    pub error: Option<String>,
}

/// The outcome of [`copy`] (`--json` serialises this).
#[derive(Debug, Serialize)]
pub struct CopyReport {
    pub source: String,
    pub destination: String,
    /// The repositories chunk differently, so snapshots were re-chunked (new ids).
    pub rechunked: bool,
    pub snapshots_copied: u64,
    pub snapshots_skipped: u64,
    pub snapshots_failed: u64,
    /// Distinct chunks stored at the destination.
    pub chunks_sent: u64,
    /// Chunk references whose chunk the destination had (or got earlier in this run).
    pub chunks_skipped: u64,
    /// Bytes read from the source: chunk data (uncompressed) and manifests.
    #[serde(rename = "read_bytes")]
    pub bytes_read: u64,
    /// Bytes stored at the destination: packs and manifests.
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    pub packs_written: u64,
    /// Packs an interrupted earlier run stored but did not index, now indexed and reused.
    pub packs_adopted: u64,
    pub duration_ms: u64,
    pub snapshots: Vec<CopiedSnapshot>,
    /// The error of each failed snapshot, in order (for the caller's exit code).
    #[serde(skip)]
    pub errors: Vec<Error>,
}

/// Whether snapshots of `a` and `b` describe a disk the same way (same chunk cuts, segments
/// and holes), so that a manifest of one is valid, and deduplicates, in the other. The zstd
/// level and pack size do not matter: chunks are recompressed.
pub fn same_chunking(a: &RepoConfig, b: &RepoConfig) -> bool {
    a.chunker == b.chunker && a.segment_size == b.segment_size && a.zero_run_min == b.zero_run_min
}

/// Whether two repositories name and cut chunks alike: both plain, or both encrypted with the
/// same naming secret (`init --like`; compared through a keyed fingerprint, never the secret).
/// Otherwise a copy re-chunks: the destination's keyed chunker cuts the disk and its keyed ids
/// name the chunks, so nothing of the source's naming (plain BLAKE3 ids, unkeyed cut points,
/// another key's ids) reaches an encrypted destination, and its next backups deduplicate
/// against the copy.
pub fn same_chunk_naming(a: &Protection, b: &Protection) -> bool {
    a.same_naming(b)
}

/// Creates a repository at `path` (a new id) that chunks and compresses like `like`, so that
/// copies between the two send each chunk once and keep snapshot ids. When both are
/// encrypted, the new repository shares `like`'s naming secret (chunk ids, chunker, object
/// ids) and draws its own sealing secret, under its own key object: see
/// `format-spec/encryption.md`, "Shared naming". Between a plain and an encrypted repository
/// (either way round), or from one whose key objects are version 1, ids cannot be shared: the
/// repository is still made, and a notice says that copies into it re-chunk.
pub fn init_like(path: &std::path::Path, like: &Repo) -> Result<Repo> {
    let src = like.config();
    let options = InitOptions {
        chunker: src.chunker,
        zstd_level: src.zstd_level,
    };
    // `init` sets the other parameters to today's defaults: refuse before creating anything
    // if the source differs in them (no build of stackvault has made such a repository).
    let probe = RepoConfig::new([0; 16], 0, src.chunker);
    if !same_chunking(&probe, src) {
        return Err(Error::unsupported(format!(
            "{} uses segments of {} bytes and holes of {} bytes, which `init` cannot set; \
             copy into a repository made with `init --chunker` instead (snapshots are then \
             re-chunked)",
            like.root().display(),
            src.segment_size,
            src.zero_run_min
        )));
    }
    let encrypt = crate::repo::encryption_requested();
    let secrets = match (like.protection().is_encrypted(), encrypt) {
        (true, true) => Some(like.secrets()?),
        _ => None,
    };
    let naming = secrets.as_ref().filter(|s| !s.is_single());
    let repo = Repo::init_naming_like(path, &options, naming)?;
    let (from, to) = (like.location(), repo.location());
    let rechunks = "`copy` between the two re-chunks every snapshot (new snapshot ids)";
    match (
        like.protection().is_encrypted(),
        repo.protection().is_encrypted(),
    ) {
        (true, true) if naming.is_none() => crate::progress::notice(&format!(
            "{to} cannot share the chunk ids of {from}: its key objects are version 1 (one \
             secret for naming and sealing, which {to} must not hold), so {rechunks}; to share \
             ids, copy {from} into a new repository once and make further copies `--like` \
             that one"
        )),
        (false, true) => crate::progress::notice(&format!(
            "{from} is not encrypted, so {to} (encrypted) cannot share its chunk ids: plain ids \
             would fingerprint the data; {rechunks}"
        )),
        (true, false) => crate::progress::notice(&format!(
            "{to} is not encrypted, so it cannot share the chunk ids of {from} (keyed, and the \
             keys stay in encrypted repositories); {rechunks}"
        )),
        _ => {}
    }
    Ok(repo)
}

/// Copies snapshots of `src` into `dst`; see the module doc. Stops at the next segment when
/// cancelled, after storing what it holds (an interrupted copy resumes where it stopped).
pub fn copy(
    src: &Repo,
    dst: &Repo,
    options: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let started = Instant::now();
    let _lock = dst.lock("copy")?;
    let canonical = |r: &Repo| std::fs::canonicalize(r.root()).ok();
    if src.config().repository_id == dst.config().repository_id
        && canonical(src).is_some()
        && canonical(src) == canonical(dst)
    {
        return Err(Error::Usage(format!(
            "{} and {} are the same repository: copy needs two",
            src.root().display(),
            dst.root().display()
        )));
    }
    let wanted = select_snapshots(src, options)?;
    let rechunk = !same_chunking(src.config(), dst.config())
        || !same_chunk_naming(src.protection(), dst.protection());
    // Same naming and both encrypted: frames and manifests are sealed again, not rebuilt.
    let reseal = !rechunk && src.protection().is_encrypted();
    let mut report = CopyReport {
        source: src.root().display().to_string(),
        destination: dst.root().display().to_string(),
        rechunked: rechunk,
        snapshots_copied: 0,
        snapshots_skipped: 0,
        snapshots_failed: 0,
        chunks_sent: 0,
        chunks_skipped: 0,
        bytes_read: 0,
        bytes_written: 0,
        packs_written: 0,
        packs_adopted: adopt_stored_packs(dst)?,
        duration_ms: 0,
        snapshots: Vec::new(),
        errors: Vec::new(),
    };
    // What the destination has: snapshot ids, and the sources of re-chunked copies.
    let mut present: HashMap<String, SnapshotId> = HashMap::new();
    for s in dst.snapshots(None)? {
        if let Some(origin) = s.meta.change_source.copied_from() {
            present.insert(origin.to_string(), s.id.clone());
        }
        present.insert(s.id.to_string(), s.id.clone());
    }
    let result = if rechunk {
        copy_rechunked(src, dst, &wanted, &present, &mut report, progress)
    } else {
        copy_identical(src, dst, reseal, &wanted, &present, &mut report, progress)
    };
    report.duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Err(Error::Cancelled(why)) => Err(Error::Cancelled(format!(
            "copy stopped ({why}); {} snapshots copied, {} packs stored; run it again to \
             copy the rest (nothing is sent twice)",
            report.snapshots_copied, report.packs_written
        ))),
        Err(e) => Err(e),
        Ok(()) => Ok(report),
    }
}

/// The source snapshots to copy, oldest first, each once.
fn select_snapshots(src: &Repo, options: &CopyOptions) -> Result<Vec<SnapshotSummary>> {
    let disk = options.disk.as_deref();
    if options.snapshots.is_empty() {
        let all = src.snapshots(disk)?;
        if all.is_empty() {
            if let Some(d) = disk {
                return Err(Error::SnapshotNotFound {
                    query: format!("any snapshot of disk {d} in {}", src.root().display()),
                });
            }
        }
        return Ok(all);
    }
    let mut chosen: Vec<SnapshotSummary> = Vec::new();
    for q in &options.snapshots {
        let s = src.resolve_snapshot(q, disk)?;
        if !chosen.iter().any(|c| c.id == s.id) {
            chosen.push(s);
        }
    }
    chosen.sort_by(|a, b| a.meta.time.cmp(&b.meta.time).then(a.id.cmp(&b.id)));
    Ok(chosen)
}

/// Indexes the packs in `dst` that its index does not know: a copy (or backup) killed
/// between storing a pack and indexing it leaves one, and its chunks are as good as any.
/// A pack whose table cannot be read is left alone (`check` reports it, `prune` removes
/// it). Returns how many were indexed.
pub fn adopt_stored_packs(dst: &Repo) -> Result<u64> {
    let indexed: HashSet<String> = dst.index().pack_names()?.into_iter().collect();
    let mut adopted = 0;
    for object in dst.backend().list_with_sizes("packs/")? {
        let Some(name) = object.key.rsplit('/').next() else {
            continue;
        };
        if indexed.contains(name) {
            continue;
        }
        match read_pack_table(dst.backend(), dst.protection(), name) {
            Ok(table) => {
                dst.index()
                    .add_pack(name, object.size, table.version, &table.entries)?;
                adopted += 1;
            }
            Err(e) if e.is_corruption() => crate::progress::notice(&format!(
                "pack {name} in {} is not indexed and cannot be read ({e}); left alone",
                dst.root().display()
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(adopted)
}

/// Stores a finished pack in `dst`, then indexes it: never the other way round. Returns its
/// size (0 when empty: nothing stored).
// The same steps as the backup's `store_pack`; to become `Repo::commit_pack`.
fn commit_pack(dst: &Repo, pack: PackWriter) -> Result<u64> {
    if pack.is_empty() {
        return Ok(0);
    }
    let finished = pack.finish(dst.protection())?;
    let size = finished.bytes.len() as u64;
    dst.backend()
        .put(&pack_key(&finished.name)?, &finished.bytes)?;
    crate::crash::point("pack-stored");
    dst.index()
        .add_pack(&finished.name, size, finished.version, &finished.entries)?;
    crate::crash::point("pack-indexed");
    Ok(size)
}

/// Chunks read for one segment, grouped into compressed frames.
struct SegmentFrames {
    len: u64,
    frames: Vec<Frame>,
    /// Chunk references the destination had when the segment was read.
    known: u64,
    bytes_read: u64,
}

struct Frame {
    chunks: Vec<(ChunkId, u32)>,
    compression: Compression,
    stored: Vec<u8>,
}

/// The destination side of an identical copy: the open pack, its chunks, and the manifests
/// that wait for it.
struct Sender<'d> {
    dst: &'d Repo,
    /// Both repositories encrypted with the same naming keys: frames and manifests are
    /// opened with the source's keys and sealed with the destination's.
    reseal: bool,
    pack: PackWriter,
    /// Chunks in `pack`, not yet stored or indexed.
    pending: HashSet<ChunkId>,
    /// Snapshots whose manifests need `pack` stored first.
    queued: Vec<SnapshotSummary>,
}

impl Sender<'_> {
    /// Stores the open pack, then the manifests that waited for it.
    fn flush(&mut self, src: &Repo, report: &mut CopyReport) -> Result<()> {
        let capacity = self.pack_capacity();
        let fresh = PackWriter::new(capacity, self.dst.protection())?;
        let pack = std::mem::replace(&mut self.pack, fresh);
        let size = commit_pack(self.dst, pack)?;
        if size > 0 {
            report.packs_written += 1;
            report.bytes_written += size;
        }
        self.pending.clear();
        for snap in std::mem::take(&mut self.queued) {
            let copied = match self.reseal {
                true => reseal_manifest(src, self.dst, &snap),
                false => copy_manifest(src, self.dst, &snap),
            };
            let len = match copied {
                Ok(len) => len,
                Err(e) if e.is_corruption() => {
                    failed(report, &snap, e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            report.bytes_read += len;
            report.bytes_written += len;
            report.snapshots_copied += 1;
            report.snapshots.push(CopiedSnapshot {
                destination_snapshot_id: Some(snap.id.clone()),
                snapshot_id: snap.id,
                disk: snap.meta.disk,
                time: snap.meta.time,
                outcome: CopyOutcome::Copied,
                error: None,
            });
        }
        Ok(())
    }

    fn pack_capacity(&self) -> usize {
        let c = self.dst.config();
        c.pack_target_size as usize + c.chunker.max_chunk() as usize * 2 + (1 << 20)
    }
}

/// Copies snapshots between repositories that chunk alike: chunks the destination lacks,
/// then manifests byte for byte.
fn copy_identical(
    src: &Repo,
    dst: &Repo,
    reseal: bool,
    wanted: &[SnapshotSummary],
    present: &HashMap<String, SnapshotId>,
    report: &mut CopyReport,
    progress: &dyn Progress,
) -> Result<()> {
    let c = dst.config();
    let capacity = c.pack_target_size as usize + c.chunker.max_chunk() as usize * 2 + (1 << 20);
    let mut sender = Sender {
        dst,
        reseal,
        pack: PackWriter::new(capacity, dst.protection())?,
        pending: HashSet::new(),
        queued: Vec::new(),
    };
    let mut result = Ok(());
    for snap in wanted {
        if let Some(there) = present.get(snap.id.as_str()) {
            report.snapshots_skipped += 1;
            report.snapshots.push(skipped(snap, there));
            continue;
        }
        match send_chunks(src, &mut sender, snap, report, progress) {
            Ok(()) => {
                sender.queued.push(snap.clone());
                if sender.pending.is_empty() {
                    result = sender.flush(src, report);
                }
            }
            Err(e) if e.is_corruption() => failed(report, snap, e),
            Err(e) => {
                result = Err(e);
            }
        }
        if result.is_err() {
            break;
        }
    }
    // Also when cancelled: what was read is stored, and the manifests it completes.
    match result {
        Ok(()) | Err(Error::Cancelled(_)) => sender.flush(src, report).and(result),
        Err(e) => Err(e),
    }
}

/// Sends the chunks of `snap` that the destination lacks into the sender's packs. Segments
/// are read in parallel in small batches (reading verifies and decompresses, sending
/// compresses); the sender takes them in disk order.
fn send_chunks(
    src: &Repo,
    sender: &mut Sender<'_>,
    snap: &SnapshotSummary,
    report: &mut CopyReport,
    progress: &dyn Progress,
) -> Result<()> {
    let manifest = src.load_manifest(&snap.id)?;
    let segments = manifest.segment_count();
    let batch = (rayon::current_num_threads().max(1) * 2) as u64;
    let target = sender.dst.config().pack_target_size as usize;
    let level = sender.dst.config().zstd_level;
    progress.start(&format!("copy {}", snap.id.short()), snap.virtual_size);
    let mut first = 0;
    while first < segments {
        let end = first.saturating_add(batch).min(segments);
        let dst = sender.dst;
        let reading = SegmentReading {
            src,
            dst,
            manifest: &manifest,
            snapshot: &snap.id,
            pending: &sender.pending,
            level,
        };
        let reseal = sender.reseal;
        let read: Vec<Result<SegmentFrames>> = (first..end)
            .into_par_iter()
            .map_init(FrameCache::default, |cache, i| match reseal {
                true => take_segment_frames(&reading, i),
                false => read_segment(&reading, i, cache),
            })
            .collect();
        for seg in read {
            checkpoint(progress, "copy-segment")?;
            let seg = seg?;
            report.chunks_skipped += seg.known;
            report.bytes_read += seg.bytes_read;
            for f in seg.frames {
                // A chunk of this frame may have gone into the pack since it was read.
                let mut fresh = 0;
                for (id, _) in &f.chunks {
                    if !sender.pending.contains(id) && !sender.dst.readers().contains(id)? {
                        fresh += 1;
                    }
                }
                report.chunks_skipped += (f.chunks.len() - fresh) as u64;
                if fresh == 0 {
                    continue;
                }
                sender
                    .pack
                    .add_frame(dst.protection(), &f.chunks, &f.stored, f.compression)?;
                sender.pending.extend(f.chunks.iter().map(|c| c.0));
                report.chunks_sent += fresh as u64;
                if sender.pack.len() >= target {
                    sender.flush(src, report)?;
                }
            }
            progress.advance(seg.len);
        }
        first = end;
    }
    progress.finish();
    Ok(())
}

/// What the reading threads of [`send_chunks`] share: one snapshot's manifest at the source,
/// the destination, and the chunks already on their way into the destination's pack.
struct SegmentReading<'a> {
    src: &'a Repo,
    dst: &'a Repo,
    manifest: &'a Manifest<'a>,
    snapshot: &'a SnapshotId,
    /// Chunks in the sender's open pack (not yet in the destination's index).
    pending: &'a HashSet<ChunkId>,
    /// The destination's zstd level.
    level: i32,
}

/// Reads the chunks of segment `index` that the destination lacks (verified) and compresses
/// them into frames of consecutive new chunks, as a backup does.
fn read_segment(
    r: &SegmentReading<'_>,
    index: u64,
    cache: &mut FrameCache,
) -> Result<SegmentFrames> {
    let SegmentReading {
        src,
        dst,
        manifest,
        snapshot,
        pending,
        level,
    } = *r;
    let extents = manifest.segment(index)?;
    let mut out = SegmentFrames {
        len: extents.iter().map(|e| u64::from(e.len())).sum(),
        frames: Vec::new(),
        known: 0,
        bytes_read: 0,
    };
    let mut taken: HashSet<ChunkId> = HashSet::new();
    let mut raw: Vec<u8> = Vec::with_capacity(FRAME_TARGET_LEN);
    let mut chunks: Vec<(ChunkId, u32)> = Vec::new();
    let mut flush = |raw: &mut Vec<u8>, chunks: &mut Vec<(ChunkId, u32)>| -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (compression, stored) = compress(raw, level)?;
        out.frames.push(Frame {
            chunks: std::mem::take(chunks),
            compression,
            stored,
        });
        raw.clear();
        Ok(())
    };
    let mut known = 0u64;
    let base = index.saturating_mul(u64::from(manifest.segment_size));
    let starts = extents.iter().scan(base, |pos, e| {
        let at = *pos;
        *pos = at.saturating_add(u64::from(e.len()));
        Some(at)
    });
    for (e, at) in extents.iter().zip(starts) {
        let Extent::Chunk { id, len } = *e else {
            continue;
        };
        if taken.contains(&id) || pending.contains(&id) || dst.readers().contains(&id)? {
            known += 1;
            continue;
        }
        taken.insert(id);
        if !raw.is_empty() && raw.len() + len as usize > FRAME_TARGET_LEN {
            flush(&mut raw, &mut chunks)?;
        }
        crate::read::verified::with_chunk(src, snapshot, cache, &id, len, at, |data| {
            raw.extend_from_slice(data);
            Ok(())
        })?;
        chunks.push((id, len));
    }
    flush(&mut raw, &mut chunks)?;
    out.known = known;
    out.bytes_read = out
        .frames
        .iter()
        .flat_map(|f| f.chunks.iter())
        .map(|c| u64::from(c.1))
        .sum();
    Ok(out)
}

/// Takes the frames of `src` that hold the chunks of segment `index` the destination lacks,
/// opened and ready to be sealed again (both repositories encrypted, same naming keys): each
/// frame whole, once, without decompressing it.
fn take_segment_frames(r: &SegmentReading<'_>, index: u64) -> Result<SegmentFrames> {
    let SegmentReading {
        src,
        dst,
        manifest,
        snapshot,
        pending,
        ..
    } = *r;
    let extents = manifest.segment(index)?;
    let mut out = SegmentFrames {
        len: extents.iter().map(|e| u64::from(e.len())).sum(),
        frames: Vec::new(),
        known: 0,
        bytes_read: 0,
    };
    // Chunks of the frames taken so far: a frame often holds several chunks of a segment.
    let mut taken: HashSet<ChunkId> = HashSet::new();
    for e in &extents {
        let Extent::Chunk { id, .. } = *e else {
            continue;
        };
        if taken.contains(&id) || pending.contains(&id) || dst.readers().contains(&id)? {
            out.known += 1;
            continue;
        }
        let loc = src.locate_chunk(&id)?.ok_or_else(|| Error::MissingChunk {
            id: id.to_hex(),
            snapshot: snapshot.to_string(),
        })?;
        let frame = match open_frame(src.backend(), src.protection(), &loc.pack, &loc.record) {
            Ok(frame) => frame,
            // A prune at the source may have moved the chunk since the lookup (readers take no
            // lock): look once more before calling it damage, as every chunk read does.
            Err(e) if e.is_corruption() => match src.locate_chunk(&id)? {
                Some(moved) if moved != loc => {
                    open_frame(src.backend(), src.protection(), &moved.pack, &moved.record)?
                }
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        taken.extend(frame.chunks.iter().map(|c| c.0));
        out.bytes_read += u64::from(frame.raw_len);
        out.frames.push(Frame {
            chunks: frame.chunks,
            compression: frame.compression,
            stored: frame.stored,
        });
    }
    Ok(out)
}

/// Copies the sealed manifest of `snap` from `src` to `dst`, both encrypted with the same
/// naming keys: each block is opened with the source's keys and the plaintext sealed again
/// with the destination's, under the same id (the keyed hash of the plaintext, checked on
/// the way); then catalogues it. Returns its stored size at the destination.
fn reseal_manifest(src: &Repo, dst: &Repo, snap: &SnapshotSummary) -> Result<u64> {
    let key = snapshot_key(&snap.id);
    let location = format!("{key} in {}", src.location());
    let object = StoredObject {
        backend: src.backend(),
        key: key.clone(),
    };
    let plain = SealedObject::open(Box::new(object), src.protection(), &snap.id, &location)?;
    let size = plain.size()?;
    let mut out = dst.manifest_writer()?;
    let target = "snapshots/ (copied manifest)";
    let mut sealer = BlockSealer::new(dst.protection().clone())?;
    let mut hash = dst.protection().object_id_hasher();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(1 << 20) as usize;
        let piece = plain.read_at(at, n)?;
        hash.update(&piece);
        sealer.write(&mut out, &piece, target)?;
        at += n as u64;
    }
    if hex(hash.finalize().as_bytes()) != snap.id {
        return Err(Error::corrupt(
            location,
            0,
            "manifest does not hash to its name under the shared naming key (damaged, or the \
             repositories do not share their naming keys)",
        ));
    }
    let len = sealer.finish(&mut out, &snap.id, target)?;
    crate::crash::point("before-manifest");
    dst.commit_manifest(out, &snap.id, len)?;
    dst.index()
        .add_snapshot(&snap.id, &snap.meta, snap.virtual_size)?;
    Ok(len)
}

/// The stored bytes, for `dst`, of the record `id` of `kind` that `src` stores under
/// `<prefix><id>` by [`Protection::seal_named`] (a VM snapshot record): its plaintext opened
/// with `src`'s keys and sealed with `dst`'s under the same id. `None` when the two do not
/// name alike (the id would differ: the caller encodes the record for `dst`).
pub fn reseal_named(
    src: &Repo,
    dst: &Repo,
    kind: crate::crypto::ObjectKind,
    id: &str,
) -> Result<Option<Vec<u8>>> {
    if !same_chunk_naming(src.protection(), dst.protection()) {
        return Ok(None);
    }
    let key = match kind {
        crate::crypto::ObjectKind::VmSnapshot => crate::vm::record::key(id),
        other => {
            return Err(Error::Internal(format!(
                "{other:?} objects are not named by their content"
            )))
        }
    };
    let stored = src.backend().get(&key)?;
    let location = format!("{key} in {}", src.location());
    let plain = src
        .protection()
        .open_named(kind, id, &stored, &location, "record")?;
    let (bytes, again) = dst.protection().seal_named(kind, plain)?;
    if again != id {
        return Err(Error::Internal(format!(
            "{location}: named {again} at the destination although the naming keys are shared"
        )));
    }
    Ok(Some(bytes))
}

/// Copies the manifest of `snap` from `src` to `dst` byte for byte, checking on the way that
/// the bytes still hash to its id, and catalogues it. Returns its size.
fn copy_manifest(src: &Repo, dst: &Repo, snap: &SnapshotSummary) -> Result<u64> {
    let key = snapshot_key(&snap.id);
    let size = src.backend().size(&key)?;
    let mut out = dst.manifest_writer()?;
    let mut hash = blake3::Hasher::new();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(1 << 20) as usize;
        let piece = src.backend().get_range(&key, at, n)?;
        hash.update(&piece);
        out.write_all(&piece)
            .map_err(|e| Error::io("write", "snapshots/ (copied manifest)", e))?;
        at += n as u64;
    }
    if hex(hash.finalize().as_bytes()) != snap.id {
        return Err(Error::corrupt(
            format!("{} in {}", key, src.root().display()),
            0,
            "manifest does not hash to its name (damaged or altered)",
        ));
    }
    crate::crash::point("before-manifest");
    dst.commit_manifest(out, &snap.id, size)?;
    dst.index()
        .add_snapshot(&snap.id, &snap.meta, snap.virtual_size)?;
    Ok(size)
}

/// Records that `snap` was not copied because of `e` (damage at the source).
fn failed(report: &mut CopyReport, snap: &SnapshotSummary, e: Error) {
    report.snapshots_failed += 1;
    report.snapshots.push(CopiedSnapshot {
        snapshot_id: snap.id.clone(),
        destination_snapshot_id: None,
        disk: snap.meta.disk.clone(),
        time: snap.meta.time.clone(),
        outcome: CopyOutcome::Failed,
        error: Some(e.to_string()),
    });
    report.errors.push(e);
}

fn skipped(snap: &SnapshotSummary, there: &SnapshotId) -> CopiedSnapshot {
    CopiedSnapshot {
        snapshot_id: snap.id.clone(),
        destination_snapshot_id: Some(there.clone()),
        disk: snap.meta.disk.clone(),
        time: snap.meta.time.clone(),
        outcome: CopyOutcome::Skipped,
        error: None,
    }
}

/// Copies snapshots between repositories that chunk differently: each is read as a disk and
/// backed up into the destination.
fn copy_rechunked(
    src: &Repo,
    dst: &Repo,
    wanted: &[SnapshotSummary],
    present: &HashMap<String, SnapshotId>,
    report: &mut CopyReport,
    progress: &dyn Progress,
) -> Result<()> {
    for snap in wanted {
        if let Some(there) = present.get(snap.id.as_str()) {
            report.snapshots_skipped += 1;
            report.snapshots.push(skipped(snap, there));
            continue;
        }
        let packs_before = dst.index().pack_names()?.len() as u64;
        let copied = rechunk_one(src, dst, snap, progress).and_then(|done| {
            if !same_chunk_naming(src.protection(), dst.protection()) {
                verify_copy(dst, &done.0)?;
            }
            Ok(done)
        });
        let packs_after = dst.index().pack_names()?.len() as u64;
        report.packs_written += packs_after.saturating_sub(packs_before);
        match copied {
            Ok((id, stats, manifest_len)) => {
                report.snapshots_copied += 1;
                report.chunks_sent += stats.new_chunks;
                report.chunks_skipped += stats.chunks.saturating_sub(stats.new_chunks);
                report.bytes_read += stats.bytes_read;
                report.bytes_written += stats.bytes_added + manifest_len;
                report.snapshots.push(CopiedSnapshot {
                    snapshot_id: snap.id.clone(),
                    destination_snapshot_id: Some(id),
                    disk: snap.meta.disk.clone(),
                    time: snap.meta.time.clone(),
                    outcome: CopyOutcome::Rechunked,
                    error: None,
                });
            }
            Err(e) if e.is_corruption() => failed(report, snap, e),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads back every chunk of the copied snapshot `id` of `dst` (authenticated, keyed id
/// checked); damage there fails the copy of the snapshot.
fn verify_copy(dst: &Repo, id: &str) -> Result<()> {
    let summary = dst.resolve_snapshot(id, None)?;
    let options = crate::verify::VerifyOptions { record: false };
    let report =
        crate::verify::verify_snapshot(dst, &summary, &options, &crate::progress::NoProgress)?;
    match report.problems.first() {
        None => Ok(()),
        Some(p) => Err(Error::corrupt(
            format!("snapshot {id} (copied)"),
            p.offset,
            format!(
                "the copy does not read back: {} ({} problems); run `stackvault check \
                 --read-data` on the destination",
                p.what, report.problem_count
            ),
        )),
    }
}

/// Backs up the disk of `snap` into `dst`, then rewrites the new snapshot's metadata to
/// describe the original (disk, time, host, source) and its origin. Returns the new id, the
/// backup's counters and the manifest size.
fn rechunk_one(
    src: &Repo,
    dst: &Repo,
    snap: &SnapshotSummary,
    progress: &dyn Progress,
) -> Result<(SnapshotId, crate::format::manifest::BackupStats, u64)> {
    let manifest = src.load_manifest(&snap.id)?;
    let source = SnapshotSource::new(src, &snap.id, manifest);
    let options = BackupOptions {
        disk: snap.meta.disk.clone(),
        mode: BackupMode::Full,
        ..BackupOptions::default()
    };
    let made = backup(dst, &source, &options, progress)?;
    let interim = made.snapshot_id;
    // The backup's manifest says "backed up now, on this host": write the one that says what
    // the snapshot is, then remove the interim one (catalogue row first, as forget does).
    let meta = SnapshotMeta {
        disk: snap.meta.disk.clone(),
        time: snap.meta.time.clone(),
        kind: SnapshotKind::Full,
        parent: None,
        hostname: snap.meta.hostname.clone(),
        source: snap.meta.source.clone(),
        change_source: ChangeSource::copy_of(&snap.id),
        chunker: dst.config().chunker.describe(),
        stats: made.stats.clone(),
        root_digest: String::new(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    let (id, len) = relabel(dst, &interim, meta)?;
    if id != interim {
        dst.index().remove_snapshot(&interim)?;
        dst.backend().remove(&snapshot_key(&interim))?;
    }
    Ok((id, made.stats, len))
}

/// Writes a manifest with the extents of snapshot `id` of `dst` and the metadata `meta`,
/// catalogues it, and returns its id and size.
fn relabel(dst: &Repo, id: &str, mut meta: SnapshotMeta) -> Result<(SnapshotId, u64)> {
    let old = dst.load_manifest(id)?;
    let out = dst.manifest_writer()?;
    let mut writer = ManifestWriter::with_protection(
        out,
        "snapshots/ (copied manifest)",
        old.virtual_size,
        old.segment_size,
        dst.protection(),
    )?;
    for extents in old.segments() {
        writer.push_segment(&extents?)?;
    }
    let finished = writer.finish(&mut meta)?;
    dst.commit_manifest(finished.out, &finished.id, finished.len)?;
    dst.index()
        .add_snapshot(&finished.id, &meta, old.virtual_size)?;
    Ok((finished.id, finished.len))
}

/// A snapshot read as a disk: the extents of its manifest (zero runs are known zeros) and
/// bytes from its chunks, each verified (crc32, decompression, BLAKE3) as it is read.
pub struct SnapshotSource<'r> {
    repo: &'r Repo,
    snapshot: SnapshotId,
    manifest: Manifest<'r>,
    /// Recently used segments' extents: a backup asks for a segment's map, then reads it.
    segments: Mutex<KeptSegments>,
    /// Frame caches of the reading threads, taken and put back around each read.
    caches: Mutex<Vec<FrameCache>>,
}

/// Segments' extents a [`SnapshotSource`] keeps, by segment index.
type KeptSegments = Vec<(u64, Arc<Vec<Extent>>)>;

/// How many segments' extents a [`SnapshotSource`] keeps.
const KEPT_SEGMENTS: usize = 16;

impl<'r> SnapshotSource<'r> {
    pub fn new(repo: &'r Repo, snapshot: &SnapshotId, manifest: Manifest<'r>) -> Self {
        SnapshotSource {
            repo,
            snapshot: snapshot.clone(),
            manifest,
            segments: Mutex::new(Vec::new()),
            caches: Mutex::new(Vec::new()),
        }
    }

    fn segment(&self, index: u64) -> Result<Arc<Vec<Extent>>> {
        let kept = self
            .segments
            .lock()
            .ok()
            .and_then(|k| k.iter().find(|(i, _)| *i == index).map(|(_, e)| e.clone()));
        if let Some(extents) = kept {
            return Ok(extents);
        }
        let extents = Arc::new(self.manifest.segment(index)?);
        if let Ok(mut kept) = self.segments.lock() {
            if kept.len() >= KEPT_SEGMENTS {
                kept.remove(0);
            }
            kept.push((index, extents.clone()));
        }
        Ok(extents)
    }

    /// Calls `f(disk offset, extent)` for each extent overlapping `[offset, offset + len)`,
    /// in disk order.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, &Extent) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.manifest.virtual_size)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "read of {len} bytes at {offset} is past the end of snapshot {}",
                    self.snapshot.short()
                ))
            })?;
        let seg = u64::from(self.manifest.segment_size);
        let mut index = offset / seg;
        while index.checked_mul(seg).is_some_and(|start| start < end) {
            let mut at = index * seg;
            for e in self.segment(index)?.iter() {
                let e_end = at + u64::from(e.len());
                if e_end > offset && at < end {
                    f(at, e)?;
                }
                at = e_end;
            }
            index += 1;
        }
        Ok(())
    }
}

impl DiskSource for SnapshotSource<'_> {
    fn virtual_size(&self) -> u64 {
        self.manifest.virtual_size
    }

    fn info(&self) -> crate::format::manifest::SourceInfo {
        self.manifest.meta.source.clone()
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let end = offset.saturating_add(len);
        let mut out: Vec<SourceExtent> = Vec::new();
        self.walk(offset, len, |at, e| {
            let kind = match e {
                Extent::Zero { .. } => ExtentKind::Zero,
                Extent::Chunk { .. } => ExtentKind::Data,
            };
            let s = at.max(offset);
            let l = (at + u64::from(e.len())).min(end) - s;
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += l,
                _ => out.push(SourceExtent {
                    offset: s,
                    len: l,
                    kind,
                }),
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let mut cache = self
            .caches
            .lock()
            .ok()
            .and_then(|mut c| c.pop())
            .unwrap_or_default();
        let result = self.walk(offset, len, |at, e| {
            // The part of the extent inside the read, relative to the extent and to `buf`.
            let from = offset.saturating_sub(at);
            let to = (offset + len - at).min(u64::from(e.len()));
            let dest_at = (at + from - offset) as usize;
            let dest = buf
                .get_mut(dest_at..dest_at + (to - from) as usize)
                .ok_or_else(|| Error::Internal("snapshot read outside its buffer".into()))?;
            match *e {
                Extent::Zero { .. } => dest.fill(0),
                Extent::Chunk { id, len } => {
                    let put = |data: &[u8]| -> Result<()> {
                        let piece = data.get(from as usize..to as usize).ok_or_else(|| {
                            Error::corrupt(
                                format!("chunk {id}"),
                                0,
                                format!("{} bytes where the manifest says {len}", data.len()),
                            )
                        })?;
                        dest.copy_from_slice(piece);
                        Ok(())
                    };
                    let (repo, snapshot) = (self.repo, self.snapshot.as_str());
                    crate::read::verified::with_chunk(
                        repo, snapshot, &mut cache, &id, len, at, put,
                    )?;
                }
            }
            Ok(())
        });
        if let Ok(mut c) = self.caches.lock() {
            c.push(cache);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::source::{fill_from_map, open_source, SourceOptions};

    fn tempdir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))
    }

    /// A snapshot read as a disk gives back the disk's bytes at any offset and length, reads
    /// that start or end inside a chunk and cross segments included, and its map marks the
    /// disk's holes as zeros.
    #[test]
    fn a_snapshot_reads_back_as_its_disk() -> Result<()> {
        let dir = tempdir()?;
        let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
        // 9 MiB + 3 KiB: three segments, data with a 1 MiB hole across the first boundary.
        let mut disk = vec![0u8; 9 * 1024 * 1024 + 3072];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, b) in disk.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Runs of repeated bytes, so chunks compress and frames hold several chunks.
            *b = if i % 4096 < 2048 {
                (x >> 56) as u8
            } else {
                (i / 4096) as u8
            };
        }
        disk[(3 << 20)..(4 << 20) + 65536].fill(0);
        let path = dir.path().join("disk.img");
        std::fs::write(&path, &disk).map_err(|e| Error::io("write", &path, e))?;
        let source = open_source(&path, &SourceOptions::default())?;
        let options = BackupOptions {
            disk: "vm".into(),
            ..BackupOptions::default()
        };
        let id = backup(&repo, source.as_ref(), &options, &NoProgress)?.snapshot_id;
        let snap = SnapshotSource::new(&repo, &id, repo.load_manifest(&id)?);
        assert_eq!(snap.virtual_size(), disk.len() as u64);

        let size = disk.len() as u64;
        for (offset, len) in [
            (0, size),
            (1, 1),
            (5000, 70_000),
            ((4 << 20) - 10_000, 20_000),
            ((3 << 20) - 100, (1 << 20) + 65536 + 200),
            (size - 5000, 5000),
        ] {
            let mut buf = vec![0xaau8; len as usize];
            snap.read_at(offset, &mut buf)?;
            let want = &disk[offset as usize..(offset + len) as usize];
            assert!(buf == want, "read of {len} bytes at {offset} differs");
            // The map covers the range exactly, and filling from it gives the same bytes.
            let map = snap.extents(offset, len)?;
            assert_eq!(map.first().map(|e| e.offset), Some(offset));
            assert_eq!(map.iter().map(|e| e.len).sum::<u64>(), len);
            let mut filled = vec![0x55u8; len as usize];
            fill_from_map(&snap, &map, offset, &mut filled)?;
            assert!(filled == want, "map of {len} bytes at {offset} fills wrong");
        }
        // The hole is known: nothing is read for it.
        let hole = snap.extents(3 << 20, 1 << 20)?;
        assert_eq!(hole.len(), 1);
        assert_eq!(hole[0].kind, ExtentKind::Zero);
        // Past the end is refused, not read.
        let mut one = [0u8; 1];
        assert!(snap.read_at(size, &mut one).is_err());
        Ok(())
    }

    #[test]
    fn chunking_alike_ignores_compression_and_pack_size() {
        let a = RepoConfig::new([1; 16], 0, crate::ChunkerParams::DEFAULT);
        let mut b = RepoConfig::new([2; 16], 5, crate::ChunkerParams::DEFAULT);
        b.zstd_level = 19;
        b.pack_target_size *= 2;
        assert!(same_chunking(&a, &b));
        b.zero_run_min *= 2;
        assert!(!same_chunking(&a, &b));
        let c = RepoConfig::new([3; 16], 0, crate::ChunkerParams::FASTCDC);
        assert!(!same_chunking(&a, &c));
    }
}
