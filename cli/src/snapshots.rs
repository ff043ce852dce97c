//! `stackvault snapshots` and `stackvault show`

use std::ffi::OsString;
use std::path::PathBuf;

use serde::Serialize;
use stackvault::format::short_id;
use stackvault::format::verification::VerificationRecord;
use stackvault::{Repo, SnapshotSummary};

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Only snapshots of this disk.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

pub fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    let repo = Repo::open(&repo)?;
    let snaps = repo.snapshots(args.disk.as_deref())?;
    let verified = repo.last_verifications()?;
    if args.json {
        let snapshots = snaps
            .iter()
            .map(|s| Listed {
                snapshot: s,
                last_verification: verified.get(s.id.as_str()),
            })
            .collect();
        return output::json(&List { snapshots });
    }
    output::line(format!(
        "{:<12}  {:<16}  {:<27}  {:<12}  {:<12}  {:>11}  {:>11}  {}",
        "id", "disk", "time", "kind", "parent", "size", "added", "last verified"
    ))?;
    for s in &snaps {
        let last = match verified.get(s.id.as_str()) {
            Some(v) => format!(
                "{} {} ({}, {:.1} s)",
                v.time,
                v.outcome,
                v.mode,
                v.duration_ms as f64 / 1000.0
            ),
            None => "never".into(),
        };
        output::line(format!(
            "{:<12}  {:<16}  {:<27}  {:<12}  {:<12}  {:>11}  {:>11}  {last}",
            s.id.short(),
            s.meta.disk,
            s.meta.time,
            s.meta.kind.as_str(),
            s.meta.parent.as_deref().map(short_id).unwrap_or("-"),
            output::bytes(s.virtual_size),
            output::bytes(s.meta.stats.bytes_added)
        ))?;
    }
    output::line(format!("{} snapshots", snaps.len()))
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: Option<OsString>,
    /// With `latest`: the latest of this disk.
    #[arg(long, value_parser = crate::args::disk_name)]
    disk: Option<String>,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

pub fn show(ctx: &Context, args: ShowArgs) -> anyhow::Result<()> {
    let (repo, [snapshot]) =
        ctx.split_repo([args.repo.map(Into::into), args.snapshot], ["SNAPSHOT"])?;
    let snapshot = crate::args::text(snapshot, "SNAPSHOT")?;
    let repo = Repo::open(&repo)?;
    let snap = repo.resolve_snapshot(&snapshot, args.disk.as_deref())?;
    let verifications: Vec<VerificationRecord> = repo
        .verifications_of(&snap.id)?
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    if args.json {
        return output::json(&Shown {
            snapshot: &snap,
            verifications,
        });
    }
    print_snapshot(&snap, &verifications)
}

/// One entry of `snapshots --json`: the snapshot and its latest verification.
#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    snapshot: &'a SnapshotSummary,
    last_verification: Option<&'a VerificationRecord>,
}

/// `snapshots --json`.
#[derive(Serialize)]
struct List<'a> {
    snapshots: Vec<Listed<'a>>,
}

/// `show --json`: the snapshot and every verification of it, oldest first.
#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    snapshot: &'a SnapshotSummary,
    verifications: Vec<VerificationRecord>,
}

/// The human form of `show`: what was backed up, from where, how, and every verification.
fn print_snapshot(s: &SnapshotSummary, verifications: &[VerificationRecord]) -> anyhow::Result<()> {
    let m = &s.meta;
    output::line(format!("snapshot {}", s.id))?;
    output::line(format!("  disk       {}", m.disk))?;
    output::line(format!("  time       {}", m.time))?;
    let parent = match &m.parent {
        Some(p) => format!(", parent {p}"),
        None => String::new(),
    };
    output::line(format!("  kind       {}{parent}", m.kind.as_str()))?;
    output::line(format!(
        "  size       {} ({} bytes)",
        output::bytes(s.virtual_size),
        s.virtual_size
    ))?;
    output::line(format!(
        "  source     {} ({})",
        m.source.path, m.source.format
    ))?;
    if let Some(vhd) = &m.source.vhd {
        output::line(format!(
            "  vhd        {} disk, unique id {}",
            vhd.disk_type, vhd.unique_id
        ))?;
        for w in &vhd.warnings {
            output::line(format!("  warning    {w}"))?;
        }
    }
    output::line(format!("  changes    {}", m.change_source))?;
    output::line(format!(
        "  host       {} (stackvault {})",
        m.hostname, m.tool_version
    ))?;
    output::line(format!("  chunker    {}", m.chunker))?;
    output::line(format!("  root       {}", m.root_digest))?;
    let st = &m.stats;
    output::line(format!(
        "  backup     read {}, unchanged {} not read, zero {} ({} unallocated); {} chunks \
         ({} new), added {}; {:.2} s, read at {}",
        output::bytes(st.bytes_read),
        output::bytes(st.skipped_bytes),
        output::bytes(st.zero_bytes),
        output::bytes(st.unallocated_bytes),
        st.chunks,
        st.new_chunks,
        output::bytes(st.bytes_added),
        st.duration_ms as f64 / 1000.0,
        output::rate(st.bytes_read, st.duration_ms)
    ))?;
    if verifications.is_empty() {
        return output::line("  verified   never (run `stackvault verify` to prove it restores)");
    }
    output::line(format!("  verified   {} times:", verifications.len()))?;
    for v in verifications {
        let against = match &v.target {
            Some(t) => format!("target {t}"),
            None => v.mode.to_string(),
        };
        let problems = if v.problems > 0 {
            format!(", {} problem ranges", v.problems)
        } else {
            String::new()
        };
        output::line(format!(
            "    {}  {:<8} {against}: {} in {:.2} s{problems}",
            v.time,
            v.outcome.as_str().to_uppercase(),
            output::bytes(v.bytes_checked),
            v.duration_ms as f64 / 1000.0
        ))?;
    }
    Ok(())
}
