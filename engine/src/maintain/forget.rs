//! Retention: decide which snapshots to keep ([`apply_policy`]) and forget the others
//! ([`forget`]).
//!
//! The policy is a pure function of the snapshot list, the policy and the current time (an
//! injected clock), applied to each disk on its own, the way restic does it: snapshots are
//! walked newest first; `keep_last` keeps the first N; each calendar rule (hourly, daily,
//! weekly by ISO 8601 week, monthly, yearly) keeps the newest snapshot of each of its N most
//! recent periods that have snapshots; `keep_within` keeps everything younger than the
//! duration, measured from `now`. A snapshot is kept when any rule keeps it, and the decision
//! lists every rule that did. Ties (equal times) are broken by id, so decisions are
//! deterministic. A snapshot whose time cannot be read is always kept.
//!
//! Forgetting removes a snapshot's catalogue row, then its manifest, then its verification
//! records. The order makes a crash harmless: a manifest without a row is catalogued again
//! on the next open (the forget is undone and can be repeated); the reverse, a row without a
//! manifest, is what `check` reports as damage, so it must never be left behind. A concurrent
//! `Repo::open` that re-catalogues the manifest in the moment between the two deletions is
//! handled on both sides: forget deletes the row once more after the manifest, and the
//! catalogue sync drops a row it just added when the manifest has gone meanwhile.
//!
//! Forgetting never deletes chunk data (that is [`prune`](mod@crate::maintain::prune)'s job),
//! and since every manifest is a complete disk map, removing a snapshot never breaks another:
//! a remaining incremental or differential snapshot whose parent goes keeps restoring on its
//! own; its parent link becomes informational, and the report names it. Forget takes a writer lock
//! (`forget-…`), so it never runs while prune decides what is referenced.
//!
//! A VM snapshot (`crate::vm`, `format-spec/vm.md`) is a unit: without `--disk`, the policy
//! decides on each VM's snapshots as if the VM were one disk, and its disk snapshots are kept
//! or removed together (the record first, so a crash leaves ordinary disk snapshots, never a
//! record naming forgotten ones). With `--disk`, snapshots that belong to a VM snapshot are
//! kept. Forgetting one named disk snapshot of a VM snapshot is refused unless forced, which
//! drops the VM snapshot record and leaves its other disks as ordinary disk snapshots.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::format::manifest::SnapshotKind;
use crate::format::verification::VERIFICATIONS_PREFIX;
use crate::format::{SnapshotId, VmSnapshotId};
use crate::index::{sql_err, SnapshotSummary};
use crate::repo::Repo;
use crate::store::snapshot_key;
use crate::vm::VmSnapshot;

/// How many snapshots to keep, per disk. Zero means "this rule keeps nothing".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPolicy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Keep every snapshot younger than this (relative to `now`).
    #[serde(with = "opt_secs")]
    pub keep_within: Option<time::Duration>,
}

mod opt_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.whole_seconds()),
            None => s.serialize_none(),
        }
    }
}

impl RetentionPolicy {
    /// True when no rule is set: such a policy would remove everything, and is refused.
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_within.is_none()
    }
}

/// Parses a duration such as `7d`, `36h`, `2w` or `1w3d12h` (units: h, d, w).
pub fn parse_duration(s: &str) -> Result<time::Duration> {
    let bad = || {
        Error::Usage(format!(
            "duration {s:?}: expected numbers with units h, d or w, like 7d, 36h or 1w3d"
        ))
    };
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        let unit = match c {
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(time::Duration::seconds(total))
}

/// What the policy needs to know of a snapshot: a disk snapshot (`Id` = [`SnapshotId`]), or
/// a VM snapshot decided as one unit (`Id` = [`VmSnapshotId`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<Id = SnapshotId> {
    pub id: Id,
    pub disk: String,
    /// RFC 3339 UTC, as in the manifest.
    pub time: String,
}

