//! `plan run`: back up what a protection plan says is due, then apply its retention, its
//! off-site copy and its standby targets.
//!
//! A VM is **due** when it has no complete VM snapshot, or its newest one started longer ago
//! than its application's RPO minus the plan's margin ([`Plan::due_margin`], a tenth of the
//! RPO unless `run.due_margin` says): a run from cron every few minutes then starts the next
//! backup before the RPO is exceeded rather than after. Due VMs start in plan order, at most
//! `run.concurrency` disks being read at once (a VM's disks are read together, so a VM takes
//! as many slots as it has disks, all of them when it has more), and at least `run.stagger`
//! apart. Each VM backup is [`backup_vm`](super::backup_vm): all or nothing.
//!
//! Invariants:
//! - One run per plan file and shard on a host at a time: the run holds an exclusive OS lock
//!   (`flock`) on a file in the per-user cache (`stackvault/plan-runs/`); a second run finds it
//!   held and stops at once, reporting `already_running`. Not the repository's lock: hosts of a
//!   fleet share one repository and must run their shards at the same time.
//! - Retention treats a VM snapshot as a unit, per VM: a VM snapshot the policy drops has its
//!   record removed first, then its disk snapshots (those no other VM snapshot names), the
//!   order `forget` uses. The same policy applies at the off-site copy.
//! - The off-site copy sends the disk snapshots of the plan's VMs with [`copy`](crate::copy())
//!   and then each VM snapshot record whose disk snapshots all arrived with the same ids, so a
//!   copy never holds a record naming a snapshot it lacks.
//! - `--dry-run` writes nothing and runs no hook.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use super::plan::{Hooks, Plan, PlannedVm, Retention, Shard, Span};
use super::{backup_vm, record, VmBackupOptions, VmDiskSource, VmSnapshot};
use crate::backup::BackupMode;
use crate::copy::CopyOptions;
use crate::error::{Error, Result};
use crate::format::{SnapshotId, VmSnapshotId};
use crate::host::now_rfc3339;
use crate::maintain::forget::{apply_policy, forget_named, Candidate};
use crate::progress::Progress;
use crate::repo::Repo;

/// Options of [`run`].
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Only this VM.
    pub vm: Option<String>,
    pub shard: Option<Shard>,
    pub dry_run: bool,
    /// Back up the selected VMs even when they are not due.
    pub force: bool,
}

/// What happened to one VM in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmAction {
    BackedUp,
    WouldBackUp,
    NotDue,
    Failed,
}

crate::name_enum! {
    /// When a plan's hook runs.
    pub enum HookPhase {
        Before => "before",
        After => "after",
        OnFailure => "on-failure",
    }
}

/// One hook that ran.
#[derive(Clone, Debug, Serialize)]
pub struct HookRun {
    pub phase: HookPhase,
    pub command: String,
    pub ok: bool,
    pub exit_code: Option<i32>,
    /// The last lines of its stderr, when it failed.
    pub stderr_tail: Option<String>,
    pub duration_ms: u64,
}

/// One standby target synced after a VM backup.
#[derive(Clone, Debug, Serialize)]
pub struct StandbyRun {
    pub disk: String,
    pub target: String,
    pub ok: bool,
    pub written_bytes: u64,
    pub error: Option<String>,
}

/// One VM of a run.
#[derive(Clone, Debug, Serialize)]
pub struct VmRunReport {
    pub application: String,
    pub vm: String,
    pub action: VmAction,
    /// Why it was (or was not) due.
    pub reason: String,
    /// Start time of its newest complete VM snapshot before the run.
    pub last_good: Option<String>,
    pub rpo_ms: u64,
    pub due_margin_ms: u64,
    pub vm_snapshot_id: Option<VmSnapshotId>,
    pub started: Option<String>,
    pub duration_ms: Option<u64>,
    pub hooks: Vec<HookRun>,
    pub standby: Vec<StandbyRun>,
    pub error: Option<String>,
}

/// Retention applied to one VM in one repository.
#[derive(Clone, Debug, Serialize)]
pub struct RetentionRun {
    /// `primary` or `copy`.
    pub repository: String,
    pub vm: String,
    /// VM snapshots the policy drops (removed, or that a dry run would remove).
    pub vm_snapshots_removed: Vec<VmSnapshotId>,
    pub disk_snapshots_removed: u64,
    pub kept: u64,
}

