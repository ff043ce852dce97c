//! Restore to a page blob (Azure, Azure Stack Hub) as a fixed VHD, over the Blob REST API.
//!
//! Job: create the page blob (virtual size rounded up to a whole MiB, plus the 512-byte
//! footer), upload only the pages that hold data, and write the VHD footer last.
//!
//! How: [`restore_into`] writes chunks at arbitrary, unaligned offsets, segment by segment.
//! The target assembles each segment's window in memory; when the segment is done, the
//! window goes to a small pool of uploader threads, which skip all-zero pages (512 bytes, or
//! 4 KiB on Azure Stack Hub) and Put Page the rest in runs of at most 4 MiB. Memory is bounded
//! by the windows in flight (restore threads + queue + uploaders), never by the disk size.
//!
//! Invariants:
//! - The footer is written last, after every window is confirmed: an interrupted restore never
//!   leaves a blob that looks like a complete VHD. Restoring onto an existing blob clears its
//!   old footer first.
//! - On an existing blob (`existing`, or `resume`), pages written on the target but zero in the
//!   snapshot are cleared, so the blob ends up byte-identical to the snapshot.
//! - A window is recorded in the resume journal only after the service confirmed every request
//!   for it. `resume` skips exactly the recorded windows and redoes everything else, so a lost
//!   journal costs time, never correctness. The journal is keyed by snapshot id and blob URL
//!   without query (no SAS is written to disk) and removed after success.
//! - Limits of the profile are checked before anything is sent.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::azure::{
    BlobClient, BlobOptions, PageRange, Profile, AZURESTACK_MAX_MANAGED_DISK,
    AZURESTACK_MAX_PAGE_BLOB, AZURE_MAX_PAGE_BLOB, MAX_PUT_PAGE,
};
use crate::error::{Error, Result};
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{restore_into, DiskTarget, RestoreReport};
use crate::source::vhd::footer::{self, DiskType, Footer, FOOTER_LEN};

const MIB: u64 = 1 << 20;

/// Options of a page blob restore.
#[derive(Clone, Debug, Default)]
pub struct PageBlobRestoreOptions {
    /// Profile, service version, endpoint, key, retries.
    pub blob: BlobOptions,
    /// Replace a blob that exists (it is deleted and created anew).
    pub force: bool,
    /// Write into an existing blob of the right size without re-creating it (for example a
    /// managed disk's upload SAS).
    pub existing: bool,
    /// Continue an interrupted restore: skip windows its journal records as confirmed.
    pub resume: bool,
    /// Directory of resume journals; default [`default_journal_dir`].
    pub journal_dir: Option<PathBuf>,
    /// Unique id of the VHD footer; default the snapshot's source VHD's, else random.
    pub unique_id: Option<[u8; 16]>,
    /// Parallel uploads (default 8).
    pub uploaders: usize,
}

/// The outcome of a page blob restore (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct PageBlobRestoreReport {
    #[serde(flatten)]
    pub restore: RestoreReport,
    pub profile: String,
    pub api_version: String,
    /// Size of the blob: the disk rounded up to a MiB, plus the footer.
    #[serde(rename = "blob_size_bytes")]
    pub blob_size: u64,
    /// Serialised once, as the restore's `vhd_current_size_bytes`.
    #[serde(skip)]
    pub vhd_current_size: u64,
    pub unique_id: String,
    /// Bytes sent with Put Page (data pages and the footer).
    #[serde(rename = "uploaded_bytes")]
    pub bytes_uploaded: u64,
    pub put_requests: u64,
    pub clear_requests: u64,
    /// Windows skipped because the resume journal had them confirmed.
    pub windows_resumed: u64,
    pub windows_uploaded: u64,
    /// Things the operator should know (service version step-down).
    pub notes: Vec<String>,
}

/// Where resume journals go: `$XDG_CACHE_HOME/stackvault/resume`, else
/// `$HOME/.cache/stackvault/resume`, else the temporary directory.
pub fn default_journal_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("stackvault").join("resume")
}

