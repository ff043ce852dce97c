//! Restore: write a snapshot's virtual disk to a target.
//!
//! Segments are restored in parallel; every chunk is verified (crc32, decompression, BLAKE3)
//! before its bytes reach the target (a [`ChunkWalker`] per worker reads them, through the
//! one verified chunk path of [`crate::read`]), so a damaged repository makes a restore fail
//! loudly with the location instead of writing wrong data. Zero runs are never written to a
//! file: a file target is created sparse at its full size first. A file target is written
//! under a temporary name and renamed into place only when complete.
//!
//! A block or character device is written in place instead (`DeviceTarget`): renaming a
//! temporary file over `/dev/sdX` would replace the device node with a file in RAM. It needs
//! `--force`, gets the raw disk, and a block device smaller than the disk is refused before
//! anything is written. Its zero runs must be written, since the device holds old data:
//! with `fallocate(PUNCH_HOLE)` where the device can deallocate with guaranteed zeros (the
//! kernel's checked form of `BLKDISCARD`), else `fallocate(ZERO_RANGE)` (the kernel's
//! `BLKZEROOUT`), else by writing zeros. Bytes of the device past the disk are left alone.
//!
//! A restore stops at the next segment when cancelled (SIGINT, SIGTERM); a file target's
//! partial output is removed, a device keeps what was written and says so.
//!
//! While a file restore runs, a thread keeps the kernel writing back what is written (see
//! `with_background_writeback`), so that the final fsync does not wait for it all.
//!
//! A file target is raw, fixed VHD or dynamic VHD ([`OutputFormat`]); the VHD targets live in
//! [`vhd`] and write their footers last, so an interrupted restore never leaves a file that
//! looks like a valid VHD, even before the rename.

pub mod by_pack;
pub mod fetch;
#[cfg(feature = "azure")]
pub mod pageblob;
pub mod vhd;

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::{ContainerFormat, Manifest, SnapshotMeta};
use crate::format::vhd_footer::DiskType;
use crate::format::SnapshotId;
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::read::{ChunkWalker, Piece};
use crate::repo::Repo;
use fetch::FetchLimits;

