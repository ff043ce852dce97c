//! The bytes of a streamed object ([`Backend::writer`](super::Backend::writer)) until its
//! commit: at most [`SPOOL_AFTER`] bytes in memory, the rest in an unlinked temporary file.
//!
//! A remote store names an object when its upload starts, and a manifest's name (the hash of
//! its bytes) is known only once it is complete, so a remote manifest is kept until then. It
//! grows with the disk (about 1.4 MiB per GiB of data) and is written while the backup's packs
//! are in memory: kept whole in memory, it was the 8 MiB buffer at a 4 GiB gen0's peak, and a
//! 100 GiB disk's would not fit in the 128 MiB a backup may use (issue 14). Spooled, it costs
//! memory only at the commit, when the packs are gone, and a store that uploads in parts
//! reads it from the file part by part.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

/// Bytes a streamed object keeps in memory; past them it is written to its temporary file
/// in pieces of this size.
pub const SPOOL_AFTER: usize = 1 << 20;

/// A streamed object's bytes so far (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Spool {
    /// What is not in the file yet: at most [`SPOOL_AFTER`] bytes.
    memory: Vec<u8>,
    file: Option<File>,
    len: u64,
}

impl Spool {
    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes held in memory now (for tests of the bound).
    #[cfg(test)]
    fn in_memory(&self) -> usize {
        self.memory.capacity()
    }

    /// The bytes from the start, read from the file when there is one.
    pub(crate) fn into_reader(mut self) -> std::io::Result<Box<dyn Read + Send>> {
        let Some(mut file) = self.file.take() else {
            return Ok(Box::new(std::io::Cursor::new(self.memory)));
        };
        file.write_all(&self.memory)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Box::new(file))
    }

    /// The bytes as one buffer, for a store that sends the object in one request.
    pub(crate) fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        if self.file.is_none() {
            return Ok(self.memory);
        }
        let mut bytes = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        self.into_reader()?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.memory.len() + buf.len() > SPOOL_AFTER {
            let file = match &mut self.file {
                Some(file) => file,
                // Unlinked at once (O_TMPFILE where the file system has it): nothing is left
                // behind whatever happens to this process.
                None => self.file.insert(tempfile::tempfile()?),
            };
            file.write_all(&self.memory)?;
            self.memory.clear();
            if buf.len() > SPOOL_AFTER {
                file.write_all(buf)?;
                self.len += buf.len() as u64;
                return Ok(buf.len());
            }
        }
        // Doubling as a `Vec` does, but never past the piece.
        let want = self.memory.len() + buf.len();
        if want > self.memory.capacity() {
            let capacity = want.max(self.memory.capacity() * 2).min(SPOOL_AFTER);
            self.memory.reserve_exact(capacity - self.memory.len());
        }
        self.memory.extend_from_slice(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
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
        assert_eq!(spool.len(), data.len() as u64);
        assert!(spool.file.is_some());
        assert!(spool.into_bytes()? == data);
        Ok(())
    }

    #[test]
    fn small_objects_stay_in_memory() -> std::io::Result<()> {
        let mut spool = Spool::default();
        spool.write_all(b"small")?;
        spool.write_all(&pattern(SPOOL_AFTER - 5))?;
        assert!(spool.file.is_none());
        let mut back = Vec::new();
        spool.into_reader()?.read_to_end(&mut back)?;
        assert_eq!(&back[..5], b"small");
        assert_eq!(back.len(), SPOOL_AFTER);
        Ok(())
    }
}
