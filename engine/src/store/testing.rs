//! Test-only backends: faults that real storage produces rarely and unpredictably, and
//! [`MemoryBackend`](super::MemoryBackend) (in `memory.rs`) for a store without a disk.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, ObjectInfo, Version};
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
    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list_with_sizes(prefix)
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
}

/// Power cuts, as opposed to kills: what a repository directory holds after the machine
/// loses power at any durable step of an operation.
///
/// A SIGKILL leaves the page cache alone, so a kill test cannot tell whether a write was
/// ever made durable. This recorder models what a POSIX file system promises across a power
/// cut: a file's data survives once the file was fsynced (kept by inode, so it follows
/// renames), and a directory's entries (creations, renames, unlinks) survive once the
/// directory was fsynced. Everything else is lost: a name whose directory was never synced
/// is gone (or still points where it did), a durable name whose file was never fsynced
/// holds nothing (the zero-length file ext4 leaves behind).
///
/// [`LocalDir`](super::LocalDir) and the free `sync_dir` report every fsync to the
/// recorders registered for the path (only with the `testing` feature), after it
/// succeeded. Each report is a durable step: the recorder then saves the state a power cut
/// right after it would leave, and [`PowerCut::materialize`] writes that state into a fresh
/// directory. The recorder reads the real directory, so the operation under test runs on
/// real files and is not changed by being observed.
///
/// The SQLite index (`index.sqlite*`) is outside this model: SQLite makes its own commits
/// durable with its own fsyncs, which the recorder does not see. A cut keeps the index as
/// SQLite left it at that moment (every committed transaction survived), which is the
/// hardest case for the object store: each index row must then point at objects that were
/// already durable. An index that is newer than the objects (rows naming a pack the cut
/// lost) is not repaired on open; `check` reports it as `pack-missing` damage and
/// `index rebuild` repairs it. The crash tests assert both.
pub mod power {
    use std::collections::{BTreeMap, HashMap};
    use std::ffi::OsString;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, OnceLock};

    use crate::error::{Error, Result};

    /// Names of the SQLite index files, kept outside the durability model.
    const INDEX_PREFIX: &str = "index.sqlite";

    #[derive(Clone, Debug)]
    enum Node {
        File(u64),
        Dir,
    }

    /// What a power cut right after one durable step leaves in the repository directory.
    #[derive(Clone, Debug)]
    pub struct PowerCut {
        /// 0 for the state before the first step.
        pub step: usize,
        /// The step, e.g. `fsync packs/3f/.tmp-…` or `fsync directory packs/3f`.
        pub after: String,
        dirs: Vec<PathBuf>,
        files: BTreeMap<PathBuf, Arc<Vec<u8>>>,
        /// The index files as SQLite left them.
        index: Vec<(String, Arc<Vec<u8>>)>,
    }

    impl PowerCut {
        /// Writes this state into `into`, which must not exist yet.
        pub fn materialize(&self, into: &Path) -> Result<()> {
            self.materialize_with_index(into, &self.index)
        }

        /// Writes the objects of this state with the index files of `index_from` (another
        /// cut, typically a later one: an index newer than the objects).
        pub fn materialize_with_index_of(&self, into: &Path, index_from: &PowerCut) -> Result<()> {
            self.materialize_with_index(into, &index_from.index)
        }

        fn materialize_with_index(
            &self,
            into: &Path,
            index: &[(String, Arc<Vec<u8>>)],
        ) -> Result<()> {
            std::fs::create_dir(into).map_err(|e| Error::io("create directory", into, e))?;
            for d in &self.dirs {
                let p = into.join(d);
                std::fs::create_dir_all(&p).map_err(|e| Error::io("create directory", &p, e))?;
            }
            for (rel, data) in self
                .files
                .iter()
                .map(|(r, d)| (r.clone(), d))
                .chain(index.iter().map(|(name, d)| (PathBuf::from(name), d)))
            {
                let p = into.join(rel);
                std::fs::write(&p, data.as_slice()).map_err(|e| Error::io("write", &p, e))?;
            }
            Ok(())
        }

        /// Relative paths of the object files this state holds (index files excluded).
        pub fn object_paths(&self) -> Vec<String> {
            self.files
                .keys()
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        }

        /// A digest of the whole state: equal states need to be checked once.
        pub fn digest(&self) -> [u8; 32] {
            let mut h = blake3::Hasher::new();
            for d in &self.dirs {
                h.update(d.as_os_str().as_encoded_bytes());
                h.update(b"/\0");
            }
            for (p, data) in &self.files {
                h.update(p.as_os_str().as_encoded_bytes());
                h.update(&(data.len() as u64).to_le_bytes());
                h.update(data);
            }
            for (name, data) in &self.index {
                h.update(name.as_bytes());
                h.update(&(data.len() as u64).to_le_bytes());
                h.update(data);
            }
            *h.finalize().as_bytes()
        }
    }

    /// The durable state of one directory tree, updated at each reported fsync.
    #[derive(Debug, Default)]
    struct Model {
        /// Durable contents by inode.
        data: HashMap<u64, Arc<Vec<u8>>>,
        /// Durable entries by directory (relative to the root; `""` is the root).
        entries: HashMap<PathBuf, BTreeMap<OsString, Node>>,
        cuts: Vec<PowerCut>,
    }

    /// Records the durable steps of operations on the repository at `root`.
    #[derive(Debug)]
    pub struct PowerCutRecorder {
        root: PathBuf,
        model: Mutex<Model>,
    }

    fn registry() -> &'static Mutex<Vec<Arc<PowerCutRecorder>>> {
        static RECORDERS: OnceLock<Mutex<Vec<Arc<PowerCutRecorder>>>> = OnceLock::new();
        RECORDERS.get_or_init(Mutex::default)
    }

    fn recorders_for(path: &Path) -> Vec<Arc<PowerCutRecorder>> {
        let all = registry().lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|r| path.starts_with(&r.root))
            .cloned()
            .collect()
    }

    /// Called after `path` (a file) was fsynced.
    pub(crate) fn synced_file(path: &Path) {
        for r in recorders_for(path) {
            r.file_synced(path);
        }
    }

    /// Called after directory `dir` was fsynced.
    pub(crate) fn synced_dir(dir: &Path) {
        for r in recorders_for(dir) {
            r.dir_synced(dir);
        }
    }

    impl PowerCutRecorder {
        /// Starts recording under `root`: everything there now counts as durable (the
        /// state before the operation), and becomes cut 0.
        pub fn start(root: &Path) -> Result<Arc<PowerCutRecorder>> {
            let rec = Arc::new(PowerCutRecorder {
                root: root.to_path_buf(),
                model: Mutex::default(),
            });
            {
                let mut m = rec.lock();
                let mut stack = vec![PathBuf::new()];
                while let Some(rel) = stack.pop() {
                    let listing = rec.list(&rel)?;
                    for (name, node) in &listing {
                        match node {
                            Node::Dir => stack.push(rel.join(name)),
                            Node::File(ino) => {
                                let p = root.join(&rel).join(name);
                                let data =
                                    std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
                                m.data.insert(*ino, Arc::new(data));
                            }
                        }
                    }
                    m.entries.insert(rel, listing);
                }
                let cut = rec.cut(&m, "nothing (the state before the operation)");
                m.cuts.push(cut);
            }
            registry()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::clone(&rec));
            Ok(rec)
        }

        /// Stops recording; returns the state after each durable step, cut 0 first.
        pub fn finish(&self) -> Vec<PowerCut> {
            registry()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|r| !std::ptr::eq(r.as_ref(), self));
            std::mem::take(&mut self.lock().cuts)
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Model> {
            self.model.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// The current (live) entries of directory `rel`, index files left out.
        fn list(&self, rel: &Path) -> Result<BTreeMap<OsString, Node>> {
            let dir = self.root.join(rel);
            let mut out = BTreeMap::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                let name = entry.file_name();
                if rel.as_os_str().is_empty() && name.to_string_lossy().starts_with(INDEX_PREFIX) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(entry.path())
                    .map_err(|e| Error::io("stat", entry.path(), e))?;
                let node = if meta.is_dir() {
                    Node::Dir
                } else {
                    Node::File(meta.ino())
                };
                out.insert(name, node);
            }
            Ok(out)
        }

        fn rel<'p>(&self, path: &'p Path) -> Option<&'p Path> {
            path.strip_prefix(&self.root).ok()
        }

        fn file_synced(&self, path: &Path) {
            let Some(rel) = self.rel(path) else { return };
            if rel.to_string_lossy().starts_with(INDEX_PREFIX) {
                return;
            }
            let mut m = self.lock();
            // The file may be gone already only if another thread removed it right
            // after its fsync; then there is nothing left to keep.
            if let (Ok(meta), Ok(data)) = (std::fs::metadata(path), std::fs::read(path)) {
                m.data.insert(meta.ino(), Arc::new(data));
            }
            let cut = self.cut(&m, &format!("fsync {}", rel.display()));
            m.cuts.push(cut);
        }

        fn dir_synced(&self, dir: &Path) {
            let Some(rel) = self.rel(dir) else { return };
            let rel = rel.to_path_buf();
            let mut m = self.lock();
            if let Ok(listing) = self.list(&rel) {
                m.entries.insert(rel.clone(), listing);
            }
            let cut = self.cut(&m, &format!("fsync directory {}/", rel.display()));
            m.cuts.push(cut);
        }

        /// The state a power cut now would leave.
        fn cut(&self, m: &Model, after: &str) -> PowerCut {
            let mut dirs = Vec::new();
            let mut files = BTreeMap::new();
            let mut stack = vec![PathBuf::new()];
            while let Some(rel) = stack.pop() {
                let Some(listing) = m.entries.get(&rel) else {
                    // A durable directory whose own entries were never synced: empty.
                    continue;
                };
                for (name, node) in listing {
                    let p = rel.join(name);
                    match node {
                        Node::Dir => {
                            dirs.push(p.clone());
                            stack.push(p);
                        }
                        Node::File(ino) => {
                            let data = m.data.get(ino).cloned().unwrap_or_default();
                            files.insert(p, data);
                        }
                    }
                }
            }
            dirs.sort();
            let mut index = Vec::new();
            for suffix in ["", "-wal"] {
                let name = format!("{INDEX_PREFIX}{suffix}");
                if let Ok(data) = std::fs::read(self.root.join(&name)) {
                    index.push((name, Arc::new(data)));
                }
            }
            PowerCut {
                step: m.cuts.len(),
                after: after.to_string(),
                dirs,
                files,
                index,
            }
        }
    }
}
