//! A repository in a local directory (or a mounted network share).
//!
//! `put` writes to a temporary name in the destination directory, fsyncs the file, renames
//! it to the final name (`RENAME_NOREPLACE`, or a hard link where the file system lacks it, so
//! that an existing object is refused, never overwritten) and fsyncs the directory: readers
//! see nothing or everything, and a completed `put` survives power loss. Version tags are
//! content hashes. Streamed objects (`writer`) go the same way, with the
//! name given at `commit`. Temporary names start with `.tmp-` and are never
//! listed; a crash can leave them behind, and they are harmless.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{check_key_in, Backend, ObjectInfo, ObjectWriter, Version};
use crate::error::{Error, Result};

/// A backend rooted at a local directory.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    /// Recently read objects kept open: a restore reads thousands of chunks from a few packs,
    /// and an open per chunk would cost more than the read. Most recent last.
    open: Arc<Mutex<OpenFiles>>,
}

/// Open handles by object key, least recently used first.
type OpenFiles = Vec<(String, Arc<File>)>;

const TMP_PREFIX: &str = ".tmp-";
/// How many objects `get_range` keeps open.
const OPEN_FILES: usize = 32;

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDir {
            root: root.into(),
            open: Arc::default(),
        }
    }

    /// An open handle on `key`, from the cache or freshly opened.
    fn open_cached(&self, key: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = open.iter().position(|(k, _)| k == key) {
            let entry = open.remove(i);
            let file = Arc::clone(&entry.1);
            open.push(entry);
            return Ok(file);
        }
        let path = self.path(key);
        let file = Arc::new(File::open(&path).map_err(|e| io_or_not_found(key, "open", &path, e))?);
        if open.len() >= OPEN_FILES {
            open.remove(0);
        }
        open.push((key.to_string(), Arc::clone(&file)));
        Ok(file)
    }

    /// Drops a cached handle whose object was replaced or removed.
    fn forget_open(&self, key: &str) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(k, _)| k != key);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

/// fsyncs a directory so that a rename or unlink in it is durable.
///
/// This and [`sync_file`] are the only two ways the store makes anything durable; with the
/// `testing` feature they report each fsync to the power-cut recorder
/// ([`super::testing::power`]), which keeps only what they made durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))?;
    #[cfg(feature = "testing")]
    super::testing::power::synced_dir(dir);
    Ok(())
}

/// fsyncs the data of `file` (at `path`), so that it survives power loss once its name does.
fn sync_file(file: &File, path: &Path) -> Result<()> {
    file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
    #[cfg(feature = "testing")]
    super::testing::power::synced_file(path);
    Ok(())
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    // A failing OS random source only costs uniqueness of a temp name; fall back to the pid.
    if getrandom::fill(&mut b).is_err() {
        b = u64::from(std::process::id()).to_le_bytes();
    }
    crate::format::hex(&b)
}

/// `Error::NotFound` for a missing object, else the I/O error of `op` on `path`.
fn io_or_not_found(key: &str, op: &'static str, path: &Path, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::NotFound {
        Error::NotFound {
            object: key.to_string(),
        }
    } else {
        Error::io(op, path, e)
    }
}

/// Moves the complete, fsynced temporary file `tmp` to `path` unless something is there
/// already, in one atomic step: `put` never overwrites, and checking first would leave a
/// window for another writer.
fn rename_noreplace(tmp: &Path, path: &Path, key: &str) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    let exists = || Error::AlreadyExists {
        object: key.to_string(),
    };
    match renameat_with(CWD, tmp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => Err(exists()),
        // A file system without RENAME_NOREPLACE (some network shares): a hard link is just
        // as atomic about an existing name, and leaves the same inode (so the same fsynced
        // data) under it.
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => match fs::hard_link(tmp, path) {
            Ok(()) => {
                // The object is in place; a temporary name left behind is harmless (never
                // listed, removed by prune).
                let _ = fs::remove_file(tmp);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(Error::io("link into place", path, e)),
        },
        Err(e) => Err(Error::io("rename into place", path, e.into())),
    }
}

