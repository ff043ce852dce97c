//! `stackvault standby sync` and `standby status`: standby disks kept equal to the latest
//! snapshot of a disk, writing only what changed.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::standby::{self, SyncOptions};
use stackvault::{OutputFormat, Repo};

use crate::output::{self, Context};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Bring a standby disk (file, block device or page blob) to a snapshot of its disk:
    /// the first time a full restore, then only the ranges that changed.
    Sync(SyncArgs),
    /// Show which snapshot a standby disk holds, since when, and whether it is clean or a
    /// sync was interrupted ("applying").
    Status(StatusArgs),
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// The standby disk: a file (raw, or fixed VHD when named .vhd), a block device, or a page
    /// blob URL.
    target: Option<OsString>,
    /// The disk whose snapshots the standby follows.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: String,
    /// Snapshot id or prefix to bring the standby to (default: the disk's latest).
    #[arg(long, default_value = "latest")]
    snapshot: String,
    /// Rewrite the whole standby whatever it holds (another disk, an unknown snapshot, a
    /// target changed behind our back, or a file or device without a standby record).
    #[arg(long)]
    full: bool,
    /// File targets: `raw` or `vhd-fixed` (default: what the target holds, else vhd-fixed for
    /// a name ending in .vhd, raw otherwise).
    #[arg(long, value_parser = crate::args::output_format)]
    format: Option<OutputFormat>,
    /// After the sync, compare a share of the target's segments with the snapshot's chunk
    /// ids (`5%`, `100%`); a difference marks the standby diverged and exits 5.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    verify: Option<f64>,
    /// Page blobs: take a blob snapshot after each clean sync and keep the newest N (at most
    /// 1000, Azure Stack Hub's limit), so that failover can pick an earlier point.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_blob_snapshots: u32,
    /// Block devices: directory of standby records (default
    /// $XDG_STATE_HOME/stackvault/standby or ~/.local/state/stackvault/standby).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Page blobs: changed ranges up to SIZE apart are sent in one Put Page request (up to
    /// 4 MiB), the unchanged bytes between them rewritten with the same content, instead of
    /// one request each (default: chosen per sync, at most 64KiB, so that the rewritten bytes
    /// stay within 10% of the changed bytes; 0 sends changed pages only). Bytes, or with
    /// KiB/MiB.
    #[arg(long, value_name = "SIZE", value_parser = crate::azure::parse_size)]
    coalesce_gap: Option<u64>,
    /// Page blobs: Put Page requests in flight (default 16; memory about N × 4 MiB).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: Option<u16>,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The standby disk: a file, a block device, or a page blob URL.
    target: PathBuf,
    /// Block devices: directory of standby records (as for `standby sync`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `5%`, `5`, `0.5%`: a share of 0 < p <= 100 percent, as a fraction.
fn percent(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_end_matches('%');
    match t.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p / 100.0),
        _ => Err(format!(
            "{s:?}: expected a percentage above 0 and at most 100, such as 5%"
        )),
    }
}

pub fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Sync(a) => sync(ctx, a),
        Command::Status(a) => status(a),
    }
}

fn target_text(target: &std::path::Path) -> anyhow::Result<&str> {
    target
        .to_str()
        .context("the target path is not UTF-8; give another name")
}

