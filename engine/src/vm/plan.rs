//! Protection plans: the TOML file that says, per application, which VMs and disks to back up,
//! into which repository (and off-site copy), and the objectives they must meet (RPO, RTO,
//! drill interval), with retention, standby targets, hooks, concurrency and stagger
//! (`docs/plans.md` documents every key; `examples/plans.toml` is a complete example).
//!
//! [`Plan::parse`] is the only way in: the file is read with `toml` + serde, unknown keys are
//! refused (a typo must not silently drop a VM from protection), and every error names the
//! line and the key. Credentials never appear in a plan: a page blob names the environment
//! variable that holds its account key or SAS token. Parsing does no I/O besides reading the
//! file. Names are checked as `backup-vm` checks them, and VM names are unique across the
//! whole plan (a VM belongs to one application), so `--vm NAME` and shards are unambiguous.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::azure::{BlobOptions, Profile};
use crate::error::{Error, Result};
use crate::maintain::RetentionPolicy;
use crate::repo::Repo;
use crate::repo::{RepoLocation, StoreOptions};

/// A duration in a plan: numbers with units `ms`, `s`, `m`, `h`, `d`, `w` (`15m`, `1h30m`,
/// `7d`). Kept in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct Span(pub u64);

impl From<Span> for u64 {
    fn from(s: Span) -> u64 {
        s.0
    }
}

impl Span {
    pub fn millis(self) -> u64 {
        self.0
    }

    /// Parses `15m`, `1h30m`, `7d`, `500ms`.
    pub fn parse(s: &str) -> std::result::Result<Span, String> {
        let bad = || format!("{s:?}: expected a duration such as 500ms, 30s, 15m, 4h, 7d or 1h30m");
        let text = s.trim();
        let mut total: u64 = 0;
        let mut rest = text;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let (number, after) = rest.split_at(digits);
            let n: u64 = number.parse().map_err(|_| bad())?;
            let unit_len = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let scale: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 7 * 86_400_000,
                _ => return Err(bad()),
            };
            total = n
                .checked_mul(scale)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
            rest = next;
        }
        if total == 0 {
            return Err(format!("{s:?}: a duration must be longer than zero"));
        }
        Ok(Span(total))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Span, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(86_400_000) {
            write!(f, "{}d", ms / 86_400_000)
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// A VM or disk name, checked while parsing so the error points at it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Name, D::Error> {
        let s = String::deserialize(d)?;
        super::validate_name("the", &s).map_err(|e| serde::de::Error::custom(e.to_string()))?;
        Ok(Name(s))
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository in a plan: where, and the endpoint this host reaches it through.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepoRef {
    /// A directory, `azure://ACCOUNT/CONTAINER[/PREFIX]` or `s3://BUCKET[/PREFIX]`.
    pub location: String,
    /// Endpoint URL of an object store (Azure Stack Hub, Azurite, MinIO); credentials come
    /// from the environment as for `-r`.
    #[serde(default)]
    pub endpoint: Option<String>,
}

impl RepoRef {
    /// Opens the repository, with this reference's endpoint for a remote one.
    pub fn open(&self) -> Result<Repo> {
        let location = RepoLocation::parse(&self.location)?;
        if location.is_remote() {
            crate::repo::set_store_options(StoreOptions {
                endpoint: self.endpoint.clone(),
                profile: None,
            });
        }
        Repo::open(Path::new(&self.location))
    }
}

/// Retention in a plan: the `forget --keep-*` rules, applied per VM to its VM snapshots.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    #[serde(default)]
    pub keep_within: Option<Span>,
}

impl Retention {
    pub fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self
                .keep_within
                .map(|s| time::Duration::milliseconds(i64::try_from(s.0).unwrap_or(i64::MAX))),
        }
    }
}

/// Commands run around a VM's backup by `sh -c`, with `STACKVAULT_APPLICATION`,
/// `STACKVAULT_VM` and `STACKVAULT_PHASE` set (fsfreeze, a VSS run-command, a notification).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Before the disks are read; failing it skips the VM's backup (and runs `on_failure`).
    #[serde(default)]
    pub before: Option<String>,
    /// After the VM snapshot is stored (thaw).
    #[serde(default)]
    pub after: Option<String>,
    /// When the hook before or the backup failed (thaw, alert).
    #[serde(default)]
    pub on_failure: Option<String>,
}

