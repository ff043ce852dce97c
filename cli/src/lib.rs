//! `stackvault`: the command-line front end. Thin: parses arguments, calls the engine, prints
//! its reports (human text, or JSON with `--json`). All logic lives in the engine.
//!
//! A library with one entry point, [`main`], so that the `stackvault` binary (`src/main.rs`)
//! and the integration suite's copy of it (built by `cargo test` with the suite's features,
//! see the root `Cargo.toml`) are the same program.

mod args;
mod azure;
mod backup;
mod check;
mod copy;
mod diff;
mod forget;
mod index;
mod init;
mod key;
mod output;
mod password;
mod plan;
mod prune;
mod restore;
mod serve;
mod snapshots;
mod standby;
mod stats;
mod verify;
mod vm;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// The exit codes, shown by `--help`; they are part of the CLI's contract (README lists them
/// too) and follow `stackvault::ErrorClass::exit_code`.
const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    failure: I/O, network, a missing file, a lock held by another process
  2    usage: a bad option value or combination; nothing was done
  3    the repository or its stored data is damaged (page the backup admin)
  4    the source disk is damaged or inconsistent (fix or re-export the source)
  5    a restored disk does not match its snapshot (verify --target)
  6    a format or repository feature this build does not support
  7    wrong password: no key of the encrypted repository opens with it
  130  interrupted (SIGINT, SIGTERM) and stopped cleanly

The repository comes from -r/--repo or $STACKVAULT_REPOSITORY. The older form, the
repository as the first positional argument, still works (and then wins over the variable).";

/// Incremental block-level backup of virtual-machine disks.
#[derive(Parser, Debug)]
#[command(
    name = "stackvault",
    // The suite's copy of the binary has another file name; usage lines still say this.
    bin_name = "stackvault",
    version,
    propagate_version = true,
    after_help = EXIT_CODES
)]
struct Cli {
    /// No progress bars or informational output on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,

    /// Repository directory (default: $STACKVAULT_REPOSITORY).
    #[arg(
        id = "repo_flag",
        long = "repo",
        short = 'r',
        global = true,
        value_name = "REPO"
    )]
    repo_flag: Option<std::path::PathBuf>,

    /// Open the repository read-only: nothing is written into it (commands that must write
    /// refuse, exit 2). Automatic, without the flag, when the repository is not writable.
    #[arg(long, global = true)]
    read_only: bool,

    /// Endpoint of a repository on object storage (`azure://…` on Azure Stack Hub or Azurite,
    /// `s3://…` on MinIO or another S3-compatible service), given before the command. Remembered
    /// for the repository on this host once given.
    #[arg(long, env = "STACKVAULT_ENDPOINT", value_name = "URL")]
    endpoint: Option<String>,

    /// Read the repository password from the first line of this file (else
    /// $STACKVAULT_PASSWORD, else a prompt on a terminal).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        conflicts_with = "password_command"
    )]
    password_file: Option<std::path::PathBuf>,

    /// Run this shell command and take the first line it prints as the repository password.
    #[arg(long, global = true, value_name = "COMMAND")]
    password_command: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty repository (encrypted unless `--encryption none`).
    Init(init::Args),
    /// Manage the passwords (key objects) of an encrypted repository.
    #[command(subcommand)]
    Key(key::Command),
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
    /// Serve a snapshot as a read-only NBD disk (qemu, qemu-img, nbdinfo, the kernel) until Ctrl-C.
    Serve(serve::Args),
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
    /// Copy snapshots from another repository, sending only the chunks this one lacks.
    Copy(copy::Args),
    /// Back up every disk of a VM in parallel into one VM snapshot (all or nothing).
    BackupVm(vm::BackupArgs),
    /// List the VM snapshots in a repository.
    VmSnapshots(vm::ListArgs),
    /// Restore every disk of a VM snapshot into a directory, in parallel.
    RestoreVm(vm::RestoreArgs),
    /// Protection plans: back up what is due (`plan run`), check objectives (`plan status`).
    #[command(subcommand)]
    Plan(plan::Command),
    /// Restore and verify every disk of a VM of a plan to scratch, timed; record the drill.
    Drill(plan::DrillArgs),
    /// Standby disks kept in sync with a disk's latest snapshot, writing only what changed.
    #[command(subcommand)]
    Standby(standby::Command),
    /// Print a shell completion script (e.g. `stackvault completion bash > /etc/bash_completion.d/stackvault`).
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `stackvault man | man -l -`).
    Man,
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

