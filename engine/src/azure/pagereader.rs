//! The page blob reader: reads windows of a page blob with few requests, several in flight,
//! the counterpart of [`super::pagewriter`] for whatever reads a disk back out of a page blob
//! (`verify --target`, the `--verify` sample of a standby sync).
//!
//! Job: fill a caller's buffer with the bytes of the blob at an offset. For each window it
//! asks Get Page Ranges for that window only (ranged, `x-ms-range`), so the page list never
//! grows with the disk; it zero-fills the buffer and fetches only the written ranges (runs
//! separated by at most [`MERGE_GAP`] are fetched together, a gap costs less than a request)
//! with ranged Get Blob requests of at most [`READ_PIECE`] bytes, up to `parallel` of them in
//! flight, because across regions each request waits a round trip before its data flows.
//!
//! Invariants: memory is the caller's buffer plus one page list of a window, independent of
//! the disk size; every read carries `If-Match` with the ETag given (a blob changed while it
//! is being read fails the read instead of producing a torn disk); the first failed request
//! stops the others from starting and is what the read returns.

use std::sync::Mutex;

use super::BlobClient;
use crate::error::{Error, Result};

/// Written ranges separated by at most this much are fetched in one request.
pub const MERGE_GAP: u64 = 64 * 1024;
/// Largest ranged Get Blob of a read.
pub const READ_PIECE: usize = 512 * 1024;
/// Default Get Blob requests in flight per read.
pub const DEFAULT_READ_PARALLEL: usize = 8;

/// Reads a page blob's windows; see the module documentation. `&PageReader` is `Sync`: many
/// threads may read windows at once, each with `parallel` requests in flight.
pub struct PageReader<'a> {
    client: &'a BlobClient,
    etag: Option<String>,
    parallel: usize,
}

impl<'a> PageReader<'a> {
    /// A reader of `client`'s blob as it is at `etag` (`None`: whatever it is at each read).
    pub fn new(client: &'a BlobClient, etag: Option<String>, parallel: usize) -> Self {
        PageReader {
            client,
            etag,
            parallel: parallel.max(1),
        }
    }

    /// Fills `buf` with the blob's bytes at `offset`: zeros where no page is written, the
    /// written pages fetched. Returns the bytes fetched.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<u64> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::Internal(format!("read at {offset} overflows")))?;
        buf.fill(0);
        if buf.is_empty() {
            return Ok(0);
        }
        // Get Page Ranges wants 512-byte bounds; the answer is clipped back to the read.
        let (first, last) = (offset - offset % 512, end.div_ceil(512).saturating_mul(512));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (s, e) in self.client.written_ranges(first, last)? {
            let (s, e) = (s.max(offset), e.min(end));
            if s >= e {
                continue;
            }
            match runs.last_mut() {
                Some(run) if s <= run.1.saturating_add(MERGE_GAP) => run.1 = run.1.max(e),
                _ => runs.push((s, e)),
            }
        }
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        let mut rest: &mut [u8] = buf;
        let mut at = offset;
        for (s, e) in runs {
            let skip = usize::try_from(s - at)
                .map_err(|_| Error::Internal(format!("page range at {s} outside the read")))?;
            let len = usize::try_from(e - s)
                .map_err(|_| Error::Internal(format!("page range at {s} outside the read")))?;
            let (_, tail) = std::mem::take(&mut rest)
                .split_at_mut_checked(skip)
                .ok_or_else(|| Error::Internal(format!("page range at {s} outside the read")))?;
            let (run, tail) = tail
                .split_at_mut_checked(len)
                .ok_or_else(|| Error::Internal(format!("page range at {s} outside the read")))?;
            rest = tail;
            at = e;
            pieces.push((s, run));
        }
        let fetched = pieces.iter().map(|(_, b)| b.len() as u64).sum();
        fetch(self.client, self.etag.as_deref(), self.parallel, pieces)?;
        Ok(fetched)
    }
}

/// Fills each `(offset, buffer)` from the blob with ranged GETs (with `If-Match: etag` when
/// given), `parallel` at a time; pieces longer than [`READ_PIECE`] are split.
pub fn fetch(
    client: &BlobClient,
    etag: Option<&str>,
    parallel: usize,
    reads: Vec<(u64, &mut [u8])>,
) -> Result<()> {
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    for (offset, buf) in reads {
        let mut at = offset;
        for piece in buf.chunks_mut(READ_PIECE) {
            let n = piece.len() as u64;
            pieces.push((at, piece));
            at += n;
        }
    }
    if pieces.len() <= 1 {
        return pieces
            .into_iter()
            .try_for_each(|(at, b)| client.read_range(at, b, etag));
    }
    let threads = parallel.max(1).min(pieces.len());
    let queue = Mutex::new(pieces.into_iter());
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.next());
                        let Some((at, buf)) = next else {
                            return Ok(());
                        };
                        if let Err(e) = client.read_range(at, buf, etag) {
                            // Leave nothing for the other readers: the read has failed.
                            if let Ok(mut q) = queue.lock() {
                                q.by_ref().for_each(drop);
                            }
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        readers.into_iter().try_for_each(|r| {
            r.join()
                .unwrap_or_else(|_| Err(Error::Internal("a page blob reader panicked".into())))
        })
    })
}
