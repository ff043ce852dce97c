//! A restore from object storage reads each pack in as few ranged GETs as its size allows,
//! however its chunks are scattered over the disk, and holds little memory doing it.
//!
//! An incremental backup puts the changes of the whole disk into one new pack; restoring that
//! generation needs a few chunks of that pack in every part of the disk. A restore that walks
//! the disk in windows asks for the pack once per window; one that reads in pack order asks
//! for it once (per span of at most 4 MiB). The same restore, of a disk larger than the
//! issue's budget, must peak well below that budget: what it holds is a span and a frame per
//! GET in flight, not windows of decoded frames.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};
use stackvault_tests::{scribble_disk, Disk};

use crate::faultproxy::FaultProxy;
use crate::remote_maintain::{moto, Remote};
use crate::remote_restore::{have_usr_bin_time, restore_peak_rss_kib};

const MIB: u64 = 1 << 20;
/// A bound on GETs per pack: one per 4 MiB of it (the restore once cut spans at 4 MiB; it
/// now streams a pack's wanted part in one GET, which `remote_restore_stream` pins).
const MAX_SPAN: u64 = 4 * MIB;

/// Backs up `gen0` (random) and then, after overwriting 48 evenly spread 64 KiB ranges,
/// `gen1`, into `r`; returns the disk (as of gen1) and gen1's snapshot id.
fn two_generations(
    r: &Remote,
    dir: &std::path::Path,
    size: u64,
) -> Result<(std::path::PathBuf, String)> {
    let disk = dir.join("d.img");
    Disk::random(size, 41).write(&disk)?;
    r.json(&["init"])?;
    r.backup(&disk)?;
    scribble_disk(&disk, 48, 5)?;
    let id = r.backup(&disk)?;
    Ok((disk, id))
}

#[test]
fn a_pack_scattered_over_the_disk_is_read_in_as_few_gets_as_its_size_allows() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let mut r = Remote::s3(&moto, "bypack")?;
    let dir = tempfile::tempdir()?;
    let (disk, id) = two_generations(&r, dir.path(), 80 * MIB)?;

    // Ranged GETs of packs, by pack key.
    let gets: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let log = gets.clone();
    let proxy = FaultProxy::start(moto.port, move |req| {
        if req.method == "GET" && req.target.contains("/packs/") && req.header("range").is_some() {
            let key = req.target.split('?').next().unwrap_or(req.target);
            let key = key[key.find("packs/").unwrap_or(0)..].to_string();
            if let Ok(mut log) = log.lock() {
                *log.entry(key).or_default() += 1;
            }
        }
        None
    })?;
    r.endpoint = proxy.endpoint();
    r.assert_restores(&id, dir.path(), &disk)?;

    let gets = gets
        .lock()
        .map_err(|_| anyhow::anyhow!("GET log poisoned"))?
        .clone();
    ensure!(
        gets.len() >= 2,
        "the restore read {} packs: {gets:?}",
        gets.len()
    );
    let mut failures = Vec::new();
    for (key, n) in &gets {
        let size = r.objects.size(key)?;
        // One GET per 4 MiB of the pack at most, and one more where a span ends between
        // two frames.
        let bound = size.div_ceil(MAX_SPAN) + 1;
        eprintln!("{key}: {size} bytes, {n} GETs (at most {bound})");
        if *n > bound {
            failures.push(format!(
                "{key} ({size} bytes) read in {n} GETs, at most {bound}"
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "packs read in more GETs than their size needs (once per part of the disk?): {}",
        failures.join("; ")
    );
    Ok(())
}

/// The restore's peak RSS bound in this test: each GET in flight holds a frame or two of the
/// span it streams; the process itself (binary, SQLite, the HTTP client, rayon) a few tens
/// of MiB.
const RSS_BOUND: u64 = 80 * MIB;

#[test]
fn a_remote_restore_of_scattered_chunks_holds_spans_in_flight_not_windows() -> Result<()> {
    if !have_usr_bin_time()? {
        return Ok(());
    }
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "bypackmemory")?;
    let dir = tempfile::tempdir()?;
    // Larger than the budget, so holding the disk's packs or frames would break it.
    let size = 192 * MIB;
    let (disk, id) = two_generations(&r, dir.path(), size)?;
    let (kib, text) = restore_peak_rss_kib(&r, &id, dir.path(), &disk)?;
    eprintln!("peak RSS {} MiB restoring {} MiB", kib / 1024, size / MIB);
    ensure!(
        kib * 1024 <= RSS_BOUND,
        "peak RSS {} MiB restoring a {} MiB disk (bound {} MiB): {text}",
        kib / 1024,
        size / MIB,
        RSS_BOUND / MIB
    );
    Ok(())
}