/// The journal file of restoring `snapshot_id` to the blob `identity` (URL without query).
pub fn journal_path(dir: &Path, snapshot_id: &str, identity: &str) -> PathBuf {
    let key = blake3::hash(format!("{snapshot_id}\n{identity}").as_bytes());
    dir.join(format!("{}.stackvault-resume", &key.to_hex()[..32]))
}

/// Checks the profile's size limits for a disk of `virtual_size` bytes.
pub fn check_limits(profile: Profile, virtual_size: u64, existing: bool) -> Result<()> {
    let blob_size = virtual_size.div_ceil(MIB) * MIB + FOOTER_LEN as u64;
    let (max, what) = match profile {
        Profile::AzureStack if existing => (
            AZURESTACK_MAX_MANAGED_DISK + FOOTER_LEN as u64,
            "Azure Stack Hub managed disks are at most 1023 GiB",
        ),
        Profile::AzureStack => (
            AZURESTACK_MAX_PAGE_BLOB,
            "Azure Stack Hub page blobs are at most 1 TB",
        ),
        Profile::Azure => (AZURE_MAX_PAGE_BLOB, "Azure page blobs are at most 8 TiB"),
    };
    if blob_size > max {
        return Err(Error::InvalidArgument(format!(
            "the disk needs a page blob of {blob_size} bytes; {what} ({max} bytes with the footer)"
        )));
    }
    Ok(())
}

/// The unique id recorded for the snapshot's source VHD (`source.vhd.unique_id`).
pub fn source_unique_id(repo: &Repo, snapshot_id: &str) -> Option<[u8; 16]> {
    let manifest = repo.load_manifest(snapshot_id).ok()?;
    footer::parse_uuid(&manifest.meta.source.vhd?.unique_id)
}

