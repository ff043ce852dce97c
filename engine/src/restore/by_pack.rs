//! Restore from object storage in pack order: the disk is cut into regions (up to
//! [`REGION_BYTES`] of disk, at most [`REGION_CHUNKS`] chunks, whole segments); for each
//! region every chunk is looked up once, the frames holding them are grouped by pack and
//! coalesced into spans ([`plan_spans`]; by default the wanted part of a pack is one span), and
//! each span, one ranged GET, is streamed by one of [`FetchLimits::in_flight`] fetchers, which
//! reads it frame by frame as it arrives (dropping the bytes between wanted frames), decodes
//! each frame and writes every chunk of it to every place of the region that holds it, at
//! once. A pack is thus read once per
//! region however its chunks are scattered over the disk (gen2's packs hold the changes of the
//! whole disk), a frame is decoded once per region however many chunks of it the region needs
//! (deduplicated chunks included), and nothing decoded is held after its chunks are written.
//!
//! Memory, bounded by construction and independent of the disk's and the span's size: each
//! fetcher owns one frame as stored, one decoded frame (at most 256 KiB raw) and one write run
//! ([`RUN_MAX`], for chunks read on their own), all reused from span to span, and the HTTP
//! client's read buffer of the stream; at most [`WRITER_QUEUE`] decoded frames more wait for
//! the writer thread; the planner holds the chunk map of the region it plans, and the fetchers that of
//! the region before (a region's jobs wait in a queue of at most `in_flight` jobs, so planning
//! runs at most one region ahead of fetching). A region's map is about 80 bytes per chunk.
//! The planner looks a region's chunks up in one read transaction of the index
//! ([`crate::index::IndexReaders::batch`]): a transaction per lookup cost more CPU than
//! decompressing.
//!
//! Writes go straight from the decoded frame: the chunks of a frame that follow each other
//! on the disk (the usual case: a backup packs a disk's chunks in order) are one write, never
//! copied into a run first. A file target ([`DiskTarget::one_writer`]) gets them all from one
//! writer thread, fed by the fetchers through a short queue, since writes to one file from 32
//! threads wait on its inode lock; other targets are written by each fetcher.
//!
//! Writes reach the target out of disk order, so the target must accept writes anywhere
//! ([`DiskTarget::write_at`] from many threads at distinct offsets): a target that assembles
//! segments in memory (a page blob) bounds how much of the disk may be in progress at once
//! with [`DiskTarget::reorder_limit`], which caps the region. A segment is finished
//! ([`DiskTarget::segment_done`], progress advanced) when the last of its chunks is written.
//!
//! Damage: a frame that does not decode, a chunk that does not hash to its id, or the frames
//! of a span from where its pack turned out missing or short are read again chunk by chunk
//! through [`with_chunk`], which looks the chunk up once more (prune may have moved it) and
//! otherwise fails naming the pack and offset. A body cut off by the network is not damage:
//! the store's stream resumes it from the byte reached ([`crate::store::range_read`]). Any other failure (the store unreachable after its retries, a write error,
//! cancellation) stops every fetcher and is returned.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::fetch::{plan_spans, FetchLimits, Span};
use super::{DiskTarget, RestoreCounts, RUN_MAX};
use crate::error::{Error, Result};
use crate::format::manifest::{Extent, Manifest};
use crate::format::pack::{decode_frame_in_place, RecordLocation};
use crate::format::ChunkId;
use crate::index::{ChunkLocation, LookupBatch};
use crate::progress::Progress;
use crate::read::verified::{verified_chunk, with_chunk, FrameCache};
use crate::repo::Repo;
use crate::store::pack_key;
use crate::store::range_read::range_error;

/// Disk bytes of a region at most. A pack whose chunks are spread over the whole disk is read
/// in one span (or a few) per region: larger regions mean fewer requests, and a larger chunk
/// map held (two regions at most).
pub const REGION_BYTES: u64 = 1 << 30;

/// Chunks of a region at most, whatever the region's size: the map of 65,536 chunks is about
/// 5 MiB (a 1 GiB region of 16 KiB chunks).
pub const REGION_CHUNKS: usize = 65_536;

/// One place a chunk goes: `len` bytes at `disk`, in segment `segment` of its region, found
/// in its frame as `record` says.
#[derive(Clone, Debug)]
struct Use {
    disk: u64,
    len: u32,
    segment: u32,
    record: RecordLocation,
}