/// Parses the process's arguments, runs the command, and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = output::Context {
        quiet: cli.quiet,
        repo_flag: cli.repo_flag,
        repo_env: std::env::var_os(args::REPO_ENV)
            .filter(|v| !v.is_empty())
            .map(Into::into),
        cancel: stackvault::Cancel::new(),
    };
    if let Err(e) = handle_interrupts(&ctx.cancel) {
        eprintln!("warning: cannot handle SIGINT/SIGTERM ({e}); an interrupt stops at once");
    }
    if cli.read_only {
        stackvault::repo::request_read_only();
    }
    if cli.endpoint.is_some() {
        stackvault::repo::set_store_options(stackvault::repo::StoreOptions {
            endpoint: cli.endpoint.clone(),
            profile: None,
        });
    }
    if !cli.quiet {
        stackvault::progress::set_notice_sink(|m| eprintln!("notice: {m}"));
    }
    let passwords = password::Provider::new(password::Source::unlock(
        cli.password_file.clone(),
        cli.password_command.clone(),
    ));
    {
        let provider = passwords.clone();
        stackvault::crypto::unlock::set_password_provider(std::sync::Arc::new(
            move |purpose, repository: &str| provider.password(purpose, repository),
        ));
    }
    let result = match cli.command {
        Command::Init(a) => {
            passwords.for_init();
            init::run(&ctx, a)
        }
        Command::Key(c) => key::run(&ctx, &passwords, c),
        Command::Backup(a) => backup::run(&ctx, a),
        Command::Snapshots(a) => snapshots::list(&ctx, a),
        Command::Show(a) => snapshots::show(&ctx, a),
        Command::Restore(a) => restore::run(&ctx, a),
        Command::Diff(a) => diff::run(&ctx, a),
        Command::Verify(a) => verify::run(&ctx, a),
        Command::Serve(a) => serve::run(&ctx, a),
        Command::Check(a) => check::run(&ctx, a),
        Command::Index(c) => index::run(&ctx, c),
        Command::Forget(a) => forget::run(&ctx, a),
        Command::Prune(a) => prune::run(&ctx, a),
        Command::Stats(a) => stats::run(&ctx, a),
        Command::Copy(a) => copy::run(&ctx, a),
        Command::Standby(c) => standby::run(&ctx, c),
        Command::BackupVm(a) => vm::backup(&ctx, a),
        Command::VmSnapshots(a) => vm::list(&ctx, a),
        Command::RestoreVm(a) => vm::restore(&ctx, a),
        Command::Plan(c) => plan::run(&ctx, c),
        Command::Drill(a) => plan::drill(&ctx, a),
        Command::Completion { shell } => {
            // Rendered into memory first: clap_complete panics when its writer fails, and a
            // closed pipe must end the program quietly like every other command.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "stackvault", &mut script);
            output::raw(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .map_err(anyhow::Error::from)
                .and_then(|()| output::raw(&page))
        }
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
            print_error(&err);
            // The first engine error in the chain decides whose fault it is.
            let code = err
                .chain()
                .find_map(|c| c.downcast_ref::<stackvault::Error>())
                .map_or(1, |e| e.class().exit_code());
            ExitCode::from(code)
        }
    }
}

/// Prints an error and the causes that add something: an engine error often shows its source
/// in its own text (`open X: No such file`) and returns it from `source()` as well, so a cause
/// whose text was already printed is left out.
fn print_error(err: &anyhow::Error) {
    let mut printed = err.to_string();
    eprintln!("error: {printed}");
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if printed.contains(&text) {
            continue;
        }
        eprintln!("  caused by: {text}");
        printed.push('\n');
        printed.push_str(&text);
    }
}