/// The off-site copy of a run.
#[derive(Clone, Debug, Serialize)]
pub struct CopyRun {
    pub destination: String,
    pub snapshots_copied: u64,
    pub snapshots_skipped: u64,
    pub vm_records_copied: u64,
    pub bytes_written: u64,
    pub errors: Vec<String>,
}

/// The report of `plan run` (`--json` serialises it).
#[derive(Clone, Debug, Serialize)]
pub struct PlanRunReport {
    pub plan: String,
    pub dry_run: bool,
    pub shard: Option<Shard>,
    /// Set when another run of this plan (and shard) held the run lock: nothing was done.
    pub already_running: Option<String>,
    pub due_rule: String,
    pub vms: Vec<VmRunReport>,
    pub retention: Vec<RetentionRun>,
    pub copy: Option<CopyRun>,
    /// VM backups, hooks, standby syncs, retention or copy steps that failed.
    pub failures: u64,
    pub duration_ms: u64,
}

/// Milliseconds from RFC 3339 time `t` to `now` (0 for a time in the future), or `None`.
pub(crate) fn age_ms(t: &str, now: OffsetDateTime) -> Option<u64> {
    let then = OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = (now - then).whole_milliseconds().max(0);
    Some(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The newest complete VM snapshot among `all`.
pub(crate) fn newest_complete<'a>(all: &'a [VmSnapshot], vm: &str) -> Option<&'a VmSnapshot> {
    all.iter()
        .filter(|s| s.complete && s.record.vm == vm)
        .max_by(|a, b| a.record.time.cmp(&b.record.time))
}

/// The held run lock; released when dropped (the file stays, empty of meaning).
struct RunLock(#[allow(dead_code)] File);

/// Takes the run lock of `plan_path` and `shard`, or says who holds it.
fn run_lock(
    plan_path: &Path,
    shard: Option<Shard>,
) -> Result<std::result::Result<RunLock, String>> {
    use rustix::fs::{flock, FlockOperation};
    use std::io::{Read, Seek, Write};
    let canonical = std::fs::canonicalize(plan_path).unwrap_or_else(|_| plan_path.to_path_buf());
    let key = format!(
        "{}{}",
        canonical.display(),
        shard.map_or(String::new(), |s| format!("#{}/{}", s.index, s.count))
    );
    let dir = crate::repo::cache_root()?
        .join("stackvault")
        .join("plan-runs");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let path = dir.join(format!(
        "{}.lock",
        &blake3::hash(key.as_bytes()).to_hex().as_str()[..32]
    ));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Ok(Err(format!(
            "another run of this plan{} is in progress ({}; lock {}); this one did nothing",
            shard.map_or(String::new(), |s| format!(
                " (shard {}/{})",
                s.index, s.count
            )),
            holder.trim(),
            path.display()
        )));
    }
    let who = format!("pid {} since {}", std::process::id(), now_rfc3339());
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(who.as_bytes()));
    written.map_err(|e| Error::io("write", &path, e))?;
    Ok(Ok(RunLock(file)))
}

/// The VMs a run considers: `--vm`, then the shard.
pub fn select<'p>(plan: &'p Plan, options: &RunOptions) -> Result<Vec<PlannedVm<'p>>> {
    let mut vms = match &options.vm {
        Some(name) => vec![plan.vm(name)?],
        None => plan.vms(),
    };
    if let Some(shard) = options.shard {
        vms.retain(|v| shard.contains(v.name()));
    }
    Ok(vms)
}

/// Disk slots: at most `concurrency` disks read at once.
struct Slots {
    free: Mutex<u32>,
    freed: Condvar,
}

impl Slots {
    fn take(&self, n: u32) {
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        while *free < n {
            free = match self.freed.wait(free) {
                Ok(f) => f,
                Err(_) => return,
            };
        }
        *free -= n;
    }

    fn give(&self, n: u32) {
        if let Ok(mut free) = self.free.lock() {
            *free = free.saturating_add(n);
        }
        self.freed.notify_all();
    }
}

/// Runs a hook with `sh -c`.
fn run_hook(phase: HookPhase, command: &str, app: &str, vm: &str) -> HookRun {
    let started = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("STACKVAULT_APPLICATION", app)
        .env("STACKVAULT_VM", vm)
        .env("STACKVAULT_PHASE", phase.as_str())
        .stdin(std::process::Stdio::null())
        .output();
    let (ok, exit_code, stderr_tail) = match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join("\n");
            (
                o.status.success(),
                o.status.code(),
                (!o.status.success()).then_some(tail),
            )
        }
        Err(e) => (false, None, Some(format!("cannot start sh: {e}"))),
    };
    HookRun {
        phase,
        command: command.to_string(),
        ok,
        exit_code,
        stderr_tail,
        duration_ms: super::millis(started),
    }
}

