//! Disk sources: what a backup reads.
//!
//! A [`DiskSource`] presents the **guest disk's address space**: its virtual size, a map of
//! which ranges hold data and which are known to be zero (unallocated blocks, sparse holes),
//! and positioned reads. Chunking runs over this address space, never over container bytes,
//! so different containers of the same disk deduplicate completely. Known-zero ranges are
//! never read. Sources know nothing of repositories.

pub mod pageblob;
mod raw;

pub use pageblob::PageBlobSource;
pub use raw::RawFile;

use std::path::Path;

use crate::changes::ChangeList;
use crate::error::Result;
use crate::format::manifest::SourceInfo;

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

    /// Changes relative to the disk described by `parent` (the source recorded in the parent
    /// snapshot). Differencing containers know them; most sources do not.
    fn changes_since(&self, parent: &SourceInfo) -> Result<SourceChanges> {
        let _ = parent;
        Ok(SourceChanges::Unknown)
    }
}

/// Opens a disk source at `path`.
pub fn open_source(path: &Path) -> Result<Box<dyn DiskSource>> {
    Ok(Box::new(RawFile::open(path)?))
}
