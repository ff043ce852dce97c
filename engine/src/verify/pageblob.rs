//! Target mode on a page blob (feature `azure`): [`open_page_blob_target`] opens a restored
//! page blob (a fixed VHD, or a raw disk without a footer) as a [`DiskSource`] that
//! [`verify_target`](super::verify_target) compares with a snapshot. It reads through the
//! shared page blob reader ([`crate::azure::pagereader`]), segment by segment, and never
//! writes to the blob.

use crate::azure::pagereader::{PageReader, DEFAULT_READ_PARALLEL};
use crate::azure::{BlobClient, BlobOptions};
use crate::error::Result;
use crate::format::manifest::{ContainerFormat, SourceInfo};
use crate::format::vhd_footer::DiskType;
use crate::source::pageblob::BlobLayout;
use crate::source::{DiskSource, ExtentKind, SourceExtent};

/// A page blob read for [`verify_target`](super::verify_target) through the shared page blob
/// reader ([`PageReader`]): each segment asks Get Page Ranges for itself only (ranged),
/// fetches only the written pages, [`READ_PARALLEL`] ranged GETs in flight, so memory is the
/// segments being compared, whatever the disk size. Every read carries `If-Match` with the ETag seen at open.
pub struct PageBlobTarget {
    client: BlobClient,
    layout: BlobLayout,
}

/// Ranged GETs in flight per segment being compared.
pub const READ_PARALLEL: usize = DEFAULT_READ_PARALLEL;

/// Opens the page blob at `url` (a fixed VHD, or a raw disk without a footer) for
/// [`verify_target`](super::verify_target).
pub fn open_page_blob_target(url: &str, options: &BlobOptions) -> Result<PageBlobTarget> {
    let client = BlobClient::new(url, options)?;
    let layout = BlobLayout::read(&client)?;
    Ok(PageBlobTarget { client, layout })
}

impl PageBlobTarget {
    fn reader(&self) -> PageReader<'_> {
        PageReader::new(&self.client, self.layout.props.etag.clone(), READ_PARALLEL)
    }
}

impl DiskSource for PageBlobTarget {
    fn virtual_size(&self) -> u64 {
        self.layout.virtual_size
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.client.display_url().to_string(),
            format: if self.layout.footer.is_some() {
                ContainerFormat::Vhd(DiskType::Fixed)
            } else {
                ContainerFormat::Raw
            },
            vhd: self.layout.vhd.clone(),
            blob: None,
        }
    }

    /// One data extent: the reader asks the service which pages are written, window by window.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let len = len.min(self.layout.virtual_size.saturating_sub(offset));
        Ok(vec![SourceExtent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reader().read(offset, buf).map(drop)
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        let reader = self.reader();
        reads
            .iter_mut()
            .try_for_each(|(at, buf)| reader.read(*at, buf).map(drop))
    }
}
