//! Positioned reads over a file or an in-memory byte slice.
//!
//! The VHD parser reads through this small trait so that the same code serves a backup (a
//! file, read by many threads at once with `pread`) and the fuzz target and unit tests (a
//! `&[u8]`). A read past the end is `UnexpectedEof`, which the parser turns into a
//! [`Error::SourceDamaged`] naming the structure it was reading.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::source::{ExtentKind, SourceExtent};

/// Something with a length that can be read at any offset, from any thread.
pub trait ReadAt: Send + Sync {
    /// Length in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; `UnexpectedEof` when the range runs past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Data and hole extents of `[offset, offset + len)` (sparse files); by default all data.
    fn extents(&self, offset: u64, len: u64) -> Vec<SourceExtent> {
        vec![SourceExtent {
            offset,
            len,
            kind: ExtentKind::Data,
        }]
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let eof = || io::Error::from(io::ErrorKind::UnexpectedEof);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// A read-only file (or block device) with its length taken once at open.
#[derive(Debug)]
pub struct FileAt {
    file: File,
    len: u64,
}

impl FileAt {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        // Seeking finds the end of block devices too, whose metadata length is 0.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("size", path, e))?;
        Ok(FileAt { file, len })
    }
}

impl ReadAt for FileAt {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The file is allowed to shrink under us; that must still be an error, not zeros.
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    /// Holes of a sparse VHD file (qemu writes fixed VHDs sparse) are never read.
    fn extents(&self, offset: u64, len: u64) -> Vec<SourceExtent> {
        crate::source::raw::sparse_extents(&self.file, self.len, offset, len)
    }
}
