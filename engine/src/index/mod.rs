//! The SQLite index: chunk id → (pack, offset, lengths), packs, and a snapshot catalogue.
//!
//! The index is derived state, a cache of what packs and manifests say: [`rebuild`] recreates
//! it from them alone, and opening a repository reconciles the snapshot catalogue with the
//! manifests present. It runs in WAL mode so backups (one writer at a time, others wait on
//! the busy timeout) and any number of readers can share it. The schema version is kept in
//! `PRAGMA user_version`; each version step is one frozen migration function. Lookups are
//! point queries on the primary key: the index is never loaded into memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, SnapshotMeta};
use crate::format::pack::{PackEntry, RecordLocation};
use crate::format::ChunkId;
use crate::store::{pack::read_pack_table, snapshot_key, Backend};

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// Schema of version 1. Frozen: later versions add a migration, never edit this.
const SCHEMA_V1: &str = "
CREATE TABLE packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL
);
CREATE TABLE chunks (
    id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    stored_len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    disk TEXT NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent TEXT,
    virtual_size INTEGER NOT NULL,
    bytes_added INTEGER NOT NULL,
    meta TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX snapshots_by_disk ON snapshots (disk, time);
";

/// Where a chunk is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: String,
    pub record: RecordLocation,
}

/// A snapshot as the catalogue knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    pub id: String,
    pub virtual_size: u64,
    #[serde(flatten)]
    pub meta: SnapshotMeta,
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Index {
        path: path.to_path_buf(),
        source,
    }
}

fn configure(conn: &Connection, path: &Path) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(60))
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_err(path))?;
    Ok(())
}

/// The writable index connection.
pub struct Index {
    conn: Connection,
    path: PathBuf,
}

impl Index {
    /// Opens (creating and migrating if needed) the index at `path`.
    pub fn open(path: &Path) -> Result<Index> {
        let conn = Connection::open(path).map_err(sql_err(path))?;
        configure(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err(path))?;
        // A bigger page cache for the one writer: chunk ids are random, so inserts touch
        // pages all over the B-tree.
        conn.pragma_update(None, "cache_size", -32768)
            .map_err(sql_err(path))?;
        let mut index = Index {
            conn,
            path: path.to_path_buf(),
        };
        index.migrate()?;
        Ok(index)
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err(&path))?;
        let version: u32 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(&path))?;
        if version > SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("index {}", path.display()),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            tx.execute_batch(SCHEMA_V1).map_err(sql_err(&path))?;
            tx.pragma_update(None, "user_version", 1)
                .map_err(sql_err(&path))?;
        }
        tx.commit().map_err(sql_err(&path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the index knows a chunk.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        contains(&self.conn, &self.path, id)
    }

    /// Records a stored pack and its chunks in one transaction. A chunk already indexed (from
    /// another pack) keeps its first location.
    pub fn add_pack(&mut self, name: &str, size: u64, entries: &[PackEntry]) -> Result<()> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.execute(
            "INSERT OR IGNORE INTO packs (name, size, chunk_count) VALUES (?1, ?2, ?3)",
            params![name, size as i64, entries.len() as i64],
        )
        .map_err(&err)?;
        let pack_id: i64 = tx
            .query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0))
            .map_err(&err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO chunks (id, pack, offset, raw_len, stored_len) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(&err)?;
            // In key order, so consecutive inserts land on neighbouring B-tree pages.
            let mut sorted: Vec<&PackEntry> = entries.iter().collect();
            sorted.sort_unstable_by_key(|e| e.id);
            for e in sorted {
                stmt.execute(params![
                    &e.id.0[..],
                    pack_id,
                    e.offset as i64,
                    e.raw_len,
                    e.stored_len
                ])
                .map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }

    /// Adds a snapshot to the catalogue (idempotent).
    pub fn add_snapshot(&self, id: &str, manifest: &Manifest) -> Result<()> {
        let meta_json = serde_json::to_string(&manifest.meta)
            .map_err(|e| Error::InvalidArgument(format!("snapshot metadata: {e}")))?;
        let m = &manifest.meta;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO snapshots \
                 (id, disk, time, kind, parent, virtual_size, bytes_added, meta) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    m.disk,
                    m.time,
                    m.kind.as_str(),
                    m.parent,
                    manifest.virtual_size as i64,
                    m.stats.bytes_added as i64,
                    meta_json
                ],
            )
            .map_err(sql_err(&self.path))?;
        Ok(())
    }

    /// Removes a snapshot from the catalogue.
    pub fn remove_snapshot(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])
            .map_err(sql_err(&self.path))?;
        Ok(())
    }

    /// Ids of all catalogued snapshots.
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM snapshots")
            .map_err(&err)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(&err)
    }

    /// Names of all indexed packs.
    pub fn pack_names(&self) -> Result<Vec<String>> {
        let err = sql_err(&self.path);
        let mut stmt = self.conn.prepare("SELECT name FROM packs").map_err(&err)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(&err)
    }

    /// Catalogued snapshots, oldest first, optionally of one disk.
    pub fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotSummary>> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, virtual_size, meta FROM snapshots \
                 WHERE ?1 IS NULL OR disk = ?1 ORDER BY time, id",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([disk], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, size, meta) = row.map_err(&err)?;
            let meta: SnapshotMeta = serde_json::from_str(&meta).map_err(|e| {
                Error::corrupt(
                    self.path.display(),
                    0,
                    format!("snapshot {id} metadata in the index: {e}"),
                )
            })?;
            out.push(SnapshotSummary {
                id,
                virtual_size: size as u64,
                meta,
            });
        }
        Ok(out)
    }

    /// Counts of (packs, chunks) indexed.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let err = sql_err(&self.path);
        let packs: i64 = self
            .conn
            .query_row("SELECT count(*) FROM packs", [], |r| r.get(0))
            .map_err(&err)?;
        let chunks: i64 = self
            .conn
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .map_err(&err)?;
        Ok((packs as u64, chunks as u64))
    }
}

