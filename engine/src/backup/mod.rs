//! The backup pipeline: source → segments → zero filter → chunks → dedup → zstd frames →
//! packs → index → manifest.
//!
//! Segments are processed in parallel (rayon) in small ordered batches: each worker reads its
//! segment, splits it, hashes every chunk and compresses only chunks the repository does not
//! have, grouped into frames of consecutive new chunks (see `frames`). One writer
//! thread receives the batches in disk order, appends new frames to the open pack, stores
//! full packs and commits them to the index, and collects the disk map. Memory
//! is bounded by the batch size and the pack target size, never by the disk size.
//!
//! Order of durability: a pack is stored before its chunks are indexed, and the manifest is
//! written only after every pack it needs is indexed. A crash leaves at worst unreferenced
//! packs, never a snapshot that points at missing data.

mod dedup;
mod frames;
mod pending_lock;
mod recheck;
mod streamed;
mod uploads;
pub use uploads::{DEFAULT_REMOTE_UPLOADS, UPLOADS_ENV};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::changes::{ChangeList, SegmentPlan};
use crate::chunker::{Chunker, Piece, Resplit};
use crate::error::{Error, Result};
use crate::format::manifest::{
    segment_count, segment_len, BackupStats, ChangeSource, ContainerFormat, Extent, Manifest,
    ManifestWriter, SnapshotKind, SnapshotMeta, SourceInfo,
};
use crate::format::{ChunkId, SnapshotId};
use crate::host::{hostname, now_rfc3339};
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::source::{fill_from_map, DiskSource, ExtentKind, SourceChanges};
use crate::store::pack::PackWriter;
use crate::store::ObjectWriter;
use dedup::Dedup;
use frames::{compress_frames, NewFrame, NewPiece};
use pending_lock::PendingLock;
use recheck::EarlyRecheck;

/// Which parent a backup reads relative to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackupMode {
    /// Full if the disk has no snapshot yet, else incremental from its latest snapshot.
    #[default]
    Auto,
    /// Read everything, record no parent.
    Full,
    /// Parent = the latest full snapshot of the disk.
    Differential,
}

/// What to back up as, and relative to what.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Name of the disk (`web01-os`): snapshots of one disk form its history.
    pub disk: String,
    pub mode: BackupMode,
    /// Explicit parent snapshot (id, prefix or `latest`), overriding the mode's choice.
    pub parent: Option<String>,
    /// Ranges changed since the parent (Azure page range diff or JSON list).
    pub changes: Option<ChangeList>,
    /// When change knowledge does not fit the parent, read everything instead of refusing.
    pub fallback_full: bool,
}

/// The outcome of a backup, as printed by the CLI (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub snapshot_id: SnapshotId,
    pub disk: String,
    pub kind: SnapshotKind,
    pub parent: Option<SnapshotId>,
    /// Where the knowledge of what changed came from (`full-read` when everything was read).
    pub change_source: ChangeSource,
    pub source: String,
    pub source_format: ContainerFormat,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: u64,
    pub root_digest: String,
    /// The counters as stored in the snapshot (nested, as in `show` and `snapshots`).
    pub stats: BackupStats,
    /// Bytes read from the source per second of wall time.
    pub throughput_bytes_per_second: u64,
}

/// What a worker produced for one segment.
struct SegmentOutput {
    len: u64,
    extents: Vec<Extent>,
    new_frames: Vec<NewFrame>,
    bytes_read: u64,
    unallocated: u64,
    /// Bytes not read thanks to change knowledge.
    skipped: u64,
}

/// Backs up `source` into `repo` as a new snapshot of `options.disk`.
pub fn backup(
    repo: &Repo,
    source: &dyn DiskSource,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    validate_disk_name(&options.disk)?;
    std::thread::scope(|scope| backup_in(scope, repo, source, options, progress))
}

