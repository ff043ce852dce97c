//! `stackvault prune`

use std::path::PathBuf;

use stackvault::prune::{PruneOptions, PruneReport};
use stackvault::Repo;

use crate::output::{self, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_name = "REPO", help = crate::args::REPO_HELP)]
    repo: Option<PathBuf>,
    /// Rewrite packs whose unused share exceeds this (`10%`; `0%` rewrites every pack with
    /// any unused chunk, `100%` only deletes packs that are wholly unused).
    #[arg(long, value_name = "PERCENT", default_value = "10%", value_parser = crate::args::max_unused)]
    max_unused: f64,
    /// Show what would be deleted and rewritten, change nothing (takes no lock).
    #[arg(long)]
    dry_run: bool,
    /// On a shared (remote) store: seconds a condemned pack waits before it is deleted
    /// (two-phase deletion; default twice the lock lease). Shorter than the lease (300 s), a
    /// backup stalled that long before its manifest could lose a pack it uses: it warns.
    #[arg(long, value_name = "SECONDS")]
    grace: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let options = PruneOptions {
        max_unused: args.max_unused,
        dry_run: args.dry_run,
        grace: args
            .grace
            .map(std::time::Duration::from_secs)
            .unwrap_or(stackvault::prune::DEFAULT_GRACE),
    };
    let (repo, []) = ctx.split_repo([args.repo.map(Into::into)], [])?;
    let repo = Repo::open(&repo)?;
    let lease = stackvault::lock::lease::LEASE;
    if repo.is_remote() && !args.dry_run && options.grace < lease {
        // The deletion rule's proof (format-spec/locks.md) needs the grace period to outlast
        // any stall of a live backup, and a backup only gives up after a whole lease.
        eprintln!(
            "warning: --grace {} s is shorter than the lock lease ({} s): a backup stalled that \
             long between its last check and its manifest could lose a pack it uses; keep the \
             default ({} s) unless no backup can be running",
            options.grace.as_secs(),
            lease.as_secs(),
            stackvault::prune::DEFAULT_GRACE.as_secs()
        );
    }
    let report = stackvault::prune(&repo, &options, &ctx.progress())?;
    if args.json {
        return output::json(&report);
    }
    print(&report)
}

fn print(r: &PruneReport) -> anyhow::Result<()> {
    let would = if r.dry_run { "would " } else { "" };
    output::line(format!(
        "{} snapshots reference {} chunks; {} packs ({})",
        r.snapshots,
        r.referenced_chunks,
        r.packs_before,
        output::bytes(r.bytes_before)
    ))?;
    output::line(format!(
        "{would}delete {} unused packs and {} orphan packs, {would}rewrite {} packs into {} \
         ({} frames of {} chunks moved, {} frames of {} chunks removed)",
        r.packs_deleted,
        r.orphans_deleted,
        r.packs_rewritten,
        r.packs_written,
        r.frames_moved,
        r.chunks_moved,
        r.frames_removed,
        r.chunks_removed
    ))?;
    output::line(format!(
        "{}freed {}: {} packs ({}) remain; {} unused left in packs under the threshold; \
         {} stray verification records and {} leftovers of interrupted runs removed; {:.2} s",
        if r.dry_run { "would have " } else { "" },
        output::bytes(r.bytes_freed),
        r.packs_after,
        output::bytes(r.bytes_after),
        output::bytes(r.unused_bytes_kept),
        r.verification_records_removed,
        r.leftovers_removed,
        r.duration_ms as f64 / 1000.0
    ))?;
    if r.two_phase {
        output::line(format!(
            "shared store: {} packs condemned now, {} condemned packs wait for the grace period              ({} s), {} condemned packs used again and kept, {} condemnation records done",
            r.packs_condemned,
            r.condemned_waiting,
            r.grace_secs,
            r.condemned_reused,
            r.condemnation_records_removed
        ))?;
    }
    if r.orphan_deltas_condemned + r.orphan_deltas_deleted > 0 {
        output::line(format!(
            "index deltas without a pack: {} {would}condemned now, {} {would}deleted",
            r.orphan_deltas_condemned, r.orphan_deltas_deleted
        ))?;
    }
    if let Some(plan) = &r.plan {
        print_plan(plan)?;
    }
    for p in &r.problems {
        output::line(format!("note: {p}"))?;
    }
    Ok(())
}

/// The two-phase plan of `--dry-run` on a shared store, phase 2 first as prune runs it.
fn print_plan(plan: &stackvault::prune::TwoPhasePlan) -> anyhow::Result<()> {
    for d in &plan.delete_now {
        let what = match d.object {
            stackvault::prune::Deleted::Pack => "pack and its delta",
            stackvault::prune::Deleted::Delta => "delta (its pack is gone)",
        };
        output::line(format!(
            "delete now: {} ({what}; condemned by {}, past the grace period)",
            d.pack, d.record
        ))?;
    }
    for w in &plan.waiting {
        output::line(format!(
            "waiting: {} (condemned by {}; deletable after {})",
            w.pack,
            w.record,
            w.deletable_after
                .as_deref()
                .unwrap_or("never: unreadable record time")
        ))?;
    }
    for c in &plan.condemn {
        output::line(format!(
            "condemn: {} ({})",
            c.pack,
            serde_json::to_value(c.why)?.as_str().unwrap_or("?")
        ))?;
    }
    if !plan.condemn.is_empty() {
        output::line(format!(
            "what this run condemns becomes deletable after {} (a prune run then deletes it)",
            plan.condemned_now_deletable_after
        ))?;
    }
    Ok(())
}