/// Restores a snapshot to the page blob at `url` as a fixed VHD.
pub fn restore_to_page_blob(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    url: &str,
    options: &PageBlobRestoreOptions,
    progress: &dyn Progress,
) -> Result<PageBlobRestoreReport> {
    let started = Instant::now();
    let manifest = repo.load_manifest(&snapshot.id)?;
    let profile = options.blob.profile;
    let on_existing = options.existing || options.resume;
    check_limits(profile, manifest.virtual_size, on_existing)?;
    if !manifest.segment_size.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "segment size {} is not a multiple of 4 KiB",
            manifest.segment_size
        )));
    }
    let data_size = manifest.virtual_size.div_ceil(MIB) * MIB;
    let blob_size = data_size + FOOTER_LEN as u64;
    let client = BlobClient::new(url, &options.blob)?;
    let shown = client.display_url().to_string();
    let unique_id = match options
        .unique_id
        .or_else(|| source_unique_id(repo, &snapshot.id))
    {
        Some(id) => id,
        None => {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| {
                Error::InvalidArgument(format!("no randomness for the VHD unique id: {e}"))
            })?;
            id
        }
    };

    let journal_dir = options
        .journal_dir
        .clone()
        .unwrap_or_else(default_journal_dir);
    let journal = journal_path(&journal_dir, &snapshot.id, &client.identity());
    let header = format!("stackvault-resume v1 {} {}", snapshot.id, client.identity());
    let existing_props = client.properties()?;
    let mut confirmed = HashSet::new();
    let mut target_ranges = Vec::new();
    if on_existing {
        let props = existing_props.ok_or_else(|| Error::Http {
            url: shown.clone(),
            status: 404,
            code: "BlobNotFound".into(),
            message: if options.resume {
                "nothing to resume: the blob does not exist".into()
            } else {
                "--existing: the blob does not exist".into()
            },
        })?;
        if props.size != blob_size {
            return Err(Error::InvalidArgument(format!(
                "{shown} is {} bytes; the snapshot needs a blob of {blob_size} bytes \
                 ({} bytes of disk rounded up to a MiB, plus the VHD footer)",
                props.size, manifest.virtual_size
            )));
        }
        if options.resume {
            confirmed = read_journal(&journal, &header)?;
        }
        // The old footer goes first: until the new one is written, this is no valid VHD.
        client.clear_pages(data_size, FOOTER_LEN as u64)?;
        target_ranges = client.written_ranges(0, data_size)?;
    } else {
        if existing_props.is_some() && !options.force {
            return Err(Error::InvalidArgument(format!(
                "{shown} already exists; pass --force to replace it, --existing to write into \
                 it, or --resume to continue an interrupted restore"
            )));
        }
        client.create_page_blob(blob_size)?;
    }
    fs::create_dir_all(&journal_dir).map_err(|e| Error::io("create", &journal_dir, e))?;
    let journal_file = open_journal(&journal, &header, !confirmed.is_empty())?;

    let uploaders = if options.uploaders == 0 {
        8
    } else {
        options.uploaders
    };
    let target = PageBlobTarget {
        client: &client,
        segment_size: u64::from(manifest.segment_size),
        data_size,
        align: profile.page_align(),
        windows: Mutex::new(HashMap::new()),
        confirmed,
        target_ranges,
        journal: Mutex::new(journal_file),
        journal_path: journal.clone(),
        queue: Mutex::new(None),
        failed: Mutex::new(None),
        stats: Stats::default(),
    };
    let (tx, rx) = sync_channel::<Window>(uploaders);
    if let Ok(mut q) = target.queue.lock() {
        *q = Some(tx);
    }
    let rx = Mutex::new(rx);
    let counts = std::thread::scope(|scope| -> Result<_> {
        let workers: Vec<_> = (0..uploaders)
            .map(|_| scope.spawn(|| target.upload_loop(&rx)))
            .collect();
        let result = restore_into(repo, &snapshot.id, &manifest, &target, progress);
        if let Ok(mut q) = target.queue.lock() {
            q.take();
        }
        for w in workers {
            if w.join().is_err() {
                target.fail(Error::InvalidArgument("an upload thread panicked".into()));
            }
        }
        let failure = target.failed.lock().ok().and_then(|mut f| f.take());
        match (result, failure) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(e),
            (Ok(c), None) => Ok(c),
        }
    })?;
    // Pages past the last segment (the rounding to a MiB) that an existing blob had written.
    let tail = manifest.virtual_size.div_ceil(target.align) * target.align;
    for (s, e) in overlaps(&target.target_ranges, tail, data_size) {
        client.clear_pages(s, e - s)?;
        target.stats.clears.fetch_add(1, Ordering::Relaxed);
    }
    // "win " (Hyper-V) as creator: readers such as qemu then take the size from the footer.
    let vhd_footer = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: u64::MAX,
        timestamp: footer::vhd_now(),
        creator_app: *b"win ",
        creator_version: 0x000a_0000,
        creator_host_os: *b"Wi2k",
        original_size: data_size,
        current_size: data_size,
        geometry: footer::chs_geometry(data_size),
        disk_type: DiskType::Fixed,
        unique_id,
        saved_state: 0,
    }
    .encode();
    client.put_pages(data_size, &vhd_footer)?;
    let _ = fs::remove_file(&journal);

    let s = &target.stats;
    let uploaded = s.bytes.load(Ordering::Relaxed) + FOOTER_LEN as u64;
    Ok(PageBlobRestoreReport {
        restore: RestoreReport {
            snapshot_id: snapshot.id.clone(),
            disk: manifest.meta.disk.clone(),
            target: shown,
            output_format: "vhd-fixed".into(),
            virtual_size: manifest.virtual_size,
            bytes_written: counts.bytes_written,
            zero_bytes: counts.zero_bytes,
            chunks: counts.chunks,
            duration_ms: started.elapsed().as_millis() as u64,
            throughput_bytes_per_second: crate::progress::bytes_per_second(
                uploaded,
                started.elapsed(),
            ),
            vhd_current_size: Some(data_size),
        },
        profile: profile.as_str().into(),
        api_version: client.api_version(),
        blob_size,
        vhd_current_size: data_size,
        unique_id: footer::format_uuid(&unique_id),
        bytes_uploaded: uploaded,
        put_requests: s.puts.load(Ordering::Relaxed) + 1,
        clear_requests: s.clears.load(Ordering::Relaxed) + u64::from(on_existing),
        windows_resumed: s.resumed.load(Ordering::Relaxed),
        windows_uploaded: s.uploaded.load(Ordering::Relaxed),
        notes: client.notes(),
    })
}

