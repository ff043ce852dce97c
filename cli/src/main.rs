//! `stackvault`: the command-line front end. Thin: parses arguments, calls the engine, prints
//! its reports (human text, or JSON with `--json`). All logic lives in the engine.

mod azure;
mod backup;
mod check;
mod diff;
mod forget;
mod index;
mod init;
mod output;
mod prune;
mod restore;
mod snapshots;
mod stats;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Incremental block-level backup of virtual-machine disks.
#[derive(Parser, Debug)]
#[command(name = "stackvault", version, about, propagate_version = true)]
struct Cli {
    /// No progress bars or informational output on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,

    /// Open the repository read-only: nothing is written into it (commands that must write
    /// refuse, exit 2). Automatic, without the flag, when the repository is not writable.
    #[arg(long, global = true)]
    read_only: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty repository.
    Init(init::Args),
    /// Back up a disk image into a repository.
    Backup(backup::Args),
    /// List the snapshots in a repository.
    Snapshots(snapshots::ListArgs),
    /// Show everything recorded about one snapshot.
    Show(snapshots::ShowArgs),
    /// Restore a snapshot to a disk image file.
    Restore(restore::Args),
    /// Show the byte ranges that differ between two snapshots.
    Diff(diff::Args),
    /// Prove a snapshot restores: read back every chunk, or compare a restored disk.
    Verify(verify::Args),
    /// Check the repository's structure and, optionally, its stored data.
    Check(check::Args),
    /// Maintain the index (derived state).
    #[command(subcommand)]
    Index(index::Command),
    /// Remove snapshots, named or by a retention policy (their data stays until prune).
    Forget(forget::Args),
    /// Delete stored data no snapshot references; rewrite mostly unused packs.
    Prune(prune::Args),
    /// Show the space each snapshot and disk takes, and what forgetting it would free.
    Stats(stats::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = output::Context { quiet: cli.quiet };
    if cli.read_only {
        stackvault::repo::request_read_only();
    }
    if !cli.quiet {
        stackvault::progress::set_notice_sink(|m| eprintln!("notice: {m}"));
    }
    let result = match cli.command {
        Command::Init(a) => init::run(&ctx, a),
        Command::Backup(a) => backup::run(&ctx, a),
        Command::Snapshots(a) => snapshots::list(&ctx, a),
        Command::Show(a) => snapshots::show(&ctx, a),
        Command::Restore(a) => restore::run(&ctx, a),
        Command::Diff(a) => diff::run(&ctx, a),
        Command::Verify(a) => verify::run(&ctx, a),
        Command::Check(a) => check::run(&ctx, a),
        Command::Index(c) => index::run(&ctx, c),
        Command::Forget(a) => forget::run(&ctx, a),
        Command::Prune(a) => prune::run(&ctx, a),
        Command::Stats(a) => stats::run(&ctx, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if output::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            // The first engine error in the chain decides whose fault it is.
            let code = err
                .chain()
                .find_map(|c| c.downcast_ref::<stackvault::Error>())
                .map_or(1, |e| e.class().exit_code());
            ExitCode::from(code)
        }
    }
}