/// Backs up one due VM with its hooks and standby syncs, filling `report`.
fn back_up_vm(
    repo: &Repo,
    planned: PlannedVm<'_>,
    report: &mut VmRunReport,
    progress: &dyn Progress,
) {
    let app = planned.app.name.as_str();
    let vm = planned.name();
    let hooks: &Hooks = planned.hooks();
    let started = Instant::now();
    report.started = Some(now_rfc3339());
    let fail = |report: &mut VmRunReport, error: String| {
        report.action = VmAction::Failed;
        report.error = Some(error);
        if let Some(cmd) = &hooks.on_failure {
            report
                .hooks
                .push(run_hook(HookPhase::OnFailure, cmd, app, vm));
        }
    };
    if let Some(cmd) = &hooks.before {
        let h = run_hook(HookPhase::Before, cmd, app, vm);
        let ok = h.ok;
        report.hooks.push(h);
        if !ok {
            fail(
                report,
                "the hook before the backup failed; the VM was not backed up".into(),
            );
            report.duration_ms = Some(super::millis(started));
            return;
        }
    }
    let outcome = (|| -> Result<super::VmBackupReport> {
        let mut sources = Vec::with_capacity(planned.vm.disks.len());
        for d in &planned.vm.disks {
            let source = d.open(vm).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot open disk {} ({}): {e}",
                    d.name(),
                    d.shown()
                ))
            })?;
            sources.push((d.name().to_string(), source));
        }
        let disks = sources
            .iter()
            .map(|(name, s)| VmDiskSource {
                name: name.clone(),
                source: s.as_ref(),
                changes: None,
            })
            .collect();
        let options = VmBackupOptions {
            vm: vm.to_string(),
            mode: BackupMode::Auto,
            blob_snapshots_taken_together: planned.vm.blob_snapshots_taken_together,
        };
        backup_vm(repo, disks, &options, progress)
    })();
    match outcome {
        Err(e) => fail(report, format!("backup failed: {e}")),
        Ok(done) => {
            report.action = VmAction::BackedUp;
            report.vm_snapshot_id = Some(done.vm_snapshot_id.clone());
            if let Some(cmd) = &hooks.after {
                report.hooks.push(run_hook(HookPhase::After, cmd, app, vm));
            }
            for d in &planned.vm.disks {
                let Some(target) = &d.standby else {
                    continue;
                };
                let id = done
                    .disks
                    .iter()
                    .find(|r| r.disk == super::disk_name(vm, d.name()))
                    .map(|r| r.snapshot_id.clone());
                report
                    .standby
                    .push(sync_standby(repo, vm, d, target, id, progress));
            }
        }
    }
    report.duration_ms = Some(super::millis(started));
}

fn sync_standby(
    repo: &Repo,
    vm: &str,
    d: &super::plan::DiskPlan,
    target: &str,
    snapshot: Option<SnapshotId>,
    progress: &dyn Progress,
) -> StandbyRun {
    let result = (|| -> Result<u64> {
        let id = snapshot.ok_or_else(|| Error::Internal("no snapshot for the disk".into()))?;
        let summary = repo.resolve_snapshot(&id, None)?;
        let (_, blob) = super::plan::blob_access(
            target,
            d.standby_endpoint.as_deref(),
            d.standby_account_key_env.as_deref(),
            None,
            None,
            &format!("standby of disk {} of VM {vm}", d.name()),
        )?;
        let options = crate::standby::SyncOptions {
            blob,
            ..Default::default()
        };
        let r = crate::standby::sync(repo, &summary, target, &options, progress)?;
        Ok(r.written_bytes)
    })();
    match result {
        Ok(written_bytes) => StandbyRun {
            disk: d.name().to_string(),
            target: crate::azure::redact(target),
            ok: true,
            written_bytes,
            error: None,
        },
        Err(e) => StandbyRun {
            disk: d.name().to_string(),
            target: crate::azure::redact(target),
            ok: false,
            written_bytes: 0,
            error: Some(e.to_string()),
        },
    }
}