/// Reads the windows a journal confirms; a journal of another restore confirms nothing.
fn read_journal(path: &Path, header: &str) -> Result<HashSet<u64>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(Error::io("open resume journal", path, e)),
    };
    let mut lines = BufReader::new(file).lines();
    match lines.next() {
        Some(Ok(first)) if first == header => {}
        _ => return Ok(HashSet::new()),
    }
    // A torn last line (crash mid-write) fails to parse and is ignored.
    Ok(lines
        .map_while(|l| l.ok())
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .collect())
}

fn open_journal(path: &Path, header: &str, append: bool) -> Result<File> {
    if append {
        let mut f = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open resume journal", path, e))?;
        // A torn line before ours must not swallow the next offset.
        f.write_all(b"\n")
            .map_err(|e| Error::io("write resume journal", path, e))?;
        return Ok(f);
    }
    let mut f = File::create(path).map_err(|e| Error::io("create resume journal", path, e))?;
    writeln!(f, "{header}").map_err(|e| Error::io("write resume journal", path, e))?;
    Ok(f)
}

/// Parts of `ranges` (sorted, end exclusive) inside `[start, end)`.
fn overlaps(ranges: &[PageRange], start: u64, end: u64) -> Vec<PageRange> {
    let first = ranges.partition_point(|&(_, e)| e <= start);
    ranges[first..]
        .iter()
        .take_while(|&&(s, _)| s < end)
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// True when every byte is zero.
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(16);
    blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

#[derive(Default)]
struct Stats {
    bytes: AtomicU64,
    puts: AtomicU64,
    clears: AtomicU64,
    resumed: AtomicU64,
    uploaded: AtomicU64,
}

/// One finished segment on its way to the service.
struct Window {
    offset: u64,
    len: u64,
    data: Option<Vec<u8>>,
}

struct PageBlobTarget<'a> {
    client: &'a BlobClient,
    segment_size: u64,
    data_size: u64,
    align: u64,
    /// Windows being assembled, by segment offset.
    windows: Mutex<HashMap<u64, Vec<u8>>>,
    /// Windows the resume journal confirms.
    confirmed: HashSet<u64>,
    /// Written ranges of an existing target blob (to clear what the snapshot has as zero).
    target_ranges: Vec<PageRange>,
    journal: Mutex<File>,
    journal_path: PathBuf,
    queue: Mutex<Option<SyncSender<Window>>>,
    failed: Mutex<Option<Error>>,
    stats: Stats,
}

