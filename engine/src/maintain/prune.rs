//! Prune: delete stored data that no snapshot references any more.
//!
//! Job: find the chunks no remaining manifest names; delete packs that hold only such
//! chunks (and orphan packs, which the index does not know); rewrite packs whose unused
//! share exceeds `max_unused` by copying their still-referenced frames verbatim (no
//! recompression) into new packs; and keep the index in step.
//!
//! Liveness is per chunk, storage per frame: a frame is kept whole (all its chunks, live or
//! not) if any chunk the index places in it is referenced, and freed only when none is. The
//! unused bytes of a pack are its frames without a live chunk (record bytes and table
//! entries); `--dry-run` and `stats` count the same way. Verification records of
//! snapshots that no longer exist go too.
//!
//! On a shared (remote) store prune runs beside backups and deletes in two phases
//! (`prune_two_phase`, `maintain::condemn`, `format-spec/locks.md` "Prune on a shared
//! store"): it condemns unused packs in a record and deletes them in a later run, once the
//! grace period has passed and no manifest references them. What follows is the local case.
//!
//! Exclusion: prune holds the repository's maintenance lock from start to end (see
//! `format-spec/locks.md` and `format-spec/retention.md`), so no backup can deduplicate
//! against a chunk while prune decides to delete it, and no forget can change the set of
//! manifests under it. Readers (restore, verify) take no lock; one that looked up a chunk in
//! a pack that prune then deletes retries its lookup once (see `read::verified::with_located`).
//!
//! Memory: the set of referenced chunk ids lives in a temporary SQLite table of the index
//! connection (`temp.prune_live`), not in a Rust set, so it spills to disk like any SQLite
//! table and memory stays bounded by SQLite's cache, one manifest and two packs (the one
//! being read and the one being written).
//!
//! Order (the crash analysis is in `format-spec/retention.md`): (1) store the replacement
//! packs, (2) index them, pointing the moved chunks' rows at them, (3) in one transaction
//! drop the rows of the old packs, after checking that no referenced chunk still lives only
//! there, (4) delete the old pack files, then orphans. A crash anywhere leaves every
//! remaining snapshot readable; what it leaves behind is unreferenced packs that `check`
//! lists as orphans and the next prune deletes. Prune refuses to run when a manifest cannot
//! be read: it cannot know what that snapshot needs.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::Extent;
use crate::format::pack::{
    check_protection, decode_frame_header, decode_frame_list, decode_record_header_v1,
    frame_record_len, open_sealed_frame, pack_version_for, table_entry_len, Compression,
    FRAME_HEADER_LEN, FRAME_LIST_ENTRY_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN, PACK_VERSION_SEALED,
    PACK_VERSION_V1, RECORD_HEADER_LEN, TABLE_ENTRY_LEN,
};
use crate::format::verification::VERIFICATIONS_PREFIX;
use crate::format::ChunkId;
use crate::index::{self, sql_err, Index};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::pack::PackWriter;
use crate::store::pack_key;

pub use super::two_phase_plan::{
    CondemnWhy, Deleted, PlannedCondemnation, PlannedDeletion, TwoPhasePlan, Waiting,
};

/// Bytes of a pack that are not records: header and footer.
pub const PACK_FIXED_OVERHEAD: u64 = (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64;
/// Bytes a chunk costs in a (version 2) pack beyond its frame's stored bytes: its entry in
/// the frame's chunk list and its table entry.
pub const CHUNK_OVERHEAD: u64 = (FRAME_LIST_ENTRY_LEN + TABLE_ENTRY_LEN) as u64;
/// Bytes a frame costs in a (version 2) pack beyond its stored bytes and its chunks' costs.
pub const FRAME_OVERHEAD: u64 = FRAME_HEADER_LEN as u64;

/// What prune may do.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Largest unused share of a pack's record bytes (0.0..=1.0) that is left in place;
    /// a pack above it is rewritten.
    pub max_unused: f64,
    /// Plan and report, change nothing (takes no lock).
    pub dry_run: bool,
    /// On a shared (remote) store: how old a condemnation record must be before the packs it
    /// names are deleted (two-phase deletion, `format-spec/locks.md`).
    pub grace: Duration,
}

/// The default grace period: twice the lease, so that a backup that used a pack condemned
/// under it has either re-checked and copied it or lost its lease (and fails) before the pack
/// can go.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2 * crate::lock::lease::LEASE.as_secs());

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: 0.10,
            dry_run: false,
            grace: DEFAULT_GRACE,
        }
    }
}

/// Parses `--max-unused`: a percentage like `10%` (or `10`), 0 to 100.
pub fn parse_max_unused(s: &str) -> Result<f64> {
    let n: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| {
        Error::Usage(format!(
            "--max-unused {s:?}: expected a percentage like 10%"
        ))
    })?;
    if !(0.0..=100.0).contains(&n) {
        return Err(Error::Usage(format!(
            "--max-unused {s:?}: must be between 0% and 100%"
        )));
    }
    Ok(n / 100.0)
}

