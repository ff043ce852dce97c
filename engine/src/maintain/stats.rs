//! Space accounting: what each snapshot and disk takes, and what forgetting it would free.
//!
//! For every snapshot: its logical size (the virtual disk size), its data bytes (the bytes
//! its chunks cover, zero runs excluded), the stored (compressed) bytes of the distinct chunks
//! it references, and its *unique* bytes: what forgetting it and pruning would free.
//!
//! Chunks are compressed together in frames, and prune frees a frame only when none of its
//! chunks is referenced (see [`prune`](mod@crate::maintain::prune)). So: the stored bytes of
//! a chunk are its frame's stored bytes apportioned by raw length (`stored × raw / frame raw`, rounded
//! down), which is what `stored_bytes` sums; but *unique* and *unreferenced* bytes are whole
//! frames: the stored bytes of the frames all of whose referenced chunks are referenced by
//! this snapshot alone (by this disk alone; by nothing), exactly what prune would free (plus
//! the pack structure: [`crate::maintain::prune::FRAME_OVERHEAD`] per frame and
//! [`crate::maintain::prune::CHUNK_OVERHEAD`] per chunk entry of those frames). The same per disk, and for
//! the repository the dedup ratio (data bytes of all snapshots / raw bytes of the distinct
//! chunks) and the compression ratio (raw / stored bytes of those chunks).
//!
//! Every manifest is read once. Reference counts live in temporary SQLite tables of the index
//! connection (`temp.stats_refs`: chunk → number of snapshots, first snapshot, first disk and
//! whether another disk shares it; `temp.stats_disk`: distinct (disk, chunk) pairs), so
//! memory stays bounded by one manifest. Nothing in the repository is written.

use std::collections::BTreeMap;

use rusqlite::params;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::{Extent, SnapshotKind};
use crate::format::SnapshotId;
use crate::index::{sql_err, SnapshotSummary};
use crate::repo::Repo;

/// A chunk row's share of its frame's stored bytes (`c` is the `chunks` row).
const SHARE: &str = "(c.stored_len * c.raw_len / max(c.frame_raw_len, 1))";

/// Per frame of the index (pack, offset): stored bytes, how many of its chunks are
/// referenced, the most snapshots referencing one of them, the first and last snapshot and
/// disk referencing them, and whether one is shared across disks. Needs `temp.stats_refs`.
const FRAMES: &str = "SELECT max(c.stored_len) AS stored, count(r.id) AS refd, \
     max(r.n) AS n, min(r.snap) AS s0, max(r.snap) AS s1, min(r.disk) AS d0, \
     max(r.disk) AS d1, coalesce(max(r.shared), 0) AS shared \
     FROM chunks c LEFT JOIN temp.stats_refs r ON r.id = c.id GROUP BY c.pack, c.offset";

/// One snapshot's space.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub disk: String,
    pub time: String,
    pub kind: SnapshotKind,
    /// The virtual disk size.
    pub logical_bytes: u64,
    /// Bytes of the disk covered by chunks (the rest is zero runs).
    pub data_bytes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    /// Raw and stored (compressed) bytes of those chunks.
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Chunks no other snapshot references; stored bytes of the frames holding only such
    /// chunks (and unreferenced ones): what forgetting this snapshot frees (before pack
    /// structure).
    pub unique_chunks: u64,
    pub unique_bytes: u64,
    /// Referenced chunks the index does not know (damage; see `check`).
    pub missing_chunks: u64,
}

/// One disk's space, over all its snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStats {
    pub disk: String,
    pub snapshots: u64,
    /// Sum of the snapshots' virtual sizes.
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Distinct chunks referenced by the disk's snapshots, their raw and stored bytes.
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Stored bytes of chunks no other disk's snapshot references.
    pub unique_bytes: u64,
}

/// The repository as a whole.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepoStats {
    pub snapshots: u64,
    pub disks: u64,
    pub logical_bytes: u64,
    pub data_bytes: u64,
    /// Distinct referenced chunks, their raw and stored bytes.
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// data bytes / raw bytes of the distinct chunks.
    pub dedup_ratio: f64,
    /// raw / stored bytes of the distinct chunks.
    pub compression_ratio: f64,
    /// Indexed packs and their total size.
    pub packs: u64,
    pub pack_bytes: u64,
    /// Stored bytes of the frames none of whose indexed chunks a snapshot references
    /// (prune's to reclaim).
    pub unreferenced_bytes: u64,
}

