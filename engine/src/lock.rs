//! Repository locks: many writers, or one maintainer.
//!
//! Locks are small JSON files in `locks/` (host, pid, process start time, time). Backups take
//! a *writer* lock each (`backup-<pid>-<random>.lock`); they share the repository (separate
//! packs, one SQLite writer at a time). `forget` takes a writer lock too. Operations that
//! rewrite or delete derived or shared state (`index rebuild`, `prune`) take the one
//! *maintenance* lock (`maintenance.lock`), created with an exclusive link so that only one
//! can exist.
//!
//! Exclusion works because each side first makes its own lock visible and only then looks
//! for the other side's: whichever comes second sees the first and backs out, removing its
//! own lock. A lock is stale when it was written on this host by a process that is gone
//! (its pid is dead, or now belongs to a process that started later); stale locks are
//! removed with a notice. Locks of other hosts are never removed automatically: their age is
//! reported so that an operator can decide. `format-spec/locks.md` is the protocol's spec.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::progress::notice;
use crate::repo::{hostname, now_rfc3339};

/// Directory of locks inside the repository.
pub const LOCKS_DIR: &str = "locks";
/// File name of the maintenance lock.
pub const MAINTENANCE_LOCK: &str = "maintenance.lock";

/// The contents of a lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// `backup`, `maintenance`, ...
    pub kind: String,
    /// What the holder is doing (`index rebuild`); informational.
    #[serde(default)]
    pub purpose: Option<String>,
    pub host: String,
    pub pid: u32,
    /// Start time of the holding process in clock ticks since boot (`/proc/PID/stat` field
    /// 22), which tells a live holder from a later process that reused its pid.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// When the lock was taken, RFC 3339 UTC.
    pub time: String,
}

impl LockInfo {
    fn describe(&self) -> String {
        let what = self.purpose.as_deref().unwrap_or(&self.kind);
        let age = lock_age(&self.time)
            .map(|s| format!(", {} ago", human_secs(s)))
            .unwrap_or_default();
        format!(
            "{what} by pid {} on host {} since {}{age}",
            self.pid, self.host, self.time
        )
    }
}

/// A held repository lock; removed on drop.
#[derive(Debug)]
pub struct LockGuard {
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn locks_dir(root: &Path) -> PathBuf {
    root.join(LOCKS_DIR)
}

fn our_info(kind: &str, purpose: Option<&str>) -> LockInfo {
    LockInfo {
        kind: kind.to_string(),
        purpose: purpose.map(str::to_string),
        host: hostname(),
        pid: std::process::id(),
        pid_start: process_start(std::process::id()),
        time: now_rfc3339(),
    }
}

fn random_hex() -> String {
    let mut r = [0u8; 8];
    if getrandom::fill(&mut r).is_err() {
        r = u64::from(std::process::id()).to_le_bytes();
    }
    crate::format::hex(&r)
}

/// Writes `info` to a temporary file in `dir` and links it to `name`: the lock appears whole
/// or not at all, and linking fails if `name` exists.
fn publish(dir: &Path, name: &str, info: &LockInfo) -> Result<std::result::Result<PathBuf, ()>> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let tmp = dir.join(format!(".tmp-{name}-{}", random_hex()));
    let body = serde_json::to_vec(info)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode lock: {e}")))?;
    fs::write(&tmp, body).map_err(|e| Error::io("create lock", &tmp, e))?;
    let path = dir.join(name);
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(Ok(path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Err(())),
        Err(e) => Err(Error::io("create lock", &path, e)),
    }
}

/// A lock file found in `locks/`.
struct Found {
    path: PathBuf,
    info: Option<LockInfo>,
}

fn read_lock(path: &Path) -> Option<Found> {
    match fs::read(path) {
        Ok(bytes) => Some(Found {
            path: path.to_path_buf(),
            info: serde_json::from_slice(&bytes).ok(),
        }),
        // Released while we looked.
        Err(_) => None,
    }
}

/// Why a lock is stale, or `None` when its holder may still be running.
fn stale_reason(info: &LockInfo) -> Option<String> {
    if info.host != hostname() {
        return None;
    }
    let pid = i32::try_from(info.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)?;
    match rustix::process::test_kill_process(pid) {
        Err(e) if e == rustix::io::Errno::SRCH => {
            Some(format!("process {} no longer exists", info.pid))
        }
        _ => match (info.pid_start, process_start(info.pid)) {
            (Some(recorded), Some(now)) if recorded != now => Some(format!(
                "pid {} now belongs to a different process",
                info.pid
            )),
            _ => None,
        },
    }
}

/// Returns the live lock among `found`, removing stale ones with a notice.
fn live(found: Vec<Found>) -> Vec<Found> {
    let mut out = Vec::new();
    for f in found {
        let reason = f.info.as_ref().and_then(stale_reason);
        match reason {
            Some(why) => {
                if fs::remove_file(&f.path).is_ok() {
                    notice(&format!("removed stale lock {} ({why})", f.path.display()));
                }
            }
            None => out.push(f),
        }
    }
    out
}

fn describe(f: &Found) -> String {
    match &f.info {
        Some(i) => i.describe(),
        None => format!(
            "unreadable lock file {} (remove it by hand if no stackvault process is running)",
            f.path.display()
        ),
    }
}