impl From<&SnapshotSummary> for Candidate {
    fn from(s: &SnapshotSummary) -> Self {
        Candidate {
            id: s.id.clone(),
            disk: s.meta.disk.clone(),
            time: s.meta.time.clone(),
        }
    }
}

/// The policy's verdict on one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision<Id = SnapshotId> {
    #[serde(rename = "snapshot_id")]
    pub id: Id,
    pub disk: String,
    pub time: String,
    pub keep: bool,
    /// Every rule that keeps it (`last`, `hourly 2026-11-25T13`, `daily 2026-11-25`,
    /// `weekly 2026-W48`, `monthly 2026-11`, `yearly 2026`, `within 7d`); empty when removed.
    pub reasons: Vec<String>,
}

/// A calendar rule: how many periods it keeps, and the period a time falls in.
struct Bucket {
    name: &'static str,
    count: u32,
    period: fn(OffsetDateTime) -> String,
    last: Option<String>,
}

/// Applies `policy` to each disk's snapshots separately. Returns one decision per snapshot,
/// grouped by disk (disks in name order), newest first within a disk.
pub fn apply_policy<Id: Clone + Ord>(
    snapshots: &[Candidate<Id>],
    policy: &RetentionPolicy,
    now: OffsetDateTime,
) -> Vec<Decision<Id>> {
    let mut by_disk: BTreeMap<&str, Vec<&Candidate<Id>>> = BTreeMap::new();
    for s in snapshots {
        by_disk.entry(s.disk.as_str()).or_default().push(s);
    }
    let mut out = Vec::with_capacity(snapshots.len());
    for (_, mut group) in by_disk {
        // Times have a fixed width (six fractional digits, `Z`), so text order is time order;
        // equal times fall back to the id so the choice is deterministic.
        group.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
        out.extend(decide_disk(&group, policy, now));
    }
    out
}

