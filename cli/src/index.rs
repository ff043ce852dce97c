//! `stackvault index rebuild`

use std::path::PathBuf;

use crate::output::{self, Context};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Rebuild index.sqlite from the packs, manifests and verification records alone
    /// (replaces a damaged or lost index; refuses to start while backups run).
    Rebuild(RebuildArgs),
}

#[derive(clap::Args, Debug)]
pub struct RebuildArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Rebuild(args) => {
            let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
            let report = stackvault::repo::rebuild_index(&repo)?;
            if args.json {
                output::json(&report)?;
                return Ok(report.damage(&repo)?);
            }
            output::line(format!(
                "rebuilt the index of {}: {} packs, {} chunks, {} snapshots, {} verification records",
                repo.display(),
                report.packs,
                report.chunks,
                report.snapshots,
                report.verifications
            ))?;
            for p in &report.problems {
                output::line(format!("  not indexed: {p}"))?;
            }
            Ok(report.damage(&repo)?)
        }
    }
}
