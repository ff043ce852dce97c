//! The first structure stages of a check: the index's own integrity, then the manifests.
//! Every manifest (listed in the store or known to the index) must load (hash, root digest,
//! decoding), and every chunk it names must be in the index; a chunk the index lacks is
//! `missing-chunk` damage, or `pack-missing` where a remote repository's delta shows the pack
//! that held it was deleted behind the repository's back. The referenced chunks go to a
//! temporary SQLite table, which spills to disk, never to a set in memory: a repository of a
//! hundred million chunks must check too. The stage hands on the packs holding a referenced
//! chunk; the pack stage calls the rest orphans.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use rusqlite::{params, Connection};

use crate::error::{Error, Result};
use crate::format::manifest::Extent;
use crate::format::{ChunkId, SnapshotId};
use crate::index::sql_err;
use crate::repo::Repo;

use super::{CheckRun, Damage, DamageKind, Findings};

/// What the manifest stage learnt.
pub(super) struct References {
    /// Every snapshot id, from the store and from the index.
    pub(super) ids: BTreeSet<SnapshotId>,
    /// Manifests that loaded.
    pub(super) snapshots: u64,
    /// Index keys of the packs the index takes a referenced chunk from.
    pub(super) referenced_packs: HashSet<i64>,
}

/// Runs SQLite's integrity check of the index; each problem is `index` damage.
pub(super) fn index_integrity(run: &mut CheckRun<'_>) -> Result<()> {
    let location = run.index_location.clone();
    for problem in run.repo.index().integrity_problems()? {
        run.findings.push(Damage {
            kind: DamageKind::Index,
            location: location.clone(),
            pack: None,
            offset: None,
            chunk: None,
            what: format!("{problem} (rebuild the index with `stackvault index rebuild`)"),
        });
    }
    Ok(())
}

/// Loads every manifest and checks that the index knows every chunk it names.
pub(super) fn scan_manifests(run: &mut CheckRun<'_>) -> Result<References> {
    let repo = run.repo;
    let mut names: BTreeSet<String> = repo
        .backend()
        .list("snapshots/")?
        .into_iter()
        .filter_map(|k| k.strip_prefix("snapshots/").map(str::to_owned))
        .collect();
    names.extend(repo.index().snapshot_ids()?);
    // A name that is no snapshot id names no snapshot to restore: damage, said once here.
    let mut ids = BTreeSet::new();
    for name in names {
        match SnapshotId::parse(&name) {
            Ok(id) => {
                ids.insert(id);
            }
            Err(_) => run.findings.add(
                DamageKind::Manifest,
                None,
                None,
                &Error::corrupt(
                    format!("snapshots/{name}"),
                    0,
                    format!(
                        "not a snapshot id ({} hex digits); remove the object if nothing                          else needs it",
                        SnapshotId::HEX_LEN
                    ),
                ),
            ),
        }
    }
    let mut index = repo.index();
    let path = index.path().to_path_buf();
    let conn = index.conn_mut();
    let snapshots = record_references(repo, conn, &path, &ids, &mut run.findings)?;
    let lost = unindexed_references(conn, &path)?;
    report_lost_chunks(repo, lost, &mut run.findings)?;
    let referenced_packs = referenced_packs(conn, &path)?;
    Ok(References {
        ids,
        snapshots,
        referenced_packs,
    })
}