fn decide_disk<Id: Clone>(
    group: &[&Candidate<Id>],
    policy: &RetentionPolicy,
    now: OffsetDateTime,
) -> Vec<Decision<Id>> {
    let mut buckets = [
        Bucket {
            name: "hourly",
            count: policy.keep_hourly,
            period: |t| {
                format!(
                    "{:04}-{:02}-{:02}T{:02}",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour()
                )
            },
            last: None,
        },
        Bucket {
            name: "daily",
            count: policy.keep_daily,
            period: |t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
            last: None,
        },
        Bucket {
            name: "weekly",
            count: policy.keep_weekly,
            period: |t| {
                let (year, week, _) = t.to_iso_week_date();
                format!("{year:04}-W{week:02}")
            },
            last: None,
        },
        Bucket {
            name: "monthly",
            count: policy.keep_monthly,
            period: |t| format!("{:04}-{:02}", t.year(), u8::from(t.month())),
            last: None,
        },
        Bucket {
            name: "yearly",
            count: policy.keep_yearly,
            period: |t| format!("{:04}", t.year()),
            last: None,
        },
    ];
    let mut last_left = policy.keep_last;
    let mut out = Vec::with_capacity(group.len());
    for s in group {
        let mut reasons = Vec::new();
        let time = OffsetDateTime::parse(&s.time, &Rfc3339)
            .ok()
            .map(|t| t.to_offset(time::UtcOffset::UTC));
        if last_left > 0 {
            last_left -= 1;
            reasons.push("last".to_string());
        }
        match time {
            None => reasons.push("time unreadable, kept".to_string()),
            Some(t) => {
                if let Some(within) = policy.keep_within {
                    if now - t <= within {
                        reasons.push(format!("within {}", human_duration(within)));
                    }
                }
                for b in &mut buckets {
                    if b.count == 0 {
                        continue;
                    }
                    let period = (b.period)(t);
                    if b.last.as_deref() != Some(period.as_str()) {
                        b.count -= 1;
                        reasons.push(format!("{} {period}", b.name));
                        b.last = Some(period);
                    }
                }
            }
        }
        out.push(Decision {
            id: s.id.clone(),
            disk: s.disk.clone(),
            time: s.time.clone(),
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    out
}

fn human_duration(d: time::Duration) -> String {
    let s = d.whole_seconds();
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// A snapshot that was (or, in a dry run, would be) removed.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub disk: String,
    pub time: String,
}

/// A remaining snapshot whose parent was removed: it still restores on its own (manifests
/// are complete disk maps); its parent link is now informational.
#[derive(Clone, Debug, Serialize)]
pub struct ParentGone {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub disk: String,
    pub kind: SnapshotKind,
    pub parent: SnapshotId,
}

/// The outcome of `forget`.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// The policy's decisions (absent when snapshots were named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<Decision>>,
    pub removed: Vec<Removed>,
    pub kept: u64,
    pub parent_removed: Vec<ParentGone>,
    /// Verification records deleted with their snapshots.
    pub verification_records_removed: u64,
    /// VM snapshot records removed (or, in a dry run, that would be), by id.
    pub vm_snapshots_removed: Vec<VmSnapshotId>,
}

/// The real clock, for callers of [`forget_by_policy`] outside tests.
pub fn now_utc() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Forgets the snapshots that `policy` does not keep (of `disk`, or of every disk), with
/// `now` as the current time.
pub fn forget_by_policy(
    repo: &Repo,
    disk: Option<&str>,
    policy: &RetentionPolicy,
    now: OffsetDateTime,
    dry_run: bool,
) -> Result<ForgetReport> {
    if policy.is_empty() {
        return Err(Error::Usage(
            "no retention rule given: pass at least one --keep-* option (or name snapshots)".into(),
        ));
    }
    let lock = if dry_run {
        None
    } else {
        Some(repo.lock("forget")?)
    };
    let all = repo.snapshots(disk)?;
    let vms: Vec<VmSnapshot> = crate::vm::vm_snapshots(repo, None)?;
    let members: BTreeMap<&str, Vec<&VmSnapshot>> = {
        let mut m: BTreeMap<&str, Vec<&VmSnapshot>> = BTreeMap::new();
        for v in &vms {
            for d in &v.record.disks {
                m.entry(d.snapshot_id.as_str()).or_default().push(v);
            }
        }
        m
    };
    let candidates: Vec<Candidate> = all
        .iter()
        .filter(|s| !members.contains_key(s.id.as_str()))
        .map(Candidate::from)
        .collect();
    let mut decisions = apply_policy(&candidates, policy, now);
    let mut vm_gone: BTreeSet<&VmSnapshotId> = BTreeSet::new();
    if disk.is_none() {
        // Each VM's snapshots are decided as one history; every disk snapshot follows its VM
        // snapshot's decision.
        let units: Vec<Candidate<VmSnapshotId>> = vms
            .iter()
            .map(|v| Candidate {
                id: v.id.clone(),
                disk: format!("vm {}", v.record.vm),
                time: v.record.time.clone(),
            })
            .collect();
        let decided = apply_policy(&units, policy, now);
        for v in &vms {
            if decided.iter().any(|d| d.id == v.id && !d.keep) {
                vm_gone.insert(&v.id);
            }
        }
    }
    for s in &all {
        let Some(owners) = members.get(s.id.as_str()) else {
            continue;
        };
        // Kept while any VM snapshot it belongs to is kept.
        let keep = owners.iter().any(|v| !vm_gone.contains(&v.id));
        let reasons = if disk.is_some() {
            vec![format!(
                "part of VM snapshot {} of {} (VM snapshots are kept or removed as a unit: \
                 run forget without --disk)",
                owners[0].id.short(),
                owners[0].record.vm
            )]
        } else if keep {
            owners
                .iter()
                .filter(|v| !vm_gone.contains(&v.id))
                .map(|v| format!("VM snapshot {} of {} kept", v.id.short(), v.record.vm))
                .collect()
        } else {
            Vec::new()
        };
        decisions.push(Decision {
            id: s.id.clone(),
            disk: s.meta.disk.clone(),
            time: s.meta.time.clone(),
            keep: keep || disk.is_some(),
            reasons,
        });
    }
    // Grouped by disk again, newest first within a disk, as `apply_policy` returns them.
    decisions.sort_by(|a, b| {
        a.disk
            .cmp(&b.disk)
            .then_with(|| b.time.cmp(&a.time))
            .then_with(|| b.id.cmp(&a.id))
    });
    let remove: Vec<&SnapshotSummary> = {
        let gone: HashSet<&str> = decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.as_str())
            .collect();
        all.iter()
            .filter(|s| gone.contains(s.id.as_str()))
            .collect()
    };
    let vm_records: Vec<VmSnapshotId> = vm_gone.into_iter().cloned().collect();
    let mut report = remove_snapshots(repo, &vm_records, &remove, dry_run)?;
    report.decisions = Some(decisions);
    drop(lock);
    Ok(report)
}

/// Forgets the named snapshots (ids, unique prefixes or `latest`). A snapshot that belongs to
/// a VM snapshot is refused (see [`forget_named`]).
pub fn forget(repo: &Repo, queries: &[impl AsRef<str>], dry_run: bool) -> Result<ForgetReport> {
    forget_named(repo, queries, dry_run, false)
}

/// Forgets the named snapshots. One that belongs to a VM snapshot is refused unless `force`,
/// which removes the record of that VM snapshot first (its other disk snapshots stay, as
/// ordinary disk snapshots).
pub fn forget_named(
    repo: &Repo,
    queries: &[impl AsRef<str>],
    dry_run: bool,
    force: bool,
) -> Result<ForgetReport> {
    if queries.is_empty() {
        return Err(Error::Usage("no snapshot named".into()));
    }
    let lock = if dry_run {
        None
    } else {
        Some(repo.lock("forget")?)
    };
    let mut chosen: Vec<SnapshotSummary> = Vec::new();
    for q in queries {
        let s = repo.resolve_snapshot(q.as_ref(), None)?;
        if !chosen.iter().any(|c| c.id == s.id) {
            chosen.push(s);
        }
    }
    let members = crate::vm::membership(repo)?;
    let mut vm_records: Vec<VmSnapshotId> = Vec::new();
    for s in &chosen {
        let Some(owners) = members.get(s.id.as_str()) else {
            continue;
        };
        if !force {
            let (vm_id, vm) = &owners[0];
            return Err(Error::Usage(format!(
                "snapshot {} of disk {} belongs to VM snapshot {} of VM {vm}, whose disks are \
                 kept or removed together: forget VM snapshots with a --keep-* policy, or pass \
                 --force to forget this disk snapshot anyway (the VM snapshot {} is then \
                 dropped, its other disks stay as ordinary disk snapshots)",
                s.id.short(),
                s.meta.disk,
                vm_id.short(),
                vm_id.short()
            )));
        }
        for (vm_id, _) in owners {
            if !vm_records.contains(vm_id) {
                vm_records.push(vm_id.clone());
            }
        }
    }
    let refs: Vec<&SnapshotSummary> = chosen.iter().collect();
    let report = remove_snapshots(repo, &vm_records, &refs, dry_run)?;
    drop(lock);
    Ok(report)
}

/// Removes the VM snapshot records `vm_records`, then the disk snapshots `remove`: a crash in
/// between leaves ordinary disk snapshots, never a record naming forgotten ones.
fn remove_snapshots(
    repo: &Repo,
    vm_records: &[VmSnapshotId],
    remove: &[&SnapshotSummary],
    dry_run: bool,
) -> Result<ForgetReport> {
    let gone: BTreeSet<&str> = remove.iter().map(|s| s.id.as_str()).collect();
    let mut records = 0;
    if !dry_run {
        for id in vm_records {
            crate::vm::remove_record(repo, id)?;
        }
        for s in remove {
            records += remove_one(repo, &s.id)?;
        }
    }
    let remaining: Vec<SnapshotSummary> = repo
        .snapshots(None)?
        .into_iter()
        .filter(|s| !gone.contains(s.id.as_str()))
        .collect();
    let parent_removed = remaining
        .iter()
        .filter_map(|s| {
            let parent = s.meta.parent.as_ref()?;
            gone.contains(parent.as_str()).then(|| ParentGone {
                id: s.id.clone(),
                disk: s.meta.disk.clone(),
                kind: s.meta.kind,
                parent: parent.clone(),
            })
        })
        .collect();
    Ok(ForgetReport {
        dry_run,
        decisions: None,
        removed: remove
            .iter()
            .map(|s| Removed {
                id: s.id.clone(),
                disk: s.meta.disk.clone(),
                time: s.meta.time.clone(),
            })
            .collect(),
        kept: remaining.len() as u64,
        parent_removed,
        verification_records_removed: records,
        vm_snapshots_removed: vm_records.to_vec(),
    })
}

/// Removes one snapshot: row, manifest, row again, verification records (see the module
/// doc for why in this order). Returns the number of verification records removed.
fn remove_one(repo: &Repo, id: &str) -> Result<u64> {
    repo.index().remove_snapshot(id)?;
    crate::crash::point("forget-row-removed");
    repo.backend().remove(&snapshot_key(id))?;
    repo.index().remove_snapshot(id)?;
    remove_verifications(repo, id)
}

/// Deletes the verification records of snapshot `id` (objects and their cached rows).
pub(crate) fn remove_verifications(repo: &Repo, id: &str) -> Result<u64> {
    let prefix = format!("{VERIFICATIONS_PREFIX}{id}/");
    let keys = repo.backend().list(&prefix)?;
    {
        let mut index = repo.index();
        let path = index.path().to_path_buf();
        index
            .conn_mut()
            .execute("DELETE FROM verifications WHERE snapshot = ?1", [id])
            .map_err(sql_err(&path))?;
    }
    for key in &keys {
        repo.backend().remove(key)?;
    }
    Ok(keys.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    // Short names stand for ids here: the policy only orders and compares them.
    fn snap(id: &str, disk: &str, time: &str) -> Candidate<String> {
        Candidate {
            id: id.into(),
            disk: disk.into(),
            time: time.into(),
        }
    }

    /// Ids kept, in decision order.
    fn kept(d: &[Decision<String>]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    fn reasons<'a>(d: &'a [Decision<String>], id: &str) -> Vec<&'a str> {
        d.iter()
            .find(|d| d.id == id)
            .map(|d| d.reasons.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// One snapshot per `step_hours`, `n` of them, ids `s00`.. in time order, ending at
    /// `end` (a UTC time).
    fn series(n: u32, step_hours: i64, end: &str) -> Vec<Candidate<String>> {
        let end = at(end);
        (0..n)
            .map(|i| {
                let t = end - time::Duration::hours(step_hours * i64::from(n - 1 - i));
                snap(&format!("s{i:02}"), "vm", &rfc(t))
            })
            .collect()
    }

    fn rfc(t: OffsetDateTime) -> String {
        crate::host::rfc3339(t)
    }

    const NOW: &str = "2026-03-01T12:00:00.000000Z";

    #[test]
    fn keep_last_keeps_the_newest() {
        let snaps = series(5, 1, "2026-03-01T10:00:00.000000Z");
        let policy = RetentionPolicy {
            keep_last: 2,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        assert_eq!(kept(&d), ["s04", "s03"]);
        assert_eq!(reasons(&d, "s04"), ["last"]);
        assert_eq!(d.len(), 5);
        assert!(d.iter().filter(|d| !d.keep).all(|d| d.reasons.is_empty()));
    }

    #[test]
    fn hourly_and_daily_keep_the_newest_of_each_period() {
        // Every 20 minutes from 09:00 to 12:40 on one day, plus two the day before.
        let mut snaps: Vec<Candidate<String>> = (0..12)
            .map(|i| {
                let t = at("2026-02-10T09:00:00.000000Z") + time::Duration::minutes(20 * i);
                snap(&format!("a{i:02}"), "vm", &rfc(t))
            })
            .collect();
        snaps.push(snap("y1", "vm", "2026-02-09T08:00:00.000000Z"));
        snaps.push(snap("y2", "vm", "2026-02-09T23:59:59.999999Z"));
        let hourly = RetentionPolicy {
            keep_hourly: 3,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &hourly, at(NOW));
        // 12:40 (a11), 11:40 (a08), 10:40 (a05): the last of each of the three newest hours.
        assert_eq!(kept(&d), ["a11", "a08", "a05"]);
        assert_eq!(reasons(&d, "a08"), ["hourly 2026-02-10T11"]);
        let daily = RetentionPolicy {
            keep_daily: 5,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &daily, at(NOW));
        // Only two days have snapshots: the rule keeps one per day, not five.
        assert_eq!(kept(&d), ["a11", "y2"]);
    }

    #[test]
    fn weekly_uses_iso_weeks() {
        // 2026-01-01 is a Thursday: it belongs to ISO week 2026-W01, as do Mon 2025-12-29
        // and Sun 2026-01-04; Sat 2025-12-27 is in 2025-W52; 2021-01-03 (a Sunday) is
        // in 2020-W53.
        let snaps = vec![
            snap("w52", "vm", "2025-12-27T10:00:00.000000Z"),
            snap("mon", "vm", "2025-12-29T10:00:00.000000Z"),
            snap("thu", "vm", "2026-01-01T10:00:00.000000Z"),
            snap("sun", "vm", "2026-01-04T23:00:00.000000Z"),
            snap("nxt", "vm", "2026-01-05T00:30:00.000000Z"),
        ];
        let policy = RetentionPolicy {
            keep_weekly: 3,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        assert_eq!(kept(&d), ["nxt", "sun", "w52"]);
        assert_eq!(reasons(&d, "sun"), ["weekly 2026-W01"]);
        assert_eq!(reasons(&d, "w52"), ["weekly 2025-W52"]);
        let old = [snap("x", "vm", "2021-01-03T12:00:00.000000Z")];
        let d = apply_policy(&old, &policy, at(NOW));
        assert_eq!(reasons(&d, "x"), ["weekly 2020-W53"]);
    }

    #[test]
    fn monthly_and_yearly() {
        // One snapshot every 10 days for about three years.
        let snaps = series(110, 240, "2026-02-25T06:00:00.000000Z");
        let policy = RetentionPolicy {
            keep_monthly: 4,
            keep_yearly: 10,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        let keep: Vec<&Decision<String>> = d.iter().filter(|d| d.keep).collect();
        let months: Vec<&str> = keep
            .iter()
            .flat_map(|d| &d.reasons)
            .filter_map(|r| r.strip_prefix("monthly "))
            .collect();
        assert_eq!(months, ["2026-02", "2026-01", "2025-12", "2025-11"]);
        let years: Vec<&str> = keep
            .iter()
            .flat_map(|d| &d.reasons)
            .filter_map(|r| r.strip_prefix("yearly "))
            .collect();
        assert_eq!(years, ["2026", "2025", "2024", "2023"]);
        // The newest snapshot carries both reasons; each kept one is the newest of its month.
        assert_eq!(reasons(&d, "s109"), ["monthly 2026-02", "yearly 2026"]);
        for k in &keep {
            let month = &k.time[..7];
            let newest = d.iter().find(|x| x.time.starts_with(month));
            assert_eq!(newest.map(|x| x.id.as_str()), Some(k.id.as_str()));
        }
        // 4 months + the newest of 2024 and 2023 (the newest of 2026 and 2025 are already
        // kept as monthly ones).
        assert_eq!(reasons(&d, "s103"), ["monthly 2025-12", "yearly 2025"]);
        assert_eq!(keep.len(), 6);
    }

    #[test]
    fn keep_within_is_relative_to_now() {
        let snaps = series(10, 24, "2026-03-01T11:00:00.000000Z");
        let policy = RetentionPolicy {
            keep_within: Some(time::Duration::days(3)),
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        // 1 h, 25 h and 49 h old are kept; s06 is 3 d 1 h old and goes.
        assert_eq!(kept(&d), ["s09", "s08", "s07"]);
        assert_eq!(reasons(&d, "s07"), ["within 3d"]);
        // A clock further on removes more: nothing is younger than 3 days a year later.
        let later = apply_policy(&snaps, &policy, at("2027-03-01T00:00:00.000000Z"));
        assert!(kept(&later).is_empty());
    }

    #[test]
    fn combinations_keep_the_union_with_every_reason() {
        let snaps = series(48, 1, "2026-03-01T11:30:00.000000Z");
        let policy = RetentionPolicy {
            keep_last: 2,
            keep_hourly: 3,
            keep_daily: 2,
            keep_within: Some(time::Duration::hours(1)),
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        assert_eq!(kept(&d), ["s47", "s46", "s45", "s35"]);
        assert_eq!(
            reasons(&d, "s47"),
            [
                "last",
                "within 1h",
                "hourly 2026-03-01T11",
                "daily 2026-03-01"
            ]
        );
        assert_eq!(reasons(&d, "s46"), ["last", "hourly 2026-03-01T10"]);
        assert_eq!(reasons(&d, "s45"), ["hourly 2026-03-01T09"]);
        // s35 is 2026-02-28T23:30, the newest of the day before.
        assert_eq!(reasons(&d, "s35"), ["daily 2026-02-28"]);
    }

    #[test]
    fn disks_are_judged_separately() {
        let mut snaps = series(3, 1, "2026-03-01T10:00:00.000000Z");
        // A second disk backed up long ago still keeps its newest.
        snaps.push(snap("b1", "db", "2020-01-01T00:00:00.000000Z"));
        snaps.push(snap("b2", "db", "2020-01-02T00:00:00.000000Z"));
        let policy = RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        assert_eq!(kept(&d), ["b2", "s02"]);
        let disks: Vec<&str> = d.iter().map(|d| d.disk.as_str()).collect();
        assert_eq!(disks, ["db", "db", "vm", "vm", "vm"]);
    }

    #[test]
    fn ties_are_broken_by_id_and_unreadable_times_kept() {
        let t = "2026-02-20T10:00:00.000000Z";
        let snaps = vec![
            snap("aaa", "vm", t),
            snap("ccc", "vm", t),
            snap("bbb", "vm", t),
            snap("old", "vm", "2026-02-19T10:00:00.000000Z"),
            snap("bad", "vm", "yesterday"),
        ];
        let policy = RetentionPolicy {
            keep_daily: 1,
            ..Default::default()
        };
        let d = apply_policy(&snaps, &policy, at(NOW));
        // One of the three equal-time snapshots, the same one whatever the input order.
        assert_eq!(kept(&d), ["bad", "ccc"]);
        let mut reversed = snaps.clone();
        reversed.reverse();
        assert_eq!(kept(&apply_policy(&reversed, &policy, at(NOW))), kept(&d));
        assert_eq!(reasons(&d, "bad"), ["time unreadable, kept"]);
    }

    #[test]
    fn durations_parse() -> Result<()> {
        assert_eq!(parse_duration("7d")?, time::Duration::days(7));
        assert_eq!(parse_duration("1w3d12h")?, time::Duration::hours(252));
        for bad in ["", "7", "d", "3m", "-1d", "0d", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(RetentionPolicy::default().is_empty());
        Ok(())
    }
}
