//! Progress reporting from long operations.
//!
//! The engine reports bytes done against a total for each phase; the CLI draws it (indicatif
//! on a terminal), tests ignore it. Implementations must be cheap: `advance` is called from
//! worker threads once per segment.

/// Receives progress of a long operation.
pub trait Progress: Sync {
    /// A phase starts (`backup`, `restore`, ...), measured in bytes of the virtual disk.
    fn start(&self, phase: &str, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
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

/// Bytes per second over `elapsed` (a zero duration counts as 1 ms), for the reports'
/// `throughput_bytes_per_second`: of the bytes actually read or written, not of the disk size.
pub fn bytes_per_second(bytes: u64, elapsed: std::time::Duration) -> u64 {
    let secs = elapsed.as_secs_f64().max(1e-3);
    (bytes as f64 / secs) as u64
}
