//! The backup pipeline: source → segments → zero filter → chunks → dedup → zstd → packs →
//! index → manifest.
//!
//! Segments are processed in parallel (rayon) in small ordered batches: each worker reads its
//! segment, splits it, hashes every chunk and compresses only chunks the repository does not
//! have. One writer thread receives the batches in disk order, appends new chunks to the open
//! pack, stores full packs and commits them to the index, and collects the disk map. Memory
//! is bounded by the batch size and the pack target size, never by the disk size.
//!
//! Order of durability: a pack is stored before its chunks are indexed, and the manifest is
//! written only after every pack it needs is indexed. A crash leaves at worst unreferenced
//! packs, never a snapshot that points at missing data.

use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::chunker::{Chunker, Piece};
use crate::error::{Error, Result};
use crate::format::manifest::{
    segment_count, segment_len, BackupStats, Extent, Manifest, SnapshotKind, SnapshotMeta,
};
use crate::format::pack::Compression;
use crate::format::{hex, ChunkId};
use crate::index::Index;
use crate::progress::Progress;
use crate::repo::{hostname, now_rfc3339, Repo};
use crate::source::{DiskSource, ExtentKind};
use crate::store::pack::{compress, PackWriter};
use crate::store::{pack_key, snapshot_key};

/// What to back up as.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Name of the disk (`web01-os`): snapshots of one disk form its history.
    pub disk: String,
}

/// The outcome of a backup, as printed by the CLI (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub snapshot_id: String,
    pub disk: String,
    pub kind: SnapshotKind,
    pub parent: Option<String>,
    pub source: String,
    pub source_format: String,
    pub virtual_size: u64,
    pub root_digest: String,
    #[serde(flatten)]
    pub stats: BackupStats,
    /// Virtual disk bytes per second of wall time, in MB/s (10^6).
    pub throughput_mb_s: f64,
}

/// A chunk that the repository did not have when its segment was processed.
struct NewChunk {
    id: ChunkId,
    raw_len: u32,
    compression: Compression,
    stored: Vec<u8>,
}

/// What a worker produced for one segment.
struct SegmentOutput {
    len: u64,
    extents: Vec<Extent>,
    new_chunks: Vec<NewChunk>,
    bytes_read: u64,
    unallocated: u64,
}

/// Backs up `source` into `repo` as a new full snapshot of `options.disk`.
pub fn backup(
    repo: &Repo,
    source: &dyn DiskSource,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    validate_disk_name(&options.disk)?;
    let _lock = repo.lock("backup")?;
    let started = Instant::now();
    let time = now_rfc3339();
    let config = repo.config().clone();
    let virtual_size = source.virtual_size();
    let segments = segment_count(virtual_size, config.segment_size);
    let chunker = Chunker::new(&config);
    // Ids the writer has accepted but not yet committed to the index.
    let pending: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());
    let batch_len = (rayon::current_num_threads() as u64 * 4).max(4);

    progress.start("backup", virtual_size);
    let written = std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<Vec<SegmentOutput>>>(1);
        let pending_ref = &pending;
        let writer = scope.spawn(move || write_loop(repo, rx, pending_ref, progress));
        let mut first = 0;
        while first < segments {
            let last = (first + batch_len).min(segments);
            let batch: Result<Vec<SegmentOutput>> = (first..last)
                .into_par_iter()
                .map(|i| process_segment(repo, source, &chunker, &pending, i))
                .collect();
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                break;
            }
            first = last;
        }
        drop(tx);
        writer.join().unwrap_or_else(|_| {
            Err(Error::InvalidArgument(
                "backup writer thread panicked".into(),
            ))
        })
    })?;
    progress.finish();

    let mut stats = written.stats;
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let info = source.info();
    let mut manifest = Manifest {
        meta: SnapshotMeta {
            disk: options.disk.clone(),
            time,
            kind: SnapshotKind::Full,
            parent: None,
            hostname: hostname(),
            source: info.clone(),
            change_source: "full-read".into(),
            chunker: config.chunker.describe(),
            stats: stats.clone(),
            root_digest: String::new(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        },
        virtual_size,
        segment_size: config.segment_size,
        segments: written.segments,
    };
    manifest.seal();
    let bytes = manifest.encode()?;
    let id = hex(blake3::hash(&bytes).as_bytes());
    // Every pack this manifest needs is stored and indexed; the manifest makes it a snapshot.
    crate::crash::point("before-manifest");
    repo.backend().put(&snapshot_key(&id), &bytes)?;
    crate::crash::point("manifest-stored");
    repo.index().add_snapshot(&id, &manifest)?;

    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(BackupReport {
        snapshot_id: id,
        disk: options.disk.clone(),
        kind: SnapshotKind::Full,
        parent: None,
        source: info.path,
        source_format: info.format,
        virtual_size,
        root_digest: manifest.meta.root_digest.clone(),
        stats,
        throughput_mb_s: virtual_size as f64 / secs / 1e6,
    })
}

/// Disk names become part of listings and file names: keep them printable and short.
fn validate_disk_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "disk name {name:?}: use 1 to 128 characters from A-Z a-z 0-9 - _ . : @"
        )))
    }
}

