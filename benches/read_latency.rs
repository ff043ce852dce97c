//! Latency of random reads through `SnapshotReader` in this process: no socket, no client,
//! no second process to schedule. `benches/nbd.py --inproc` runs it on the same offsets as
//! its NBD client, so that the two sets of percentiles side by side show what the server's
//! read path costs and what the network and scheduling add.
//!
//! Run: `cargo bench --bench read_latency -- REPO SNAPSHOT OFFSETS_FILE [LEN] [CACHE_MIB]
//! [WARM_PASSES]` (SNAPSHOT: an id, a prefix or `latest`; OFFSETS_FILE: one byte offset per
//! line; LEN 4096, CACHE_MIB 512, WARM_PASSES 5). Prints one JSON object: per phase (cold: the first pass on a fresh reader,
//! warm: the passes after it) the number of reads and p50, p90, p99, p99.9 and max in
//! milliseconds, and the reader's counters. An encrypted repository takes its password from
//! `STACKVAULT_PASSWORD`.

use std::path::Path;
use std::time::Instant;

use stackvault::{ReaderOptions, Repo, SnapshotReader};

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64) * q) as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "reads": ms.len(),
        "p50_ms": percentile(&ms, 0.5),
        "p90_ms": percentile(&ms, 0.9),
        "p99_ms": percentile(&ms, 0.99),
        "p999_ms": percentile(&ms, 0.999),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; positional arguments are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [repo, snapshot, offsets, rest @ ..] = &args[..] else {
        anyhow::bail!(
            "usage: read_latency REPO SNAPSHOT OFFSETS_FILE [LEN] [CACHE_MIB] [WARM_PASSES]"
        );
    };
    let number = |i: usize, default: u64| -> anyhow::Result<u64> {
        Ok(match rest.get(i) {
            Some(v) => v.parse()?,
            None => default,
        })
    };
    let len = usize::try_from(number(0, 4096)?)?;
    let cache_mib = usize::try_from(number(1, 512)?)?;
    let warm_passes = number(2, 5)?;
    let offsets: Vec<u64> = std::fs::read_to_string(offsets)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse())
        .collect::<Result<_, _>>()?;
    let repo = Repo::open(Path::new(repo))?;
    let snapshot = repo.resolve_snapshot(snapshot, None)?.id;
    let reader = SnapshotReader::open(
        &repo,
        &snapshot,
        ReaderOptions {
            cache_bytes: cache_mib << 20,
            read_ahead_bytes: 0,
        },
    )?;
    let mut buf = vec![0u8; len];
    let mut pass = |out: &mut Vec<f64>| -> anyhow::Result<()> {
        for &o in &offsets {
            let t = Instant::now();
            reader.read_at(o, &mut buf)?;
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(())
    };
    let mut cold = Vec::new();
    pass(&mut cold)?;
    let after_cold = reader.stats();
    let mut warm = Vec::new();
    for _ in 0..warm_passes {
        pass(&mut warm)?;
    }
    let stats = reader.stats();
    println!(
        "{}",
        serde_json::json!({
            "cold": summary(cold),
            "warm": summary(warm),
            "warm_index_lookups": stats.index_lookups - after_cold.index_lookups,
            "warm_frames_decoded": stats.frames_decoded - after_cold.frames_decoded,
        })
    );
    Ok(())
}
