//! Disk sources: what a backup reads.
//!
//! A [`DiskSource`] presents the **guest disk's address space**: its virtual size, a map of
//! which ranges hold data and which are known to be zero (unallocated blocks, sparse holes),
//! and positioned reads. Chunking runs over this address space, never over container bytes,
//! so different containers of the same disk deduplicate completely. Known-zero ranges are
//! never read. Sources know nothing of repositories.

#[cfg(feature = "azure")]
pub mod pageblob;
mod raw;
pub mod vhd;

#[cfg(feature = "azure")]
pub use pageblob::PageBlobSource;
pub use raw::RawFile;
pub use vhd::VhdDisk;

use std::path::{Path, PathBuf};

use crate::changes::ChangeList;
use crate::error::{Error, Result};
use crate::format::manifest::{ChangeSource, SourceInfo};

/// What a source itself knows about changes since the disk a parent snapshot was taken from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceChanges {
    /// The source cannot tell (raw images): everything must be read.
    Unknown,
    /// These ranges may differ from the parent's disk; everything else is identical.
    Changes(ChangeList),
    /// The source is a child of some other disk than the parent's: its change knowledge does
    /// not apply, and trusting it would be wrong.
    Mismatch(String),
}

/// Whether a range of the virtual disk holds data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Must be read.
    Data,
    /// Known to read as zeros without reading (hole, unallocated block).
    Zero,
}

/// A range of the virtual disk and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// A virtual disk to back up.
pub trait DiskSource: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Where the data comes from and in which container format.
    fn info(&self) -> SourceInfo;

    /// The allocation map of `[offset, offset + len)`: ordered extents that cover the range
    /// exactly. A source that cannot tell reports everything as data.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>>;

    /// Fills `buf` with the virtual disk's bytes at `offset`. The range lies inside the disk.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Fills each buffer with the virtual disk's bytes at its offset (ranges inside the
    /// disk). This default reads them in turn; a source whose reads wait on the network
    /// serves them concurrently, so that the link stays busy while each request waits for
    /// its answer.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in reads.iter_mut() {
            self.read_at(*offset, buf)?;
        }
        Ok(())
    }

    /// Whether reading a segment in small pieces costs no more than reading it at once (a
    /// local file): then a backup reads, splits and hashes each piece while it is in the CPU
    /// cache (`backup::streamed`). Sources that wait on the network batch their reads.
    fn small_reads_are_cheap(&self) -> bool {
        false
    }

    /// Changes relative to the disk described by `parent` (the source recorded in the parent
    /// snapshot). Differencing containers know them; most sources do not.
    fn changes_since(&self, parent: &SourceInfo) -> Result<SourceChanges> {
        let _ = parent;
        Ok(SourceChanges::Unknown)
    }

    /// How the snapshot names change knowledge from [`DiskSource::changes_since`] (its
    /// `change_source`).
    fn changes_label(&self) -> ChangeSource {
        ChangeSource::Chain(self.info().format)
    }
}

/// Fills `dest` (disk bytes from `at`) as the source's allocation `map` of that range says:
/// reads the data extents (in one [`DiskSource::read_many`]), zeroes the others. Returns the
/// bytes read.
pub fn fill_from_map(
    source: &dyn DiskSource,
    map: &[SourceExtent],
    at: u64,
    dest: &mut [u8],
) -> Result<u64> {
    let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(map.len());
    let mut rest = dest;
    let mut pos = at;
    for e in map {
        let skip = e
            .offset
            .checked_sub(pos)
            .and_then(|s| usize::try_from(s).ok())
            .unwrap_or(usize::MAX);
        let len = usize::try_from(e.len).unwrap_or(usize::MAX);
        if skip.saturating_add(len) > rest.len() {
            return Err(Error::InvalidArgument(format!(
                "extent at {} ({} bytes) is out of order or outside the range read at {at}",
                e.offset, e.len
            )));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (piece, tail) = tail.split_at_mut(len);
        rest = tail;
        pos = e.offset + e.len;
        match e.kind {
            ExtentKind::Zero => piece.fill(0),
            ExtentKind::Data => reads.push((e.offset, piece)),
        }
    }
    let bytes = reads.iter().map(|(_, b)| b.len() as u64).sum();
    source.read_many(&mut reads)?;
    Ok(bytes)
}

/// Which container format to read a source as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceFormat {
    /// Detect from the content: a VHD footer cookie (`conectix`, at the end or at offset 0)
    /// or a dynamic header (`cxsparse` at offset 512) makes it a VHD, so that a damaged or
    /// truncated VHD is refused rather than read as raw; `vhdxfile` at offset 0 is a VHDX,
    /// refused as unsupported; anything else is raw. The file name plays no part.
    #[default]
    Auto,
    Raw,
    Vhd,
}

