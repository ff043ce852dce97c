//! Where repository objects live, and how packs are built and read.
//!
//! [`Backend`] is the one seam to storage: a flat namespace of objects (`config`,
//! `packs/xx/<id>`, `snapshots/<id>`, `verifications/…`) under `/`-separated keys. Its
//! contract is what a local directory and a remote object store can both honour, so that
//! the engine never depends on which one it has:
//!
//! - **Whole, atomic, durable writes.** An object is visible complete or not at all, and a
//!   write that returned `Ok` survives a crash or power loss. This is what lets a crash at any
//!   point leave a repository that opens and checks clean.
//! - **Immutable objects.** [`Backend::put`] (and [`ObjectWriter::commit`]) never overwrite:
//!   an existing key is refused with [`Error::AlreadyExists`](crate::Error::AlreadyExists),
//!   atomically (no check-then-write window on stores that offer a conditional create).
//! - **A typed absence.** Reading, sizing or versioning a missing object fails with
//!   [`Error::NotFound`](crate::Error::NotFound), never with a store-specific I/O error.
//! - **Listing with sizes.** [`Backend::list_with_sizes`] returns each key with its size in
//!   one pass, as an object-store listing does, so no caller pays a request per object.
//! - **Conditional change of the few mutable objects.** An object that must change in place
//!   is read with [`Backend::version`] and changed with [`Backend::replace`] or
//!   [`Backend::delete_if`], which fail with
//!   [`Error::VersionMismatch`](crate::Error::VersionMismatch) when it changed meanwhile
//!   (an ETag `If-Match` on object storage). Today every object is written once, so only
//!   tests use them.
//!
//! [`LocalDir`] implements the contract on a local directory; the `testing` feature adds
//! an in-memory backend and fault-injecting wrappers, and one contract test suite runs
//! against each.

#[cfg(feature = "azure")]
pub mod azure;
#[cfg(any(test, feature = "testing"))]
pub mod contract;
mod local;
pub(crate) use local::sync_dir;
#[cfg(any(test, feature = "testing"))]
mod memory;
#[cfg(any(test, feature = "testing"))]
pub use memory::MemoryBackend;
pub mod pack;
pub mod range_read;
pub mod reseal;
#[cfg(feature = "s3")]
pub mod s3;
mod spool;
pub use spool::SPOOL_AFTER;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "azure")]
pub use azure::{
    AzureBlobBackend, AzureCredential, AzureStoreOptions, BLOCK_SIZE as AZURE_BLOCK_SIZE,
    PUT_BLOB_MAX as AZURE_PUT_BLOB_MAX,
};
pub use local::LocalDir;
#[cfg(feature = "s3")]
pub use s3::S3Backend;

use std::collections::BTreeMap;

use crate::error::Result;

/// An object's key with its size in bytes, as [`Backend::list_with_sizes`] returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the object was written, as the store reports it in the listing (`None` when it
    /// does not). Only an age for reports and grace rules that tolerate its absence.
    pub modified: Option<std::time::SystemTime>,
}

impl ObjectInfo {
    /// How long ago the object was written, by this host's clock (`None` when unknown or in
    /// the future).
    pub fn age(&self) -> Option<std::time::Duration> {
        std::time::SystemTime::now()
            .duration_since(self.modified?)
            .ok()
    }
}

/// An upload a remote store holds that was started and never completed nor aborted (an S3
/// multipart upload of a process killed mid-write): never listed by
/// [`Backend::list_with_sizes`] and never visible to readers, but stored (and billed) until
/// it is discarded. See [`Backend::unfinished_uploads`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnfinishedUpload {
    /// The key the upload would have completed as, relative to the repository.
    pub key: String,
    /// The store's id of the upload (an S3 `UploadId`); not a secret.
    pub id: String,
    /// When it was started, as the store says (`None` when it does not).
    pub started: Option<std::time::SystemTime>,
}

impl UnfinishedUpload {
    /// How long ago it was started, by this host's clock (`None` when unknown or in the
    /// future).
    pub fn age(&self) -> Option<std::time::Duration> {
        std::time::SystemTime::now()
            .duration_since(self.started?)
            .ok()
    }
}

/// An opaque tag of one stored version of an object: equal tags mean the same contents
/// (an ETag on object storage). Only compared, never interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(pub(crate) String);

