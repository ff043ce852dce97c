//! `stackvault check`

use std::path::PathBuf;

use stackvault::format::{short_chunk_id, short_id};
use stackvault::verify::{CheckOptions, CheckReport, ReadData, Subset};
use stackvault::Repo;

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Also read back every stored chunk (crc32, decompression, BLAKE3).
    #[arg(long, conflicts_with = "read_data_subset")]
    read_data: bool,
    /// Read back part of the packs: `N/M` (the N-th of M slices by name, deterministic),
    /// `P%` or a size like `2GiB` (a random choice of packs).
    #[arg(long, value_name = "SUBSET", value_parser = crate::args::subset)]
    read_data_subset: Option<Subset>,
    /// Seconds after which orphans (packs no snapshot needs, index deltas without a pack) are
    /// a warning; younger ones may belong to a backup in flight (default: prune's grace
    /// period, twice the lock lease).
    #[arg(long, value_name = "SECONDS")]
    grace: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let read_data = match (&args.read_data_subset, args.read_data) {
        (Some(s), _) => ReadData::Subset(s.clone()),
        (None, true) => ReadData::All,
        (None, false) => ReadData::None,
    };
    let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    let repo = Repo::open(&repo)?;
    let options = CheckOptions {
        read_data,
        grace: args.grace.map(std::time::Duration::from_secs),
    };
    let report = stackvault::check(&repo, &options, &ctx.progress())?;
    if args.json {
        output::json(&report)?;
    } else {
        print(&report)?;
    }
    // Exit code 3 when the repository is damaged.
    Ok(report.verdict()?)
}

/// Damage lines printed before "... and N more".
const DAMAGE_LINES: usize = 20;

fn print(r: &CheckReport) -> anyhow::Result<()> {
    output::line(format!(
        "checked {} snapshots, {} packs, {} chunks; read back {} packs ({} chunks, {}) in {:.2} s",
        r.snapshots,
        r.packs,
        r.chunks,
        r.packs_read,
        r.chunks_read,
        output::bytes(r.bytes_read),
        r.duration_ms as f64 / 1000.0
    ))?;
    // A lost pack is hundreds of missing chunks: the first lines and the affected snapshots
    // below say what happened; `--json` has every listed entry.
    for d in r.damage.iter().take(DAMAGE_LINES) {
        let at = d
            .offset
            .map(|o| format!(" at offset {o}"))
            .unwrap_or_default();
        let chunk = d
            .chunk
            .as_deref()
            .map(|c| format!(" chunk {}", short_chunk_id(c)))
            .unwrap_or_default();
        output::line(format!(
            "DAMAGE {}: {}{at}{chunk}: {}",
            d.kind, d.location, d.what
        ))?;
    }
    let shown = r.damage.len().min(DAMAGE_LINES) as u64;
    if r.damage_count > shown {
        output::line(format!(
            "  ... and {} more (--json lists up to {})",
            r.damage_count - shown,
            r.damage.len()
        ))?;
    }
    for a in &r.affected {
        let what = if a.whole_snapshot {
            "the whole snapshot (manifest damaged)".to_string()
        } else {
            format!(
                "{} in {} ranges",
                output::bytes(a.damaged_bytes),
                a.range_count
            )
        };
        output::line(format!(
            "AFFECTED snapshot {} of disk {}: {what}",
            short_id(&a.snapshot_id),
            a.disk.as_deref().unwrap_or("?")
        ))?;
        for range in a.ranges.iter().take(10) {
            output::line(format!(
                "    disk bytes {}..{} (chunk {})",
                range.offset,
                range.offset + range.len,
                short_chunk_id(&range.chunk)
            ))?;
        }
    }
    if !r.affected.is_empty() {
        // Incrementals trust their parent's chunks, so only a full backup stores lost data
        // again (docs/design.md).
        output::line(
            "to store the lost data again, back up each affected disk with `backup --full` \
             while its source still exists",
        )?;
    }
    for o in &r.orphans {
        output::line(format!(
            "orphan pack {} ({}): {}",
            o.pack,
            output::bytes(o.size),
            o.why
        ))?;
    }
    for o in &r.orphan_deltas {
        let age = o
            .age_secs
            .map(|a| format!("{a} s old"))
            .unwrap_or_else(|| "age unknown".into());
        output::line(format!(
            "orphan index delta {} ({age}): its pack is not in the store",
            o.key
        ))?;
    }
    for w in &r.warnings {
        output::line(format!("WARNING: {w}"))?;
    }
    for l in &r.leftovers {
        let why = if l.why.is_empty() {
            String::new()
        } else {
            format!(" ({})", l.why)
        };
        output::line(format!(
            "leftover {} {} ({}, {} s old){why}: `stackvault prune` removes it",
            l.kind,
            l.path,
            output::bytes(l.size),
            l.age_secs
        ))?;
    }
    output::line(if r.ok {
        "no damage found"
    } else {
        "the repository is DAMAGED"
    })
}
