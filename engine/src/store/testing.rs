//! Test-only backends: faults that real storage produces rarely and unpredictably.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Backend;
use crate::error::{Error, Result};

/// Wraps a backend and fails every `put` with "no space left on device" once `budget` bytes
/// have been stored through it, as a filling disk would.
pub struct DiskFullAfter<B> {
    inner: B,
    remaining: AtomicU64,
}

impl<B: Backend> DiskFullAfter<B> {
    pub fn new(inner: B, budget: u64) -> Self {
        DiskFullAfter {
            inner,
            remaining: AtomicU64::new(budget),
        }
    }
}

impl<B: Backend> Backend for DiskFullAfter<B> {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let ok = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(len))
            .is_ok();
        if !ok {
            return Err(Error::io(
                "write",
                key,
                std::io::Error::from(std::io::ErrorKind::StorageFull),
            ));
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> Result<u64> {
        self.inner.size(key)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.inner.remove(key)
    }
}
