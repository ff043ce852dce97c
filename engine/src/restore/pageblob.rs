//! Restore to a page blob (Azure, Azure Stack Hub) as a fixed VHD, over the Blob REST API.
//!
//! Job: create the page blob (virtual size rounded up to a whole MiB, plus the 512-byte
//! footer), upload the pages that hold data, and write the VHD footer last.
//!
//! How: [`restore_into`] writes chunks at arbitrary, unaligned offsets, segment by segment.
//! The target assembles them into windows of `max(segment size, 4 MiB)` (4 MiB aligned, so
//! a window is at most one Put Page when its data is dense) and, when every segment of a
//! window is done, hands it to the [`PageWriter`], which coalesces data runs separated by
//! short zero gaps into requests of up to 4 MiB and keeps `parallel` of them in flight.
//! Memory is bounded by the windows being assembled (about one per restore thread) plus the
//! requests in flight, never by the disk size.
//!
//! Invariants:
//! - The footer is written last, after every window is confirmed: an interrupted restore never
//!   leaves a blob that looks like a complete VHD. Restoring onto an existing blob clears its
//!   old footer first.
//! - On an existing blob (`existing`, or `resume`), pages written on the target but zero in the
//!   snapshot are cleared, so the blob ends up byte-identical to the snapshot.
//! - A window is recorded in the resume journal only after the service confirmed every request
//!   for it. `resume` skips exactly the recorded windows, without reading their chunks, and
//!   redoes everything else, so a lost journal costs time, never correctness. The journal is
//!   keyed by snapshot id and blob URL without query (no SAS is written to disk), names the
//!   window size, and is removed after success.
//! - Limits of the profile are checked before anything is sent.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::azure::pagewriter::{
    PageWriter, Submitter, Window, WriterOptions, DEFAULT_COALESCE_GAP, DEFAULT_PARALLEL,
};
use crate::azure::{
    BlobClient, BlobOptions, Profile, AZURESTACK_MAX_MANAGED_DISK, AZURESTACK_MAX_PAGE_BLOB,
    AZURE_MAX_PAGE_BLOB, MAX_PUT_PAGE,
};
use crate::error::{Error, Result};
use crate::format::vhd_footer::{self as footer, DiskType, Footer, FOOTER_LEN};
use crate::index::SnapshotSummary;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{restore_into, DiskTarget, OutputFormat, RestoreReport};

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
    /// Put Page requests in flight; 0: [`DEFAULT_PARALLEL`].
    pub parallel: usize,
    /// Zero gaps up to this many bytes are sent inside a request instead of splitting it
    /// (they count as written pages); `None`: [`DEFAULT_COALESCE_GAP`].
    pub coalesce_gap: Option<u64>,
}

/// The outcome of a page blob restore (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct PageBlobRestoreReport {
    #[serde(flatten)]
    pub restore: RestoreReport,
    pub profile: Profile,
    pub api_version: String,
    /// Size of the blob: the disk rounded up to a MiB, plus the footer.
    #[serde(rename = "blob_size_bytes")]
    pub blob_size: u64,
    /// Serialised once, as the restore's `vhd_current_size_bytes`.
    #[serde(skip)]
    pub vhd_current_size: u64,
    pub unique_id: String,
    /// Requests that wrote pages: Put Page and clears, the footer included.
    pub requests: u64,
    pub put_requests: u64,
    pub clear_requests: u64,
    /// Bytes sent with Put Page: data pages, coalesced zeros and the footer.
    pub uploaded_bytes: u64,
    /// Zero bytes sent inside coalesced Put Page requests (they count as written pages).
    pub coalesced_zero_bytes: u64,
    pub coalesce_gap_bytes: u64,
    pub parallel: usize,
    /// Size of the windows the disk is cut into (and the journal records).
    pub window_bytes: u64,
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
    let client = BlobClient::new(url, &options.blob)?;
    restore_with_client(repo, snapshot, &client, options, progress)
}

