//! The SQLite index: chunk id → (pack, offset, lengths), packs, and a snapshot catalogue.
//!
//! The index is derived state, a cache of what packs and manifests say: [`rebuild`] recreates
//! it from them alone, and opening a repository reconciles the snapshot catalogue with the
//! manifests present. It runs in WAL mode so backups (one writer at a time, others wait on
//! the busy timeout) and any number of readers can share it. The schema version is kept in
//! `PRAGMA user_version`; each version step is one frozen migration function. Lookups are
//! point queries on the primary key: the index is never loaded into memory.
//!
//! A repository the user cannot write has its index opened *immutable* ([`Index::open_immutable`]:
//! SQLite reads the file without locks, a write-ahead log or its shared memory, and so writes
//! nothing beside it); when that copy is missing, stale or needs migrating, the repository reads
//! a per-user cache copy instead (see `repo.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::manifest::SealedObject;
use crate::format::manifest::{Manifest, SnapshotMeta};
use crate::format::pack::{frames, PackEntry, RecordLocation};
use crate::format::verification::{VerificationRecord, VERIFICATIONS_PREFIX};
use crate::format::{ChunkId, SnapshotId};
use crate::store::{snapshot_key, Backend, StoredObject};

pub mod delta;

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: u32 = 3;

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

/// Version 1 → 2: the verification history, a cache of the `verifications/` objects.
/// Frozen: later versions add a migration, never edit this.
fn migrate_v1_to_v2(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
CREATE TABLE verifications (
    key TEXT PRIMARY KEY,
    snapshot TEXT NOT NULL,
    time TEXT NOT NULL,
    outcome TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX verifications_by_snapshot ON verifications (snapshot, time);
",
    )?;
    tx.pragma_update(None, "user_version", 2)
}

/// Version 2 → 3: packs of format version 2 hold chunks in compressed frames. A pack row
/// gains its format version; a chunk row gains the raw length of its frame, its offset inside
/// the decompressed frame and the number of chunks in the frame (so prune knows the frame's
/// size); `offset` and `stored_len` now describe the frame. Every row of a version 2 index
/// describes a version 1 record, which is a frame of one chunk, so the migration is exact
/// and reads no pack. Frozen: later versions add a migration, never edit this.
fn migrate_v2_to_v3(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
ALTER TABLE packs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE chunks ADD COLUMN frame_raw_len INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chunks ADD COLUMN in_frame INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chunks ADD COLUMN frame_chunks INTEGER NOT NULL DEFAULT 1;
UPDATE chunks SET frame_raw_len = raw_len;
",
    )?;
    tx.pragma_update(None, "user_version", 3)
}

/// Where a chunk is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: String,
    pub record: RecordLocation,
}

/// A snapshot as the catalogue knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    #[serde(rename = "virtual_size_bytes")]
    pub virtual_size: u64,
    #[serde(flatten)]
    pub meta: SnapshotMeta,
}

pub(crate) fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        if matches!(
            source.sqlite_error_code(),
            Some(DatabaseCorrupt | NotADatabase)
        ) {
            // The index is a cache: say how to get it back, not just that it is broken.
            let repo = path.parent().unwrap_or(Path::new("REPO"));
            return Error::corrupt(
                path.display(),
                0,
                format!(
                    "the index is damaged ({source}); it is derived state: rebuild it from \
                     packs and manifests with `stackvault index rebuild {}`",
                    repo.display()
                ),
            );
        }
        Error::Index {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn configure(conn: &Connection, path: &Path) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(60))
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_err(path))?;
    stable_plans(conn, path)
}

/// How far a commit of the writable index reaches before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On disk across power loss (`synchronous=FULL`): a local repository's index, which
    /// nothing brings up to date on open, so a lost commit would leave a stored pack unindexed
    /// under a manifest that needs it.
    Durable,
    /// Consistent but possibly rolled back to an earlier commit by a power cut
    /// (`synchronous=NORMAL`: the write-ahead log is synced only at checkpoints): a remote
    /// repository's per-host cache, which every open brings up to date from the store (a pack
    /// it forgot is one whose delta it has not applied, a snapshot one it has not catalogued).
    /// A remote backup commits once per pack and once for its snapshot; each commit's syncs
    /// were a local wait between the store's round trips, the last of them right before the
    /// manifest's put.
    Cache,
}

/// Turns on the query planner stability guarantee: without it SQLite (built with STAT4)
/// marks a lookup's `?1` as a value the plan may depend on and compiles the statement again
/// after every new binding, which is every lookup: parsing made most of a lookup's cost (a
/// quarter of a remote restore's CPU, profiled). Every statement here has one sensible plan.
fn stable_plans(conn: &Connection, path: &Path) -> Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(sql_err(path))?;
    Ok(())
}