impl PageBlobTarget<'_> {
    fn fail(&self, e: Error) {
        if let Ok(mut f) = self.failed.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
    }

    fn has_failed(&self) -> bool {
        self.failed.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    fn upload_loop(&self, rx: &Mutex<Receiver<Window>>) {
        loop {
            let next = match rx.lock() {
                Ok(r) => r.recv(),
                Err(_) => return,
            };
            let Ok(w) = next else { return };
            if self.has_failed() {
                continue; // drain, so senders never block on a dead pool
            }
            if let Err(e) = self.upload(&w) {
                self.fail(e);
            }
        }
    }

    /// Sends one window: Put Page for runs of non-zero pages, clear for pages the target
    /// has written but the snapshot has as zero; then records it in the journal.
    fn upload(&self, w: &Window) -> Result<()> {
        let padded = (w.len.div_ceil(self.align) * self.align).min(self.data_size - w.offset);
        let page = self.align as usize;
        let mut runs: Vec<(usize, usize, bool)> = Vec::new(); // (start, end, data)
        if let Some(buf) = &w.data {
            let mut pos = 0usize;
            while pos < padded as usize {
                let end = (pos + page).min(buf.len());
                let data = !is_zero(&buf[pos..end]);
                match runs.last_mut() {
                    Some(r) if r.2 == data && r.1 == pos && (!data || r.1 - r.0 < MAX_PUT_PAGE) => {
                        r.1 = pos + page
                    }
                    _ => runs.push((pos, pos + page, data)),
                }
                pos += page;
            }
        } else {
            runs.push((0, padded as usize, false));
        }
        for (s, e, data) in runs {
            let (abs_s, abs_e) = (w.offset + s as u64, w.offset + e as u64);
            if data {
                let buf = w.data.as_deref().unwrap_or(&[]);
                self.client.put_pages(abs_s, &buf[s..e])?;
                self.stats.puts.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes
                    .fetch_add((e - s) as u64, Ordering::Relaxed);
            } else {
                for (cs, ce) in overlaps(&self.target_ranges, abs_s, abs_e) {
                    // Round out to whole pages; they lie inside this zero run.
                    let cs = cs - cs % self.align;
                    let ce = (ce.div_ceil(self.align) * self.align).min(abs_e);
                    self.client.clear_pages(cs, ce - cs)?;
                    self.stats.clears.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
        let mut j = self
            .journal
            .lock()
            .map_err(|_| Error::InvalidArgument("resume journal lock poisoned".into()))?;
        writeln!(j, "{}", w.offset)
            .map_err(|e| Error::io("write resume journal", &self.journal_path, e))
    }
}

impl DiskTarget for PageBlobTarget<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = offset - offset % self.segment_size;
        if self.confirmed.contains(&start) {
            return Ok(());
        }
        let within = (offset - start) as usize;
        let window_len = (self.segment_size.min(self.data_size - start)) as usize;
        if within + data.len() > window_len {
            return Err(Error::InvalidArgument(format!(
                "chunk at {offset} of {} bytes crosses a segment boundary",
                data.len()
            )));
        }
        // Chunks of one segment arrive from one thread; the map lock is held for the copy.
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| Error::InvalidArgument("window lock poisoned".into()))?;
        let buf = windows
            .entry(start)
            .or_insert_with(|| vec![0u8; window_len]);
        buf[within..within + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn segment_done(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(e) = self.failed.lock().ok().and_then(|f| {
            f.as_ref()
                .map(|e| Error::InvalidArgument(format!("upload failed: {e}")))
        }) {
            return Err(e);
        }
        if self.confirmed.contains(&offset) {
            self.stats.resumed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let data = self
            .windows
            .lock()
            .map_err(|_| Error::InvalidArgument("window lock poisoned".into()))?
            .remove(&offset);
        let tx = self
            .queue
            .lock()
            .map_err(|_| Error::InvalidArgument("queue lock poisoned".into()))?
            .clone();
        match tx {
            Some(tx) => tx
                .send(Window { offset, len, data })
                .map_err(|_| Error::InvalidArgument("upload threads are gone".into())),
            None => Err(Error::InvalidArgument("restore target is closed".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_profile() {
        assert!(check_limits(Profile::AzureStack, 1023 << 30, true).is_ok());
        assert!(check_limits(Profile::AzureStack, (1023 << 30) + 1, true)
            .is_err_and(|e| e.to_string().contains("1023 GiB")));
        assert!(check_limits(Profile::AzureStack, 1u64 << 40, false)
            .is_err_and(|e| e.to_string().contains("1 TB")));
        assert!(check_limits(Profile::AzureStack, (1u64 << 40) - MIB, false).is_ok());
        assert!(check_limits(Profile::Azure, 4u64 << 40, false).is_ok());
        assert!(check_limits(Profile::Azure, 8u64 << 40, false).is_err());
    }

    #[test]
    fn overlap_and_zero_helpers() {
        let r = [(0, 512), (4096, 8192), (10_000, 20_000)];
        assert_eq!(overlaps(&r, 100, 5000), vec![(100, 512), (4096, 5000)]);
        assert_eq!(overlaps(&r, 8192, 10_000), vec![]);
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[1] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn journal_confirms_only_its_own_restore() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let p = journal_path(dir.path(), "snap", "http://h/c/b");
        assert_ne!(p, journal_path(dir.path(), "snap2", "http://h/c/b"));
        {
            let mut f = open_journal(&p, "hdr", false)?;
            writeln!(f, "0\n4194304\n83886").map_err(|e| Error::io("w", &p, e))?;
        }
        let got = read_journal(&p, "hdr")?;
        assert!(got.contains(&0) && got.contains(&4194304));
        assert!(read_journal(&p, "other")?.is_empty());
        Ok(())
    }
}
