//! Repository locks: many writers, or one maintainer.
//!
//! Locks are small JSON files in `locks/` (host, pid, time), each held with an OS file lock
//! (`flock`, exclusive) by the process it names, for exactly as long as the lock exists: a
//! lock file whose file lock can be taken belongs to a process that has ended, whatever its
//! file says, and one whose file lock is held belongs to a live process. Backups take a
//! *writer* lock each (`backup-<pid>-<random>.lock`); they share the repository (separate
//! packs, one SQLite writer at a time). `forget` takes a writer lock too. Operations that
//! rewrite or delete shared state (`index rebuild`, `prune`) take the one *maintenance* lock
//! (`maintenance.lock`).
//!
//! Invariants: a lock file appears under its final name already locked, whole and durable
//! (written, locked and synced under a temporary name, then linked; the link fails if the
//! name exists); a lock's name is removed only by a process holding its file lock, so a stale
//! lock is removed race-free. Exclusion holds because each side first makes its own lock
//! visible and only then looks for the other side's. Locks naming another host are never
//! removed: a file lock may not cross hosts on a network share, so they are not provably
//! stale. `format-spec/locks.md` is the protocol's spec, with the argument why it is
//! race-free.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::{hostname, now_rfc3339};
use crate::progress::notice;
use crate::store::sync_dir;

pub mod lease;

/// Directory of locks inside the repository.
pub const LOCKS_DIR: &str = "locks";
/// File name of the maintenance lock.
pub const MAINTENANCE_LOCK: &str = "maintenance.lock";
/// How often a lock held by someone else is looked at again before it counts as live: a
/// process removing an abandoned lock holds its file lock for a moment, and must not be
/// mistaken for a running holder.
const HELD_RETRIES: u32 = 3;
const HELD_PAUSE: Duration = Duration::from_millis(20);

crate::stored_name_enum! {
    /// What a lock is held for, as its file (or lease object) names it: the operation of a
    /// writer lock, or `maintenance`. A name this build does not know (a newer writer's
    /// operation) is kept as read and still counts as a lock.
    pub enum LockKind {
        Backup => "backup",
        Forget => "forget",
        Copy => "copy",
        KeyAdd => "key add",
        Maintenance => "maintenance",
    }
}

/// The contents of a lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    /// What the holder is doing (`index rebuild`); informational.
    #[serde(default)]
    pub purpose: Option<String>,
    pub host: String,
    pub pid: u32,
    /// When the lock was taken, RFC 3339 UTC.
    pub time: String,
}

impl LockInfo {
    fn describe(&self) -> String {
        let what = self.purpose.as_deref().unwrap_or(self.kind.as_str());
        let age = lock_age(&self.time)
            .map(|s| format!(", {} ago", human_secs(s)))
            .unwrap_or_default();
        format!(
            "{what} by pid {} on host {} since {}{age}",
            self.pid, self.host, self.time
        )
    }
}

/// A held repository lock, released when dropped: a lock file of a local repository, or a
/// lease object on a remote store ([`lease`]).
#[derive(Debug)]
pub struct LockGuard(Held);

#[derive(Debug)]
enum Held {
    // Held for its `Drop`, which releases the lock.
    #[allow(dead_code)]
    File(FileLock),
    Lease(lease::Lease),
}

impl LockGuard {
    /// Fails when the lock is no longer ours: a lease that could not be refreshed for longer
    /// than it lasts, or that someone removed. Work that must not outlive its lock (a backup
    /// before its manifest) asks this before its last step. A lock file is held until dropped.
    pub fn ensure_held(&self) -> Result<()> {
        match &self.0 {
            Held::File(_) => Ok(()),
            Held::Lease(l) => l.ensure_held(),
        }
    }
}