/// What `stats` reports.
#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    pub repository: RepoStats,
    pub disks: Vec<DiskStats>,
    pub snapshots: Vec<SnapshotStats>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Computes the space report; `disk` limits the per-snapshot and per-disk lists (unique
/// bytes are always relative to every snapshot in the repository).
pub fn stats(repo: &Repo, disk: Option<&str>) -> Result<StatsReport> {
    let all = repo.snapshots(None)?;
    let mut disk_ids: BTreeMap<String, i64> = BTreeMap::new();
    for s in &all {
        let n = disk_ids.len() as i64;
        disk_ids.entry(s.meta.disk.clone()).or_insert(n);
    }
    let mut index = repo.index();
    let path = index.path().to_path_buf();
    let err = sql_err(&path);
    let conn = index.conn_mut();
    create_tables(conn, &err)?;
    let mut snaps = Vec::with_capacity(all.len());
    for (i, s) in all.iter().enumerate() {
        let d = disk_ids.get(&s.meta.disk).copied().unwrap_or(0);
        snaps.push(snapshot_stats(repo, conn, &err, s, i as i64, d)?);
    }
    count_unique(conn, &err, &mut snaps)?;
    let mut disks: Vec<DiskStats> = Vec::new();
    for (name, &d) in &disk_ids {
        disks.push(disk_stats(conn, &err, &snaps, name, d)?);
    }
    let repository = repo_stats(conn, &err, &snaps, disk_ids.len() as u64)?;
    conn.execute_batch("DELETE FROM temp.stats_refs; DELETE FROM temp.stats_disk;")
        .map_err(&err)?;
    drop(index);
    if let Some(d) = disk {
        if !disk_ids.contains_key(d) {
            return Err(Error::InvalidArgument(format!("no snapshot of disk {d:?}")));
        }
        snaps.retain(|s| s.disk == d);
        disks.retain(|x| x.disk == d);
    }
    Ok(StatsReport {
        repository,
        disks,
        snapshots: snaps,
    })
}

/// The temporary tables the report is computed in: `stats_refs` (per referenced chunk: how
/// many snapshots, the last one, its disk, whether another disk shares it), `stats_disk`
/// (chunks per disk) and `stats_snap` (the snapshot being read). Tables, not sets in memory:
/// SQLite spills them to disk, so a snapshot of tens of millions of chunks costs no more
/// memory than a small one.
fn create_tables(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
) -> Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS stats_refs (id BLOB PRIMARY KEY, n INTEGER NOT NULL,
             snap INTEGER NOT NULL, disk INTEGER NOT NULL, shared INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS stats_disk (disk INTEGER NOT NULL, id BLOB NOT NULL,
             PRIMARY KEY (disk, id)) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS stats_snap (id BLOB PRIMARY KEY) WITHOUT ROWID;
         DELETE FROM temp.stats_refs;
         DELETE FROM temp.stats_disk;",
    )
    .map_err(err)
}

