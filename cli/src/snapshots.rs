//! `stackvault snapshots` and `stackvault show`

use std::ffi::OsString;
use std::path::PathBuf;

use stackvault::Repo;

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
        let list: Vec<serde_json::Value> = snaps
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s)?;
                if let serde_json::Value::Object(map) = &mut v {
                    map.insert(
                        "last_verification".into(),
                        serde_json::to_value(verified.get(&s.id))?,
                    );
                }
                Ok(v)
            })
            .collect::<Result<_, serde_json::Error>>()?;
        return output::json(&serde_json::json!({ "snapshots": list }));
    }
    output::line(format!(
        "{:<12}  {:<16}  {:<27}  {:<12}  {:<12}  {:>11}  {:>11}  {}",
        "id", "disk", "time", "kind", "parent", "size", "added", "last verified"
    ))?;
    for s in &snaps {
        let last = match verified.get(&s.id) {
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
            &s.id[..12],
            s.meta.disk,
            s.meta.time,
            s.meta.kind.as_str(),
            s.meta
                .parent
                .as_deref()
                .map(|p| &p[..12.min(p.len())])
                .unwrap_or("-"),
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
    if args.json {
        return output::json(&snap);
    }
    output::line(serde_json::to_string_pretty(&snap)?)
}