/// A lock file and the file lock on it. Dropping it removes the name (while still holding
/// the file lock, see the module doc), then releases the file lock.
#[derive(Debug)]
struct FileLock {
    path: PathBuf,
    // Closed after `drop` has removed the name: closing releases the file lock.
    _file: File,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if fs::remove_file(&self.path).is_ok() {
            if let Some(dir) = self.path.parent() {
                let _ = sync_dir(dir);
            }
        }
    }
}

fn locks_dir(root: &Path) -> PathBuf {
    root.join(LOCKS_DIR)
}

fn our_info(kind: &str, purpose: Option<&str>) -> LockInfo {
    LockInfo {
        kind: LockKind::from(kind),
        purpose: purpose.map(str::to_string),
        host: hostname(),
        pid: std::process::id(),
        time: now_rfc3339(),
    }
}

pub(crate) fn random_hex() -> String {
    let mut r = [0u8; 8];
    if getrandom::fill(&mut r).is_err() {
        r = u64::from(std::process::id()).to_le_bytes();
    }
    crate::format::hex(&r)
}

fn lock_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(rustix::io::Errno) -> Error + 'a {
    move |e| Error::io(op, path, std::io::Error::from(e))
}

/// Publishes lock `name` in `dir`: writes `info` to a temporary file, takes its file lock,
/// syncs it, links it to `name` and syncs the directory. `None` when `name` exists.
fn publish(dir: &Path, name: &str, info: &LockInfo) -> Result<Option<FileLock>> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let tmp = dir.join(format!(".tmp-{name}-{}", random_hex()));
    let body = serde_json::to_vec(info)
        .map_err(|e| Error::Internal(format!("cannot encode lock: {e}")))?;
    let written = (|| {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("create lock", &tmp, e))?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(lock_err("lock", &tmp))?;
        file.write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write lock", &tmp, e))?;
        Ok(file)
    })();
    let path = dir.join(name);
    let linked = written.and_then(|file| {
        fs::hard_link(&tmp, &path)
            .map(|()| file)
            .map_err(|e| Error::io("create lock", &path, e))
    });
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(file) => {
            let guard = FileLock { path, _file: file };
            sync_dir(dir)?;
            Ok(Some(guard))
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A lock file met in `locks/` and what its file lock says about its holder.
struct Found {
    path: PathBuf,
    info: Option<LockInfo>,
    state: State,
}

enum State {
    /// Its holder is running.
    Held,
    /// Nobody holds its file lock; we hold it now (in this file).
    Free(File),
}

impl Found {
    /// Whether this lock belongs to a process on another host (or says nothing readable):
    /// then a free file lock proves nothing.
    fn foreign(&self) -> bool {
        self.info.as_ref().is_none_or(|i| i.host != hostname())
    }

    fn describe(&self) -> String {
        match &self.info {
            Some(i) => i.describe(),
            None => format!("unreadable lock file {}", self.path.display()),
        }
    }

    /// Why this lock blocks us, with what to do about it.
    fn blocking(&self) -> String {
        if matches!(self.state, State::Held) || !self.foreign() {
            return self.describe();
        }
        let host = self.info.as_ref().map(|i| i.host.as_str());
        format!(
            "{}; it was taken on another host ({}), which may still be using this repository. \
             Only one host may write a repository at a time (its SQLite index needs local \
             shared memory); if no stackvault process runs there any more, delete {} and retry",
            self.describe(),
            host.unwrap_or("unknown"),
            self.path.display()
        )
    }
}

/// Looks at lock `path`: `None` when it is gone. A lock held by someone is looked at again a
/// few times before it counts as held (see [`HELD_RETRIES`]).
fn probe(path: &Path) -> Result<Option<Found>> {
    let mut attempt = 0;
    loop {
        // Read-write: on NFS an exclusive flock is a write lock, which needs a writable file.
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open lock", path, e)),
        };
        let info = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                return Ok(Some(Found {
                    path: path.to_path_buf(),
                    info,
                    state: State::Free(file),
                }))
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && attempt < HELD_RETRIES => {
                attempt += 1;
                std::thread::sleep(HELD_PAUSE);
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Ok(Some(Found {
                    path: path.to_path_buf(),
                    info,
                    state: State::Held,
                }))
            }
            Err(e) => return Err(lock_err("lock", path)(e)),
        }
    }
}

