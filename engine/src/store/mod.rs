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

    /// Starts an object too large to hold in memory (the manifest of a large disk), to be
    /// stored under a key in `dir` (`snapshots/`) that is known only when it is complete.
    /// This default gathers the bytes in memory and `put`s them.
    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn ObjectWriter + 'a>> {
        Ok(Box::new(GatheredObject {
            backend: self,
            dir: dir.to_string(),
            data: Vec::new(),
        }))
    }
}

/// An object written in pieces (see [`Backend::writer`]). Nothing of it is visible before
/// [`ObjectWriter::commit`]; dropped uncommitted, it leaves nothing behind but, after a
/// crash, a temporary object that readers ignore.
pub trait ObjectWriter: std::io::Write + Send {
    /// Makes the object durable and visible under `key`, as [`Backend::put`] does. `key`
    /// must be in the directory the writer was started for.
    fn commit(self: Box<Self>, key: &str) -> Result<()>;
}

/// [`Backend::writer`]'s default: the bytes in memory until `commit`.
struct GatheredObject<'a, B: Backend + ?Sized> {
    backend: &'a B,
    dir: String,
    data: Vec<u8>,
}

impl<B: Backend + ?Sized> std::io::Write for GatheredObject<'_, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<B: Backend + ?Sized> ObjectWriter for GatheredObject<'_, B> {
    fn commit(self: Box<Self>, key: &str) -> Result<()> {
        check_key_in(&self.dir, key)?;
        self.backend.put(key, &self.data)
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

/// Key of a pack object.
pub fn pack_key(name: &str) -> String {
    format!("packs/{}/{name}", &name[..2.min(name.len())])
}

/// Key of a snapshot manifest.
pub fn snapshot_key(id: &str) -> String {
    format!("snapshots/{id}")
}
