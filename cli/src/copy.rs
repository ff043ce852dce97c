//! `stackvault copy`

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use stackvault::copy::{CopyOptions, CopyOutcome, CopyReport};
use stackvault::format::short_id;
use stackvault::Repo;

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Repository to copy snapshots from (only read; it may be read-only).
    #[arg(long, value_name = "SRC")]
    from: PathBuf,
    /// Repository to copy them into (default: -r REPO or STACKVAULT_REPOSITORY). Create it
    /// with `init --like SRC` so that chunks deduplicate and snapshot ids stay the same.
    #[arg(long, value_name = "DST")]
    to: Option<PathBuf>,
    /// Endpoint of the source when it is on an object store (remembered for that location);
    /// with two remote locations each takes its own, and `--endpoint` is refused.
    #[arg(long, value_name = "URL")]
    from_endpoint: Option<String>,
    /// Endpoint of the destination when it is on an object store (remembered for it).
    #[arg(long, value_name = "URL")]
    to_endpoint: Option<String>,
    /// Only snapshots of this disk (with `latest`: this disk's latest).
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Snapshots to copy (ids, unique prefixes or `latest`); default: every snapshot of SRC
    /// (of `--disk`). Snapshots DST already has are skipped.
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<OsString>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let to = match args.to {
        Some(to) => {
            if let Some(flag) = &ctx.repo_flag {
                return Err(stackvault::Error::Usage(format!(
                    "the destination is given twice, as -r {} and as --to {}: keep one",
                    flag.display(),
                    to.display()
                ))
                .into());
            }
            to
        }
        None => ctx.split_repo([], [])?.0,
    };
    let snapshots = args
        .snapshots
        .into_iter()
        .map(|s| crate::args::text(s, "SNAPSHOT"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    endpoints(&args.from, args.from_endpoint, &to, args.to_endpoint)?;
    let src = Repo::open(&args.from)
        .with_context(|| format!("cannot open the source repository {}", args.from.display()))?;
    let dst = Repo::open(&to)
        .with_context(|| format!("cannot open the destination repository {}", to.display()))?;
    let options = CopyOptions {
        disk: args.disk,
        snapshots,
    };
    let mut report =
        stackvault::copy(&src, &dst, &options, &ctx.progress()).with_context(|| {
            format!(
                "copy from {} to {} failed",
                args.from.display(),
                to.display()
            )
        })?;
    if args.json {
        let requests = serde_json::json!({
            "from": output::requests_json(&src),
            "to": output::requests_json(&dst),
        });
        output::json_with_requests(&report, requests)?;
    } else {
        print(&report)?;
    }
    // The exit code says what went wrong with the first snapshot that failed (3: damage).
    let first = std::mem::take(&mut report.errors).into_iter().next();
    match first {
        None => Ok(()),
        Some(first) => Err(anyhow::Error::from(first).context(format!(
            "{} snapshots were not copied (listed above); the others were",
            report.snapshots_failed
        ))),
    }
}

fn print(r: &CopyReport) -> anyhow::Result<()> {
    for s in &r.snapshots {
        let what = match s.outcome {
            CopyOutcome::Copied => "copied".to_string(),
            CopyOutcome::Rechunked => format!(
                "re-chunked as {}",
                s.destination_snapshot_id.as_deref().map_or("?", short_id)
            ),
            CopyOutcome::Skipped => "already there".to_string(),
            CopyOutcome::Failed => format!("FAILED: {}", s.error.as_deref().unwrap_or("")),
        };
        output::line(format!(
            "  {} {} {}: {what}",
            s.snapshot_id.short(),
            s.disk,
            s.time
        ))?;
    }
    output::line(format!(
        "copied {} snapshots from {} to {}{}, {} already there, {} failed",
        r.snapshots_copied,
        r.source,
        r.destination,
        if r.rechunked {
            " (re-chunked: the repositories chunk differently)"
        } else {
            ""
        },
        r.snapshots_skipped,
        r.snapshots_failed
    ))?;
    output::line(format!(
        "  sent {} chunks ({} read, {} written in {} packs), {} chunks already there; {:.2} s",
        r.chunks_sent,
        output::bytes(r.bytes_read),
        output::bytes(r.bytes_written),
        r.packs_written,
        r.chunks_skipped,
        r.duration_ms as f64 / 1000.0
    ))?;
    if r.packs_adopted > 0 {
        output::line(format!(
            "  indexed {} packs an interrupted run had stored",
            r.packs_adopted
        ))?;
    }
    Ok(())
}

/// Gives each remote location of the copy its own endpoint. The rule: `--from-endpoint` and
/// `--to-endpoint` name the source's and the destination's; a plain `--endpoint` names the
/// only remote location there is, and is refused when both are remote (it would silently
/// send one of them to the wrong service).
fn endpoints(
    from: &std::path::Path,
    from_endpoint: Option<String>,
    to: &std::path::Path,
    to_endpoint: Option<String>,
) -> anyhow::Result<()> {
    use stackvault::repo::{RepoLocation, StoreOptions};
    let from = RepoLocation::from_path(from)?;
    let to = RepoLocation::from_path(to)?;
    let global = stackvault::repo::given_store_options();
    if from.is_remote() && to.is_remote() && global.endpoint.is_some() {
        return Err(stackvault::Error::Usage(format!(
            "copy from {from} to {to}: --endpoint would apply to both stores; give each its \
             own with --from-endpoint and --to-endpoint (each is remembered for its location)"
        ))
        .into());
    }
    for (location, endpoint, flag) in [
        (&from, from_endpoint, "--from-endpoint"),
        (&to, to_endpoint, "--to-endpoint"),
    ] {
        let Some(endpoint) = endpoint else { continue };
        if !location.is_remote() {
            return Err(stackvault::Error::Usage(format!(
                "{flag} {endpoint}: {location} is a local directory, which has no endpoint"
            ))
            .into());
        }
        stackvault::repo::set_store_options_for(
            location,
            StoreOptions {
                endpoint: Some(endpoint),
                profile: global.profile,
            },
        );
    }
    Ok(())
}
