//! Where repository objects live, and how packs are built and read.
//!
//! [`Backend`] is the one seam to storage: a flat namespace of immutable objects (`config`,
//! `packs/xx/<id>`, `snapshots/<id>`). Objects are written whole and atomically and never
//! modified, which is what lets a crash at any point leave a repository that opens and
//! checks clean. [`LocalDir`] implements it on a local directory; object storage can follow
//! without touching the engine.

mod local;
pub(crate) use local::sync_dir;
pub mod pack;
#[cfg(feature = "testing")]
pub mod testing;

pub use local::LocalDir;

use crate::error::Result;

/// Storage of immutable repository objects. Keys are `/`-separated relative paths.
pub trait Backend: Send + Sync {
    /// Stores `data` under `key`. When this returns `Ok`, the object is complete and durable
    /// (it survives a crash or power loss); until then no reader can see any part of it. On
    /// error nothing is left under `key`.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;

    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Reads `len` bytes at `offset`; fewer bytes than asked is a [`Corrupt`] error
    /// (the object is shorter than the caller's metadata says).
    ///
    /// [`Corrupt`]: crate::Error::Corrupt
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Size of an object in bytes.
    fn size(&self, key: &str) -> Result<u64>;

    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;

    /// Keys of all objects under `prefix` (`packs/`, `snapshots/`), in no particular order.
    /// Temporary objects of unfinished writes are never listed.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;

    /// Deletes an object; deleting a missing object is not an error. Durable on return.
    fn remove(&self, key: &str) -> Result<()>;
}

/// Key of a pack object.
pub fn pack_key(name: &str) -> String {
    format!("packs/{}/{name}", &name[..2.min(name.len())])
}

/// Key of a snapshot manifest.
pub fn snapshot_key(id: &str) -> String {
    format!("snapshots/{id}")
}
