//! A repository: config + backend + index, and the operations every command starts with.
//!
//! `init` writes the config last, so a directory holding a config is a complete repository.
//! `open` refuses anything that is not one (or is from a newer format), and reconciles the
//! index with the manifests present; a missing index is rebuilt from packs and manifests.
//!
//! A repository this user cannot write (read-only mount or media, no write permission), or
//! one opened with [`request_read_only`] (`--read-only`), is opened read-only: nothing is
//! written into it, ever. Its index is read in place, immutable, when it is complete and
//! current; otherwise from a per-user cache copy (`$XDG_CACHE_HOME/stackvault/<repo id>/`,
//! else `$HOME/.cache/...`), made from the repository's index or, when that is missing or
//! unreadable, rebuilt from its packs and manifests. Operations that must write refuse at
//! their start ([`Repo::require_writable`]) before they have done anything.
//!
//! A repository on an object store ([`RepoLocation`], opened with [`Repo::open_on`]) keeps no
//! index in the store: each host has its own SQLite index in the per-user cache directory,
//! `index.sqlite` beside the read-only copies, which is brought up to date from the index
//! deltas (`index/xx/<pack>`, see [`crate::index::delta`]) it has not applied yet, on open and
//! whenever [`Repo::refresh`] is called (before a backup's dedup, when a restore looks for a
//! snapshot or chunk it does not know). Its locks are lease objects
//! ([`crate::lock::lease`]). Every pack, local or remote, is written with its delta
//! ([`Repo::commit_pack`]).
//!
//! An encrypted repository (config feature `encryption`, see [`crate::crypto`]) is unlocked
//! right after its config is read, before the index or anything else is touched: a wrong
//! password fails first ([`Error::WrongPassword`]). `init` makes encrypted repositories when
//! asked ([`request_encryption`], the CLI's default), writing the first key object before the
//! config. Opening a plain one says so once per process (a notice on stderr).

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::format::config::{ChunkerParams, RepoConfig, CONFIG_MAGIC};
use crate::format::manifest::Manifest;
use crate::format::verification::VerificationRecord;
use crate::format::ChunkId;
use crate::index::delta::WithDeltas;
use crate::index::{self, Index, IndexReaders, SnapshotSummary};
use crate::store::pack::FinishedPack;
use crate::store::{self, Backend, LocalDir};

mod keys;
mod listed;
mod location;
mod manifest_cache;
pub use location::{
    given_store_options, set_store_options, set_store_options_for, RepoLocation, StoreOptions,
};

use zeroize::Zeroizing;

use crate::crypto::unlock::{KeyHint, Unlocked};
use crate::crypto::Protection;

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

/// Set by [`request_read_only`].
static READ_ONLY_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Set by [`request_encryption`].
static ENCRYPTION_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Set once a plain repository has been reported as such in this process.
static PLAIN_NOTED: AtomicBool = AtomicBool::new(false);

/// Makes `init` (and [`crate::init_like`]) create encrypted repositories from now on, their
/// first key wrapped under the password of [`crate::crypto::unlock::password`]: the CLI's
/// default, which `init --encryption none` turns off. Library callers get plain repositories
/// unless they ask.
pub fn request_encryption(on: bool) {
    ENCRYPTION_REQUESTED.store(on, Ordering::Relaxed);
}

/// Whether `init` makes encrypted repositories ([`request_encryption`]).
pub fn encryption_requested() -> bool {
    ENCRYPTION_REQUESTED.load(Ordering::Relaxed)
}

/// Opens every repository of this process read-only from now on, as the user asked (the
/// CLI's global `--read-only`): commands that must write then fail as usage errors.
pub fn request_read_only() {
    READ_ONLY_REQUESTED.store(true, Ordering::Relaxed);
}

/// Why a repository is open read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOnly {
    /// The user asked for it (`--read-only`).
    Requested,
    /// This user cannot write the repository; says why (read-only file system, permission).
    NotWritable(String),
}

/// Where a repository's index and locks live.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Place {
    /// Inside the repository directory: `index.sqlite`, lock files in `locks/`.
    Local,
    /// On an object store named `location`: the index in a per-host cache, lease locks of
    /// `lease` in the store.
    Remote {
        location: String,
        lease: std::time::Duration,
    },
}

/// An open repository.
pub struct Repo {
    /// The repository directory; for a remote repository, its cache directory on this host.
    root: PathBuf,
    place: Place,
    /// Every object goes through it; it pairs packs with their (sealed) deltas.
    backend: Arc<WithDeltas>,
    config: RepoConfig,
    /// Plain, or the keys unlocked at open (see [`crate::crypto`]).
    protection: Protection,
    /// Id of the key object that unlocked an encrypted repository.
    key_in_use: Option<String>,
    // Declared (and so dropped) before `index`: the writable connection must close last,
    // so that SQLite checkpoints the write-ahead log into the file and removes it.
    readers: IndexReaders,
    index: Mutex<Index>,
    read_only: Option<ReadOnly>,
    // A shared file lock on the cache copy of the index in use, which keeps other processes
    // from cleaning it away; released (closed) after the connections above.
    _cache_hold: Option<File>,
    /// When the cache of a remote repository was last brought up to date from the store.
    caught_up: Mutex<Option<std::time::Instant>>,
    /// See [`Repo::let_next_backup_use_the_open_catch_up`].
    open_catch_up_serves_backup: AtomicBool,
}

/// How long after its open a repository's catch-up may stand in for a backup's own.
pub const OPEN_CATCH_UP_SERVES: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("root", &self.root).finish()
    }
}

impl Repo {
    /// Creates a repository in `path`, which must not exist or be an empty directory; or, when
    /// `path` is a remote location (`s3://…`, `azure://…`, see [`RepoLocation::parse`]), on
    /// that store. A string with an unknown scheme is a usage error, never a directory.
    pub fn init(path: &Path, options: &InitOptions) -> Result<Repo> {
        Self::init_naming_like(path, options, None)
    }