fn sync(ctx: &Context, args: SyncArgs) -> anyhow::Result<()> {
    let (repo, [target]) = ctx.split_repo([args.repo.map(Into::into), args.target], ["TARGET"])?;
    let target = PathBuf::from(target);
    let options = SyncOptions {
        full: args.full,
        format: args.format,
        verify_share: args.verify,
        keep_blob_snapshots: args.keep_blob_snapshots,
        state_dir: args.state_dir,
        blob: args.blob.options().context("page blob options")?,
        coalesce_gap: args.coalesce_gap,
        parallel: args.parallel.map_or(0, usize::from),
        ..Default::default()
    };
    let repo = Repo::open(&repo)?;
    let snap = repo.resolve_snapshot(&args.snapshot, Some(&args.disk))?;
    let report = standby::sync(
        &repo,
        &snap,
        target_text(&target)?,
        &options,
        &ctx.progress(),
    )
    .with_context(|| {
        format!(
            "standby sync of {} to snapshot {} failed",
            crate::azure::DiskArg::of(&target).shown(),
            snap.id.short()
        )
    })?;
    if args.json {
        return output::json(&report);
    }
    for note in &report.notes {
        output::line(format!("note: {note}"))?;
    }
    output::line(format!(
        "{} now holds snapshot {} of disk {} ({} {}, {} sync{}{})",
        report.target,
        report.snapshot_id.short(),
        report.disk,
        report.target_format,
        output::bytes(report.virtual_size),
        report.mode,
        report
            .previous_snapshot_id
            .as_ref()
            .map(|p| format!(" from {}", p.short()))
            .unwrap_or_default(),
        if report.completed_interrupted.is_empty() {
            String::new()
        } else {
            ", completing an interrupted sync".into()
        }
    ))?;
    output::line(format!(
        "  wrote {} in {} ranges, zeroed {} in {} ranges, {} requests{}{}, {:.2} s",
        output::bytes(report.written_bytes),
        report.written_ranges,
        output::bytes(report.zeroed_bytes),
        report.zeroed_ranges,
        report.requests,
        report
            .uploaded_bytes
            .map(|u| format!(
                ", uploaded {} ({} of it unchanged bytes between nearby changes)",
                output::bytes(u),
                output::bytes(report.gap_bytes)
            ))
            .unwrap_or_default(),
        if report.resized {
            ", resized first"
        } else {
            ""
        },
        report.duration_ms as f64 / 1000.0
    ))?;
    if let Some(v) = &report.verify {
        output::line(format!(
            "  verified {} of {} segments ({:.1}%, {}) against the snapshot's chunk ids",
            v.segments_checked,
            v.segments_total,
            v.share_percent,
            output::bytes(v.bytes_checked)
        ))?;
    }
    if let Some(s) = &report.blob_snapshot {
        output::line(format!(
            "  blob snapshot {s} taken, {} older deleted",
            report.blob_snapshots_deleted
        ))?;
    }
    Ok(())
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let options = SyncOptions {
        state_dir: args.state_dir,
        blob: args.blob.options().context("page blob options")?,
        ..Default::default()
    };
    let report = standby::status(target_text(&args.target)?, &options)?;
    if args.json {
        return output::json(&report);
    }
    for note in &report.notes {
        output::line(format!("note: {note}"))?;
    }
    if let Some(lease) = &report.lease {
        output::line(lease_line(&report.target, lease))?;
    }
    match (report.state.as_str(), &report.disk) {
        ("none", _) | ("unknown", _) | (_, None) => output::line(format!(
            "{}: no standby record ({}): not a standby disk, or not one stackvault can vouch for",
            report.target, report.record_location
        )),
        (state, Some(disk)) => {
            let held = report
                .snapshot_id
                .as_ref()
                .map_or_else(|| "nothing yet".to_string(), |s| s.short().to_string());
            output::line(format!(
                "{}: disk {disk}, holds snapshot {held}, {state} since {}{}{}",
                report.target,
                report.since.as_deref().unwrap_or("?"),
                if report.applying.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (applying {})",
                        report
                            .applying
                            .iter()
                            .map(|s| s.short())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if report.sync_running {
                    "; a sync is running now"
                } else {
                    ""
                }
            ))
        }
    }
}

/// `TARGET: lease leased (locked, fixed), held by a sync that is no longer running (pid …)`.
fn lease_line(target: &str, lease: &standby::LeaseReport) -> String {
    let state = lease.state.as_deref().unwrap_or("not reported");
    let details: Vec<&str> = [lease.status.as_deref(), lease.duration.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let details = if details.is_empty() {
        String::new()
    } else {
        format!(" ({})", details.join(", "))
    };
    let sync = format!(
        "pid {} on host {}",
        lease.pid.unwrap_or(0),
        lease.host.as_deref().unwrap_or("?")
    );
    let holder = match lease.holder.as_deref() {
        Some("running-sync") => format!(", held by the sync running now ({sync})"),
        Some("dead-sync") => format!(", held by a sync that is no longer running ({sync})"),
        Some("remote-sync") => format!(", held by a sync on another host ({sync})"),
        Some(_) => ", held by a writer that is not a standby sync".to_string(),
        None => String::new(),
    };
    format!("{target}: lease {state}{details}{holder}")
}
