//! Locks of a repository on a remote store: lease objects in `locks/`.
//!
//! An object store has no file locks, and a host that dies cannot release anything, so a
//! lock there is an object with an expiry: `locks/<kind>-<host>-<16 hex>` for a writer
//! (any number at once, from any number of hosts), `locks/maintenance` for the one
//! maintainer. It is created create-only, refreshed by a background thread every third of
//! its lease with a conditional replace (`If-Match` on the version it wrote last), and
//! removed when the guard drops. A lock whose expiry (plus [`CLOCK_SKEW`]) has passed belongs
//! to a host that stopped refreshing it and is ignored, and a maintainer deletes it (by
//! version, so never one that was refreshed meanwhile): nobody waits on a dead host longer
//! than one lease. Exclusion holds for the reason the local protocol's does: each side makes
//! its own lock visible first and looks for the other side's only then. The protocol and its
//! argument are in `format-spec/locks.md`.
//!
//! A holder that cannot refresh (network down) for a whole lease has lost the lock: its
//! guard's [`Lease::ensure_held`] then fails, and the work it protects must stop before its
//! last, publishing step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{our_info, random_hex, Held, LockGuard, LockInfo};
use crate::error::{Error, Result};
use crate::host::rfc3339;
use crate::progress::notice;
use crate::store::{Backend, Version};

/// Directory of the lock objects.
pub const LOCKS_PREFIX: &str = "locks/";
/// Key of the maintenance lock.
pub const MAINTENANCE_KEY: &str = "locks/maintenance";
/// How long a lock lasts without a refresh.
pub const LEASE: Duration = Duration::from_secs(300);
/// Purpose of the maintenance lock a prune on a shared store takes: it deletes only by the
/// two-phase rule (`format-spec/locks.md`), so it keeps out other maintainers but neither
/// waits for writers nor keeps them out.
pub const TWO_PHASE_PRUNE: &str = "prune (two-phase)";
/// How far hosts' clocks may disagree: a lock counts as expired only this long after the
/// expiry its holder wrote.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The contents of a lock object: who holds it, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    #[serde(flatten)]
    pub holder: LockInfo,
    /// When the lock expires unless refreshed, RFC 3339 UTC.
    pub expires: String,
    /// The lease length in seconds (informational).
    pub lease_secs: u64,
}

impl LeaseInfo {
    fn new(holder: LockInfo, lease: Duration) -> LeaseInfo {
        LeaseInfo {
            holder,
            expires: expiry(lease),
            lease_secs: lease.as_secs(),
        }
    }

    fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Internal(format!("cannot encode lock: {e}")))
    }

    /// Whether the holder's lease, plus the clock skew allowed, has run out.
    fn expired(&self) -> bool {
        let Ok(t) = time::OffsetDateTime::parse(
            &self.expires,
            &time::format_description::well_known::Rfc3339,
        ) else {
            return false;
        };
        time::OffsetDateTime::now_utc() > t + CLOCK_SKEW
    }
}

fn expiry(lease: Duration) -> String {
    rfc3339(time::OffsetDateTime::now_utc() + lease)
}