    /// [`Repo::init`]; when encrypted and `naming` is given, the new repository shares its
    /// naming secret (a fresh sealing secret of its own): `init --like`.
    pub(crate) fn init_naming_like(
        path: &Path,
        options: &InitOptions,
        naming: Option<&crate::crypto::RepoSecrets>,
    ) -> Result<Repo> {
        if READ_ONLY_REQUESTED.load(Ordering::Relaxed) {
            return Err(Error::Usage(
                "init creates a repository: run it without --read-only".into(),
            ));
        }
        let location = RepoLocation::from_path(path)?;
        if location.is_remote() {
            return Repo::init_on_naming_like(
                location.connect()?,
                &cache_root()?,
                &location.to_string(),
                options,
                naming,
            );
        }
        if path.join(CONFIG_KEY).exists() {
            return Err(Error::InvalidArgument(format!(
                "{} is already a stackvault repository",
                path.display()
            )));
        }
        let password = new_repository_password(&path.display().to_string(), options)?;
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
        let config = new_config(options, &path.display().to_string())?;
        for dir in ["packs", "snapshots", "locks"] {
            let d = path.join(dir);
            fs::create_dir_all(&d).map_err(|e| Error::io("create directory", &d, e))?;
        }
        Index::open(&path.join(INDEX_FILE))?;
        let backend = Arc::new(LocalDir::new(path));
        let (config, unlocked) = first_key(config, backend.as_ref(), password, naming)?;
        // The config is written last: its presence marks a complete repository.
        backend.put(CONFIG_KEY, &config.encode())?;
        Self::open_local(path, backend, unlocked)
    }

    /// Opens the repository at `path`: read-only when asked ([`request_read_only`]) or when
    /// this user cannot write it (see the module doc), else read-write.
    /// A remote location (see [`RepoLocation::parse`]) is opened with [`Repo::open_on`].
    pub fn open(path: &Path) -> Result<Repo> {
        let location = RepoLocation::from_path(path)?;
        if location.is_remote() {
            let repo = Repo::open_on(location.connect()?, &cache_root()?, &location.to_string())?;
            // The command runs right after this open: a backup need not list the store again.
            repo.let_next_backup_use_the_open_catch_up();
            return Ok(repo);
        }
        let backend = Arc::new(LocalDir::new(path));
        match read_only_reason(path) {
            Some(why) => Self::open_read_only(path, backend, why),
            None => Self::open_with_backend(path, backend),
        }
    }

    /// Opens the repository at `path` read-only, for the reason `why`: writes nothing into
    /// it. The index is used in place when it is current, else from the per-user cache.
    pub fn open_read_only(path: &Path, backend: Arc<dyn Backend>, why: ReadOnly) -> Result<Repo> {
        let backend = Arc::new(WithDeltas::with_protection(backend, Protection::Plain));
        let config = read_config(path, backend.as_ref())?;
        let unlocked = unlock(&config, backend.as_ref(), &path.display().to_string(), None)?;
        let protection = unlocked.protection.clone();
        backend.set_protection(protection.clone());
        let index_path = path.join(INDEX_FILE);
        // Any failure here (no index, damaged, locked in some odd way) leaves the cache copy,
        // which is made from the objects alone if need be.
        let in_place = match Index::open_immutable(&index_path) {
            Ok(Some(index)) => match catalogue_complete(&index, backend.as_ref()) {
                Ok(true) => Some(index),
                _ => None,
            },
            _ => None,
        };
        let (index, readers, hold) = match in_place {
            Some(index) => (index, IndexReaders::immutable(&index_path), None),
            None => {
                let (cached, hold) = cached_index(path, &config, backend.as_ref(), &protection)?;
                let index = Index::open(&cached)?;
                index::sync_snapshots(&index, backend.as_ref(), &protection)?;
                (index, IndexReaders::new(&cached), Some(hold))
            }
        };
        Ok(Repo {
            root: path.to_path_buf(),
            place: Place::Local,
            readers,
            backend,
            config,
            protection,
            key_in_use: unlocked.hint.map(|h| h.key),
            index: Mutex::new(index),
            read_only: Some(why),
            _cache_hold: hold,
            caught_up: Mutex::new(None),
            open_catch_up_serves_backup: AtomicBool::new(false),
        })
    }

    /// Opens the repository at `path` with objects served by `backend` (the index and locks
    /// stay in `path`). Used with fault-injecting backends in tests.
    pub fn open_with_backend(path: &Path, backend: Arc<dyn Backend>) -> Result<Repo> {
        Self::open_local(path, backend, None)
    }

    /// [`Repo::open_with_backend`], with the keys already unlocked when `init` just made them.
    fn open_local(
        path: &Path,
        backend: Arc<dyn Backend>,
        unlocked: Option<Unlocked>,
    ) -> Result<Repo> {
        let backend = Arc::new(WithDeltas::with_protection(backend, Protection::Plain));
        let config = read_config(path, backend.as_ref())?;
        let unlocked = unlock(
            &config,
            backend.as_ref(),
            &path.display().to_string(),
            unlocked,
        )?;
        let protection = unlocked.protection.clone();
        backend.set_protection(protection.clone());
        let (index, index_path) = open_index_in(
            path,
            backend.as_ref(),
            &protection,
            index::Durability::Durable,
        )?;
        index::sync_snapshots(&index, backend.as_ref(), &protection)?;
        Ok(Repo {
            root: path.to_path_buf(),
            place: Place::Local,
            readers: IndexReaders::new(&index_path),
            backend,
            config,
            protection,
            key_in_use: unlocked.hint.map(|h| h.key),
            index: Mutex::new(index),
            read_only: None,
            _cache_hold: None,
            caught_up: Mutex::new(None),
            open_catch_up_serves_backup: AtomicBool::new(false),
        })
    }

    /// Creates a repository on `backend`, a remote store named `location` (for messages),
    /// which must hold no objects; then opens it as [`Repo::open_on`] does. The config, last,
    /// records the `index-deltas` feature: hosts find each other's packs through deltas.
    pub fn init_on(
        backend: Arc<dyn Backend>,
        cache_home: &Path,
        location: &str,
        options: &InitOptions,
    ) -> Result<Repo> {
        Self::init_on_naming_like(backend, cache_home, location, options, None)
    }

    /// [`Repo::init_on`], sharing `naming` as [`Repo::init_naming_like`] does.
    fn init_on_naming_like(
        backend: Arc<dyn Backend>,
        cache_home: &Path,
        location: &str,
        options: &InitOptions,
        naming: Option<&crate::crypto::RepoSecrets>,
    ) -> Result<Repo> {
        if READ_ONLY_REQUESTED.load(Ordering::Relaxed) {
            return Err(Error::Usage(
                "init creates a repository: run it without --read-only".into(),
            ));
        }
        if backend.exists(CONFIG_KEY)? {
            return Err(Error::InvalidArgument(format!(
                "{location} is already a stackvault repository"
            )));
        }
        if !backend.list("")?.is_empty() {
            return Err(Error::DirectoryNotEmpty {
                path: PathBuf::from(location),
            });
        }
        let password = new_repository_password(location, options)?;
        let mut config = new_config(options, location)?;
        let deltas = crate::format::config::FEATURE_INDEX_DELTAS;
        config.features.incompat |= deltas.bit;
        let (config, unlocked) = first_key(config, backend.as_ref(), password, naming)?;
        backend.put(CONFIG_KEY, &config.encode())?;
        Repo::open_on_with(backend, cache_home, location, unlocked)
    }

