//! A ranged read of a remote object as a stream that survives a body cut off mid-way.
//!
//! Job: hand out the `len` bytes at `offset` of an object as a [`Read`] that pulls them off
//! the network as its reader asks, instead of gathering them first, so that a reader of a
//! whole pack (16 or 18 MiB) holds only what it is working on. A remote backend ([`super::s3`],
//! [`super::azure`]) says how to open the range from any byte ([`RangeSource::open_at`],
//! through its own request retries); this module adds what a buffered GET never needed: a
//! body that breaks off (a reset, a timeout, a close short of its length) is resumed with a
//! new ranged GET from the byte reached, after the store's backoff, and counted as a retry.
//!
//! Invariants:
//! - Exactly the range, or an error: no byte past its end is ever handed out, and `Ok(0)`
//!   (end of data) comes only once every byte of it was.
//! - The retry policy's limit applies to attempts in a row that break off without progress:
//!   after `tries` of them the read fails, naming the object and the offset reached:
//!   [`Error::Corrupt`] when the last answer ended cleanly short, [`Error::Network`] when its
//!   connection failed. An attempt that delivered at least [`PROGRESS`] bytes (or the rest
//!   of the range) before it broke starts a new count; one that trickled less does not, so a
//!   link too slow to carry a range ends in an error instead of resuming for ever.
//! - Errors leave [`Read::read`] as `io::Error`s wrapping the engine's [`Error`];
//!   [`range_error`] takes it back out, so callers still tell damage from an unreachable store.

use std::io::Read;

use crate::azure::RetryPolicy;
use crate::error::{Error, Result};

/// A body of one ranged answer: exactly the bytes asked for when it is whole.
pub type RangeBody = Box<dyn Read + Send>;

/// A store that can open part of an object as a stream.
pub trait RangeSource: Sync {
    /// Sends one ranged GET (with the store's own retries of unanswered or refused requests)
    /// for bytes `pos..end` of `key`, and returns the answer's body unread, limited to those
    /// bytes. An object shorter than `end` is [`Error::Corrupt`] naming `key` and `pos`; a
    /// missing one [`Error::NotFound`].
    fn open_at(&self, key: &str, pos: u64, end: u64) -> Result<RangeBody>;

    /// The retry policy whose limit and backoff apply to resumes.
    fn retry_policy(&self) -> RetryPolicy;

    /// Counts one resume as a retry in the store's request counts (the GET it sends is
    /// counted by [`RangeSource::open_at`]).
    fn count_resume(&self);

    /// The object as errors show it (never with a secret).
    fn shown(&self, key: &str) -> String;
}

/// The reader [`RangeSource`]s hand out (see the module doc).
pub struct ResumingRange<'a, S: RangeSource + ?Sized> {
    source: &'a S,
    key: String,
    /// Next byte to hand out, and the end of the range (exclusive).
    pos: u64,
    end: u64,
    body: Option<RangeBody>,
    /// Where the current body started.
    opened_at: u64,
    /// Attempts in a row that broke off without real progress (see [`PROGRESS`]).
    failures: u32,
    /// What counts as real progress: [`PROGRESS`] (a test sets less).
    progress: u64,
}

/// What an attempt must deliver before it breaks off (or the rest of the range, if less)
/// to start the failure count again: a link that trickles a few bytes per timeout still
/// runs out of tries instead of resuming for ever.
const PROGRESS: u64 = 1 << 20;

impl<'a, S: RangeSource + ?Sized> ResumingRange<'a, S> {
    /// The reader of `len` bytes at `offset` of `key`; the first GET is sent by the first
    /// read, so opening costs nothing.
    pub fn new(source: &'a S, key: &str, offset: u64, len: u64) -> Result<Self> {
        let end = offset.checked_add(len).ok_or_else(|| {
            Error::corrupt(
                source.shown(key),
                offset,
                format!("a range of {len} bytes from here overflows"),
            )
        })?;
        Ok(ResumingRange {
            source,
            key: key.to_string(),
            pos: offset,
            end,
            body: None,
            opened_at: offset,
            failures: 0,
            progress: PROGRESS,
        })
    }

