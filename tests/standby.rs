//! Standby disks (`standby sync`, `standby status`): a file (raw and fixed VHD), a loop device
//! and an Azurite page blob follow three generations of a disk and equal a fresh restore after
//! each; later syncs write exactly the changed extents (`diff`'s changed bytes); a sync killed
//! midway leaves the target "applying" and the next sync completes it, even where the newer
//! snapshot equals the one before the interrupted sync; a target holding another disk, or
//! changed behind our back (`--verify`), is refused until `--full`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context as _};
use stackvault::azure::sign::SharedKey;
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault_tests::{
    have_qemu_img, in_ci, loop_device, make_disk, p, pause_at, qemu_img, same_bytes, scribble_disk,
    sv, sv_env, sv_json, sv_ok, Azurite, Fixture, Paused,
};

const MIB: u64 = 1 << 20;
const SCRIBBLES: u64 = 5;
const SCRIBBLE_LEN: u64 = 64 * 1024;
/// Largest chunk of the default chunker: a changed range drags in at most one partly equal
/// chunk at each end.
const MAX_CHUNK: u64 = 64 * 1024;

/// `standby sync` with `--json`; fails unless it succeeds.
fn sync(
    repo: &Path,
    disk: &str,
    target: &str,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["standby", "sync", "-r", p(repo), "--disk", disk, target];
    args.extend_from_slice(extra);
    let (code, v, stderr) = sv_json(&args)?;
    if code != Some(0) {
        bail!("standby sync {target} failed ({code:?}): {stderr}");
    }
    Ok(v)
}

fn status(target: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["standby", "status", target];
    args.extend_from_slice(extra);
    let (code, v, stderr) = sv_json(&args)?;
    if code != Some(0) {
        bail!("standby status {target} failed: {stderr}");
    }
    Ok(v)
}

fn num(v: &serde_json::Value, key: &str) -> anyhow::Result<u64> {
    v[key].as_u64().with_context(|| format!("{key} in {v:#}"))
}

/// Bytes `diff` reports changed from `a` to `b`.
fn changed_bytes(repo: &Path, a: &str, b: &str) -> anyhow::Result<u64> {
    let (code, v, stderr) = sv_json(&["diff", p(repo), a, b])?;
    anyhow::ensure!(code == Some(0), "diff failed: {stderr}");
    num(&v, "changed_bytes")
}

/// The second generation's changes: one 1 MiB stretch of data becomes zeros (a hole to
/// punch), and the disk grows by 3 MiB + 4 KiB ending in data (a resize).
fn zero_and_grow(disk: &Path) -> anyhow::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(disk)?;
    let size = f.metadata()?.len();
    f.write_all_at(&vec![0u8; MIB as usize], 2 * MIB)?;
    let grown = size + 3 * MIB + 4096;
    f.set_len(grown)?;
    f.write_all_at(
        &fs::read("/usr/bin/env").unwrap_or_else(|_| vec![7; 30_000]),
        grown - 3 * MIB,
    )?;
    f.sync_all()?;
    Ok(())
}

/// Asserts the sync of an incremental generation wrote exactly the changed extents, and
/// about the scribbled bytes.
fn assert_wrote_changes(
    report: &serde_json::Value,
    changed: u64,
    scribbled: u64,
) -> anyhow::Result<()> {
    assert_eq!(report["mode"], "incremental", "{report:#}");
    let written = num(report, "written_bytes")?;
    let zeroed = num(report, "zeroed_bytes")?;
    assert_eq!(
        written + zeroed,
        changed,
        "the changed extents, no more: {report:#}"
    );
    assert!(
        written >= scribbled / 2 && written <= scribbled + 2 * MAX_CHUNK * SCRIBBLES,
        "{written} bytes written for {scribbled} bytes scribbled: {report:#}"
    );
    Ok(())
}

