//! The bytes of a streamed object ([`Backend::writer`](super::Backend::writer)) until its
//! commit: at most [`SPOOL_AFTER`] bytes in memory, the rest in an unlinked temporary file.
//!
//! A remote store names an object when its upload starts, and a manifest's name (the hash of
//! its bytes) is known only once it is complete, so a remote manifest is kept until then. It
//! grows with the disk (about 1.4 MiB per GiB of data) and is written while the backup's packs
//! are in memory: kept whole in memory, it was the 8 MiB buffer at a 4 GiB gen0's peak.
//! Spooled, it costs no memory while the packs are. At the commit, when they are gone, a
//! small one is read back whole for one request (Azure up to 32 MiB, S3 up to its 64 MiB
//! multipart threshold) and a larger one a piece at a time from the file ([`SpooledFile`]: S3
//! parts one at a time, Azure blocks a few at once), so no store holds more than that whatever
//! the disk's size (read back whole, a manifest passes issue 14's 128 MiB at ~90 GiB of data).
//! Where no temporary file can be made (`TMPDIR` not writable, full), the bytes stay in memory
//! as before, rather than failing a backup at its end.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Bytes a streamed object keeps in memory; past them it is written to its temporary file
/// in pieces of this size.
pub const SPOOL_AFTER: usize = 1 << 20;

/// A streamed object's bytes so far (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Spool {
    /// What is not in the file yet: at most [`SPOOL_AFTER`] bytes.
    memory: Vec<u8>,
    file: Option<File>,
    /// No temporary file could be made: everything stays in memory.
    in_memory_only: bool,
    len: u64,
}

impl Spool {
    /// Bytes held in memory now (for tests of the bound).
    #[cfg(test)]
    fn in_memory(&self) -> usize {
        self.memory.capacity()
    }

    /// The bytes written, once they are all written: still in memory when they fit in
    /// [`SPOOL_AFTER`] (or no temporary file could be made), else all in the file.
    pub(crate) fn finish(mut self) -> std::io::Result<Spooled> {
        let Some(mut file) = self.file.take() else {
            return Ok(Spooled::Memory(self.memory));
        };
        file.write_all(&self.memory)?;
        Ok(Spooled::File(SpooledFile {
            file,
            len: self.len,
        }))
    }

    /// Appends `buf` to the bytes in memory, growing them as a `Vec` does but never past
    /// `limit` at once.
    fn write_to_memory(&mut self, buf: &[u8], limit: usize) -> std::io::Result<usize> {
        let want = self.memory.len() + buf.len();
        if want > self.memory.capacity() {
            let capacity = want
                .max(self.memory.capacity().saturating_mul(2))
                .min(limit.max(want));
            self.memory.reserve_exact(capacity - self.memory.len());
        }
        self.memory.extend_from_slice(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    /// Makes the temporary file at the first need; when none can be made, the bytes stay in
    /// memory from then on, as before spooling existed.
    fn make_file(&mut self) {
        if self.file.is_none() && !self.in_memory_only {
            // Unlinked at once (O_TMPFILE where the file system has it): nothing is left
            // behind whatever happens to this process.
            match tempfile::tempfile() {
                Ok(file) => self.file = Some(file),
                Err(_) => self.in_memory_only = true,
            }
        }
    }
}

/// The error of a spool that could not be read back.
pub(crate) fn read_error(e: std::io::Error) -> crate::error::Error {
    crate::error::Error::io("read spooled object", std::env::temp_dir(), e)
}

/// A streamed object's bytes once complete ([`Spool::finish`]).
#[derive(Debug)]
pub(crate) enum Spooled {
    Memory(Vec<u8>),
    File(SpooledFile),
}

impl Spooled {
    /// The bytes as one buffer, for a store that sends the object in one request.
    pub(crate) fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            Spooled::Memory(bytes) => Ok(bytes),
            Spooled::File(file) => {
                let len = usize::try_from(file.len()).map_err(|_| {
                    std::io::Error::other(format!("a spooled object of {} bytes", file.len()))
                })?;
                file.read_at(0, len)
            }
        }
    }
}