/// The version tag of `data`: a content hash, so that equal tags mean equal contents
/// whatever happened to the file in between (inode numbers and mtimes can repeat).
fn content_version(data: &[u8]) -> Version {
    Version(blake3::hash(data).to_hex().to_string())
}

impl LocalDir {
    /// The directory of `key` (created, durably, if missing) and its file name.
    fn dir_and_name<'k>(&self, key: &'k str) -> Result<(PathBuf, &'k str)> {
        let bad = || Error::InvalidArgument(format!("bad object key {key}"));
        let path = self.path(key);
        let dir = path.parent().ok_or_else(bad)?.to_path_buf();
        let name = key
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .ok_or_else(bad)?;
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        Ok((dir, name))
    }

    /// Writes `data` to a fresh temporary file in `dir` and fsyncs it; on error nothing is
    /// left behind.
    fn write_temp(&self, dir: &Path, name: &str, key: &str, data: &[u8]) -> Result<PathBuf> {
        let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", random_suffix()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Error::io("create", &tmp, e))?;
            // Written in two halves so that a crash test can stop between them.
            let (first, second) = data.split_at(data.len() / 2);
            f.write_all(first)
                .map_err(|e| Error::io("write", &tmp, e))?;
            if key.starts_with("packs/") {
                crate::crash::point("pack-write");
            }
            f.write_all(second)
                .map_err(|e| Error::io("write", &tmp, e))?;
            sync_file(&f, &tmp)
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Fails unless `key` is at version `expected`.
    fn check_version(&self, key: &str, expected: &Version) -> Result<()> {
        if self.version(key)? == *expected {
            Ok(())
        } else {
            Err(Error::VersionMismatch {
                object: key.to_string(),
            })
        }
    }
}

/// LocalDir's conditional `replace` and `delete_if` compare and then act: a POSIX directory
/// has no compare-and-swap, so two writers of one mutable object must also hold the
/// repository lock, as every writer of a repository does.
impl Backend for LocalDir {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.forget_open(key);
        let (dir, name) = self.dir_and_name(key)?;
        let path = self.path(key);
        // Refused before writing anything when it is plain already; the rename decides.
        if path.exists() {
            return Err(Error::AlreadyExists {
                object: key.to_string(),
            });
        }
        let tmp = self.write_temp(&dir, name, key, data)?;
        let result = rename_noreplace(&tmp, &path, key).and_then(|()| sync_dir(&dir));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key);
        fs::read(&path).map_err(|e| io_or_not_found(key, "read", &path, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(key, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        // Into the caller's buffer, grown exactly: a reader that reads many ranges (a served
        // disk's loaders) keeps one allocation instead of faulting in a fresh one per range.
        let path = self.path(key);
        let f = self.open_cached(key)?;
        buf.clear();
        buf.reserve_exact(len);
        buf.resize(len, 0);
        match f.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::corrupt(
                path.display(),
                offset,
                format!("object ends before {len} bytes could be read (truncated?)"),
            )),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    fn size(&self, key: &str) -> Result<u64> {
        let path = self.path(key);
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| io_or_not_found(key, "stat", &path, e))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        path.try_exists().map_err(|e| Error::io("stat", &path, e))
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let base = self.path(prefix);
        if !base.exists() {
            return Ok(out);
        }
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                let path = entry.path();
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed while listing: not an object any more.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io("stat", &path, e)),
                };
                if meta.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    out.push(ObjectInfo {
                        key: rel.to_string_lossy().into_owned(),
                        size: meta.len(),
                        modified: meta.modified().ok(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn ObjectWriter + 'a>> {
        let dir_key = dir.to_string();
        let dir = self.path(dir);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}", random_suffix()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        Ok(Box::new(LocalObject {
            backend: self,
            dir_key,
            dir,
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        }))
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.forget_open(key);
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
        match path.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }

    fn version(&self, key: &str) -> Result<Version> {
        Ok(content_version(&self.get(key)?))
    }

    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> Result<Version> {
        self.check_version(key, expected)?;
        self.forget_open(key);
        let (dir, name) = self.dir_and_name(key)?;
        let path = self.path(key);
        let tmp = self.write_temp(&dir, name, key, data)?;
        let result = fs::rename(&tmp, &path)
            .map_err(|e| Error::io("rename into place", &path, e))
            .and_then(|()| sync_dir(&dir));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| content_version(data))
    }

    fn delete_if(&self, key: &str, expected: &Version) -> Result<()> {
        self.check_version(key, expected)?;
        self.remove(key)
    }
}