/// Where restored bytes go. Writes arrive from many threads, at distinct offsets.
pub trait DiskTarget: Sync {
    /// Writes `data` at `offset` of the virtual disk.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Every chunk of the segment at `offset` (`len` bytes of the virtual disk) has been
    /// written. Targets that upload whole aligned windows (page blobs) send it now.
    fn segment_done(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// `len` bytes at `offset` must read as zeros. Targets that start out as zeros (a fresh
    /// sparse file, a new page blob) have nothing to do: the default.
    fn zero_at(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// True when the target already holds the segment at `offset` (a resumed page blob
    /// upload): the restore skips it without reading or decompressing its chunks.
    fn has_segment(&self, offset: u64) -> bool {
        let _ = offset;
        false
    }

    /// How many bytes of the disk a restore that writes out of disk order (from a remote
    /// repository, pack by pack) may have in progress at once, per batch of segments: a target
    /// that assembles segments in memory bounds it. Unbounded by default.
    fn reorder_limit(&self) -> u64 {
        u64::MAX
    }

    /// True when writes are best made from one thread: a file's writes from many threads
    /// serialise on its inode lock, and the threads spin on it (in a remote restore, 32
    /// fetchers writing one file spent a sixth of their write time waiting). A restore that
    /// writes out of disk order then hands its writes to one writer thread. False (the
    /// default) for targets whose writes or [`DiskTarget::segment_done`] wait on a network.
    fn one_writer(&self) -> bool {
        false
    }
}

/// Container format of a restored disk file; JSON and the CLI name it as [`Self::as_str`]
/// does (`raw`, `vhd-fixed`, `vhd-dynamic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    Raw,
    /// Data followed by a 512-byte footer: what Azure and Azure Stack Hub accept.
    VhdFixed,
    /// Footer copy, header, BAT, then only the 2 MiB blocks that hold data.
    VhdDynamic,
}

impl OutputFormat {
    /// Parses `raw`, `vhd-fixed` or `vhd-dynamic`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(OutputFormat::Raw),
            "vhd-fixed" => Ok(OutputFormat::VhdFixed),
            "vhd-dynamic" => Ok(OutputFormat::VhdDynamic),
            other => Err(Error::Usage(format!(
                "output format {other:?}: use raw, vhd-fixed or vhd-dynamic"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Raw => "raw",
            OutputFormat::VhdFixed => "vhd-fixed",
            OutputFormat::VhdDynamic => "vhd-dynamic",
        }
    }

    /// The format a snapshot came from; a differencing VHD comes back whole, as dynamic.
    pub fn of_source(meta: &SnapshotMeta) -> Self {
        match meta.source.format {
            ContainerFormat::Vhd(DiskType::Fixed) => OutputFormat::VhdFixed,
            ContainerFormat::Vhd(DiskType::Dynamic | DiskType::Differencing) => {
                OutputFormat::VhdDynamic
            }
            ContainerFormat::Raw | ContainerFormat::Other(_) => OutputFormat::Raw,
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of a file restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Replace an existing output file.
    pub force: bool,
    /// Container of the output; `None`: the format the snapshot came from.
    pub output_format: Option<OutputFormat>,
    /// Fixed VHD: keep the virtual size (rounded up to a sector) instead of rounding it up to
    /// a whole MiB as Azure requires.
    pub exact_size: bool,
    /// VHD: give the disk a fresh unique id instead of the source's.
    pub new_id: bool,
}

/// The outcome of a restore (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot_id: SnapshotId,
    pub disk: String,
    pub target: String,
    pub output_format: OutputFormat,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: u64,
    /// A VHD output's current size (the virtual size after rounding); `null` for raw output.
    #[serde(rename = "vhd_current_size_bytes")]
    pub vhd_current_size: Option<u64>,
    /// Bytes of chunk data written.
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    /// Bytes left as holes.
    pub zero_bytes: u64,
    pub chunks: u64,
    pub duration_ms: u64,
    /// Bytes written per second of wall time.
    pub throughput_bytes_per_second: u64,
}

/// Counters of [`restore_into`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreCounts {
    pub bytes_written: u64,
    pub zero_bytes: u64,
    pub chunks: u64,
}

/// Largest write of a restore worker, in bytes (see [`restore_into`]).
const RUN_MAX: usize = 128 * 1024;

/// Writes every chunk of `manifest` into `target` (holes are skipped).
///
/// A local repository reads each frame where it is (a `pread` is cheap), segments in
/// parallel. A remote one reads in pack order, region by region (see [`by_pack`]).
pub fn restore_into(
    repo: &Repo,
    snapshot_id: &str,
    manifest: &Manifest,
    target: &dyn DiskTarget,
    progress: &dyn Progress,
) -> Result<RestoreCounts> {
    progress.start("restore", manifest.virtual_size);
    let counts = if repo.is_remote() {
        by_pack::restore_by_pack(
            repo,
            snapshot_id,
            manifest,
            target,
            progress,
            &FetchLimits::from_env()?,
        )?
    } else {
        restore_direct(repo, snapshot_id, manifest, target, progress)?
    };
    progress.finish();
    Ok(counts)
}

fn add_counts(a: RestoreCounts, b: RestoreCounts) -> Result<RestoreCounts> {
    Ok(RestoreCounts {
        bytes_written: a.bytes_written + b.bytes_written,
        zero_bytes: a.zero_bytes + b.zero_bytes,
        chunks: a.chunks + b.chunks,
    })
}

/// Every segment in parallel, each chunk read (one frame at a time) when it is reached.
fn restore_direct(
    repo: &Repo,
    snapshot_id: &str,
    manifest: &Manifest,
    target: &dyn DiskTarget,
    progress: &dyn Progress,
) -> Result<RestoreCounts> {
    let seg = u64::from(manifest.segment_size);
    let writer = SegmentWriter {
        target,
        progress,
        snapshot_id,
    };
    (0..manifest.segment_count())
        .into_par_iter()
        // Per worker: a chunk walker (its frame cache decompresses each frame once for the
        // chunks read from it in order) and a buffer that gathers a run of chunks into one
        // write: writes to one file from many threads serialise on its inode lock, so a
        // write per 16 KiB chunk made restores wait on each other.
        .map_init(
            || (ChunkWalker::new(repo, snapshot_id), Vec::new()),
            |(walker, run), i| {
                crate::progress::checkpoint(progress, "restore-segment")?;
                let start = i * seg;
                if target.has_segment(start) {
                    progress.advance(seg.min(manifest.virtual_size.saturating_sub(start)));
                    return Ok(RestoreCounts::default());
                }
                let extents = manifest.segment(i)?;
                let mut segment = writer.begin(start, run);
                walker.walk(&extents, start, start..u64::MAX, &mut |piece| {
                    segment.put(piece)
                })?;
                segment.finish()
            },
        )
        .try_reduce(RestoreCounts::default, add_counts)
}

/// What every segment of one restore is written with: the target, the progress to advance,
/// the snapshot (named in errors).
struct SegmentWriter<'a> {
    target: &'a dyn DiskTarget,
    progress: &'a dyn Progress,
    snapshot_id: &'a str,
}

impl<'a> SegmentWriter<'a> {
    /// Starts writing the segment at disk offset `start`, gathering consecutive chunk bytes
    /// in `run` (a worker's buffer) into writes of up to [`RUN_MAX`] bytes.
    fn begin<'w>(&'w self, start: u64, run: &'w mut Vec<u8>) -> SegmentWrite<'w, 'a> {
        run.clear();
        SegmentWrite {
            writer: self,
            start,
            end: start,
            run_start: start,
            run,
            counts: RestoreCounts::default(),
        }
    }
}

