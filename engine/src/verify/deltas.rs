//! `check`'s comparison of the index deltas (`index/xx/<pack>`) with the packs they describe
//! (`format-spec/index-deltas.md`): every delta must decode and state exactly its pack's
//! size, version and chunk table; every pack a snapshot needs must have a delta (else other
//! hosts sharing the repository cannot learn it); and what is left over is weighed by age.
//!
//! The age rule (also in `format-spec/index-deltas.md`, "What check reports"): a backup
//! writes a pack, then its delta, then (much later) its manifest, so a pack without a delta,
//! or a pack and delta no manifest names, may be a backup in flight. Such orphans younger
//! than the grace period are normal and listed only; older ones are a warning (an interrupted
//! run left them; `prune` condemns and later removes them). A delta without a pack cannot be
//! in flight (its pack is written first): it is listed, and a warning once older than the
//! grace period. None of these is damage: no snapshot loses data. Damage (exit 3) is a delta
//! that disagrees with its pack, and a referenced pack without a delta on a repository that
//! depends on deltas (a remote one). Reading only: nothing here writes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::index::delta::DELTAS_PREFIX;
use crate::index::delta::{delta_key, open_delta, pack_of_delta_key, pack_of_pack_key};
use crate::repo::Repo;
use crate::store::pack::read_pack_table;
use crate::store::ObjectInfo;

use super::check::{Damage, DamageKind, Findings};

/// An index delta whose pack is not in the store.
#[derive(Clone, Debug, Serialize)]
pub struct OrphanDelta {
    /// The pack name the delta's key names.
    pub pack: String,
    pub key: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// Seconds since it was written, when the store says.
    #[serde(rename = "age_seconds")]
    pub age_secs: Option<u64>,
    /// Older than the grace period: a warning (prune removes it).
    pub overdue: bool,
}

/// What the comparison found besides damage (which goes to the check's findings).
#[derive(Debug, Default)]
pub(super) struct DeltaFindings {
    pub deltas: u64,
    pub orphan_deltas: Vec<OrphanDelta>,
    pub warnings: Vec<String>,
}

