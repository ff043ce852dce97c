//! `stackvault backup`

use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::{BackupOptions, Repo, SourceFormat, SourceOptions};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Repository directory.
    repo: PathBuf,
    /// Disk image or block device to back up.
    source: PathBuf,
    /// Name of the disk (e.g. `web01-os`); its snapshots form one history.
    #[arg(long)]
    disk: String,
    /// Container format of the source: `auto` (detected from the content: a VHD footer
    /// makes it a fixed, dynamic or differencing VHD, anything else is raw), `raw` or `vhd`.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Parent of a differencing VHD, instead of the path its parent locators name.
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let repo = Repo::open(&args.repo)?;
    let source_options = SourceOptions {
        format: SourceFormat::parse(&args.format)?,
        parent: args.parent,
    };
    let source = stackvault::open_source(&args.source, &source_options)
        .with_context(|| format!("cannot open source {}", args.source.display()))?;
    // Tolerated damage (a wrong checksum...) is reported, as qemu does, but does not stop us.
    if let Some(vhd) = source.info().vhd {
        for w in &vhd.warnings {
            eprintln!("warning: {w}");
        }
    }
    let options = BackupOptions { disk: args.disk };
    let report = stackvault::backup(&repo, source.as_ref(), &options, &ctx.progress())
        .with_context(|| format!("backup of {} failed", args.source.display()))?;
    if args.json {
        return output::json(&report);
    }
    let s = &report.stats;
    output::line(format!(
        "snapshot {} of disk {} ({}, {} {})",
        &report.snapshot_id[..12],
        report.disk,
        report.kind.as_str(),
        report.source_format,
        output::bytes(report.virtual_size)
    ))?;
    output::line(format!(
        "  read {}, zero {} skipped ({} unallocated never read)",
        output::bytes(s.bytes_read),
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
        "  {:.2} s, {:.1} MB/s",
        s.duration_ms as f64 / 1000.0,
        report.throughput_mb_s
    ))
}