/// A segment of a region and the chunks of it not yet written.
#[derive(Debug)]
struct Segment {
    start: u64,
    len: u64,
    pending: AtomicU32,
}

/// The segments of one region, shared by the jobs that write into them.
#[derive(Debug)]
struct Region {
    segments: Vec<Segment>,
}

/// A fetcher's work: a span and, for each of its frames (in order), the places its chunks go;
/// `span: None` for chunks read on their own (a frame the planner could not place in a span).
struct Job {
    region: Arc<Region>,
    pack: String,
    span: Option<Span>,
    uses: Vec<Vec<Use>>,
}

/// What the planner and the fetchers share.
struct Shared<'a> {
    repo: &'a Repo,
    snapshot_id: &'a str,
    target: &'a dyn DiskTarget,
    progress: &'a dyn Progress,
    stop: AtomicBool,
    failure: Mutex<Option<Error>>,
    /// Decoded frames handed back by the writer thread, for the fetchers to decode into.
    spare_frames: Mutex<Vec<Vec<u8>>>,
}

impl Shared<'_> {
    /// A frame buffer the writer gave back, or a new one.
    fn spare_frame(&self) -> Vec<u8> {
        lock(&self.spare_frames).pop().unwrap_or_default()
    }

    /// Records `e` unless a failure came first, and tells everyone to stop.
    fn fail(&self, e: Error) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Segment `index` of `region` has one chunk more written; the last one finishes it.
    fn chunk_written(&self, region: &Region, index: u32) -> Result<()> {
        self.chunks_written(region, index, 1)
    }

    /// Segment `index` of `region` has `n` chunks more written; the last one finishes it.
    fn chunks_written(&self, region: &Region, index: u32, n: u32) -> Result<()> {
        let Some(s) = region.segments.get(index as usize) else {
            return Err(Error::Internal(format!(
                "chunk written into segment {index} of a region of {}",
                region.segments.len()
            )));
        };
        if s.pending.fetch_sub(n, Ordering::AcqRel) == n {
            self.target.segment_done(s.start, s.len)?;
            self.progress.advance(s.len);
        }
        Ok(())
    }
}

/// Restores `manifest` into `target` in pack order, region by region (see the module doc).
pub fn restore_by_pack(
    repo: &Repo,
    snapshot_id: &str,
    manifest: &Manifest,
    target: &dyn DiskTarget,
    progress: &dyn Progress,
    limits: &FetchLimits,
) -> Result<RestoreCounts> {
    let shared = Shared {
        repo,
        snapshot_id,
        target,
        progress,
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        spare_frames: Mutex::new(Vec::new()),
    };
    let fetchers = limits.in_flight.max(1);
    let (jobs, queue) = sync_channel::<Job>(fetchers);
    let queue = Mutex::new(queue);
    let counts = std::thread::scope(|scope| {
        let (shared, queue) = (&shared, &queue);
        // One writer thread for targets that want it (see `DiskTarget::one_writer`), fed
        // decoded frames through a short queue; else each fetcher writes its own frames.
        let (to_writer, writes) = sync_channel::<FrameWrites>(WRITER_QUEUE);
        let writer = target
            .one_writer()
            .then(|| scope.spawn(move || write_frames(shared, writes)));
        let to_writer = writer.as_ref().map(|_| to_writer);
        let threads: Vec<_> = (0..fetchers)
            .map(|_| {
                let to_writer = to_writer.clone();
                scope.spawn(move || fetcher(shared, queue, to_writer))
            })
            .collect();
        drop(to_writer);
        let planned = plan_regions(shared, manifest, limits, jobs);
        if planned.is_err() {
            // The fetchers stop after their current job instead of finishing the queue.
            shared.stop.store(true, Ordering::SeqCst);
        }
        let mut panicked = false;
        for t in threads {
            panicked |= t.join().is_err();
        }
        if panicked {
            shared.fail(Error::Internal("a restore fetcher panicked".into()));
        }
        // The fetchers are gone, and with them the writer's queue: it ends once it is empty.
        if writer.is_some_and(|w| w.join().is_err()) {
            shared.fail(Error::Internal("the restore writer panicked".into()));
        }
        planned
    });
    let failure = shared.failure.lock().ok().and_then(|mut f| f.take());
    match (failure, counts) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok(c)) => Ok(c),
    }
}