/// The writable index connection.
pub struct Index {
    conn: Connection,
    path: PathBuf,
}

impl Index {
    /// Opens (creating and migrating if needed) the index at `path`, its commits durable.
    pub fn open(path: &Path) -> Result<Index> {
        Index::open_with(path, Durability::Durable)
    }

    /// [`Index::open`] with commits as durable as `durability` says.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Index> {
        let conn = Connection::open(path).map_err(sql_err(path))?;
        configure(&conn, path)?;
        if durability == Durability::Cache {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql_err(path))?;
            // Checkpoints are what still syncs: one every few packs (a pack's rows fill ~1000
            // pages of log, the default threshold), and one when the process exits. A 32 MiB
            // log keeps them out of an incremental's round trips; the next open goes on
            // with the log its predecessor left.
            conn.pragma_update(None, "wal_autocheckpoint", 8192)
                .map_err(sql_err(path))?;
            // A large transaction (a re-index) leaves a long log: cut back after checkpoints.
            conn.pragma_update(None, "journal_size_limit", 32 << 20)
                .map_err(sql_err(path))?;
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                .map_err(sql_err(path))?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err(path))?;
        // An 8 MiB page cache for the one writer: chunk ids are random, so inserts touch
        // pages all over the B-tree.
        conn.pragma_update(None, "cache_size", -8192)
            .map_err(sql_err(path))?;
        let mut index = Index {
            conn,
            path: path.to_path_buf(),
        };
        index.migrate()?;
        Ok(index)
    }

    /// Opens the index at `path` read-only without writing anything beside it (no log, no
    /// shared memory, no locks): for a repository that cannot be written. `None` when the
    /// file cannot serve as is: it has a non-empty write-ahead log (transactions the file does
    /// not hold yet), or another schema version. SQLite trusts an immutable file not to
    /// change while it is open; a repository nobody can write does not.
    pub fn open_immutable(path: &Path) -> Result<Option<Index>> {
        let log = sidecar(path, "-wal");
        if std::fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
            return Ok(None);
        }
        let conn = open_immutable_conn(path)?;
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(path))?;
        if version != SCHEMA_VERSION {
            return Ok(None);
        }
        Ok(Some(Index {
            conn,
            path: path.to_path_buf(),
        }))
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
        if version < 2 {
            migrate_v1_to_v2(&tx).map_err(sql_err(&path))?;
        }
        if version < 3 {
            migrate_v2_to_v3(&tx).map_err(sql_err(&path))?;
        }
        tx.commit().map_err(sql_err(&path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection itself, for maintenance (forget, prune, stats) that needs its own
    /// queries and per-connection temporary tables.
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Whether the index knows a chunk.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        contains(&self.conn, &self.path, id)
    }

    /// Records a stored pack (of format `version`) and its chunks in one transaction. A chunk
    /// already indexed (from another pack, or an earlier frame of this one) keeps its first
    /// location.
    pub fn add_pack(
        &mut self,
        name: &str,
        size: u64,
        version: u32,
        entries: &[PackEntry],
    ) -> Result<()> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        add_pack_in(&tx, &path, name, size, version, entries)?;
        tx.commit().map_err(&err)
    }

    /// Replaces every pack and chunk row with the packs `fill` adds (name, size, format
    /// version, entries), in one transaction: readers see the old rows or the new ones.
    pub fn replace_packs(
        &mut self,
        fill: impl FnOnce(&mut dyn FnMut(&str, u64, u32, &[PackEntry]) -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.execute_batch("DELETE FROM chunks; DELETE FROM packs;")
            .map_err(&err)?;
        fill(&mut |name, size, version, entries| {
            add_pack_in(&tx, &path, name, size, version, entries)
        })?;
        tx.commit().map_err(&err)
    }

    /// Adds a snapshot to the catalogue (idempotent).
    pub fn add_snapshot(&self, id: &str, meta: &SnapshotMeta, virtual_size: u64) -> Result<()> {
        let meta_json = serde_json::to_string(meta)
            .map_err(|e| Error::InvalidArgument(format!("snapshot metadata: {e}")))?;
        let m = meta;
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
                    m.parent.as_deref(),
                    virtual_size as i64,
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
            // A malformed id can only come from a damaged index; the manifests hold the truth.
            let id = SnapshotId::parse(&id).map_err(|_| {
                Error::corrupt(
                    self.path.display(),
                    0,
                    format!(
                        "snapshot id {:?} in the index is not a full snapshot id; the index is \
                         derived state: rebuild it with `stackvault index rebuild`",
                        crate::format::short_id(&id)
                    ),
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

    /// Caches a verification record stored under `key` (idempotent).
    pub fn add_verification(&self, key: &str, record: &VerificationRecord) -> Result<()> {
        let json = serde_json::to_string(record)
            .map_err(|e| Error::InvalidArgument(format!("verification record: {e}")))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO verifications \
                 (key, snapshot, time, outcome, duration_ms, record) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key,
                    record.snapshot_id.as_str(),
                    record.time,
                    record.outcome.as_str(),
                    record.duration_ms as i64,
                    json
                ],
            )
            .map_err(sql_err(&self.path))?;
        Ok(())
    }

    /// The latest verification of every snapshot that has one, by snapshot id.
    pub fn last_verifications(
        &self,
    ) -> Result<std::collections::HashMap<SnapshotId, VerificationRecord>> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT key, record FROM verifications ORDER BY snapshot, time, key")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(&err)?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (key, json) = row.map_err(&err)?;
            let record = VerificationRecord::decode(json.as_bytes(), &key)?;
            out.insert(record.snapshot_id.clone(), record);
        }
        Ok(out)
    }

    /// Every verification record cached, oldest first.
    pub fn verifications(&self) -> Result<Vec<(String, VerificationRecord)>> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT key, record FROM verifications ORDER BY time, key")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (key, json) = row.map_err(&err)?;
            let record = VerificationRecord::decode(json.as_bytes(), &key)?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// Every indexed pack, in index order.
    pub fn packs(&self) -> Result<Vec<PackRow>> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, size, chunk_count, version FROM packs ORDER BY id")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PackRow {
                    key: r.get(0)?,
                    name: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    chunk_count: r.get::<_, i64>(3)? as u64,
                    version: r.get(4)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<PackRow>>>()
            .map_err(&err)
    }

    /// Calls `f` with every chunk row, ordered by pack key and offset. SQLite sorts on disk,
    /// so memory stays bounded whatever the index size. A row whose id is not 32 bytes is
    /// reported as damage of the index.
    pub fn scan_chunks_by_pack(
        &self,
        mut f: impl FnMut(i64, RecordLocation) -> Result<()>,
    ) -> Result<()> {
        let err = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.pack, c.id, c.offset, c.raw_len, c.stored_len, c.frame_raw_len, \
                 c.in_frame, coalesce(p.version, 2) FROM chunks c \
                 LEFT JOIN packs p ON p.id = c.pack ORDER BY c.pack, c.offset, c.in_frame",
            )
            .map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let id: Vec<u8> = row.get(1).map_err(&err)?;
            let id = <[u8; 32]>::try_from(id.as_slice()).map_err(|_| {
                Error::corrupt(
                    self.path.display(),
                    0,
                    "chunk row with an id of the wrong length",
                )
            })?;
            let record = RecordLocation {
                version: row.get(7).map_err(&err)?,
                id: ChunkId(id),
                offset: row.get::<_, i64>(2).map_err(&err)? as u64,
                in_frame: row.get(6).map_err(&err)?,
                raw_len: row.get(3).map_err(&err)?,
                stored_len: row.get(4).map_err(&err)?,
                frame_raw_len: row.get(5).map_err(&err)?,
            };
            f(row.get(0).map_err(&err)?, record)?;
        }
        Ok(())
    }

    /// SQLite's own consistency check of the index file: empty when sound.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let err = sql_err(&self.path);
        let mut stmt = self.conn.prepare("PRAGMA integrity_check").map_err(&err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(&err)?;
        let all = rows
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(&err)?;
        Ok(all.into_iter().filter(|l| l != "ok").collect())
    }

    /// Moves everything committed in the write-ahead log into the database file and empties
    /// the log, so the file alone holds the index.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sql_err(&self.path))
    }
}

