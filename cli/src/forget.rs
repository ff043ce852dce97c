//! `stackvault forget`

use std::ffi::OsString;

use stackvault::format::short_id;
use stackvault::maintain::forget::{self, ForgetReport, RetentionPolicy};
use stackvault::{Error, Repo};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// REPO (unless given with -r or STACKVAULT_REPOSITORY), then the snapshots to forget
    /// (ids, unique prefixes or `latest`). Without snapshots, the --keep-* policy decides, per
    /// disk.
    #[arg(value_name = "[REPO] SNAPSHOT")]
    positionals: Vec<OsString>,
    /// Apply the policy to this disk only.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days that have snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest snapshot of each of the last N ISO weeks that have snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest snapshot of each of the last N years that have snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Keep every snapshot younger than this (`7d`, `36h`, `2w`, `1w3d`).
    #[arg(long, value_name = "DURATION", value_parser = crate::args::duration)]
    keep_within: Option<time::Duration>,
    /// Show what would be kept and removed (with the reasons), change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Forget a named disk snapshot even when it belongs to a VM snapshot (whose record is
    /// then dropped; its other disks stay as ordinary disk snapshots).
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, snapshots) = ctx.split_repo_list(args.positionals)?;
    let snapshots = snapshots
        .into_iter()
        .map(|s| crate::args::text(s, "SNAPSHOT"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let policy = RetentionPolicy {
        keep_last: args.keep_last,
        keep_hourly: args.keep_hourly,
        keep_daily: args.keep_daily,
        keep_weekly: args.keep_weekly,
        keep_monthly: args.keep_monthly,
        keep_yearly: args.keep_yearly,
        keep_within: args.keep_within,
    };
    if snapshots.is_empty() && policy.is_empty() {
        return Err(Error::Usage(
            "no retention rule given: name the snapshots to forget (ids, prefixes or \
             `latest`), or give rules such as `--keep-daily 7 --keep-weekly 4`"
                .into(),
        )
        .into());
    }
    if !snapshots.is_empty() && (!policy.is_empty() || args.disk.is_some()) {
        return Err(Error::Usage(
            "name snapshots or give a --keep-* policy (with --disk), not both".into(),
        )
        .into());
    }
    let repo = Repo::open(&repo)?;
    if let Some(disk) = &args.disk {
        warn_unknown_disk(&repo, disk)?;
    }
    let report = if snapshots.is_empty() {
        forget::forget_by_policy(
            &repo,
            args.disk.as_deref(),
            &policy,
            forget::now_utc(),
            args.dry_run,
        )?
    } else {
        forget::forget_named(&repo, &snapshots, args.dry_run, args.force)?
    };
    if args.json {
        return output::json(&report);
    }
    print(&report)
}

/// A `--disk` that names no disk of the repository (a typo) would silently forget nothing.
fn warn_unknown_disk(repo: &Repo, disk: &str) -> anyhow::Result<()> {
    if !repo.snapshots(Some(disk))?.is_empty() {
        return Ok(());
    }
    let mut known: Vec<String> = repo
        .snapshots(None)?
        .into_iter()
        .map(|s| s.meta.disk)
        .collect();
    known.sort();
    known.dedup();
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    eprintln!("warning: --disk {disk} names no disk of this repository (its disks: {known}); nothing to forget");
    Ok(())
}

fn print(r: &ForgetReport) -> anyhow::Result<()> {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    if let Some(decisions) = &r.decisions {
        let mut disk = None;
        for d in decisions {
            if disk != Some(&d.disk) {
                output::line(format!("disk {}:", d.disk))?;
                disk = Some(&d.disk);
            }
            if d.keep {
                output::line(format!(
                    "  keep    {}  {}  ({})",
                    short_id(&d.id),
                    d.time,
                    d.reasons.join(", ")
                ))?;
            } else {
                output::line(format!("  remove  {}  {}", short_id(&d.id), d.time))?;
            }
        }
    } else {
        for s in &r.removed {
            output::line(format!("{verb} {}  {}  {}", s.id.short(), s.disk, s.time))?;
        }
    }
    for id in &r.vm_snapshots_removed {
        output::line(format!("{verb} the record of VM snapshot {}", short_id(id)))?;
    }
    for p in &r.parent_removed {
        output::line(format!(
            "note: {} snapshot {} of disk {}: its parent {} is {}; it still restores on its own",
            p.kind,
            p.id.short(),
            p.disk,
            p.parent.short(),
            if r.dry_run {
                "to be removed"
            } else {
                "removed"
            }
        ))?;
    }
    output::line(format!(
        "{verb} {} snapshots ({} verification records), {} remain{}",
        r.removed.len(),
        r.verification_records_removed,
        r.kept,
        if r.dry_run || r.removed.is_empty() {
            ""
        } else {
            "; run `stackvault prune` to free their data"
        }
    ))
}
