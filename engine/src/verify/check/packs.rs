//! The pack stage of a check: the index against the store and against each pack's own
//! table. Walking the index's chunk rows pack by pack (one pack's rows in memory at a time),
//! every indexed pack must be in the store at the size the index recorded, its header and
//! table must decode, and its table must place every chunk where the index does. Packs whose
//! structure is sound go on to the read-data stage; packs no snapshot needs, and packs in the
//! store the index does not know, are orphans (not damage: a later prune collects them).

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::index::PackRow;
use crate::repo::Repo;
use crate::store::pack::read_pack_table;

use super::{CheckRun, Damage, DamageKind, Findings, Orphan};

/// What the pack stage learnt.
pub(super) struct PackCensus {
    /// Packs whose structure is sound: (name, size), for the read-data stage.
    pub(super) sound: Vec<(String, u64)>,
    pub(super) orphans: Vec<Orphan>,
    /// Chunk rows in the index.
    pub(super) chunks: u64,
    /// Packs in the index.
    pub(super) packs: u64,
    /// Names of the packs holding a chunk some snapshot references.
    pub(super) referenced: HashSet<String>,
}

/// Compares the index's packs with the store and their tables; `referenced_packs` are the
/// index keys of the packs some snapshot needs.
pub(super) fn compare_packs(
    run: &mut CheckRun<'_>,
    referenced_packs: &HashSet<i64>,
) -> Result<PackCensus> {
    let repo = run.repo;
    let f = &mut run.findings;
    let listed: HashMap<String, String> = repo
        .backend()
        .list("packs/")?
        .into_iter()
        .filter_map(|k| Some((k.rsplit('/').next()?.to_string(), k)))
        .collect();
    let index = repo.index();
    let rows = index.packs()?;
    let mut pc = PackChecker {
        repo,
        index_location: run.index_location.clone(),
        listed: &listed,
        referenced_packs,
        rows: rows.iter().map(|r| (r.key, r)).collect(),
        seen: HashSet::new(),
        current: None,
        entries: Vec::new(),
        valid: Vec::new(),
        orphans: Vec::new(),
        chunks: 0,
    };
    index.scan_chunks_by_pack(|pack, loc| {
        pc.chunks += 1;
        if pc.current != Some(pack) {
            pc.flush(f)?;
            pc.current = Some(pack);
        }
        pc.entries.push(loc);
        Ok(())
    })?;
    pc.flush(f)?;
    // Packs the index lists without a single chunk row.
    for row in &rows {
        if !pc.seen.contains(&row.key) {
            pc.current = Some(row.key);
            pc.flush(f)?;
        }
    }
    let mut orphans = std::mem::take(&mut pc.orphans);
    orphans.extend(unindexed_orphans(repo, &listed, &rows));
    let sound = std::mem::take(&mut pc.valid);
    let chunks = pc.chunks;
    drop(pc);
    let referenced: HashSet<String> = rows
        .iter()
        .filter(|r| referenced_packs.contains(&r.key))
        .map(|r| r.name.clone())
        .collect();
    Ok(PackCensus {
        sound,
        orphans,
        chunks,
        packs: rows.len() as u64,
        referenced,
    })
}

/// Packs in the store that the index does not list, in name order: orphans, described by
/// their own table when it reads.
fn unindexed_orphans(
    repo: &Repo,
    listed: &HashMap<String, String>,
    rows: &[PackRow],
) -> Vec<Orphan> {
    let backend = repo.backend();
    let indexed: HashSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let mut unindexed: Vec<(&String, &String)> = listed
        .iter()
        .filter(|(name, _)| !indexed.contains(name.as_str()))
        .collect();
    unindexed.sort();
    unindexed
        .into_iter()
        .map(|(name, key)| {
            let why = match read_pack_table(backend, repo.protection(), name) {
                Ok(t) => format!("not in the index ({} chunks)", t.entries.len()),
                Err(e) => format!("not in the index, and unreadable: {e}"),
            };
            Orphan {
                pack: name.clone(),
                size: backend.size(key).unwrap_or(0),
                why,
            }
        })
        .collect()
}