    /// Opens the repository on the remote store `backend`, named `location` in messages. Its
    /// index is this host's cache in `<cache_home>/stackvault/<repository id>/index.sqlite`
    /// (made from the deltas, or the packs' tables, when missing), brought up to date from
    /// the deltas and manifests it has not seen. Read-only when asked
    /// ([`request_read_only`]): nothing is written into the store then (the cache is ours).
    pub fn open_on(backend: Arc<dyn Backend>, cache_home: &Path, location: &str) -> Result<Repo> {
        Self::open_on_with(backend, cache_home, location, None)
    }

    /// [`Repo::open_on`], with the keys already unlocked when `init_on` just made them.
    fn open_on_with(
        backend: Arc<dyn Backend>,
        cache_home: &Path,
        location: &str,
        unlocked: Option<Unlocked>,
    ) -> Result<Repo> {
        let backend = Arc::new(WithDeltas::with_protection(backend, Protection::Plain));
        // The config's GET, the key objects' reading and the catch-up's listings need no
        // answer of each other: they go out together (see `repo/listed.rs`), and the key
        // derivation runs while the listings are still under way.
        let (listed, opened) =
            listed::list_at_once(backend.as_ref(), &listed::CATCH_UP_PREFIXES, || {
                let hint_file = key_hint_file(cache_home, location);
                read_config_and_unlock(location, backend.as_ref(), unlocked, &hint_file)
            });
        let (config, unlocked) = opened?;
        let protection = unlocked.protection.clone();
        backend.set_protection(protection.clone());
        let dir = cache_home
            .join("stackvault")
            .join(crate::format::hex(&config.repository_id));
        fs::DirBuilder::new()
            .recursive(true)
            .create(&dir)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "the index of {location} is kept in the per-user cache {}, which cannot \
                     be created ({e}): set XDG_CACHE_HOME to a writable directory",
                    dir.display()
                ))
            })?;
        let read_only = READ_ONLY_REQUESTED
            .load(Ordering::Relaxed)
            .then_some(ReadOnly::Requested);
        let (mut index, index_path) = open_index_in(
            &dir,
            backend.as_ref(),
            &protection,
            index::Durability::Cache,
        )?;
        let writable = read_only.is_none();
        catch_up(&mut index, &listed, &protection, writable)?;
        drop(listed);
        Ok(Repo {
            root: dir,
            place: Place::Remote {
                location: location.to_string(),
                lease: crate::lock::lease::LEASE,
            },
            readers: IndexReaders::new(&index_path),
            backend,
            config,
            protection,
            key_in_use: unlocked.hint.map(|h| h.key),
            index: Mutex::new(index),
            read_only,
            _cache_hold: None,
            caught_up: Mutex::new(Some(std::time::Instant::now())),
            open_catch_up_serves_backup: AtomicBool::new(false),
        })
    }

    /// Learns what other hosts added since this repository was opened or last refreshed:
    /// applies the index deltas and catalogues the manifests and verification records the
    /// index has not seen (one listing of each, then only the new objects). Nothing to do for a local repository,
    /// whose index every writer keeps current.
    pub fn refresh(&self) -> Result<()> {
        if self.place == Place::Local {
            return Ok(());
        }
        let mut index = self.index();
        let (listed, ()) =
            listed::list_at_once(self.backend.as_ref(), &listed::CATCH_UP_PREFIXES, || ());
        catch_up(
            &mut index,
            &listed,
            &self.protection,
            self.read_only.is_none(),
        )?;
        *self.caught_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        Ok(())
    }

    /// Lets the next backup on this handle rely on the catch-up its open just made instead
    /// of making its own, if it starts within [`OPEN_CATCH_UP_SERVES`] of the open: for a
    /// command that opens a remote repository to back up at once, as [`Repo::open`] does.
    /// Handles kept open for longer (an embedding program, the tests' hosts) refresh at the
    /// start of every backup.
    pub fn let_next_backup_use_the_open_catch_up(&self) {
        self.open_catch_up_serves_backup
            .store(true, Ordering::Relaxed);
    }

    /// [`Repo::refresh`] at the start of a backup, unless [`Repo::let_next_backup_use_the_open_catch_up`]
    /// allowed the first backup to skip it and the open's catch-up is recent. Nothing depends
    /// on the cache being more current than that: a pack other hosts add meanwhile is only a
    /// missed deduplication, and one a prune deletes meanwhile is caught by the backup's
    /// re-check before its manifest (`format-spec/locks.md`, rule 2).
    pub fn refresh_for_backup(&self) -> Result<()> {
        let serve = self
            .open_catch_up_serves_backup
            .swap(false, Ordering::Relaxed);
        let last = *self.caught_up.lock().unwrap_or_else(|p| p.into_inner());
        if serve && last.is_some_and(|t| t.elapsed() < OPEN_CATCH_UP_SERVES) {
            return Ok(());
        }
        self.refresh()
    }

    /// Whether the repository is on a remote store (its index a per-host cache).
    pub fn is_remote(&self) -> bool {
        self.place != Place::Local
    }

    /// The repository as the user named it: its directory, or its remote location.
    pub fn location(&self) -> String {
        match &self.place {
            Place::Local => self.root.display().to_string(),
            Place::Remote { location, .. } => location.clone(),
        }
    }

    /// Stores a finished pack and indexes its chunks, in that order, never the other way
    /// round: the pack is durable, then its delta (written by the backend wrapper every
    /// repository has, see [`WithDeltas`]), then its index row; only then may a manifest name
    /// its chunks. The index is locked only for the row, so several packs upload at once.
    /// The pack's bytes are taken out of `pack` and go to `stored` as soon as the pack itself
    /// is stored, before its delta and row (see [`WithDeltas::put_pack`]); returns their
    /// length.
    pub fn commit_pack(
        &self,
        pack: &mut FinishedPack,
        stored: impl FnOnce(Vec<u8>),
    ) -> Result<u64> {
        let bytes = std::mem::take(&mut pack.bytes);
        let size = bytes.len() as u64;
        self.backend
            .put_pack(&store::pack_key(&pack.name)?, bytes, stored)?;
        crate::crash::point("pack-stored");
        self.index()
            .add_pack(&pack.name, size, pack.version, &pack.entries)?;
        Ok(size)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How this repository names chunks and seals objects.
    pub fn protection(&self) -> &crate::crypto::Protection {
        &self.protection
    }

    /// Replaces the repository's protection (tests of the sealed object paths, before
    /// `init --encryption` exists end to end).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_protection_for_tests(&mut self, protection: crate::crypto::Protection) {
        self.backend.set_protection(protection.clone());
        self.protection = protection;
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The repository's objects. On an object store every call is a billed request; the
    /// requests a command makes are the ones made here. (Hook for request counts in reports:
    /// when the Azure / S3 backends count requests by kind, a report reads them through this.)
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The repository's objects, shared (lease locks keep a handle for their renewals).
    fn shared_backend(&self) -> Arc<dyn Backend> {
        self.backend.clone()
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
    /// On a remote repository, a query that matches nothing is tried again after a
    /// [`Repo::refresh`]: another host may have just made the snapshot.
    pub fn resolve_snapshot(&self, query: &str, disk: Option<&str>) -> Result<SnapshotSummary> {
        match self.resolve_known_snapshot(query, disk) {
            Err(Error::SnapshotNotFound { .. }) if self.is_remote() => {
                self.refresh()?;
                self.resolve_known_snapshot(query, disk)
            }
            other => other,
        }
    }

    fn resolve_known_snapshot(&self, query: &str, disk: Option<&str>) -> Result<SnapshotSummary> {
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
            return Err(Error::Usage(format!(
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
                    .map(|s| s.id.short().to_string())
                    .collect(),
            }),
        }
    }

    /// A writer for a new manifest (committed under `snapshots/<id>`); a remote repository's
    /// is also copied into this host's cache, so reading it back costs no download.
    pub(crate) fn manifest_writer(&self) -> Result<Box<dyn crate::store::ObjectWriter + '_>> {
        let object = self.backend.writer("snapshots/")?;
        if self.is_remote() {
            return Ok(Box::new(manifest_cache::TeeToCache::new(
                object,
                &self.root.join("manifests"),
            )));
        }
        Ok(object)
    }

    /// Publishes a manifest written through [`Repo::manifest_writer`] as snapshot `id`.
    /// A manifest's name is the hash of its content, so finding the name taken means this
    /// very snapshot is stored already: two hosts (or a copy and a rerun) that made the same
    /// manifest both succeed.
    /// Its size (`len` bytes) is checked then: a name holding other bytes is not this
    /// snapshot (on Azure, the empty blob a prune commits to discard an unfinished upload, if
    /// this backup stalled past the grace period between staging its blocks and committing).
    pub(crate) fn commit_manifest(
        &self,
        out: Box<dyn crate::store::ObjectWriter + '_>,
        id: &str,
        len: u64,
    ) -> Result<()> {
        let key = store::snapshot_key(id);
        let taken = |held: &str| {
            Error::Locked(format!(
                "{key} was taken by other bytes ({held}, where this manifest has {len}) while \
                 it was being stored: a prune discards an upload left unfinished for longer \
                 than its grace period. The snapshot was not stored; run it again"
            ))
        };
        match out.commit(&key) {
            Ok(()) => Ok(()),
            Err(Error::AlreadyExists { .. }) => match self.backend.size(&key) {
                Ok(stored) if stored == len => Ok(()),
                Ok(stored) => Err(taken(&format!("{stored} bytes"))),
                // Discarded, then deleted, between the commit and this look.
                Err(Error::NotFound { .. }) => Err(taken("gone again")),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Reads and checks a snapshot's manifest.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest<'_>> {
        // A remote manifest is read from this host's copy: its requests are paid once.
        if self.is_remote() {
            let dir = self.root.join("manifests");
            if let Some(m) =
                manifest_cache::load(self.backend.as_ref(), &self.protection, &dir, id)?
            {
                return Ok(m);
            }
        }
        index::load_manifest(self.backend.as_ref(), &self.protection, id)
    }

    /// Where the index says chunk `id` is; a remote repository's index is brought up to date
    /// once when it does not know the chunk (another host's pack). `None`: no such chunk.
    pub fn locate_chunk(&self, id: &ChunkId) -> Result<Option<crate::index::ChunkLocation>> {
        match self.readers.lookup(id)? {
            None if self.is_remote() => {
                self.refresh()?;
                self.readers.lookup(id)
            }
            found => Ok(found),
        }
    }

    /// The error for chunk `id`, which snapshot `snapshot` needs and the index does not know:
    /// damage naming the pack that held it when an orphan delta says so (a pack deleted
    /// behind the repository's back: the sync learns nothing from its delta, see
    /// [`index::delta::sync`]), else [`Error::MissingChunk`]. Costs a listing and the orphan
    /// deltas' GETs: only for error paths.
    pub fn missing_chunk(&self, id: &ChunkId, snapshot: &str) -> Error {
        match index::delta::gone_pack_holding(self.backend.as_ref(), &self.protection, id) {
            Ok(Some(pack)) => Error::corrupt(
                format!("pack {pack}"),
                0,
                format!(
                    "chunk {} needed by snapshot {snapshot} was in pack {pack}, which is not in \
                     the store (its index delta remains); copy the snapshot from another \
                     repository, or forget it; a new backup stores the data again",
                    id.to_hex()
                ),
            ),
            _ => Error::MissingChunk {
                id: id.to_hex(),
                snapshot: snapshot.to_string(),
            },
        }
    }

    /// Why the repository is open read-only, if it is.
    pub fn read_only(&self) -> Option<&ReadOnly> {
        self.read_only.as_ref()
    }

    /// Fails, saying why and what to do, when the repository is open read-only: for
    /// operations that write, before they start. `what` names the operation.
    pub fn require_writable(&self, what: &str) -> Result<()> {
        match &self.read_only {
            None => Ok(()),
            // The location the user named, never this host's cache of a remote one.
            Some(why) => Err(read_only_error(Path::new(&self.location()), what, why)),
        }
    }

    /// Takes a writer lock of `kind` (`backup`, ...) in `locks/`, released when the guard
    /// drops. Refused while maintenance holds the repository (see [`crate::lock`]), and on
    /// a read-only repository.
    pub fn lock(&self, kind: &str) -> Result<LockGuard> {
        self.require_writable(kind)?;
        match &self.place {
            Place::Local => crate::lock::acquire_writer(&self.root, kind),
            Place::Remote { lease, .. } => {
                crate::lock::lease::acquire_writer(&self.shared_backend(), kind, *lease)
            }
        }
    }

    /// Takes the maintenance lock for `purpose` (`prune`); see [`crate::lock`]. Refused on a
    /// read-only repository.
    pub fn lock_maintenance(&self, purpose: &str) -> Result<LockGuard> {
        self.require_writable(purpose)?;
        match &self.place {
            Place::Local => crate::lock::acquire_maintenance(&self.root, purpose),
            Place::Remote { lease, .. } => {
                crate::lock::lease::acquire_maintenance(&self.shared_backend(), purpose, *lease)
            }
        }
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
    ) -> Result<std::collections::HashMap<crate::format::SnapshotId, VerificationRecord>> {
        self.index().last_verifications()
    }
}

/// The keys of the repository `location` whose config was just read: plain (said once per
/// process), the keys `init` has just made, or unlocked with the user's password.
fn unlock(
    config: &RepoConfig,
    backend: &dyn Backend,
    location: &str,
    unlocked: Option<Unlocked>,
) -> Result<Unlocked> {
    if !config.is_encrypted() {
        if !PLAIN_NOTED.swap(true, Ordering::Relaxed) {
            crate::progress::notice(&format!(
                "{location} is not encrypted (made with `init --encryption none`): whoever can \
                 read its storage can read the backed-up disks; `stackvault copy` into an \
                 encrypted repository encrypts them"
            ));
        }
        return Ok(Unlocked {
            protection: Protection::Plain,
            hint: None,
        });
    }
    match unlocked {
        Some(u) => Ok(u),
        None => crate::crypto::unlock::unlock(backend, location, &config.repository_id),
    }
}

/// The password of a new repository's first key when encryption is requested
/// ([`request_encryption`]); asked before anything is created, so that a missing password
/// leaves nothing behind. A chunker an encrypted repository cannot use is refused first.
fn new_repository_password(
    location: &str,
    options: &InitOptions,
) -> Result<Option<Zeroizing<String>>> {
    if !ENCRYPTION_REQUESTED.load(Ordering::Relaxed) {
        return Ok(None);
    }
    if let crate::format::config::ChunkerParams::FastCdc2020 { .. } = options.chunker {
        return Err(Error::Usage(format!(
            "the {} chunker cannot be used in an encrypted repository (its cut points would \
             fingerprint known files): use the default aligned chunker, or `--encryption none`",
            options.chunker.describe()
        )));
    }
    use crate::crypto::unlock::{password, PasswordUse};
    password(PasswordUse::NewKey, location).map(Some)
}

/// For a new repository given the `password` of its first key (none: plain): draws its
/// secrets (the naming secret of `naming` when given), writes the first key object and marks
/// `config` encrypted. Returns the config and, when encrypted, the unlocked keys.
fn first_key(
    mut config: RepoConfig,
    backend: &dyn Backend,
    password: Option<Zeroizing<String>>,
    naming: Option<&crate::crypto::RepoSecrets>,
) -> Result<(RepoConfig, Option<Unlocked>)> {
    let Some(password) = password else {
        return Ok((config, None));
    };
    use crate::crypto::unlock::add_key;
    use crate::crypto::RepoSecrets;
    let secrets = match naming {
        Some(like) => RepoSecrets::sharing_naming_of(like)?,
        None => RepoSecrets::generate()?,
    };
    let key = add_key(
        backend,
        &secrets,
        config.repository_id,
        password.as_bytes(),
        "",
    )?;
    config.features.incompat |= crate::format::config::FEATURE_ENCRYPTION.bit;
    let unlocked = Unlocked {
        protection: Protection::Encrypted(Box::new(crate::crypto::RepoKeys::from_secrets(
            &secrets,
        ))),
        hint: Some(KeyHint::of(&key)),
    };
    Ok((config, Some(unlocked)))
}

/// The config of a new repository at `location` (for messages): a random id, now, `options`.
fn new_config(options: &InitOptions, location: &str) -> Result<RepoConfig> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| {
        Error::io(
            "draw a repository id",
            location,
            std::io::Error::other(e.to_string()),
        )
    })?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut config = RepoConfig::new(id, now, options.chunker);
    config.zstd_level = options.zstd_level;
    config.validate().map_err(Error::InvalidArgument)?;
    Ok(config)
}

/// Brings the cache `index` of a remote repository up to date from the store (`backend`,
/// whose listings [`listed::list_at_once`] has usually made already): the deltas it has not
/// applied, then the manifests and verification records it has not catalogued.
fn catch_up(
    index: &mut Index,
    backend: &dyn Backend,
    protection: &Protection,
    writable: bool,
) -> Result<()> {
    index::delta::sync(index, backend, protection, writable)?;
    index::sync_shared_snapshots(index, backend, protection)?;
    index::sync_verifications(index, backend, protection)?;
    Ok(())
}

/// Opens the index `index.sqlite` in `dir`, building it from the repository's objects when
/// it is missing ([`link_rebuilt_index`]).
fn open_index_in(
    dir: &Path,
    backend: &dyn Backend,
    protection: &crate::crypto::Protection,
    durability: index::Durability,
) -> Result<(Index, PathBuf)> {
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        // A cache keeps its log between commands, so one left without its database belongs
        // to a deleted one, which SQLite would replay onto the new file: it goes first. Under
        // a lock, so that it is never another opener's live log, just linked.
        let turn = (durability == index::Durability::Cache)
            .then(|| rebuild_turn(dir))
            .transpose()?;
        // Another opener may have built it meanwhile.
        if !index_path.exists() {
            if turn.is_some() {
                for p in index_sidecars(&index_path) {
                    match fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(Error::io("remove the log of a deleted index", &p, e))
                        }
                    }
                }
            }
            link_rebuilt_index(dir, &index_path, backend, protection)?;
        }
    }
    Ok((Index::open_with(&index_path, durability)?, index_path))
}