/// The outcome of a prune (or, with `dry_run`, its plan: byte counts are then estimates).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: u64,
    /// Distinct chunks the snapshots reference.
    pub referenced_chunks: u64,
    /// Pack files before, and their total size.
    pub packs_before: u64,
    #[serde(rename = "packs_before_bytes")]
    pub bytes_before: u64,
    /// Packs deleted whole (no referenced chunk).
    pub packs_deleted: u64,
    /// Packs rewritten (their referenced chunks moved to new packs, then deleted).
    pub packs_rewritten: u64,
    /// New packs written by the rewrite.
    pub packs_written: u64,
    /// Pack files the index did not know (left by crashes), deleted.
    pub orphans_deleted: u64,
    /// Frames copied to new packs, and the chunk entries they hold.
    pub frames_moved: u64,
    pub chunks_moved: u64,
    /// Chunk entries removed from the repository.
    pub chunks_removed: u64,
    /// Frames removed (that the index knew), and their stored bytes.
    pub frames_removed: u64,
    #[serde(rename = "removed_chunk_bytes")]
    pub chunk_bytes_removed: u64,
    /// Pack files after, and their total size.
    pub packs_after: u64,
    #[serde(rename = "packs_after_bytes")]
    pub bytes_after: u64,
    #[serde(rename = "freed_bytes")]
    pub bytes_freed: u64,
    /// Unused record bytes left in packs below the `max_unused` threshold.
    #[serde(rename = "kept_unused_bytes")]
    pub unused_bytes_kept: u64,
    /// Verification records of snapshots that no longer exist, deleted.
    pub verification_records_removed: u64,
    /// Leftovers of interrupted or crashed runs removed (temporary objects, stale locks; see
    /// `verify::leftovers`), or that would be with `--dry-run`.
    pub leftovers_removed: u64,
    /// Whether deletion was two-phase (a shared store): packs found unused are condemned,
    /// and deleted by a later prune once the grace period has passed.
    pub two_phase: bool,
    /// The grace period, in seconds (two-phase only).
    pub grace_secs: u64,
    /// Packs this run condemned (named in its new condemnation record).
    pub packs_condemned: u64,
    /// Condemned packs still within the grace period, left for a later prune.
    pub condemned_waiting: u64,
    /// Condemned packs past the grace period that a snapshot references again: kept.
    pub condemned_reused: u64,
    /// Condemnation records deleted (all their packs dealt with).
    pub condemnation_records_removed: u64,
    /// Index deltas without a pack (left by a crash between prune's two deletions, or by a
    /// build without deltas) this run condemned, and those condemned long enough ago that it
    /// deleted (two-phase, like packs).
    pub orphan_deltas_condemned: u64,
    pub orphan_deltas_deleted: u64,
    /// With `--dry-run` on a shared store: the two-phase plan (what would be condemned, what
    /// would be deleted now, when the rest becomes deletable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<super::two_phase_plan::TwoPhasePlan>,
    /// Things prune left alone, with why (damaged packs, unindexed referenced chunks).
    pub problems: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    Keep,
    Delete,
    Rewrite,
}

/// A pack as prune sees it.
#[derive(Debug)]
struct PackUse {
    key: i64,
    name: String,
    size: u64,
    chunk_count: u64,
    version: u32,
    /// Referenced chunks the index places here.
    live_chunks: u64,
    /// Frames holding at least one of them, their chunk entries and stored bytes.
    live_frames: u64,
    live_frame_chunks: u64,
    live_stored: u64,
    plan: Plan,
}

impl PackUse {
    /// Bytes of the pack that are not header and footer: frames and table.
    fn record_bytes(&self) -> u64 {
        self.size.saturating_sub(PACK_FIXED_OVERHEAD)
    }

    /// Bytes the live frames take here (records and table entries).
    fn live_bytes(&self) -> u64 {
        frames_bytes(
            self.version,
            self.live_frames,
            self.live_stored,
            self.live_frame_chunks,
        )
    }

    fn unused_bytes(&self) -> u64 {
        self.record_bytes().saturating_sub(self.live_bytes())
    }
}

/// Bytes `frames` frames of `stored` stored bytes and `chunks` chunks in all take in a pack of
/// `version`: their records and their table entries.
fn frames_bytes(version: u32, frames: u64, stored: u64, chunks: u64) -> u64 {
    let records = if version == PACK_VERSION_SEALED {
        // A sealed frame's stored length is its whole record.
        stored
    } else if version == PACK_VERSION_V1 {
        frames * RECORD_HEADER_LEN as u64 + stored
    } else {
        frames * FRAME_HEADER_LEN as u64 + stored + chunks * FRAME_LIST_ENTRY_LEN as u64
    };
    records + chunks * table_entry_len(version) as u64
}

/// Per frame (pack, offset) of the index: whether any chunk the index places in it is
/// referenced (`live`), its stored length and chunk count. Needs `temp.prune_live`.
const FRAMES_SQL: &str = "SELECT c.pack AS pack, c.offset AS offset, \
     count(l.id) AS live, max(c.stored_len) AS stored, max(c.frame_chunks) AS n \
     FROM chunks c LEFT JOIN temp.prune_live l ON l.id = c.id GROUP BY c.pack, c.offset";