/// Walks the index's chunk rows pack by pack and compares each pack with them.
struct PackChecker<'a> {
    repo: &'a Repo,
    /// The index connection is held by the scan: never call `repo.index()` from here.
    index_location: String,
    listed: &'a HashMap<String, String>,
    /// Packs holding a chunk some snapshot references (as the index places it).
    referenced_packs: &'a HashSet<i64>,
    rows: HashMap<i64, &'a PackRow>,
    seen: HashSet<i64>,
    current: Option<i64>,
    entries: Vec<crate::format::pack::RecordLocation>,
    /// Packs whose structure is sound: (name, size), for the data phase.
    valid: Vec<(String, u64)>,
    orphans: Vec<Orphan>,
    chunks: u64,
}

impl PackChecker<'_> {
    fn flush(&mut self, f: &mut Findings) -> Result<()> {
        let Some(key) = self.current.take() else {
            return Ok(());
        };
        self.seen.insert(key);
        let entries = std::mem::take(&mut self.entries);
        let Some(row) = self.rows.get(&key).copied() else {
            f.push(Damage {
                kind: DamageKind::Index,
                location: self.index_location.clone(),
                pack: None,
                offset: None,
                chunk: None,
                what: format!(
                    "{} chunk rows point at pack key {key}, which the index does not list \
                     (rebuild the index)",
                    entries.len()
                ),
            });
            f.damaged_chunks.extend(entries.iter().map(|e| e.id));
            return Ok(());
        };
        let name = row.name.as_str();
        let location = format!("pack {name}");
        let Some(obj) = self.listed.get(name) else {
            f.push(Damage {
                kind: DamageKind::PackMissing,
                location,
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: format!(
                    "the pack file is missing; the index places {} chunks in it",
                    entries.len()
                ),
            });
            f.damaged_chunks.extend(entries.iter().map(|e| e.id));
            return Ok(());
        };
        let backend = self.repo.backend();
        let size = backend.size(obj)?;
        if size != row.size {
            f.push(Damage {
                kind: DamageKind::PackSize,
                location: location.clone(),
                pack: Some(name.into()),
                offset: Some(size.min(row.size)),
                chunk: None,
                what: format!(
                    "the pack is {size} bytes, the index recorded {} (truncated or altered)",
                    row.size
                ),
            });
        }
        let table = match read_pack_table(backend, self.repo.protection(), name) {
            Ok(t) => t.entries,
            Err(e) if e.is_corruption() => {
                f.add(DamageKind::PackStructure, Some(name), None, &e);
                f.damaged_chunks.extend(entries.iter().map(|e| e.id));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut sound = size == row.size;
        if table.len() as u64 != row.chunk_count {
            sound = false;
            f.push(Damage {
                kind: DamageKind::IndexMismatch,
                location: location.clone(),
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: format!(
                    "the pack table lists {} chunks, the index recorded {}",
                    table.len(),
                    row.chunk_count
                ),
            });
        }
        let by_place: HashMap<(u64, u32), &crate::format::pack::PackEntry> =
            table.iter().map(|e| ((e.offset, e.in_frame), e)).collect();
        for e in &entries {
            let agrees = by_place.get(&(e.offset, e.in_frame)).is_some_and(|t| {
                t.id == e.id
                    && t.raw_len == e.raw_len
                    && t.stored_len == e.stored_len
                    && t.frame_raw_len == e.frame_raw_len
            });
            if !agrees {
                sound = false;
                f.push(Damage {
                    kind: DamageKind::IndexMismatch,
                    location: location.clone(),
                    pack: Some(name.into()),
                    offset: Some(e.offset),
                    chunk: Some(e.id.to_hex()),
                    what: "the index places this chunk here, the pack table disagrees \
                           (rebuild the index)"
                        .into(),
                });
                f.damaged_chunks.insert(e.id);
            }
        }
        if !self.referenced_packs.contains(&key) {
            self.orphans.push(Orphan {
                pack: name.into(),
                size,
                why: if entries.is_empty() {
                    "the index takes none of its chunks from it".into()
                } else {
                    format!(
                        "none of its {} indexed chunks is used by a snapshot",
                        entries.len()
                    )
                },
            });
        }
        if sound {
            self.valid.push((name.to_string(), size));
        }
        Ok(())
    }
}
