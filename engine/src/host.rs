//! This machine and its clock, as the repository records them: the host name (in snapshots,
//! locks and verification records) and times as RFC 3339 UTC text.
//!
//! A leaf: it uses nothing else of the crate, so that `lock` and `repo` (and the writers of
//! snapshots and records) can all depend on it without depending on each other. Times always
//! carry exactly six fractional digits, so that they sort as text.

use std::fs;

/// This machine's host name, or `unknown`.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Now, as RFC 3339 UTC with exactly six fractional digits, so that times sort as text.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// A time as RFC 3339 UTC with exactly six fractional digits (the form snapshots record).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}