/// An object being written to a temporary file of its directory (see [`Backend::writer`]).
struct LocalObject<'a> {
    backend: &'a LocalDir,
    dir_key: String,
    dir: PathBuf,
    tmp: PathBuf,
    /// `None` once committed.
    file: Option<std::io::BufWriter<File>>,
}

impl Write for LocalObject<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("object already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl ObjectWriter for LocalObject<'_> {
    fn commit(mut self: Box<Self>, key: &str) -> Result<()> {
        check_key_in(&self.dir_key, key)?;
        let Some(buffered) = self.file.take() else {
            return Err(Error::InvalidArgument(format!("{key}: committed twice")));
        };
        let tmp = self.tmp.clone();
        let result = (|| {
            let file = buffered
                .into_inner()
                .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
            if key.starts_with("snapshots/") {
                crate::crash::point("manifest-write");
            }
            sync_file(&file, &tmp)?;
            let path = self.backend.path(key);
            self.backend.forget_open(key);
            rename_noreplace(&tmp, &path, key)?;
            sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl Drop for LocalObject<'_> {
    fn drop(&mut self) {
        // Not committed: the temporary file is all there is of it.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_remove() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let b = LocalDir::new(dir.path());
        b.put("packs/ab/abcd", b"hello")?;
        assert_eq!(b.get("packs/ab/abcd")?, b"hello");
        assert_eq!(b.get_range("packs/ab/abcd", 1, 3)?, b"ell");
        assert!(matches!(
            b.get_range("packs/ab/abcd", 3, 3),
            Err(Error::Corrupt { offset: 3, .. })
        ));
        assert_eq!(b.list("packs/")?, vec!["packs/ab/abcd".to_string()]);
        assert!(b.list("snapshots/")?.is_empty());
        b.remove("packs/ab/abcd")?;
        b.remove("packs/ab/abcd")?;
        assert!(!b.exists("packs/ab/abcd")?);
        Ok(())
    }

    #[test]
    fn streamed_objects_appear_only_when_committed() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let b = LocalDir::new(dir.path());
        let write = |w: &mut Box<dyn ObjectWriter + '_>, data: &[u8]| {
            w.write_all(data)
                .map_err(|e| Error::io("write", "object", e))
        };
        let mut w = b.writer("snapshots/")?;
        write(&mut w, b"hello ")?;
        write(&mut w, b"world")?;
        assert!(b.list("snapshots/")?.is_empty(), "visible before commit");
        assert!(
            w.commit("packs/ab/x").is_err(),
            "a key outside its directory"
        );
        let mut w = b.writer("snapshots/")?;
        write(&mut w, b"hello world")?;
        w.commit("snapshots/abc")?;
        assert_eq!(b.get("snapshots/abc")?, b"hello world");
        // Dropped without commit: no file at all, not even a temporary one.
        let mut w = b.writer("snapshots/")?;
        write(&mut w, b"lost")?;
        drop(w);
        let names: Vec<_> = fs::read_dir(dir.path().join("snapshots"))
            .map_err(|e| Error::io("list", dir.path(), e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }
}