/// [`backup`], its writer lock taken on a thread of `scope` (see `pending_lock`).
fn backup_in<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    repo: &'env Repo,
    source: &dyn DiskSource,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    repo.require_writable("backup")?;
    // The writer lock (on a remote store a lease: a create, then a look at the maintenance
    // lock, each a round trip) is taken while the parent is chosen and its manifest read from
    // the cache.
    let lock = PendingLock::start(scope, repo);
    let (dedup, prelude) = std::thread::scope(|scope| {
        // The condemned set of a shared store (a listing) is read meanwhile too: writers and
        // the two-phase prune that writes it never exclude each other, so the lock does not
        // order them (`format-spec/locks.md`, rule 2).
        let dedup = scope.spawn(|| Dedup::new(repo));
        let prelude = (|| {
            // Dedup against what other hosts stored too (a remote repository's cache may lag;
            // not again right after the open of the command, which just did it).
            repo.refresh_for_backup()?;
            let parent = select_parent(repo, options)?;
            let reading = plan_reading(repo, source, options, parent.as_ref())?;
            Ok((parent, reading))
        })();
        let dedup = dedup.join().unwrap_or_else(|_| {
            Err(Error::Internal(
                "the thread reading the condemned set panicked".into(),
            ))
        });
        (dedup, prelude)
    });
    // A local repository's index is the one its prune changes: nothing is deduplicated
    // before the lock keeps prune out. On a shared store the first pack's store waits for
    // it; a backup failing before then still reports the lock's error first.
    if !repo.is_remote() || prelude.is_err() || dedup.is_err() {
        if let Err(stands_for) = lock.wait() {
            return Err(lock.into_guard().err().unwrap_or(stands_for));
        }
    }
    let (parent, reading) = prelude?;
    let dedup = dedup?;
    let started = Instant::now();
    let time = now_rfc3339();
    let config = repo.config().clone();
    let virtual_size = source.virtual_size();
    let kind = match (&parent, options.mode) {
        (None, _) => SnapshotKind::Full,
        (Some(_), BackupMode::Differential) => SnapshotKind::Differential,
        (Some(_), _) => SnapshotKind::Incremental,
    };
    let segments = segment_count(virtual_size, config.segment_size);
    let chunker = Chunker::keyed(&config, repo.protection().chunker_key())?;
    let workers = rayon::current_num_threads().max(1);
    // Segments in flight beyond the writer: bounds memory, keeps every worker busy.
    let dispatch = Dispatch::new(segments, workers as u64 * 2);
    // Read before any thread starts: a bad setting must not leave workers behind.
    let uploads = uploads::uploads(repo.is_remote())?;
    // The manifest is streamed as segments are done, into a temporary object that becomes
    // the snapshot only once every pack it needs is stored and indexed.
    let object = repo.manifest_writer()?;
    let mut manifest = ManifestWriter::with_protection(
        object,
        "snapshots/ (new manifest)",
        virtual_size,
        config.segment_size,
        repo.protection(),
    )?;

    progress.start("backup", virtual_size);
    let data = std::thread::scope(|scope| {
        let (tx, rx) = channel::<(u64, Result<SegmentOutput>)>();
        for _ in 0..workers {
            let tx = tx.clone();
            let (dispatch, reading) = (&dispatch, &reading);
            let work = SegmentWork {
                repo,
                source,
                chunker: &chunker,
                dedup: &dedup,
            };
            let lock = &lock;
            scope.spawn(move || {
                while let Some(i) = dispatch.take() {
                    let len = segment_len(virtual_size, config.segment_size, i);
                    // A lock that could not be taken ends the backup within a segment, not
                    // at its first pack (an incremental may store its first late).
                    if let Err(e) = lock.poll() {
                        let _ = tx.send((i, Err(e)));
                        break;
                    }
                    // A panic here would leave segment `i` unsent: the writer would wait for
                    // it, and the other workers for the writer, for ever. It becomes the
                    // segment's error instead, which ends the backup like any other.
                    let out = panic_as_error(&format!("a backup worker (segment {i})"), || {
                        match reading.plan_of(i) {
                            SegmentPlan::Read => reading.parent_extents(i).and_then(|parent| {
                                if reading.plan.is_some() && reading.parent.is_some() {
                                    work.changed(i, &parent, &reading.changed)
                                } else {
                                    work.whole(i, &parent)
                                }
                            }),
                            // A zero segment shorter than a hole is a chunk of zeros when read:
                            // read it, so that the disk map stays a function of the content.
                            SegmentPlan::Zero if len < config.zero_run_min => work.whole(i, &[]),
                            plan => {
                                reading.without_reading(plan, virtual_size, config.segment_size, i)
                            }
                        }
                    });
                    if tx.send((i, out)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Packs are stored and indexed by their own threads, so that the writer (and behind
        // it the workers) never waits for a pack's upload, fsync or index commit. A
        // rendezvous channel: a pack is handed over only to an uploader free to take it.
        let (pack_tx, pack_rx) = sync_channel::<PackWriter>(0);
        // Pack buffers go round between the writer and the uploaders, a fixed number of them
        // (`uploads.rs`): the writer fills one only when an uploader has given one back, so
        // memory holds that many packs however the upload keeps up. Reused, never freed:
        // allocating and freeing pack-sized buffers makes glibc's adaptive mmap threshold
        // churn its heap (measured 2x slower, +50% RSS). They start empty and are allocated
        // at first use.
        let (spare_tx, spare_rx) = channel::<Vec<u8>>();
        for _ in 0..uploads.buffers {
            spare_tx
                .send(Vec::new())
                .map_err(|_| Error::Internal("pack buffers".into()))?;
        }
        let dedup_ref = &dedup;
        let lock = &lock;
        let store =
            scope.spawn(move || store_loop(repo, pack_rx, dedup_ref, lock, uploads, spare_tx));
        let writer = Writer {
            repo,
            dispatch: &dispatch,
            dedup: &dedup,
            packs: &pack_tx,
            spare: &spare_rx,
            progress,
        };
        // A panic would leave the workers waiting for the window to move, and the scope
        // waiting for them, for ever: it becomes the backup's error instead.
        let result = panic_as_error("the backup's writer", || writer.run(rx, &mut manifest));
        // On error, release workers waiting for the window to move.
        dispatch.stop();
        drop(pack_tx);
        // Every deduplication decision is made: the re-check's reads go out while the last
        // packs are stored (see `recheck`).
        let early = match &result {
            Ok(_) => EarlyRecheck::start(repo, &dedup),
            Err(_) => None,
        };
        let stored = store
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("pack store thread panicked".into())));
        // A store failure (disk full...) explains a writer failure, not the other way round.
        let (packs_stored, bytes_added) = stored?;
        let mut stats = result.map_err(|e| match e {
            // The packs stored so far are indexed: the next backup deduplicates against them.
            Error::Cancelled(_) => Error::Cancelled(format!(
                "backup stopped; {packs_stored} packs stored are reused by the next backup"
            )),
            e => e,
        })?;
        stats.bytes_added = bytes_added;
        Ok::<_, Error>((stats, early))
    });
    // A lock that could not be taken is what stopped the data phase, if anything did.
    let lock = lock.into_guard()?;
    let (mut stats, early) = data?;
    progress.finish();

    stats.duration_ms = started.elapsed().as_millis() as u64;
    let info = source.info();
    let parent_id = parent.map(|p| p.id);
    let mut meta = SnapshotMeta {
        disk: options.disk.clone(),
        time,
        kind,
        parent: parent_id.clone(),
        hostname: hostname(),
        source: info.clone(),
        change_source: reading.label.clone(),
        chunker: config.chunker.describe(),
        stats: stats.clone(),
        root_digest: String::new(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    // Every pack this manifest needs is stored and indexed; the manifest makes it a snapshot,
    // but only while the lock still keeps maintenance out (a lease can run out).
    crate::crash::point("before-manifest");
    if let Some(used) = dedup.used_packs() {
        // A shared store: no pack this manifest needs may have been condemned meanwhile, nor
        // deleted (see `shared_store_recheck`); the reading made during the last uploads
        // settles it when it found nothing to do.
        let settled = match &early {
            Some(early) => early.settles(repo, parent_id.as_deref())?,
            None => false,
        };
        if !settled {
            shared_store_recheck(repo, used, parent_id.as_deref())?;
        }
    }
    lock.ensure_held()?;
    let finished = manifest.finish(&mut meta)?;
    let id = finished.id;
    repo.commit_manifest(finished.out, &id, finished.len)?;
    crate::crash::point("manifest-stored");
    repo.index().add_snapshot(&id, &meta, virtual_size)?;

    let throughput_bytes_per_second =
        crate::progress::bytes_per_second(stats.bytes_read, started.elapsed());
    Ok(BackupReport {
        snapshot_id: id,
        disk: options.disk.clone(),
        kind,
        parent: parent_id,
        change_source: reading.label,
        source: info.path,
        source_format: info.format,
        virtual_size,
        root_digest: meta.root_digest,
        stats,
        throughput_bytes_per_second,
    })
}

/// Runs `work` on a backup thread, a panic becoming its error: a thread that died would leave
/// the others waiting for what it was to send (a segment, a pack buffer) for ever.
fn panic_as_error<T>(who: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        Err(Error::Internal(format!(
            "{who} panicked (see the message above); nothing was published: please report it"
        )))
    })
}

/// The re-check before the manifest on a shared store (`format-spec/locks.md`, rule 2):
/// packs condemned meanwhile are copied ([`crate::maintain::condemn::before_manifest`]), and
/// a listing of `packs/` made at the same time (after the condemned set was first read, so
/// after every deduplication decision began) must still hold every pack the backup used.
/// A pack missing there was deleted by a prune whose record the backup never saw (record
/// and pack gone before the backup read the condemned set, after its cache last listed the
/// packs): the backup fails without publishing, and the next run's catch-up drops the pack.
fn shared_store_recheck(
    repo: &Repo,
    mut used: std::collections::HashSet<String>,
    parent: Option<&str>,
) -> Result<()> {
    let before = used.clone();
    let (rescued, listed) = std::thread::scope(|scope| {
        let listing = scope.spawn(|| repo.backend().list("packs/"));
        let rescued = crate::maintain::condemn::before_manifest(repo, &mut used, parent);
        let listed = listing
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the packs listing panicked".into())));
        (rescued, listed)
    });
    rescued?;
    let stored: std::collections::HashSet<String> = listed?
        .iter()
        .filter_map(|k| crate::index::delta::pack_of_pack_key(k).map(str::to_owned))
        .collect();
    // Packs the rescue wrote are newer than the listing; the ones it kept are not.
    let mut gone: Vec<&String> = used
        .intersection(&before)
        .filter(|p| !stored.contains(*p))
        .collect();
    gone.sort();
    match gone.first() {
        None => Ok(()),
        Some(first) => Err(Error::Locked(format!(
            "{} pack(s) this backup deduplicated against (pack {first}, ...) were deleted \
             by a prune while it ran; nothing was published: run the backup again (it \
             stores those chunks anew)",
            gone.len()
        ))),
    }
}

/// The parent a backup is relative to, if any.
fn select_parent(repo: &Repo, options: &BackupOptions) -> Result<Option<SnapshotSummary>> {
    if options.mode == BackupMode::Full {
        if options.parent.is_some() {
            return Err(Error::Usage(
                "a full backup has no parent: drop --parent or --full".into(),
            ));
        }
        return Ok(None);
    }
    if let Some(query) = &options.parent {
        let parent = repo.resolve_snapshot(query, Some(&options.disk))?;
        return Ok(Some(parent));
    }
    let history = repo.snapshots(Some(&options.disk))?;
    Ok(match options.mode {
        BackupMode::Differential => history
            .into_iter()
            .rev()
            .find(|s| s.meta.kind == SnapshotKind::Full),
        _ => history.into_iter().last(),
    })
}

/// Which segments to read, and where the parent's extents come from for the others.
struct ReadingPlan<'r> {
    /// `None`: read every segment.
    plan: Option<Vec<SegmentPlan>>,
    /// Changed bytes (disk offsets, whole 4 KiB blocks, sorted, merged) when `plan` is set.
    changed: Vec<(u64, u64)>,
    parent: Option<Manifest<'r>>,
    label: ChangeSource,
}

impl<'r> ReadingPlan<'r> {
    fn full_read(label: ChangeSource, parent: Option<Manifest<'r>>) -> Self {
        ReadingPlan {
            plan: None,
            changed: Vec::new(),
            parent,
            label,
        }
    }

    /// The parent snapshot's extents of a segment (none past the end of a smaller parent
    /// disk), whatever is read: a chunk among them is in the repository, so finding it there
    /// spares an index lookup.
    fn parent_extents(&self, segment: u64) -> Result<Vec<Extent>> {
        match &self.parent {
            Some(p) if segment < p.segment_count() => p.segment(segment),
            _ => Ok(Vec::new()),
        }
    }

    fn plan_of(&self, segment: u64) -> SegmentPlan {
        self.plan
            .as_ref()
            .and_then(|p| p.get(segment as usize).copied())
            .unwrap_or(SegmentPlan::Read)
    }

    /// The output of a segment that is not read: the parent's extents, or a hole.
    fn without_reading(
        &self,
        plan: SegmentPlan,
        virtual_size: u64,
        segment_size: u32,
        index: u64,
    ) -> Result<SegmentOutput> {
        let len = segment_len(virtual_size, segment_size, index);
        let extents = match plan {
            SegmentPlan::CopyParent => self.parent_extents(index)?,
            _ => Vec::new(),
        };
        // A change list checked against the parent's size always finds the parent's segment.
        let extents = if extents.is_empty() {
            vec![Extent::Zero { len }]
        } else {
            extents
        };
        Ok(SegmentOutput {
            len: u64::from(len),
            extents,
            new_frames: Vec::new(),
            bytes_read: 0,
            unallocated: 0,
            skipped: u64::from(len),
        })
    }
}

/// Decides what to read: a change list first, then the source's own change knowledge
/// (differencing containers), else everything.
fn plan_reading<'r>(
    repo: &'r Repo,
    source: &dyn DiskSource,
    options: &BackupOptions,
    parent: Option<&SnapshotSummary>,
) -> Result<ReadingPlan<'r>> {
    let Some(parent) = parent else {
        if options.changes.is_some() {
            return Err(Error::InvalidArgument(format!(
                "--changed-ranges needs a parent snapshot, and disk {} has none yet",
                options.disk
            )));
        }
        return Ok(ReadingPlan::full_read(ChangeSource::full_read(), None));
    };
    let parent_manifest = repo.load_manifest(&parent.id)?;
    let (list, label) = match &options.changes {
        Some(list) => (list.clone(), ChangeSource::ChangedRanges),
        None => match source.changes_since(&parent.meta.source)? {
            SourceChanges::Unknown => {
                return Ok(ReadingPlan::full_read(
                    ChangeSource::full_read(),
                    Some(parent_manifest),
                ))
            }
            SourceChanges::Changes(list) => (list, source.changes_label()),
            SourceChanges::Mismatch(why) if options.fallback_full => {
                return Ok(ReadingPlan::full_read(
                    ChangeSource::full_read_because(why),
                    Some(parent_manifest),
                ))
            }
            SourceChanges::Mismatch(why) => {
                return Err(Error::InvalidArgument(format!(
                    "{why}; pass --fallback-full to read the whole disk instead"
                )))
            }
        },
    };
    let segment_size = repo.config().segment_size;
    let planned = check_base(&list, parent, &source.info())
        .and_then(|()| list.plan(source.virtual_size(), parent.virtual_size, segment_size));
    match planned {
        Ok(plan) => Ok(ReadingPlan {
            plan: Some(plan),
            changed: list.changed_blocks(source.virtual_size()),
            parent: Some(parent_manifest),
            label,
        }),
        Err(e) if options.fallback_full => Ok(ReadingPlan::full_read(
            ChangeSource::full_read_because(e),
            Some(parent_manifest),
        )),
        Err(Error::InvalidArgument(why)) => Err(Error::InvalidArgument(format!(
            "{why}; pass --fallback-full to read the whole disk instead"
        ))),
        Err(e) => Err(e),
    }
}