/// One segment being written: pieces arrive in disk order, without gaps.
struct SegmentWrite<'w, 'a> {
    writer: &'w SegmentWriter<'a>,
    start: u64,
    /// Where the next piece must start.
    end: u64,
    /// Disk offset of `run`'s first byte.
    run_start: u64,
    run: &'w mut Vec<u8>,
    counts: RestoreCounts,
}

impl SegmentWrite<'_, '_> {
    /// Writes (or gathers) one piece of the segment.
    fn put(&mut self, piece: Piece<'_>) -> Result<()> {
        let (offset, len) = match piece {
            Piece::Zero { offset, len } => (offset, len),
            Piece::Data { offset, data } => (offset, data.len() as u64),
        };
        if offset != self.end {
            return Err(Error::Internal(format!(
                "restore of snapshot {}: a piece at {offset} where {} was next",
                self.writer.snapshot_id, self.end
            )));
        }
        let target = self.writer.target;
        match piece {
            Piece::Zero { offset, len } => {
                self.counts.zero_bytes += len;
                if !self.run.is_empty() {
                    target.write_at(self.run_start, self.run)?;
                    self.run.clear();
                }
                target.zero_at(offset, len)?;
                self.run_start = offset + len;
            }
            Piece::Data { data, .. } => {
                if self.run.len() + data.len() > RUN_MAX {
                    target.write_at(self.run_start, self.run)?;
                    self.run_start += self.run.len() as u64;
                    self.run.clear();
                }
                self.run.extend_from_slice(data);
                self.counts.bytes_written += len;
                self.counts.chunks += 1;
            }
        }
        self.end = offset + len;
        Ok(())
    }

    /// Writes what is gathered, tells the target the segment is done, advances progress.
    fn finish(self) -> Result<RestoreCounts> {
        let target = self.writer.target;
        if !self.run.is_empty() {
            target.write_at(self.run_start, self.run)?;
        }
        target.segment_done(self.start, self.end - self.start)?;
        self.writer.progress.advance(self.end - self.start);
        Ok(self.counts)
    }
}

/// A raw image file (or the data area of a fixed VHD) being restored.
pub(crate) struct RawFileTarget<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
}

impl DiskTarget for RawFileTarget<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io("write", self.path, e))
    }

    fn one_writer(&self) -> bool {
        true
    }
}

/// A block or character device restored in place (see the module doc); standby syncs write
/// and zero files and devices through it too.
pub(crate) struct DeviceTarget<'a> {
    file: &'a File,
    path: &'a Path,
    /// How zero runs are written: one of the `ZERO_*` ways, moving to the next when the
    /// device refuses one.
    zeroing: AtomicU8,
}

/// `fallocate(PUNCH_HOLE)`: deallocate, only where the device guarantees zeros afterwards.
const ZERO_DEALLOCATE: u8 = 0;
/// `fallocate(ZERO_RANGE)`: the device writes zeros (as the `BLKZEROOUT` ioctl does).
const ZERO_OFFLOAD: u8 = 1;
/// Write zero bytes.
const ZERO_WRITE: u8 = 2;
/// Zero runs go to the kernel in whole pages; the unaligned ends are written as zero bytes,
/// so that a page never holds both a zeroed range and data written through the page cache.
const ZERO_ALIGN: u64 = 4096;

