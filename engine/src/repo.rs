//! A repository: config + backend + index, and the operations every command starts with.
//!
//! `init` writes the config last, so a directory holding a config is a complete repository.
//! `open` refuses anything that is not one (or is from a newer format), and reconciles the
//! index with the manifests present; a missing index is rebuilt from packs and manifests.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::format::config::{ChunkerParams, RepoConfig, CONFIG_MAGIC};
use crate::format::manifest::Manifest;
use crate::format::verification::VerificationRecord;
use crate::format::ChunkId;
use crate::index::{self, Index, IndexReaders, SnapshotSummary};
use crate::store::{self, Backend, LocalDir};

/// File name of the index inside the repository directory.
pub const INDEX_FILE: &str = "index.sqlite";
const CONFIG_KEY: &str = "config";

/// Options of `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub zstd_level: i32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::DEFAULT,
            zstd_level: 3,
        }
    }
}

/// An open repository.
pub struct Repo {
    root: PathBuf,
    backend: Arc<dyn Backend>,
    config: RepoConfig,
    // Declared (and so dropped) before `index`: the writable connection must close last,
    // so that SQLite checkpoints the write-ahead log into the file and removes it.
    readers: IndexReaders,
    index: Mutex<Index>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("root", &self.root).finish()
    }
}

impl Repo {
    /// Creates a repository in `path`, which must not exist or be an empty directory.
    pub fn init(path: &Path, options: &InitOptions) -> Result<Repo> {
        if path.join(CONFIG_KEY).exists() {
            return Err(Error::InvalidArgument(format!(
                "{} is already a stackvault repository",
                path.display()
            )));
        }
        match fs::read_dir(path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::DirectoryNotEmpty {
                        path: path.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(path).map_err(|e| Error::io("create repository", path, e))?;
            }
            Err(e) => return Err(Error::io("read directory", path, e)),
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| {
            Error::io(
                "draw a repository id",
                path,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut config = RepoConfig::new(id, now, options.chunker);
        config.zstd_level = options.zstd_level;
        config.validate().map_err(Error::InvalidArgument)?;
        for dir in ["packs", "snapshots", "locks"] {
            let d = path.join(dir);
            fs::create_dir_all(&d).map_err(|e| Error::io("create directory", &d, e))?;
        }
        Index::open(&path.join(INDEX_FILE))?;
        let backend = LocalDir::new(path);
        // The config is written last: its presence marks a complete repository.
        backend.put(CONFIG_KEY, &config.encode())?;
        Repo::open(path)
    }

    /// Opens the repository at `path`.
    pub fn open(path: &Path) -> Result<Repo> {
        Self::open_with_backend(path, Arc::new(LocalDir::new(path)))
    }

    /// Opens the repository at `path` with objects served by `backend` (the index and locks
    /// stay in `path`). Used with fault-injecting backends in tests.
    pub fn open_with_backend(path: &Path, backend: Arc<dyn Backend>) -> Result<Repo> {
        let config = read_config(path, backend.as_ref())?;
        let index_path = path.join(INDEX_FILE);
        if !index_path.exists() {
            // The index is derived state: rebuild it from packs and manifests, under a
            // temporary name so that a crash never leaves a partial index behind. Linking
            // fails if another process got there first; its index is as good as ours.
            let (tmp, _) = build_index_file(path, backend.as_ref())?;
            let linked = fs::hard_link(&tmp, &index_path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => store::sync_dir(path)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("link rebuilt index", &index_path, e)),
            }
        }
        let index = Index::open(&index_path)?;
        index::sync_snapshots(&index, backend.as_ref())?;
        Ok(Repo {
            root: path.to_path_buf(),
            readers: IndexReaders::new(&index_path),
            backend,
            config,
            index: Mutex::new(index),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The writable index connection.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions
        // roll back), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pooled read-only index connections for parallel lookups.
    pub fn readers(&self) -> &IndexReaders {
        &self.readers
    }

    /// Snapshots, oldest first, optionally of one disk.
    pub fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotSummary>> {
        self.index().snapshots(disk)
    }

    /// Resolves `latest`, a full id or a unique id prefix.
    pub fn resolve_snapshot(&self, query: &str, disk: Option<&str>) -> Result<SnapshotSummary> {
        let all = self.snapshots(disk)?;
        let not_found = || Error::SnapshotNotFound {
            query: match disk {
                Some(d) => format!("{query} (disk {d})"),
                None => query.to_string(),
            },
        };
        if query == "latest" {
            return all.into_iter().last().ok_or_else(not_found);
        }
        let q = query.to_ascii_lowercase();
        if q.is_empty() || !q.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {query:?}: expected `latest` or (a prefix of) a hex snapshot id"
            )));
        }
        let mut matches: Vec<SnapshotSummary> =
            all.into_iter().filter(|s| s.id.starts_with(&q)).collect();
        match matches.len() {
            0 => Err(not_found()),
            1 => Ok(matches.remove(0)),
            _ => Err(Error::AmbiguousSnapshot {
                prefix: query.to_string(),
                candidates: matches
                    .into_iter()
                    .map(|s| s.id[..12].to_string())
                    .collect(),
            }),
        }
    }

    /// Reads and checks a snapshot's manifest.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest<'_>> {
        index::load_manifest(self.backend.as_ref(), id)
    }

    /// Reads a chunk and verifies it (crc32, decompression, BLAKE3).
    pub fn read_chunk(&self, id: &ChunkId, snapshot: &str) -> Result<Vec<u8>> {
        let mut cache = store::pack::FrameCache::default();
        self.with_chunk(id, snapshot, &mut cache, |d| Ok(d.to_vec()))
    }