thread_local! {
    static SEGMENT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn process_segment(
    repo: &Repo,
    source: &dyn DiskSource,
    chunker: &Chunker,
    pending: &Mutex<HashSet<ChunkId>>,
    index: u64,
) -> Result<SegmentOutput> {
    crate::crash::point("chunk");
    let config = repo.config();
    let offset = index * u64::from(config.segment_size);
    let len = segment_len(source.virtual_size(), config.segment_size, index);
    let map = source.extents(offset, u64::from(len))?;
    let unallocated: u64 = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Zero)
        .map(|e| e.len)
        .sum();
    if unallocated == u64::from(len) {
        return Ok(SegmentOutput {
            len: u64::from(len),
            extents: vec![Extent::Zero { len }],
            new_chunks: Vec::new(),
            bytes_read: 0,
            unallocated,
        });
    }
    SEGMENT_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(len as usize, 0);
        let mut bytes_read = 0;
        for e in &map {
            let start = (e.offset - offset) as usize;
            let range = start..start + e.len as usize;
            match e.kind {
                ExtentKind::Zero => buf[range].fill(0),
                ExtentKind::Data => {
                    source.read_at(e.offset, &mut buf[range])?;
                    bytes_read += e.len;
                }
            }
        }
        let mut pieces = Vec::new();
        chunker.split(&buf, &mut pieces);
        let mut extents = Vec::with_capacity(pieces.len());
        let mut new_chunks: Vec<NewChunk> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Zero { len, .. } => extents.push(Extent::Zero { len: len as u32 }),
                Piece::Data { start, len } => {
                    let data = &buf[start..start + len];
                    let id = ChunkId::of(data);
                    extents.push(Extent::Chunk {
                        id,
                        len: len as u32,
                    });
                    let known = new_chunks.iter().any(|c| c.id == id)
                        || pending.lock().map(|p| p.contains(&id)).unwrap_or(false)
                        || repo.readers().contains(&id)?;
                    if !known {
                        let (compression, stored) = compress(data, config.zstd_level)?;
                        new_chunks.push(NewChunk {
                            id,
                            raw_len: len as u32,
                            compression,
                            stored,
                        });
                    }
                }
            }
        }
        Ok(SegmentOutput {
            len: u64::from(len),
            extents,
            new_chunks,
            bytes_read,
            unallocated,
        })
    })
}

struct Written {
    segments: Vec<Vec<Extent>>,
    stats: BackupStats,
}

/// Receives segment batches in disk order, stores new chunks in packs, commits them.
fn write_loop(
    repo: &Repo,
    rx: Receiver<Result<Vec<SegmentOutput>>>,
    pending: &Mutex<HashSet<ChunkId>>,
    progress: &dyn Progress,
) -> Result<Written> {
    let config = repo.config();
    let target = config.pack_target_size as usize;
    let mut index = repo.index();
    let mut pack = PackWriter::new(target + config.chunker.max_chunk() as usize * 2);
    let mut stats = BackupStats::default();
    let mut segments = Vec::new();

    for batch in rx {
        for seg in batch? {
            stats.bytes_read += seg.bytes_read;
            stats.unallocated_bytes += seg.unallocated;
            for e in &seg.extents {
                match e {
                    Extent::Zero { len } => stats.zero_bytes += u64::from(*len),
                    Extent::Chunk { .. } => stats.chunks += 1,
                }
            }
            for c in seg.new_chunks {
                let accepted = pending.lock().map(|p| p.contains(&c.id)).unwrap_or(false);
                if accepted || index.contains(&c.id)? {
                    continue;
                }
                pack.add(c.id, c.raw_len, &c.stored, c.compression);
                if let Ok(mut p) = pending.lock() {
                    p.insert(c.id);
                }
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(c.raw_len);
                if pack.len() >= target {
                    let full = std::mem::replace(&mut pack, PackWriter::new(target));
                    store_pack(repo, &mut index, pending, full, &mut stats)?;
                }
            }
            segments.push(seg.extents);
            progress.advance(seg.len);
        }
    }
    store_pack(repo, &mut index, pending, pack, &mut stats)?;
    Ok(Written { segments, stats })
}

/// Stores a finished pack, then indexes its chunks: never the other way round.
fn store_pack(
    repo: &Repo,
    index: &mut Index,
    pending: &Mutex<HashSet<ChunkId>>,
    pack: PackWriter,
    stats: &mut BackupStats,
) -> Result<()> {
    if pack.is_empty() {
        return Ok(());
    }
    let finished = pack.finish()?;
    repo.backend()
        .put(&pack_key(&finished.name), &finished.bytes)?;
    crate::crash::point("pack-stored");
    index.add_pack(
        &finished.name,
        finished.bytes.len() as u64,
        &finished.entries,
    )?;
    crate::crash::point("pack-indexed");
    stats.bytes_added += finished.bytes.len() as u64;
    if let Ok(mut p) = pending.lock() {
        for e in &finished.entries {
            p.remove(&e.id);
        }
    }
    Ok(())
}