impl<'a> DeviceTarget<'a> {
    pub(crate) fn new(file: &'a File, path: &'a Path) -> Self {
        DeviceTarget {
            file,
            path,
            zeroing: AtomicU8::new(ZERO_DEALLOCATE),
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = offset.saturating_add(len);
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.write_at(offset, &ZEROS[..n])?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Zeros a page-aligned range the fastest way the device accepts.
    fn zero_aligned(&self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::FallocateFlags as F;
        loop {
            let way = self.zeroing.load(Ordering::Relaxed);
            let flags = match way {
                ZERO_DEALLOCATE => F::PUNCH_HOLE | F::KEEP_SIZE,
                ZERO_OFFLOAD => F::ZERO_RANGE | F::KEEP_SIZE,
                _ => return self.write_zeros(offset, len),
            };
            match rustix::fs::fallocate(self.file, flags, offset, len) {
                Ok(()) => return Ok(()),
                // Not offered by this device (or driver): try the next way.
                Err(e)
                    if [
                        rustix::io::Errno::OPNOTSUPP,
                        rustix::io::Errno::NODEV,
                        rustix::io::Errno::NOSYS,
                        rustix::io::Errno::INVAL,
                    ]
                    .contains(&e) =>
                {
                    let _ = self.zeroing.compare_exchange(
                        way,
                        (way + 1).min(ZERO_WRITE),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => return Err(Error::io("zero", self.path, e.into())),
            }
        }
    }
}

impl DiskTarget for DeviceTarget<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io("write", self.path, e))
    }

    fn zero_at(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            Error::Internal(format!("zero run at {offset} of {len} bytes overflows"))
        })?;
        let first_page = offset.next_multiple_of(ZERO_ALIGN).min(end);
        let last_page = (end - end % ZERO_ALIGN).max(first_page);
        self.write_zeros(offset, first_page - offset)?;
        if last_page > first_page {
            self.zero_aligned(first_page, last_page - first_page)?;
        }
        self.write_zeros(last_page, end - last_page)
    }
}

/// How often a file restore asks the kernel to write back what it has written so far.
const WRITEBACK_EVERY: Duration = Duration::from_millis(250);

/// Runs `restore` while a thread keeps flushing `file` (`fdatasync` every
/// [`WRITEBACK_EVERY`]), so that the disk writes overlap with decompression instead of all
/// waiting for the final fsync with the CPUs idle (restoring gen2 of the 4 GiB bench disk:
/// 2.65 s against 3.05 s, medians of 5 alternating runs). A failed flush fails the restore:
/// after an fsync error the kernel may drop the dirty pages and report success to the next
/// fsync.
fn with_background_writeback<R>(
    file: &File,
    path: &Path,
    restore: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let done = (Mutex::new(false), Condvar::new());
    std::thread::scope(|scope| {
        let flusher = scope.spawn(|| -> Result<()> {
            let (lock, wake) = &done;
            let mut finished = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                finished = wake
                    .wait_timeout(finished, WRITEBACK_EVERY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if *finished {
                    return Ok(());
                }
                drop(finished);
                file.sync_data()
                    .map_err(|e| Error::io("write back", path, e))?;
                finished = lock.lock().unwrap_or_else(|p| p.into_inner());
            }
        });
        let result = restore();
        *done.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        done.1.notify_all();
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("writeback thread panicked".into())));
        let r = result?;
        flushed?;
        Ok(r)
    })
}

/// Temporary name a file restore writes to before renaming into place.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".stackvault-partial");
    out.with_file_name(name)
}

/// Restores a snapshot to a disk image file at `out`, in `options.output_format`.
pub fn restore_to_file(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    out: &Path,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    if out.exists() && !options.force {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if out.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is a directory; give a file name for the restored disk",
            out.display()
        )));
    }
    let manifest = repo.load_manifest(&snapshot.id)?;
    if let Ok(meta) = fs::metadata(out) {
        let kind = meta.file_type();
        if kind.is_block_device() || kind.is_char_device() {
            return restore_to_device(
                repo,
                snapshot,
                &manifest,
                out,
                kind.is_block_device(),
                options,
                progress,
            );
        }
    }
    let format = options
        .output_format
        .unwrap_or_else(|| OutputFormat::of_source(&manifest.meta));
    let tmp = partial_path(out);
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        let restore = || match format {
            OutputFormat::Raw => {
                file.set_len(manifest.virtual_size)
                    .map_err(|e| Error::io("size", &tmp, e))?;
                let target = RawFileTarget {
                    file: &file,
                    path: &tmp,
                };
                let counts = restore_into(repo, &snapshot.id, &manifest, &target, progress)?;
                Ok((counts, None))
            }
            OutputFormat::VhdFixed | OutputFormat::VhdDynamic => {
                let target = vhd::VhdFileTarget {
                    file: &file,
                    path: &tmp,
                };
                let (c, size) = vhd::restore_vhd(
                    repo,
                    &snapshot.id,
                    &manifest,
                    format,
                    options,
                    &target,
                    progress,
                )?;
                Ok((c, Some(size)))
            }
        };
        let (counts, vhd_size) = with_background_writeback(&file, &tmp, restore)?;
        file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        fs::rename(&tmp, out).map_err(|e| Error::io("rename into place", out, e))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::sync_dir(dir)?;
        }
        Ok((counts, vhd_size))
    })();
    let (counts, vhd_current_size) = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(match e {
                Error::Cancelled(_) => Error::Cancelled(format!(
                    "restore stopped; its partial output was removed{}",
                    if options.force && out.exists() {
                        format!(", {} was left as it was", out.display())
                    } else {
                        String::new()
                    }
                )),
                e => e,
            });
        }
    };
    Ok(file_report(
        &snapshot.id,
        &manifest,
        out,
        format,
        vhd_current_size,
        &counts,
        started,
    ))
}

