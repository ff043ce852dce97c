//! `stackvault restore`

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::{OutputFormat, Repo, RestoreOptions};

use crate::azure::DiskArg;
use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: Option<OsString>,
    /// Output disk image file, or a page blob URL (restored as a fixed VHD).
    output: Option<PathBuf>,
    /// With `latest`: the latest snapshot of this disk.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Container of the restored disk: `raw`, `vhd-fixed` or `vhd-dynamic`. Default: the
    /// format the snapshot came from (a differencing VHD restores as dynamic; raw otherwise).
    #[arg(long, value_parser = crate::args::output_format)]
    output_format: Option<OutputFormat>,
    /// Fixed VHD: keep the disk's exact size (in whole sectors) instead of rounding it up to a
    /// whole MiB as Azure and Azure Stack Hub require.
    #[arg(long)]
    exact_size: bool,
    /// VHD: give the restored disk a new unique id instead of the source's.
    #[arg(long)]
    new_id: bool,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    #[command(flatten)]
    blob_restore: crate::azure::BlobRestoreArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, [snapshot, output]) = ctx.split_repo(
        [
            args.repo.map(Into::into),
            args.snapshot,
            args.output.map(Into::into),
        ],
        ["SNAPSHOT", "OUTPUT"],
    )?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let output = PathBuf::from(output);
    // Options are checked before anything is opened: a usage error does nothing.
    let target = DiskArg::of(&output);
    let blob_options = match target {
        DiskArg::Blob(_) => Some(args.blob_restore.options(&args.blob, args.force)?),
        DiskArg::Local(_) if args.blob_restore.any() => {
            return Err(stackvault::Error::Usage(
                "--existing, --resume, --journal-dir, --coalesce-gap and --parallel apply to \
                 page blob targets; the target is a file"
                    .into(),
            )
            .into())
        }
        DiskArg::Local(_) => None,
    };
    let repo = Repo::open(&repo)?;
    let snap = repo.resolve_snapshot(&snapshot, args.disk.as_deref())?;
    if let (DiskArg::Blob(url), Some(options)) = (target, blob_options) {
        let report = stackvault::restore_to_page_blob(&repo, &snap, url, &options, &ctx.progress())
            .with_context(|| format!("restore of snapshot {} failed", snap.id.short()))?;
        return crate::azure::print_restore(&report, args.json);
    }
    let options = RestoreOptions {
        force: args.force,
        output_format: args.output_format,
        exact_size: args.exact_size,
        new_id: args.new_id,
    };
    let report = stackvault::restore_to_file(&repo, &snap, &output, &options, &ctx.progress())
        .with_context(|| format!("restore of snapshot {} failed", snap.id.short()))?;
    // The output format is known only now when it defaulted to the snapshot's source format.
    if args.exact_size && report.output_format != OutputFormat::VhdFixed {
        eprintln!(
            "warning: --exact-size did nothing: it applies to fixed VHD output, and this \
             output is {} (pass --output-format vhd-fixed for a fixed VHD)",
            report.output_format
        );
    }
    if args.new_id && report.output_format == OutputFormat::Raw {
        eprintln!("warning: --new-id did nothing: a raw image has no VHD unique id");
    }
    if args.json {
        return output::json_with_requests(&report, output::requests_json(&repo));
    }
    output::line(format!(
        "restored snapshot {} of disk {} to {} ({} {})",
        report.snapshot_id.short(),
        report.disk,
        report.target,
        report.output_format,
        output::bytes(report.virtual_size)
    ))?;
    output::line(format!(
        "  wrote {} in {} chunks, {} left sparse, {:.2} s, written at {}",
        output::bytes(report.bytes_written),
        report.chunks,
        output::bytes(report.zero_bytes),
        report.duration_ms as f64 / 1000.0,
        output::rate(report.bytes_written, report.duration_ms)
    ))?;
    match output::requests_line(&repo) {
        Some(l) => output::line(l),
        None => Ok(()),
    }
}