/// A change list that names its base must be relative to `parent`: its id (or a prefix of
/// at least 8 digits), or the blob snapshot the parent read from the same blob as `source`.
fn check_base(list: &ChangeList, parent: &SnapshotSummary, source: &SourceInfo) -> Result<()> {
    let Some(base) = list.base() else {
        return Ok(());
    };
    if base == parent.id || (base.len() >= 8 && parent.id.starts_with(base)) {
        return Ok(());
    }
    let recorded = parent
        .meta
        .source
        .blob
        .as_ref()
        .and_then(|b| b.snapshot.as_deref());
    let same_blob = crate::azure::without_query(&parent.meta.source.path)
        == crate::azure::without_query(&source.path);
    if recorded == Some(base) && same_blob {
        return Ok(());
    }
    let short = parent.id.short();
    let parent_source = match recorded {
        Some(t) if same_blob => format!("was read from blob snapshot {t}"),
        Some(t) => format!(
            "was read from blob snapshot {t} of {}",
            parent.meta.source.path
        ),
        None => format!(
            "was read from {}, not a blob snapshot",
            parent.meta.source.path
        ),
    };
    Err(Error::InvalidArgument(format!(
        "change list refused: it is relative to {base}, but the parent snapshot {short} \
         {parent_source}; give the changes since the parent's source, or --parent the snapshot \
         taken from {base}"
    )))
}

