//! A page blob disk (Azure, Azure Stack Hub) as a backup source, read over the Blob REST API.
//!
//! The blob is a fixed VHD: the disk's bytes and a 512-byte footer. Opening reads the
//! footer, checks it and takes the virtual size from its current size; a blob without a
//! footer cookie is read as a raw disk of the blob's size. The written page ranges are asked
//! once, in windows (see [`crate::azure::PAGE_RANGE_WINDOW`]); everything else is reported as
//! [`ExtentKind::Zero`] and never read. Data ranges separated by small gaps are merged so a
//! fragmented disk costs fewer requests (the gaps read as zeros anyway).
//!
//! Every read carries `If-Match` with the ETag seen at open: if the blob changes during the
//! backup, reads fail instead of producing a torn disk. The blob snapshot read (the URL's
//! `snapshot=`) and that ETag are recorded in the snapshot's source information; the next
//! backup of the same blob asks the service only for the pages changed since that blob
//! snapshot ([`DiskSource::changes_since`]). Back up from a blob snapshot (its URL
//! has `snapshot=`) to back up a disk that is in use. Reads are independent ranged GETs, so
//! any number of threads can read at once: a segment's data is fetched in pieces of
//! [`READ_PIECE`], [`READ_CONCURRENCY`] at a time, because across regions each request waits a
//! round trip before its data flows.

use super::{DiskSource, ExtentKind, SourceChanges, SourceExtent};
use crate::azure::{BlobClient, BlobOptions, BlobProperties};
use crate::changes::ChangeList;
use crate::error::{Error, Result};
use crate::format::manifest::{BlobInfo, ChangeSource, ContainerFormat, SourceInfo};
use crate::format::vhd_footer::{DiskType, Footer, FOOTER_COOKIE, FOOTER_LEN};

/// Gaps between written ranges up to this size are read rather than skipped.
const MERGE_GAP: u64 = 64 * 1024;

/// Ranged GETs one [`DiskSource::read_many`] keeps in flight, per backup worker: each
/// waits a round trip (tens of ms across regions) before its data flows, so one read at a
/// time per core would leave a WAN link mostly idle.
pub const READ_CONCURRENCY: usize = 8;
/// Reads are cut into GETs of at most this size, so that one segment's data is fetched by
/// several requests at once.
pub const READ_PIECE: usize = 512 * 1024;

/// A page blob read as a disk.
#[derive(Debug)]
pub struct PageBlobSource {
    client: BlobClient,
    blob_size: u64,
    virtual_size: u64,
    etag: Option<String>,
    footer: Option<Footer>,
    /// The footer's metadata, recorded in the snapshot (unique id for restores and
    /// differencing checks).
    vhd: Option<crate::format::manifest::VhdInfo>,
    /// Written ranges of the disk part, sorted, merged, end exclusive.
    written: Vec<(u64, u64)>,
    /// The blob snapshot read (`snapshot=` of the URL), `None` for the base blob.
    snapshot: Option<String>,
}

/// The `snapshot=` parameter of a blob URL's query, decoded.
pub fn snapshot_of_url(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "snapshot")
        .and_then(|(_, v)| crate::source::vhd::dynamic::percent_decode(v))
        .filter(|v| !v.is_empty())
}

impl PageBlobSource {
    /// Opens the blob at `url` (see [`BlobClient::new`] for the accepted forms).
    pub fn open(url: &str, options: &BlobOptions) -> Result<Self> {
        let snapshot = snapshot_of_url(url);
        if snapshot.is_some() && options.account_key.is_some() {
            // Shared Key requests carry no query of the URL: they would read the base blob.
            return Err(Error::Usage(format!(
                "{}: a blob snapshot URL is read with its SAS; drop --account-key-env or \
                 give a SAS URL of the snapshot",
                crate::azure::redact(url)
            )));
        }
        let mut source = Self::with_client(BlobClient::new(url, options)?)?;
        source.snapshot = snapshot;
        Ok(source)
    }

    /// Opens the blob `client` addresses.
    pub fn with_client(client: BlobClient) -> Result<Self> {
        let BlobLayout {
            props,
            footer: footer_found,
            vhd,
            virtual_size,
        } = BlobLayout::read(&client)?;
        let blob_size = props.size;
        let mut written: Vec<(u64, u64)> = Vec::new();
        for (s, e) in client.written_ranges(0, virtual_size)? {
            let e = e.min(virtual_size);
            if s >= e {
                continue;
            }
            match written.last_mut() {
                Some(last) if s <= last.1 + MERGE_GAP => last.1 = last.1.max(e),
                _ => written.push((s, e)),
            }
        }
        Ok(PageBlobSource {
            client,
            blob_size,
            virtual_size,
            etag: props.etag,
            footer: footer_found,
            vhd,
            written,
            snapshot: None,
        })
    }

    /// The VHD footer, when the blob has one.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Size of the blob (disk and footer).
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Bytes of the disk in written page ranges (after merging small gaps).
    pub fn written_bytes(&self) -> u64 {
        self.written.iter().map(|(s, e)| e - s).sum()
    }

    /// The client, for its notes and service version.
    pub fn client(&self) -> &BlobClient {
        &self.client
    }

    /// Asks the service which ranges changed since blob snapshot `prev_snapshot` (Get Page
    /// Ranges with `prevsnapshot`), as a change list for an incremental backup.
    pub fn changes_since_snapshot(&self, prev_snapshot: &str) -> Result<ChangeList> {
        let ranges = self
            .client
            .page_ranges(0, self.blob_size, Some(prev_snapshot))?;
        ChangeList::new(None, ranges, self.client.display_url())?
            .with_disk_size(self.blob_size, self.client.display_url())
            .map(|l| l.with_base(prev_snapshot))
    }
}

