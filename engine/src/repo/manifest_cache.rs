//! This host's copies of a remote repository's manifests, in the repository's cache directory
//! (`<cache>/manifests/<snapshot id>`), so that a manifest costs its requests once per host,
//! not once per read.
//!
//! A manifest is read piecemeal: opening it checks the whole object, and every segment a
//! backup copies from its parent, a restore or a verify takes, is read again. On an object
//! store each of those reads is a request, so an incremental backup with change knowledge
//! made one GET per unchanged segment of its parent: requests proportional to the disk, not to
//! what changed. A manifest is immutable and content-addressed (its id is the BLAKE3 of its
//! bytes), so a copy can be kept forever and trusted after one check: [`load`] downloads it
//! whole (one size request, then reads of [`PIECE`] bytes, written to a temporary file and
//! renamed into place), opens it from the file, and checks that it hashes to its id as every
//! manifest open does. A copy that fails that check is deleted, and the caller reads the
//! store directly, so a damaged cache file is never reported as repository damage. Memory
//! stays at one piece whatever the manifest's size.
//!
//! A manifest this host stores is copied into the cache as it is written ([`TeeToCache`]), so
//! the next backup's parent, or a restore of the new snapshot, costs no download. The copy is
//! best effort (a write that fails drops it, never the backup) and is only renamed into place
//! once the store has committed the object; it is checked at open like any other copy.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, ObjectRead};
use crate::store::{snapshot_key, Backend, ObjectWriter};

/// Bytes asked for in one request when a manifest is downloaded.
pub const PIECE: usize = 16 << 20;

/// A manifest's local copy, read with positional reads.
struct CachedObject {
    file: File,
    size: u64,
    path: PathBuf,
}

impl ObjectRead for CachedObject {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let past = || {
            Error::corrupt(
                self.path.display().to_string(),
                offset,
                format!("{len} bytes past the end"),
            )
        };
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(past());
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                past()
            } else {
                Error::io("read the cached manifest", &self.path, e)
            }
        })?;
        Ok(buf)
    }
}

/// Whether `id` can name a cache file: 64 lowercase hex digits, as snapshot ids are.
fn is_snapshot_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Opens snapshot `id`'s manifest from this host's copy in `dir`, downloading it first when
/// there is none. `Ok(None)` when it cannot be cached (an id that is not one, a copy that
/// failed its check): the caller reads the store directly, which also gives the right error
/// for a missing or damaged manifest.
pub(crate) fn load<'p>(
    backend: &dyn Backend,
    protection: &'p Protection,
    dir: &Path,
    id: &str,
) -> Result<Option<Manifest<'p>>> {
    if !is_snapshot_id(id) {
        return Ok(None);
    }
    let path = dir.join(id);
    if !path.exists() {
        match download(backend, dir, id, &path) {
            Ok(()) => {}
            // Missing, damaged, unreadable: the direct read says so in the usual words.
            Err(_) => return Ok(None),
        }
    }
    let file = File::open(&path).map_err(|e| Error::io("open the cached manifest", &path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat the cached manifest", &path, e))?
        .len();
    let key = snapshot_key(id);
    let object = CachedObject {
        file,
        size,
        path: path.clone(),
    };
    // An encrypted repository's copy is the sealed object: it is authenticated as it is read,
    // exactly as the stored one would be.
    match crate::index::open_manifest(Box::new(object), protection, id, &key) {
        Ok(m) if crate::format::hex(&m.object_hash()) == id => Ok(Some(m)),
        // Not the stored bytes (a damaged cache file, or a damaged object): forget the copy.
        Ok(_) => forget(&path),
        Err(e) if e.is_corruption() => forget(&path),
        Err(e) => Err(e),
    }
}

fn forget<'p>(path: &Path) -> Result<Option<Manifest<'p>>> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("remove the cached manifest", path, e)),
    }
}