/// The planner (on the calling thread): region after region, looks every chunk up, zeroes the
/// zero runs, and queues the region's spans. Dropping `jobs` at the end lets the fetchers
/// finish. Returns the counts of everything planned.
fn plan_regions(
    shared: &Shared<'_>,
    manifest: &Manifest,
    limits: &FetchLimits,
    jobs: SyncSender<Job>,
) -> Result<RestoreCounts> {
    let seg = u64::from(manifest.segment_size).max(1);
    let count = manifest.segment_count();
    let region_bytes = REGION_BYTES.min(shared.target.reorder_limit()).max(seg);
    let mut counts = RestoreCounts::default();
    let mut next = 0u64;
    while next < count {
        let mut segments = Vec::new();
        let mut region_len = 0u64;
        let mut chunks = 0usize;
        // The region's chunks, looked up once its segments are read (see `locate_region`).
        let mut wanted: Vec<Wanted> = Vec::new();
        while next < count && region_len < region_bytes && chunks < REGION_CHUNKS {
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(counts);
            }
            crate::progress::checkpoint(shared.progress, "restore-segment")?;
            let start = next * seg;
            let index = next;
            next += 1;
            region_len += seg;
            if shared.target.has_segment(start) {
                shared
                    .progress
                    .advance(seg.min(manifest.virtual_size.saturating_sub(start)));
                continue;
            }
            let number = u32::try_from(segments.len())
                .map_err(|_| Error::Internal("too many segments in a region".into()))?;
            let mut offset = start;
            let mut pending = 0u32;
            for e in manifest.segment(index)? {
                match e {
                    Extent::Zero { len } => {
                        counts.zero_bytes += u64::from(len);
                        shared.target.zero_at(offset, u64::from(len))?;
                    }
                    Extent::Chunk { id, len } => {
                        wanted.push(Wanted {
                            id,
                            disk: offset,
                            len,
                            segment: number,
                        });
                        pending += 1;
                        chunks += 1;
                        counts.chunks += 1;
                        counts.bytes_written += u64::from(len);
                    }
                }
                offset += u64::from(e.len());
            }
            if pending == 0 {
                shared.target.segment_done(start, offset - start)?;
                shared.progress.advance(offset - start);
            }
            segments.push(Segment {
                start,
                len: offset - start,
                pending: AtomicU32::new(pending),
            });
        }
        let mut frames = locate_region(shared, wanted)?;
        let region = Arc::new(Region { segments });
        let spans = plan_spans(
            frames
                .iter()
                .filter_map(|((pack, _), uses)| Some((pack.as_str(), &uses.first()?.record))),
            limits,
        );
        for span in spans {
            let uses = span
                .frames
                .iter()
                .map(|r| {
                    frames
                        .remove(&(span.pack.clone(), r.offset))
                        .unwrap_or_default()
                })
                .collect();
            let job = Job {
                region: region.clone(),
                pack: span.pack.clone(),
                span: Some(span),
                uses,
            };
            if !queue_job(shared, &jobs, job) {
                return Ok(counts);
            }
        }
        // Frames no span could hold (a length the index got wrong): read chunk by chunk.
        for ((pack, _), uses) in frames.drain() {
            let job = Job {
                region: region.clone(),
                pack,
                span: None,
                uses: vec![uses],
            };
            if !queue_job(shared, &jobs, job) {
                return Ok(counts);
            }
        }
    }
    Ok(counts)
}

/// A chunk of a region, before it is looked up.
struct Wanted {
    id: ChunkId,
    disk: u64,
    len: u32,
    segment: u32,
}

/// Looks the chunks of a region up and groups them by frame: (pack, record offset) to the
/// places its chunks go, in disk order. The lookups run in the order of the chunk ids, in
/// one read transaction: ids are random, so in disk order every lookup read a leaf page of
/// the index that the page cache had dropped since (a 4 KiB read per chunk), while in id
/// order the leaves come one after the other; a chunk used many times is looked up once.
fn locate_region(
    shared: &Shared<'_>,
    mut wanted: Vec<Wanted>,
) -> Result<HashMap<(String, u64), Vec<Use>>> {
    wanted.sort_unstable_by_key(|w| w.id.0);
    let mut frames: HashMap<(String, u64), Vec<Use>> = HashMap::new();
    let mut batch = None;
    let mut last: Option<ChunkLocation> = None;
    for w in wanted {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let found = match last.take() {
            Some(l) if l.record.id == w.id => l,
            _ => locate(shared, &mut batch, &w.id)?
                .ok_or_else(|| shared.repo.missing_chunk(&w.id, shared.snapshot_id))?,
        };
        frames
            .entry((found.pack.clone(), found.record.offset))
            .or_default()
            .push(Use {
                disk: w.disk,
                len: w.len,
                segment: w.segment,
                record: found.record,
            });
        last = Some(found);
    }
    drop(batch);
    for uses in frames.values_mut() {
        uses.sort_unstable_by_key(|u| u.disk);
    }
    Ok(frames)
}

