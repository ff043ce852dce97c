//! `stackvault backup-vm`, `vm-snapshots`, `restore-vm`: the disks of a VM as one unit
//! (the engine's `vm` module; records in `format-spec/vm.md`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stackvault::vm::{self, VmBackupOptions, VmDiskSource, VmRestoreOptions};
use stackvault::VmSnapshotId;
use stackvault::{BackupMode, Error, OutputFormat, Repo, SourceFormat, SourceOptions};

use crate::azure::DiskArg;
use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// [REPO] (unless given with -r or STACKVAULT_REPOSITORY), then the VM's disks as
    /// DISK=SOURCE: a disk name within the VM (`os`, `data1`) and a disk image, block device or
    /// page blob URL, as `backup` takes them. Each disk's snapshots form the history of the
    /// repository disk `VM:DISK`.
    #[arg(value_name = "[REPO] DISK=SOURCE", required = true)]
    positionals: Vec<OsString>,
    /// Name of the VM (`erp-db01`).
    #[arg(long)]
    vm: String,
    /// Read every disk in full and record no parents.
    #[arg(long)]
    full: bool,
    /// Every source is a page blob snapshot (`?snapshot=` in its URL) and the snapshots were
    /// taken together (one restore point): record the VM snapshot as crash-consistent across
    /// disks. Without it, or when a source is not a blob snapshot, it is per-disk consistent.
    #[arg(long)]
    blob_snapshots_taken_together: bool,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Only the VM snapshots of this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// VM snapshot id, unique prefix, or `latest`.
    snapshot: Option<OsString>,
    /// Directory to restore into (created if missing): one file per disk, `DISK.vhd` (or
    /// `DISK.img` with `--format raw`); or a blob container URL (`https://…/CONTAINER?SAS`,
    /// `azure://ACCOUNT/CONTAINER`): one page blob per disk, `VM-DISK.vhd`, Azure-ready.
    dir: Option<PathBuf>,
    /// Name of the VM.
    #[arg(long)]
    vm: String,
    /// Container of the restored disks: `vhd` (fixed VHD, rounded up to a whole MiB as Azure
    /// and Azure Stack Hub require) or `raw`.
    #[arg(long, value_enum, default_value_t = DiskContainer::Vhd)]
    format: DiskContainer,
    /// Overwrite disk files (or page blobs) that exist.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    blob: crate::azure::BlobArgs,
    #[command(flatten)]
    blob_restore: crate::azure::BlobRestoreArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One `DISK=SOURCE` argument.
fn split_disk(arg: OsString) -> anyhow::Result<(String, PathBuf)> {
    let text = crate::args::text(arg, "DISK=SOURCE")?;
    match text.split_once('=') {
        Some((disk, source)) if !disk.is_empty() && !source.is_empty() => {
            Ok((disk.to_string(), PathBuf::from(source)))
        }
        _ => Err(Error::Usage(format!(
            "{:?}: give each disk as DISK=SOURCE (e.g. os=/exports/vm-os.vhd)",
            DiskArg::of(Path::new(&text)).shown()
        ))
        .into()),
    }
}

pub fn backup(ctx: &Context, args: BackupArgs) -> anyhow::Result<()> {
    let (repo, given) = ctx.split_repo_list(args.positionals)?;
    let disks = given
        .into_iter()
        .map(split_disk)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if disks.is_empty() {
        return Err(Error::Usage("give the VM's disks as DISK=SOURCE".into()).into());
    }
    vm::validate_name("VM", &args.vm).map_err(|e| Error::Usage(e.to_string()))?;
    for (name, _) in &disks {
        vm::validate_name("disk", name).map_err(|e| Error::Usage(e.to_string()))?;
    }
    let repo = Repo::open(&repo)?;
    let mut sources: Vec<(String, Box<dyn stackvault::DiskSource>)> = Vec::new();
    for (name, path) in &disks {
        let arg = DiskArg::of(path);
        let shown = arg.shown();
        let source: Box<dyn stackvault::DiskSource> = match arg {
            DiskArg::Blob(url) => Box::new(args.blob.open_source(url, &shown)?),
            DiskArg::Local(path) => {
                let options = SourceOptions {
                    format: SourceFormat::Auto,
                    parent: None,
                };
                stackvault::open_source(path, &options)
                    .with_context(|| format!("cannot open disk {name} ({shown})"))?
            }
        };
        sources.push((name.clone(), source));
    }
    let options = VmBackupOptions {
        vm: args.vm.clone(),
        mode: if args.full {
            BackupMode::Full
        } else {
            BackupMode::Auto
        },
        blob_snapshots_taken_together: args.blob_snapshots_taken_together,
    };
    let disk_sources = sources
        .iter()
        .map(|(name, s)| VmDiskSource {
            name: name.clone(),
            source: s.as_ref(),
            changes: None,
        })
        .collect();
    let report = vm::backup_vm(&repo, disk_sources, &options, &ctx.progress())
        .with_context(|| format!("backup of VM {} failed", args.vm))?;
    if args.json {
        return output::json(&report);
    }
    output::line(format!(
        "VM snapshot {} of {} ({}, disks read within {:.2} s)",
        report.vm_snapshot_id.short(),
        report.vm,
        report.consistency.as_str(),
        report.read_window_ms as f64 / 1000.0
    ))?;
    for d in &report.disks {
        output::line(format!(
            "  {}  snapshot {} ({}), read {}, added {}",
            d.disk,
            d.snapshot_id.short(),
            d.kind.as_str(),
            output::bytes(d.stats.bytes_read),
            output::bytes(d.stats.bytes_added)
        ))?;
    }
    Ok(())
}