/// Copies the manifest object into `path` through a temporary file in `dir` (a name no other
/// process uses; a crash leaves it, and a later download of the same id does not see it).
fn download(backend: &dyn Backend, dir: &Path, id: &str, path: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let key = snapshot_key(id);
    let size = backend.size(&key)?;
    let tmp = dir.join(format!(".tmp-{id}-{}", crate::lock::random_hex()));
    let written = (|| {
        let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut at = 0u64;
        while at < size {
            let len = usize::try_from(size - at).unwrap_or(PIECE).min(PIECE);
            let bytes = backend.get_range(&key, at, len)?;
            file.write_all(&bytes)
                .map_err(|e| Error::io("write", &tmp, e))?;
            at += len as u64;
        }
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io("rename the cached manifest into place", path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// An [`ObjectWriter`] for a manifest that also writes its bytes into this host's copy: a
/// temporary file in the cache directory, renamed to `<dir>/<snapshot id>` after the store's
/// commit (see the module doc).
pub(crate) struct TeeToCache<'a> {
    inner: Box<dyn ObjectWriter + 'a>,
    dir: PathBuf,
    /// The copy being written; `None` once a write to it failed.
    copy: Option<TempCopy>,
}

/// A copy being written under a temporary name; removed when dropped unless it was renamed
/// into place first (then the removal finds nothing).
struct TempCopy {
    file: File,
    path: PathBuf,
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl<'a> TeeToCache<'a> {
    pub(crate) fn new(inner: Box<dyn ObjectWriter + 'a>, dir: &Path) -> TeeToCache<'a> {
        let path = dir.join(format!(".tmp-new-{}", crate::lock::random_hex()));
        let copy = std::fs::create_dir_all(dir)
            .and_then(|()| File::create(&path))
            .ok()
            .map(|file| TempCopy { file, path });
        TeeToCache {
            inner,
            dir: dir.to_path_buf(),
            copy,
        }
    }
}

impl Write for TeeToCache<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(copy) = &mut self.copy {
            if buf.get(..n).is_none_or(|b| copy.file.write_all(b).is_err()) {
                self.copy = None;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for TeeToCache<'_> {
    fn commit(self: Box<Self>, key: &str) -> Result<()> {
        let TeeToCache { inner, dir, copy } = *self;
        let committed = inner.commit(key);
        let id = key
            .strip_prefix("snapshots/")
            .filter(|id| is_snapshot_id(id));
        if let (Ok(()), Some(copy), Some(id)) = (&committed, &copy, id) {
            let _ = std::fs::rename(&copy.path, dir.join(id));
        }
        committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalDir;

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    #[test]
    fn the_copy_appears_only_once_the_store_committed_the_manifest() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let store = LocalDir::new(tmp.path().join("store"));
        std::fs::create_dir_all(tmp.path().join("store/snapshots"))
            .map_err(|e| Error::io("mkdir", "store", e))?;
        let cache = tmp.path().join("manifests");
        let id = "ab".repeat(32);
        let write = |w: &mut TeeToCache<'_>, data: &[u8]| {
            w.write_all(data).map_err(|e| Error::io("write", "tee", e))
        };

        // Dropped before its commit (a failed backup): neither copy nor temporary file.
        let mut w = TeeToCache::new(store.writer("snapshots/")?, &cache);
        write(&mut w, b"partial")?;
        drop(w);
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));

        // A commit the store refuses (a key outside the directory): no copy either.
        let mut w = TeeToCache::new(store.writer("snapshots/")?, &cache);
        write(&mut w, b"refused")?;
        assert!(Box::new(w).commit(&format!("packs/{id}")).is_err());
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));

        // Committed: the copy is the stored object, under the snapshot id.
        let mut w = TeeToCache::new(store.writer("snapshots/")?, &cache);
        write(&mut w, b"manifest ")?;
        write(&mut w, b"bytes")?;
        Box::new(w).commit(&format!("snapshots/{id}"))?;
        assert_eq!(names(&cache), std::slice::from_ref(&id));
        let copy = std::fs::read(cache.join(&id)).map_err(|e| Error::io("read", "copy", e))?;
        assert_eq!(copy, store.get(&format!("snapshots/{id}"))?);
        Ok(())
    }
}
