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

/// SIGINT and SIGTERM set `cancel`: the running operation stops at its next safe point,
/// releases its locks, removes what it had half written and exits 130. A second signal while
/// it does so ends the process at once (exit 130), for an operation stuck on a hung disk.
/// signal-hook's flag handlers only store to an atomic, which is async-signal-safe.
fn handle_interrupts(cancel: &stackvault::Cancel) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.flag())?;
        signal_hook::flag::register(sig, cancel.flag())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = output::Context {
        quiet: cli.quiet,
        cancel: stackvault::Cancel::new(),
    };
    if let Err(e) = handle_interrupts(&ctx.cancel) {
        eprintln!("warning: cannot handle SIGINT/SIGTERM ({e}); an interrupt stops at once");
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
            // An interrupt is not a failure: one line says what was kept.
            if let Some(stackvault::Error::Cancelled(summary)) = err
                .chain()
                .find_map(|c| c.downcast_ref::<stackvault::Error>())
            {
                eprintln!("interrupted: {summary}");
                return ExitCode::from(stackvault::ErrorClass::Cancelled.exit_code());
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
