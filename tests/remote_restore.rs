//! Restores from object storage read packs in coalesced ranged GETs, not a GET per frame:
//! a snapshot spread over several packs restores byte-identical from moto and Azurite with a
//! GET count bounded by the packs touched and the spans of at most 4 MiB, far below its
//! frame count; a damaged frame still fails the restore with exit 3, naming the pack and the
//! offset of the frame; and the restore's peak memory stays within the 128 MiB
//! budget on a disk larger than that budget.

use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use stackvault_tests::{in_ci, p, same_bytes, Disk};

use crate::remote_maintain::{azurite, moto, Remote};

const MIB: u64 = 1 << 20;
/// Raw bytes of a frame at most (`FRAME_TARGET_LEN` in format/pack.rs): random data does not
/// compress, so a disk of random bytes has at least its size / this many frames.
const FRAME_MAX: u64 = 256 * 1024;
/// A loose bound's span size: the restore once cut spans at 4 MiB; it now streams a pack's
/// wanted part in one GET (pinned by `remote_restore_stream`).
const MAX_SPAN: u64 = 4 * MIB;

/// GETs of a report: `get` on S3, `get_blob` on Azure.
fn gets(report: &Value) -> Result<u64> {
    let requests = &report["requests"];
    requests["get"]
        .as_u64()
        .or_else(|| requests["get_blob"].as_u64())
        .with_context(|| format!("no GET count in {report:#}"))
}

/// Backs up a random disk of `size` into `r` (initialised here) and returns its path (in
/// `dir`) and the snapshot id.
fn backed_up(r: &Remote, dir: &std::path::Path, size: u64) -> Result<(std::path::PathBuf, String)> {
    let disk = dir.join("d.img");
    Disk::random(size, 14).write(&disk)?;
    r.json(&["init"])?;
    let id = r.backup(&disk)?;
    Ok((disk, id))
}

/// Restores the snapshot and checks the GET bound.
fn restores_in_few_gets(r: &Remote, size: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (disk, id) = backed_up(r, dir.path(), size)?;
    let packs = r.keys("packs/")?.len() as u64;
    ensure!(
        packs >= 2,
        "the snapshot should span several packs, has {packs}"
    );
    let out = dir.path().join("r.img");
    let report = r.json(&["restore", &id, p(&out), "--force"])?;
    ensure!(
        same_bytes(&out, &disk)?,
        "the restore differs from the disk"
    );
    let get = gets(&report)?;
    let frames = size.div_ceil(FRAME_MAX);
    eprintln!("{get} GETs for {packs} packs and at least {frames} frames");
    // Per pack touched, a span per 4 MiB and one more where a 32 MiB window cuts a pack;
    // a few GETs for the repository's own objects.
    let bound = 2 * packs + size.div_ceil(MAX_SPAN) + 6;
    ensure!(
        get <= bound,
        "{get} GETs to restore {size} bytes in {packs} packs (at most {bound}): {report:#}"
    );
    ensure!(
        get * 5 <= frames,
        "{get} GETs for at least {frames} frames: not coalesced: {report:#}"
    );
    Ok(())
}

#[test]
fn a_restore_from_s3_reads_packs_in_few_coalesced_gets() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    restores_in_few_gets(&Remote::s3(&moto, "coalesce")?, 40 * MIB)
}

#[test]
fn a_restore_from_azure_reads_packs_in_few_coalesced_gets() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    restores_in_few_gets(&Remote::azure(&az, "coalesce")?, 40 * MIB)
}

/// The number after `at offset ` in `text`.
fn offset_in(text: &str) -> Option<u64> {
    let rest = &text[text.find("at offset ")? + "at offset ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn a_damaged_frame_read_in_a_span_fails_naming_pack_and_offset() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "damage")?;
    let dir = tempfile::tempdir()?;
    let (_, id) = backed_up(&r, dir.path(), 24 * MIB)?;
    let key = r.keys("packs/")?.into_iter().next().context("no pack")?;
    let name = key.rsplit('/').next().unwrap_or(&key).to_string();
    let mut bytes = r.objects.get(&key)?;
    let at = 3 * MIB as usize + 1000;
    ensure!(
        bytes.len() > at + 4096,
        "pack {key} is only {} bytes",
        bytes.len()
    );
    bytes[at] ^= 0x40;
    r.objects.remove(&key)?;
    r.objects.put(&key, &bytes)?;

    let out = dir.path().join("r.img");
    let (code, _, text) = r.run_json(&["restore", &id, p(&out), "--force"])?;
    ensure!(
        code == Some(3),
        "a damaged frame must exit 3, got {code:?}: {text}"
    );
    ensure!(
        text.contains(&name),
        "the error must name pack {name}: {text}"
    );
    let offset = offset_in(&text).with_context(|| format!("no offset in: {text}"))?;
    // The frame holding the flipped byte: it starts at most a frame's record before it.
    let at = at as u64;
    ensure!(
        offset <= at && at - offset < FRAME_MAX + 4096,
        "offset {offset} is not the frame holding byte {at}: {text}"
    );
    ensure!(!out.exists(), "a failed restore left {}", out.display());
    Ok(())
}

/// Whether `/usr/bin/time` is there to measure peak memory: a failure without it under CI,
/// a skip (said why) elsewhere.
pub(crate) fn have_usr_bin_time() -> Result<bool> {
    if std::path::Path::new("/usr/bin/time").exists() {
        return Ok(true);
    }
    if in_ci() {
        bail!("/usr/bin/time is missing (apt-get install time)");
    }
    eprintln!("skipped: /usr/bin/time is missing");
    Ok(false)
}

/// Restores snapshot `id` of `r` into `dir` under `/usr/bin/time`, checks that the restore is
/// `disk` byte for byte, and returns its peak resident memory (KiB) and output.
pub(crate) fn restore_peak_rss_kib(
    r: &Remote,
    id: &str,
    dir: &std::path::Path,
    disk: &std::path::Path,
) -> Result<(u64, String)> {
    let out = dir.join("r.img");
    let cmd = r.command(&["restore", &r.location, id, p(&out), "--force"]);
    let (kib, text) = peak_rss_kib(&cmd)?;
    ensure!(same_bytes(&out, disk)?, "the restore differs from the disk");
    Ok((kib, text))
}

/// Peak resident memory (KiB) of `cmd` run under `/usr/bin/time`, and its output.
pub(crate) fn peak_rss_kib(cmd: &Command) -> Result<(u64, String)> {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("peak-rss-kib %M")
        .arg(cmd.get_program());
    timed.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let out = timed.output().context("run /usr/bin/time")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "restore failed: {stderr}");
    let kib = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("peak-rss-kib "))
        .next_back()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no peak RSS in: {stderr}"))?;
    Ok((kib, stderr))
}

#[test]
fn a_remote_restore_larger_than_the_memory_budget_stays_within_it() -> Result<()> {
    if !have_usr_bin_time()? {
        return Ok(());
    }
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "memory")?;
    let dir = tempfile::tempdir()?;
    // Larger than the budget, so holding the disk's packs or frames would break it.
    let size = 160 * MIB;
    let (disk, id) = backed_up(&r, dir.path(), size)?;
    let (kib, text) = restore_peak_rss_kib(&r, &id, dir.path(), &disk)?;
    ensure!(
        kib * 1024 <= 128 * MIB,
        "peak RSS {} MiB restoring a {} MiB disk (budget 128 MiB): {text}",
        kib / 1024,
        size / MIB
    );
    Ok(())
}