/// The layout of a page blob disk: its properties, its VHD footer if it has one, and the size
/// of the disk in it. Shared by backup sources and `verify --target`.
pub struct BlobLayout {
    pub props: BlobProperties,
    pub footer: Option<Footer>,
    /// The footer's metadata, as a snapshot records it.
    pub vhd: Option<crate::format::manifest::VhdInfo>,
    pub virtual_size: u64,
}

impl BlobLayout {
    /// Reads the properties and the footer of `client`'s blob, and checks them.
    pub fn read(client: &BlobClient) -> Result<BlobLayout> {
        let shown = client.display_url().to_string();
        let props = client.properties()?.ok_or_else(|| Error::Http {
            url: shown.clone(),
            status: 404,
            code: "BlobNotFound".into(),
            message: "the source blob does not exist".into(),
        })?;
        if !props.blob_type.is_empty() && props.blob_type != "PageBlob" {
            return Err(Error::InvalidArgument(format!(
                "{shown} is a {}, not a page blob disk",
                props.blob_type
            )));
        }
        let blob_size = props.size;
        let mut footer_found = None;
        let mut vhd = None;
        if blob_size >= FOOTER_LEN as u64 && blob_size.is_multiple_of(512) {
            let mut raw = [0u8; FOOTER_LEN];
            client.read_range(
                blob_size - FOOTER_LEN as u64,
                &mut raw,
                props.etag.as_deref(),
            )?;
            if raw[..8] == FOOTER_COOKIE {
                let at = blob_size - FOOTER_LEN as u64;
                let (f, warning) = Footer::decode(&raw, &shown, at)?;
                if f.disk_type != DiskType::Fixed {
                    return Err(Error::InvalidArgument(format!(
                        "{shown} is a {} VHD; page blob disks must be fixed VHDs",
                        f.disk_type.as_str()
                    )));
                }
                // A footer whose checksum is wrong is trusted only when its size is the blob's.
                let data = blob_size - FOOTER_LEN as u64;
                if f.current_size > data || (warning.is_some() && f.current_size != data) {
                    return Err(Error::source_damaged(
                        &shown,
                        at,
                        format!(
                            "VHD footer says the disk is {} bytes, but the blob holds {data} \
                             bytes before it{}",
                            f.current_size,
                            if warning.is_some() {
                                " (and the footer checksum is wrong)"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                if let Some(w) = &warning {
                    crate::progress::notice(&format!("warning: {w}"));
                }
                footer_found = Some(f);
                vhd = Some(crate::source::vhd::fixed_footer_info(
                    &raw,
                    &shown,
                    blob_size - FOOTER_LEN as u64,
                )?);
            }
        }
        let virtual_size = footer_found
            .as_ref()
            .map_or(blob_size, |f: &Footer| f.current_size);
        Ok(BlobLayout {
            props,
            footer: footer_found,
            vhd,
            virtual_size,
        })
    }
}

impl DiskSource for PageBlobSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.client.display_url().to_string(),
            format: if self.footer.is_some() {
                ContainerFormat::Vhd(DiskType::Fixed)
            } else {
                ContainerFormat::Raw
            },
            vhd: self.vhd.clone(),
            blob: Some(BlobInfo {
                snapshot: self.snapshot.clone(),
                etag: self.etag.clone(),
            }),
        }
    }

    /// Since the blob snapshot the parent snapshot recorded, when the parent read this same
    /// blob: Azure answers which pages changed (Get Page Ranges with `prevsnapshot`).
    fn changes_since(&self, parent: &SourceInfo) -> Result<SourceChanges> {
        let Some(prev) = parent.blob.as_ref().and_then(|b| b.snapshot.as_deref()) else {
            return Ok(SourceChanges::Unknown);
        };
        let this = crate::azure::without_query(self.client.display_url());
        if crate::azure::without_query(&parent.path) != this {
            return Ok(SourceChanges::Unknown);
        }
        match self.changes_since_snapshot(prev) {
            Ok(list) => Ok(SourceChanges::Changes(list)),
            // The old snapshot may have been deleted, or the service cannot diff (Azurite):
            // reading everything is always right.
            Err(e @ (Error::Http { .. } | Error::Network { .. })) => {
                crate::progress::notice(&format!(
                    "cannot ask for the pages changed since blob snapshot {prev} ({e}); \
                     reading the whole disk"
                ));
                Ok(SourceChanges::Unknown)
            }
            Err(e) => Err(e),
        }
    }

    fn changes_label(&self) -> ChangeSource {
        ChangeSource::BlobSnapshotDiff
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let end = (offset + len).min(self.virtual_size);
        let mut out = Vec::new();
        let mut pos = offset;
        let first = self.written.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &self.written[first..] {
            if s >= end {
                break;
            }
            let (s, e) = (s.max(pos), e.min(end));
            if s > pos {
                out.push(SourceExtent {
                    offset: pos,
                    len: s - pos,
                    kind: ExtentKind::Zero,
                });
            }
            out.push(SourceExtent {
                offset: s,
                len: e - s,
                kind: ExtentKind::Data,
            });
            pos = e;
        }
        if pos < end {
            out.push(SourceExtent {
                offset: pos,
                len: end - pos,
                kind: ExtentKind::Zero,
            });
        }
        Ok(out)
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        let reads = reads.iter_mut().map(|(at, b)| (*at, &mut **b)).collect();
        crate::azure::pagereader::fetch(&self.client, self.etag.as_deref(), READ_CONCURRENCY, reads)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.virtual_size {
            return Err(Error::InvalidArgument(format!(
                "read of {} bytes at {offset} lies beyond the disk ({} bytes)",
                buf.len(),
                self.virtual_size
            )));
        }
        self.client.read_range(offset, buf, self.etag.as_deref())
    }
}