/// The report of a restore into a file or device: its rate is of the bytes written.
fn file_report(
    snapshot_id: &SnapshotId,
    manifest: &Manifest,
    out: &Path,
    format: OutputFormat,
    vhd_current_size: Option<u64>,
    counts: &RestoreCounts,
    started: Instant,
) -> RestoreReport {
    RestoreReport {
        snapshot_id: snapshot_id.clone(),
        disk: manifest.meta.disk.clone(),
        target: out.display().to_string(),
        output_format: format,
        virtual_size: manifest.virtual_size,
        vhd_current_size,
        bytes_written: counts.bytes_written,
        zero_bytes: counts.zero_bytes,
        chunks: counts.chunks,
        duration_ms: started.elapsed().as_millis() as u64,
        throughput_bytes_per_second: crate::progress::bytes_per_second(
            counts.bytes_written,
            started.elapsed(),
        ),
    }
}

/// Restores a snapshot's raw disk onto a block or character device, in place (see the
/// module doc). `block`: the device has a size to check (a character device has none).
fn restore_to_device(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    manifest: &Manifest,
    out: &Path,
    block: bool,
    options: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    if let Some(format) = options.output_format.filter(|f| *f != OutputFormat::Raw) {
        return Err(Error::Usage(format!(
            "{} is a device: it gets the raw disk, not {}; drop --output-format",
            out.display(),
            format.as_str()
        )));
    }
    let mut file = OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|e| Error::io("open device", out, e))?;
    if block {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("size device", out, e))?;
        if size < manifest.virtual_size {
            return Err(Error::Usage(format!(
                "device {} is {size} bytes, smaller than the {} bytes of snapshot {}'s disk;                  nothing was written: restore to a device of at least that size",
                out.display(),
                manifest.virtual_size,
                snapshot.id
            )));
        }
    }
    let target = DeviceTarget::new(&file, out);
    let restore = || restore_into(repo, &snapshot.id, manifest, &target, progress);
    // fdatasync is refused by character devices: only block devices are flushed.
    let result = if block {
        with_background_writeback(&file, out, restore).and_then(|c| {
            file.sync_all()
                .map_err(|e| Error::io("fsync device", out, e))?;
            Ok(c)
        })
    } else {
        restore()
    };
    let counts = result.map_err(|e| match e {
        Error::Cancelled(_) => Error::Cancelled(format!(
            "restore stopped; device {} holds part of the disk: restore again before using it",
            out.display()
        )),
        e => e,
    })?;
    Ok(file_report(
        &snapshot.id,
        manifest,
        out,
        OutputFormat::Raw,
        None,
        &counts,
        started,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_writeback_returns_the_restore_result() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let path = dir.path().join("out");
        let file = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
        let r = with_background_writeback(&file, &path, || {
            file.write_all_at(b"data", 0)
                .map_err(|e| Error::io("write", &path, e))?;
            std::thread::sleep(WRITEBACK_EVERY * 2);
            Ok(7)
        })?;
        assert_eq!(r, 7);
        Ok(())
    }

    #[test]
    fn a_failed_writeback_fails_the_restore() -> Result<()> {
        // fdatasync refuses a character device (EINVAL): a flush that fails for real.
        let path = Path::new("/dev/null");
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let r = with_background_writeback(&file, path, || {
            std::thread::sleep(WRITEBACK_EVERY * 2);
            Ok(())
        });
        let err = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("write back /dev/null"), "{err}");
        Ok(())
    }
}