/// A complete spooled object in its temporary file, read a piece at a time at any offset,
/// from several threads at once (positioned reads: no shared cursor), so that an upload in
/// pieces holds only the pieces in flight.
#[derive(Debug)]
pub(crate) struct SpooledFile {
    file: File,
    len: u64,
}

impl SpooledFile {
    /// Bytes in the object.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The `len` bytes at `offset`; a range past the end is an error, never a short piece.
    pub(crate) fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut piece = Vec::new();
        self.read_into(offset, len, &mut piece)?;
        Ok(piece)
    }

    /// [`SpooledFile::read_at`] into `piece` (its allocation reused).
    pub(crate) fn read_into(
        &self,
        offset: u64,
        len: usize,
        piece: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.len);
        if end.is_none() {
            return Err(std::io::Error::other(format!(
                "{len} bytes at {offset} of a spooled object of {} bytes",
                self.len
            )));
        }
        piece.clear();
        piece.resize(len, 0);
        self.file.read_exact_at(piece, offset)
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.memory.len() + buf.len() <= SPOOL_AFTER {
            return self.write_to_memory(buf, SPOOL_AFTER);
        }
        self.make_file();
        let (Some(file), memory) = (self.file.as_mut(), &mut self.memory) else {
            return self.write_to_memory(buf, usize::MAX);
        };
        let with_temp_dir = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "spool to a temporary file in {}: {e}",
                    std::env::temp_dir().display()
                ),
            )
        };
        file.write_all(memory).map_err(with_temp_dir)?;
        memory.clear();
        if buf.len() > SPOOL_AFTER {
            file.write_all(buf).map_err(with_temp_dir)?;
            self.len += buf.len() as u64;
            return Ok(buf.len());
        }
        self.write_to_memory(buf, SPOOL_AFTER)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn memory_stays_at_one_piece_whatever_the_size() -> std::io::Result<()> {
        // A 4 GiB disk's manifest is 5.5 MiB: this one is larger, in the pieces a manifest
        // writer writes, with a few larger than a piece.
        let data = pattern(9 * SPOOL_AFTER + 12345);
        let mut spool = Spool::default();
        let mut at = 0;
        for (i, len) in [1000, 77, SPOOL_AFTER + 3, 65536]
            .iter()
            .cycle()
            .enumerate()
        {
            let end = (at + len).min(data.len());
            spool.write_all(&data[at..end])?;
            at = end;
            assert!(spool.in_memory() <= SPOOL_AFTER, "after write {i}");
            if at == data.len() {
                break;
            }
        }
        assert!(spool.file.is_some());
        let Spooled::File(file) = spool.finish()? else {
            panic!("a large object left its file");
        };
        assert_eq!(file.len(), data.len() as u64);
        // Pieces at any offset, as block uploads read them, and the last one short.
        for (at, len) in [
            (0, 10),
            (SPOOL_AFTER - 3, 7),
            (data.len() - 5, 5),
            (data.len(), 0),
        ] {
            assert!(
                file.read_at(at as u64, len)? == data[at..at + len],
                "{len} at {at}"
            );
        }
        assert!(file.read_at(data.len() as u64 - 5, 6).is_err());
        assert!(file.read_at(u64::MAX, 2).is_err());
        assert!(Spooled::File(file).into_bytes()? == data);
        Ok(())
    }

    #[test]
    fn small_objects_stay_in_memory() -> std::io::Result<()> {
        let mut spool = Spool::default();
        spool.write_all(b"small")?;
        spool.write_all(&pattern(SPOOL_AFTER - 5))?;
        assert!(spool.file.is_none());
        let Spooled::Memory(back) = spool.finish()? else {
            panic!("a small object went to a file");
        };
        assert_eq!(&back[..5], b"small");
        assert_eq!(back.len(), SPOOL_AFTER);
        Ok(())
    }
}