/// Inserts a chunk row: id, pack, frame offset, raw length, frame stored length, frame raw
/// length, offset in frame, chunks in frame (see [`chunk_params`]).
pub(crate) const INSERT_CHUNK_OR_IGNORE: &str = "INSERT OR IGNORE INTO chunks \
     (id, pack, offset, raw_len, stored_len, frame_raw_len, in_frame, frame_chunks) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
/// [`INSERT_CHUNK_OR_IGNORE`], replacing an existing row (prune moving a chunk).
pub(crate) const INSERT_CHUNK_OR_REPLACE: &str = "INSERT OR REPLACE INTO chunks \
     (id, pack, offset, raw_len, stored_len, frame_raw_len, in_frame, frame_chunks) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Records a stored pack and its chunks inside the transaction `tx` (see [`Index::add_pack`]).
fn add_pack_in(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    name: &str,
    size: u64,
    version: u32,
    entries: &[PackEntry],
) -> Result<()> {
    let err = sql_err(path);
    tx.execute(
        "INSERT OR IGNORE INTO packs (name, size, chunk_count, version) \
         VALUES (?1, ?2, ?3, ?4)",
        params![name, size as i64, entries.len() as i64, version],
    )
    .map_err(&err)?;
    let pack_id: i64 = tx
        .query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0))
        .map_err(&err)?;
    let mut stmt = tx.prepare_cached(INSERT_CHUNK_OR_IGNORE).map_err(&err)?;
    // In pack order first (the first copy of a chunk wins), then in key order, so
    // consecutive inserts land on neighbouring B-tree pages.
    let mut rows: Vec<(&PackEntry, u32)> = Vec::with_capacity(entries.len());
    for frame in frames(entries) {
        rows.extend(frame.iter().map(|e| (e, frame.len() as u32)));
    }
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    rows.retain(|(e, _)| seen.insert(e.id));
    rows.sort_unstable_by_key(|(e, _)| e.id);
    for (e, n) in rows {
        stmt.execute(chunk_params(e, pack_id, n)).map_err(&err)?;
    }
    Ok(())
}