    /// Reads a chunk, verifies it (crc32, decompression, BLAKE3) and hands it to `f`. The
    /// chunk's frame comes from `cache` when it holds it, else is decompressed into it: a
    /// reader that goes through chunks in disk order decompresses each frame once.
    pub fn with_chunk<R>(
        &self,
        id: &ChunkId,
        snapshot: &str,
        cache: &mut store::pack::FrameCache,
        mut f: impl FnMut(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let loc = self
            .readers
            .lookup(id)?
            .ok_or_else(|| Error::MissingChunk {
                id: id.to_hex(),
                snapshot: snapshot.to_string(),
            })?;
        let backend = self.backend.as_ref();
        match store::pack::with_chunk(backend, &loc.pack, &loc.record, cache, &mut f) {
            // Readers take no lock: prune may have moved the chunk to a new pack and deleted
            // the old one since the lookup. Look once more before calling it damage.
            Err(e) if e.is_corruption() => match self.readers.lookup(id)? {
                Some(again) if again != loc => {
                    store::pack::with_chunk(backend, &again.pack, &again.record, cache, f)
                }
                _ => Err(e),
            },
            other => other,
        }
    }

    /// Takes a writer lock of `kind` (`backup`, ...) in `locks/`, released when the guard
    /// drops. Refused while maintenance holds the repository (see [`crate::lock`]).
    pub fn lock(&self, kind: &str) -> Result<LockGuard> {
        crate::lock::acquire_writer(&self.root, kind)
    }

    /// Every verification record of one snapshot, oldest first, with its key.
    pub fn verifications_of(&self, snapshot_id: &str) -> Result<Vec<(String, VerificationRecord)>> {
        let mut all = self.index().verifications()?;
        all.retain(|(_, r)| r.snapshot_id == snapshot_id);
        Ok(all)
    }

    /// The latest verification of every snapshot that has one, by snapshot id.
    pub fn last_verifications(
        &self,
    ) -> Result<std::collections::HashMap<String, VerificationRecord>> {
        self.index().last_verifications()
    }
}

/// Reads and checks the config of the repository at `path`.
fn read_config(path: &Path, backend: &dyn Backend) -> Result<RepoConfig> {
    let not_repo = |why: &str| Error::NotARepository {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if !path.is_dir() {
        return Err(not_repo("no such directory"));
    }
    let bytes = match backend.get(CONFIG_KEY) {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_repo("it has no config file"))
        }
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(&CONFIG_MAGIC) {
        return Err(not_repo("its config file is not a stackvault config"));
    }
    RepoConfig::decode(&bytes, &path.join(CONFIG_KEY).display().to_string())
}

/// Replaces the index of the repository at `path` with one rebuilt from its packs, manifests
/// and verification records alone; works whatever state the old index is in.
///
/// Holds the maintenance lock, so no backup runs meanwhile. The new index is built under a
/// temporary name and renamed over the old one: a crash leaves the old index or the new one,
/// never a mix. The old write-ahead log is emptied into the old file (when it is readable)
/// and removed before the rename, because SQLite would replay it against the new file.
pub fn rebuild_index(path: &Path) -> Result<index::RebuildReport> {
    let backend = LocalDir::new(path);
    read_config(path, &backend)?;
    let _lock = crate::lock::acquire_maintenance(path, "index rebuild")?;
    let live = path.join(INDEX_FILE);
    let (tmp, report) = build_index_file(path, &backend)?;
    if live.exists() {
        // Best effort: a damaged index may not open at all, and then its log is worthless.
        if let Ok(old) = Index::open(&live) {
            let _ = old.checkpoint();
        }
    }
    for p in index_sidecars(&live) {
        remove_if_present(&p)?;
    }
    fs::rename(&tmp, &live).map_err(|e| Error::io("rename rebuilt index into place", &live, e))?;
    store::sync_dir(path)?;
    Ok(report)
}

/// Builds a complete index from the repository's objects in a new file under a temporary
/// name in `path`, closed (its log emptied into it), and returns that name.
fn build_index_file(path: &Path, backend: &dyn Backend) -> Result<(PathBuf, index::RebuildReport)> {
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let tmp = path.join(format!(
        "{INDEX_FILE}.rebuild-{}-{}",
        std::process::id(),
        crate::format::hex(&r)
    ));
    let result = (|| {
        let mut fresh = Index::open(&tmp)?;
        let report = index::rebuild(&mut fresh, backend)?;
        fresh.checkpoint()?;
        Ok(report)
    })();
    match result {
        Ok(report) => Ok((tmp, report)),
        Err(e) => {
            for p in std::iter::once(tmp.clone()).chain(index_sidecars(&tmp)) {
                let _ = fs::remove_file(p);
            }
            Err(e)
        }
    }
}

/// The write-ahead log and shared-memory files SQLite keeps beside a database in WAL mode.
fn index_sidecars(db: &Path) -> [PathBuf; 2] {
    ["-wal", "-shm"].map(|s| {
        let mut p = db.as_os_str().to_os_string();
        p.push(s);
        PathBuf::from(p)
    })
}

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

pub use crate::lock::LockGuard;

/// This machine's host name, or `unknown`.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Now, as RFC 3339 UTC with exactly six fractional digits, so that times sort as text.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// A time as RFC 3339 UTC with exactly six fractional digits (the form snapshots record).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}
