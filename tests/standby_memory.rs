//! A page blob standby sync's memory does not follow the size of its changes: the page writer
//! holds at most its byte budget (16 MiB) of regions for requests not yet sent, whatever the
//! disk's size and however large and many the changed regions are (issue 16: "memory flat in
//! the disk size").
//!
//! Against Azurite: a 1 GiB sparse disk with 48 changed regions of 4 MiB each (one Put Page
//! of 4 MiB apiece), spread over the disk. Before the budget, 16 requests in flight each held
//! a 4 MiB region and every producer thread one more: 72 MiB of buffers, and the sync's peak
//! RSS rose with them (117 MiB at 4 GiB against 72 MiB at 1 GiB in `benches/standby.py`). The
//! test reads the report's `peak_bytes_in_flight` and the sync process's peak RSS, and checks
//! the blob equals the snapshot.

use std::os::unix::fs::FileExt;

use anyhow::{bail, Context as _};
use stackvault_tests::{p, sv_command, Fixture};

use crate::standby_pageblob::{sync, verify_target, Standby};

const MIB: u64 = 1 << 20;
const DISK: u64 = 1024 * MIB;
/// Changed regions of one segment (4 MiB) each, REGION_STRIDE apart.
const REGIONS: u64 = 48;
const REGION: u64 = 4 * MIB;
const REGION_STRIDE: u64 = 20 * MIB;
/// The page writer's budget (`DEFAULT_BYTES_IN_FLIGHT`).
const BUDGET: u64 = 16 * MIB;
/// Peak RSS the sync stays under: the debug binary's baseline (≈ 40 MiB: code, the
/// repository's index and three manifests) plus the budget, the producers' regions and
/// allocator slack: the sync before the budget peaked at 103 MiB here, with it at 56 MiB.
const RSS_BOUND_KIB: u64 = 80 * 1024;

/// Writes generation `gen` of every region: compressible (the repository stays small) and
/// unique per 4 KiB block (no chunk is shared between regions or generations).
fn write_regions(disk: &std::path::Path, gen: u64) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(disk)?;
    let mut buf = vec![0u8; REGION as usize];
    for r in 0..REGIONS {
        for (k, block) in buf.chunks_exact_mut(4096).enumerate() {
            let tag = (gen << 48) | (r << 24) | k as u64;
            block.fill((gen as u8).wrapping_mul(31).wrapping_add(k as u8) | 1);
            block[..8].copy_from_slice(&tag.to_le_bytes());
        }
        file.write_all_at(&buf, MIB + r * REGION_STRIDE)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Runs `standby sync --json` under `/usr/bin/time`; returns its report and peak RSS in KiB.
fn timed_sync(
    repo: &str,
    url: &str,
    rss_file: &std::path::Path,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let sv = sv_command();
    let mut cmd = std::process::Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o", p(rss_file)])
        .arg(sv.get_program())
        .args(["standby", "sync", "-r", repo, "--disk", "vm", url, "--json"]);
    for (k, v) in sv.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let out = cmd.output().context("run /usr/bin/time")?;
    if !out.status.success() {
        bail!(
            "standby sync failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = serde_json::from_slice(&out.stdout).context("standby sync --json")?;
    let rss = std::fs::read_to_string(rss_file)?;
    let kib = rss
        .lines()
        .next_back()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no peak RSS in {rss:?}"))?;
    Ok((report, kib))
}

#[test]
fn a_page_blob_sync_of_large_changes_holds_at_most_the_writer_budget() -> anyhow::Result<()> {
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let f = Fixture::new()?;
    let repo = f.repo();
    let repo = p(&repo);
    let disk = f.path("vm.img");
    std::fs::File::create(&disk)?.set_len(DISK)?;
    write_regions(&disk, 0)?;
    f.backup(&disk, "vm")?;
    let url = az.url("standby.vhd");
    assert_eq!(sync(repo, &url)?["mode"], "full");

    write_regions(&disk, 1)?;
    let gen1 = f.backup(&disk, "vm")?;
    let (report, rss_kib) = timed_sync(repo, &url, &f.path("rss"))?;
    eprintln!("peak RSS {} MiB: {report:#}", rss_kib / 1024);
    assert!(
        rss_kib <= RSS_BOUND_KIB,
        "the sync of {REGIONS} regions of 4 MiB peaked at {} MiB of RSS (bound {} MiB)",
        rss_kib / 1024,
        RSS_BOUND_KIB / 1024
    );
    assert_eq!(report["mode"], "incremental", "{report:#}");
    assert!(
        report["written_bytes"].as_u64() >= Some(REGIONS * REGION),
        "{report:#}"
    );
    let in_flight = report["peak_bytes_in_flight"].as_u64().unwrap_or(u64::MAX);
    assert!(
        in_flight <= BUDGET,
        "{in_flight} bytes of regions in flight, budget {BUDGET}"
    );
    verify_target(repo, &gen1, &url)?;
    Ok(())
}