/// One disk of a VM in a plan: exactly one of `path` and `blob`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPlan {
    pub name: toml::Spanned<Name>,
    /// A disk image (raw, VHD, VHDX, qcow2) or block device.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A page blob: `azure://ACCOUNT/CONTAINER/BLOB` (with `endpoint`) or an `https://` URL
    /// without its SAS (which comes from `sas_env`).
    #[serde(default)]
    pub blob: Option<String>,
    /// Blob endpoint of the account, for `azure://…`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Name of the environment variable holding the storage account key.
    #[serde(default)]
    pub account_key_env: Option<String>,
    /// Name of the environment variable holding a SAS token (appended as the URL's query).
    #[serde(default)]
    pub sas_env: Option<String>,
    /// `azure` or `azurestack`.
    #[serde(default)]
    pub profile: Option<Profile>,
    /// A standby target kept in sync with this disk after every backup (`standby sync`): a
    /// file, a block device, or a page blob URL (without SAS).
    #[serde(default)]
    pub standby: Option<String>,
    /// Blob endpoint of a page blob standby given as `azure://…`.
    #[serde(default)]
    pub standby_endpoint: Option<String>,
    /// Name of the environment variable holding the standby page blob's account key.
    #[serde(default)]
    pub standby_account_key_env: Option<String>,
}

/// One VM of an application.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmPlan {
    pub name: toml::Spanned<Name>,
    /// The VM's own hooks, instead of its application's.
    #[serde(default)]
    pub hooks: Option<Hooks>,
    /// Every disk is read from a blob snapshot taken together: see `backup-vm`.
    #[serde(default)]
    pub blob_snapshots_taken_together: bool,
    #[serde(rename = "disk")]
    pub disks: Vec<DiskPlan>,
}

/// One application: its objectives and its VMs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppPlan {
    pub name: String,
    /// Recovery point objective: the most data (time) the application may lose.
    pub rpo: Span,
    /// Recovery time objective: the longest it may be down.
    pub rto: Span,
    /// How often a drill must prove the RTO (default 30d).
    #[serde(default)]
    pub drill_interval: Option<Span>,
    /// Retention of this application's VM snapshots (default: the plan's `[retention]`).
    #[serde(default)]
    pub retention: Option<Retention>,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(rename = "vm")]
    pub vms: Vec<VmPlan>,
}

/// How `plan run` paces its work.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Disks read at once, across VMs (a VM's disks are read together, so a VM with more disks
    /// than this runs alone).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Least time between the starts of two VM backups.
    #[serde(default)]
    pub stagger: Option<Span>,
    /// A VM is due when its last good VM snapshot is older than its RPO minus this margin
    /// (default: a tenth of the RPO), so a run started from cron a little early still meets it.
    #[serde(default)]
    pub due_margin: Option<Span>,
}

fn default_concurrency() -> u32 {
    4
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            concurrency: default_concurrency(),
            stagger: None,
            due_margin: None,
        }
    }
}

/// Where drills restore to, unless `drill --to` says.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSettings {
    /// A scratch directory, or a page blob container (`azure://ACCOUNT/CONTAINER`, or an
    /// `https://…/CONTAINER` URL whose SAS comes from `sas_env`).
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub account_key_env: Option<String>,
    #[serde(default)]
    pub sas_env: Option<String>,
    #[serde(default)]
    pub profile: Option<Profile>,
}

/// A protection plan, as parsed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub repository: RepoRef,
    /// The off-site copy: `plan run` copies every VM snapshot of its VMs there.
    #[serde(default)]
    pub copy: Option<RepoRef>,
    /// Default retention of every application.
    #[serde(default)]
    pub retention: Option<Retention>,
    #[serde(default)]
    pub run: RunSettings,
    #[serde(default)]
    pub drill: DrillSettings,
    #[serde(rename = "application")]
    pub applications: Vec<AppPlan>,
}

/// Default drill interval of an application that names none.
pub const DEFAULT_DRILL_INTERVAL: Span = Span(30 * 86_400_000);

