//! `stackvault plan run|status` and `stackvault drill`: protection plans (the engine's
//! `vm::plan`, `vm::run`, `vm::status`, `vm::drill`; `docs/plans.md`).

use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::vm::drill::{self, DrillOptions, DrillOutcome};
use stackvault::vm::plan::{Plan, Shard, Span};
use stackvault::vm::run::{self, RunOptions, VmAction};
use stackvault::vm::status;

use crate::output::{self, Context};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Back up every VM of the plan that is due (its newest VM snapshot older than the RPO
    /// minus a margin), run its hooks, apply retention, the off-site copy and standby syncs.
    /// Safe to start from cron every few minutes: a run of the same plan (and shard) already
    /// in progress on this host is not started twice.
    Run(RunArgs),
    /// Show per application and VM the achieved RPO, MTTR, drill age, standby and off-site
    /// copy lag against the plan's objectives, with warnings.
    Status(StatusArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The plan (TOML; see docs/plans.md).
    plan: PathBuf,
    /// Only this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Only the VMs of shard I of N (1-based; by a hash of the VM name): N backup hosts share
    /// one plan and one repository, each running its own shard.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<Shard>,
    /// Say what would be done; back up, remove and copy nothing, run no hook.
    #[arg(long)]
    dry_run: bool,
    /// Back up the selected VMs even when they are not due.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The plan (TOML; see docs/plans.md).
    plan: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the status as a Prometheus textfile (replaced whole: temporary file, then
    /// rename), e.g. for node_exporter's textfile collector.
    #[arg(long, value_name = "FILE")]
    prometheus: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    /// The plan (TOML; see docs/plans.md).
    plan: PathBuf,
    /// The VM to recover.
    #[arg(long)]
    vm: String,
    /// Where to restore: a scratch directory, or a page blob container
    /// (`azure://ACCOUNT/CONTAINER`; its credentials come from the plan's [drill] section).
    /// Default: the plan's [drill] `to`, else the temporary directory.
    #[arg(long, value_name = "DIR|CONTAINER-URL")]
    to: Option<String>,
    /// Keep the restored disk files of a directory drill.
    #[arg(long)]
    keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    Shard::parse(s).map_err(|e| e.to_string())
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |v| Span(v.max(1)).to_string())
}

pub fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(a) => plan_run(ctx, a),
        Command::Status(a) => plan_status(a),
    }
}

fn plan_run(ctx: &Context, args: RunArgs) -> anyhow::Result<()> {
    let plan = Plan::load(&args.plan)?;
    let options = RunOptions {
        vm: args.vm.clone(),
        shard: args.shard,
        dry_run: args.dry_run,
        force: args.force,
    };
    let report = run::run(&plan, &args.plan, &options, &ctx.progress())
        .with_context(|| format!("plan run of {} failed", args.plan.display()))?;
    if args.json {
        output::json(&report)?;
    } else if let Some(holder) = &report.already_running {
        output::line(holder)?;
    } else {
        for v in &report.vms {
            let what = match v.action {
                VmAction::BackedUp => format!(
                    "backed up: VM snapshot {} in {}",
                    v.vm_snapshot_id.as_ref().map_or("-", |id| id.short()),
                    secs(v.duration_ms)
                ),
                VmAction::WouldBackUp => "would back up".into(),
                VmAction::NotDue => "not due".into(),
                VmAction::Failed => format!("FAILED: {}", v.error.as_deref().unwrap_or("")),
            };
            output::line(format!(
                "{}/{}  {what}  ({})",
                v.application, v.vm, v.reason
            ))?;
            for h in v.hooks.iter().filter(|h| !h.ok) {
                output::line(format!(
                    "    hook {} failed (exit {}): {}",
                    h.phase,
                    h.exit_code.map_or("-".into(), |c| c.to_string()),
                    h.stderr_tail.as_deref().unwrap_or("")
                ))?;
            }
            for s in &v.standby {
                output::line(format!(
                    "    standby {} of {}: {}",
                    s.target,
                    s.disk,
                    s.error
                        .clone()
                        .unwrap_or_else(|| format!("{} written", output::bytes(s.written_bytes)))
                ))?;
            }
        }
        for r in &report.retention {
            if !r.vm_snapshots_removed.is_empty() {
                output::line(format!(
                    "retention ({}): {} {} VM snapshot(s) of {}, {} kept",
                    r.repository,
                    if report.dry_run {
                        "would remove"
                    } else {
                        "removed"
                    },
                    r.vm_snapshots_removed.len(),
                    r.vm,
                    r.kept
                ))?;
            }
        }
        if let Some(c) = &report.copy {
            output::line(format!(
                "off-site copy to {}: {} snapshot(s) and {} VM record(s) copied, {} written{}",
                c.destination,
                c.snapshots_copied,
                c.vm_records_copied,
                output::bytes(c.bytes_written),
                if c.errors.is_empty() {
                    String::new()
                } else {
                    format!("; {}", c.errors.join("; "))
                }
            ))?;
        }
    }
    if report.failures > 0 {
        anyhow::bail!(
            "plan run: {} step(s) failed (see the report above); the VMs that succeeded are \
             backed up",
            report.failures
        );
    }
    Ok(())
}