/// Builds the index of the repository's objects under a temporary name in `dir`, so that a
/// crash never leaves a partial index behind, and links it to `index_path`. Linking fails if
/// another process got there first; its index is as good as ours.
fn link_rebuilt_index(
    dir: &Path,
    index_path: &Path,
    backend: &dyn Backend,
    protection: &crate::crypto::Protection,
) -> Result<()> {
    let (tmp, _) = build_index_file(dir, backend, protection)?;
    let linked = fs::hard_link(&tmp, index_path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => store::sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io("link rebuilt index", index_path, e)),
    }
}

/// Waits for this process's turn to build a missing cache index in `dir`: an exclusive lock on
/// `dir/index.rebuild.lock` (an empty file), held until the returned file is dropped.
fn rebuild_turn(dir: &Path) -> Result<File> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join("index.rebuild.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    flock(&file, FlockOperation::LockExclusive)
        .map_err(|e| Error::io("lock", &path, std::io::Error::from(e)))?;
    Ok(file)
}

/// Reads the config of the remote repository `location` and unlocks it: the key objects are
/// read on their own thread meanwhile (unless `init` just made the keys, `unlocked`), so the
/// key object's GET follows its listing at once. The key derivation starts as soon as the
/// config is in when this host remembers which key opened the repository last ([`KeyHint`],
/// in `hint_file`), else once the key objects are in too. A repository made for a local
/// directory is refused before any password is asked for.
fn read_config_and_unlock(
    location: &str,
    backend: &dyn Backend,
    unlocked: Option<Unlocked>,
    hint_file: &Path,
) -> Result<(RepoConfig, Unlocked)> {
    use crate::crypto::unlock::{derive_early, fetch_keys, unlock_fetched};
    // Keys `init` just made are remembered by the first open that unlocks them.
    let unlocking_here = unlocked.is_none();
    let hint = match unlocked {
        Some(_) => None,
        None => fs::read(hint_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<KeyHint>(&b).ok()),
    };
    let (config, unlocked) = std::thread::scope(|scope| {
        let keys = match unlocked {
            Some(_) => None,
            None => std::thread::Builder::new()
                .name("keys".into())
                .spawn_scoped(scope, || fetch_keys(backend, location))
                .ok(),
        };
        let config = read_config_object(location, backend).and_then(|config| {
            let deltas = crate::format::config::FEATURE_INDEX_DELTAS;
            if config.features.incompat & deltas.bit == 0 {
                return Err(Error::unsupported(format!(
                    "{location} holds a repository made for a local directory (its config \
                     lacks the `{}` feature that lets hosts share it); create one on the \
                     store with `stackvault init` and copy the snapshots into it",
                    deltas.name
                )));
            }
            Ok(config)
        });
        let config = match config {
            Ok(config) => config,
            // Failing before the key objects are needed, their thread is joined here, so
            // that its panic (if any) is not the open's.
            Err(e) => {
                if let Some(t) = keys {
                    let _ = t.join();
                }
                return Err(e);
            }
        };
        // While the key objects are still being read, the key the hint names is derived (only
        // once the config says the repository is encrypted: a plain one never asks for a
        // password).
        let early = match (config.is_encrypted(), &unlocked, hint.clone()) {
            (true, None, Some(hint)) => Some(derive_early(hint, location)),
            _ => None,
        };
        // No thread to spare, or it panicked: read the keys on this one.
        let fetched = keys.map(|t| t.join().unwrap_or_else(|_| fetch_keys(backend, location)));
        let unlocked = match (config.is_encrypted(), unlocked) {
            (true, None) => unlock_fetched(
                fetched.unwrap_or_else(|| fetch_keys(backend, location)),
                early,
                location,
                &config.repository_id,
            )?,
            (_, unlocked) => unlock(&config, backend, location, unlocked)?,
        };
        Ok::<_, Error>((config, unlocked))
    })?;
    let opened = unlocked.hint.as_ref().filter(|_| unlocking_here);
    if let Some(opened) = opened.filter(|h| hint.as_ref() != Some(*h)) {
        // Best effort: a host that cannot remember derives after the reads, as without it.
        let _ = remember_key_hint(hint_file, opened);
    }
    Ok((config, unlocked))
}