/// Parameters of [`INSERT_CHUNK_OR_IGNORE`] for entry `e` of pack `pack`, whose frame holds
/// `frame_chunks` chunks.
pub(crate) fn chunk_params(
    e: &PackEntry,
    pack: i64,
    frame_chunks: u32,
) -> (&[u8], i64, i64, u32, u32, u32, u32, u32) {
    (
        &e.id.0[..],
        pack,
        e.offset as i64,
        e.raw_len,
        e.stored_len,
        e.frame_raw_len,
        e.in_frame,
        frame_chunks,
    )
}

/// A pack as the index knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRow {
    /// The index's own key of the pack (the `chunks.pack` column).
    pub key: i64,
    pub name: String,
    pub size: u64,
    pub chunk_count: u64,
    /// Format version of the pack.
    pub version: u32,
}

fn contains(conn: &Connection, path: &Path, id: &ChunkId) -> Result<bool> {
    let mut stmt = conn
        .prepare_cached("SELECT 1 FROM chunks WHERE id = ?1")
        .map_err(sql_err(path))?;
    stmt.exists([&id.0[..]]).map_err(sql_err(path))
}

/// Where a chunk is: its pack's name and its record.
const LOOKUP_SQL: &str = "SELECT p.name, c.offset, c.raw_len, c.stored_len, p.version, \
     c.in_frame, c.frame_raw_len FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.id = ?1";

fn lookup(conn: &Connection, path: &Path, id: &ChunkId) -> Result<Option<ChunkLocation>> {
    let mut stmt = conn.prepare_cached(LOOKUP_SQL).map_err(sql_err(path))?;
    stmt.query_row([&id.0[..]], |r| {
        Ok(ChunkLocation {
            pack: r.get(0)?,
            record: RecordLocation {
                version: r.get(4)?,
                id: *id,
                offset: r.get::<_, i64>(1)? as u64,
                in_frame: r.get(5)?,
                raw_len: r.get(2)?,
                stored_len: r.get(3)?,
                frame_raw_len: r.get(6)?,
            },
        })
    })
    .optional()
    .map_err(sql_err(path))
}

/// `path` with `suffix` appended (`-wal`, `-shm`).
pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

/// A read-only connection to `path` opened with SQLite's `immutable=1` URI parameter.
fn open_immutable_conn(path: &Path) -> Result<Connection> {
    use std::os::unix::ffi::OsStrExt;
    // A URI path escapes every byte that is not unreserved (RFC 3986) or a separator.
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(path))?;
    conn.busy_timeout(Duration::from_secs(60))
        .map_err(sql_err(path))?;
    Ok(conn)
}

/// A pool of read-only connections for lookups from many threads at once, at most
/// [`IndexReaders::max_open`] of them: each connection holds its own schema, statements and
/// page cache (about 170 KiB), so a pool that opened one per thread looking up grew with the
/// threads: a served snapshot's SQLite heap grew by 1 MiB with six clients, outside the
/// memory budget. A lookup takes microseconds, so a thread that finds every connection busy
/// waits for one rather than opening another.
pub struct IndexReaders {
    path: PathBuf,
    immutable: bool,
    pool: Mutex<Pool>,
    returned: Condvar,
}