/// Disk names become part of listings and file names: keep them printable and short.
pub fn validate_disk_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "disk name {name:?}: use 1 to 128 characters from A-Z a-z 0-9 - _ . : @"
        )))
    }
}

thread_local! {
    static SEGMENT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What every worker shares: where segments come from, how they are cut, and which chunks
/// the repository has.
struct SegmentWork<'a> {
    repo: &'a Repo,
    source: &'a dyn DiskSource,
    chunker: &'a Chunker,
    dedup: &'a Dedup<'a>,
}

impl SegmentWork<'_> {
    /// Reads segment `index` whole, splits it and keeps its new chunks; `parent` is the parent's
    /// extents of the segment (empty without a parent).
    fn whole(&self, index: u64, parent: &[Extent]) -> Result<SegmentOutput> {
        let SegmentWork {
            repo,
            source,
            chunker,
            dedup,
        } = *self;
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
        // The shortcut must give what the chunker gives for the same bytes, or containers of one
        // disk would differ: zeros shorter than the zero-run minimum (a short last segment) are
        // a data chunk whether the source knew them unallocated or not.
        if unallocated == u64::from(len) && len >= config.zero_run_min {
            return Ok(SegmentOutput {
                len: u64::from(len),
                extents: vec![Extent::Zero { len }],
                new_frames: Vec::new(),
                bytes_read: 0,
                unallocated,
                skipped: 0,
            });
        }
        SEGMENT_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(len as usize, 0);
            // A local source is read, split and hashed window by window (see `streamed`).
            let streamed = if source.small_reads_are_cheap() {
                streamed::read_split_hash(
                    source,
                    &map,
                    offset,
                    &mut buf,
                    chunker,
                    repo.protection(),
                )?
            } else {
                None
            };
            let (bytes_read, pieces, ids) = match streamed {
                Some(s) => (s.bytes_read, s.pieces, s.ids),
                None => {
                    let bytes_read = fill_from_map(source, &map, offset, &mut buf)?;
                    let mut pieces = Vec::new();
                    chunker.split(&buf, &mut pieces);
                    (bytes_read, pieces, Vec::new())
                }
            };
            let layout = pieces.into_iter().map(Resplit::New);
            let (extents, new_frames) = assemble(repo, dedup, parent, &buf, layout, ids)?;
            Ok(SegmentOutput {
                len: u64::from(len),
                extents,
                new_frames,
                bytes_read,
                unallocated,
                skipped: 0,
            })
        })
    }

    /// An incremental backup of one segment of which only `changed` (disk offsets, whole 4 KiB
    /// blocks) differs from the parent's `parent` extents: reads and splits only around the
    /// changes (see [`Chunker::resplit`]) and keeps the parent's extents elsewhere.
    fn changed(
        &self,
        index: u64,
        parent: &[Extent],
        changed: &[(u64, u64)],
    ) -> Result<SegmentOutput> {
        let SegmentWork {
            repo,
            source,
            chunker,
            dedup,
        } = *self;
        crate::crash::point("chunk");
        let config = repo.config();
        let offset = index * u64::from(config.segment_size);
        let len = segment_len(source.virtual_size(), config.segment_size, index);
        let end = offset + u64::from(len);
        let mut pieces = Vec::with_capacity(parent.len());
        let mut pos = 0usize;
        for e in parent {
            let l = e.len() as usize;
            pieces.push(match e {
                Extent::Zero { .. } => Piece::Zero { start: pos, len: l },
                Extent::Chunk { .. } => Piece::Data { start: pos, len: l },
            });
            pos += l;
        }
        let first = changed.partition_point(|&(_, e)| e <= offset);
        let relative: Vec<(usize, usize)> = changed[first..]
            .iter()
            .take_while(|&&(s, _)| s < end)
            .map(|&(s, e)| {
                (
                    (s.max(offset) - offset) as usize,
                    (e.min(end) - offset) as usize,
                )
            })
            .collect();
        SEGMENT_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(len as usize, 0);
            let (mut bytes_read, mut unallocated, mut loaded) = (0u64, 0u64, 0u64);
            let mut load = |start: usize, dest: &mut [u8]| -> Result<()> {
                let at = offset + start as u64;
                let map = source.extents(at, dest.len() as u64)?;
                bytes_read += fill_from_map(source, &map, at, dest)?;
                unallocated += map
                    .iter()
                    .filter(|e| e.kind == ExtentKind::Zero)
                    .map(|e| e.len)
                    .sum::<u64>();
                loaded += dest.len() as u64;
                Ok(())
            };
            let layout = chunker.resplit(&pieces, &relative, &mut buf, &mut load)?;
            let (extents, new_frames) = assemble(repo, dedup, parent, &buf, layout, Vec::new())?;
            Ok(SegmentOutput {
                len: u64::from(len),
                extents,
                new_frames,
                bytes_read,
                unallocated,
                skipped: u64::from(len) - loaded,
            })
        })
    }
}

