//! `stackvault stats`

use std::path::PathBuf;

use stackvault::{Repo, StatsReport};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Only this disk's snapshots (unique bytes still count every disk's references).
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    let repo = Repo::open(&repo)?;
    let report = stackvault::stats(&repo, args.disk.as_deref())?;
    if args.json {
        return output::json(&report);
    }
    print(&report)
}

fn print(r: &StatsReport) -> anyhow::Result<()> {
    output::line(format!(
        "{:<12}  {:<16}  {:<27}  {:<12}  {:>11}  {:>11}  {:>11}",
        "snapshot", "disk", "time", "kind", "logical", "stored", "unique"
    ))?;
    for s in &r.snapshots {
        output::line(format!(
            "{:<12}  {:<16}  {:<27}  {:<12}  {:>11}  {:>11}  {:>11}",
            s.id.short(),
            s.disk,
            s.time,
            s.kind,
            output::bytes(s.logical_bytes),
            output::bytes(s.stored_bytes),
            output::bytes(s.unique_bytes)
        ))?;
    }
    for d in &r.disks {
        output::line(format!(
            "disk {}: {} snapshots, {} logical, {} stored, {} unique to the disk",
            d.disk,
            d.snapshots,
            output::bytes(d.logical_bytes),
            output::bytes(d.stored_bytes),
            output::bytes(d.unique_bytes)
        ))?;
    }
    let t = &r.repository;
    output::line(format!(
        "repository: {} snapshots of {} disks, {} logical, {} of data in {} chunks ({} raw, {} \
         stored); dedup {:.2}x, compression {:.2}x; {} packs ({}), {} unreferenced",
        t.snapshots,
        t.disks,
        output::bytes(t.logical_bytes),
        output::bytes(t.data_bytes),
        t.chunks,
        output::bytes(t.raw_bytes),
        output::bytes(t.stored_bytes),
        t.dedup_ratio,
        t.compression_ratio,
        t.packs,
        output::bytes(t.pack_bytes),
        output::bytes(t.unreferenced_bytes)
    ))
}
