//! `stackvault backup`

use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::format::short_id;
use stackvault::{BackupMode, BackupOptions, ChangeList, Repo, SourceFormat, SourceOptions};

use crate::azure::DiskArg;
use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Disk image or block device to back up, or a page blob URL (`https://…?SAS`,
    /// `azure://ACCOUNT/CONTAINER/BLOB` with `--endpoint` and `--account-key-env`).
    #[arg(value_name = "SOURCE")]
    source: Option<PathBuf>,
    /// Name of the disk (e.g. `web01-os`); its snapshots form one history.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: String,
    /// Container format of the source: `auto` (detected from the content: a VHD footer
    /// makes it a fixed, dynamic or differencing VHD, anything else is raw), `raw` or `vhd`.
    #[arg(long, default_value = "auto", value_parser = crate::args::source_format)]
    format: SourceFormat,
    /// Parent file of a differencing VHD, instead of the path its parent locators name.
    #[arg(long, value_name = "PATH")]
    parent_vhd: Option<PathBuf>,
    /// Read everything and record no parent.
    #[arg(long, conflicts_with_all = ["differential", "parent"])]
    full: bool,
    /// Relative to the latest full snapshot of the disk (default: the latest snapshot).
    #[arg(long)]
    differential: bool,
    /// Parent snapshot (id, prefix or `latest`), overriding the default choice.
    #[arg(long)]
    parent: Option<String>,
    /// Ranges changed since the parent: Azure Get Page Ranges diff XML (a complete answer,
    /// without a `NextMarker`), JSON `[{"offset":N,"length":N}]`, JSON `{"base": "<snapshot
    /// id or blob snapshot time>", "ranges": [...]}` (refused unless the base is the parent),
    /// or `stackvault diff --json` output (relative to its `from` snapshot). Only segments
    /// they touch are read.
    #[arg(long, value_name = "FILE")]
    changed_ranges: Option<PathBuf>,
    /// If change knowledge does not fit the parent snapshot, read everything instead of failing.
    #[arg(long)]
    fallback_full: bool,
    /// Page blob source: ask the service which ranges changed since this blob snapshot
    /// (Get Page Ranges with `prevsnapshot`, a snapshot time such as
    /// `2026-01-01T00:00:00.0000000Z`). By default, the blob snapshot the parent snapshot
    /// was read from, when it was read from a snapshot of the same blob; a time that is not
    /// the parent's source is refused (or, with --fallback-full, everything is read).
    #[arg(long, value_name = "TIME", conflicts_with = "changed_ranges")]
    since_snapshot: Option<String>,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, [source]) = ctx.split_repo(
        [args.repo.map(Into::into), args.source.map(Into::into)],
        ["SOURCE"],
    )?;
    let source_path = PathBuf::from(source);
    let source_arg = DiskArg::of(&source_path);
    if args.since_snapshot.is_some() && matches!(source_arg, DiskArg::Local(_)) {
        return Err(stackvault::Error::Usage(
            "--since-snapshot needs a page blob source (a blob URL or azure://...)".into(),
        )
        .into());
    }
    let repo = Repo::open(&repo)?;
    let shown = source_arg.shown();
    let mut since = None;
    let source: Box<dyn stackvault::DiskSource> = match source_arg {
        DiskArg::Blob(url) => {
            let blob = args.blob.open_source(url, &shown)?;
            if let Some(t) = &args.since_snapshot {
                since = Some(blob.changes_since_snapshot(t)?);
            }
            Box::new(blob)
        }
        DiskArg::Local(path) => {
            let source_options = SourceOptions {
                format: args.format,
                parent: args.parent_vhd.clone(),
            };
            stackvault::open_source(path, &source_options)
                .with_context(|| format!("cannot open source {shown}"))?
        }
    };
    let changes = match &args.changed_ranges {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read change list {}", path.display()))?;
            Some(ChangeList::parse(&text, &path.display().to_string())?)
        }
        None => since,
    };
    let mode = if args.full {
        BackupMode::Full
    } else if args.differential {
        BackupMode::Differential
    } else {
        BackupMode::Auto
    };
    let options = BackupOptions {
        disk: args.disk,
        mode,
        parent: args.parent,
        changes,
        fallback_full: args.fallback_full,
    };
    let report = stackvault::backup(&repo, source.as_ref(), &options, &ctx.progress())
        .with_context(|| format!("backup of {shown} failed"))?;
    if args.json {
        return output::json_with_requests(&report, output::requests_json(&repo));
    }
    let s = &report.stats;
    output::line(format!(
        "snapshot {} of disk {} ({}, {} {})",
        report.snapshot_id.short(),
        report.disk,
        report.kind.as_str(),
        report.source_format,
        output::bytes(report.virtual_size)
    ))?;
    if let Some(parent) = &report.parent {
        output::line(format!(
            "  parent {}, change knowledge: {}",
            short_id(parent),
            report.change_source
        ))?;
    }
    output::line(format!(
        "  read {}, unchanged {} not read, zero {} ({} unallocated never read)",
        output::bytes(s.bytes_read),
        output::bytes(s.skipped_bytes),
        output::bytes(s.zero_bytes),
        output::bytes(s.unallocated_bytes)
    ))?;
    output::line(format!(
        "  chunks {} ({} new, {} uncompressed), added {} to the repository",
        s.chunks,
        s.new_chunks,
        output::bytes(s.new_bytes),
        output::bytes(s.bytes_added)
    ))?;
    output::line(format!(
        "  {:.2} s, read at {}",
        s.duration_ms as f64 / 1000.0,
        output::rate(s.bytes_read, s.duration_ms)
    ))?;
    match output::requests_line(&repo) {
        Some(l) => output::line(l),
        None => Ok(()),
    }
}
