//! Raw disk images and block devices.
//!
//! Holes of sparse files are found with `SEEK_DATA`/`SEEK_HOLE` and reported as zero extents,
//! so a mostly empty 64 GiB image costs only its data. Reads are positioned (`pread`), so any
//! number of threads can read one source at once.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{DiskSource, ExtentKind, SourceExtent};
use crate::error::{Error, Result};
use crate::format::manifest::{ContainerFormat, SourceInfo};

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io("open source", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat source", path, e))?;
        if meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "source {} is a directory, not a disk image",
                path.display()
            )));
        }
        // Block devices report length 0 in their metadata; their end is found by seeking.
        let size = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .map_err(|e| Error::io("size source", path, e))?
        };
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl DiskSource for RawFile {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.path.display().to_string(),
            format: ContainerFormat::Raw,
            vhd: None,
            blob: None,
        }
    }

    fn small_reads_are_cheap(&self) -> bool {
        true
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        Ok(sparse_extents(&self.file, self.size, offset, len))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::io("read source (file shrank during backup?)", &self.path, e)
            } else {
                Error::io("read source", &self.path, e)
            }
        })
    }
}

/// The data and hole extents of `[offset, offset + len)` of a file of `size` bytes, found
/// with `SEEK_DATA`/`SEEK_HOLE` (offsets are file offsets). A file system that cannot tell
/// reports everything as data.
pub(crate) fn sparse_extents(file: &File, size: u64, offset: u64, len: u64) -> Vec<SourceExtent> {
    let seek = |at: u64, hole: bool| -> Option<u64> {
        let whence = if hole {
            rustix::fs::SeekFrom::Hole(at)
        } else {
            rustix::fs::SeekFrom::Data(at)
        };
        match rustix::fs::seek(file, whence) {
            Ok(pos) => Some(pos.min(size)),
            // ENXIO: no data after `at`.
            Err(e) if e == rustix::io::Errno::NXIO => Some(size),
            Err(_) => None,
        }
    };
    let end = (offset + len).min(size);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let Some(data) = seek(pos, false) else {
            out.push(SourceExtent {
                offset: pos,
                len: end - pos,
                kind: ExtentKind::Data,
            });
            break;
        };
        let data = data.min(end);
        if data > pos {
            out.push(SourceExtent {
                offset: pos,
                len: data - pos,
                kind: ExtentKind::Zero,
            });
        }
        if data >= end {
            break;
        }
        let hole = seek(data, true).unwrap_or(end).min(end);
        // A file system may report data it cannot split finer; never make progress zero.
        let hole = hole.max(data + 1);
        out.push(SourceExtent {
            offset: data,
            len: hole - data,
            kind: ExtentKind::Data,
        });
        pos = hole;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_extents() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let path = dir.path().join("sparse.img");
        let mut f = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
        f.set_len(16 << 20)
            .map_err(|e| Error::io("set_len", &path, e))?;
        f.seek(SeekFrom::Start(8 << 20))
            .map_err(|e| Error::io("seek", &path, e))?;
        f.write_all(&[1u8; 65536])
            .map_err(|e| Error::io("write", &path, e))?;
        drop(f);
        let src = RawFile::open(&path)?;
        assert_eq!(src.virtual_size(), 16 << 20);
        let ext = src.extents(0, 16 << 20)?;
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert_eq!(total, 16 << 20);
        let data: u64 = ext
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.len)
            .sum();
        // File systems without hole reporting call it all data; those with it, little.
        assert!(data >= 65536);
        let mut buf = [0u8; 4];
        src.read_at((8 << 20) + 10, &mut buf)?;
        assert_eq!(buf, [1; 4]);
        Ok(())
    }
}