/// Where this host remembers the [`KeyHint`] of the remote repository `location`: beside the
/// endpoints it remembers (`locations/`, see `repo/location.rs`), named by the location.
fn key_hint_file(cache_home: &Path, location: &str) -> PathBuf {
    cache_home
        .join("stackvault")
        .join("locations")
        .join(format!(
            "{}.key.json",
            &blake3::hash(location.as_bytes()).to_hex()[..32]
        ))
}

/// Writes `hint` to `file` whole (a temporary file of its own, then a rename).
fn remember_key_hint(file: &Path, hint: &KeyHint) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(
        &mut tmp,
        &serde_json::to_vec(hint).map_err(std::io::Error::other)?,
    )?;
    tmp.persist(file).map(drop).map_err(|e| e.error)
}

/// Reads and checks the config object of the repository named `location` on `backend`.
fn read_config_object(location: &str, backend: &dyn Backend) -> Result<RepoConfig> {
    let not_repo = |why: &str| Error::NotARepository {
        path: PathBuf::from(location),
        why: why.to_string(),
    };
    let bytes = match backend.get(CONFIG_KEY) {
        Ok(b) => b,
        Err(Error::NotFound { .. }) => {
            return Err(not_repo(
                "it has no config object: check the location's prefix (the path after the \
                 bucket or container names the repository's folder), or create a repository \
                 there with `stackvault init`",
            ))
        }
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(&CONFIG_MAGIC) {
        return Err(not_repo("its config object is not a stackvault config"));
    }
    RepoConfig::decode(&bytes, &format!("{location}/{CONFIG_KEY}"))
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
        Err(Error::NotFound { .. }) => return Err(not_repo("it has no config file")),
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
    if let RepoLocation::Azure { .. } | RepoLocation::S3 { .. } = RepoLocation::from_path(path)? {
        return Err(Error::Usage(format!(
            "the index of the remote repository {} is a per-host cache, rebuilt from the \
             repository's objects whenever it is missing: delete $XDG_CACHE_HOME/stackvault/\
             <repository id>/index.sqlite (and its -wal, -shm files) instead",
            path.display()
        )));
    }
    let backend = WithDeltas::new(Arc::new(LocalDir::new(path)));
    let config = read_config(path, &backend)?;
    // A wrong password fails here, before the lock and the rebuild.
    let protection = unlock(&config, &backend, &path.display().to_string(), None)?.protection;
    backend.set_protection(protection.clone());
    if let Some(why) = read_only_reason(path) {
        return Err(read_only_error(path, "index rebuild", &why));
    }
    let _lock = crate::lock::acquire_maintenance(path, "index rebuild")?;
    let live = path.join(INDEX_FILE);
    let (tmp, report) = build_index_file(path, &backend, &protection)?;
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

/// `<pid>-<16 hex>`: a file name part no other process or call uses.
fn unique_suffix() -> String {
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    format!("{}-{}", std::process::id(), crate::format::hex(&r))
}

/// Builds a complete index from the repository's objects in a new file under a temporary
/// name in `path`, closed (its log emptied into it), and returns that name.
fn build_index_file(
    path: &Path,
    backend: &dyn Backend,
    protection: &crate::crypto::Protection,
) -> Result<(PathBuf, index::RebuildReport)> {
    let tmp = path.join(format!("{INDEX_FILE}.rebuild-{}", unique_suffix()));
    let result = (|| {
        let mut fresh = Index::open(&tmp)?;
        let report = index::rebuild(&mut fresh, backend, protection)?;
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
    ["-wal", "-shm"].map(|s| index::sidecar(db, s))
}

/// Why the repository at `root` must be opened read-only, if it must.
fn read_only_reason(root: &Path) -> Option<ReadOnly> {
    if READ_ONLY_REQUESTED.load(Ordering::Relaxed) {
        return Some(ReadOnly::Requested);
    }
    use rustix::fs::{accessat, Access, AtFlags, CWD};
    use rustix::io::Errno;
    let mut paths = vec![root.to_path_buf()];
    paths.extend(
        ["locks", "packs", "snapshots", INDEX_FILE]
            .iter()
            .map(|p| root.join(p))
            .filter(|p| p.exists()),
    );
    for p in paths {
        // As the effective user, like the writes would be.
        match accessat(CWD, p.as_path(), Access::WRITE_OK, AtFlags::EACCESS) {
            Err(e) if e == Errno::ROFS => {
                return Some(ReadOnly::NotWritable(format!(
                    "{} is on a read-only file system",
                    p.display()
                )))
            }
            Err(e) if e == Errno::ACCESS || e == Errno::PERM => {
                return Some(ReadOnly::NotWritable(format!(
                    "this user may not write {}",
                    p.display()
                )))
            }
            // Anything else (a missing directory) is for opening to report.
            _ => {}
        }
    }
    None
}

/// The refusal of `what` on the read-only repository at `root`.
fn read_only_error(root: &Path, what: &str, why: &ReadOnly) -> Error {
    match why {
        ReadOnly::Requested => Error::Usage(format!(
            "{what} writes to the repository {}, which was opened with --read-only; run it \
             without --read-only",
            root.display()
        )),
        ReadOnly::NotWritable(reason) => Error::InvalidArgument(format!(
            "{what} writes to the repository {}, which is read-only here ({reason}); nothing \
             was done. Run it as a user who may write the repository, or on a writable copy",
            root.display()
        )),
    }
}

/// Whether every manifest in the repository is in the index's catalogue: an index that
/// lacks one (a backup that crashed before cataloguing) is stale and must not be used as is.
fn catalogue_complete(index: &Index, backend: &dyn Backend) -> Result<bool> {
    let known: std::collections::HashSet<String> = index.snapshot_ids()?.into_iter().collect();
    Ok(backend
        .list("snapshots/")?
        .iter()
        .filter_map(|k| k.strip_prefix("snapshots/"))
        .all(|id| known.contains(id)))
}

/// The directory that holds the per-user caches: `$XDG_CACHE_HOME`, else `$HOME/.cache`.
pub(crate) fn cache_root() -> Result<PathBuf> {
    cache_root_in(|name| std::env::var_os(name))
}

/// [`cache_root`] with the environment read through `env` (tests pass their own, since the
/// process environment is shared by every test thread).
fn cache_root_in(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let var = |name| env(name).map(PathBuf::from).filter(|p| p.is_absolute());
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .ok_or_else(|| {
            Error::Usage(
                "the repository's index must be kept in a per-user cache (the repository is \
                 remote or read-only), but neither XDG_CACHE_HOME nor HOME is set to an \
                 absolute path: set XDG_CACHE_HOME to a writable directory"
                    .into(),
            )
        })
}

/// The per-user cache copy of the index of the read-only repository at `root`, made if
/// need be, and a shared file lock that keeps it in place while held.
///
/// A copy is named after the state it was made from (the repository's index and log:
/// identity, size and mtime; without an index, the packs present), so it is never
/// replaced in place: a new state gets a new file, published whole by a link. Copies of
/// other states that no process holds are removed.
fn cached_index(
    root: &Path,
    config: &RepoConfig,
    backend: &dyn Backend,
    protection: &crate::crypto::Protection,
) -> Result<(PathBuf, File)> {
    use rustix::fs::{flock, FlockOperation};
    let dir = cache_root()?
        .join("stackvault")
        .join(crate::format::hex(&config.repository_id));
    fs::DirBuilder::new()
        .recursive(true)
        .create(&dir)
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "the repository is read-only and its index must be copied into the per-user \
                 cache {}, which cannot be created ({e}): set XDG_CACHE_HOME to a writable \
                 directory",
                dir.display()
            ))
        })?;
    let source = root.join(INDEX_FILE);
    let name = dir.join(format!("index-{}.sqlite", source_stamp(&source, backend)?));
    let hold = |file: &File, path: &Path| {
        flock(file, FlockOperation::LockShared)
            .map_err(|e| Error::io("lock cached index", path, std::io::Error::from(e)))
    };
    let mut attempts = 0;
    let held = loop {
        attempts += 1;
        if attempts > 5 {
            return Err(Error::Locked(format!(
                "the cached index {} keeps being replaced by other processes; try again",
                name.display()
            )));
        }
        match File::open(&name) {
            Ok(file) => {
                hold(&file, &name)?;
                // Still the file at `name` (not one a cleaner removed meanwhile)?
                let ours = file.metadata().map_err(|e| Error::io("stat", &name, e))?;
                if fs::metadata(&name).is_ok_and(|m| m.ino() == ours.ino()) {
                    break file;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = dir.join(format!(".tmp-{}.sqlite", unique_suffix()));
                let made = fill_cache_copy(&source, &tmp, backend, protection).and_then(|()| {
                    let file = File::open(&tmp).map_err(|e| Error::io("open", &tmp, e))?;
                    // Held before it appears under its name: no cleaner can take it.
                    hold(&file, &tmp)?;
                    fs::hard_link(&tmp, &name)
                        .map(|()| Some(file))
                        .or_else(|e| match e.kind() {
                            std::io::ErrorKind::AlreadyExists => Ok(None),
                            _ => Err(Error::io("publish cached index", &name, e)),
                        })
                });
                for p in std::iter::once(tmp.clone()).chain(index_sidecars(&tmp)) {
                    let _ = fs::remove_file(p);
                }
                if let Some(file) = made? {
                    break file;
                }
            }
            Err(e) => return Err(Error::io("open cached index", &name, e)),
        }
    };
    remove_unused_copies(&dir, &name);
    Ok((name, held))
}

/// Names the state of the repository's index at `source` (file and log identity, size and
/// mtime; the pack list when there is no index, since the copy is then rebuilt from them).
fn source_stamp(source: &Path, backend: &dyn Backend) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for p in std::iter::once(source.to_path_buf()).chain(index_sidecars(source).into_iter().take(1))
    {
        match fs::metadata(&p) {
            Ok(m) => {
                for n in [m.dev(), m.ino(), m.len()] {
                    h.update(&n.to_le_bytes());
                }
                h.update(&m.mtime().to_le_bytes());
                h.update(&m.mtime_nsec().to_le_bytes());
            }
            Err(_) => {
                h.update(b"absent");
            }
        }
    }
    if !source.exists() {
        let mut packs = backend.list("packs/")?;
        packs.sort();
        for p in packs {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
    }
    Ok(crate::format::hex(&h.finalize().as_bytes()[..16]))
}

/// Makes a complete index at `tmp`: a copy of the repository's index and log (which opening
/// the copy replays and migrates), or, when there is none or it cannot be read, one rebuilt
/// from the repository's objects.
fn fill_cache_copy(
    source: &Path,
    tmp: &Path,
    backend: &dyn Backend,
    protection: &crate::crypto::Protection,
) -> Result<()> {
    let copied = (|| {
        // `fs::copy` copies the mode too, and the copy must be writable (it is ours).
        let copy_writable = |from: &Path, to: &Path| {
            fs::copy(from, to)
                .and_then(|_| fs::set_permissions(to, fs::Permissions::from_mode(0o600)))
                .map_err(|e| Error::io("copy index", from, e))
        };
        copy_writable(source, tmp)?;
        let log = index::sidecar(source, "-wal");
        if log.exists() {
            copy_writable(&log, &index::sidecar(tmp, "-wal"))?;
        }
        let copy = Index::open(tmp)?;
        if !copy.integrity_problems()?.is_empty() {
            return Err(Error::corrupt(
                source.display(),
                0,
                "integrity check failed",
            ));
        }
        copy.checkpoint()
    })();
    match copied {
        Ok(()) => return Ok(()),
        Err(e) if source.exists() => crate::progress::notice(&format!(
            "the repository's index cannot be used ({e}); rebuilding a copy from its packs and \
             manifests"
        )),
        Err(_) => {}
    }
    for p in std::iter::once(tmp.to_path_buf()).chain(index_sidecars(tmp)) {
        remove_if_present(&p)?;
    }
    let mut fresh = Index::open(tmp)?;
    index::rebuild(&mut fresh, backend, protection)?;
    fresh.checkpoint()
}

/// Removes cached index copies in `dir` other than `keep` that no process holds.
fn remove_unused_copies(dir: &Path, keep: &Path) {
    use rustix::fs::{flock, FlockOperation};
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path == keep || !name.starts_with("index-") || !name.ends_with(".sqlite") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            for p in index_sidecars(&path)
                .into_iter()
                .chain(std::iter::once(path.clone()))
            {
                let _ = fs::remove_file(p);
            }
        }
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

pub use crate::lock::LockGuard;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_cache_directory_the_user_is_told_what_to_set() {
        let unset = cache_root_in(|_| None);
        assert!(
            matches!(&unset, Err(Error::Usage(m)) if m.contains("set XDG_CACHE_HOME")),
            "{unset:?}"
        );
        assert_eq!(unset.err().map(|e| e.class().exit_code()), Some(2));
        // A relative value is no place for a cache either.
        assert!(matches!(
            cache_root_in(|_| Some("relative".into())),
            Err(Error::Usage(_))
        ));
        let home = cache_root_in(|name| (name == "HOME").then(|| "/home/op".into()));
        assert_eq!(home.ok(), Some(PathBuf::from("/home/op/.cache")));
        let xdg = cache_root_in(|name| Some(format!("/c/{name}").into()));
        assert_eq!(xdg.ok(), Some(PathBuf::from("/c/XDG_CACHE_HOME")));
    }

    /// Two backups that end with the same manifest (same disk, content, parent, host and
    /// microsecond) name it alike: the second finds the name taken and must succeed, since
    /// what is stored there is its snapshot byte for byte.
    #[test]
    fn a_manifest_whose_name_is_taken_is_already_stored() -> Result<()> {
        use crate::backup::{backup, BackupOptions};
        use crate::progress::NoProgress;
        use std::io::Write;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
        let disk = dir.path().join("disk.img");
        let bytes: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096 * 7) as u8).collect();
        fs::write(&disk, &bytes).map_err(|e| Error::io("write", &disk, e))?;
        let source = crate::source::open_source(&disk, &Default::default())?;
        let options = BackupOptions {
            disk: "vm".into(),
            ..BackupOptions::default()
        };
        let id = backup(&repo, source.as_ref(), &options, &NoProgress)?.snapshot_id;
        let stored = repo.backend().get(&store::snapshot_key(&id))?;
        let mut out = repo.manifest_writer()?;
        out.write_all(&stored)
            .map_err(|e| Error::io("write", "snapshots/", e))?;
        repo.commit_manifest(out, &id, stored.len() as u64)?;
        assert_eq!(repo.backend().get(&store::snapshot_key(&id))?, stored);
        assert_eq!(repo.snapshots(None)?.len(), 1);

        // A name taken by other bytes (the empty blob a prune commits to discard an upload)
        // is not this snapshot: the commit fails instead of reporting it stored.
        let other = "0".repeat(64);
        repo.backend().put(&store::snapshot_key(&other), b"")?;
        let mut out = repo.manifest_writer()?;
        out.write_all(&stored)
            .map_err(|e| Error::io("write", "snapshots/", e))?;
        let taken = repo.commit_manifest(out, &other, stored.len() as u64);
        assert!(
            matches!(&taken, Err(Error::Locked(why)) if why.contains("was not stored")),
            "{taken:?}"
        );
        Ok(())
    }
}