#[test]
fn a_standby_file_follows_three_generations_writing_only_changes() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 16 * MIB, 3)?;
    let gen0 = f.backup(&disk, "vm")?;
    let raw = f.path("standby.img");
    let vhd = f.path("standby.vhd");

    let first = sync(&repo, "vm", p(&raw), &[])?;
    assert_eq!(first["mode"], "full", "{first:#}");
    assert_eq!(first["target_format"], "raw");
    let first_vhd = sync(&repo, "vm", p(&vhd), &[])?;
    assert_eq!(first_vhd["target_format"], "vhd-fixed");
    assert!(
        same_bytes(&raw, &disk)?,
        "gen0 standby differs from the disk"
    );
    let st = status(p(&raw), &[])?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("clean"), Some(gen0.as_str())),
        "{st:#}"
    );
    assert!(Path::new(&format!("{}.stackvault-standby", raw.display())).exists());

    scribble_disk(&disk, SCRIBBLES, 1)?;
    let gen1 = f.backup(&disk, "vm")?;
    let changed = changed_bytes(&repo, &gen0, &gen1)?;
    let r = sync(&repo, "vm", p(&raw), &[])?;
    assert_wrote_changes(&r, changed, SCRIBBLES * SCRIBBLE_LEN)?;
    assert_eq!(r["previous_snapshot_id"], gen0.as_str());
    let r = sync(&repo, "vm", p(&vhd), &[])?;
    assert_wrote_changes(&r, changed, SCRIBBLES * SCRIBBLE_LEN)?;
    assert!(
        same_bytes(&raw, &disk)?,
        "gen1 standby differs from the disk"
    );

    zero_and_grow(&disk)?;
    let gen2 = f.backup(&disk, "vm")?;
    let changed = changed_bytes(&repo, &gen1, &gen2)?;
    for target in [&raw, &vhd] {
        let r = sync(&repo, "vm", p(target), &["--verify", "100%"])?;
        assert_eq!(r["mode"], "incremental", "{r:#}");
        assert_eq!(r["resized"], true, "{r:#}");
        assert!(
            num(&r, "zeroed_bytes")? >= MIB - 2 * MAX_CHUNK,
            "a hole punched: {r:#}"
        );
        assert_eq!(
            num(&r, "written_bytes")? + num(&r, "zeroed_bytes")?,
            changed,
            "{r:#}"
        );
        assert_eq!(
            r["verify"]["segments_checked"], r["verify"]["segments_total"],
            "{r:#}"
        );
    }
    assert!(
        same_bytes(&raw, &disk)?,
        "gen2 standby differs from the disk"
    );
    // The fixed VHD equals a fresh restore of gen2 (qemu-img reads both).
    let restored = f.path("restored.vhd");
    sv_ok(&[
        "restore",
        p(&repo),
        &gen2,
        p(&restored),
        "--output-format",
        "vhd-fixed",
    ])?;
    if have_qemu_img() {
        qemu_img(&["compare", "-f", "vpc", "-F", "vpc", p(&vhd), p(&restored)])?;
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", p(&vhd), p(&disk)])?;
    } else if in_ci() {
        bail!("qemu-img missing under CI=true");
    } else {
        eprintln!("SKIPPED qemu-img compare: qemu-img not installed");
    }
    assert_eq!(fs::metadata(&vhd)?.len(), fs::metadata(&restored)?.len());
    let st = status(p(&vhd), &[])?;
    assert_eq!(st["snapshot_id"], gen2.as_str(), "{st:#}");
    assert_eq!(st["state"], "clean", "{st:#}");
    Ok(())
}

/// Starts `standby sync` with the pause hook at `point` (one worker thread) and returns it
/// once it has paused there.
fn paused_sync(repo: &Path, disk: &str, target: &str, point: &str) -> anyhow::Result<Paused> {
    let args = ["standby", "sync", "-r", p(repo), "--disk", disk, target];
    pause_at(&args, &[("RAYON_NUM_THREADS", "1")], point)
}

/// Runs `standby sync` paused at `point`, then SIGKILLs it.
fn killed_sync(repo: &Path, disk: &str, target: &str, point: &str) -> anyhow::Result<()> {
    paused_sync(repo, disk, target, point)?.kill()
}

