//! What `prune --dry-run` on a shared (remote) store would do: the two-phase plan
//! (`format-spec/locks.md`, "Prune on a shared store"). Phase 2 first: the condemned packs
//! (and deltas without a pack) old enough to be deleted now, and those that must wait, with
//! the moment each becomes deletable; then phase 1: what this run would condemn, and when that
//! would become deletable. A plan is computed by the same code as a real run, with every write
//! to the repository left out, so the two cannot drift apart.

use std::time::Duration;

use serde::Serialize;

/// Why a name would be condemned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CondemnWhy {
    /// An indexed pack no snapshot references.
    Unused,
    /// A mostly-unused pack whose live frames would be copied to new packs first.
    Rewritten,
    /// A pack the index does not know (an interrupted backup's).
    OrphanPack,
    /// An index delta whose pack is not in the store.
    OrphanDelta,
}

/// A name this run would condemn.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedCondemnation {
    pub pack: String,
    pub why: CondemnWhy,
}

/// What a deletion would remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deleted {
    /// The pack and its delta (delta first).
    Pack,
    /// A delta whose pack is already gone.
    Delta,
}

/// A condemned name past the grace period that this run would delete now.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedDeletion {
    pub pack: String,
    pub object: Deleted,
    /// The condemnation record naming it.
    pub record: String,
}

/// A condemned name still within the grace period.
#[derive(Clone, Debug, Serialize)]
pub struct Waiting {
    pub pack: String,
    pub record: String,
    /// When a prune may delete it (record time + grace + clock skew), RFC 3339 UTC; `null`
    /// when the record's time is unreadable (it then never ripens: see `condemn::Record::age`).
    pub deletable_after: Option<String>,
}

/// The two-phase plan of a dry run on a shared store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TwoPhasePlan {
    /// Phase 1: names this run would condemn (one new record).
    pub condemn: Vec<PlannedCondemnation>,
    /// When what this run condemns would become deletable (now + grace + clock skew).
    pub condemned_now_deletable_after: String,
    /// Phase 2: condemned names past the grace period, deleted now.
    pub delete_now: Vec<PlannedDeletion>,
    /// Condemned names still within the grace period, left for a later prune.
    pub waiting: Vec<Waiting>,
}

/// `t + ripe_after` in RFC 3339 UTC, from a record's RFC 3339 `time`.
pub(crate) fn deletable_after(time: &str, ripe_after: Duration) -> Option<String> {
    let t =
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()?;
    Some(crate::host::rfc3339(t + ripe_after))
}

/// Now + `ripe_after`, in RFC 3339 UTC.
pub(crate) fn from_now(ripe_after: Duration) -> String {
    crate::host::rfc3339(time::OffsetDateTime::now_utc() + ripe_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletable_after_adds_the_wait() {
        let t = deletable_after("2026-11-30T03:45:47Z", Duration::from_secs(630));
        assert_eq!(t.as_deref(), Some("2026-11-30T03:56:17.000000Z"));
        assert_eq!(deletable_after("yesterday", Duration::ZERO), None);
    }
}
