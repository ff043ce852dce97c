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

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, ObjectRead};
use crate::store::{snapshot_key, Backend};

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