/// Prunes `repo`; see the module doc.
pub fn prune(repo: &Repo, options: &PruneOptions, progress: &dyn Progress) -> Result<PruneReport> {
    let started = Instant::now();
    let two_phase = repo.is_remote();
    let _lock = if options.dry_run {
        None
    } else if two_phase {
        Some(repo.lock_maintenance(crate::lock::lease::TWO_PHASE_PRUNE)?)
    } else {
        Some(repo.lock_maintenance("prune")?)
    };
    let mut report = PruneReport {
        dry_run: options.dry_run,
        two_phase,
        grace_secs: if two_phase {
            options.grace.as_secs()
        } else {
            0
        },
        ..Default::default()
    };
    if two_phase {
        return prune_two_phase(repo, options, progress, report, started);
    }

    // Everything on storage before we start, so packs we write are never taken for orphans.
    let stored = StoredPacks::list(repo)?;
    report.packs_before = stored.keys.len() as u64;
    report.bytes_before = stored.sizes.values().sum();

    let mut index = repo.index();
    let snapshots = collect_referenced(repo, &mut index)?;
    report.snapshots = snapshots.len() as u64;
    let path = index.path().to_path_buf();
    let err = sql_err(&path);
    let conn = index.conn_mut();
    let (referenced, unindexed) = count_referenced(conn, &err)?;
    report.referenced_chunks = referenced;
    let mut packs = plan_packs(conn, &err, options.max_unused, &mut report)?;
    let orphans = find_orphans(&stored, &packs, unindexed, &mut report);

    if options.dry_run {
        report.leftovers_removed = crate::verify::leftovers(repo)?
            .iter()
            .filter(|l| l.removable_by_prune())
            .count() as u64;
        plan_estimate(
            &packs,
            &orphans,
            &stored.sizes,
            repo,
            &mut report,
            conn,
            &err,
        )?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    let written = rewrite_packs(repo, conn, &err, &mut packs, progress, &mut report)?;
    let doomed: Vec<&PackUse> = packs.iter().filter(|p| p.plan != Plan::Keep).collect();
    unindex_packs(conn, &err, &doomed, &mut report)?;
    crate::crash::point("prune-index-updated");
    delete_packs(repo, &doomed, &orphans, progress, &mut report)?;
    report.verification_records_removed = remove_stray_verifications(repo, conn, &err, &snapshots)?;
    drop(index);
    report.leftovers_removed += remove_leftovers(repo)?;

    report.packs_written = written.len() as u64;
    let removed: u64 = doomed.iter().map(|p| p.size).sum::<u64>()
        + orphans
            .iter()
            .map(|(n, _)| stored.sizes.get(n).copied().unwrap_or(0))
            .sum::<u64>();
    report.bytes_after =
        report.bytes_before - removed.min(report.bytes_before) + written.iter().sum::<u64>();
    report.packs_after =
        report.packs_before + report.packs_written - (doomed.len() + orphans.len()) as u64;
    report.bytes_freed = report.bytes_before.saturating_sub(report.bytes_after);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Prune on a shared store (`format-spec/locks.md`, "Prune on a shared store"): backups may
/// run meanwhile, so nothing is deleted the moment it is found unused. Phase 2 first: the
/// packs of records older than the grace period that no manifest present references are
/// deleted (delta, then pack), then the records. Phase 1: the packs found unused now (after
/// copying the live frames of mostly-unused ones) are named in one new record, with the
/// deltas found without a pack. With `dry_run` nothing is written to the store (only this
/// host's cache of the index is brought up to date) and the report carries the plan.
fn prune_two_phase(
    repo: &Repo,
    options: &PruneOptions,
    progress: &dyn Progress,
    mut report: PruneReport,
    started: Instant,
) -> Result<PruneReport> {
    use super::two_phase_plan::{
        deletable_after, from_now, CondemnWhy, Deleted, PlannedCondemnation, PlannedDeletion,
        Waiting,
    };
    let dry = options.dry_run;
    let mut plan = super::two_phase_plan::TwoPhasePlan::default();
    // Learn every pack and manifest other hosts wrote; deltas again after the manifests, so
    // that every manifest seen has its packs indexed (deltas are written before manifests).
    repo.refresh()?;
    // Deltas listed before packs: a pack is stored before its delta, so a delta this listing
    // shows whose pack the next one lacks has truly lost its pack (not a backup in flight).
    let deltas: HashMap<String, String> = repo
        .backend()
        .list(crate::index::delta::DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|k| Some((crate::index::delta::pack_of_delta_key(&k)?.to_string(), k)))
        .collect();
    let stored = StoredPacks::list(repo)?;
    report.packs_before = stored.keys.len() as u64;
    report.bytes_before = stored.sizes.values().sum();
    let records = super::condemn::read_all(repo.backend(), repo.protection())?;
    let mut index = repo.index();
    let snapshots = collect_referenced(repo, &mut index)?;
    crate::index::delta::sync(&mut index, repo.backend(), repo.protection(), !dry)?;
    report.snapshots = snapshots.len() as u64;
    let path = index.path().to_path_buf();
    let err = sql_err(&path);
    let (referenced, mut unindexed) = count_referenced(index.conn_mut(), &err)?;
    report.referenced_chunks = referenced;

    // Phase 2: delete what was condemned long enough ago and is still unused.
    let ripe_after = options.grace + crate::lock::lease::CLOCK_SKEW;
    // A chunk stored twice is indexed at its first location only. A backup that used a pack
    // condemned under it copied those chunks to new packs; when this index still places
    // them in a condemned pack, it is rebuilt from the deltas with the condemned packs last,
    // so that each chunk is found where it will stay (else phase 1 would take the copies for
    // unused, and phase 2 the condemned pack for used).
    let condemned = super::condemn::packs_of(&records);
    let mut looks_live = false;
    for name in &condemned {
        looks_live |= live_rows_in(index.conn_mut(), &err, name)? > 0;
    }
    if looks_live {
        reindex_avoiding(&mut index, repo.backend(), repo.protection(), &condemned)?;
        unindexed = count_referenced(index.conn_mut(), &err)?.1;
    }
    let mut removed_bytes = 0u64;
    let mut still_condemned: HashSet<String> = HashSet::new();
    let mut deleted: HashSet<String> = HashSet::new();
    for record in &records {
        if record.age().is_none_or(|a| a < ripe_after) {
            report.condemned_waiting += record.body.packs.len() as u64;
            still_condemned.extend(record.body.packs.iter().cloned());
            let after = deletable_after(&record.body.time, ripe_after);
            plan.waiting
                .extend(record.body.packs.iter().map(|name| Waiting {
                    pack: name.clone(),
                    record: record.key.clone(),
                    deletable_after: after.clone(),
                }));
            continue;
        }
        let mut settled = true;
        for name in &record.body.packs {
            let Some(key) = stored.keys.get(name) else {
                // The pack is gone; a delta left without it goes now (it names nothing a
                // manifest can need: the pack was listed absent after the delta).
                if let Some(delta) = deltas.get(name) {
                    if dry {
                        plan.delete_now.push(PlannedDeletion {
                            pack: name.clone(),
                            object: Deleted::Delta,
                            record: record.key.clone(),
                        });
                    } else {
                        match repo.backend().remove(delta) {
                            Ok(()) | Err(Error::NotFound { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    report.orphan_deltas_deleted += 1;
                }
                continue;
            };
            if live_rows_in(index.conn_mut(), &err, name)? > 0 {
                report.condemned_reused += 1;
                continue;
            }
            if unindexed > 0 {
                // A referenced chunk the index lacks might live only in this pack.
                settled = false;
                still_condemned.insert(name.clone());
                continue;
            }
            crate::progress::checkpoint(progress, "prune-pack").map_err(|_| {
                Error::Cancelled(
                    "prune stopped; condemned packs not yet deleted stay condemned,                      the next prune deletes them"
                        .into(),
                )
            })?;
            if dry {
                plan.delete_now.push(PlannedDeletion {
                    pack: name.clone(),
                    object: Deleted::Pack,
                    record: record.key.clone(),
                });
            } else {
                repo.backend().remove(key)?;
                crate::crash::point("prune-pack-deleted");
                drop_pack_rows(index.conn_mut(), &err, name)?;
            }
            deleted.insert(name.clone());
            removed_bytes += stored.sizes.get(name).copied().unwrap_or(0);
            report.packs_deleted += 1;
        }
        if settled && !dry {
            match repo.backend().remove(&record.key) {
                Ok(()) | Err(Error::NotFound { .. }) => report.condemnation_records_removed += 1,
                Err(e) => return Err(e),
            }
        }
    }
    if unindexed > 0 {
        report.problems.push(format!(
            "{unindexed} referenced chunks are not in the index; condemned packs past the grace              period are kept until they are (run prune again)"
        ));
    }

    // Phase 1: condemn what is unused now. Packs already condemned are left as they are.
    let mut packs = plan_packs(index.conn_mut(), &err, options.max_unused, &mut report)?;
    for p in &mut packs {
        if still_condemned.contains(&p.name) {
            p.plan = Plan::Keep;
        }
    }
    let orphans: Vec<(String, String)> = find_orphans(&stored, &packs, unindexed, &mut report)
        .into_iter()
        .filter(|(n, _)| !still_condemned.contains(n) && !deleted.contains(n))
        .collect();
    let written = if dry {
        Vec::new()
    } else {
        rewrite_packs(
            repo,
            index.conn_mut(),
            &err,
            &mut packs,
            progress,
            &mut report,
        )?
    };
    // Deltas whose pack is not in the store and that no record names yet.
    let mut orphan_deltas: Vec<String> = deltas
        .keys()
        .filter(|n| {
            !stored.keys.contains_key(*n)
                && !still_condemned.contains(*n)
                && !deleted.contains(*n)
                && !condemned.contains(*n)
        })
        .cloned()
        .collect();
    orphan_deltas.sort();
    let mut condemn: Vec<(String, CondemnWhy)> = packs
        .iter()
        // (A dry run keeps the rows of what phase 2 would delete: not condemned again.)
        .filter(|p| {
            p.plan != Plan::Keep && stored.keys.contains_key(&p.name) && !deleted.contains(&p.name)
        })
        .map(|p| {
            let why = match p.plan {
                Plan::Rewrite => CondemnWhy::Rewritten,
                _ => CondemnWhy::Unused,
            };
            (p.name.clone(), why)
        })
        .chain(
            orphans
                .iter()
                .map(|(n, _)| (n.clone(), CondemnWhy::OrphanPack)),
        )
        .chain(
            orphan_deltas
                .iter()
                .map(|n| (n.clone(), CondemnWhy::OrphanDelta)),
        )
        .collect();
    condemn.sort_by(|a, b| a.0.cmp(&b.0));
    condemn.dedup_by(|a, b| a.0 == b.0);
    report.orphan_deltas_condemned = orphan_deltas.len() as u64;
    report.packs_condemned = (condemn.len() - orphan_deltas.len()) as u64;
    if dry {
        plan.condemned_now_deletable_after = from_now(ripe_after);
        plan.condemn = condemn
            .into_iter()
            .map(|(pack, why)| PlannedCondemnation { pack, why })
            .collect();
    } else if !condemn.is_empty() {
        super::condemn::write(
            repo.backend(),
            repo.protection(),
            condemn.into_iter().map(|(n, _)| n).collect(),
        )?;
    }
    report.packs_rewritten = packs.iter().filter(|p| p.plan == Plan::Rewrite).count() as u64;
    if !dry {
        report.verification_records_removed =
            remove_stray_verifications(repo, index.conn_mut(), &err, &snapshots)?;
    }
    drop(index);
    report.leftovers_removed = super::uploads::discard_old(repo, options.grace, dry)?;
    if dry {
        report.plan = Some(plan);
    }
    report.packs_written = written.len() as u64;
    report.bytes_after =
        report.bytes_before.saturating_sub(removed_bytes) + written.iter().sum::<u64>();
    report.packs_after =
        (report.packs_before + report.packs_written).saturating_sub(report.packs_deleted);
    report.bytes_freed = report.bytes_before.saturating_sub(report.bytes_after);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Rebuilds the pack and chunk rows of `index` from the deltas in the store (a pack's own
/// table when its delta is missing or damaged), adding the packs in `last` after all others,
/// so that a chunk they share with another pack is indexed in the other.
fn reindex_avoiding(
    index: &mut Index,
    backend: &dyn crate::store::Backend,
    protection: &crate::crypto::Protection,
    last: &HashSet<String>,
) -> Result<()> {
    use crate::index::delta::{open_delta, pack_of_delta_key, pack_of_pack_key, DELTAS_PREFIX};
    let deltas: HashMap<String, String> = backend
        .list(DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|k| pack_of_delta_key(&k).map(|n| (n.to_string(), k.clone())))
        .collect();
    let mut packs: Vec<(bool, String, u64)> = backend
        .list_with_sizes("packs/")?
        .into_iter()
        .filter_map(|o| pack_of_pack_key(&o.key).map(|n| (last.contains(n), n.to_string(), o.size)))
        .collect();
    packs.sort();
    index.replace_packs(|add| {
        for (_, name, size) in &packs {
            let from_delta = match deltas.get(name) {
                Some(key) => match backend
                    .get(key)
                    .and_then(|b| open_delta(protection, &b, key))
                {
                    Ok(d) if d.pack_size == *size => Some((d.pack_version, d.entries)),
                    Ok(_) => None,
                    Err(e) if e.is_corruption() || matches!(e, Error::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let (version, entries) = match from_delta {
                Some(d) => d,
                None => match crate::store::pack::read_pack_table(backend, protection, name) {
                    Ok(t) => (t.version, t.entries),
                    // Damaged: not indexed, as a rebuild leaves it (check reports it).
                    Err(e) if e.is_corruption() => continue,
                    Err(e) => return Err(e),
                },
            };
            add(name, *size, version, &entries)?;
        }
        Ok(())
    })
}

/// Referenced chunks (`temp.prune_live`) the index places in pack `name`.
fn live_rows_in(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    name: &str,
) -> Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM chunks c JOIN packs p ON p.id = c.pack          JOIN temp.prune_live l ON l.id = c.id WHERE p.name = ?1",
        [name],
        |r| r.get(0),
    )
    .map_err(err)
}

/// Removes pack `name` and its chunk rows from the index.
fn drop_pack_rows(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    name: &str,
) -> Result<()> {
    conn.execute(
        "DELETE FROM chunks WHERE pack IN (SELECT id FROM packs WHERE name = ?1)",
        [name],
    )
    .map_err(err)?;
    conn.execute("DELETE FROM packs WHERE name = ?1", [name])
        .map_err(err)?;
    Ok(())
}

/// Copies every frame of the stored packs `names` verbatim into new packs, stored with their
/// deltas and indexed so that the copied chunks' rows point at the copies. A backup uses this
/// for packs condemned under it (`condemn::before_manifest`). Returns the new packs' names.
pub(crate) fn copy_packs(repo: &Repo, names: &[String]) -> Result<Vec<String>> {
    let target = repo.config().pack_target_size as usize;
    let capacity = target + repo.config().chunker.max_chunk() as usize * 2;
    let mut index = repo.index();
    let path = index.path().to_path_buf();
    let err = sql_err(&path);
    let conn = index.conn_mut();
    let keys = repo.protection();
    let mut writer = PackWriter::new(capacity, keys)?;
    let mut moving: HashSet<ChunkId> = HashSet::new();
    let mut written = Vec::new();
    for name in names {
        let gone = |e: Error| {
            match e {
            Error::NotFound { .. } => Error::Locked(format!(
                "pack {name}, which this backup uses, was deleted by a prune while the backup                  ran (it outlasted the grace period); nothing was published: run the backup again"
            )),
            e => e,
        }
        };
        let table =
            crate::store::pack::read_pack_table(repo.backend(), keys, name).map_err(gone)?;
        let bytes = repo.backend().get(&pack_key(name)?).map_err(gone)?;
        let rows: Vec<Row> = table
            .entries
            .iter()
            .map(|e| Row {
                id: e.id,
                offset: e.offset,
                in_frame: e.in_frame,
                raw_len: e.raw_len,
                stored_len: e.stored_len,
                frame_raw_len: e.frame_raw_len,
                frame_chunks: 0,
                live: true,
            })
            .collect();
        for frame_rows in rows.chunk_by(|a, b| a.offset == b.offset) {
            let mut first = frame_rows[0];
            first.frame_chunks = frame_rows.len() as u32;
            let f = read_frame(&bytes, table.version, &first, frame_rows, keys, name)?;
            writer.add_frame(keys, &f.chunks, &f.stored, f.compression)?;
            moving.extend(f.indexed);
            if writer.len() >= target {
                let full = std::mem::replace(&mut writer, PackWriter::new(capacity, keys)?);
                let ids = std::mem::take(&mut moving);
                written.push(store_and_index(repo, conn, &err, full, &ids)?.1);
            }
        }
    }
    if !writer.is_empty() {
        written.push(store_and_index(repo, conn, &err, writer, &moving)?.1);
    }
    Ok(written)
}

/// The pack objects on storage when prune started, by pack name.
struct StoredPacks {
    /// Pack name to object key.
    keys: HashMap<String, String>,
    /// Pack name to object size.
    sizes: HashMap<String, u64>,
}

impl StoredPacks {
    /// Lists `packs/`. The listing carries the sizes: no request per pack on a remote store.
    fn list(repo: &Repo) -> Result<StoredPacks> {
        let mut keys = HashMap::new();
        let mut sizes = HashMap::new();
        for object in repo.backend().list_with_sizes("packs/")? {
            if let Some(name) = object.key.rsplit('/').next() {
                sizes.insert(name.to_string(), object.size);
                keys.insert(name.to_string(), object.key);
            }
        }
        Ok(StoredPacks { keys, sizes })
    }
}

/// Distinct chunks the snapshots reference (`temp.prune_live`), and how many of them the
/// index lacks.
fn count_referenced(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
) -> Result<(u64, i64)> {
    let referenced = conn
        .query_row("SELECT count(*) FROM temp.prune_live", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(err)? as u64;
    let unindexed: i64 = conn
        .query_row(
            "SELECT count(*) FROM temp.prune_live l \
             WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = l.id)",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    Ok((referenced, unindexed))
}

/// The plan: every indexed pack with its referenced share, to keep, delete or rewrite.
/// Counts the unused bytes left in kept packs.
fn plan_packs(
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    max_unused: f64,
    report: &mut PruneReport,
) -> Result<Vec<PackUse>> {
    let mut packs: Vec<PackUse> = {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT p.id, p.name, p.size, p.chunk_count, p.version, \
                 coalesce(sum(f.live), 0), count(f.pack), coalesce(sum(f.n), 0), \
                 coalesce(sum(f.stored), 0) \
                 FROM packs p LEFT JOIN ({FRAMES_SQL}) f ON f.pack = p.id AND f.live > 0 \
                 GROUP BY p.id ORDER BY p.id"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PackUse {
                    key: r.get(0)?,
                    name: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    chunk_count: r.get::<_, i64>(3)? as u64,
                    version: r.get(4)?,
                    live_chunks: r.get::<_, i64>(5)? as u64,
                    live_frames: r.get::<_, i64>(6)? as u64,
                    live_frame_chunks: r.get::<_, i64>(7)? as u64,
                    live_stored: r.get::<_, i64>(8)? as u64,
                    plan: Plan::Keep,
                })
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)?
    };
    for p in &mut packs {
        let unused = p.unused_bytes();
        p.plan = if p.live_chunks == 0 {
            Plan::Delete
        } else if unused > 0 && unused as f64 > max_unused * p.record_bytes() as f64 {
            Plan::Rewrite
        } else {
            report.unused_bytes_kept += unused;
            Plan::Keep
        };
    }
    Ok(packs)
}

/// Stored packs the index does not know, as `(name, key)` sorted: none while referenced
/// chunks are missing from the index (then the reason is a problem in the report).
fn find_orphans(
    stored: &StoredPacks,
    packs: &[PackUse],
    unindexed: i64,
    report: &mut PruneReport,
) -> Vec<(String, String)> {
    let indexed: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    let mut orphans: Vec<(String, String)> = stored
        .keys
        .iter()
        .filter(|(name, _)| !indexed.contains(name.as_str()))
        .map(|(n, k)| (n.clone(), k.clone()))
        .collect();
    orphans.sort();
    if unindexed > 0 {
        // A referenced chunk the index lacks may be in an orphan pack (an index that lost
        // rows): deleting orphans could destroy the only copy.
        report.problems.push(format!(
            "{unindexed} referenced chunks are not in the index (damage, see `stackvault check`); \
             {} orphan packs kept, run `stackvault index rebuild` first",
            orphans.len()
        ));
        orphans.clear();
    }
    orphans
}

/// Steps (1) and (2): copies the live frames of every pack planned for a rewrite, one old
/// pack at a time, into new packs, each stored and then indexed. A pack found damaged is
/// kept as it is (its plan becomes `Keep`). Returns the sizes of the packs written.
fn rewrite_packs(
    repo: &Repo,
    conn: &mut rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    packs: &mut [PackUse],
    progress: &dyn Progress,
    report: &mut PruneReport,
) -> Result<Vec<u64>> {
    let target = repo.config().pack_target_size as usize;
    let capacity = target + repo.config().chunker.max_chunk() as usize * 2;
    let rewrite_total: u64 = packs
        .iter()
        .filter(|p| p.plan == Plan::Rewrite)
        .map(|p| p.size)
        .sum();
    progress.start("prune", rewrite_total);
    let keys = repo.protection();
    let mut writer = PackWriter::new(capacity, keys)?;
    // Chunks of the open pack whose index rows move to it.
    let mut moving: HashSet<ChunkId> = HashSet::new();
    let mut written: Vec<u64> = Vec::new();
    for p in packs.iter_mut().filter(|p| p.plan == Plan::Rewrite) {
        // Stopped here, the packs written so far hold copies the index already uses; the old
        // packs stay whole and indexed for the rest: the next prune finishes the job.
        crate::progress::checkpoint(progress, "prune-pack").map_err(|_| {
            Error::Cancelled(format!(
                "prune stopped before deleting anything; {} new packs stored are kept, \
                 the next prune finishes the job",
                written.len()
            ))
        })?;
        match live_frames(repo, conn, err, p) {
            Ok(frames) => {
                for f in frames {
                    writer.add_frame(keys, &f.chunks, &f.stored, f.compression)?;
                    moving.extend(f.indexed);
                    report.frames_moved += 1;
                    report.chunks_moved += f.chunks.len() as u64;
                    if writer.len() >= target {
                        let fresh = PackWriter::new(capacity, keys)?;
                        let full = std::mem::replace(&mut writer, fresh);
                        let ids = std::mem::take(&mut moving);
                        written.push(store_and_index(repo, conn, err, full, &ids)?.0);
                    }
                }
            }
            Err(e) if e.is_corruption() => {
                report
                    .problems
                    .push(format!("pack {} kept as it is: {e}", p.name));
                p.plan = Plan::Keep;
            }
            Err(e) => return Err(e),
        }
        progress.advance(p.size);
    }
    if !writer.is_empty() {
        written.push(store_and_index(repo, conn, err, writer, &moving)?.0);
    }
    progress.finish();
    Ok(written)
}

/// Step (3): the packs to delete or rewritten leave the index, in one transaction that first
/// proves none of them still holds a referenced chunk.
fn unindex_packs(
    conn: &mut rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    doomed: &[&PackUse],
    report: &mut PruneReport,
) -> Result<()> {
    // Immediate: this transaction reads, then deletes. A deferred one would fail at once
    // with "database is locked" (no busy wait) if another connection committed in between,
    // such as a backup cataloguing a manifest while it opens the index.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    for p in doomed {
        let still_needed: i64 = tx
            .query_row(
                "SELECT count(*) FROM chunks c JOIN temp.prune_live l ON l.id = c.id \
                 WHERE c.pack = ?1",
                [p.key],
                |r| r.get(0),
            )
            .map_err(err)?;
        if still_needed > 0 {
            // Never reached by construction; rolling back keeps every pack.
            return Err(Error::Internal(format!(
                "prune stopped: pack {} still holds {still_needed} referenced chunks",
                p.name
            )));
        }
        // The rows left are those of the frames not copied.
        let (frames, bytes): (i64, i64) = tx
            .query_row(
                "SELECT count(*), coalesce(sum(stored), 0) FROM (SELECT \
                 max(stored_len) AS stored FROM chunks WHERE pack = ?1 GROUP BY offset)",
                [p.key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        report.frames_removed += frames as u64;
        report.chunk_bytes_removed += bytes as u64;
        tx.execute("DELETE FROM chunks WHERE pack = ?1", [p.key])
            .map_err(err)?;
        tx.execute("DELETE FROM packs WHERE id = ?1", [p.key])
            .map_err(err)?;
        // Chunk entries not copied, indexed here or not (a frame stored by two concurrent
        // backups is indexed only once): removed.
        report.chunks_removed += p.chunk_count.saturating_sub(p.live_frame_chunks);
    }
    tx.commit().map_err(err)
}

/// Step (4): the pack objects the index no longer names, then the orphans. A crash from
/// here on leaves orphans only.
fn delete_packs(
    repo: &Repo,
    doomed: &[&PackUse],
    orphans: &[(String, String)],
    progress: &dyn Progress,
    report: &mut PruneReport,
) -> Result<()> {
    let backend = repo.backend();
    for (done, p) in doomed.iter().enumerate() {
        // The index no longer names the packs left: stopped here, they are unreferenced
        // packs that `check` lists and the next prune deletes.
        crate::progress::checkpoint(progress, "prune-pack").map_err(|_| {
            Error::Cancelled(format!(
                "prune stopped; {done} of {} unused packs deleted, the next prune deletes the rest",
                doomed.len()
            ))
        })?;
        backend.remove(&pack_key(&p.name)?)?;
        crate::crash::point("prune-pack-deleted");
        match p.plan {
            Plan::Delete => report.packs_deleted += 1,
            _ => report.packs_rewritten += 1,
        }
    }
    for (_, key) in orphans {
        backend.remove(key)?;
        report.orphans_deleted += 1;
    }
    Ok(())
}

/// Removes the temporary objects interrupted runs left (stale locks went when the
/// maintenance lock was taken); returns how many.
fn remove_leftovers(repo: &Repo) -> Result<u64> {
    let mut removed = 0;
    for l in crate::verify::leftovers(repo)? {
        if l.kind == crate::verify::LeftoverKind::Temporary && l.removable_by_prune() {
            let path = repo.root().join(&l.path);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove leftover", &path, e)),
            }
        }
    }
    Ok(removed)
}

/// Syncs the catalogue with the manifests, refuses on any unreadable one, and fills
/// `temp.prune_live` with every chunk id they reference. Returns the snapshot ids.
fn collect_referenced(repo: &Repo, index: &mut Index) -> Result<HashSet<String>> {
    // A manifest stored by a backup that crashed before cataloguing it is a snapshot too.
    let problems = if repo.is_remote() {
        index::sync_shared_snapshots(index, repo.backend(), repo.protection())?
    } else {
        index::sync_snapshots(index, repo.backend(), repo.protection())?
    };
    if let Some(e) = problems.into_iter().next() {
        return Err(refuse(e));
    }
    let ids: HashSet<String> = index.snapshot_ids()?.into_iter().collect();
    let path = index.path().to_path_buf();
    let err = sql_err(&path);
    let conn = index.conn_mut();
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS prune_live (id BLOB PRIMARY KEY) WITHOUT ROWID;
         DELETE FROM temp.prune_live;",
    )
    .map_err(&err)?;
    for id in &ids {
        let manifest = repo.load_manifest(id).map_err(refuse)?;
        let tx = conn.transaction().map_err(&err)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO temp.prune_live (id) VALUES (?1)")
                .map_err(&err)?;
            for extents in manifest.segments() {
                for e in extents.map_err(refuse)? {
                    if let Extent::Chunk { id, .. } = e {
                        stmt.execute([&id.0[..]]).map_err(&err)?;
                    }
                }
            }
        }
        tx.commit().map_err(&err)?;
    }
    Ok(ids)
}

/// Prune deletes data: it must know every snapshot's needs, so damage stops it.
fn refuse(e: Error) -> Error {
    match e {
        Error::Corrupt {
            location,
            offset,
            what,
        } => Error::Corrupt {
            location,
            offset,
            what: format!(
                "{what}; prune deletes nothing while a snapshot cannot be read \
                 (see `stackvault check`)"
            ),
        },
        other => other,
    }
}

/// A frame prune copies into a new pack.
struct LiveFrame {
    /// (id, raw length) of every chunk in the frame, as its record lists them.
    chunks: Vec<(ChunkId, u32)>,
    compression: Compression,
    stored: Vec<u8>,
    /// Chunks whose index rows point at this frame (live or not): they move with it.
    indexed: Vec<ChunkId>,
}

/// An index row of a chunk of pack `p`.
#[derive(Clone, Copy)]
struct Row {
    id: ChunkId,
    offset: u64,
    in_frame: u32,
    raw_len: u32,
    stored_len: u32,
    frame_raw_len: u32,
    frame_chunks: u32,
    live: bool,
}

/// Reads pack `p` once and returns its frames that hold a referenced chunk, each checked
/// against its index rows and its crc32 (the stored bytes are copied, not decompressed).
fn live_frames(
    repo: &Repo,
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    p: &PackUse,
) -> Result<Vec<LiveFrame>> {
    let location = format!("pack {}", p.name);
    let bytes = repo.backend().get(&pack_key(&p.name)?)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.id, c.offset, c.in_frame, c.raw_len, c.stored_len, c.frame_raw_len, \
             c.frame_chunks, l.id IS NOT NULL FROM chunks c \
             LEFT JOIN temp.prune_live l ON l.id = c.id WHERE c.pack = ?1 \
             ORDER BY c.offset, c.in_frame",
        )
        .map_err(err)?;
    let raw_rows = stmt
        .query_map([p.key], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, u32>(5)?,
                r.get::<_, u32>(6)?,
                r.get::<_, bool>(7)?,
            ))
        })
        .map_err(err)?;
    let mut rows = Vec::new();
    for row in raw_rows {
        let (id, offset, in_frame, raw_len, stored_len, frame_raw_len, frame_chunks, live) =
            row.map_err(err)?;
        let offset = u64::try_from(offset)
            .map_err(|_| Error::corrupt(&location, 0, "negative frame offset in the index"))?;
        let id = ChunkId(<[u8; 32]>::try_from(id.as_slice()).map_err(|_| {
            Error::corrupt(&location, offset, "index row with a malformed chunk id")
        })?);
        rows.push(Row {
            id,
            offset,
            in_frame,
            raw_len,
            stored_len,
            frame_raw_len,
            frame_chunks,
            live,
        });
    }
    let mut out = Vec::new();
    for frame_rows in rows.chunk_by(|a, b| a.offset == b.offset) {
        if !frame_rows.iter().any(|r| r.live) {
            continue;
        }
        let first = &frame_rows[0];
        out.push(read_frame(
            &bytes,
            p.version,
            first,
            frame_rows,
            repo.protection(),
            &p.name,
        )?);
    }
    Ok(out)
}

/// Decodes the frame of `rows` (all at `first.offset`) out of the whole pack `pack` of
/// `version` (opening it when sealed).
fn read_frame(
    bytes: &[u8],
    version: u32,
    first: &Row,
    rows: &[Row],
    protection: &crate::crypto::Protection,
    pack: &str,
) -> Result<LiveFrame> {
    let location = &format!("pack {pack}");
    check_protection(version, protection, location, first.offset)?;
    let offset = first.offset;
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let beyond = || Error::corrupt(location, offset, "frame lies beyond the pack's end");
    let disagrees = || {
        Error::corrupt(
            location,
            offset,
            "frame header disagrees with the index (rebuild the index)",
        )
    };
    let len = usize::try_from(frame_record_len(
        version,
        first.stored_len,
        first.frame_chunks,
    ))
    .map_err(|_| beyond())?;
    let record = bytes
        .get(start..start.saturating_add(len))
        .filter(|r| r.len() == len)
        .ok_or_else(beyond)?;
    let opened;
    let (record, sealed) = if version == PACK_VERSION_SEALED {
        opened = open_sealed_frame(protection, pack, offset, record, location)?.0;
        (&opened[..], true)
    } else {
        (record, false)
    };
    let (chunks, compression, crc32, header_len, stored_len) = if version == PACK_VERSION_V1 {
        let h = decode_record_header_v1(&record[..RECORD_HEADER_LEN], offset, location)?;
        if rows.len() != 1 || h.id != first.id || h.stored_len != first.stored_len {
            return Err(disagrees());
        }
        (
            vec![(h.id, h.raw_len)],
            h.compression,
            h.crc32,
            RECORD_HEADER_LEN,
            h.stored_len,
        )
    } else {
        let h = decode_frame_header(&record[..FRAME_HEADER_LEN], offset, location)?;
        // A sealed frame's index row has the sealed length; the header inside is authentic.
        if (!sealed && h.stored_len != first.stored_len)
            || h.raw_len != first.frame_raw_len
            || h.chunk_count != first.frame_chunks
        {
            return Err(disagrees());
        }
        let list_at = FRAME_HEADER_LEN + h.stored_len as usize;
        let list = decode_frame_list(&record[list_at..], &h, offset + list_at as u64, location)?;
        (list, h.compression, h.crc32, FRAME_HEADER_LEN, h.stored_len)
    };
    // Every indexed chunk must be where its row says.
    let mut at = 0u32;
    let mut placed = HashMap::with_capacity(chunks.len());
    for (id, len) in &chunks {
        placed.insert(*id, (at, *len));
        at += len;
    }
    if rows
        .iter()
        .any(|r| placed.get(&r.id) != Some(&(r.in_frame, r.raw_len)))
    {
        return Err(disagrees());
    }
    let stored = &record[header_len..header_len + stored_len as usize];
    if crc32fast::hash(stored) != crc32 {
        return Err(Error::corrupt(
            location,
            offset + header_len as u64,
            format!("the frame of chunk {} fails its crc32", first.id.to_hex()),
        ));
    }
    Ok(LiveFrame {
        chunks,
        compression,
        stored: stored.to_vec(),
        indexed: rows.iter().map(|r| r.id).collect(),
    })
}

/// Stores a finished replacement pack, then indexes it, pointing the rows of the chunks in
/// `moving` at it. Returns its size and name.
fn store_and_index(
    repo: &Repo,
    conn: &mut rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    writer: PackWriter,
    moving: &HashSet<ChunkId>,
) -> Result<(u64, String)> {
    let pack = writer.finish(repo.protection())?;
    repo.backend().put(&pack_key(&pack.name)?, &pack.bytes)?;
    crate::crash::point("prune-pack-stored");
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    tx.execute(
        "INSERT INTO packs (name, size, chunk_count, version) VALUES (?1, ?2, ?3, ?4)",
        params![
            pack.name,
            pack.bytes.len() as i64,
            pack.entries.len() as i64,
            pack.version
        ],
    )
    .map_err(err)?;
    let key: i64 = tx
        .query_row("SELECT id FROM packs WHERE name = ?1", [&pack.name], |r| {
            r.get(0)
        })
        .map_err(err)?;
    {
        let mut stmt = tx
            .prepare_cached(index::INSERT_CHUNK_OR_REPLACE)
            .map_err(err)?;
        for frame in crate::format::pack::frames(&pack.entries) {
            for e in frame.iter().filter(|e| moving.contains(&e.id)) {
                stmt.execute(index::chunk_params(e, key, frame.len() as u32))
                    .map_err(err)?;
            }
        }
    }
    tx.commit().map_err(err)?;
    crate::crash::point("prune-pack-indexed");
    Ok((pack.bytes.len() as u64, pack.name))
}

/// Deletes verification records (objects and rows) whose snapshot no longer exists.
fn remove_stray_verifications(
    repo: &Repo,
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
    snapshots: &HashSet<String>,
) -> Result<u64> {
    let mut removed = 0;
    for key in repo.backend().list(VERIFICATIONS_PREFIX)? {
        let snapshot = key
            .strip_prefix(VERIFICATIONS_PREFIX)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        if !snapshots.contains(snapshot) {
            repo.backend().remove(&key)?;
            removed += 1;
        }
    }
    let mut stmt = conn
        .prepare("SELECT DISTINCT snapshot FROM verifications")
        .map_err(err)?;
    let cached: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(err)?;
    for s in cached.iter().filter(|s| !snapshots.contains(*s)) {
        conn.execute("DELETE FROM verifications WHERE snapshot = ?1", [s])
            .map_err(err)?;
    }
    Ok(removed)
}

/// Fills a dry run's report with what the plan would do.
fn plan_estimate(
    packs: &[PackUse],
    orphans: &[(String, String)],
    sizes: &HashMap<String, u64>,
    repo: &Repo,
    report: &mut PruneReport,
    conn: &rusqlite::Connection,
    err: &impl Fn(rusqlite::Error) -> Error,
) -> Result<()> {
    let target = u64::from(repo.config().pack_target_size).max(1);
    let mut moved_bytes = 0;
    let mut removed = 0;
    for p in packs.iter().filter(|p| p.plan != Plan::Keep) {
        match p.plan {
            Plan::Delete => report.packs_deleted += 1,
            _ => report.packs_rewritten += 1,
        }
        let dead: Option<(i64, i64)> = conn
            .query_row(
                &format!(
                    "SELECT count(*), coalesce(sum(f.stored), 0) FROM ({FRAMES_SQL}) f \
                     WHERE f.pack = ?1 AND f.live = 0"
                ),
                [p.key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let (frames, bytes) = dead.unwrap_or((0, 0));
        report.frames_removed += frames as u64;
        report.chunk_bytes_removed += bytes as u64;
        report.chunks_removed += p.chunk_count.saturating_sub(p.live_frame_chunks);
        report.frames_moved += p.live_frames;
        report.chunks_moved += p.live_frame_chunks;
        // Copied frames are written in the current format.
        moved_bytes += frames_bytes(
            pack_version_for(repo.protection()),
            p.live_frames,
            p.live_stored,
            p.live_frame_chunks,
        );
        removed += p.size;
    }
    report.orphans_deleted = orphans.len() as u64;
    removed += orphans
        .iter()
        .map(|(n, _)| sizes.get(n).copied().unwrap_or(0))
        .sum::<u64>();
    report.packs_written = moved_bytes.div_ceil(target);
    let written = moved_bytes + report.packs_written * PACK_FIXED_OVERHEAD;
    report.bytes_after = report.bytes_before - removed.min(report.bytes_before) + written;
    report.packs_after = (report.packs_before + report.packs_written)
        .saturating_sub(report.packs_deleted + report.packs_rewritten + report.orphans_deleted);
    report.bytes_freed = report.bytes_before.saturating_sub(report.bytes_after);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_unused_parses_percentages() -> Result<()> {
        assert_eq!(parse_max_unused("10%")?, 0.10);
        assert_eq!(parse_max_unused("0")?, 0.0);
        assert_eq!(parse_max_unused("100%")?, 1.0);
        for bad in ["", "ten", "-1%", "101%", "5%%x"] {
            assert!(parse_max_unused(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn overheads_match_the_pack_format() {
        assert_eq!(PACK_FIXED_OVERHEAD, 48);
        assert_eq!(CHUNK_OVERHEAD, 100);
        assert_eq!(FRAME_OVERHEAD, 24);
        // A frame of two chunks in a version 2 pack; a version 1 record with its entry.
        assert_eq!(frames_bytes(2, 1, 1000, 2), 24 + 1000 + 2 * 100);
        assert_eq!(frames_bytes(1, 1, 1000, 1), 48 + 1000 + 56);
    }
}