/// Compares deltas with packs. `referenced` are the names of packs holding a chunk some
/// snapshot needs; `grace` is the age after which orphans are a warning.
pub(super) fn compare(
    repo: &Repo,
    referenced: &HashSet<String>,
    grace: Duration,
    f: &mut Findings,
) -> Result<DeltaFindings> {
    let backend = repo.backend();
    let mut out = DeltaFindings::default();
    // Deltas first, then packs: a delta listed before its pack's listing is a delta whose
    // pack existed (packs are written first), so "delta without pack" is never a race.
    let deltas: HashMap<String, ObjectInfo> = backend
        .list_with_sizes(DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|o| Some((pack_of_delta_key(&o.key)?.to_string(), o)))
        .collect();
    let packs: HashMap<String, ObjectInfo> = backend
        .list_with_sizes("packs/")?
        .into_iter()
        .filter_map(|o| Some((pack_of_pack_key(&o.key)?.to_string(), o)))
        .collect();
    out.deltas = deltas.len() as u64;
    let overdue = |o: &ObjectInfo| o.age().is_some_and(|a| a > grace);
    let age = |o: &ObjectInfo| {
        o.age()
            .map(|a| format!("{} s old", a.as_secs()))
            .unwrap_or_else(|| "of unknown age".into())
    };

    let mut names: Vec<&String> = packs.keys().collect();
    names.sort();
    for name in names {
        let pack = &packs[name];
        let Some(delta) = deltas.get(name) else {
            if referenced.contains(name) {
                if repo.is_remote() {
                    f.push(Damage {
                        kind: DamageKind::DeltaMissing,
                        location: delta_key(name),
                        pack: Some(name.clone()),
                        offset: None,
                        chunk: None,
                        what: "a snapshot needs this pack but it has no index delta, so other \
                               hosts cannot find its chunks; open the repository once with \
                               write access (any command, e.g. `stackvault snapshots`): that \
                               writes missing deltas from the packs' tables"
                            .into(),
                    });
                } else {
                    // A local repository's own index lists the pack; only a copy of the
                    // repository's objects to an object store would need the delta.
                    out.warnings.push(format!(
                        "pack {name} has no index delta (written by a build without deltas): \
                         harmless in a local repository, whose index lists the pack"
                    ));
                }
            } else if overdue(pack) {
                out.warnings.push(format!(
                    "pack {name} ({}) has no delta and no snapshot needs it: an interrupted \
                     backup left it (older than the grace period of {} s); `stackvault prune` \
                     removes it",
                    age(pack),
                    grace.as_secs()
                ));
            }
            continue;
        };
        if !referenced.contains(name) && overdue(pack) {
            out.warnings.push(format!(
                "pack {name} ({}) is used by no snapshot: an interrupted backup left it (older \
                 than the grace period of {} s); `stackvault prune` removes it",
                age(pack),
                grace.as_secs()
            ));
        }
        if let Some(why) = disagreement(repo, name, pack, delta)? {
            f.push(Damage {
                kind: DamageKind::DeltaMismatch,
                location: delta.key.clone(),
                pack: Some(name.clone()),
                offset: None,
                chunk: None,
                what: format!(
                    "{why}; other hosts would look for chunks in the wrong places. The pack's \
                     own table is authoritative: delete the object {}, and the next command \
                     opening the repository with write access writes it again from the pack",
                    delta.key
                ),
            });
        }
    }

    let mut orphans: Vec<(&String, &ObjectInfo)> = deltas
        .iter()
        .filter(|(name, _)| !packs.contains_key(*name))
        .collect();
    orphans.sort_by(|a, b| a.0.cmp(b.0));
    for (name, delta) in orphans {
        let late = overdue(delta);
        if late {
            out.warnings.push(format!(
                "index delta {} ({}) names a pack that is not in the store (older than the \
                 grace period of {} s); `stackvault prune` removes it",
                delta.key,
                age(delta),
                grace.as_secs()
            ));
        }
        out.orphan_deltas.push(OrphanDelta {
            pack: name.clone(),
            key: delta.key.clone(),
            size: delta.size,
            age_secs: delta.age().map(|a| a.as_secs()),
            overdue: late,
        });
    }
    Ok(out)
}

/// Why the delta of pack `name` disagrees with the pack, or `None` when it agrees (or cannot
/// be decoded: that is the records check's damage); a pack whose table cannot be read is the pack check's
/// damage, not the delta's.
fn disagreement(
    repo: &Repo,
    name: &str,
    pack: &ObjectInfo,
    delta: &ObjectInfo,
) -> Result<Option<String>> {
    let backend = repo.backend();
    let bytes = match backend.get(&delta.key) {
        Ok(b) => b,
        // Removed by a prune since the listing: nothing to compare.
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let decoded = match open_delta(repo.protection(), &bytes, &delta.key) {
        Ok(d) => d,
        // A delta that does not authenticate or decode is reported once, as `index-delta`,
        // by the records check (`records.rs`), which reads every delta.
        Err(e) if e.is_corruption() => return Ok(None),
        Err(e) => return Err(e),
    };
    if decoded.pack_size != pack.size {
        return Ok(Some(format!(
            "the delta states a pack of {} bytes, the pack is {} bytes",
            decoded.pack_size, pack.size
        )));
    }
    let table = match read_pack_table(backend, repo.protection(), name) {
        Ok(t) => t,
        Err(e) if e.is_corruption() => return Ok(None),
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    if decoded.pack_version != table.version {
        return Ok(Some(format!(
            "the delta states pack format version {}, the pack has {}",
            decoded.pack_version, table.version
        )));
    }
    if decoded.entries.len() != table.entries.len() {
        return Ok(Some(format!(
            "the delta lists {} chunks, the pack's table {}",
            decoded.entries.len(),
            table.entries.len()
        )));
    }
    if let Some(at) = decoded
        .entries
        .iter()
        .zip(&table.entries)
        .position(|(d, t)| d != t)
    {
        return Ok(Some(format!(
            "entry {at} of the delta differs from the pack's table"
        )));
    }
    Ok(None)
}
