//! Blob leases: one writer of a blob at a time, enforced by the service.
//!
//! Job: acquire a lease of [`lease_seconds`] (normally [`LEASE_SECONDS`]) on a blob, keep it alive from a background thread
//! while the work runs ([`HeldLease`]), and release it at the end. While a [`BlobClient`] holds
//! a lease, every write it sends (Put Page, Set Blob Metadata, Set Blob Properties, Snapshot
//! Blob, Delete) carries `x-ms-lease-id`; the service refuses writes to a leased blob that do
//! not name the lease (412), so a second writer, ours or anyone's, cannot interleave.
//!
//! Invariants:
//! - A lease is never infinite: a writer that dies (SIGKILL, power loss) leaves a lease that
//!   lapses [`LEASE_SECONDS`] after its last renewal, so nothing stays locked for ever. Who
//!   may break a lease early is the caller's rule (`standby` documents its own).
//! - Renewals run every [`renew_every`], a third of the lease, so two lost renewals in a row
//!   still leave the lease alive; a renewal that fails is reported by [`HeldLease::release`],
//!   and the writes after it fail on their own (412), never silently land unleased.
//! - The lease id is random per acquisition and never shown (it is a write capability).
//! - Builds with the `testing` feature read [`TEST_LEASE_ENV`] (15 to 60 seconds) instead of
//!   [`LEASE_SECONDS`], so a test can outlast a lease in seconds rather than minutes; release
//!   builds ignore it.
//!
//! [`LeaseState`] is what Get Blob Properties says of a blob's lease
//! ([`super::BlobProperties::lease`]), shown by `standby status`.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use super::client::{Method, RequestKind};
use super::BlobClient;
use crate::error::{Error, Result};

/// Duration of the leases we take (the service accepts 15 to 60 seconds, or infinite).
pub const LEASE_SECONDS: u32 = 60;
/// Shortest finite lease the service grants.
pub const MIN_LEASE_SECONDS: u32 = 15;
/// `testing` builds only: the lease duration in seconds (15 to 60) instead of
/// [`LEASE_SECONDS`].
pub const TEST_LEASE_ENV: &str = "STACKVAULT_TEST_LEASE_SECONDS";

/// Duration of the leases this process takes: [`LEASE_SECONDS`], or in `testing` builds the
/// value of [`TEST_LEASE_ENV`] when it is a duration the service accepts.
pub fn lease_seconds() -> u32 {
    #[cfg(feature = "testing")]
    if let Some(s) = std::env::var(TEST_LEASE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|s| (MIN_LEASE_SECONDS..=LEASE_SECONDS).contains(s))
    {
        return s;
    }
    LEASE_SECONDS
}

/// How often a held lease is renewed: a third of [`lease_seconds`].
pub fn renew_every() -> Duration {
    Duration::from_secs(u64::from(lease_seconds()) / 3)
}

/// What Get Blob Properties says of a blob's lease (`x-ms-lease-*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeaseState {
    /// `available`, `leased`, `expired`, `breaking` or `broken`.
    pub state: Option<String>,
    /// `locked` or `unlocked`.
    pub status: Option<String>,
    /// `fixed` or `infinite`; only while the blob is leased.
    pub duration: Option<String>,
}

impl LeaseState {
    /// A lease is active: writes that do not name it are refused.
    pub fn is_held(&self) -> bool {
        matches!(self.state.as_deref(), Some("leased" | "breaking"))
    }
}

impl BlobClient {
    fn lease_request(&self, headers: &[(String, String)], ok: &[u16]) -> Result<u16> {
        let query = [("comp".to_string(), "lease".to_string())];
        // Not through `execute`: it would add our own lease id to a request naming one.
        let r = self.client.request(&super::client::Request {
            kind: RequestKind::LeaseBlob,
            method: Method::Put,
            path: &self.path,
            query: &query,
            headers,
            body: Some(&[]),
            ok,
        })?;
        Ok(r.status)
    }