impl SourceFormat {
    /// Parses `auto`, `raw` or `vhd`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(SourceFormat::Auto),
            "raw" => Ok(SourceFormat::Raw),
            "vhd" => Ok(SourceFormat::Vhd),
            other => Err(Error::Usage(format!(
                "source format {other:?}: use auto, raw or vhd"
            ))),
        }
    }
}

/// How to open a source.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    pub format: SourceFormat,
    /// Parent of a differencing VHD, instead of what its parent locators say.
    pub parent: Option<PathBuf>,
}

/// Opens a disk source at `path`.
pub fn open_source(path: &Path, options: &SourceOptions) -> Result<Box<dyn DiskSource>> {
    let vhd = match options.format {
        SourceFormat::Raw => false,
        SourceFormat::Vhd => true,
        SourceFormat::Auto => {
            // RawFile::open also rejects directories with a clear message.
            RawFile::open(path)?;
            match vhd::sniff(&vhd::FileAt::open(path)?) {
                vhd::Sniffed::Vhd => true,
                vhd::Sniffed::Vhdx => {
                    return Err(vhd::vhdx_unsupported(&path.display().to_string()))
                }
                vhd::Sniffed::Other => false,
            }
        }
    };
    if vhd {
        return Ok(Box::new(VhdDisk::open(path, options.parent.as_deref())?));
    }
    if options.parent.is_some() {
        return Err(Error::Usage(format!(
            "--parent applies to differencing VHDs; {} is read as raw",
            path.display()
        )));
    }
    Ok(Box::new(RawFile::open(path)?))
}

/// Opens the page blob at `url` as a backup source; a build without the `azure` feature says
/// so ([`Feature::missing`](crate::features::Feature::missing)).
pub fn open_page_blob(
    url: &str,
    options: &crate::azure::BlobOptions,
) -> Result<Box<dyn DiskSource>> {
    #[cfg(feature = "azure")]
    return Ok(Box::new(PageBlobSource::open(url, options)?));
    #[cfg(not(feature = "azure"))]
    let _unused = (url, options);
    #[cfg(not(feature = "azure"))]
    return Err(crate::features::Feature::Azure.missing());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose byte at offset `o` is `o % 251 + 1` (never zero).
    struct Counting(u64);

    impl DiskSource for Counting {
        fn virtual_size(&self) -> u64 {
            self.0
        }
        fn info(&self) -> SourceInfo {
            SourceInfo {
                path: "counting".into(),
                format: crate::format::manifest::ContainerFormat::Raw,
                vhd: None,
                blob: None,
            }
        }
        fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
            Ok(vec![SourceExtent {
                offset,
                len,
                kind: ExtentKind::Data,
            }])
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251 + 1) as u8;
            }
            Ok(())
        }
    }

    fn extent(offset: u64, len: u64, kind: ExtentKind) -> SourceExtent {
        SourceExtent { offset, len, kind }
    }

    #[test]
    fn fill_from_map_reads_data_and_zeroes_the_rest() -> Result<()> {
        let src = Counting(1 << 20);
        let map = [
            extent(1000, 100, ExtentKind::Zero),
            extent(1100, 50, ExtentKind::Data),
            extent(1150, 10, ExtentKind::Zero),
            extent(1160, 40, ExtentKind::Data),
        ];
        let mut buf = vec![0xeeu8; 200];
        assert_eq!(fill_from_map(&src, &map, 1000, &mut buf)?, 90);
        for (i, &b) in buf.iter().enumerate() {
            let o = 1000 + i as u64;
            let zero = o < 1100 || (1150..1160).contains(&o);
            assert_eq!(b, if zero { 0 } else { (o % 251 + 1) as u8 }, "byte {o}");
        }
        // Extents out of order or past the buffer are refused, never written elsewhere.
        let swapped = [map[1], map[0]];
        assert!(fill_from_map(&src, &swapped, 1000, &mut buf).is_err());
        let long = [extent(1000, 201, ExtentKind::Data)];
        assert!(fill_from_map(&src, &long, 1000, &mut buf).is_err());
        Ok(())
    }
}