    fn read_range(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            let left = self.end - self.pos;
            if left == 0 || buf.is_empty() {
                return Ok(0);
            }
            let body = match self.body.as_mut() {
                Some(body) => body,
                None => {
                    self.opened_at = self.pos;
                    self.body
                        .insert(self.source.open_at(&self.key, self.pos, self.end)?)
                }
            };
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let cut = match body.read(&mut buf[..want]) {
                Ok(0) => Cut::Short,
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Cut::Failed(e.to_string()),
            };
            self.body = None;
            let asked = self.end - self.opened_at;
            if self.pos - self.opened_at >= self.progress.min(asked) {
                self.failures = 0;
            }
            self.failures += 1;
            let policy = self.source.retry_policy();
            if self.failures >= policy.tries {
                let shown = self.source.shown(&self.key);
                let tries = self.failures;
                return Err(match cut {
                    Cut::Short => Error::corrupt(
                        shown,
                        self.pos,
                        format!(
                            "the answer ended {left} bytes before the end of the range asked, \
                             in each of {tries} tries"
                        ),
                    ),
                    Cut::Failed(why) => Error::Network {
                        url: shown,
                        tries,
                        message: format!("reading the answer at offset {}: {why}", self.pos),
                    },
                });
            }
            self.source.count_resume();
            std::thread::sleep(policy.delay(self.failures, None));
        }
    }
}

/// `Content-Range: bytes FIRST-LAST/TOTAL` → (first, last + 1, total if known).
#[cfg(any(feature = "azure", feature = "s3"))]
pub(crate) fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let end = last.trim().parse::<u64>().ok()?.checked_add(1)?;
    Some((first, end, total.trim().parse().ok()))
}

/// How a body broke off.
enum Cut {
    /// It ended cleanly before the range did.
    Short,
    /// The connection failed (reset, timed out, cut short of its `Content-Length`).
    Failed(String),
}

impl<S: RangeSource + ?Sized> Read for ResumingRange<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_range(buf).map_err(std::io::Error::other)
    }
}