/// One VM of the plan with the application it belongs to.
#[derive(Clone, Copy, Debug)]
pub struct PlannedVm<'p> {
    pub app: &'p AppPlan,
    pub vm: &'p VmPlan,
}

impl PlannedVm<'_> {
    pub fn name(&self) -> &str {
        &self.vm.name.get_ref().0
    }

    /// The hooks that apply: the VM's own, else its application's.
    pub fn hooks(&self) -> &Hooks {
        self.vm.hooks.as_ref().unwrap_or(&self.app.hooks)
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        + 1
}

impl Plan {
    /// Reads and parses the plan at `path`.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read plan", path, e))?;
        Plan::parse(&text, &path.display().to_string())
    }

    /// Parses a plan; `origin` names the file in errors. Every error is [`Error::Usage`] and
    /// names the line and the key.
    pub fn parse(text: &str, origin: &str) -> Result<Plan> {
        let plan: Plan = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}", line_of(text, s.start)))
                .unwrap_or_default();
            Error::Usage(format!(
                "plan {origin}{line}: {}",
                e.message().trim_end().replace('\n', "; ")
            ))
        })?;
        plan.check(text, origin)?;
        Ok(plan)
    }

    /// The checks serde cannot express: unique names, one source per disk, sane numbers.
    fn check(&self, text: &str, origin: &str) -> Result<()> {
        let at = |span: std::ops::Range<usize>, key: &str, what: String| {
            Error::Usage(format!(
                "plan {origin} line {}: {key}: {what}",
                line_of(text, span.start)
            ))
        };
        RepoLocation::parse(&self.repository.location)
            .map_err(|e| Error::Usage(format!("plan {origin}: repository.location: {e}")))?;
        if let Some(c) = &self.copy {
            RepoLocation::parse(&c.location)
                .map_err(|e| Error::Usage(format!("plan {origin}: copy.location: {e}")))?;
            if c.location == self.repository.location {
                return Err(Error::Usage(format!(
                    "plan {origin}: copy.location is the repository itself; name another \
                     repository (off-site) or leave [copy] out"
                )));
            }
        }
        if self.run.concurrency == 0 {
            return Err(Error::Usage(format!(
                "plan {origin}: run.concurrency: give 1 or more disks at once"
            )));
        }
        if self.applications.is_empty() {
            return Err(Error::Usage(format!(
                "plan {origin}: no [[application]]: a plan protects at least one"
            )));
        }
        let mut apps = BTreeSet::new();
        let mut vms = BTreeSet::new();
        for app in &self.applications {
            if !apps.insert(app.name.as_str()) {
                return Err(Error::Usage(format!(
                    "plan {origin}: application {:?} is named twice",
                    app.name
                )));
            }
            if let Some(r) = self.retention_of(app) {
                if r.policy().is_empty() {
                    return Err(Error::Usage(format!(
                        "plan {origin}: the retention of application {} keeps nothing: give \
                         at least one keep_* rule (or leave retention out to keep everything)",
                        app.name
                    )));
                }
            }
            if app.vms.is_empty() {
                return Err(Error::Usage(format!(
                    "plan {origin}: application {} has no [[application.vm]]",
                    app.name
                )));
            }
            for vm in &app.vms {
                let name = vm.name.get_ref();
                if !vms.insert(name.0.as_str()) {
                    return Err(at(
                        vm.name.span(),
                        "vm.name",
                        format!(
                            "VM {name} appears twice in the plan (a VM belongs to one application)"
                        ),
                    ));
                }
                if vm.disks.is_empty() {
                    return Err(at(
                        vm.name.span(),
                        "vm.disk",
                        format!("VM {name} has no [[application.vm.disk]]"),
                    ));
                }
                let mut disks = BTreeSet::new();
                for d in &vm.disks {
                    let dn = d.name.get_ref();
                    if !disks.insert(dn.0.as_str()) {
                        return Err(at(
                            d.name.span(),
                            "disk.name",
                            format!("disk {dn} of VM {name} is named twice"),
                        ));
                    }
                    match (&d.path, &d.blob) {
                        (Some(_), None) => {
                            if d.endpoint.is_some()
                                || d.account_key_env.is_some()
                                || d.sas_env.is_some()
                            {
                                return Err(at(
                                    d.name.span(),
                                    "disk",
                                    format!(
                                        "disk {dn} of VM {name} is a path; endpoint, \
                                         account_key_env and sas_env belong to a blob"
                                    ),
                                ));
                            }
                        }
                        (None, Some(url)) => {
                            if !crate::azure::is_blob_url(url) || url.contains('?') {
                                return Err(at(
                                    d.name.span(),
                                    "disk.blob",
                                    format!(
                                        "disk {dn} of VM {name}: give azure://ACCOUNT/CONTAINER/BLOB \
                                         or an https:// URL without its query; a SAS comes from \
                                         the variable named by sas_env, never from the plan"
                                    ),
                                ));
                            }
                        }
                        _ => {
                            return Err(at(
                                d.name.span(),
                                "disk",
                                format!(
                                    "disk {dn} of VM {name}: give exactly one of path and blob"
                                ),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every VM of the plan, in file order.
    pub fn vms(&self) -> Vec<PlannedVm<'_>> {
        self.applications
            .iter()
            .flat_map(|app| app.vms.iter().map(move |vm| PlannedVm { app, vm }))
            .collect()
    }

    /// The VM named `name`, or a usage error listing the plan's VMs.
    pub fn vm(&self, name: &str) -> Result<PlannedVm<'_>> {
        let all = self.vms();
        all.iter()
            .find(|v| v.name() == name)
            .copied()
            .ok_or_else(|| {
                Error::Usage(format!(
                    "VM {name} is not in the plan; it has: {}",
                    all.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
                ))
            })
    }

    /// The retention of `app`: its own, else the plan's; `None` keeps everything.
    pub fn retention_of<'a>(&'a self, app: &'a AppPlan) -> Option<&'a Retention> {
        app.retention.as_ref().or(self.retention.as_ref())
    }

    /// The margin before the RPO at which a VM is due.
    pub fn due_margin(&self, rpo: Span) -> Span {
        self.run.due_margin.unwrap_or(Span(rpo.0 / 10))
    }
}

impl AppPlan {
    pub fn drill_interval(&self) -> Span {
        self.drill_interval.unwrap_or(DEFAULT_DRILL_INTERVAL)
    }
}

/// Reads the environment variable `var` named by a plan (`what` says which key named it).
fn secret_from_env(var: &str, what: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(Error::Usage(format!(
            "{what} names the environment variable {var}, which is not set or empty: export it \
             before the run"
        ))),
    }
}

/// Blob access of a disk or a drill container: URL (with the SAS from the environment, if
/// any) and options.
pub(crate) fn blob_access(
    url: &str,
    endpoint: Option<&str>,
    account_key_env: Option<&str>,
    sas_env: Option<&str>,
    profile: Option<Profile>,
    what: &str,
) -> Result<(String, BlobOptions)> {
    let account_key = account_key_env
        .map(|v| secret_from_env(v, &format!("{what}: account_key_env")))
        .transpose()?;
    let url = match sas_env {
        Some(v) => {
            let sas = secret_from_env(v, &format!("{what}: sas_env"))?;
            format!("{url}?{}", sas.trim().trim_start_matches('?'))
        }
        None => url.to_string(),
    };
    Ok((
        url,
        BlobOptions {
            profile: profile.unwrap_or_default(),
            api_version: None,
            endpoint: endpoint.map(str::to_string),
            account_key,
            retry: Default::default(),
        },
    ))
}

impl DiskPlan {
    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }

    /// The source as shown in reports: a path, or the blob URL (a plan holds no secret).
    pub fn shown(&self) -> String {
        match (&self.path, &self.blob) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(b)) => b.clone(),
            (None, None) => String::new(),
        }
    }

    /// Opens the disk as a backup source.
    pub fn open(&self, vm: &str) -> Result<Box<dyn crate::source::DiskSource>> {
        if let Some(path) = &self.path {
            let options = crate::source::SourceOptions {
                format: crate::source::SourceFormat::Auto,
                parent: None,
            };
            return crate::source::open_source(path, &options);
        }
        let url = self.blob.as_deref().unwrap_or_default();
        let what = format!("disk {} of VM {vm}", self.name());
        let (url, options) = blob_access(
            url,
            self.endpoint.as_deref(),
            self.account_key_env.as_deref(),
            self.sas_env.as_deref(),
            self.profile,
            &what,
        )?;
        crate::source::open_page_blob(&url, &options)
    }
}

/// A shard `i/n` of the plan's VMs (1 ≤ i ≤ n): VM `v` belongs to shard
/// `(first 8 bytes of BLAKE3(v) as u64 LE) mod n + 1`. Depends on the name only, so every host
/// of a fleet computes the same split, each VM is in exactly one shard, and adding a VM to the
/// plan moves no other VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Parses `i/n`.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || {
            Error::Usage(format!(
                "--shard {s:?}: give i/n with 1 <= i <= n (e.g. 2/5: the second of five hosts)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard (1-based) VM `name` belongs to among `count`.
    pub fn of(name: &str, count: u32) -> u32 {
        let hash = blake3::hash(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        let n = u64::from(count.max(1));
        // The remainder is below `count`, a u32.
        u32::try_from(u64::from_le_bytes(first) % n).unwrap_or(0) + 1
    }

    pub fn contains(&self, name: &str) -> bool {
        Shard::of(name, self.count) == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
[repository]
location = "/backups/repo"

[retention]
keep_daily = 7

[[application]]
name = "erp"
rpo = "4h"
rto = "1h30m"

  [[application.vm]]
  name = "erp-db01"
    [[application.vm.disk]]
    name = "os"
    path = "/exports/erp-db01-os.vhd"
"#;

    #[test]
    fn spans_parse_and_print() {
        assert_eq!(Span::parse("1h30m"), Ok(Span(5_400_000)));
        assert_eq!(Span::parse("500ms"), Ok(Span(500)));
        assert_eq!(Span::parse("7d").map(|s| s.to_string()), Ok("7d".into()));
        for bad in ["", "5", "h", "5x", "0s", "99999999999999999999d", "1h 30m"] {
            assert!(Span::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_plan_parses_and_errors_name_line_and_key() {
        let plan = Plan::parse(PLAN, "p.toml").expect("parses");
        assert_eq!(plan.vms().len(), 1);
        assert_eq!(plan.applications[0].rto, Span(5_400_000));
        assert_eq!(plan.due_margin(Span(4 * 3_600_000)), Span(1_440_000));
        let typo = PLAN.replace("rto = ", "rtoo = ");
        let e = Plan::parse(&typo, "p.toml")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("line 11") && e.contains("rtoo"), "{e}");
        let bad = PLAN.replace("\"1h30m\"", "\"soon\"");
        let e = Plan::parse(&bad, "p.toml")
            .expect_err("bad span")
            .to_string();
        assert!(e.contains("line 11") && e.contains("soon"), "{e}");
        let twice =
            format!("{PLAN}    [[application.vm.disk]]\n    name = \"os\"\n    path = \"/x\"\n");
        let e = Plan::parse(&twice, "p.toml")
            .expect_err("twice")
            .to_string();
        assert!(e.contains("line 19") && e.contains("named twice"), "{e}");
    }

    #[test]
    fn the_example_plan_parses() {
        let text = include_str!("../../../examples/plans.toml");
        let plan = Plan::parse(text, "examples/plans.toml").expect("the example parses");
        assert_eq!(plan.vms().len(), 3);
        assert!(plan.copy.is_some());
    }

    #[test]
    fn shards_cover_every_vm_once() {
        let names: Vec<String> = (0..500).map(|i| format!("vm-{i}")).collect();
        for count in 1..=7 {
            let mut sizes = vec![0u32; count as usize];
            for n in &names {
                let shards: Vec<u32> = (1..=count)
                    .filter(|&i| Shard { index: i, count }.contains(n))
                    .collect();
                assert_eq!(shards.len(), 1, "{n} in {shards:?} of {count}");
                sizes[(shards[0] - 1) as usize] += 1;
            }
            assert!(sizes.iter().all(|&s| s > 0), "{count}: {sizes:?}");
        }
        assert!(Shard::parse("0/3").is_err() && Shard::parse("4/3").is_err());
        assert_eq!(Shard::parse("2/5").ok(), Some(Shard { index: 2, count: 5 }));
    }
}