/// Fills the temporary table `check_refs` with every chunk the manifests name (and a snapshot
/// naming it); a manifest that does not load is damage. Returns how many loaded.
fn record_references(
    repo: &Repo,
    conn: &mut Connection,
    path: &Path,
    ids: &BTreeSet<SnapshotId>,
    f: &mut Findings,
) -> Result<u64> {
    let err = sql_err(path);
    let mut snapshots = 0;
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS check_refs (id BLOB PRIMARY KEY, \
             snapshot TEXT NOT NULL) WITHOUT ROWID;
         DELETE FROM temp.check_refs;",
    )
    .map_err(&err)?;
    for id in ids {
        let tx = conn.transaction().map_err(&err)?;
        // Errors that say damage can only come from the manifest here.
        let scanned = (|| -> Result<()> {
            let manifest = repo.load_manifest(id)?;
            snapshots += 1;
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO temp.check_refs (id, snapshot) VALUES (?1, ?2)",
                )
                .map_err(&err)?;
            for extents in manifest.segments() {
                for e in extents? {
                    if let Extent::Chunk { id: chunk, .. } = e {
                        insert
                            .execute(params![&chunk.0[..], id.as_str()])
                            .map_err(&err)?;
                    }
                }
            }
            Ok(())
        })();
        tx.commit().map_err(&err)?;
        match scanned {
            Ok(()) => {}
            Err(e) if e.is_corruption() => {
                f.add(DamageKind::Manifest, None, None, &e);
                f.damaged_manifests.insert(id.clone());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(snapshots)
}

/// Referenced chunks the index does not know, each named with a snapshot that needs it.
fn unindexed_references(conn: &Connection, path: &Path) -> Result<Vec<(ChunkId, String)>> {
    let err = sql_err(path);
    let mut missing = conn
        .prepare(
            "SELECT r.id, r.snapshot FROM temp.check_refs r \
             WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = r.id)",
        )
        .map_err(&err)?;
    let mut rows = missing.query([]).map_err(&err)?;
    let mut lost: Vec<(ChunkId, String)> = Vec::new();
    while let Some(row) = rows.next().map_err(&err)? {
        let chunk: Vec<u8> = row.get(0).map_err(&err)?;
        let snapshot: String = row.get(1).map_err(&err)?;
        if let Ok(chunk) = <[u8; 32]>::try_from(chunk.as_slice()).map(ChunkId) {
            lost.push((chunk, snapshot));
        }
    }
    Ok(lost)
}

/// Packs the index takes a referenced chunk from: the others are orphans.
fn referenced_packs(conn: &Connection, path: &Path) -> Result<HashSet<i64>> {
    let err = sql_err(path);
    let mut packs = conn
        .prepare("SELECT DISTINCT c.pack FROM temp.check_refs r JOIN chunks c ON c.id = r.id")
        .map_err(&err)?;
    let keys = packs
        .query_map([], |r| r.get::<_, i64>(0))
        .map_err(&err)?
        .collect::<rusqlite::Result<HashSet<i64>>>()
        .map_err(&err)?;
    Ok(keys)
}

/// Reports chunks snapshots need that the index does not know. On a remote repository, one
/// `pack-missing` per pack that held some of them and is gone from the store while its delta
/// remains (deleted behind the repository's back: the index sync learns nothing from such a
/// delta), naming the pack; a `missing-chunk` for each other one. A local repository's index
/// is its own record (no sync), so there each is a `missing-chunk`, as ever.
fn report_lost_chunks(repo: &Repo, lost: Vec<(ChunkId, String)>, f: &mut Findings) -> Result<()> {
    if lost.is_empty() {
        return Ok(());
    }
    let gone = if repo.is_remote() {
        crate::index::delta::gone_packs(repo.backend(), repo.protection())?
    } else {
        Vec::new()
    };
    // pack name -> (chunks of it snapshots need, a snapshot needing one)
    let mut by_pack: std::collections::BTreeMap<&str, (u64, &str)> = Default::default();
    for (chunk, snapshot) in &lost {
        f.damaged_chunks.insert(*chunk);
        if let Some((pack, _)) = gone.iter().find(|(_, ids)| ids.contains(chunk)) {
            let entry = by_pack
                .entry(pack.as_str())
                .or_insert((0, snapshot.as_str()));
            entry.0 += 1;
            continue;
        }
        let err = Error::MissingChunk {
            id: chunk.to_hex(),
            snapshot: snapshot.clone(),
        };
        f.push(Damage {
            kind: DamageKind::MissingChunk,
            location: format!("snapshots/{snapshot}"),
            pack: None,
            offset: None,
            chunk: Some(chunk.to_hex()),
            what: err.to_string(),
        });
    }
    for (pack, (chunks, snapshot)) in by_pack {
        f.push(Damage {
            kind: DamageKind::PackMissing,
            location: format!("pack {pack}"),
            pack: Some(pack.to_string()),
            offset: None,
            chunk: None,
            what: format!(
                "pack {pack} is not in the store, but its index delta remains: {chunks} chunks \
                 that snapshots need (snapshot {snapshot} among them) were in it"
            ),
        });
    }
    Ok(())
}