/// Turns a segment's layout into its extents, hashing the new pieces of `buf`; chunks the
/// repository does not have yet are compressed into frames. `parent` is the parent's extents
/// of the segment: what [`Resplit::Parent`] indexes, and chunks known without a lookup.
/// `ids` are the ids of the layout's new data pieces in order when they were hashed already
/// (`streamed`), else empty.
fn assemble(
    repo: &Repo,
    dedup: &Dedup,
    parent: &[Extent],
    buf: &[u8],
    layout: impl IntoIterator<Item = Resplit>,
    ids: Vec<ChunkId>,
) -> Result<(Vec<Extent>, Vec<NewFrame>)> {
    let mut ids = ids.into_iter();
    let mut seen = dedup.segment(parent);
    let mut extents = Vec::new();
    let mut new_chunks: Vec<NewPiece> = Vec::new();
    for part in layout {
        match part {
            Resplit::Parent(i) => extents.push(parent[i]),
            Resplit::New(Piece::Zero { len, .. }) => extents.push(Extent::Zero { len: len as u32 }),
            Resplit::New(Piece::Data { start, len }) => {
                let id = match ids.next() {
                    Some(id) => id,
                    None => repo.protection().chunk_id(&buf[start..start + len]),
                };
                extents.push(Extent::Chunk {
                    id,
                    len: len as u32,
                });
                if seen.is_new(&id)? {
                    new_chunks.push(NewPiece { id, start, len });
                }
            }
        }
    }
    let new_frames = compress_frames(buf, &new_chunks, repo.config().zstd_level, seen.since)?;
    Ok((extents, new_frames))
}

