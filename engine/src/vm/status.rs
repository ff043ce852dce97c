//! `plan status`: whether a protection plan's objectives are met, per application and VM,
//! from what the repositories hold (nothing is typed in, nothing is cached).
//!
//! - **Achieved RPO**: the age of the VM's newest complete VM snapshot (its start time), set
//!   against the application's RPO.
//! - **MTTR**: the mean `recovery_ms` of the VM's drill records that passed
//!   ([`drill`](super::drill)), set against the RTO; with the last drill's age against the
//!   drill interval.
//! - **Standby lag**: how much older the snapshot a standby target holds is than the disk's
//!   snapshot in the newest VM snapshot (0 when it holds that one).
//! - **Off-site copy lag**: how much older the newest VM snapshot at the copy is than the
//!   newest at the repository.
//!
//! Warnings, each with a stable code (`docs/plans.md`): `no-vm-snapshot`, `rpo-exceeded`,
//! `mttr-exceeds-rto`, `no-drill-within-interval`, `last-drill-failed`,
//! `same-location-as-source` (the repository and every copy share an Azure storage account
//! or an endpoint with a page blob the VM is backed up from: one outage or one compromised
//! account takes both), `no-offsite-copy`, `offsite-copy-behind` (the copy lacks the VM or
//! trails by more than the RPO), `standby-behind` (a standby target trails by more than the
//! RPO or cannot be read). Reading only: status takes no lock and writes nothing to a
//! repository; the Prometheus textfile is written whole (temporary name, then rename) so a
//! collector never reads half of it.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;

use super::drill::{drills, DrillOutcome};
use super::plan::{DiskPlan, Plan, RepoRef};
use super::run::{age_ms, newest_complete};
use crate::error::{Error, Result};
use crate::host::rfc3339;
use crate::repo::{Repo, RepoLocation};

/// One warning of `plan status`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Warning {
    /// Stable code (see the module doc).
    pub code: String,
    pub application: String,
    pub vm: Option<String>,
    pub message: String,
}

/// A standby target's lag.
#[derive(Clone, Debug, Serialize)]
pub struct StandbyStatus {
    pub disk: String,
    pub target: String,
    pub held_snapshot_id: Option<crate::format::SnapshotId>,
    pub lag_ms: Option<u64>,
    pub error: Option<String>,
}

/// The status of one VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub vm: String,
    pub last_good: Option<String>,
    pub last_good_id: Option<crate::format::VmSnapshotId>,
    pub achieved_rpo_ms: Option<u64>,
    pub rpo_ms: u64,
    pub rpo_met: bool,
    pub drills: u64,
    pub drills_passed: u64,
    pub last_drill: Option<String>,
    pub last_drill_age_ms: Option<u64>,
    pub last_drill_outcome: Option<DrillOutcome>,
    /// Mean `recovery_ms` of the passed drills.
    pub mttr_ms: Option<u64>,
    pub rto_ms: u64,
    /// `null` while no drill passed.
    pub rto_met: Option<bool>,
    pub drill_interval_ms: u64,
    pub standby: Vec<StandbyStatus>,
    /// `null` without an off-site copy, or when the copy holds no VM snapshot of this VM.
    pub offsite_copy_lag_ms: Option<u64>,
    pub offsite_last_good: Option<String>,
    pub warnings: Vec<Warning>,
}

/// The status of one application.
#[derive(Clone, Debug, Serialize)]
pub struct AppStatus {
    pub application: String,
    pub rpo_ms: u64,
    pub rto_ms: u64,
    pub drill_interval_ms: u64,
    pub vms: Vec<VmStatus>,
}

/// The report of `plan status` (`--json` serialises it).
#[derive(Clone, Debug, Serialize)]
pub struct PlanStatus {
    pub plan: String,
    pub generated: String,
    pub repository: String,
    pub offsite_copy: Option<String>,
    pub applications: Vec<AppStatus>,
    /// Every warning of every VM, plus those of the plan as a whole.
    pub warnings: Vec<Warning>,
}

/// Where a blob or repository lives, as far as a shared outage goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Place {
    /// Azure storage account.
    account: Option<String>,
    /// `host:port` of the endpoint.
    endpoint: Option<String>,
}

