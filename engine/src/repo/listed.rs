//! Listings of a remote repository made all at once, for the catch-up of its cache.
//!
//! Opening a repository on an object store reads its config and its key objects (on a thread
//! of their own, `repo.rs`) and brings this host's cache up to date from four listings (`index/`, `packs/`, `snapshots/`,
//! `verifications/`). Made one after the other, each waits a round trip for the one before;
//! none needs another's answer, so [`list_at_once`] makes the listings on their own threads
//! (no async runtime: the client is blocking) while the caller reads the config. The answers
//! are handed to the catch-up through [`Listed`], a backend that answers each prefetched
//! listing once, from memory, and passes everything else (and any later listing of the same
//! prefix) to the store.
//!
//! Invariant: a prefetched listing is only ever used by the catch-up it was made for, right
//! after it was made; each is what a sequential listing at the moment it was sent would have
//! returned, so the order-independent catch-up rules (`format-spec/index-deltas.md`) hold
//! unchanged. Rules that need one listing to happen after another (`index/` before `packs/`
//! in prune, `condemned/` after the lock) never go through here.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::store::{Backend, ObjectInfo, UnfinishedUpload, Version};

/// The prefixes the catch-up of a remote repository's cache lists.
pub const CATCH_UP_PREFIXES: [&str; 4] = ["index/", "packs/", "snapshots/", "verifications/"];

/// Listings of `prefixes` made in parallel on `backend`, while `meanwhile` runs on this
/// thread. Returns the listings (failed ones keep their error, reported when the listing is
/// asked for) and what `meanwhile` returned.
pub fn list_at_once<'b, T>(
    backend: &'b dyn Backend,
    prefixes: &[&str],
    meanwhile: impl FnOnce() -> T,
) -> (Listed<'b>, T) {
    std::thread::scope(|scope| {
        let handles: Vec<_> = prefixes
            .iter()
            .map(|&prefix| {
                let thread = std::thread::Builder::new()
                    .name("list".into())
                    .spawn_scoped(scope, move || backend.list_with_sizes(prefix));
                (prefix, thread)
            })
            .collect();
        let other = meanwhile();
        let mut answers = HashMap::new();
        for (prefix, thread) in handles {
            let answer = match thread {
                // No thread to spare: list on this one, as the catch-up would have.
                Err(_) => backend.list_with_sizes(prefix),
                Ok(t) => t.join().unwrap_or_else(|_| {
                    Err(Error::Internal(format!("the listing of {prefix} panicked")))
                }),
            };
            answers.insert(prefix.to_string(), answer);
        }
        (
            Listed {
                inner: backend,
                answers: Mutex::new(answers),
            },
            other,
        )
    })
}

/// A backend answering the listings made by [`list_at_once`] once each; see the module doc.
pub struct Listed<'b> {
    inner: &'b dyn Backend,
    answers: Mutex<HashMap<String, Result<Vec<ObjectInfo>>>>,
}

impl Listed<'_> {
    fn take(&self, prefix: &str) -> Option<Result<Vec<ObjectInfo>>> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(prefix)
    }
}

impl Backend for Listed<'_> {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.inner.put(key, data)
    }

    fn put_versioned(&self, key: &str, data: &[u8]) -> Result<Version> {
        self.inner.put_versioned(key, data)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }

    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.get_range_into(key, offset, len, buf)
    }

    fn open_range<'a>(
        &'a self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send + 'a>> {
        self.inner.open_range(key, offset, len)
    }

    fn size(&self, key: &str) -> Result<u64> {
        self.inner.size(key)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        match self.take(prefix) {
            Some(answer) => answer,
            None => self.inner.list_with_sizes(prefix),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self.take(prefix) {
            Some(answer) => Ok(answer?.into_iter().map(|o| o.key).collect()),
            None => self.inner.list(prefix),
        }
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.inner.remove(key)
    }

    fn version(&self, key: &str) -> Result<Version> {
        self.inner.version(key)
    }

    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version> {
        self.inner.replace(key, data, expected)
    }

    fn delete_if(&self, key: &str, expected: &Version) -> Result<()> {
        self.inner.delete_if(key, expected)
    }

    fn request_counts(&self) -> Option<std::collections::BTreeMap<&'static str, u64>> {
        self.inner.request_counts()
    }

    fn unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>> {
        self.inner.unfinished_uploads()
    }

    fn discard_upload(&self, upload: &UnfinishedUpload) -> Result<()> {
        self.inner.discard_upload(upload)
    }

    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn crate::store::ObjectWriter + 'a>> {
        self.inner.writer(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;

    #[test]
    fn each_listing_is_answered_once_from_memory_then_by_the_store() -> Result<()> {
        let store = MemoryBackend::new();
        store.put("packs/ab/x", b"1")?;
        let (listed, seven) = list_at_once(&store, &["packs/", "index/"], || 7);
        assert_eq!(seven, 7);
        // Stored after the listing: the prefetched answer does not have it, a later one does.
        store.put("packs/ab/y", b"2")?;
        assert_eq!(listed.list("packs/")?, vec!["packs/ab/x".to_string()]);
        let mut again = listed.list("packs/")?;
        again.sort();
        assert_eq!(
            again,
            vec!["packs/ab/x".to_string(), "packs/ab/y".to_string()]
        );
        assert!(listed.list_with_sizes("index/")?.is_empty());
        Ok(())
    }
}