/// A held lease: the refresher thread and the object's key. Dropping it stops the thread
/// and removes the object.
pub struct Lease {
    backend: Arc<dyn Backend>,
    key: String,
    lease: Duration,
    stop: Option<Sender<()>>,
    refresher: Option<JoinHandle<()>>,
    lost: Arc<AtomicBool>,
    last_refresh: Arc<Mutex<Instant>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Lease {
    /// See [`LockGuard::ensure_held`].
    pub fn ensure_held(&self) -> Result<()> {
        let since = self
            .last_refresh
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX);
        if self.lost.load(Ordering::Relaxed) || since >= self.lease {
            return Err(Error::Locked(format!(
                "the repository lock {} was lost (not refreshed for {} s, or removed by \
                 another host after it expired); nothing more is written: run the command again",
                self.key,
                since.as_secs()
            )));
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        // Our key is ours alone (random): remove it whatever its version.
        let _ = self.backend.remove(&self.key);
    }
}

/// Creates the lock object `key` create-only and starts refreshing it. `None` when the key
/// exists.
fn publish(
    backend: &Arc<dyn Backend>,
    key: &str,
    info: &LeaseInfo,
    lease: Duration,
) -> Result<Option<Lease>> {
    // The create's answer carries the version the refresher needs (one round trip, not two).
    let version = match backend.put_versioned(key, &info.encode()?) {
        Ok(v) => v,
        Err(Error::AlreadyExists { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (stop, stopped) = channel::<()>();
    let lost = Arc::new(AtomicBool::new(false));
    let last_refresh = Arc::new(Mutex::new(Instant::now()));
    let refresher = {
        let (backend, key, lost, last) = (
            Arc::clone(backend),
            key.to_string(),
            Arc::clone(&lost),
            Arc::clone(&last_refresh),
        );
        let mut info = info.clone();
        std::thread::Builder::new()
            .name("lock-refresh".into())
            .spawn(move || {
                let mut version = version;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(lease / 3) {
                    info.expires = expiry(lease);
                    let Ok(body) = info.encode() else { break };
                    match backend.replace(&key, &body, &version) {
                        Ok(v) => {
                            version = v;
                            if let Ok(mut t) = last.lock() {
                                *t = Instant::now();
                            }
                        }
                        // Removed or taken over after it expired: the lock is gone for good.
                        Err(Error::NotFound { .. } | Error::VersionMismatch { .. }) => {
                            lost.store(true, Ordering::Relaxed);
                            break;
                        }
                        // A transient failure: try again at the next tick; `ensure_held`
                        // says when the lease has run out meanwhile.
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the lock refresher: {e}")))?
    };
    Ok(Some(Lease {
        backend: Arc::clone(backend),
        key: key.to_string(),
        lease,
        stop: Some(stop),
        refresher: Some(refresher),
        lost,
        last_refresh,
    }))
}

/// A lock object met in `locks/`.
struct Found {
    key: String,
    version: Version,
    info: Option<LeaseInfo>,
}

impl Found {
    /// Reads lock `key`; `None` when it is gone.
    fn read(backend: &dyn Backend, key: &str) -> Result<Option<Found>> {
        let version = match backend.version(key) {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let info = match backend.get(key) {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(Found {
            key: key.to_string(),
            version,
            info,
        }))
    }

    /// Whether its holder stopped refreshing it long enough ago. An unreadable lock is never
    /// expired: nothing says when it would be.
    fn expired(&self) -> bool {
        self.info.as_ref().is_some_and(LeaseInfo::expired)
    }

    fn describe(&self) -> String {
        match &self.info {
            Some(i) => format!("{}, lease until {}", i.holder.describe(), i.expires),
            None => format!(
                "unreadable lock object {}: if no stackvault runs against this repository, \
                 delete it",
                self.key
            ),
        }
    }

    /// Deletes an expired lock if it was not refreshed since it was read.
    fn remove_expired(&self, backend: &dyn Backend) -> Result<()> {
        match backend.delete_if(&self.key, &self.version) {
            Ok(()) => {
                notice(&format!(
                    "removed expired lock {} ({}): its holder stopped refreshing it",
                    self.key,
                    self.describe()
                ));
                Ok(())
            }
            Err(Error::NotFound { .. } | Error::VersionMismatch { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A host name as a key part: characters other than letters, digits, `.`, `-`, `_` become `_`.
fn key_safe(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Keys of the writer locks in `locks/`.
fn writer_keys(backend: &dyn Backend) -> Result<Vec<String>> {
    Ok(backend
        .list(LOCKS_PREFIX)?
        .into_iter()
        .filter(|k| k != MAINTENANCE_KEY && !k.contains("/.tmp-"))
        .collect())
}

/// Takes a writer lock of `kind` (`backup`, `forget`) lasting `lease`: any number coexist,
/// from any hosts. Refused while a maintainer holds an unexpired lock.
pub fn acquire_writer(
    backend: &Arc<dyn Backend>,
    kind: &str,
    lease: Duration,
) -> Result<LockGuard> {
    let info = LeaseInfo::new(our_info(kind, None), lease);
    let key = format!(
        "{LOCKS_PREFIX}{kind}-{}-{}",
        key_safe(&info.holder.host),
        random_hex()
    );
    let Some(guard) = publish(backend, &key, &info, lease)? else {
        return Err(Error::Locked(format!("lock {key} already exists")));
    };
    // Our lock is visible: a maintainer starting from now on sees it and backs out.
    if let Some(m) = Found::read(backend.as_ref(), MAINTENANCE_KEY)? {
        let beside_writers = m
            .info
            .as_ref()
            .is_some_and(|i| i.holder.purpose.as_deref() == Some(TWO_PHASE_PRUNE));
        if !m.expired() && !beside_writers {
            return Err(Error::Locked(format!(
                "maintenance is running ({}); try again when it has finished",
                m.describe()
            )));
        }
    }
    Ok(LockGuard(Held::Lease(guard)))
}

/// Takes the exclusive maintenance lock for `purpose` lasting `lease`. Refused while another
/// maintainer or any writer holds an unexpired lock; expired ones are deleted. With purpose
/// [`TWO_PHASE_PRUNE`], live writers do not refuse it (nor it them).
pub fn acquire_maintenance(
    backend: &Arc<dyn Backend>,
    purpose: &str,
    lease: Duration,
) -> Result<LockGuard> {
    let info = LeaseInfo::new(our_info("maintenance", Some(purpose)), lease);
    let mut attempts = 0;
    let guard = loop {
        if let Some(g) = publish(backend, MAINTENANCE_KEY, &info, lease)? {
            break g;
        }
        if let Some(holder) = Found::read(backend.as_ref(), MAINTENANCE_KEY)? {
            if !holder.expired() {
                return Err(Error::Locked(format!(
                    "maintenance is already running ({})",
                    holder.describe()
                )));
            }
            holder.remove_expired(backend.as_ref())?;
        }
        attempts += 1;
        if attempts > 5 {
            return Err(Error::Locked(
                "the maintenance lock keeps changing hands; another maintainer is starting".into(),
            ));
        }
    };
    // Our lock is visible: a writer starting from now on sees it and backs out.
    let mut blocking = Vec::new();
    for key in writer_keys(backend.as_ref())? {
        let Some(found) = Found::read(backend.as_ref(), &key)? else {
            continue;
        };
        if found.expired() {
            found.remove_expired(backend.as_ref())?;
        } else if purpose != TWO_PHASE_PRUNE {
            blocking.push(found.describe());
        }
    }
    if !blocking.is_empty() {
        return Err(Error::Locked(format!(
            "{purpose} cannot start while the repository is being written: {}",
            blocking.join("; ")
        )));
    }
    Ok(LockGuard(Held::Lease(guard)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;

    fn store() -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new())
    }

    /// Leaves the lock object a host that died holding it leaves: expired `ago` ago.
    fn dead_hosts_lock(
        backend: &Arc<dyn Backend>,
        key: &str,
        kind: &str,
        ago: Duration,
    ) -> Result<()> {
        let mut info = LeaseInfo::new(our_info(kind, None), LEASE);
        info.holder.host = "dead.invalid".into();
        info.expires = rfc3339(time::OffsetDateTime::now_utc() - ago);
        backend.put(key, &info.encode()?)
    }

    #[test]
    fn writers_share_and_exclude_maintenance() -> Result<()> {
        let b = store();
        let w1 = acquire_writer(&b, "backup", LEASE)?;
        let w2 = acquire_writer(&b, "backup", LEASE)?;
        assert_eq!(writer_keys(b.as_ref())?.len(), 2);
        let err = acquire_maintenance(&b, "prune", LEASE).err();
        assert!(matches!(err, Some(Error::Locked(_))), "{err:?}");
        // The refused maintainer left nothing behind.
        assert!(!b.exists(MAINTENANCE_KEY)?);
        drop((w1, w2));
        assert!(writer_keys(b.as_ref())?.is_empty());
        let m = acquire_maintenance(&b, "prune", LEASE)?;
        let err = acquire_writer(&b, "backup", LEASE)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("prune")),
            "{err:?}"
        );
        assert!(acquire_maintenance(&b, "prune", LEASE).is_err());
        drop(m);
        assert!(b.list(LOCKS_PREFIX)?.is_empty());
        Ok(())
    }

    #[test]
    fn a_two_phase_prune_runs_beside_writers_but_not_beside_maintainers() -> Result<()> {
        let b = store();
        let w = acquire_writer(&b, "backup", LEASE)?;
        let m = acquire_maintenance(&b, TWO_PHASE_PRUNE, LEASE)?;
        drop(acquire_writer(&b, "backup", LEASE)?);
        assert!(acquire_maintenance(&b, "prune", LEASE).is_err());
        assert!(acquire_maintenance(&b, TWO_PHASE_PRUNE, LEASE).is_err());
        drop((w, m));
        Ok(())
    }

    #[test]
    fn a_dead_hosts_lock_counts_only_until_it_expires() -> Result<()> {
        let b = store();
        // Expired within the clock skew allowed: still honoured.
        dead_hosts_lock(&b, MAINTENANCE_KEY, "maintenance", Duration::from_secs(5))?;
        assert!(acquire_writer(&b, "backup", LEASE).is_err());
        b.remove(MAINTENANCE_KEY)?;
        // Expired for longer: ignored by writers, removed by the next maintainer.
        dead_hosts_lock(&b, MAINTENANCE_KEY, "maintenance", CLOCK_SKEW * 2)?;
        drop(acquire_writer(&b, "backup", LEASE)?);
        dead_hosts_lock(&b, "locks/backup-dead.invalid-0", "backup", CLOCK_SKEW * 2)?;
        let m = acquire_maintenance(&b, "prune", LEASE)?;
        assert_eq!(b.list(LOCKS_PREFIX)?, vec![MAINTENANCE_KEY.to_string()]);
        drop(m);
        // A live writer on a dead-looking host is still a live writer.
        dead_hosts_lock(&b, "locks/backup-dead.invalid-1", "backup", Duration::ZERO)?;
        assert!(acquire_maintenance(&b, "prune", LEASE).is_err());
        Ok(())
    }

    #[test]
    fn a_lease_is_refreshed_and_lost_when_taken_away() -> Result<()> {
        let b = store();
        let lease = Duration::from_millis(300);
        let w = acquire_writer(&b, "backup", lease)?;
        let Some(key) = writer_keys(b.as_ref())?.pop() else {
            panic!("no lock object");
        };
        let first = b.version(&key)?;
        std::thread::sleep(lease / 2);
        assert_ne!(b.version(&key)?, first, "refreshed");
        w.ensure_held()?;
        b.remove(&key)?;
        std::thread::sleep(lease / 2);
        assert!(w.ensure_held().is_err());
        Ok(())
    }
}