impl Place {
    fn shares_with(&self, other: &Place) -> bool {
        let same = |a: &Option<String>, b: &Option<String>| {
            a.as_ref()
                .is_some_and(|x| b.as_ref().is_some_and(|y| x == y))
        };
        same(&self.account, &other.account) || same(&self.endpoint, &other.endpoint)
    }
}

fn host_port(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(format!(
        "{}:{}",
        u.host_str()?.to_ascii_lowercase(),
        u.port_or_known_default()?
    ))
}

/// The place of a page blob disk.
fn blob_place(d: &DiskPlan) -> Option<Place> {
    let url = d.blob.as_deref()?;
    if let Some(rest) = url.strip_prefix("azure://") {
        let account = rest.split('/').next()?.to_ascii_lowercase();
        let endpoint = d
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
        return Some(Place {
            account: Some(account),
            endpoint: host_port(&endpoint),
        });
    }
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str()?.to_ascii_lowercase();
    let account = match host.split_once(".blob.") {
        Some((a, _)) => Some(a.to_string()),
        // Path-style (Azurite, an IP address): the account is the first segment.
        None => u
            .path_segments()
            .and_then(|mut s| s.next())
            .map(str::to_ascii_lowercase),
    };
    Some(Place {
        account,
        endpoint: host_port(url),
    })
}

/// The place of a repository; `None` for a local one.
fn repo_place(r: &RepoRef) -> Option<Place> {
    match RepoLocation::parse(&r.location).ok()? {
        RepoLocation::Local(_) => None,
        RepoLocation::Azure { account, .. } => {
            let account = account.to_ascii_lowercase();
            let endpoint = r
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
            Some(Place {
                account: Some(account),
                endpoint: host_port(&endpoint),
            })
        }
        RepoLocation::S3 { .. } => Some(Place {
            account: None,
            endpoint: r.endpoint.as_deref().and_then(host_port),
        }),
    }
}

fn mean(values: &[u64]) -> Option<u64> {
    let n = u64::try_from(values.len()).ok().filter(|&n| n > 0)?;
    let sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
    u64::try_from(sum / u128::from(n)).ok()
}