/// Hands segment indices to workers, never more than `window` ahead of the writer, so memory
/// stays bounded however the work is spread.
struct Dispatch {
    state: Mutex<DispatchState>,
    moved: Condvar,
    window: u64,
    total: u64,
}

struct DispatchState {
    next: u64,
    written: u64,
    stopped: bool,
}

impl Dispatch {
    fn new(total: u64, window: u64) -> Self {
        Dispatch {
            state: Mutex::new(DispatchState {
                next: 0,
                written: 0,
                stopped: false,
            }),
            moved: Condvar::new(),
            window: window.max(1),
            total,
        }
    }

    /// The next segment to process, waiting while the window is full; `None` when done.
    fn take(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.stopped || s.next >= self.total {
                return None;
            }
            if s.next < s.written + self.window {
                s.next += 1;
                return Some(s.next - 1);
            }
            s = self.moved.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The writer has consumed segments `0..written`.
    fn written(&self, written: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.written = written;
        self.moved.notify_all();
    }

    fn stop(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.stopped = true;
        self.moved.notify_all();
    }
}

/// The writer thread's side of a backup: the one place that appends to packs.
struct Writer<'a> {
    repo: &'a Repo,
    /// Told how far the writer got, so workers stay within their window.
    dispatch: &'a Dispatch,
    dedup: &'a Dedup<'a>,
    /// Full packs go to the store thread...
    packs: &'a SyncSender<PackWriter>,
    /// ...and their buffers come back from it for reuse.
    spare: &'a Receiver<Vec<u8>>,
    progress: &'a dyn Progress,
}