fn writer_locks(root: &Path) -> Result<Vec<Found>> {
    let dir = locks_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list locks", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list locks", &dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") || name == MAINTENANCE_LOCK || !name.ends_with(".lock") {
            continue;
        }
        out.extend(read_lock(&entry.path()));
    }
    Ok(out)
}

fn maintenance_lock(root: &Path) -> Option<Found> {
    read_lock(&locks_dir(root).join(MAINTENANCE_LOCK))
}

/// Takes a writer lock of `kind` (`backup`). Refuses while maintenance is running.
pub fn acquire_writer(root: &Path, kind: &str) -> Result<LockGuard> {
    let info = our_info(kind, None);
    let name = format!("{kind}-{}-{}.lock", info.pid, random_hex());
    let path = match publish(&locks_dir(root), &name, &info)? {
        Ok(p) => p,
        Err(()) => return Err(Error::Locked(format!("lock {name} already exists"))),
    };
    let guard = LockGuard { path };
    // Our lock is visible: a maintainer starting from now on will see it and back out.
    if let Some(m) = live(maintenance_lock(root).into_iter().collect()).first() {
        return Err(Error::Locked(format!(
            "maintenance is running ({}); try again when it has finished",
            describe(m)
        )));
    }
    Ok(guard)
}

/// Takes the exclusive maintenance lock for `purpose` (`index rebuild`). Refuses while any
/// writer or another maintainer holds a live lock.
pub fn acquire_maintenance(root: &Path, purpose: &str) -> Result<LockGuard> {
    let dir = locks_dir(root);
    let info = our_info("maintenance", Some(purpose));
    let mut attempt = 0;
    let path = loop {
        match publish(&dir, MAINTENANCE_LOCK, &info)? {
            Ok(p) => break p,
            Err(()) => {
                let holder = live(maintenance_lock(root).into_iter().collect());
                if let Some(h) = holder.first() {
                    return Err(Error::Locked(format!(
                        "maintenance is already running ({})",
                        describe(h)
                    )));
                }
                // The holder was stale (and is now removed) or just released: try again.
                attempt += 1;
                if attempt > 3 {
                    return Err(Error::Locked(
                        "the maintenance lock keeps reappearing; another maintainer is starting"
                            .into(),
                    ));
                }
            }
        }
    };
    let guard = LockGuard { path };
    // Our lock is visible: a writer starting from now on will see it and back out.
    let writers = live(writer_locks(root)?);
    if !writers.is_empty() {
        let list: Vec<String> = writers.iter().map(describe).collect();
        return Err(Error::Locked(format!(
            "{} cannot start while the repository is being written: {}",
            purpose,
            list.join("; ")
        )));
    }
    Ok(guard)
}

/// Locks whose holders are gone, as (path, why), left in place: `check` reports them, and the
/// next writer or maintainer (`prune`) removes them.
pub fn stale_locks(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut found = writer_locks(root)?;
    found.extend(maintenance_lock(root));
    Ok(found
        .into_iter()
        .filter_map(|f| {
            let why = f.info.as_ref().and_then(stale_reason)?;
            Some((f.path, why))
        })
        .collect())
}

/// Start time of process `pid` in clock ticks since boot, from `/proc/PID/stat`.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; the start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn lock_age(time: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds();
    u64::try_from(secs).ok()
}

fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_and_maintenance_exclude_each_other() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let root = dir.path();
        let w = acquire_writer(root, "backup")?;
        let err = acquire_maintenance(root, "index rebuild").err();
        assert!(matches!(err, Some(Error::Locked(_))), "{err:?}");
        // The refused maintainer left nothing behind.
        assert!(maintenance_lock(root).is_none());
        drop(w);
        let m = acquire_maintenance(root, "index rebuild")?;
        let err = acquire_writer(root, "backup").err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("index rebuild")),
            "{err:?}"
        );
        assert!(acquire_maintenance(root, "prune").is_err());
        drop(m);
        assert_eq!(writer_locks(root)?.len(), 0);
        Ok(())
    }

    #[test]
    fn stale_locks_of_dead_processes_are_removed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let root = dir.path();
        // A child that has exited and been reaped: its pid is dead.
        let mut child = std::process::Command::new("true")
            .spawn()
            .map_err(|e| Error::io("spawn", "true", e))?;
        let pid = child.id();
        child.wait().map_err(|e| Error::io("wait", "true", e))?;
        let mut info = our_info("maintenance", Some("prune"));
        info.pid = pid;
        let published = publish(&locks_dir(root), MAINTENANCE_LOCK, &info)?;
        assert!(published.is_ok());
        // A writer is refused neither by the stale maintainer nor later by itself.
        let w = acquire_writer(root, "backup")?;
        assert!(maintenance_lock(root).is_none());
        drop(w);
        // Another host's lock is honoured, whatever its pid.
        info.host = "elsewhere.invalid".into();
        assert!(publish(&locks_dir(root), MAINTENANCE_LOCK, &info)?.is_ok());
        assert!(acquire_writer(root, "backup").is_err());
        Ok(())
    }
}
