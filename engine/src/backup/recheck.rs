//! The re-check before the manifest on a shared store (`format-spec/locks.md`, rule 2), read
//! while the last packs are still being stored.
//!
//! The re-check reads the condemned set again and lists `packs/`. Both are reads, and both
//! may begin as soon as every deduplication decision of the backup is made (the writer has
//! taken its last segment): from then on the set of packs the backup deduplicated against is
//! final, and the packs it still stores are new names no record made before they were
//! stored can name. So [`EarlyRecheck::start`] sends both while the last pack and its index
//! delta are uploaded, instead of one round trip after them.
//!
//! Invariants. The early reading decides alone only when it finds nothing to do: no pack in
//! its snapshot of the used packs (or in the parent's) is condemned, and every pack of that
//! snapshot it deduplicated against is listed. Anything else (a rescue to make, a pack
//! missing, a failed read) falls back to the sequential re-check after the stores, which
//! copies packs with no upload running beside it and reports as before. A pack stored after
//! the snapshot was stored after the early reading began, so a record naming it was written
//! after that too, and is deleted no sooner than a grace period later; the manifest follows
//! within [`EARLY_RECHECK_VALID`] of the reading's start (else the sequential re-check runs),
//! so that pack is referenced long before it can be deleted (the proof of rule 2, case (c)).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::dedup::Dedup;
use crate::error::{Error, Result};
use crate::repo::Repo;

/// How long after an early re-check began the manifest may still rely on it: the last
/// uploads must be done by then. Far below any grace period a prune accepts, so the case it
/// adds to the proof (a record written after the reading, naming a pack stored after the
/// snapshot) leaves the pack referenced well before that record is old enough.
pub(super) const EARLY_RECHECK_VALID: Duration = Duration::from_secs(10);

/// The reads of an early re-check, and the used packs they were checked against.
pub(super) struct EarlyRecheck {
    started: Instant,
    /// The packs the backup used when the reading began (deduplicated against, or stored).
    used: HashSet<String>,
    condemned: Result<HashSet<String>>,
    listed: Result<Vec<String>>,
}

impl EarlyRecheck {
    /// Reads the condemned set and lists `packs/` at once, on a shared store (`None` on a
    /// local repository, which needs no re-check). The caller has made every deduplication
    /// decision of the backup.
    pub(super) fn start(repo: &Repo, dedup: &Dedup) -> Option<EarlyRecheck> {
        let started = Instant::now();
        let used = dedup.used_packs()?;
        let (condemned, listed) = std::thread::scope(|scope| {
            let listing = scope.spawn(|| repo.backend().list("packs/"));
            let condemned = crate::maintain::condemn::read_all(repo.backend(), repo.protection())
                .map(|records| crate::maintain::condemn::packs_of(&records));
            let listed = listing
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("the packs listing panicked".into())));
            (condemned, listed)
        });
        Some(EarlyRecheck {
            started,
            used,
            condemned,
            listed,
        })
    }

    /// Whether this reading settles the re-check for a manifest whose parent is `parent`:
    /// recent enough, nothing condemned that the manifest may reference, and every pack
    /// deduplicated against still listed. `false` means: run the sequential re-check.
    pub(super) fn settles(&self, repo: &Repo, parent: Option<&str>) -> Result<bool> {
        if self.started.elapsed() > EARLY_RECHECK_VALID {
            return Ok(false);
        }
        let (Ok(condemned), Ok(listed)) = (&self.condemned, &self.listed) else {
            return Ok(false);
        };
        if !condemned.is_empty() {
            if self.used.iter().any(|p| condemned.contains(p)) {
                return Ok(false);
            }
            if let Some(parent) = parent {
                if !crate::maintain::condemn::parent_packs_in(repo, parent, condemned)?.is_empty() {
                    return Ok(false);
                }
            }
        }
        let stored: HashSet<&str> = listed
            .iter()
            .filter_map(|k| crate::index::delta::pack_of_pack_key(k))
            .collect();
        Ok(self.used.iter().all(|p| stored.contains(p.as_str())))
    }
}