/// Reads snapshot `s` (number `snap` of disk number `disk`), adds its chunks to the
/// temporary tables and returns its figures; the unique ones are filled in later by
/// [`count_unique`], once every snapshot is in.
fn snapshot_stats(
    repo: &Repo,
    conn: &mut rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    s: &SnapshotSummary,
    snap: i64,
    disk: i64,
) -> Result<SnapshotStats> {
    let manifest = repo.load_manifest(&s.id)?;
    let mut data_bytes = 0;
    let tx = conn.transaction().map_err(err)?;
    tx.execute("DELETE FROM temp.stats_snap", []).map_err(err)?;
    {
        let mut distinct = tx
            .prepare_cached("INSERT OR IGNORE INTO temp.stats_snap (id) VALUES (?1)")
            .map_err(err)?;
        for extents in manifest.segments() {
            for e in extents? {
                if let Extent::Chunk { id, len } = e {
                    data_bytes += u64::from(len);
                    distinct.execute([&id.0[..]]).map_err(err)?;
                }
            }
        }
    }
    let (chunks, found, raw, stored): (i64, i64, i64, i64) = tx
        .query_row(
            &format!(
                "SELECT count(*), count(c.id), coalesce(sum(c.raw_len), 0), \
                 coalesce(sum({SHARE}), 0) \
                 FROM temp.stats_snap s LEFT JOIN chunks c ON c.id = s.id"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map_err(err)?;
    tx.execute(
        "INSERT INTO temp.stats_refs (id, n, snap, disk, shared) \
         SELECT id, 1, ?1, ?2, 0 FROM temp.stats_snap WHERE true \
         ON CONFLICT (id) DO UPDATE SET n = n + 1, shared = shared OR disk != excluded.disk",
        params![snap, disk],
    )
    .map_err(err)?;
    tx.execute(
        "INSERT OR IGNORE INTO temp.stats_disk (disk, id) SELECT ?1, id FROM temp.stats_snap",
        [disk],
    )
    .map_err(err)?;
    tx.commit().map_err(err)?;
    let (chunks, missing) = (chunks as u64, (chunks - found) as u64);
    Ok(SnapshotStats {
        id: s.id.clone(),
        disk: s.meta.disk.clone(),
        time: s.meta.time.clone(),
        kind: s.meta.kind,
        logical_bytes: manifest.virtual_size,
        data_bytes,
        chunks,
        raw_bytes: raw as u64,
        stored_bytes: stored as u64,
        unique_chunks: 0,
        unique_bytes: 0,
        missing_chunks: missing,
    })
}

/// Unique per snapshot: chunks referenced by exactly one snapshot; frames whose referenced
/// chunks are all of one snapshot alone.
fn count_unique(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    snaps: &mut [SnapshotStats],
) -> Result<()> {
    let mut stmt = conn
        .prepare(
            "SELECT r.snap, count(*) FROM temp.stats_refs r \
             JOIN chunks c ON c.id = r.id WHERE r.n = 1 GROUP BY r.snap",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (snap, n) = row.map_err(err)?;
        if let Some(s) = usize::try_from(snap).ok().and_then(|i| snaps.get_mut(i)) {
            s.unique_chunks = n as u64;
        }
    }
    let mut stmt = conn
        .prepare(&format!(
            "SELECT f.s0, sum(f.stored) FROM ({FRAMES}) f \
             WHERE f.refd > 0 AND f.n = 1 AND f.s0 = f.s1 GROUP BY f.s0"
        ))
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (snap, bytes) = row.map_err(err)?;
        if let Some(s) = usize::try_from(snap).ok().and_then(|i| snaps.get_mut(i)) {
            s.unique_bytes = bytes as u64;
        }
    }
    Ok(())
}

/// The figures of disk `name` (number `disk` in the temporary tables).
fn disk_stats(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    snaps: &[SnapshotStats],
    name: &str,
    disk: i64,
) -> Result<DiskStats> {
    let of_disk: Vec<&SnapshotStats> = snaps.iter().filter(|s| s.disk == name).collect();
    let (chunks, raw, stored): (i64, i64, i64) = conn
        .query_row(
            &format!(
                "SELECT count(*), coalesce(sum(c.raw_len), 0), coalesce(sum({SHARE}), 0) \
                 FROM temp.stats_disk x JOIN chunks c ON c.id = x.id WHERE x.disk = ?1"
            ),
            [disk],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(err)?;
    let unique: i64 = conn
        .query_row(
            &format!(
                "SELECT coalesce(sum(f.stored), 0) FROM ({FRAMES}) f WHERE f.refd > 0 \
                 AND f.d0 = ?1 AND f.d1 = ?1 AND NOT f.shared"
            ),
            [disk],
            |r| r.get(0),
        )
        .map_err(err)?;
    Ok(DiskStats {
        disk: name.to_string(),
        snapshots: of_disk.len() as u64,
        logical_bytes: of_disk.iter().map(|s| s.logical_bytes).sum(),
        data_bytes: of_disk.iter().map(|s| s.data_bytes).sum(),
        chunks: chunks as u64,
        raw_bytes: raw as u64,
        stored_bytes: stored as u64,
        unique_bytes: unique as u64,
    })
}

/// The repository's figures, over every snapshot of every disk.
fn repo_stats(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    snaps: &[SnapshotStats],
    disks: u64,
) -> Result<RepoStats> {
    let (chunks, raw, stored): (i64, i64, i64) = conn
        .query_row(
            &format!(
                "SELECT count(*), coalesce(sum(c.raw_len), 0), coalesce(sum({SHARE}), 0) \
                 FROM temp.stats_refs r JOIN chunks c ON c.id = r.id"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(err)?;
    let unreferenced: i64 = conn
        .query_row(
            &format!("SELECT coalesce(sum(f.stored), 0) FROM ({FRAMES}) f WHERE f.refd = 0"),
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    let (packs, pack_bytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM packs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(err)?;
    let data_bytes: u64 = snaps.iter().map(|s| s.data_bytes).sum();
    Ok(RepoStats {
        snapshots: snaps.len() as u64,
        disks,
        logical_bytes: snaps.iter().map(|s| s.logical_bytes).sum(),
        data_bytes,
        chunks: chunks as u64,
        raw_bytes: raw as u64,
        stored_bytes: stored as u64,
        dedup_ratio: ratio(data_bytes, raw as u64),
        compression_ratio: ratio(raw as u64, stored as u64),
        packs: packs as u64,
        pack_bytes: pack_bytes as u64,
        unreferenced_bytes: unreferenced.max(0) as u64,
    })
}
