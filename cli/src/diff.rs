//! `stackvault diff`

use std::ffi::OsString;
use std::path::PathBuf;

use stackvault::Repo;

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// The older snapshot (id, prefix or `latest`).
    from: Option<OsString>,
    /// The newer snapshot (id, prefix or `latest`).
    to: Option<OsString>,
    /// Print the report (with every range) as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, [from, to]) = ctx.split_repo(
        [args.repo.map(Into::into), args.from, args.to],
        ["FROM", "TO"],
    )?;
    let repo = Repo::open(&repo)?;
    let from = repo.resolve_snapshot(&crate::args::text(from, "FROM")?, None)?;
    let to = repo.resolve_snapshot(&crate::args::text(to, "TO")?, None)?;
    let report = stackvault::diff::diff(
        &from.id,
        &repo.load_manifest(&from.id)?,
        &to.id,
        &repo.load_manifest(&to.id)?,
    )?;
    if args.json {
        return output::json(&report);
    }
    output::line(format!(
        "{} -> {}: {} changed in {} ranges ({} segments)",
        from.id.short(),
        to.id.short(),
        output::bytes(report.changed_bytes),
        report.changed_ranges.len(),
        report.changed_segments
    ))?;
    const SHOWN: usize = 20;
    for r in report.changed_ranges.iter().take(SHOWN) {
        output::line(format!(
            "  {:>14} +{:<12} ({})",
            r.offset,
            r.length,
            output::bytes(r.length)
        ))?;
    }
    if report.changed_ranges.len() > SHOWN {
        output::line(format!(
            "  ... {} more (--json lists all)",
            report.changed_ranges.len() - SHOWN
        ))?;
    }
    Ok(())
}