fn contains(conn: &Connection, path: &Path, id: &ChunkId) -> Result<bool> {
    let mut stmt = conn
        .prepare_cached("SELECT 1 FROM chunks WHERE id = ?1")
        .map_err(sql_err(path))?;
    stmt.exists([&id.0[..]]).map_err(sql_err(path))
}

fn lookup(conn: &Connection, path: &Path, id: &ChunkId) -> Result<Option<ChunkLocation>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT p.name, c.offset, c.raw_len, c.stored_len \
             FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.id = ?1",
        )
        .map_err(sql_err(path))?;
    stmt.query_row([&id.0[..]], |r| {
        Ok(ChunkLocation {
            pack: r.get(0)?,
            record: RecordLocation {
                id: *id,
                offset: r.get::<_, i64>(1)? as u64,
                raw_len: r.get(2)?,
                stored_len: r.get(3)?,
            },
        })
    })
    .optional()
    .map_err(sql_err(path))
}

/// A pool of read-only connections for lookups from many threads at once.
pub struct IndexReaders {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl IndexReaders {
    pub fn new(path: &Path) -> Self {
        IndexReaders {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let conn = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(sql_err(&self.path))?;
                configure(&c, &self.path)?;
                c
            }
        };
        let result = f(&conn);
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        result
    }

    /// Whether the index knows a chunk.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.with(|c| contains(c, &self.path, id))
    }

    /// Where a chunk is stored, if indexed.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        self.with(|c| lookup(c, &self.path, id))
    }
}

/// Brings the snapshot catalogue in line with the manifests in the repository: adds the
/// manifests it lacks (a crash between writing a manifest and cataloguing it) and drops rows
/// whose manifest is gone. Manifests that fail to decode are left out and reported.
pub fn sync_snapshots(index: &Index, backend: &dyn Backend) -> Result<Vec<Error>> {
    let present: std::collections::HashSet<String> = backend
        .list("snapshots/")?
        .into_iter()
        .filter_map(|k| k.strip_prefix("snapshots/").map(str::to_owned))
        .collect();
    let known: std::collections::HashSet<String> = index.snapshot_ids()?.into_iter().collect();
    let mut problems = Vec::new();
    for id in present.difference(&known) {
        match load_manifest(backend, id) {
            Ok(m) => index.add_snapshot(id, &m)?,
            Err(e) => problems.push(e),
        }
    }
    for id in known.difference(&present) {
        index.remove_snapshot(id)?;
    }
    Ok(problems)
}

/// Reads a manifest and checks that it hashes to its id.
pub fn load_manifest(backend: &dyn Backend, id: &str) -> Result<Manifest> {
    let key = snapshot_key(id);
    let bytes = backend.get(&key)?;
    if crate::format::hex(blake3::hash(&bytes).as_bytes()) != id {
        return Err(Error::corrupt(
            &key,
            0,
            "manifest does not hash to its name (damaged or altered)",
        ));
    }
    Manifest::decode(&bytes, &key)
}

/// What a rebuild found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    pub snapshots: u64,
    /// Packs or manifests that could not be read; their contents are not indexed.
    pub problems: Vec<String>,
}

/// Fills an empty index from the packs and manifests in `backend`.
pub fn rebuild(index: &mut Index, backend: &dyn Backend) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    for key in backend.list("packs/")? {
        let Some(name) = key.rsplit('/').next() else {
            continue;
        };
        match read_pack_table(backend, name) {
            Ok(entries) => {
                let size = backend.size(&key)?;
                index.add_pack(name, size, &entries)?;
                report.packs += 1;
                report.chunks += entries.len() as u64;
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    let problems = sync_snapshots(index, backend)?;
    report
        .problems
        .extend(problems.into_iter().map(|e| e.to_string()));
    report.snapshots = index.snapshot_ids()?.len() as u64;
    Ok(report)
}
