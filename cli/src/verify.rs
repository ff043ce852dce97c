//! `stackvault verify`

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::format::short_chunk_id;
use stackvault::verify::{open_target, VerifyOptions, VerifyReport};
use stackvault::Repo;

use crate::azure::DiskArg;
use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: Option<OsString>,
    /// With `latest`: the latest snapshot of this disk.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Instead of reading the repository, prove that this restored disk holds exactly the
    /// snapshot's disk: a raw image, a fixed or dynamic VHD, a block device, or a page blob
    /// (`https://…?<SAS>` or `azure://ACCOUNT/CONTAINER/BLOB` with `--endpoint`).
    #[arg(long)]
    target: Option<PathBuf>,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    /// Do not store a verification record (for a read-only repository).
    #[arg(long)]
    no_record: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, [snapshot]) =
        ctx.split_repo([args.repo.map(Into::into), args.snapshot], ["SNAPSHOT"])?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let repo = Repo::open(&repo)?;
    let snap = repo.resolve_snapshot(&snapshot, args.disk.as_deref())?;
    let options = VerifyOptions {
        record: !args.no_record,
    };
    let progress = ctx.progress();
    let report = match &args.target {
        Some(path) => {
            let target_arg = DiskArg::of(path);
            let shown = target_arg.shown();
            let target: Box<dyn stackvault::DiskSource> = match target_arg {
                DiskArg::Blob(url) => Box::new(
                    stackvault::verify::open_page_blob_target(url, &args.blob.options()?)
                        .with_context(|| format!("cannot open page blob {shown}"))?,
                ),
                // A restored VHD that is damaged does not hold the snapshot: the target is
                // wrong (exit 5), not a backup source (exit 4).
                DiskArg::Local(path) => open_target(path)
                    .map_err(|e| match e {
                        stackvault::Error::SourceDamaged { offset, what, .. } => {
                            stackvault::Error::TargetMismatch {
                                target: shown.clone(),
                                snapshot: snap.id.short().to_string(),
                                offset,
                                what,
                            }
                        }
                        e => e,
                    })
                    .with_context(|| format!("cannot open target {shown}"))?,
            };
            stackvault::verify_target(&repo, &snap, target.as_ref(), &shown, &options, &progress)
        }
        None => stackvault::verify_snapshot(&repo, &snap, &options, &progress),
    }
    .with_context(|| format!("verify of snapshot {} failed", snap.id.short()))?;
    if args.json {
        output::json(&report)?;
    } else {
        print(&report)?;
    }
    // The exit code says whose fault it is: a target that differs (5) or damaged data (3).
    Ok(report.verdict()?)
}

fn print(r: &VerifyReport) -> anyhow::Result<()> {
    let against = match &r.target {
        Some(t) => format!("target {t} against snapshot"),
        None => "snapshot".into(),
    };
    output::line(format!(
        "verified {against} {} of disk {}: {}",
        r.snapshot_id.short(),
        r.disk,
        r.outcome.as_str().to_uppercase()
    ))?;
    output::line(format!(
        "  checked {} ({} chunks, {} in zero runs) in {:.2} s, checked at {}",
        output::bytes(r.bytes_checked),
        r.chunks_checked,
        output::bytes(r.zero_bytes),
        r.duration_ms as f64 / 1000.0,
        output::rate(r.bytes_checked, r.duration_ms)
    ))?;
    if r.problem_count > 0 {
        output::line(format!(
            "  {} problem ranges; the first {}:",
            r.problem_count,
            r.problems.len()
        ))?;
        for p in &r.problems {
            output::line(format!(
                "    disk offset {} length {} chunk {}: {}",
                p.offset,
                p.len,
                p.chunk
                    .as_deref()
                    .map(short_chunk_id)
                    .unwrap_or("(zero run)"),
                p.what
            ))?;
        }
    }
    if let Some(key) = &r.record {
        output::line(format!("  recorded as {key}"))?;
    }
    Ok(())
}