/// A connection taken from the pool, given back when dropped (even by a panic in the
/// lookup: the connection holds no transaction, so it stays usable).
struct Lent<'a> {
    readers: &'a IndexReaders,
    conn: Option<Connection>,
}

impl Lent<'_> {
    /// The connection lent (there until the guard is dropped, or a batch closes it).
    fn conn(&self) -> Result<&Connection> {
        self.conn
            .as_ref()
            .ok_or_else(|| Error::Internal("index connection lent without it".into()))
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.readers.pool().idle.push(c);
            self.readers.returned.notify_one();
        }
    }
}

/// The connections not in use, and how many are open in all.
struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

impl IndexReaders {
    /// Most connections open at once: one per core (lookups are CPU-bound), at least two and
    /// at most four (a lookup takes microseconds against the milliseconds of the frame it
    /// finds, so more connections would only hold more memory).
    pub fn max_open() -> usize {
        // Asked once: the standard library reads the cgroup's CPU quota from files each time.
        static MAX_OPEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *MAX_OPEN.get_or_init(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 4)
        })
    }

    /// Opens connections until [`IndexReaders::max_open`] are open: a server calls it before
    /// it serves, so the connections' memory is part of its size at rest and does not come
    /// on top of its memory budget with the first clients.
    pub fn open_all(&self) -> Result<()> {
        // Each connection taken is held until all are open (taking from the idle ones would
        // not open any); dropping them gives them back.
        let mut held = Vec::new();
        while self.open_connections() < Self::max_open() {
            held.push(self.lend()?);
        }
        Ok(())
    }

    /// Connections open now (idle or lent).
    pub fn open_connections(&self) -> usize {
        self.pool().open
    }

    pub fn new(path: &Path) -> Self {
        IndexReaders {
            path: path.to_path_buf(),
            immutable: false,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    /// Readers of an index opened with [`Index::open_immutable`].
    pub fn immutable(path: &Path) -> Self {
        IndexReaders {
            immutable: true,
            ..IndexReaders::new(path)
        }
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // The pool is two plain fields changed together under the lock: a panic elsewhere
        // while it was held cannot leave them half-changed.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection, a new one while fewer than [`IndexReaders::max_open`] are open,
    /// or else the next one given back.
    fn take(&self) -> Result<Connection> {
        let max = Self::max_open();
        let mut pool = self.pool();
        loop {
            if let Some(c) = pool.idle.pop() {
                return Ok(c);
            }
            if pool.open < max {
                pool.open += 1;
                drop(pool);
                let opened = self.open_one();
                if opened.is_err() {
                    self.closed_one();
                }
                return opened;
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open_one(&self) -> Result<Connection> {
        if self.immutable {
            let c = open_immutable_conn(&self.path)?;
            stable_plans(&c, &self.path)?;
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err(&self.path))?;
        configure(&c, &self.path)?;
        Ok(c)
    }

    /// A connection taken from the pool until the returned guard is dropped.
    fn lend(&self) -> Result<Lent<'_>> {
        Ok(Lent {
            readers: self,
            conn: Some(self.take()?),
        })
    }

    /// A connection that will not come back (it failed to open, or was closed): one fewer
    /// open, and a waiting thread may open another.
    fn closed_one(&self) {
        let mut pool = self.pool();
        pool.open = pool.open.saturating_sub(1);
        drop(pool);
        self.returned.notify_one();
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        f(self.lend()?.conn()?)
    }

    /// Whether the index knows a chunk.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.with(|c| contains(c, &self.path, id))
    }

    /// Where a chunk is stored, if indexed.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        self.with(|c| lookup(c, &self.path, id))
    }

    /// A connection for many lookups in one read transaction: each lookup on its own
    /// starts and ends a transaction, which on a connection that is not in WAL (no writer
    /// open, the `-wal` file gone) means a lock, an unlock, a stat of the `-wal` file, a
    /// read of the header and the schema loaded again, statements prepared anew: in a
    /// remote restore of 167,000 chunks that was a quarter of the restore's CPU. The
    /// transaction ends when the batch is dropped; a batch sees the index as it was at its
    /// first lookup, so a caller that must see a refresh (a chunk not found) drops it first.
    pub fn batch(&self) -> Result<LookupBatch<'_>> {
        let lent = self.lend()?;
        lent.conn()?
            .execute_batch("BEGIN DEFERRED")
            .map_err(sql_err(&self.path))?;
        Ok(LookupBatch { lent })
    }
}

/// Lookups in one read transaction ([`IndexReaders::batch`]).
pub struct LookupBatch<'a> {
    lent: Lent<'a>,
}