/// Where the index says chunk `id` is, looked up in the planner's read transaction `batch`
/// (opened here when there is none); a chunk it does not know ends the transaction and is
/// looked up once more by [`Repo::locate_chunk`], which brings a remote index up to date.
fn locate<'r>(
    shared: &Shared<'r>,
    batch: &mut Option<LookupBatch<'r>>,
    id: &ChunkId,
) -> Result<Option<ChunkLocation>> {
    if batch.is_none() {
        *batch = Some(shared.repo.readers().batch()?);
    }
    if let Some(b) = batch.as_ref() {
        if let Some(found) = b.lookup(id)? {
            return Ok(Some(found));
        }
    }
    *batch = None;
    shared.repo.locate_chunk(id)
}

/// Queues `job`; false when the restore is stopping (nobody takes jobs any more).
fn queue_job(shared: &Shared<'_>, jobs: &SyncSender<Job>, job: Job) -> bool {
    !shared.stop.load(Ordering::SeqCst) && jobs.send(job).is_ok()
}

/// A fetcher: takes jobs until the planner is done, or the restore stops.
fn fetcher(
    shared: &Shared<'_>,
    queue: &Mutex<Receiver<Job>>,
    to_writer: Option<SyncSender<FrameWrites>>,
) {
    let _drain = DrainOnExit { shared, queue };
    let mut buffers = Buffers::default();
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok(job) = lock(queue).recv() else {
            // The planner is done and the queue empty.
            return;
        };
        if let Err(e) = run_job(shared, job, &mut buffers, to_writer.as_ref()) {
            shared.fail(e);
        }
    }
}

/// A poisoned queue is still a queue: a fetcher that panicked never held it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whenever a fetcher leaves (stopped, failed or panicking), it takes every job still queued
/// until the planner has stopped, so that a planner waiting to queue one is never left
/// waiting; a panic stops the restore.
struct DrainOnExit<'a, 'b> {
    shared: &'a Shared<'b>,
    queue: &'a Mutex<Receiver<Job>>,
}

impl Drop for DrainOnExit<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared
                .fail(Error::Internal("a restore fetcher panicked".into()));
        }
        if self.shared.stop.load(Ordering::SeqCst) {
            let q = lock(self.queue);
            while q.recv().is_ok() {}
        }
    }
}

/// What a fetcher reuses from job to job: one frame as stored, one decoded, one write run.
#[derive(Default)]
struct Buffers {
    stored: Vec<u8>,
    frame: Vec<u8>,
    run: Vec<u8>,
    cache: FrameCache,
}

/// Streams a job's span, decoding its frames one by one as they arrive and writing their
/// chunks; what cannot be taken from the span is read chunk by chunk (see the module doc).
fn run_job(
    shared: &Shared<'_>,
    job: Job,
    buffers: &mut Buffers,
    to_writer: Option<&SyncSender<FrameWrites>>,
) -> Result<()> {
    crate::progress::checkpoint(shared.progress, "restore-segment")?;
    let Job {
        region,
        pack,
        span,
        uses,
    } = job;
    let Buffers {
        stored,
        frame,
        run,
        cache,
    } = buffers;
    let mut runs = Runs {
        shared,
        region: &region,
        start: 0,
        run,
        segments: Vec::new(),
    };
    runs.run.clear();
    let mut alone: Vec<Use> = Vec::new();
    match span {
        Some(span) => {
            let mut frames = span.frames.iter().zip(uses);
            stream_span(
                shared,
                &pack,
                &span,
                &mut frames,
                (stored, frame),
                (&region, to_writer),
                &mut alone,
            )?;
            if shared.stop.load(Ordering::SeqCst) {
                // Another fetcher failed: nothing more is read.
                return Ok(());
            }
            // Frames after a break in the stream.
            for (_, uses) in frames {
                alone.extend(uses);
            }
        }
        None => alone.extend(uses.into_iter().flatten()),
    }
    for u in alone {
        with_chunk(
            shared.repo,
            shared.snapshot_id,
            cache,
            &u.record.id,
            u.len,
            u.disk,
            |data| runs.put(shared.snapshot_id, &u, data),
        )?;
    }
    runs.flush()
}