/// [`restore_to_page_blob`] through a client the caller made (one holding the blob's lease,
/// for a standby sync); `options.blob` is not used.
pub fn restore_with_client(
    repo: &Repo,
    snapshot: &SnapshotSummary,
    client: &BlobClient,
    options: &PageBlobRestoreOptions,
    progress: &dyn Progress,
) -> Result<PageBlobRestoreReport> {
    let started = Instant::now();
    let manifest = repo.load_manifest(&snapshot.id)?;
    let profile = client.profile();
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

    // Windows are 4 MiB aligned (segment sizes are powers of two), at least one Put Page.
    let window = u64::from(manifest.segment_size).max(MAX_PUT_PAGE as u64);
    let journal_dir = options
        .journal_dir
        .clone()
        .unwrap_or_else(default_journal_dir);
    let journal = journal_path(&journal_dir, &snapshot.id, &client.identity());
    let header = format!(
        "stackvault-resume v2 {} window={window} {}",
        snapshot.id,
        client.identity()
    );
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
            confirmed.retain(|&o| o % window == 0 && o < data_size);
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
    let journal_file = Mutex::new(open_journal(&journal, &header, !confirmed.is_empty())?);
    let confirm = |offset: u64| -> Result<()> {
        let mut j = journal_file
            .lock()
            .map_err(|_| Error::Internal("resume journal lock poisoned".into()))?;
        writeln!(j, "{offset}").map_err(|e| Error::io("write resume journal", &journal, e))
    };

    let writer_options = WriterOptions {
        coalesce_gap: options.coalesce_gap.unwrap_or(DEFAULT_COALESCE_GAP),
        parallel: if options.parallel == 0 {
            DEFAULT_PARALLEL
        } else {
            options.parallel
        },
    };
    let writer = PageWriter::new(client, writer_options, target_ranges);
    let counts = writer.run(&confirm, |submitter| {
        let target = PageBlobTarget {
            submitter,
            window,
            virtual_size: manifest.virtual_size,
            data_size,
            assembling: Mutex::new(HashMap::new()),
            confirmed: &confirmed,
        };
        let counts = restore_into(repo, &snapshot.id, &manifest, &target, progress)?;
        let left = target.assembling.lock().map(|a| a.len()).unwrap_or(1);
        if left != 0 {
            return Err(Error::Internal(format!(
                "{left} windows were never completed by the restore"
            )));
        }
        Ok(counts)
    })?;
    writer.put(data_size, &page_blob_footer(data_size, unique_id).encode())?;
    let _ = fs::remove_file(&journal);

    let s = writer.stats();
    let clear_requests = s.clear_requests + u64::from(on_existing);
    Ok(PageBlobRestoreReport {
        restore: RestoreReport {
            snapshot_id: snapshot.id.clone(),
            disk: manifest.meta.disk.clone(),
            target: shown,
            output_format: OutputFormat::VhdFixed,
            virtual_size: manifest.virtual_size,
            bytes_written: counts.bytes_written,
            zero_bytes: counts.zero_bytes,
            chunks: counts.chunks,
            duration_ms: started.elapsed().as_millis() as u64,
            throughput_bytes_per_second: crate::progress::bytes_per_second(
                s.put_bytes,
                started.elapsed(),
            ),
            vhd_current_size: Some(data_size),
        },
        profile,
        api_version: client.api_version(),
        blob_size,
        vhd_current_size: data_size,
        unique_id: footer::format_uuid(&unique_id),
        requests: s.put_requests + clear_requests,
        put_requests: s.put_requests,
        clear_requests,
        uploaded_bytes: s.put_bytes,
        coalesced_zero_bytes: s.coalesced_zero_bytes,
        coalesce_gap_bytes: writer_options.coalesce_gap,
        parallel: writer_options.parallel,
        window_bytes: window,
        windows_resumed: confirmed.len() as u64,
        windows_uploaded: s.windows,
        notes: client.notes(),
    })
}

/// The footer of a fixed VHD page blob with `data_size` bytes of disk (a whole number of
/// MiB), written last by a restore and by a standby sync that resized the blob.
pub(crate) fn page_blob_footer(data_size: u64, unique_id: [u8; 16]) -> Footer {
    // "win " (Hyper-V) as creator: readers such as qemu then take the size from the footer.
    Footer {
        features: 2,
        version: footer::FILE_FORMAT_VERSION,
        data_offset: footer::NO_DATA_OFFSET,
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

/// A window being assembled from its segments' chunks.
struct Assembling {
    data: Vec<u8>,
    /// Bytes of the virtual disk whose segments are done.
    done: u64,
}

struct PageBlobTarget<'s, 'w, 'a> {
    submitter: &'s Submitter<'w, 'a>,
    window: u64,
    virtual_size: u64,
    data_size: u64,
    /// Windows being assembled, by offset.
    assembling: Mutex<HashMap<u64, Assembling>>,
    /// Windows the resume journal confirms.
    confirmed: &'s HashSet<u64>,
}

impl PageBlobTarget<'_, '_, '_> {
    fn window_of(&self, offset: u64) -> u64 {
        offset - offset % self.window
    }

    /// Bytes of the blob the window at `start` covers (the last one ends at the MiB-rounded
    /// disk size).
    fn window_len(&self, start: u64) -> u64 {
        self.window.min(self.data_size.saturating_sub(start))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<u64, Assembling>>> {
        self.assembling
            .lock()
            .map_err(|_| Error::Internal("window lock poisoned".into()))
    }

    fn entry_len(&self, start: u64) -> Result<usize> {
        usize::try_from(self.window_len(start))
            .map_err(|_| Error::Internal(format!("window at {start} too large")))
    }
}

impl DiskTarget for PageBlobTarget<'_, '_, '_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = self.window_of(offset);
        let len = self.entry_len(start)?;
        let within = (offset - start) as usize;
        let end = within
            .checked_add(data.len())
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "chunk at {offset} of {} bytes crosses a window boundary",
                    data.len()
                ))
            })?;
        let mut assembling = self.lock()?;
        let w = assembling.entry(start).or_insert_with(|| Assembling {
            data: vec![0u8; len],
            done: 0,
        });
        w.data[within..end].copy_from_slice(data);
        Ok(())
    }

    fn segment_done(&self, offset: u64, len: u64) -> Result<()> {
        let start = self.window_of(offset);
        let expected = (start + self.window).min(self.virtual_size) - start;
        let entry_len = self.entry_len(start)?;
        let complete = {
            let mut assembling = self.lock()?;
            let w = assembling.entry(start).or_insert_with(|| Assembling {
                data: vec![0u8; entry_len],
                done: 0,
            });
            w.done += len;
            if w.done >= expected {
                assembling.remove(&start)
            } else {
                None
            }
        };
        match complete {
            Some(w) => self.submitter.submit(Window {
                offset: start,
                data: w.data,
            }),
            None => Ok(()),
        }
    }

    fn has_segment(&self, offset: u64) -> bool {
        self.confirmed.contains(&self.window_of(offset))
    }

    /// A restore from a remote repository writes out of disk order: windows stay assembled
    /// until their last chunk comes, so at most a few windows' worth is in progress.
    fn reorder_limit(&self) -> u64 {
        4 * self.window
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
