//! Progress reporting from long operations.
//!
//! The engine reports bytes done against a total for each phase; the CLI draws it (indicatif
//! on a terminal), tests ignore it. Implementations must be cheap: `advance` is called from
//! worker threads once per segment.
//!
//! The same seam carries cancellation: a [`Cancel`] token set by the CLI's signal handlers,
//! which the engine's long loops look at through [`checkpoint`] and stop cleanly at.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Receives progress of a long operation.
pub trait Progress: Sync {
    /// A phase starts (`backup`, `restore`, ...), measured in bytes of the virtual disk.
    fn start(&self, phase: &str, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
    /// Whether the caller asked the operation to stop (see [`Cancel`]); checked at safe
    /// points only, so it must be cheap.
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

static NOTICE_SINK: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets where [`notice`]s go (the CLI prints them on stderr). Only the first call counts;
/// without one, notices are dropped.
pub fn set_notice_sink(sink: fn(&str)) {
    let _ = NOTICE_SINK.set(sink);
}

/// Tells the user about something the engine did on its own, such as removing a stale lock.
pub fn notice(message: &str) {
    if let Some(sink) = NOTICE_SINK.get() {
        sink(message);
    }
}

/// A request to stop a long operation, shared between whoever asks (the CLI's SIGINT and
/// SIGTERM handlers, a test) and the engine, which looks at it at safe points (between
/// segments, between packs) through [`Progress::is_cancelled`] and [`checkpoint`]. Cloning
/// shares the request.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag itself, for a signal handler to set (`signal_hook::flag::register`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }

    /// Asks the operation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A safe point of a long operation: `Err(Error::Cancelled)` once the caller asked it to stop
/// (the operation then cleans up on its way out and says what it kept). `point` names the
/// place for the test pause hook (`STACKVAULT_PAUSE_AT`, `testing` builds only).
pub fn checkpoint(progress: &dyn Progress, point: &'static str) -> Result<()> {
    #[cfg(feature = "testing")]
    pause::at(point, progress);
    if progress.is_cancelled() {
        return Err(Error::Cancelled(format!("stopped at {point}")));
    }
    Ok(())
}

/// The pause hook of the interrupt tests (`testing` builds only).
///
/// `STACKVAULT_PAUSE_AT=<point>[:<n>]` makes the process stop the `n`-th time (default 1) it
/// reaches [`checkpoint`] `point`, print `paused at <point>` on stderr, and wait there (at
/// most a minute, or `STACKVAULT_PAUSE_SECONDS`) until the operation is cancelled, so that a
/// test's signal lands mid-work deterministically; a test that wants the work to go on after
/// a while sets the seconds and never signals. The points: `backup-segment` (the writer takes the next segment),
/// `restore-segment`, `verify-segment`, `prune-pack` (the next pack to rewrite or delete),
/// `check-pack` (the next pack `check --read-data` reads), `copy-segment` (`copy` takes the
/// next segment's chunks).
#[cfg(feature = "testing")]
mod pause {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::Progress;

    /// The environment variable that arms the pause.
    pub const PAUSE_ENV: &str = "STACKVAULT_PAUSE_AT";

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn at(point: &str, progress: &dyn Progress) {
        let armed = ARMED.get_or_init(|| {
            let value = std::env::var(PAUSE_ENV).ok()?;
            match value.split_once(':') {
                Some((name, n)) => Some((name.to_string(), n.parse().ok().filter(|n| *n > 0)?)),
                None => Some((value, 1)),
            }
        });
        let Some((want, n)) = armed else { return };
        if want != point || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *n {
            return;
        }
        eprintln!("paused at {point}");
        let most = std::env::var("STACKVAULT_PAUSE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_secs);
        let started = Instant::now();
        while !progress.is_cancelled() && started.elapsed() < most {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Bytes per second over `elapsed` (a zero duration counts as 1 ms), for the reports'
/// `throughput_bytes_per_second`: of the bytes actually read or written, not of the disk size.
pub fn bytes_per_second(bytes: u64, elapsed: std::time::Duration) -> u64 {
    let secs = elapsed.as_secs_f64().max(1e-3);
    (bytes as f64 / secs) as u64
}