/// Reads `span` of `pack` as one stream, frame by frame from `frames` (reading through the
/// bytes between them), and writes the chunks of each frame that decodes; the uses of a frame
/// that does not decode, or of a chunk that does not verify, go to `alone`. Stops taking
/// frames when the stream breaks with damage (a missing or short pack), leaving the rest in
/// `frames` for the caller; any other failure is returned.
#[allow(clippy::too_many_arguments)]
fn stream_span<'f>(
    shared: &Shared<'_>,
    pack: &str,
    span: &Span,
    frames: &mut impl Iterator<Item = (&'f RecordLocation, Vec<Use>)>,
    (stored, frame): (&mut Vec<u8>, &mut Vec<u8>),
    (region, to_writer): (&Arc<Region>, Option<&SyncSender<FrameWrites>>),
    alone: &mut Vec<Use>,
) -> Result<()> {
    let protection = shared.repo.protection();
    let location = format!("pack {pack}");
    let key = pack_key(pack)?;
    // Damage (read again chunk by chunk, which names it or finds a moved chunk) or a failure.
    let damage = |e: Error| match e {
        Error::NotFound { .. } => Ok(()),
        e if e.is_corruption() => Ok(()),
        e => Err(e),
    };
    let mut stream = match shared
        .repo
        .backend()
        .open_range(&key, span.offset, span.len)
    {
        Ok(stream) => stream,
        Err(e) => return damage(e),
    };
    let mut pos = span.offset;
    for (record, uses) in frames.by_ref() {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if shared.progress.is_cancelled() {
            return Err(Error::Cancelled("stopped at restore-segment".into()));
        }
        // Frames come in offset order without overlap (plan_spans); anything else is the
        // index's nonsense, read chunk by chunk.
        let (Some(skip), Some(len)) = (
            record.offset.checked_sub(pos),
            record
                .offset
                .checked_add(record.read_len())
                .map(|_| record.read_len()),
        ) else {
            alone.extend(uses);
            continue;
        };
        stored.clear();
        let read = std::io::copy(&mut (&mut stream).take(skip), &mut std::io::sink()).and_then(
            |skipped| {
                if skipped < skip {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                (&mut stream).take(len).read_to_end(stored)
            },
        );
        match read {
            Ok(n) if n as u64 == len => pos = record.offset + len,
            Ok(_) => {
                alone.extend(uses);
                return damage(range_error(
                    std::io::ErrorKind::UnexpectedEof.into(),
                    &key,
                    record.offset,
                ));
            }
            Err(e) => {
                alone.extend(uses);
                return damage(range_error(e, &key, pos));
            }
        }
        match decode_frame_in_place(stored, record, protection, pack, &location, frame) {
            Ok(()) => {}
            Err(e) if e.is_corruption() => {
                alone.extend(uses);
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut writes: Vec<FrameWrite> = Vec::new();
        for u in uses {
            let data = match verified_chunk(frame, &u.record, protection, pack) {
                Ok(data) => data,
                Err(e) if e.is_corruption() => {
                    alone.push(u);
                    continue;
                }
                Err(e) => return Err(e),
            };
            check_len(shared.snapshot_id, &u, data)?;
            let from = u.record.in_frame as usize;
            let to = from + data.len();
            match writes.last_mut() {
                Some(w) if w.joins(&u, from) => {
                    w.to = to;
                    w.chunks += 1;
                }
                _ => writes.push(FrameWrite {
                    disk: u.disk,
                    from,
                    to,
                    segment: u.segment,
                    chunks: 1,
                }),
            }
        }
        if writes.is_empty() {
            continue;
        }
        match to_writer {
            Some(to_writer) => {
                let spare = shared.spare_frame();
                let done = FrameWrites {
                    region: region.clone(),
                    frame: std::mem::replace(frame, spare),
                    writes,
                };
                to_writer
                    .send(done)
                    .map_err(|_| Error::Internal("the restore writer stopped early".into()))?;
            }
            None => write_frame(shared, region, frame, &writes)?,
        }
    }
    Ok(())
}

/// Decoded frames queued for the writer thread at most. A fetcher blocked on a full queue
/// holds the frame it sends and the spare it took to decode the next into, so the frames in
/// memory stay under `2 × in_flight + WRITER_QUEUE + 1` (256 KiB each: about 18 MiB with 32
/// GETs in flight).
const WRITER_QUEUE: usize = 8;

/// Chunks of one decoded frame that follow each other both on the disk and in the frame,
/// all in one segment: one write, straight from the frame (no copy into a run).
struct FrameWrite {
    disk: u64,
    /// The bytes of the frame written.
    from: usize,
    to: usize,
    segment: u32,
    chunks: u32,
}

impl FrameWrite {
    /// Whether `u`, found at `from` in the frame, continues this write.
    fn joins(&self, u: &Use, from: usize) -> bool {
        self.segment == u.segment
            && self.to == from
            && self.disk.checked_add((self.to - self.from) as u64) == Some(u.disk)
    }
}

/// A decoded frame and its writes, on their way to the writer thread.
struct FrameWrites {
    region: Arc<Region>,
    frame: Vec<u8>,
    writes: Vec<FrameWrite>,
}

/// The writer thread: writes every frame queued (nothing once the restore is stopping) and
/// hands its buffer back; ends when every fetcher is gone and the queue is empty.
fn write_frames(shared: &Shared<'_>, queue: Receiver<FrameWrites>) {
    for done in queue {
        if !shared.stop.load(Ordering::SeqCst) {
            if let Err(e) = write_frame(shared, &done.region, &done.frame, &done.writes) {
                shared.fail(e);
            }
        }
        lock(&shared.spare_frames).push(done.frame);
    }
}

/// Writes `writes` of a decoded `frame`, and counts their chunks written.
fn write_frame(
    shared: &Shared<'_>,
    region: &Region,
    frame: &[u8],
    writes: &[FrameWrite],
) -> Result<()> {
    for w in writes {
        let data = frame.get(w.from..w.to).ok_or_else(|| {
            Error::Internal(format!(
                "a write of bytes {}..{} of a frame of {}",
                w.from,
                w.to,
                frame.len()
            ))
        })?;
        shared.target.write_at(w.disk, data)?;
        shared.chunks_written(region, w.segment, w.chunks)?;
    }
    Ok(())
}

/// A chunk of another length than the manifest says is damage (the index and the manifest
/// disagree), named with the snapshot and the disk offset.
fn check_len(snapshot_id: &str, u: &Use, data: &[u8]) -> Result<()> {
    if data.len() == u.len as usize {
        return Ok(());
    }
    Err(Error::corrupt(
        format!("snapshot {snapshot_id}"),
        u.disk,
        format!(
            "chunk {} is {} bytes, manifest says {}",
            u.record.id,
            data.len(),
            u.len
        ),
    ))
}

/// Gathers chunks that follow each other on the disk, within one segment, into writes of up
/// to [`RUN_MAX`] bytes (a write per 16 KiB chunk makes the writers wait on the file's
/// lock), and finishes a chunk's segment only once the write holding it is done.
struct Runs<'a, 'b> {
    shared: &'a Shared<'b>,
    region: &'a Region,
    start: u64,
    run: &'a mut Vec<u8>,
    /// The segment of each chunk in `run`.
    segments: Vec<u32>,
}

impl Runs<'_, '_> {
    fn put(&mut self, snapshot_id: &str, u: &Use, data: &[u8]) -> Result<()> {
        check_len(snapshot_id, u, data)?;
        let joins = !self.run.is_empty()
            && self.segments.last() == Some(&u.segment)
            && self.start.checked_add(self.run.len() as u64) == Some(u.disk)
            && self.run.len() + data.len() <= RUN_MAX;
        if !joins {
            self.flush()?;
            self.start = u.disk;
        }
        self.run.extend_from_slice(data);
        self.segments.push(u.segment);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.run.is_empty() {
            self.shared.target.write_at(self.start, self.run)?;
            self.run.clear();
        }
        let segments = std::mem::take(&mut self.segments);
        for &s in &segments {
            self.shared.chunk_written(self.region, s)?;
        }
        // The allocation is kept for the next run.
        self.segments = segments;
        self.segments.clear();
        Ok(())
    }
}