/// Computes the status of `plan` at `now`.
pub fn status(plan: &Plan, plan_path: &Path, now: OffsetDateTime) -> Result<PlanStatus> {
    let repo = plan.repository.open()?;
    let primary = super::vm_snapshots(&repo, None)?;
    let all_drills = drills(&repo, None)?;
    let copy: Option<(String, Result<Vec<super::VmSnapshot>>)> = plan.copy.as_ref().map(|c| {
        (
            c.location.clone(),
            c.open().and_then(|r| super::vm_snapshots(&r, None)),
        )
    });
    let mut out = PlanStatus {
        plan: plan_path.display().to_string(),
        generated: rfc3339(now),
        repository: plan.repository.location.clone(),
        offsite_copy: plan.copy.as_ref().map(|c| c.location.clone()),
        applications: Vec::new(),
        warnings: Vec::new(),
    };
    let mut places: Vec<Place> = Vec::new();
    let mut all_remote = true;
    for r in std::iter::once(&plan.repository).chain(plan.copy.as_ref()) {
        match repo_place(r) {
            Some(p) => places.push(p),
            None => all_remote = false,
        }
    }
    for app in &plan.applications {
        let warn = |code: &str, vm: &str, message: String| Warning {
            code: code.to_string(),
            application: app.name.clone(),
            vm: Some(vm.to_string()),
            message,
        };
        let mut app_status = AppStatus {
            application: app.name.clone(),
            rpo_ms: app.rpo.0,
            rto_ms: app.rto.0,
            drill_interval_ms: app.drill_interval().0,
            vms: Vec::new(),
        };
        for vm_plan in &app.vms {
            let vm = vm_plan.name.get_ref().0.as_str();
            let mut warnings = Vec::new();
            let last = newest_complete(&primary, vm);
            let achieved = last.and_then(|s| age_ms(&s.record.time, now));
            let rpo_met = achieved.is_some_and(|a| a <= app.rpo.0);
            match achieved {
                None => warnings.push(warn(
                    "no-vm-snapshot",
                    vm,
                    format!("VM {vm} has no complete VM snapshot: run `plan run`"),
                )),
                Some(a) if a > app.rpo.0 => warnings.push(warn(
                    "rpo-exceeded",
                    vm,
                    format!(
                        "VM {vm}: the newest VM snapshot is {} old, past the RPO of {}: check \
                         that `plan run` runs (from cron) and succeeds",
                        super::plan::Span(a.max(1)),
                        app.rpo
                    ),
                )),
                Some(_) => {}
            }
            let vm_drills: Vec<_> = all_drills.iter().filter(|d| d.record.vm == vm).collect();
            let passed: Vec<u64> = vm_drills
                .iter()
                .filter(|d| d.record.outcome == DrillOutcome::Passed)
                .map(|d| d.record.recovery_ms)
                .collect();
            let mttr = mean(&passed);
            let last_drill = vm_drills.last();
            let last_drill_age = last_drill.and_then(|d| age_ms(&d.record.started, now));
            if let Some(m) = mttr.filter(|&m| m > app.rto.0) {
                warnings.push(warn(
                    "mttr-exceeds-rto",
                    vm,
                    format!(
                        "VM {vm}: the measured MTTR ({:.1} s, mean of {} drill(s)) exceeds the \
                         RTO ({}): a failure would cause an unacceptable disruption; restore \
                         faster (standby disks, closer scratch) or agree on a longer RTO",
                        m as f64 / 1000.0,
                        passed.len(),
                        app.rto
                    ),
                ));
            }
            if last_drill_age.is_none_or(|a| a > app.drill_interval().0) {
                warnings.push(warn(
                    "no-drill-within-interval",
                    vm,
                    format!(
                        "VM {vm}: no drill within the drill interval ({}): run `stackvault \
                         drill PLAN --vm {vm}`",
                        app.drill_interval()
                    ),
                ));
            }
            if let Some(d) = last_drill.filter(|d| d.record.outcome != DrillOutcome::Passed) {
                warnings.push(warn(
                    "last-drill-failed",
                    vm,
                    format!(
                        "VM {vm}: the last drill ({}) ended {}: the VM may not be recoverable; \
                         see `plan status --json` and the drill record {}",
                        d.record.started,
                        d.record.outcome.as_str(),
                        d.id.short()
                    ),
                ));
            }
            // Sources sharing an account or endpoint with the repository and every copy.
            if all_remote && !places.is_empty() {
                for d in &vm_plan.disks {
                    let Some(source) = blob_place(d) else {
                        continue;
                    };
                    if places.iter().all(|p| p.shares_with(&source)) {
                        warnings.push(warn(
                            "same-location-as-source",
                            vm,
                            format!(
                                "VM {vm}: disk {} is a page blob in the same storage account or \
                                 endpoint as the repository{}: one outage or one compromised \
                                 account loses both; keep a copy elsewhere ([copy] in the plan)",
                                d.name(),
                                if plan.copy.is_some() {
                                    " and its copy"
                                } else {
                                    ""
                                }
                            ),
                        ));
                        break;
                    }
                }
            }
            // Standby targets.
            let mut standby = Vec::new();
            for d in &vm_plan.disks {
                let Some(target) = &d.standby else {
                    continue;
                };
                standby.push(standby_status(&repo, vm, d, target, last, now));
            }
            for s in &standby {
                if s.error.is_some() || s.lag_ms.is_none_or(|l| l > app.rpo.0) {
                    warnings.push(warn(
                        "standby-behind",
                        vm,
                        format!(
                            "VM {vm}: standby {} of disk {} {}",
                            s.target,
                            s.disk,
                            match (&s.error, s.lag_ms) {
                                (Some(e), _) => format!("cannot be read: {e}"),
                                (None, Some(l)) => format!(
                                    "trails by {}, more than the RPO",
                                    super::plan::Span(l.max(1))
                                ),
                                (None, None) => "holds no snapshot of this disk yet".into(),
                            }
                        ),
                    ));
                }
            }
            // Off-site copy.
            let (offsite_lag, offsite_last) = match &copy {
                None => {
                    warnings.push(warn(
                        "no-offsite-copy",
                        vm,
                        format!(
                            "VM {vm}: the plan has no off-site copy: a lost repository loses \
                             every backup; add [copy] to the plan"
                        ),
                    ));
                    (None, None)
                }
                Some((location, Err(e))) => {
                    warnings.push(warn(
                        "offsite-copy-behind",
                        vm,
                        format!("VM {vm}: the off-site copy {location} cannot be read: {e}"),
                    ));
                    (None, None)
                }
                Some((location, Ok(copied))) => {
                    let there = newest_complete(copied, vm);
                    let lag = match (last, there) {
                        (Some(p), Some(c)) => {
                            let pa = age_ms(&p.record.time, now).unwrap_or(0);
                            age_ms(&c.record.time, now).map(|ca| ca.saturating_sub(pa))
                        }
                        _ => None,
                    };
                    if last.is_some() && lag.is_none_or(|l| l > app.rpo.0) {
                        warnings.push(warn(
                            "offsite-copy-behind",
                            vm,
                            format!(
                                "VM {vm}: the off-site copy {location} {}",
                                match lag {
                                    Some(l) => format!(
                                        "trails the repository by {}, more than the RPO",
                                        super::plan::Span(l.max(1))
                                    ),
                                    None => "holds no VM snapshot of it: run `plan run`".into(),
                                }
                            ),
                        ));
                    }
                    (lag, there.map(|c| c.record.time.clone()))
                }
            };
            out.warnings.extend(warnings.iter().cloned());
            app_status.vms.push(VmStatus {
                vm: vm.to_string(),
                last_good: last.map(|s| s.record.time.clone()),
                last_good_id: last.map(|s| s.id.clone()),
                achieved_rpo_ms: achieved,
                rpo_ms: app.rpo.0,
                rpo_met,
                drills: u64::try_from(vm_drills.len()).unwrap_or(u64::MAX),
                drills_passed: u64::try_from(passed.len()).unwrap_or(u64::MAX),
                last_drill: last_drill.map(|d| d.record.started.clone()),
                last_drill_age_ms: last_drill_age,
                last_drill_outcome: last_drill.map(|d| d.record.outcome),
                mttr_ms: mttr,
                rto_ms: app.rto.0,
                rto_met: mttr.map(|m| m <= app.rto.0),
                drill_interval_ms: app.drill_interval().0,
                standby,
                offsite_copy_lag_ms: offsite_lag,
                offsite_last_good: offsite_last,
                warnings,
            });
        }
        out.applications.push(app_status);
    }
    Ok(out)
}

