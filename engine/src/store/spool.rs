//! The bytes of a streamed object ([`Backend::writer`](super::Backend::writer)) until its
//! commit: at most [`SPOOL_AFTER`] bytes in memory, the rest in an unlinked temporary file.
//!
//! A remote store names an object when its upload starts, and a manifest's name (the hash of
//! its bytes) is known only once it is complete, so a remote manifest is kept until then. It
//! grows with the disk (about 1.4 MiB per GiB of data) and is written while the backup's packs
//! are in memory: kept whole in memory, it was the 8 MiB buffer at a 4 GiB gen0's peak.
//! Spooled, it costs no memory while the packs are, and S3 uploads a large one from the file
//! part by part; Azure's (default) writer still reads it back whole at the commit, when the
//! packs are gone (so a manifest larger than the budget, a disk of ~90 GiB of data, passes it
//! there: staging Azure blocks from the file is not done yet). Where no temporary file can be
//! made (`TMPDIR` not writable, full), the bytes stay in memory as before, rather than failing
//! a backup at its end.

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
    /// No temporary file could be made: everything stays in memory.
    in_memory_only: bool,
    len: u64,
}

impl Spool {
    /// Bytes written so far.
    #[cfg(any(test, feature = "s3"))]
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
