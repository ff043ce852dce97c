//! A backup's writer lock while it is being taken on its own thread.
//!
//! On a remote store the lock is a lease, two round trips (a create, then a look at the
//! maintenance lock), and on a shared store it orders nothing with respect to deduplication:
//! writers and the two-phase prune never exclude each other, the condemned set and the
//! re-check before the manifest do that (`format-spec/locks.md`, rule 2). So there the data
//! phase starts while the lock is still being taken, and only what writes waits for it: the
//! first pack's store and the manifest. Nothing is stored before the lock is held, so a
//! backup that finds maintenance running leaves nothing behind. A local repository's index is
//! the one prune changes, so there the backup waits for the lock before deduplicating.

use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, Result};
use crate::lock::LockGuard;
use crate::repo::Repo;

/// See the module doc. Threads of the backup learn only *that* taking the lock failed (a
/// [`Error::Locked`] standing for it); the backup itself reports the error that made it fail,
/// from [`PendingLock::into_guard`], before any error of the threads that stopped for it.
pub(super) struct PendingLock<'scope> {
    state: Mutex<State<'scope>>,
}

enum State<'scope> {
    Taking(ScopedJoinHandle<'scope, Result<LockGuard>>),
    Held(LockGuard),
    /// Taking it failed with this error (gone once [`PendingLock::into_guard`] took it).
    Failed(Option<Error>),
}

impl<'scope> PendingLock<'scope> {
    /// Starts taking `repo`'s writer lock for a backup on a thread of `scope`.
    pub(super) fn start<'env>(scope: &'scope Scope<'scope, 'env>, repo: &'env Repo) -> Self {
        PendingLock {
            state: Mutex::new(State::Taking(scope.spawn(|| repo.lock("backup")))),
        }
    }

    /// Waits until the lock is held.
    pub(super) fn wait(&self) -> Result<()> {
        self.settle(true)
    }

    /// Fails once taking the lock has failed; does not wait while it is still being taken.
    pub(super) fn poll(&self) -> Result<()> {
        self.settle(false)
    }

    fn settle(&self, wait: bool) -> Result<()> {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Someone is waiting for the lock: a poll does not queue behind them.
            Err(std::sync::TryLockError::WouldBlock) if !wait => return Ok(()),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.state.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        if let State::Taking(thread) = &*state {
            if !wait && !thread.is_finished() {
                return Ok(());
            }
            if let State::Taking(thread) = std::mem::replace(&mut *state, State::Failed(None)) {
                *state = match thread.join() {
                    Ok(Ok(guard)) => State::Held(guard),
                    Ok(Err(e)) => State::Failed(Some(e)),
                    Err(_) => {
                        State::Failed(Some(Error::Internal("the lock thread panicked".into())))
                    }
                };
            }
        }
        match &*state {
            State::Failed(_) => Err(Error::Locked(
                "the backup's writer lock could not be taken".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The lock, once held (waiting for it if need be), released when dropped; or the error
    /// that kept it from being taken.
    pub(super) fn into_guard(self) -> Result<LockGuard> {
        let waited = self.wait();
        match self.state.into_inner().unwrap_or_else(|p| p.into_inner()) {
            State::Held(guard) => Ok(guard),
            State::Failed(Some(e)) => Err(e),
            _ => Err(waited
                .err()
                .unwrap_or_else(|| Error::Internal("the backup's writer lock is not held".into()))),
        }
    }
}