#[test]
fn a_second_sync_of_the_same_target_refuses_while_one_runs() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, _) = f.backup_new_disk("vm", 8 * MIB, 4)?;
    let target = f.path("standby.img");
    sync(&repo, "vm", p(&target), &[])?;
    scribble_disk(&disk, SCRIBBLES, 6)?;
    let gen1 = f.backup(&disk, "vm")?;
    let running = paused_sync(&repo, "vm", p(&target), "standby-segment:1")?;
    let st = status(p(&target), &[])?;
    assert_eq!(
        (st["state"].as_str(), st["sync_running"].as_bool()),
        (Some("applying"), Some(true)),
        "{st:#}"
    );
    let out = sv(&[
        "standby",
        "sync",
        "-r",
        p(&repo),
        "--disk",
        "vm",
        p(&target),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another standby sync"), "{stderr}");
    running.kill()?;
    let r = sync(&repo, "vm", p(&target), &[])?;
    assert_eq!(
        r["completed_interrupted"],
        serde_json::json!([gen1]),
        "{r:#}"
    );
    assert!(same_bytes(&target, &disk)?);
    Ok(())
}

#[test]
fn a_killed_sync_stays_applying_and_the_next_completes_it() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 16 * MIB, 5)?;
    let original = f.path("gen0-copy.img");
    fs::copy(&disk, &original)?;
    let gen0 = f.backup(&disk, "vm")?;
    let target = f.path("standby.img");
    sync(&repo, "vm", p(&target), &[])?;

    scribble_disk(&disk, SCRIBBLES, 2)?;
    let gen1 = f.backup(&disk, "vm")?;
    // Killed before its 4th (last) segment: segments 0-2 of gen1 are on the target.
    killed_sync(&repo, "vm", p(&target), "standby-segment:4")?;
    let st = status(p(&target), &[])?;
    assert_eq!(st["state"], "applying", "{st:#}");
    assert_eq!(st["snapshot_id"], gen0.as_str(), "{st:#}");
    assert_eq!(st["applying"], serde_json::json!([gen1]), "{st:#}");
    let human = sv_ok(&["standby", "status", p(&target)])?;
    assert!(human.contains("applying"), "{human}");
    assert!(
        !same_bytes(&target, &original)?,
        "part of gen1 reached the target"
    );
    assert!(
        !same_bytes(&target, &disk)?,
        "not all of gen1 reached the target"
    );

    // gen2 puts gen0's bytes back: gen0 → gen2 changes nothing, yet the target holds part of
    // gen1 and must be repaired.
    fs::copy(&original, &disk)?;
    let gen2 = f.backup(&disk, "vm")?;
    assert_eq!(changed_bytes(&repo, &gen0, &gen2)?, 0);
    let r = sync(&repo, "vm", p(&target), &[])?;
    assert_eq!(
        r["completed_interrupted"],
        serde_json::json!([gen1]),
        "{r:#}"
    );
    assert_eq!(r["mode"], "incremental", "{r:#}");
    assert!(num(&r, "written_bytes")? > 0, "{r:#}");
    assert!(
        same_bytes(&target, &original)?,
        "the next sync did not complete the target"
    );
    let st = status(p(&target), &[])?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("clean"), Some(gen2.as_str())),
        "{st:#}"
    );

    // A first (full) sync killed midway is redone in full.
    let fresh = f.path("fresh.img");
    killed_sync(&repo, "vm", p(&fresh), "restore-segment:3")?;
    let st = status(p(&fresh), &[])?;
    assert_eq!(st["state"], "applying", "{st:#}");
    assert_eq!(st["snapshot_id"], serde_json::Value::Null, "{st:#}");
    let r = sync(&repo, "vm", p(&fresh), &[])?;
    assert_eq!(r["mode"], "full", "{r:#}");
    assert!(same_bytes(&fresh, &original)?);
    Ok(())
}

#[test]
fn another_disk_a_foreign_file_and_a_tampered_target_are_refused_until_full() -> anyhow::Result<()>
{
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk_a, _) = f.backup_new_disk("a", 8 * MIB, 1)?;
    let (disk_b, _) = f.backup_new_disk("b", 8 * MIB, 9)?;
    let target = f.path("standby.img");
    sync(&repo, "a", p(&target), &[])?;

    let out = sv(&["standby", "sync", "-r", p(&repo), "--disk", "b", p(&target)])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("holds disk \"a\"") && stderr.contains("--full"),
        "{stderr}"
    );
    assert!(
        same_bytes(&target, &disk_a)?,
        "the refused sync wrote nothing"
    );
    let r = sync(&repo, "b", p(&target), &["--full"])?;
    assert_eq!(r["mode"], "full");
    assert!(same_bytes(&target, &disk_b)?);

    // A file stackvault did not write is not overwritten without --full.
    let foreign = f.path("foreign.img");
    fs::write(&foreign, b"somebody's data")?;
    let out = sv(&[
        "standby",
        "sync",
        "-r",
        p(&repo),
        "--disk",
        "a",
        p(&foreign),
    ])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(fs::read(&foreign)?, b"somebody's data");

    // Changed behind our back: a sync that writes nothing still finds it with --verify.
    let file = fs::OpenOptions::new().write(true).open(&target)?;
    file.write_all_at(b"tampered", 4 * MIB + 100)?;
    drop(file);
    let r = sync(&repo, "b", p(&target), &[])?;
    assert_eq!(
        num(&r, "written_bytes")? + num(&r, "zeroed_bytes")?,
        0,
        "{r:#}"
    );
    let out = sv(&[
        "standby",
        "sync",
        "-r",
        p(&repo),
        "--disk",
        "b",
        p(&target),
        "--verify",
        "100%",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("behind stackvault's back"), "{stderr}");
    assert_eq!(status(p(&target), &[])?["state"], "diverged");
    let out = sv(&["standby", "sync", "-r", p(&repo), "--disk", "b", p(&target)])?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "a diverged target needs --full: {out:?}"
    );
    sync(&repo, "b", p(&target), &["--full", "--verify", "100%"])?;
    assert!(same_bytes(&target, &disk_b)?);
    Ok(())
}

