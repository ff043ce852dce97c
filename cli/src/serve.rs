//! `stackvault serve`: a snapshot (or every disk of a VM snapshot) as read-only NBD disks,
//! until Ctrl-C.

use std::ffi::OsString;
use std::path::PathBuf;

use serde::Serialize;
use stackvault::format::short_id;
use stackvault::nbd::{vm_export_disks, Export, Listen, ServeOptions, Server};
use stackvault::read::MemoryBudget;
use stackvault::{ReaderOptions, Repo, SnapshotReader, SnapshotSummary};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Snapshot id, unique prefix, or `latest` (with `--vm`: a VM snapshot's).
    snapshot: Option<OsString>,
    /// With `latest`: the latest snapshot of this disk. The export is named after the disk.
    #[arg(long, value_parser = crate::args::disk_name, conflicts_with = "vm")]
    disk: Option<String>,
    /// Serve every disk of a VM snapshot of this VM, each as an export named by the disk's
    /// name within the VM (`nbdinfo --list` shows them). `latest` is the newest complete
    /// VM snapshot.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Where to listen: `unix:PATH`, `tcp:PORT` (loopback) or `tcp:HOST:PORT` (an explicit
    /// address, e.g. `tcp:0.0.0.0:10809` to listen beyond this machine).
    #[arg(long, value_name = "unix:PATH|tcp:[HOST:]PORT")]
    nbd: String,
    /// Memory for decompressed data, in MiB: the frame cache, frames being decoded and every
    /// connection's buffers share it (one budget for all exports).
    #[arg(long, value_name = "N", default_value_t = 64)]
    cache_mib: usize,
    /// Most clients connected at once; more are turned away.
    #[arg(long, value_name = "N", default_value_t = 32)]
    max_connections: usize,
    /// Seconds a client may leave a reply unread before it is disconnected (its connection
    /// slot and buffer are then free for others).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    stall_timeout: u64,
    /// Print one JSON line when ready (and one when stopped).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ReadyExport<'a> {
    name: &'a str,
    uri: String,
    snapshot_id: &'a str,
    size_bytes: u64,
}

/// A disk to export: its export name, description and snapshot.
struct Planned {
    name: String,
    description: String,
    snapshot: SnapshotSummary,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    // Before any thread (rayon's, the unlock's) allocates: see the function.
    stackvault::nbd::return_freed_frames_to_the_system();
    let (repo, [snapshot]) =
        ctx.split_repo([args.repo.map(Into::into), args.snapshot], ["SNAPSHOT"])?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let listen = Listen::parse(&args.nbd)?;
    if args.cache_mib == 0 || args.max_connections == 0 || args.stall_timeout == 0 {
        return Err(stackvault::Error::Usage(
            "--cache-mib, --max-connections and --stall-timeout must be at least 1".into(),
        )
        .into());
    }
    if let Some(vm) = &args.vm {
        stackvault::vm::validate_name("VM", vm)
            .map_err(|e| stackvault::Error::Usage(e.to_string()))?;
    }
    let cache_bytes = args
        .cache_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| stackvault::Error::Usage("--cache-mib is too large".into()))?;
    let repo = Repo::open(&repo)?;
    let mut vm_snapshot_id = None;
    let planned: Vec<Planned> = match &args.vm {
        Some(vm) => {
            let (chosen, disks) = vm_export_disks(&repo, vm, &snapshot)?;
            vm_snapshot_id = Some(chosen.id.clone());
            disks
                .into_iter()
                .map(|d| Planned {
                    description: format!(
                        "stackvault VM snapshot {} of {vm}, disk {} (snapshot {}, {})",
                        chosen.id.short(),
                        d.name,
                        d.snapshot.id.short(),
                        chosen.record.time
                    ),
                    name: d.name,
                    snapshot: d.snapshot,
                })
                .collect()
        }
        None => {
            let snap = repo.resolve_snapshot(&snapshot, args.disk.as_deref())?;
            vec![Planned {
                name: snap.meta.disk.clone(),
                description: format!(
                    "stackvault snapshot {} of disk {} ({})",
                    snap.id.short(),
                    snap.meta.disk,
                    snap.meta.time
                ),
                snapshot: snap,
            }]
        }
    };
    let options = ReaderOptions {
        cache_bytes,
        ..ReaderOptions::default()
    };
    // One budget for every export: the frames they decode and the connections' buffers.
    let budget = MemoryBudget::new(cache_bytes);
    let readers = planned
        .iter()
        .map(|d| {
            SnapshotReader::open_with_budget(
                &repo,
                &d.snapshot.id,
                options,
                std::sync::Arc::clone(&budget),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let exports: Vec<Export> = planned
        .iter()
        .zip(&readers)
        .map(|(d, reader)| Export {
            name: d.name.clone(),
            description: d.description.clone(),
            reader,
        })
        .collect();
    let server = Server::bind(&listen)?;
    let ready: Vec<ReadyExport> = exports
        .iter()
        .map(|e| ReadyExport {
            name: &e.name,
            uri: server.uri(&e.name),
            snapshot_id: e.reader.snapshot_id(),
            size_bytes: e.reader.size(),
        })
        .collect();
    // Announced once the server has opened what it keeps while serving (see `Server::serve`):
    // a client or a memory probe that starts at this line sees the server at rest.
    let mut announcement = Vec::new();
    if args.json {
        let mut line = serde_json::json!({
            "format_version": output::JSON_FORMAT_VERSION,
            "event": "ready",
            "exports": ready,
        });
        if let (Some(id), Some(map)) = (&vm_snapshot_id, line.as_object_mut()) {
            map.insert("vm_snapshot_id".into(), id.as_str().into());
        }
        announcement.push(serde_json::to_string(&line)?);
    } else {
        for e in &ready {
            announcement.push(format!(
                "serving snapshot {} ({}) read-only at {}",
                short_id(e.snapshot_id),
                output::bytes(e.size_bytes),
                e.uri
            ));
        }
    }
    let announce = || {
        for line in &announcement {
            output::line(line).map_err(|e| {
                stackvault::Error::io("write", "stdout", std::io::Error::other(e.to_string()))
            })?;
        }
        if !args.json && !ctx.quiet {
            eprintln!("press Ctrl-C to stop");
        }
        Ok(())
    };
    let serve_options = ServeOptions {
        max_connections: args.max_connections,
        stall_timeout: std::time::Duration::from_secs(args.stall_timeout),
        ..ServeOptions::default()
    };
    let report = server.serve(&exports, &serve_options, &ctx.cancel, announce)?;
    drop(server);
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("event".into(), "stopped".into());
            map.insert("format_version".into(), output::JSON_FORMAT_VERSION.into());
        }
        output::line(serde_json::to_string(&v)?)?;
    } else if !ctx.quiet {
        eprintln!(
            "stopped: {} connections ({} turned away), {} requests, {} read, {} errors; \
             decoded data peaked at {} of the {} budget",
            report.connections,
            report.refused_connections,
            report.requests,
            output::bytes(report.read_bytes),
            report.errors,
            output::bytes(report.memory.peak_bytes as u64),
            output::bytes(report.memory.capacity_bytes as u64)
        );
    }
    Ok(())
}