fn plan_status(args: StatusArgs) -> anyhow::Result<()> {
    let plan = Plan::load(&args.plan)?;
    let now = time::OffsetDateTime::now_utc();
    let report = status::status(&plan, &args.plan, now)
        .with_context(|| format!("plan status of {} failed", args.plan.display()))?;
    if let Some(file) = &args.prometheus {
        status::write_atomically(file, &status::prometheus(&report))?;
    }
    if args.json {
        return output::json(&report);
    }
    output::line(format!(
        "{:<14} {:<16} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "APPLICATION", "VM", "RPO", "ACHIEVED", "RTO", "MTTR", "LAST DRILL", "COPY LAG"
    ))?;
    for app in &report.applications {
        for vm in &app.vms {
            output::line(format!(
                "{:<14} {:<16} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
                app.application,
                vm.vm,
                secs(Some(vm.rpo_ms)),
                secs(vm.achieved_rpo_ms),
                secs(Some(vm.rto_ms)),
                secs(vm.mttr_ms),
                secs(vm.last_drill_age_ms),
                secs(vm.offsite_copy_lag_ms)
            ))?;
            for s in &vm.standby {
                output::line(format!(
                    "{:<14} {:<16}   standby {} of {}: lag {}",
                    "",
                    "",
                    s.target,
                    s.disk,
                    secs(s.lag_ms)
                ))?;
            }
        }
    }
    for w in &report.warnings {
        output::line(format!("warning [{}]: {}", w.code, w.message))?;
    }
    Ok(())
}

pub fn drill(ctx: &Context, args: DrillArgs) -> anyhow::Result<()> {
    let plan = Plan::load(&args.plan)?;
    let repo = plan.repository.open()?;
    let options = DrillOptions {
        to: args.to.clone(),
        keep: args.keep,
    };
    let report = drill::drill(&repo, &plan, &args.vm, &options, &ctx.progress())
        .with_context(|| format!("drill of VM {} failed", args.vm))?;
    if args.json {
        output::json(&report)?;
    } else {
        output::line(format!(
            "drill {} of VM {} (VM snapshot {}): {}; time to recover {:.2} s",
            report.drill_id.short(),
            report.record.vm,
            report.record.vm_snapshot_id.short(),
            report.record.outcome.as_str(),
            report.record.recovery_ms as f64 / 1000.0
        ))?;
        for d in &report.record.disks {
            output::line(format!(
                "  {}  {}  restored {} in {:.2} s, verified {} in {:.2} s{}",
                d.name,
                d.outcome.as_str(),
                output::bytes(d.restored_bytes),
                d.restore_ms as f64 / 1000.0,
                output::bytes(d.verified_bytes),
                d.verify_ms as f64 / 1000.0,
                d.error
                    .as_deref()
                    .map_or(String::new(), |e| format!(": {e}"))
            ))?;
        }
        for left in &report.left_in_place {
            output::line(format!("  left in place: {left}"))?;
        }
    }
    match report.record.outcome {
        DrillOutcome::Passed => Ok(()),
        DrillOutcome::Differs => Err(stackvault::Error::TargetMismatch {
            target: report.record.target.clone(),
            snapshot: report.record.vm_snapshot_id.short().to_string(),
            offset: 0,
            what: "a restored disk differs from its snapshot; the drill is recorded as failed"
                .into(),
        }
        .into()),
        DrillOutcome::Failed => anyhow::bail!(
            "drill {} of VM {} failed (recorded): a disk could not be restored or verified",
            report.drill_id.short(),
            report.record.vm
        ),
    }
}