impl Writer<'_> {
    /// Receives segments in disk order, stores new chunks in packs, and streams each segment's
    /// extents into the manifest.
    fn run(
        &self,
        rx: Receiver<(u64, Result<SegmentOutput>)>,
        manifest: &mut ManifestWriter<Box<dyn ObjectWriter + '_>>,
    ) -> Result<BackupStats> {
        let Writer {
            repo,
            dispatch,
            dedup,
            packs,
            spare,
            progress,
        } = *self;
        let config = repo.config();
        let target = config.pack_target_size as usize;
        let stopped = || Error::Internal("the pack store stopped".into());
        // Room for the last chunk past the target and the table, so the buffer never regrows.
        let capacity = target + config.chunker.max_chunk() as usize * 2 + (1 << 20);
        let protection = repo.protection();
        // The next buffer (an empty one at first), waiting for an uploader to give one back.
        let next_buffer = || -> Result<Vec<u8>> {
            let mut buf = spare.recv().map_err(|_| stopped())?;
            buf.clear();
            buf.reserve_exact(capacity);
            Ok(buf)
        };
        let mut pack = PackWriter::reusing(next_buffer()?, protection)?;
        let mut stats = BackupStats::default();

        // Workers finish out of order; segments are written in disk order.
        let mut reorder: BTreeMap<u64, Result<SegmentOutput>> = BTreeMap::new();
        let mut next = 0u64;
        for (segment, output) in rx {
            reorder.insert(segment, output);
            while let Some(seg) = reorder.remove(&next) {
                crate::progress::checkpoint(progress, "backup-segment")?;
                let seg = seg?;
                next += 1;
                dispatch.written(next);
                stats.bytes_read += seg.bytes_read;
                stats.unallocated_bytes += seg.unallocated;
                stats.skipped_bytes += seg.skipped;
                for e in &seg.extents {
                    match e {
                        Extent::Zero { len } => stats.zero_bytes += u64::from(*len),
                        Extent::Chunk { .. } => stats.chunks += 1,
                    }
                }
                for f in seg.new_frames {
                    // Another segment may have stored some of these chunks meanwhile: the frame
                    // is stored whole unless all of them are known, and the index takes only
                    // the chunks it does not have yet (see `Index::add_pack`).
                    let fresh = dedup.fresh(&f.chunks, f.since)?;
                    if fresh.is_empty() {
                        continue;
                    }
                    pack.add_frame(protection, &f.chunks, &f.stored, f.compression)?;
                    dedup.accept(fresh.iter().map(|c| c.0));
                    stats.new_chunks += fresh.len() as u64;
                    stats.new_bytes += fresh.iter().map(|c| u64::from(c.1)).sum::<u64>();
                    if pack.len() >= target {
                        packs.send(pack).map_err(|_| stopped())?;
                        pack = PackWriter::reusing(next_buffer()?, protection)?;
                    }
                }
                manifest.push_segment(&seg.extents)?;
                progress.advance(seg.len);
            }
        }
        if next != dispatch.total {
            return Err(Error::InvalidArgument(format!(
                "backup stopped after {next} of {} segments",
                dispatch.total
            )));
        }
        packs.send(pack).map_err(|_| stopped())?;
        Ok(stats)
    }
}