/// Storage of repository objects under the contract in the module doc. Keys are
/// `/`-separated relative paths.
pub trait Backend: Send + Sync {
    /// Stores a new object `data` under `key`. When this returns `Ok`, the object is complete
    /// and durable (it survives a crash or power loss); until then no reader can see any part
    /// of it. An existing object is never overwritten: that fails with
    /// [`AlreadyExists`](crate::Error::AlreadyExists) and leaves it as it was. On error
    /// nothing new is left under `key`.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;

    /// [`Backend::put`], returning the version of the object it created (a lock object,
    /// refreshed later by version). This default asks for it with [`Backend::version`]; a
    /// store whose create answer carries it (an ETag) overrides this and saves that round
    /// trip.
    fn put_versioned(&self, key: &str, data: &[u8]) -> Result<Version> {
        self.put(key, data)?;
        self.version(key)
    }

    /// Reads a whole object; [`NotFound`](crate::Error::NotFound) when there is none.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Reads `len` bytes at `offset`; fewer bytes than asked is a [`Corrupt`] error
    /// (the object is shorter than the caller's metadata says), a missing object
    /// [`NotFound`](crate::Error::NotFound).
    ///
    /// [`Corrupt`]: crate::Error::Corrupt
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// [`Backend::get_range`] into `buf`, replacing what it held: a reader of many ranges
    /// (a restore's span fetchers) keeps one allocation instead of one per range, which the
    /// allocator may not give back. Stores that read answers off the network override it.
    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get_range(key, offset, len)?;
        Ok(())
    }

    /// The `len` bytes at `offset` of `key` as a stream, for a reader that works through a
    /// long range piece by piece (a restore reading whole packs): it holds only what it
    /// reads at a time, not the range. Its reads fail with an `io::Error` that carries the
    /// engine's error ([`range_read::range_error`] takes it back out): fewer bytes than asked
    /// is [`Corrupt`](crate::Error::Corrupt), never a short stream; a missing object is
    /// [`NotFound`](crate::Error::NotFound), now or at the first read. This default reads
    /// the range with [`Backend::get_range`] (a local file is read as fast as it is asked);
    /// remote stores stream the answer's body, resuming a body cut off mid-way
    /// ([`range_read`]).
    fn open_range<'a>(
        &'a self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send + 'a>> {
        let len = usize::try_from(len).map_err(|_| {
            crate::error::Error::corrupt(key, offset, format!("a range of {len} bytes"))
        })?;
        Ok(Box::new(std::io::Cursor::new(
            self.get_range(key, offset, len)?,
        )))
    }

    /// Size of an object in bytes; [`NotFound`](crate::Error::NotFound) when there is none.
    fn size(&self, key: &str) -> Result<u64>;

    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;

    /// Keys and sizes of all objects under `prefix` (`packs/`, `snapshots/`), in no
    /// particular order. Temporary objects of unfinished writes are never listed.
    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Keys of all objects under `prefix`, as [`Backend::list_with_sizes`] lists them.
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_with_sizes(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// Deletes an object; deleting a missing object is not an error. Durable on return.
    fn remove(&self, key: &str) -> Result<()>;

    /// The current version of an object; [`NotFound`](crate::Error::NotFound) when there is
    /// none.
    fn version(&self, key: &str) -> Result<Version>;

    /// Replaces an existing object with `data` if it is still at version `expected`, as
    /// atomically and durably as `put`, and returns the new version. A changed object fails
    /// with [`VersionMismatch`](crate::Error::VersionMismatch), a missing one with
    /// [`NotFound`](crate::Error::NotFound); either way nothing is written.
    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version>;

    /// Deletes an object if it is still at version `expected`; otherwise as
    /// [`Backend::replace`]. Durable on return.
    fn delete_if(&self, key: &str, expected: &Version) -> Result<()>;

    /// Requests sent to a remote store so far, by kind (`put`, `get`, `list`, …), for the
    /// `requests` object of `--json` reports; `None` for stores that are not reached over
    /// the network (a local directory), where a request count means nothing.
    fn request_counts(&self) -> Option<BTreeMap<&'static str, u64>> {
        None
    }

    /// The unfinished uploads under the repository ([`UnfinishedUpload`]): what a writer
    /// killed mid-upload left that only the store can see. Stores that have none (a local
    /// directory, whose temporary files are found by walking it) return nothing.
    fn unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>> {
        Ok(Vec::new())
    }

    /// Discards an unfinished upload (an S3 AbortMultipartUpload); one already gone is not an
    /// error. The caller makes sure no live writer owns it (by its age).
    fn discard_upload(&self, upload: &UnfinishedUpload) -> Result<()> {
        let _ = upload;
        Ok(())
    }

    /// Starts an object too large to hold in memory (the manifest of a large disk), to be
    /// stored under a key in `dir` (`snapshots/`) that is known only when it is complete.
    /// This default spools the bytes ([`spool`]) and `put`s them at the commit, whole: only
    /// stores that hold objects in memory anyway keep it (the test stores); a local directory
    /// writes its temporary file directly, and the remote stores commit from the spool a piece
    /// at a time (S3 parts, Azure blocks).
    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn ObjectWriter + 'a>> {
        Ok(Box::new(SpooledObject::new(self, dir, |b, key, bytes| {
            b.put(key, &bytes.into_bytes().map_err(spool::read_error)?)
        })))
    }
}