    /// Acquire Lease for [`lease_seconds`]. `Ok(false)` when another lease is active (409);
    /// on success this client sends the lease with every write until [`Self::release_lease`].
    pub fn acquire_lease(&self) -> Result<bool> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|e| Error::Internal(format!("no randomness for a lease id: {e}")))?;
        let id = crate::format::vhd_footer::format_uuid(&id);
        let headers = [
            ("x-ms-lease-action".to_string(), "acquire".to_string()),
            (
                "x-ms-lease-duration".to_string(),
                lease_seconds().to_string(),
            ),
            ("x-ms-proposed-lease-id".to_string(), id.clone()),
        ];
        if self.lease_request(&headers, &[201, 409])? == 409 {
            return Ok(false);
        }
        *self
            .lease
            .write()
            .map_err(|_| Error::Internal("lease lock poisoned".into()))? = Some(id);
        Ok(true)
    }

    fn held_lease(&self) -> Result<String> {
        self.lease
            .read()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| Error::Internal(format!("{}: no lease held", self.shown)))
    }

    /// Renew Lease of the lease this client holds.
    pub fn renew_lease(&self) -> Result<()> {
        let headers = [
            ("x-ms-lease-action".to_string(), "renew".to_string()),
            ("x-ms-lease-id".to_string(), self.held_lease()?),
        ];
        self.lease_request(&headers, &[200]).map(drop)
    }

    /// Release Lease of the lease this client holds; writes go unleased afterwards.
    pub fn release_lease(&self) -> Result<()> {
        let headers = [
            ("x-ms-lease-action".to_string(), "release".to_string()),
            ("x-ms-lease-id".to_string(), self.held_lease()?),
        ];
        let r = self.lease_request(&headers, &[200]);
        if let Ok(mut l) = self.lease.write() {
            *l = None;
        }
        r.map(drop)
    }

    /// Break Lease at once (break period 0): whoever held it can no longer write. A blob
    /// without an active lease is fine (409 from the service).
    pub fn break_lease(&self) -> Result<()> {
        let headers = [
            ("x-ms-lease-action".to_string(), "break".to_string()),
            ("x-ms-lease-break-period".to_string(), "0".to_string()),
        ];
        self.lease_request(&headers, &[202, 409]).map(drop)
    }
}

/// A lease held on a blob and renewed by a thread of `scope` until [`HeldLease::release`].
pub struct HeldLease<'scope> {
    stop: Sender<()>,
    renewer: ScopedJoinHandle<'scope, ()>,
    failure: &'scope Mutex<Option<Error>>,
}

impl<'scope> HeldLease<'scope> {
    /// Starts renewing the lease `client` has just acquired ([`BlobClient::acquire_lease`]).
    /// `failure` receives the first renewal error.
    pub fn keep<'env>(
        scope: &'scope Scope<'scope, 'env>,
        client: &'scope BlobClient,
        failure: &'scope Mutex<Option<Error>>,
    ) -> HeldLease<'scope> {
        let (stop, stopped) = channel::<()>();
        let every = renew_every();
        let renewer = scope.spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = client.renew_lease() {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        });
        HeldLease {
            stop,
            renewer,
            failure,
        }
    }

    /// Stops renewing and releases the lease. Reports a renewal that failed (the lease may
    /// have lapsed meanwhile) before any release error.
    pub fn release(self, client: &BlobClient) -> Result<()> {
        let _ = self.stop.send(());
        if self.renewer.join().is_err() {
            return Err(Error::Internal("the lease renewer panicked".into()));
        }
        let renewal = self.failure.lock().ok().and_then(|mut f| f.take());
        let released = client.release_lease();
        match renewal {
            Some(e) => Err(Error::Locked(format!(
                "{}: the lease could not be renewed ({e}); another writer may have taken the \
                 blob over: check what it holds before trusting it",
                client.display_url()
            ))),
            None => released,
        }
    }
}
