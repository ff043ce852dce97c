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

/// See the module doc.
pub(super) struct PendingLock<'scope> {
    state: Mutex<State<'scope>>,
}

enum State<'scope> {
    Taking(ScopedJoinHandle<'scope, Result<LockGuard>>),
    Held(LockGuard),
    /// Taking it failed; its error went to whoever waited first.
    Failed,
}

impl<'scope> PendingLock<'scope> {
    /// Starts taking `repo`'s writer lock for a backup on a thread of `scope`.
    pub(super) fn start<'env>(scope: &'scope Scope<'scope, 'env>, repo: &'env Repo) -> Self {
        PendingLock {
            state: Mutex::new(State::Taking(scope.spawn(|| repo.lock("backup")))),
        }
    }

    /// Waits until the lock is held. The first caller after a failure gets its error.
    pub(super) fn wait(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = match std::mem::replace(&mut *state, State::Failed) {
            State::Taking(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("the lock thread panicked".into())))?,
            State::Held(guard) => guard,
            State::Failed => {
                return Err(Error::Internal(
                    "the backup's lock could not be taken (reported above)".into(),
                ))
            }
        };
        *state = State::Held(held);
        Ok(())
    }

    /// The lock, once held (waiting for it if need be): released when dropped.
    pub(super) fn into_guard(self) -> Result<LockGuard> {
        self.wait()?;
        match self.state.into_inner().unwrap_or_else(|p| p.into_inner()) {
            State::Held(guard) => Ok(guard),
            _ => Err(Error::Internal("the backup's lock is not held".into())),
        }
    }
}
