//! [`check`]: is the repository sound, and if not, what can no longer be restored? A check
//! runs as stages over one [`CheckRun`], each adding the damage it finds to the run's
//! findings, in this order (which is the order of the report):
//!
//! 1. structure: the index's own integrity and every manifest, each chunk a manifest names
//!    known to the index (`manifests`); the index against the packs in the store and their
//!    own tables, orphan packs (`packs`); index deltas against their packs
//!    ([`deltas`](super::deltas)); verification and VM snapshot records
//!    ([`records`](super::records));
//! 2. read-data (`--read-data`): every stored chunk, or those of a [`Subset`] of the packs,
//!    read back and hashed (`read_data`);
//! 3. affected ranges: every damaged chunk and manifest mapped to the snapshots and disk byte
//!    ranges it makes unrestorable (`affected`);
//! 4. [`leftovers`]: what interrupted or crashed runs left behind (temporary objects, stale
//!    locks, unfinished uploads), which is not damage and which `prune` removes.
//!
//! Nothing here writes to the repository (the manifest stage keeps its working set in a
//! temporary table of the index's connection). Damage is reported in the [`CheckReport`],
//! never as a panic; an `Err` means the check could not run.

mod affected;
mod leftovers;
mod manifests;
mod options;
mod packs;
mod read_data;
mod report;

use std::time::Instant;

use crate::error::Result;
use crate::progress::Progress;
use crate::repo::Repo;

pub use leftovers::{leftovers, Leftover, LeftoverKind, LEFTOVER_MIN_AGE_SECS};
pub use options::{CheckOptions, ReadData, ReadDataKind, Subset};
pub(super) use report::Findings;
pub use report::{AffectedRange, AffectedSnapshot, CheckReport, Damage, DamageKind, Orphan};

/// What every stage of one check shares: the repository, what was asked, and the damage
/// found so far.
struct CheckRun<'a> {
    repo: &'a Repo,
    options: &'a CheckOptions,
    progress: &'a dyn Progress,
    /// The index file, where index damage is reported (taken once: stages that scan the
    /// index hold its connection and must not ask the repository for it again).
    index_location: String,
    findings: Findings,
}

/// Checks the repository; see the module doc. Damage is reported in the result (`ok` false);
/// an `Err` means the check could not run.
pub fn check(repo: &Repo, options: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
    let started = Instant::now();
    let mut run = CheckRun {
        repo,
        options,
        progress,
        index_location: repo.index().path().display().to_string(),
        findings: Findings::default(),
    };
    manifests::index_integrity(&mut run)?;
    let references = manifests::scan_manifests(&mut run)?;
    let packs = packs::compare_packs(&mut run, &references.referenced_packs)?;
    let grace = options
        .grace
        .unwrap_or(crate::maintain::prune::DEFAULT_GRACE);
    let deltas = super::deltas::compare(repo, &packs.referenced, grace, &mut run.findings)?;
    for (kind, e) in super::records::damaged_records(repo)? {
        run.findings.add(kind, None, None, &e);
    }
    let read = read_data::read_data(&mut run, packs.sound)?;
    let affected = affected::affected_snapshots(repo, &references.ids, &run.findings)?;
    let leftovers = leftovers(repo)?;
    let f = run.findings;
    Ok(CheckReport {
        ok: f.damage_count == 0,
        snapshots: references.snapshots,
        packs: packs.packs,
        chunks: packs.chunks,
        read_data: options.read_data.kind(),
        read_data_subset: options.read_data.subset_text(),
        packs_read: read.packs_read,
        chunks_read: read.chunks_read,
        bytes_read: read.bytes_read,
        damage_count: f.damage_count,
        damage: f.damage,
        orphans: packs.orphans,
        deltas: deltas.deltas,
        orphan_deltas: deltas.orphan_deltas,
        warnings: deltas.warnings,
        leftovers,
        affected,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}