impl LookupBatch<'_> {
    /// Where a chunk is stored, if indexed (as [`IndexReaders::lookup`]).
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        lookup(self.lent.conn()?, &self.lent.readers.path, id)
    }
}

impl Drop for LookupBatch<'_> {
    fn drop(&mut self) {
        // A connection whose transaction did not end is closed rather than given back.
        let ended = self
            .lent
            .conn
            .as_ref()
            .is_some_and(|c| c.is_autocommit() || c.execute_batch("COMMIT").is_ok());
        if !ended && self.lent.conn.take().is_some() {
            self.lent.readers.closed_one();
        }
    }
}

/// Brings the snapshot catalogue in line with the manifests in the repository: adds the
/// manifests it lacks (a crash between writing a manifest and cataloguing it). Manifests that
/// fail to decode are left out and reported. A catalogued snapshot whose manifest is gone is
/// kept and reported: manifests are never deleted behind the index's back (forget removes the
/// row first), so a vanished manifest is damage that `check` and `restore` must show, not
/// forget.
pub fn sync_snapshots(
    index: &Index,
    backend: &dyn Backend,
    protection: &Protection,
) -> Result<Vec<Error>> {
    sync_catalogue(index, backend, protection, false)
}

/// [`sync_snapshots`] for an index that is one host's cache of a repository shared on an
/// object store: there, other hosts forget snapshots (removing their rows from their own
/// caches only), so a catalogued snapshot whose manifest is gone was forgotten, and its row is
/// dropped instead of reported. Damage to a manifest that is present is still reported.
pub fn sync_shared_snapshots(
    index: &Index,
    backend: &dyn Backend,
    protection: &Protection,
) -> Result<Vec<Error>> {
    sync_catalogue(index, backend, protection, true)
}

fn sync_catalogue(
    index: &Index,
    backend: &dyn Backend,
    protection: &Protection,
    shared: bool,
) -> Result<Vec<Error>> {
    let present: std::collections::HashSet<String> = backend
        .list("snapshots/")?
        .into_iter()
        .filter_map(|k| k.strip_prefix("snapshots/").map(str::to_owned))
        .collect();
    let known: std::collections::HashSet<String> = index.snapshot_ids()?.into_iter().collect();
    let mut problems = Vec::new();
    for id in present.difference(&known) {
        match load_manifest(backend, protection, id) {
            Ok(m) => {
                index.add_snapshot(id, &m.meta, m.virtual_size)?;
                // `forget` may have removed the manifest since we read it (it drops the row
                // first, then the manifest): never leave a row behind without one.
                if !backend.exists(&snapshot_key(id))? {
                    index.remove_snapshot(id)?;
                }
            }
            Err(e) => problems.push(e),
        }
    }
    for id in known.difference(&present) {
        if shared {
            index.remove_snapshot(id)?;
        } else {
            problems.push(missing_manifest(id));
        }
    }
    Ok(problems)
}

/// Caches the verification records in the repository that the index lacks (records other
/// hosts wrote, on a shared repository). A damaged record is left out and returned.
pub fn sync_verifications(
    index: &Index,
    backend: &dyn Backend,
    protection: &Protection,
) -> Result<Vec<Error>> {
    let known: std::collections::HashSet<String> =
        index.verifications()?.into_iter().map(|(k, _)| k).collect();
    let mut problems = Vec::new();
    for key in backend.list(VERIFICATIONS_PREFIX)? {
        if known.contains(&key) {
            continue;
        }
        let record = backend
            .get(&key)
            .and_then(|bytes| VerificationRecord::open(protection, &bytes, &key));
        match record {
            Ok(r) => index.add_verification(&key, &r)?,
            Err(Error::NotFound { .. }) => {}
            Err(e) if e.is_corruption() => problems.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok(problems)
}

fn missing_manifest(id: &str) -> Error {
    Error::corrupt(
        snapshot_key(id),
        0,
        "the manifest of this catalogued snapshot is missing",
    )
}

/// Opens the manifest of snapshot `id` from `object` (its bytes as stored under `key`): plain,
/// or in an encrypted repository authenticated block by block ([`SealedObject`]) and hashed
/// with the keyed object-id hash. The caller compares [`Manifest::object_hash`] with `id`.
pub(crate) fn open_manifest<'b>(
    object: Box<dyn crate::format::manifest::ObjectRead + 'b>,
    protection: &'b Protection,
    id: &str,
    key: &str,
) -> Result<Manifest<'b>> {
    if !protection.is_encrypted() {
        return Manifest::open(object, key);
    }
    let sealed = SealedObject::open(object, protection, id, key)?;
    Manifest::open_hashed(Box::new(sealed), key, protection.object_id_hasher())
}