/// [`super::Backend::get_range_into`] of a store that streams ranges: the whole range read
/// off [`super::Backend::open_range`] into `buf` (its bytes replaced), so that buffered and
/// streamed reads share one request path with its resumes.
pub fn read_range_into<B: super::Backend + ?Sized>(
    backend: &B,
    key: &str,
    offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.clear();
    // The caller's own number, grown to once; a larger range grows as it comes.
    buf.reserve(len.min(RESERVE_MAX));
    let mut reader = backend.open_range(key, offset, len as u64)?;
    reader
        .read_to_end(buf)
        .map_err(|e| range_error(e, key, offset))?;
    if buf.len() != len {
        return Err(Error::Internal(format!(
            "a range reader of {key} handed out {} of {len} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Most bytes reserved up front for a buffered range: a larger one grows as it comes.
const RESERVE_MAX: usize = 64 << 20;

/// The engine error an `io::Error` from a range reader carries (as [`ResumingRange`] and
/// the default [`super::Backend::open_range`] wrap them), or one naming `object` and
/// `offset` for any other I/O failure.
pub fn range_error(e: std::io::Error, object: &str, offset: u64) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(engine) = inner.downcast::<Error>() {
                return *engine;
            }
        }
        return Error::Internal(format!("reading {object} at offset {offset}: lost error"));
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return Error::corrupt(object, offset, "the range ended before the bytes asked for");
    }
    Error::io("read", object, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// How each answer the fake store sends ends: after `n` bytes, cleanly or with a reset.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Whole,
        CloseAfter(usize),
        ResetAfter(usize),
    }

    /// An object in memory whose answers end as scripted (a reset mid-body is a fault a real
    /// server cannot be made to produce at a chosen byte).
    struct Scripted {
        object: Vec<u8>,
        script: Mutex<Vec<Answer>>,
        opened_at: Mutex<Vec<u64>>,
        resumes: AtomicU32,
    }

    /// A body that yields `data` and then ends or fails.
    struct Body {
        data: std::io::Cursor<Vec<u8>>,
        reset: bool,
    }

    impl Read for Body {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // Small pieces, as a network delivers them.
            let n = buf.len().min(7);
            match self.data.read(&mut buf[..n])? {
                0 if self.reset => Err(std::io::ErrorKind::ConnectionReset.into()),
                n => Ok(n),
            }
        }
    }

    impl RangeSource for Scripted {
        fn open_at(&self, _key: &str, pos: u64, end: u64) -> Result<RangeBody> {
            lock(&self.opened_at)?.push(pos);
            let answer = {
                let mut script = lock(&self.script)?;
                if script.is_empty() {
                    Answer::Whole
                } else {
                    script.remove(0)
                }
            };
            let end = end.min(self.object.len() as u64) as usize;
            let all = &self.object[pos as usize..end];
            let (n, reset) = match answer {
                Answer::Whole => (all.len(), false),
                Answer::CloseAfter(n) => (n.min(all.len()), false),
                Answer::ResetAfter(n) => (n.min(all.len()), true),
            };
            Ok(Box::new(Body {
                data: std::io::Cursor::new(all[..n].to_vec()),
                reset,
            }))
        }
        fn retry_policy(&self) -> RetryPolicy {
            RetryPolicy {
                tries: 3,
                base_delay: Duration::ZERO,
                max_delay: Duration::ZERO,
                timeout: Duration::from_secs(1),
            }
        }
        fn count_resume(&self) {
            self.resumes.fetch_add(1, Ordering::SeqCst);
        }
        fn shown(&self, key: &str) -> String {
            format!("mem://{key}")
        }
    }

    fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
        m.lock()
            .map_err(|_| Error::Internal("a test lock was poisoned".into()))
    }

    fn scripted(len: usize, script: Vec<Answer>) -> Scripted {
        Scripted {
            object: (0..len).map(|i| (i * 31 % 251) as u8).collect(),
            script: Mutex::new(script),
            opened_at: Mutex::new(Vec::new()),
            resumes: AtomicU32::new(0),
        }
    }

    #[test]
    fn a_body_cut_mid_way_resumes_from_the_byte_reached() -> Result<()> {
        let store = scripted(
            1000,
            vec![
                Answer::ResetAfter(300),
                Answer::CloseAfter(250),
                Answer::ResetAfter(0),
            ],
        );
        let mut got = Vec::new();
        let mut range = ResumingRange::new(&store, "packs/ab/x", 100, 800)?;
        range.progress = 100;
        range
            .read_to_end(&mut got)
            .map_err(|e| range_error(e, "packs/ab/x", 100))?;
        assert_eq!(got, store.object[100..900]);
        // Each resume starts where the bytes stopped; the attempt that reached byte 650 and
        // the resume from there that broke at once are two of the three tries.
        assert_eq!(*lock(&store.opened_at)?, vec![100, 400, 650, 650]);
        assert_eq!(store.resumes.load(Ordering::SeqCst), 3);
        Ok(())
    }

    #[test]
    fn a_body_that_only_trickles_runs_out_of_tries() -> Result<()> {
        // Every answer brings 10 bytes and breaks: bytes arrive, but never the 100 that count
        // as progress, so the read ends after the policy's three tries instead of resuming
        // 80 times through the range.
        let store = scripted(1000, vec![Answer::ResetAfter(10); 100]);
        let mut range = ResumingRange::new(&store, "packs/ab/x", 100, 800)?;
        range.progress = 100;
        let err = range
            .read_to_end(&mut Vec::new())
            .map_err(|e| range_error(e, "packs/ab/x", 100))
            .err();
        let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(
            matches!(err, Some(Error::Network { .. })) && text.contains("130"),
            "{err:?}"
        );
        assert_eq!(*lock(&store.opened_at)?, vec![100, 110, 120]);
        Ok(())
    }

    #[test]
    fn a_body_that_stays_short_is_an_error_naming_object_and_offset() -> Result<()> {
        let store = scripted(
            1000,
            vec![
                Answer::CloseAfter(10),
                Answer::CloseAfter(0),
                Answer::CloseAfter(0),
            ],
        );
        let mut reader = ResumingRange::new(&store, "packs/ab/x", 0, 500)?;
        let mut got = Vec::new();
        let Err(e) = reader.read_to_end(&mut got) else {
            panic!("a short body was read as whole");
        };
        assert_eq!(
            got.len(),
            10,
            "the bytes before the cut were handed out, no more"
        );
        match range_error(e, "packs/ab/x", 0) {
            Error::Corrupt {
                location, offset, ..
            } => {
                assert_eq!(location, "mem://packs/ab/x");
                assert_eq!(offset, 10);
            }
            other => panic!("not a short-body error: {other:?}"),
        }

        let store = scripted(1000, vec![Answer::ResetAfter(0); 3]);
        let Err(e) = ResumingRange::new(&store, "packs/ab/x", 40, 5)?.read_to_end(&mut Vec::new())
        else {
            panic!("a reset body was read as whole");
        };
        match range_error(e, "packs/ab/x", 40) {
            Error::Network {
                url,
                tries,
                message,
            } => {
                assert_eq!((url.as_str(), tries), ("mem://packs/ab/x", 3));
                assert!(message.contains("offset 40"), "{message}");
            }
            other => panic!("not a network error: {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn no_byte_past_the_range_is_handed_out() -> Result<()> {
        let store = scripted(100, vec![]);
        let mut reader = ResumingRange::new(&store, "k", 10, 20)?;
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        loop {
            let n = reader.read(&mut buf).map_err(|e| range_error(e, "k", 10))?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, store.object[10..30]);
        Ok(())
    }
}