/// Removes `found` when it is provably stale: its file lock was free (and is now ours), it
/// was taken on this host, and its name still refers to the file we locked. Race-free: only
/// a process holding a lock's file lock removes its name, and that is us until we close it.
/// Returns whether the lock is out of the way.
fn remove_if_stale(found: &Found) -> Result<bool> {
    let State::Free(file) = &found.state else {
        return Ok(false);
    };
    if found.foreign() {
        return Ok(false);
    }
    let ours = file
        .metadata()
        .map_err(|e| Error::io("stat lock", &found.path, e))?;
    match fs::symlink_metadata(&found.path) {
        Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
        // Released and perhaps replaced meanwhile: not ours to remove.
        _ => return Ok(true),
    }
    match fs::remove_file(&found.path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::io("remove stale lock", &found.path, e)),
    }
    if let Some(dir) = found.path.parent() {
        sync_dir(dir)?;
    }
    notice(&format!(
        "removed stale lock {} ({}): its holder ended without releasing it",
        found.path.display(),
        found.describe()
    ));
    Ok(true)
}

/// Names of the writer locks in `locks/`.
fn writer_lock_paths(root: &Path) -> Result<Vec<PathBuf>> {
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
        out.push(entry.path());
    }
    Ok(out)
}

/// Takes a writer lock of `kind` (`backup`, `forget`). Refused while maintenance is running,
/// and while another host holds any lock (see the module doc).
pub fn acquire_writer(root: &Path, kind: &str) -> Result<LockGuard> {
    let info = our_info(kind, None);
    let name = format!("{kind}-{}-{}.lock", info.pid, random_hex());
    let Some(guard) = publish(&locks_dir(root), &name, &info)? else {
        return Err(Error::Locked(format!("lock {name} already exists")));
    };
    // Our lock is visible: a maintainer or another host starting from now on will see it and
    // back out.
    if let Some(m) = probe(&locks_dir(root).join(MAINTENANCE_LOCK))? {
        if !remove_if_stale(&m)? {
            return Err(Error::Locked(format!(
                "maintenance is running ({}); try again when it has finished",
                m.blocking()
            )));
        }
    }
    let me = hostname();
    for path in writer_lock_paths(root)? {
        if path == guard.path {
            continue;
        }
        let info: Option<LockInfo> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if info.is_some_and(|i| i.host != me) {
            // Whether or not its file lock looks free, another host's lock is not provably
            // stale: refuse, and say what to do.
            if let Some(found) = probe(&path)? {
                return Err(Error::Locked(format!(
                    "another host writes this repository: {}",
                    found.blocking()
                )));
            }
        }
    }
    Ok(LockGuard(Held::File(guard)))
}

/// Takes the exclusive maintenance lock for `purpose` (`index rebuild`, `prune`). Refuses
/// while any writer or another maintainer holds a live lock.
pub fn acquire_maintenance(root: &Path, purpose: &str) -> Result<LockGuard> {
    let dir = locks_dir(root);
    let info = our_info("maintenance", Some(purpose));
    let mut attempt = 0;
    let guard = loop {
        if let Some(guard) = publish(&dir, MAINTENANCE_LOCK, &info)? {
            break guard;
        }
        if let Some(holder) = probe(&dir.join(MAINTENANCE_LOCK))? {
            if !remove_if_stale(&holder)? {
                return Err(Error::Locked(format!(
                    "maintenance is already running ({})",
                    holder.blocking()
                )));
            }
        }
        // The holder was stale (and is now removed) or has just released: try again.
        attempt += 1;
        if attempt > 10 {
            return Err(Error::Locked(
                "the maintenance lock keeps changing hands; another maintainer is starting".into(),
            ));
        }
    };
    // Our lock is visible: a writer starting from now on will see it and back out.
    let mut blocking = Vec::new();
    for path in writer_lock_paths(root)? {
        if let Some(found) = probe(&path)? {
            if !remove_if_stale(&found)? {
                blocking.push(found.blocking());
            }
        }
    }
    if !blocking.is_empty() {
        return Err(Error::Locked(format!(
            "{purpose} cannot start while the repository is being written: {}",
            blocking.join("; ")
        )));
    }
    Ok(LockGuard(Held::File(guard)))
}