fn read_range(path: &Path, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

#[test]
fn a_standby_block_device_follows_three_generations() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 16 * MIB, 7)?;
    let gen0 = f.backup(&disk, "vm")?;
    let Some(dev) = loop_device(&f.path("backing"), 24 * MIB, 24 * MIB)? else {
        return Ok(());
    };
    let target = p(&dev.dev).to_string();
    let state = f.path("state");
    let sd = ["--state-dir", p(&state)];
    // Devices always exist: the first sync onto one without a record needs --full.
    let out = sv(&[
        "standby",
        "sync",
        "-r",
        p(&repo),
        "--disk",
        "vm",
        &target,
        "--state-dir",
        p(&state),
    ])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let r = sync(&repo, "vm", &target, &["--full", "--state-dir", p(&state)])?;
    assert_eq!(r["target_kind"], "device", "{r:#}");
    assert_eq!(read_range(&dev.dev, 0, 16 * MIB)?, fs::read(&disk)?);
    let st = status(&target, &sd)?;
    assert_eq!(st["snapshot_id"], gen0.as_str(), "{st:#}");
    assert!(
        st["record"]["identity"]
            .as_str()
            .unwrap_or("")
            .starts_with("loop-backing-file:"),
        "{st:#}"
    );

    scribble_disk(&disk, SCRIBBLES, 3)?;
    let gen1 = f.backup(&disk, "vm")?;
    let r = sync(&repo, "vm", &target, &sd)?;
    assert_wrote_changes(
        &r,
        changed_bytes(&repo, &gen0, &gen1)?,
        SCRIBBLES * SCRIBBLE_LEN,
    )?;
    // gen2 zeroes a stretch of data: the device must read zeros there.
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)?
        .write_all_at(&vec![0u8; MIB as usize], 2 * MIB)?;
    let gen2 = f.backup(&disk, "vm")?;
    let r = sync(
        &repo,
        "vm",
        &target,
        &["--state-dir", p(&state), "--verify", "100%"],
    )?;
    assert_eq!(
        num(&r, "written_bytes")? + num(&r, "zeroed_bytes")?,
        changed_bytes(&repo, &gen1, &gen2)?
    );
    assert!(num(&r, "zeroed_bytes")? > 0, "{r:#}");
    assert_eq!(read_range(&dev.dev, 0, 16 * MIB)?, fs::read(&disk)?);
    assert_eq!(
        read_range(&dev.dev, 16 * MIB, 8 * MIB)?,
        vec![0xa5u8; 8 * MIB as usize],
        "bytes past the disk untouched"
    );
    assert_eq!(status(&target, &sd)?["snapshot_id"], gen2.as_str());
    Ok(())
}

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn a_standby_page_blob_follows_three_generations_with_blob_snapshots() -> anyhow::Result<()> {
    let Some(azurite) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let endpoint = format!("http://127.0.0.1:{}/{ACCOUNT}", azurite.port);
    let key_options = BlobOptions {
        endpoint: Some(endpoint.clone()),
        account_key: Some(KEY.into()),
        ..Default::default()
    };
    BlobClient::new(&format!("azure://{ACCOUNT}/standby/x"), &key_options)?.create_container()?;
    let sas = SharedKey::new(ACCOUNT, KEY)?.account_sas("racwdl", "2099-01-01T00:00:00Z");
    let url = format!("{endpoint}/standby/vm.vhd?{sas}");
    let blob = BlobClient::new(&format!("azure://{ACCOUNT}/standby/vm.vhd"), &key_options)?;

    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 16 * MIB, 11)?;
    let gen0 = f.backup(&disk, "vm")?;
    let keep = [
        "--keep-blob-snapshots",
        "2",
        "--target-profile",
        "azurestack",
    ];
    let r = sync(&repo, "vm", &url, &keep)?;
    assert_eq!(r["mode"], "full", "{r:#}");
    assert!(!r.to_string().contains("sig="), "no SAS in the report");

    scribble_disk(&disk, SCRIBBLES, 4)?;
    let gen1 = f.backup(&disk, "vm")?;
    let r = sync(&repo, "vm", &url, &keep)?;
    assert_wrote_changes(
        &r,
        changed_bytes(&repo, &gen0, &gen1)?,
        SCRIBBLES * SCRIBBLE_LEN,
    )?;
    // 4 KiB pages (Stack Hub): the upload is the changed data rounded out to pages.
    let uploaded = num(&r, "uploaded_bytes")?;
    let pages_around = 2 * 4096 * (num(&r, "written_ranges")? + num(&r, "zeroed_ranges")?);
    assert!(
        uploaded <= num(&r, "written_bytes")? + num(&r, "zeroed_bytes")? + pages_around,
        "{r:#}"
    );

    zero_and_grow(&disk)?;
    let gen2 = f.backup(&disk, "vm")?;
    // Through Shared Key this time (Azurite 3.35 answers 500 to a resize authorised by an
    // account SAS): the record lives on the blob, whatever the URL form.
    let blob_url = format!("azure://{ACCOUNT}/standby/vm.vhd");
    let mut args = vec!["standby", "sync", "-r", p(&repo), "--disk", "vm"];
    args.extend([blob_url.as_str(), "--endpoint", endpoint.as_str()]);
    args.extend([
        "--account-key-env",
        "STANDBY_TEST_KEY",
        "--verify",
        "100%",
        "--json",
    ]);
    args.extend(keep);
    let out = sv_env(&args, &[("STANDBY_TEST_KEY", KEY)])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["resized"], true, "{r:#}");
    assert_eq!(
        num(&r, "written_bytes")? + num(&r, "zeroed_bytes")?,
        changed_bytes(&repo, &gen1, &gen2)?
    );

    // The record, through the REST API.
    let (props, meta) = blob.properties_and_metadata()?.context("blob")?;
    assert_eq!(
        meta.get("stackvault_snapshot").map(String::as_str),
        Some(gen2.as_str()),
        "{meta:?}"
    );
    assert_eq!(
        meta.get("stackvault_state").map(String::as_str),
        Some("clean")
    );
    assert_eq!(meta.get("stackvault_disk").map(String::as_str), Some("vm"));
    let size = fs::metadata(&disk)?.len();
    assert_eq!(props.size, size.div_ceil(MIB) * MIB + 512);
    // Three clean syncs, two blob snapshots kept: the newest holds gen2.
    let snaps = blob.list_snapshots()?;
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_eq!(
        snaps[1]
            .metadata
            .get("stackvault_snapshot")
            .map(String::as_str),
        Some(gen2.as_str())
    );
    assert_eq!(
        snaps[0]
            .metadata
            .get("stackvault_snapshot")
            .map(String::as_str),
        Some(gen1.as_str())
    );
    let st = status(&url, &[])?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("clean"), Some(gen2.as_str())),
        "{st:#}"
    );

    // Byte for byte the disk, and a fixed VHD qemu-img reads.
    let mut bytes = vec![0u8; props.size as usize];
    for (i, piece) in bytes.chunks_mut(4 << 20).enumerate() {
        blob.read_range(i as u64 * (4 << 20), piece, None)?;
    }
    let local = f.path("downloaded.vhd");
    fs::write(&local, &bytes)?;
    assert_eq!(&bytes[..size as usize], &fs::read(&disk)?[..]);
    assert!(bytes[size as usize..bytes.len() - 512]
        .iter()
        .all(|&b| b == 0));
    if have_qemu_img() {
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", p(&local), p(&disk)])?;
    } else if in_ci() {
        bail!("qemu-img missing under CI=true");
    }

    // A snapshot of another disk is refused.
    let (_, _) = f.backup_new_disk("other", 4 * MIB, 2)?;
    let out = sv(&["standby", "sync", "-r", p(&repo), "--disk", "other", &url])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    Ok(())
}