/// Applies `retention` to the VM snapshots of `vm` in `repo` (see the module doc).
pub fn apply_vm_retention(
    repo: &Repo,
    which: &str,
    vm: &str,
    retention: &Retention,
    now: OffsetDateTime,
    dry_run: bool,
) -> Result<RetentionRun> {
    let all = super::vm_snapshots(repo, None)?;
    let units: Vec<Candidate<VmSnapshotId>> = all
        .iter()
        .filter(|s| s.record.vm == vm)
        .map(|s| Candidate {
            id: s.id.clone(),
            disk: format!("vm {vm}"),
            time: s.record.time.clone(),
        })
        .collect();
    let decisions = apply_policy(&units, &retention.policy(), now);
    let gone: BTreeSet<&VmSnapshotId> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| &d.id)
        .collect();
    let mut run = RetentionRun {
        repository: which.to_string(),
        vm: vm.to_string(),
        vm_snapshots_removed: gone.iter().map(|&s| s.clone()).collect(),
        disk_snapshots_removed: 0,
        kept: u64::try_from(decisions.len().saturating_sub(gone.len())).unwrap_or(u64::MAX),
    };
    if dry_run || gone.is_empty() {
        return Ok(run);
    }
    // Disk snapshots still named by a VM snapshot that stays (of any VM) are not forgotten.
    let still_named: BTreeSet<&str> = all
        .iter()
        .filter(|s| !gone.contains(&s.id))
        .flat_map(|s| s.record.disks.iter().map(|d| d.snapshot_id.as_str()))
        .collect();
    let mut disk_snapshots = Vec::new();
    {
        let _lock = repo.lock("forget")?;
        for s in all.iter().filter(|s| gone.contains(&s.id)) {
            super::remove_record(repo, &s.id)?;
            disk_snapshots.extend(
                s.record
                    .disks
                    .iter()
                    .filter(|d| !still_named.contains(d.snapshot_id.as_str()))
                    .map(|d| d.snapshot_id.clone()),
            );
        }
    }
    let present: BTreeSet<SnapshotId> = repo.snapshots(None)?.into_iter().map(|s| s.id).collect();
    disk_snapshots.retain(|id| present.contains(id));
    if !disk_snapshots.is_empty() {
        let r = forget_named(repo, &disk_snapshots, false, false)?;
        run.disk_snapshots_removed = u64::try_from(r.removed.len()).unwrap_or(u64::MAX);
    }
    Ok(run)
}

