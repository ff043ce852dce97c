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
    index: Mutex<Index>,
    readers: IndexReaders,
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
        let config = RepoConfig::decode(&bytes, &path.join(CONFIG_KEY).display().to_string())?;
        let index_path = path.join(INDEX_FILE);
        let fresh = !index_path.exists();
        let mut index = Index::open(&index_path)?;
        if fresh {
            // The index is derived state: rebuild it from packs and manifests.
            index::rebuild(&mut index, backend.as_ref())?;
        } else {
            index::sync_snapshots(&index, backend.as_ref())?;
        }
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
    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        index::load_manifest(self.backend.as_ref(), id)
    }

    /// Reads a chunk and verifies it (crc32, decompression, BLAKE3).
    pub fn read_chunk(&self, id: &ChunkId, snapshot: &str) -> Result<Vec<u8>> {
        let loc = self
            .readers
            .lookup(id)?
            .ok_or_else(|| Error::MissingChunk {
                id: id.to_hex(),
                snapshot: snapshot.to_string(),
            })?;
        store::pack::read_chunk(self.backend.as_ref(), &loc.pack, &loc.record)
    }

    /// Takes a lock of `kind` (`backup`, ...) in `locks/`, released when the guard drops.
    pub fn lock(&self, kind: &str) -> Result<LockGuard> {
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let path = self.root.join("locks").join(format!(
            "{kind}-{}-{}.lock",
            std::process::id(),
            crate::format::hex(&r)
        ));
        let body = serde_json::json!({
            "kind": kind,
            "host": hostname(),
            "pid": std::process::id(),
            "time": now_rfc3339(),
        });
        fs::write(&path, body.to_string()).map_err(|e| Error::io("create lock", &path, e))?;
        Ok(LockGuard { path })
    }
}

/// A held repository lock; removed on drop.
#[derive(Debug)]
pub struct LockGuard {
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// This machine's host name, or `unknown`.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Now, as RFC 3339 UTC with exactly six fractional digits, so that times sort as text.
pub fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
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