/// Opens a manifest and checks that it hashes to its id (see [`Manifest::open`]: one pass
/// over it; its segments are read again when asked for). In an encrypted repository the
/// manifest is sealed ([`SealedObject`]): its footer must authenticate as the footer of `id`
/// before a byte is parsed, each block is authenticated before it is read, and the keyed
/// hash of the plaintext must be `id`.
pub fn load_manifest<'b>(
    backend: &'b dyn Backend,
    protection: &'b Protection,
    id: &str,
) -> Result<Manifest<'b>> {
    let key = snapshot_key(id);
    let object = StoredObject {
        backend,
        key: key.clone(),
    };
    if protection.is_encrypted() {
        return match open_manifest(Box::new(object), protection, id, &key) {
            Ok(m) if crate::format::hex(&m.object_hash()) == id => Ok(m),
            Ok(_) => Err(Error::corrupt(
                &key,
                0,
                "manifest does not hash to its name (damaged or altered)",
            )),
            Err(Error::NotFound { .. }) => Err(missing_manifest(id)),
            Err(e) => Err(e),
        };
    }
    let not_its_name = || {
        Error::corrupt(
            &key,
            0,
            "manifest does not hash to its name (damaged or altered)",
        )
    };
    match Manifest::open(Box::new(object), &key) {
        Ok(m) if crate::format::hex(&m.object_hash()) == id => Ok(m),
        Ok(_) => Err(not_its_name()),
        Err(Error::NotFound { .. }) => Err(missing_manifest(id)),
        // Damaged: say so in the plainest terms when the bytes are not what was stored.
        Err(e) if e.is_corruption() => match object_hash(backend, &key) {
            Ok(h) if crate::format::hex(&h) != id => Err(not_its_name()),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// BLAKE3 of a stored object, read in pieces.
fn object_hash(backend: &dyn Backend, key: &str) -> Result<[u8; 32]> {
    let size = backend.size(key)?;
    let mut h = blake3::Hasher::new();
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 20) as usize;
        h.update(&backend.get_range(key, at, n)?);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// What a rebuild found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    pub snapshots: u64,
    /// Verification records found.
    pub verifications: u64,
    /// Damaged packs, manifests or verification records: their contents are not indexed.
    pub problems: Vec<String>,
}

impl RebuildReport {
    /// `Ok` when every object was indexed; otherwise a damage error naming how many were
    /// not (the problems themselves are in the report, for the caller to list).
    pub fn damage(&self, repo: &std::path::Path) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        Err(Error::corrupt(
            repo.display(),
            0,
            format!(
                "{} damaged objects could not be indexed (listed above); the snapshots that \
                 need them cannot be restored in full: run `stackvault check --read-data` to \
                 see which",
                self.problems.len()
            ),
        ))
    }
}

/// Records damage in `report` and fails on anything else (a format this build does not
/// know, an I/O error): a rebuild never leaves an object out without saying so.
fn damaged_or_fail(report: &mut RebuildReport, e: Error) -> Result<()> {
    if e.is_corruption() {
        report.problems.push(e.to_string());
        Ok(())
    } else {
        Err(e)
    }
}

