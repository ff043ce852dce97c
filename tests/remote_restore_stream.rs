//! A remote restore streams whole packs: one ranged GET per pack per region of the disk,
//! read frame by frame as it arrives, and a body cut off mid-way is resumed from the byte
//! reached instead of read again from its start (or chunk by chunk).
//!
//! Why it matters: a ranged GET costs a request (billed, a round trip) and, on stores that
//! read a whole object to serve a range (moto), the whole pack; a restore that cuts a 16 MiB
//! pack into 4 MiB spans pays that four times. The disks here are smaller than a region
//! (1 GiB), so every pack a snapshot needs is one GET.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use stackvault_tests::{scribble_disk, Azurite, Disk};

use crate::faultproxy::{Fault, FaultProxy, Incoming};
use crate::remote_maintain::{moto, Remote};

const MIB: u64 = 1 << 20;

/// Ranged GETs of packs as the proxy saw them: pack key → the first byte of each range.
type RangeLog = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// The pack key and range start of a ranged GET of a pack, if `req` is one.
fn pack_range(req: &Incoming<'_>) -> Option<(String, u64)> {
    if req.method != "GET" {
        return None;
    }
    let path = req.target.split('?').next().unwrap_or(req.target);
    let key = &path[path.rfind("packs/")?..];
    let range = req.header("range").or_else(|| req.header("x-ms-range"))?;
    let start = range
        .strip_prefix("bytes=")?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    Some((key.to_string(), start))
}

/// Backs up `gen0` (random, so its packs are full 16 MiB ones) and, after overwriting 48
/// evenly spread 64 KiB ranges, `gen1`; returns the disk (as of gen1) and gen1's snapshot.
fn two_generations(r: &Remote, dir: &std::path::Path) -> Result<(std::path::PathBuf, String)> {
    let disk = dir.join("d.img");
    Disk::random(72 * MIB, 46).write(&disk)?;
    r.json(&["init"])?;
    r.backup(&disk)?;
    scribble_disk(&disk, 48, 9)?;
    let id = r.backup(&disk)?;
    Ok((disk, id))
}

/// Restores `id` and checks it is `disk` byte for byte; returns the restore's `requests`.
fn restore(
    r: &Remote,
    id: &str,
    dir: &std::path::Path,
    disk: &std::path::Path,
) -> Result<serde_json::Value> {
    let out = dir.join("r.img");
    let report = r.json(&["restore", id, stackvault_tests::p(&out), "--force"])?;
    ensure!(
        stackvault_tests::same_bytes(&out, disk)?,
        "the restore differs from the disk"
    );
    Ok(report["requests"].clone())
}

fn logged(log: &RangeLog) -> Result<BTreeMap<String, Vec<u64>>> {
    Ok(log
        .lock()
        .map_err(|_| anyhow::anyhow!("GET log poisoned"))?
        .clone())
}

#[test]
fn a_remote_restore_reads_each_pack_in_one_get() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let mut r = Remote::s3(&moto, "streampacks")?;
    let dir = tempfile::tempdir()?;
    let (disk, id) = two_generations(&r, dir.path())?;

    let log: RangeLog = Arc::default();
    let seen = log.clone();
    let proxy = FaultProxy::start(moto.port, move |req| {
        if let (Some((key, start)), Ok(mut seen)) = (pack_range(req), seen.lock()) {
            seen.entry(key).or_default().push(start);
        }
        None
    })?;
    r.endpoint = proxy.endpoint();
    let requests = restore(&r, &id, dir.path(), &disk)?;

    let gets = logged(&log)?;
    let packs = r.keys("packs/")?;
    let mut sizes = BTreeMap::new();
    for key in &packs {
        sizes.insert(key.clone(), r.objects.size(key)?);
    }
    eprintln!("pack sizes {sizes:?}; ranged GETs {gets:?}; requests {requests}");
    ensure!(
        sizes.values().filter(|s| **s > 8 * MIB).count() >= 3,
        "the test needs packs larger than the old 4 MiB spans: {sizes:?}"
    );
    ensure!(
        gets.len() == packs.len(),
        "packs read {gets:?}, stored {packs:?}"
    );
    let several: Vec<_> = gets.iter().filter(|(_, starts)| starts.len() > 1).collect();
    ensure!(
        several.is_empty(),
        "packs read in more than one GET (spans cut short of the pack?): {several:?}"
    );
    // The same economy as the store counted it: a GET per pack, plus the few of the
    // repository's small objects (config, keys, manifest, index deltas).
    let counted = requests["get"]
        .as_u64()
        .context("no GET count in the report")?;
    ensure!(
        counted <= packs.len() as u64 + 12,
        "{counted} GETs for {} packs: {requests}",
        packs.len()
    );
    Ok(())
}

#[test]
fn a_pack_body_cut_off_mid_way_is_resumed_from_the_byte_reached_on_s3() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "streamresume")?;
    resumes_cut_bodies(r, moto.port, "")
}

#[test]
fn a_pack_body_cut_off_mid_way_is_resumed_from_the_byte_reached_on_azure() -> Result<()> {
    let Some(azurite) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let r = Remote::azure(&azurite, "streamresume")?;
    resumes_cut_bodies(r, azurite.port, "/devstoreaccount1")
}

/// Restores through a proxy to `upstream` (at `account_path` on it) that cuts off the first
/// body of each large pack halfway, and checks each was resumed once, from the byte reached.
fn resumes_cut_bodies(mut r: Remote, upstream: u16, account_path: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (disk, id) = two_generations(&r, dir.path())?;

    // The first GET of every pack larger than 8 MiB is cut off halfway through its body.
    let log: RangeLog = Arc::default();
    let cut: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let large: BTreeSet<String> = r
        .keys("packs/")?
        .into_iter()
        .filter(|k| r.objects.size(k).is_ok_and(|s| s > 8 * MIB))
        .collect();
    ensure!(large.len() >= 3, "the test needs large packs: {large:?}");
    let (seen, cutting) = (log.clone(), cut.clone());
    let proxy = FaultProxy::start(upstream, move |req| {
        let (key, start) = pack_range(req)?;
        let first = {
            let mut seen = seen.lock().ok()?;
            let starts = seen.entry(key.clone()).or_default();
            starts.push(start);
            starts.len() == 1
        };
        if first && large.contains(&key) {
            cutting.lock().ok()?.insert(key);
            return Some(Fault::TruncateBody);
        }
        None
    })?;
    r.endpoint = format!("{}{account_path}", proxy.endpoint());
    let requests = restore(&r, &id, dir.path(), &disk)?;

    let gets = logged(&log)?;
    let cut = cut
        .lock()
        .map_err(|_| anyhow::anyhow!("cut log poisoned"))?
        .clone();
    eprintln!("ranged GETs {gets:?}; cut {cut:?}; requests {requests}");
    ensure!(cut.len() >= 3, "too few bodies were cut: {cut:?}");
    for key in &cut {
        let starts = gets.get(key).context("a cut pack was never read again")?;
        // One resume, from past the start: the frames before the cut were used, not fetched
        // again, and nothing was read chunk by chunk.
        ensure!(
            starts.len() == 2 && starts[1] > starts[0] + MIB,
            "{key}: GETs from {starts:?}, expected the first and one resume from the byte \
             reached"
        );
    }
    let retries = requests["retries"].as_u64().context("no retry count")?;
    ensure!(
        retries >= cut.len() as u64,
        "{retries} retries counted for {} resumes: {requests}",
        cut.len()
    );
    Ok(())
}