pub fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    let repo = Repo::open(&repo)?;
    let all = vm::vm_snapshots(&repo, args.vm.as_deref())?;
    if args.json {
        return output::json(&serde_json::json!({ "vm_snapshots": all }));
    }
    if all.is_empty() {
        return output::line("no VM snapshots");
    }
    for s in &all {
        let r = &s.record;
        output::line(format!(
            "{}  {}  {}  {}  {} disk(s), read within {:.2} s{}",
            s.id.short(),
            r.vm,
            r.time,
            r.consistency.as_str(),
            r.disks.len(),
            r.read_window_ms as f64 / 1000.0,
            if s.complete {
                ""
            } else {
                "  INCOMPLETE (a disk snapshot was forgotten)"
            }
        ))?;
        for d in &r.disks {
            output::line(format!(
                "    {}  {}  {}",
                d.name,
                d.snapshot_id.short(),
                output::bytes(d.virtual_size)
            ))?;
        }
    }
    Ok(())
}

/// The first line of `restore-vm`'s summary, into a directory or a container alike.
fn restored_header(
    vm_snapshot_id: &VmSnapshotId,
    vm: &str,
    place: impl std::fmt::Display,
    duration_ms: u64,
) -> anyhow::Result<()> {
    output::line(format!(
        "restored VM snapshot {} of {vm} into {place} in {:.2} s",
        vm_snapshot_id.short(),
        duration_ms as f64 / 1000.0
    ))
}

/// `restore-vm --format`: the container of each restored disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskContainer {
    // A fixed VHD (Azure-ready).
    Vhd,
    // The raw disk bytes.
    Raw,
}

pub fn restore(ctx: &Context, args: RestoreArgs) -> anyhow::Result<()> {
    let (repo, [snapshot, dir]) = ctx.split_repo(
        [
            args.repo.map(Into::into),
            args.snapshot,
            args.dir.map(Into::into),
        ],
        ["SNAPSHOT", "DIR"],
    )?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let dir = PathBuf::from(dir);
    if let DiskArg::Blob(container) = DiskArg::of(&dir) {
        if args.format == DiskContainer::Raw {
            return Err(Error::Usage(
                "a page blob holds an Azure-ready fixed VHD: drop --format raw to restore into \
                 a container"
                    .into(),
            )
            .into());
        }
        let options = args.blob_restore.options(&args.blob, args.force)?;
        let repo = Repo::open(&repo)?;
        let chosen = vm::resolve_vm_snapshot(&repo, &args.vm, &snapshot)?;
        let shown = DiskArg::Blob(container).shown();
        let report =
            vm::restore_vm_to_container(&repo, &chosen, container, &options, &ctx.progress())
                .with_context(|| format!("restore of VM {} into {shown} failed", args.vm))?;
        if args.json {
            return output::json(&report);
        }
        restored_header(
            &report.vm_snapshot_id,
            &report.vm,
            &report.container,
            report.duration_ms,
        )?;
        for d in &report.disks {
            output::line(format!(
                "  {}  {} ({})",
                d.restore.disk,
                d.restore.target,
                output::bytes(d.restore.virtual_size)
            ))?;
        }
        return Ok(());
    }
    if args.blob_restore.any() {
        return Err(Error::Usage(
            "--existing, --resume, --journal-dir, --coalesce-gap and --parallel apply to a \
             container target; the target is a directory"
                .into(),
        )
        .into());
    }
    let format = match args.format {
        DiskContainer::Raw => OutputFormat::Raw,
        DiskContainer::Vhd => OutputFormat::VhdFixed,
    };
    let repo = Repo::open(&repo)?;
    let chosen = vm::resolve_vm_snapshot(&repo, &args.vm, &snapshot)?;
    let options = VmRestoreOptions {
        format,
        force: args.force,
    };
    let report = vm::restore_vm(&repo, &chosen, &dir, &options, &ctx.progress())
        .with_context(|| format!("restore of VM {} into {} failed", args.vm, dir.display()))?;
    if args.json {
        return output::json(&report);
    }
    restored_header(
        &report.vm_snapshot_id,
        &report.vm,
        report.directory.display(),
        report.duration_ms,
    )?;
    for d in &report.disks {
        output::line(format!(
            "  {}  {} ({}, {})",
            d.disk,
            d.target,
            d.output_format,
            output::bytes(d.virtual_size)
        ))?;
    }
    Ok(())
}