/// Fills an empty index from the packs (their deltas, else their tables: see [`delta::reindex`])
/// and manifests in `backend`. Damaged objects are
/// listed in the report's `problems`; an object that cannot be read for another reason
/// (unknown format, I/O) fails the rebuild, naming it.
pub fn rebuild(
    index: &mut Index,
    backend: &dyn Backend,
    protection: &Protection,
) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    let packs = delta::reindex(index, backend, protection, false)?;
    report.packs = packs.packs;
    report.chunks = packs.chunks;
    for e in packs.problems {
        damaged_or_fail(&mut report, e)?;
    }
    for e in sync_snapshots(index, backend, protection)? {
        damaged_or_fail(&mut report, e)?;
    }
    report.snapshots = index.snapshot_ids()?.len() as u64;
    for key in backend.list(VERIFICATIONS_PREFIX)? {
        let record = backend
            .get(&key)
            .and_then(|bytes| VerificationRecord::open(protection, &bytes, &key));
        match record {
            Ok(r) => {
                index.add_verification(&key, &r)?;
                report.verifications += 1;
            }
            Err(e) => damaged_or_fail(&mut report, e)?,
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A 4 KiB chunk `id` stored as 100 bytes at `offset` of its pack.
    fn entry_at(id: ChunkId, offset: u64) -> PackEntry {
        PackEntry {
            id,
            offset,
            in_frame: 0,
            raw_len: 4096,
            stored_len: 100,
            frame_raw_len: 4096,
            compression: crate::format::pack::Compression::Zstd,
            crc32: 0,
        }
    }

    /// An index at `dir` with one pack of `n` chunks (ids 0..n in their first bytes).
    fn index_of(dir: &Path, n: u32) -> Result<(PathBuf, Vec<ChunkId>)> {
        let path = dir.join("index.sqlite");
        let mut index = Index::open(&path)?;
        let ids: Vec<ChunkId> = (0..n)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                ChunkId(id)
            })
            .collect();
        let entries: Vec<PackEntry> = ids
            .iter()
            .zip(0u64..)
            .map(|(id, i)| entry_at(*id, 16 + i * 100))
            .collect();
        index.add_pack("p0", 16 + u64::from(n) * 100, 2, &entries)?;
        Ok((path, ids))
    }

    /// Times the cached lookup statement of `conn` was compiled again.
    fn reprepares(conn: &Connection, path: &Path) -> Result<i32> {
        let stmt = conn.prepare_cached(LOOKUP_SQL).map_err(sql_err(path))?;
        Ok(stmt.get_status(rusqlite::StatementStatus::RePrepare))
    }

    #[test]
    fn a_lookup_never_compiles_its_statement_again() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "", e))?;
        let (path, ids) = index_of(dir.path(), 300)?;
        let readers = IndexReaders::new(&path);
        for id in &ids {
            assert!(readers.lookup(id)?.is_some());
        }
        let batch = readers.batch()?;
        for id in ids.iter().rev() {
            let found = batch.lookup(id)?;
            assert_eq!(found.map(|f| f.record.id), Some(*id));
        }
        let conn = batch.lent.conn()?;
        // SQLite built with STAT4 compiles a statement again after each new binding of a
        // parameter the plan may depend on, unless the planner's stability guarantee is on.
        assert_eq!(reprepares(conn, &path)?, 0);
        drop(batch);
        // The batch's transaction ended: the connection went back to the pool, usable.
        assert_eq!(readers.open_connections(), 1);
        assert!(readers.lookup(&ids[0])?.is_some());
        Ok(())
    }

    /// The writable connection (a backup's checks and lookups of chunks it may store) keeps
    /// its plans too.
    #[test]
    fn the_writers_checks_never_compile_their_statement_again() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "", e))?;
        let (path, ids) = index_of(dir.path(), 300)?;
        let index = Index::open(&path)?;
        for id in &ids {
            assert!(index.contains(id)?);
            assert!(lookup(&index.conn, &path, id)?.is_some());
        }
        assert_eq!(reprepares(&index.conn, &path)?, 0);
        Ok(())
    }

    #[test]
    fn a_batch_sees_a_chunk_added_after_it_ended() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "", e))?;
        let (path, _) = index_of(dir.path(), 3)?;
        let readers = IndexReaders::new(&path);
        let later = ChunkId([0xee; 32]);
        let batch = readers.batch()?;
        assert!(batch.lookup(&later)?.is_none());
        drop(batch);
        let mut index = Index::open(&path)?;
        index.add_pack("p1", 116, 2, &[entry_at(later, 16)])?;
        assert!(readers.batch()?.lookup(&later)?.is_some());
        Ok(())
    }

    #[test]
    fn readers_open_at_most_max_open_connections_whatever_the_threads() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "", e))?;
        let path = dir.path().join("index.sqlite");
        drop(Index::open(&path)?);
        let readers = IndexReaders::new(&path);
        let most_open = AtomicUsize::new(0);
        let unknown = ChunkId([7; 32]);
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        for _ in 0..200 {
                            let found = readers.with(|c| {
                                most_open.fetch_max(readers.open_connections(), Ordering::Relaxed);
                                lookup(c, &path, &unknown)
                            })?;
                            assert!(found.is_none());
                        }
                        Ok(())
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a lookup thread panicked".into())))
            })
        })?;
        let most = most_open.load(Ordering::Relaxed);
        assert!(
            (1..=IndexReaders::max_open()).contains(&most),
            "{most} connections open at once, at most {} allowed",
            IndexReaders::max_open()
        );
        readers.open_all()?;
        assert_eq!(readers.open_connections(), IndexReaders::max_open());
        // Every connection went back: a lookup still finds one at once.
        assert_eq!(readers.lookup(&unknown)?, None);
        Ok(())
    }
}