/// Locks whose holders are provably gone, as (path, why), left in place: `check` reports
/// them, and the next writer or maintainer (`prune`) removes them. A lock that cannot be
/// probed (a read-only repository: taking a file lock needs a writable file) or that names
/// another host is not provably stale and is not listed.
pub fn stale_locks(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut paths = writer_lock_paths(root)?;
    paths.push(locks_dir(root).join(MAINTENANCE_LOCK));
    let mut out = Vec::new();
    for path in paths {
        let Ok(Some(found)) = probe(&path) else {
            continue;
        };
        if matches!(found.state, State::Free(_)) && !found.foreign() {
            let why = format!(
                "{}: nobody holds its file lock, so that process has ended",
                found.describe()
            );
            out.push((found.path, why));
        }
    }
    Ok(out)
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

    fn maintenance_lock(root: &Path) -> bool {
        locks_dir(root).join(MAINTENANCE_LOCK).exists()
    }

    /// Writes a lock file that nobody holds, as a killed holder leaves it.
    fn abandoned(root: &Path, name: &str, info: &LockInfo) -> Result<()> {
        let guard = publish(&locks_dir(root), name, info)?;
        assert!(guard.is_some());
        // Forgetting the name but closing the file: the file lock goes, the name stays.
        if let Some(g) = guard {
            let path = g.path.clone();
            let copy = format!("{}.keep", path.display());
            fs::hard_link(&path, &copy).map_err(|e| Error::io("link", &path, e))?;
            drop(g);
            fs::rename(&copy, &path).map_err(|e| Error::io("rename", &path, e))?;
        }
        Ok(())
    }

    #[test]
    fn writers_and_maintenance_exclude_each_other() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let root = dir.path();
        let w = acquire_writer(root, "backup")?;
        let err = acquire_maintenance(root, "index rebuild").err();
        assert!(matches!(err, Some(Error::Locked(_))), "{err:?}");
        // The refused maintainer left nothing behind.
        assert!(!maintenance_lock(root));
        drop(w);
        let m = acquire_maintenance(root, "index rebuild")?;
        let err = acquire_writer(root, "backup").err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("index rebuild")),
            "{err:?}"
        );
        assert!(acquire_maintenance(root, "prune").is_err());
        drop(m);
        assert_eq!(writer_lock_paths(root)?.len(), 0);
        Ok(())
    }

    #[test]
    fn abandoned_locks_are_removed_and_foreign_ones_kept() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let root = dir.path();
        let mut info = our_info("maintenance", Some("prune"));
        abandoned(root, MAINTENANCE_LOCK, &info)?;
        assert!(maintenance_lock(root));
        // A writer is refused neither by the abandoned maintainer nor later by itself.
        let w = acquire_writer(root, "backup")?;
        assert!(!maintenance_lock(root));
        drop(w);
        // Another host's lock is honoured: its file lock cannot be seen from here.
        info.host = "elsewhere.invalid".into();
        abandoned(root, MAINTENANCE_LOCK, &info)?;
        let err = acquire_writer(root, "backup").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("elsewhere.invalid") && e.contains("delete")),
            "{err:?}"
        );
        assert!(maintenance_lock(root));
        Ok(())
    }
}
