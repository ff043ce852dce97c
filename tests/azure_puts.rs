//! Requests per pack on Azure (issue 14: "at most one PUT per 8 MiB of new packed data"): a
//! backup stores each pack with one create-only Put Blob and its index delta with another, no
//! Put Block or Put Block List, so with packs of the 16 MiB target the data costs one PUT per
//! 8 MiB. Before, a 16 MiB pack was two Put Block and a Put Block List (one PUT per 3.2 MiB
//! measured at 4 GiB in benches/RESULTS.md, S24).

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault_tests::{p, same_bytes, Disk};

use crate::remote_maintain::{azurite, Remote};

const MIB: u64 = 1 << 20;

fn count(report: &Value, kind: &str) -> Result<u64> {
    report["requests"][kind]
        .as_u64()
        .with_context(|| format!("no {kind} count in {report:#}"))
}

#[test]
fn a_backup_to_azure_stores_each_pack_and_delta_with_one_put_blob() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let r = Remote::azure(&az, "puts")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    // Random data: nothing deduplicates or compresses, so the packs hold the whole disk.
    Disk::random(48 * MIB, 5).write(&disk)?;
    r.json(&["init"])?;
    let full = r.json(&["backup", p(&disk), "--disk", "d"])?;
    let packs = r.objects.list_with_sizes("packs/")?;
    let deltas = r.keys("index/")?;
    ensure!(packs.len() >= 3, "a 48 MiB disk made {} packs", packs.len());
    ensure!(deltas.len() == packs.len(), "{deltas:?} for {packs:?}");

    ensure!(
        count(&full, "put_block")? == 0 && count(&full, "put_block_list")? == 0,
        "packs went as blocks: {:#}",
        full["requests"]
    );
    // What a backup puts besides packs and deltas (manifest, lock): an unchanged one.
    let unchanged = r.json(&["backup", p(&disk), "--disk", "d"])?;
    ensure!(r.objects.list("packs/")?.len() == packs.len(), "new packs");
    let fixed = count(&unchanged, "put_blob")?;
    let data_puts = count(&full, "put_blob")?.saturating_sub(fixed);
    ensure!(
        data_puts == 2 * packs.len() as u64,
        "{data_puts} Put Blob for {} packs and their deltas: {:#} (unchanged: {:#})",
        packs.len(),
        full["requests"],
        unchanged["requests"]
    );
    // Every pack but the last of the run is at least the 16 MiB target: one PUT per 8 MiB.
    let full_size = packs.iter().filter(|o| o.size >= 16 * MIB).count();
    ensure!(full_size + 1 >= packs.len(), "{packs:?}");
    let added = full["stats"]["bytes_added"]
        .as_u64()
        .with_context(|| format!("no bytes_added in {full:#}"))?;
    let stored: u64 = packs.iter().map(|o| o.size).sum();
    ensure!(added == stored, "bytes_added {added}, packs hold {stored}");

    let restored = dir.path().join("r.img");
    let id = full["snapshot_id"].as_str().context("no snapshot id")?;
    r.json(&["restore", id, p(&restored), "--force"])?;
    ensure!(same_bytes(&restored, &disk)?, "restore differs");
    Ok(())
}
