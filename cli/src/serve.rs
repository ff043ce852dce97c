//! `stackvault serve`: a snapshot as a read-only NBD disk, until Ctrl-C.

use std::ffi::OsString;
use std::path::PathBuf;

use serde::Serialize;
use stackvault::format::short_id;
use stackvault::nbd::{Export, Listen, ServeOptions, Server};
use stackvault::{ReaderOptions, Repo, SnapshotReader};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: Option<OsString>,
    /// With `latest`: the latest snapshot of this disk. The export is named after the disk.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Where to listen: `unix:PATH`, `tcp:PORT` (loopback) or `tcp:HOST:PORT` (an explicit
    /// address, e.g. `tcp:0.0.0.0:10809` to listen beyond this machine).
    #[arg(long, value_name = "unix:PATH|tcp:[HOST:]PORT")]
    nbd: String,
    /// Size of the cache of decompressed data, in MiB.
    #[arg(long, value_name = "N", default_value_t = 64)]
    cache_mib: usize,
    /// Most clients connected at once; more are turned away.
    #[arg(long, value_name = "N", default_value_t = 32)]
    max_connections: usize,
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

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, [snapshot]) =
        ctx.split_repo([args.repo.map(Into::into), args.snapshot], ["SNAPSHOT"])?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let listen = Listen::parse(&args.nbd)?;
    if args.cache_mib == 0 || args.max_connections == 0 {
        return Err(stackvault::Error::Usage(
            "--cache-mib and --max-connections must be at least 1".into(),
        )
        .into());
    }
    let cache_bytes = args
        .cache_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| stackvault::Error::Usage("--cache-mib is too large".into()))?;
    let repo = Repo::open(&repo)?;
    let snap = repo.resolve_snapshot(&snapshot, args.disk.as_deref())?;
    let options = ReaderOptions {
        cache_bytes,
        ..ReaderOptions::default()
    };
    let reader = SnapshotReader::open(&repo, &snap.id, options)?;
    let exports = [Export {
        name: snap.meta.disk.clone(),
        description: format!(
            "stackvault snapshot {} of disk {} ({})",
            short_id(&snap.id),
            snap.meta.disk,
            snap.meta.time
        ),
        reader: &reader,
    }];
    let server = Server::bind(&listen)?;
    let ready: Vec<ReadyExport> = exports
        .iter()
        .map(|e| ReadyExport {
            name: &e.name,
            uri: server.uri(&e.name),
            snapshot_id: &snap.id,
            size_bytes: e.reader.size(),
        })
        .collect();
    if args.json {
        let line = serde_json::json!({
            "format_version": output::JSON_FORMAT_VERSION,
            "event": "ready",
            "exports": ready,
        });
        output::line(serde_json::to_string(&line)?)?;
    } else {
        for e in &ready {
            output::line(format!(
                "serving snapshot {} ({}) read-only at {}",
                short_id(&snap.id),
                output::bytes(e.size_bytes),
                e.uri
            ))?;
        }
        if !ctx.quiet {
            eprintln!("press Ctrl-C to stop");
        }
    }
    let serve_options = ServeOptions {
        max_connections: args.max_connections,
        ..ServeOptions::default()
    };
    let report = server.serve(&exports, &serve_options, &ctx.cancel)?;
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
            "stopped: {} connections, {} requests, {} read, {} errors",
            report.connections,
            report.requests,
            output::bytes(report.read_bytes),
            report.errors
        );
    }
    Ok(())
}