/// Copies the snapshots of `vms` from `src` to `dst`, then their VM snapshot records.
fn copy_offsite(
    src: &Repo,
    dst: &Repo,
    destination: &str,
    vms: &[PlannedVm<'_>],
    progress: &dyn Progress,
) -> Result<CopyRun> {
    let mut run = CopyRun {
        destination: destination.to_string(),
        snapshots_copied: 0,
        snapshots_skipped: 0,
        vm_records_copied: 0,
        bytes_written: 0,
        errors: Vec::new(),
    };
    let disks_with_snapshots: BTreeSet<String> = src
        .snapshots(None)?
        .into_iter()
        .map(|s| s.meta.disk)
        .collect();
    // Source snapshot id → its copy's id: a copy into a repository that names chunks
    // differently (other keys, another chunker) is re-chunked and so renamed.
    let mut renamed: BTreeMap<SnapshotId, SnapshotId> = BTreeMap::new();
    for planned in vms {
        for d in &planned.vm.disks {
            let disk = super::disk_name(planned.name(), d.name());
            if !disks_with_snapshots.contains(&disk) {
                continue;
            }
            let options = CopyOptions {
                disk: Some(disk.clone()),
                snapshots: Vec::new(),
            };
            match crate::copy::copy(src, dst, &options, progress) {
                Ok(r) => {
                    renamed.extend(r.snapshots.iter().filter_map(|c| {
                        let there = c.destination_snapshot_id.clone()?;
                        Some((c.snapshot_id.clone(), there))
                    }));
                    run.snapshots_copied += r.snapshots_copied;
                    run.snapshots_skipped += r.snapshots_skipped;
                    run.bytes_written += r.bytes_written;
                    run.errors
                        .extend(r.errors.iter().map(|e| format!("disk {disk}: {e}")));
                }
                Err(e) => run.errors.push(format!("disk {disk}: {e}")),
            }
        }
    }
    let at_destination: BTreeMap<SnapshotId, String> = dst
        .snapshots(None)?
        .into_iter()
        .map(|s| (s.id, s.meta.root_digest))
        .collect();
    let records_there: BTreeSet<String> = dst
        .backend()
        .list(record::VMS_PREFIX)?
        .into_iter()
        .collect();
    let names: BTreeSet<&str> = vms.iter().map(|v| v.name()).collect();
    for s in super::vm_snapshots(src, None)? {
        if !names.contains(s.record.vm.as_str()) || !s.complete {
            continue;
        }
        // The record at the destination names the destination's disk snapshots (and their
        // root digests), and is encoded (sealed, named) with the destination's keys.
        let mut copied = s.record.clone();
        let mut missing = false;
        for d in &mut copied.disks {
            let there = renamed
                .get(&d.snapshot_id)
                .cloned()
                .unwrap_or_else(|| d.snapshot_id.clone());
            match at_destination.get(&there) {
                Some(root_digest) => {
                    d.snapshot_id = there;
                    d.root_digest = root_digest.clone();
                }
                None => missing = true,
            }
        }
        if missing {
            run.errors.push(format!(
                "VM snapshot {} of {}: not every disk snapshot arrived at the destination (a \
                 disk's copy failed); its record was not copied",
                s.id.short(),
                s.record.vm
            ));
            continue;
        }
        // Same naming keys (`init --like`) and so the same snapshot ids: the record keeps its
        // id, its plaintext sealed again as it is, not re-encoded.
        const VM_RECORD: crate::crypto::ObjectKind = crate::crypto::ObjectKind::VmSnapshot;
        let (bytes, id) = match copied == s.record {
            true => match crate::copy::reseal_named(src, dst, VM_RECORD, &s.id)? {
                Some(bytes) => (bytes, s.id.clone()),
                None => record::encode(&copied, dst.protection())?,
            },
            false => record::encode(&copied, dst.protection())?,
        };
        let key = record::key(&id);
        if records_there.contains(&key) {
            continue;
        }
        match dst.backend().put(&key, &bytes) {
            Ok(()) => run.vm_records_copied += 1,
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(run)
}

/// Runs `plan` (see the module doc). `plan_path` keys the run lock.
pub fn run(
    plan: &Plan,
    plan_path: &Path,
    options: &RunOptions,
    progress: &dyn Progress,
) -> Result<PlanRunReport> {
    let started = Instant::now();
    let selected = select(plan, options)?;
    let mut report = PlanRunReport {
        plan: plan_path.display().to_string(),
        dry_run: options.dry_run,
        shard: options.shard,
        already_running: None,
        due_rule: "due when the VM has no complete VM snapshot, or its newest one started more \
                   than RPO minus the margin ago (margin: run.due_margin, default a tenth of \
                   the RPO)"
            .into(),
        vms: Vec::new(),
        retention: Vec::new(),
        copy: None,
        failures: 0,
        duration_ms: 0,
    };
    let _lock = if options.dry_run {
        None
    } else {
        match run_lock(plan_path, options.shard)? {
            Ok(lock) => Some(lock),
            Err(holder) => {
                crate::progress::notice(&holder);
                report.already_running = Some(holder);
                return Ok(report);
            }
        }
    };
    let repo = plan.repository.open()?;
    let now = OffsetDateTime::now_utc();
    let existing = super::vm_snapshots(&repo, None)?;
    let mut due = Vec::new();
    for planned in &selected {
        let rpo: Span = planned.app.rpo;
        let margin = plan.due_margin(rpo);
        let last = newest_complete(&existing, planned.name());
        let age = last.and_then(|s| age_ms(&s.record.time, now));
        let threshold = rpo.0.saturating_sub(margin.0);
        let (is_due, reason) = match (last, age) {
            _ if options.force => (true, "--force".to_string()),
            (None, _) => (true, "no complete VM snapshot yet".to_string()),
            (Some(_), None) => (true, "its newest VM snapshot has an unreadable time".into()),
            (Some(_), Some(a)) if a >= threshold => (
                true,
                format!(
                    "newest VM snapshot is {} old; RPO {rpo} minus margin {margin}",
                    Span(a.max(1))
                ),
            ),
            (Some(_), Some(a)) => (
                false,
                format!(
                    "newest VM snapshot is {} old; due at RPO {rpo} minus margin {margin}",
                    Span(a.max(1))
                ),
            ),
        };
        let action = match (is_due, options.dry_run) {
            (false, _) => VmAction::NotDue,
            (true, true) => VmAction::WouldBackUp,
            (true, false) => VmAction::BackedUp,
        };
        if is_due && !options.dry_run {
            due.push(report.vms.len());
        }
        report.vms.push(VmRunReport {
            application: planned.app.name.clone(),
            vm: planned.name().to_string(),
            action,
            reason,
            last_good: last.map(|s| s.record.time.clone()),
            rpo_ms: rpo.0,
            due_margin_ms: margin.0,
            vm_snapshot_id: None,
            started: None,
            duration_ms: None,
            hooks: Vec::new(),
            standby: Vec::new(),
            error: None,
        });
    }

    // Back up the due VMs: disk slots, staggered starts.
    let concurrency = plan.run.concurrency.max(1);
    let slots = Slots {
        free: Mutex::new(concurrency),
        freed: Condvar::new(),
    };
    let stagger = Duration::from_millis(plan.run.stagger.map_or(0, |s| s.0));
    let mut cancelled = false;
    let finished: Vec<(usize, VmRunReport)> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut last_start: Option<Instant> = None;
        for &i in &due {
            if progress.is_cancelled() {
                cancelled = true;
                break;
            }
            let planned = selected[i];
            let need = u32::try_from(planned.vm.disks.len())
                .unwrap_or(u32::MAX)
                .min(concurrency);
            slots.take(need);
            if let Some(t) = last_start {
                let wait = stagger.saturating_sub(t.elapsed());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            last_start = Some(Instant::now());
            let mut vm_report = report.vms[i].clone();
            let (repo, slots) = (&repo, &slots);
            handles.push((
                i,
                scope.spawn(move || {
                    back_up_vm(repo, planned, &mut vm_report, progress);
                    slots.give(need);
                    vm_report
                }),
            ));
        }
        handles
            .into_iter()
            .map(|(i, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    let mut r = report.vms[i].clone();
                    r.action = VmAction::Failed;
                    r.error = Some("the backup thread panicked".into());
                    r
                });
                (i, r)
            })
            .collect()
    });
    for (i, r) in finished {
        report.vms[i] = r;
    }
    if cancelled {
        report.duration_ms = super::millis(started);
        return Err(Error::Cancelled(
            "plan run stopped before starting every due VM; VM snapshots already stored stay"
                .into(),
        ));
    }
    for v in &report.vms {
        report.failures += u64::from(v.action == VmAction::Failed)
            + u64::try_from(v.hooks.iter().filter(|h| !h.ok).count()).unwrap_or(0)
            + u64::try_from(v.standby.iter().filter(|s| !s.ok).count()).unwrap_or(0);
    }

    // Retention, per VM, then the off-site copy (which gets the same retention).
    let now = OffsetDateTime::now_utc();
    for planned in &selected {
        let Some(retention) = plan.retention_of(planned.app) else {
            continue;
        };
        match apply_vm_retention(
            &repo,
            "primary",
            planned.name(),
            retention,
            now,
            options.dry_run,
        ) {
            Ok(r) => report.retention.push(r),
            Err(e) => {
                report.failures += 1;
                crate::progress::notice(&format!("retention of VM {}: {e}", planned.name()));
            }
        }
    }
    if let Some(copy) = &plan.copy {
        if options.dry_run {
            report.copy = Some(CopyRun {
                destination: copy.location.clone(),
                snapshots_copied: 0,
                snapshots_skipped: 0,
                vm_records_copied: 0,
                bytes_written: 0,
                errors: vec![
                    "dry run: would copy the VMs' snapshots that are not there yet".into(),
                ],
            });
        } else {
            let result = copy.open().and_then(|dst| {
                // `copy.open` may have set the copy's endpoint; the primary is open already.
                let c = copy_offsite(&repo, &dst, &copy.location, &selected, progress)?;
                for planned in &selected {
                    if let Some(retention) = plan.retention_of(planned.app) {
                        report.retention.push(apply_vm_retention(
                            &dst,
                            "copy",
                            planned.name(),
                            retention,
                            OffsetDateTime::now_utc(),
                            false,
                        )?);
                    }
                }
                Ok(c)
            });
            match result {
                Ok(c) => {
                    report.failures += u64::try_from(c.errors.len()).unwrap_or(0);
                    report.copy = Some(c);
                }
                Err(e) => {
                    report.failures += 1;
                    report.copy = Some(CopyRun {
                        destination: copy.location.clone(),
                        snapshots_copied: 0,
                        snapshots_skipped: 0,
                        vm_records_copied: 0,
                        bytes_written: 0,
                        errors: vec![e.to_string()],
                    });
                }
            }
        }
    }
    report.duration_ms = super::millis(started);
    Ok(report)
}

/// Where a plan run's lock files live (for tests and docs).
pub fn lock_dir() -> Result<PathBuf> {
    Ok(crate::repo::cache_root()?
        .join("stackvault")
        .join("plan-runs"))
}