fn standby_status(
    repo: &Repo,
    vm: &str,
    d: &DiskPlan,
    target: &str,
    last: Option<&super::VmSnapshot>,
    now: OffsetDateTime,
) -> StandbyStatus {
    let shown = crate::azure::redact(target);
    let result = (|| -> Result<(Option<crate::format::SnapshotId>, Option<u64>)> {
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
        let s = crate::standby::status(target, &options)?;
        let Some(held) = s.snapshot_id else {
            return Ok((None, None));
        };
        let newest = last.and_then(|l| l.record.disks.iter().find(|x| x.name == d.name()));
        let lag = match newest {
            Some(n) if n.snapshot_id == held => Some(0),
            Some(n) => {
                let held_time = repo.resolve_snapshot(&held, None).ok().map(|h| h.meta.time);
                let newest_age = age_ms(&n.read_started, now).unwrap_or(0);
                held_time
                    .and_then(|t| age_ms(&t, now))
                    .map(|h| h.saturating_sub(newest_age))
            }
            None => None,
        };
        Ok((Some(held), lag))
    })();
    match result {
        Ok((held, lag)) => StandbyStatus {
            disk: d.name().to_string(),
            target: shown,
            held_snapshot_id: held,
            lag_ms: lag,
            error: None,
        },
        Err(e) => StandbyStatus {
            disk: d.name().to_string(),
            target: shown,
            held_snapshot_id: None,
            lag_ms: None,
            error: Some(e.to_string()),
        },
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the status as a Prometheus textfile (metric names in `docs/plans.md`).
pub fn prometheus(status: &PlanStatus) -> String {
    let mut out = String::new();
    let metrics: [(&str, &str, &str); 9] = [
        (
            "stackvault_plan_rpo_seconds",
            "gauge",
            "RPO of the VM's application.",
        ),
        (
            "stackvault_plan_achieved_rpo_seconds",
            "gauge",
            "Age of the VM's newest complete VM snapshot.",
        ),
        (
            "stackvault_plan_rto_seconds",
            "gauge",
            "RTO of the VM's application.",
        ),
        (
            "stackvault_plan_mttr_seconds",
            "gauge",
            "Mean measured time to recover of the VM's passed drills.",
        ),
        (
            "stackvault_plan_last_drill_age_seconds",
            "gauge",
            "Age of the VM's last drill.",
        ),
        (
            "stackvault_plan_drill_interval_seconds",
            "gauge",
            "Drill interval of the VM's application.",
        ),
        (
            "stackvault_plan_offsite_copy_lag_seconds",
            "gauge",
            "How far the off-site copy trails the repository for the VM.",
        ),
        (
            "stackvault_plan_standby_lag_seconds",
            "gauge",
            "How far a standby target trails the VM's newest snapshot of its disk.",
        ),
        (
            "stackvault_plan_warning",
            "gauge",
            "1 for each warning that fires (label code).",
        ),
    ];
    let secs = |ms: u64| ms as f64 / 1000.0;
    for (name, kind, help) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for app in &status.applications {
            for vm in &app.vms {
                let labels = format!(
                    "application=\"{}\",vm=\"{}\"",
                    label(&app.application),
                    label(&vm.vm)
                );
                let value = match name {
                    "stackvault_plan_rpo_seconds" => Some(secs(vm.rpo_ms)),
                    "stackvault_plan_achieved_rpo_seconds" => vm.achieved_rpo_ms.map(secs),
                    "stackvault_plan_rto_seconds" => Some(secs(vm.rto_ms)),
                    "stackvault_plan_mttr_seconds" => vm.mttr_ms.map(secs),
                    "stackvault_plan_last_drill_age_seconds" => vm.last_drill_age_ms.map(secs),
                    "stackvault_plan_drill_interval_seconds" => Some(secs(vm.drill_interval_ms)),
                    "stackvault_plan_offsite_copy_lag_seconds" => vm.offsite_copy_lag_ms.map(secs),
                    "stackvault_plan_standby_lag_seconds" => {
                        for s in &vm.standby {
                            if let Some(l) = s.lag_ms {
                                let _ = writeln!(
                                    out,
                                    "{name}{{{labels},disk=\"{}\"}} {}",
                                    label(&s.disk),
                                    secs(l)
                                );
                            }
                        }
                        None
                    }
                    _ => {
                        for w in &vm.warnings {
                            let _ =
                                writeln!(out, "{name}{{{labels},code=\"{}\"}} 1", label(&w.code));
                        }
                        None
                    }
                };
                if let Some(v) = value {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
    }
    out
}

/// Writes `text` to `path` whole: a temporary file beside it, then rename.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("--prometheus {}: name a file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, text).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("rename", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_compare_by_account_or_endpoint() {
        let disk = |blob: &str, endpoint: Option<&str>| -> DiskPlan {
            let text = format!(
                "name = \"d\"\nblob = \"{blob}\"\n{}",
                endpoint.map_or(String::new(), |e| format!("endpoint = \"{e}\"\n"))
            );
            toml::from_str(&text).expect("disk")
        };
        let azurite = "http://127.0.0.1:10000/devstoreaccount1";
        let repo = RepoRef {
            location: "azure://devstoreaccount1/backups/p".into(),
            endpoint: Some(azurite.into()),
        };
        let rp = repo_place(&repo).expect("remote");
        let same = blob_place(&disk("azure://devstoreaccount1/vhds/a.vhd", Some(azurite)));
        assert!(same.is_some_and(|s| rp.shares_with(&s)));
        let path_style = blob_place(&disk(
            "http://127.0.0.1:10000/devstoreaccount1/v/a.vhd",
            None,
        ));
        assert!(path_style.is_some_and(|s| rp.shares_with(&s)));
        let other = blob_place(&disk("https://prodvms.blob.core.windows.net/v/a.vhd", None));
        assert!(other.is_some_and(|s| !rp.shares_with(&s)));
        let local = RepoRef {
            location: "/backups".into(),
            endpoint: None,
        };
        assert!(repo_place(&local).is_none());
        assert_eq!(mean(&[1, 2, 4]), Some(2));
        assert_eq!(mean(&[]), None);
    }
}