/// An object written in pieces (see [`Backend::writer`]). Nothing of it is visible before
/// [`ObjectWriter::commit`]; dropped uncommitted, it leaves nothing behind but, after a
/// crash, a temporary object that readers ignore.
pub trait ObjectWriter: std::io::Write + Send {
    /// Makes the object durable and visible under `key`, as [`Backend::put`] does (an
    /// existing `key` is refused, not overwritten). `key` must be in the directory the writer
    /// was started for.
    fn commit(self: Box<Self>, key: &str) -> Result<()>;
}

/// A streamed object ([`Backend::writer`]) on a store that names an object only when its
/// upload starts: the bytes spooled until `commit`, which hands them to the store's `store`
/// with the key.
pub(crate) struct SpooledObject<'a, B: ?Sized> {
    backend: &'a B,
    dir: String,
    spool: spool::Spool,
    store: fn(&B, &str, spool::Spooled) -> Result<()>,
}

impl<'a, B: ?Sized> SpooledObject<'a, B> {
    pub(crate) fn new(
        backend: &'a B,
        dir: &str,
        store: fn(&B, &str, spool::Spooled) -> Result<()>,
    ) -> Self {
        SpooledObject {
            backend,
            dir: dir.to_string(),
            spool: spool::Spool::default(),
            store,
        }
    }
}

impl<B: Sync + ?Sized> std::io::Write for SpooledObject<'_, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.spool.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<B: Sync + ?Sized> ObjectWriter for SpooledObject<'_, B> {
    fn commit(self: Box<Self>, key: &str) -> Result<()> {
        check_key_in(&self.dir, key)?;
        let bytes = self.spool.finish().map_err(spool::read_error)?;
        (self.store)(self.backend, key, bytes)
    }
}

/// Refuses a key outside the directory a writer was started for.
fn check_key_in(dir: &str, key: &str) -> Result<()> {
    match key.strip_prefix(dir) {
        Some(name) if !name.is_empty() && !name.contains('/') => Ok(()),
        _ => Err(crate::error::Error::InvalidArgument(format!(
            "object key {key} is not in {dir}"
        ))),
    }
}

/// A stored object read through its backend, for readers that go through it piece by piece
/// (manifests).
pub struct StoredObject<'b> {
    pub backend: &'b dyn Backend,
    pub key: String,
}

impl crate::format::manifest::ObjectRead for StoredObject<'_> {
    fn size(&self) -> Result<u64> {
        self.backend.size(&self.key)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.backend.get_range(&self.key, offset, len)
    }
}

/// Key of a pack object: `packs/<first two digits>/<name>`. Pack names come from the index
/// and from listings, so a name that is not lower-case hex (at least the two digits of its
/// folder) is refused as damage instead of being sliced.
pub fn pack_key(name: &str) -> Result<String> {
    let hex = name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match name.get(..2) {
        Some(dir) if hex => Ok(format!("packs/{dir}/{name}")),
        _ => Err(crate::error::Error::corrupt(
            format!("pack {name:?}"),
            0,
            "not a pack name (lower-case hex digits): rebuild the index with `stackvault \
             index rebuild`, then run `stackvault check`",
        )),
    }
}

/// Key of a snapshot manifest.
pub fn snapshot_key(id: &str) -> String {
    format!("snapshots/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_key_is_made_from_hex_names_only() {
        let name = "0123456789abcdef0123456789abcdef";
        assert_eq!(pack_key(name).ok(), Some(format!("packs/01/{name}")));
        // A name from a damaged index: a multi-byte character across byte 2 once panicked
        // the byte slice that named the folder.
        for bad in ["", "a", "a\u{e9}bc", "../etc", "0123ABCD", "01/x"] {
            assert!(pack_key(bad).is_err_and(|e| e.is_corruption()), "{bad:?}");
        }
    }
}