/// Stores finished packs as they come, several at once on a remote store (`uploads.rs`); returns
/// how many packs and bytes it added to the repository. Each pack is stored, then indexed,
/// by one uploader; packs finish in any order, and the manifest waits for all of them.
/// Nothing is stored before `lock` is held.
fn store_loop(
    repo: &Repo,
    packs: Receiver<PackWriter>,
    dedup: &Dedup,
    lock: &PendingLock,
    uploads: uploads::Uploads,
    spare: std::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(u64, u64)> {
    let packs = Mutex::new(packs);
    let failed = AtomicBool::new(false);
    let upload = || -> Result<(u64, u64)> {
        let (mut stored, mut added) = (0, 0);
        loop {
            let next = packs.lock().unwrap_or_else(|p| p.into_inner()).recv();
            // The writer is done, or another uploader failed: its error is the one reported.
            let Ok(pack) = next else {
                return Ok((stored, added));
            };
            // Every pack taken gives a buffer back (an empty one when its own is lost), or
            // the writer could wait for it for ever. The writer may have finished; then the
            // buffer is simply dropped.
            let mut given_back = false;
            let mut give_back = |buf: Vec<u8>| {
                given_back = true;
                let _ = spare.send(buf);
            };
            let size = if failed.load(Ordering::Relaxed) {
                Ok(0)
            } else {
                // A panic must give the buffer back too, or the writer waits for it for ever.
                panic_as_error("a pack uploader", || {
                    lock.wait()?;
                    store_pack(repo, dedup, pack, &mut give_back)
                })
            };
            if !given_back {
                let _ = spare.send(Vec::new());
            }
            let size = size.inspect_err(|_| {
                failed.store(true, Ordering::Relaxed);
            })?;
            stored += u64::from(size > 0);
            added += size;
            if failed.load(Ordering::Relaxed) {
                return Ok((stored, added));
            }
        }
    };
    std::thread::scope(|scope| {
        let uploaders: Vec<_> = (0..uploads.uploaders)
            .map(|_| scope.spawn(upload))
            .collect();
        let (mut stored, mut added, mut first) = (0, 0, Ok(()));
        for u in uploaders {
            match u
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("pack uploader panicked".into())))
            {
                Ok((s, a)) => {
                    stored += s;
                    added += a;
                }
                Err(e) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first.map(|()| (stored, added))
    })
}

/// Stores a finished pack, then indexes its chunks: never the other way round. Its buffer
/// goes to `give_back` as soon as the pack is stored. Returns the pack's size (0 if nothing
/// was stored).
fn store_pack(
    repo: &Repo,
    dedup: &Dedup,
    pack: PackWriter,
    give_back: &mut dyn FnMut(Vec<u8>),
) -> Result<u64> {
    if pack.is_empty() {
        return Ok(0);
    }
    let mut finished = pack.finish(repo.protection())?;
    let size = repo.commit_pack(&mut finished, give_back)?;
    crate::crash::point("pack-indexed");
    dedup.wrote_pack(&finished.name);
    dedup.now_indexed(finished.entries.iter().map(|e| &e.id));
    Ok(size)
}
