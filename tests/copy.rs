//! `copy` between repositories and `init --like`: snapshots keep their ids between
//! repositories that chunk alike and restore byte for byte at the destination, `verify`
//! passes there, a second copy sends nothing, an interrupted (SIGINT) or killed copy resumes
//! with only what is missing, repositories that chunk differently get re-chunked snapshots
//! that restore the same disk, and a damaged chunk fails only its own snapshot.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use stackvault_tests::{
    assert_restores, backup_disk, interrupt_at, make_disk, p, scribble_disk, snapshot_ids, sv_env,
    sv_json, sv_json_ok, sv_ok, Disk,
};

const MIB: u64 = 1 << 20;

/// Runs `copy --from src --to dst [extra]` with `--json`; fails unless it exits 0.
fn copy(src: &Path, dst: &Path, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["copy", "--from", p(src), "--to", p(dst)];
    args.extend_from_slice(extra);
    sv_json_ok(&args)
}

/// `verify` of `snapshot` in `repo` reads every chunk back and passes.
fn assert_verifies(repo: &Path, snapshot: &str) -> anyhow::Result<()> {
    let (code, v, stderr) = sv_json(&["verify", p(repo), snapshot])?;
    assert_eq!(code, Some(0), "verify {snapshot}: {stderr} {v:#}");
    assert_eq!(v["outcome"], "ok", "{v:#}");
    Ok(())
}

/// `check --json` of `repo`.
fn check(repo: &Path) -> anyhow::Result<serde_json::Value> {
    let (code, v, stderr) = sv_json(&["check", p(repo), "--read-data"])?;
    assert_eq!(code, Some(0), "check {}: {stderr} {v:#}", repo.display());
    Ok(v)
}

fn ids(v: &serde_json::Value, field: &str) -> Vec<String> {
    v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s[field].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_copy_into_a_like_repository_keeps_ids_and_a_second_copy_sends_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    // Not the default chunker: `init --like` must carry it over for the ids to match.
    sv_ok(&[
        "init",
        p(&src),
        "--chunker",
        "fastcdc:8K:32K:128K",
        "--zstd-level",
        "7",
        // Plain: `init --like` of an encrypted repository makes new keys, so ids differ.
        "--encryption",
        "none",
    ])?;
    let (code, like, stderr) =
        sv_json(&["init", p(&dst), "--like", p(&src), "--encryption", "none"])?;
    assert_eq!(code, Some(0), "{stderr}");
    let (_, src_info, _) = sv_json(&[
        "init",
        p(&dir.path().join("probe")),
        "--like",
        p(&src),
        "--encryption",
        "none",
    ])?;
    assert_eq!(like["chunker"], "fastcdc2020 8K/32K/128K level 1 seed 0");
    assert_eq!(like["zstd_level"], 7);
    assert_eq!(like["chunker"], src_info["chunker"]);
    assert_ne!(like["repository_id"], src_info["repository_id"]);

    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_disk(&a, 12 * MIB, 3)?;
    make_disk(&b, 9 * MIB + 4096, 40)?;
    let a0 = dir.path().join("a0.img");
    fs::copy(&a, &a0)?;
    let a0_id = backup_disk(&src, &a, "a")?;
    let b_id = backup_disk(&src, &b, "b")?;
    scribble_disk(&a, 10, 5)?;
    let a1_id = backup_disk(&src, &a, "a")?;

    let v = copy(&src, &dst, &[])?;
    assert_eq!(v["snapshots_copied"], 3, "{v:#}");
    assert_eq!(v["snapshots_skipped"], 0, "{v:#}");
    assert_eq!(v["rechunked"], false, "{v:#}");
    // Same ids on both sides, and the same catalogue.
    assert_eq!(snapshot_ids(&dst)?, snapshot_ids(&src)?);
    assert_eq!(ids(&v, "destination_snapshot_id"), ids(&v, "snapshot_id"));
    // Every chunk was sent exactly once: as many as the source holds.
    let src_check = check(&src)?;
    assert_eq!(v["chunks_sent"], src_check["chunks"], "{v:#}");
    assert!(v["packs_written"].as_u64() >= Some(1), "{v:#}");
    let dst_check = check(&dst)?;
    assert_eq!(dst_check["chunks"], src_check["chunks"]);
    assert_eq!(dst_check["ok"], true);
    for (id, disk) in [(&a0_id, &a0), (&b_id, &b), (&a1_id, &a)] {
        assert_restores(&dst, id, disk)?;
        assert_verifies(&dst, id)?;
    }

    // Again: nothing to send.
    let again = copy(&src, &dst, &[])?;
    assert_eq!(again["snapshots_copied"], 0, "{again:#}");
    assert_eq!(again["snapshots_skipped"], 3, "{again:#}");
    assert_eq!(again["chunks_sent"], 0, "{again:#}");
    assert_eq!(again["packs_written"], 0, "{again:#}");
    assert_eq!(again["written_bytes"], 0, "{again:#}");

    // A new snapshot at the source: only it is copied, and only its new chunks are sent.
    scribble_disk(&a, 4, 6)?;
    let a2_id = backup_disk(&src, &a, "a")?;
    let (_, shown, _) = sv_json(&["show", p(&src), &a2_id])?;
    let one = copy(&src, &dst, &["--disk", "a", "latest"])?;
    assert_eq!(one["snapshots_copied"], 1, "{one:#}");
    assert_eq!(ids(&one, "snapshot_id"), vec![a2_id.clone()]);
    assert_eq!(
        one["chunks_sent"], shown["stats"]["new_chunks"],
        "{one:#} {shown:#}"
    );
    assert_restores(&dst, &a2_id, &a)?;
    Ok(())
}

#[test]
fn a_copy_between_different_chunkers_rechunks_and_restores_the_same_disks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    sv_ok(&["init", p(&src)])?;
    sv_ok(&[
        "init",
        p(&dst),
        "--chunker",
        "fastcdc",
        "--encryption",
        "none",
    ])?;
    let a = dir.path().join("a.img");
    make_disk(&a, 10 * MIB + 512, 7)?;
    let a0 = dir.path().join("a0.img");
    fs::copy(&a, &a0)?;
    let a0_id = backup_disk(&src, &a, "a")?;
    scribble_disk(&a, 6, 2)?;
    let a1_id = backup_disk(&src, &a, "a")?;

    let v = copy(&src, &dst, &[])?;
    assert_eq!(v["rechunked"], true, "{v:#}");
    assert_eq!(v["snapshots_copied"], 2, "{v:#}");
    let made = ids(&v, "destination_snapshot_id");
    assert_eq!(made.len(), 2, "{v:#}");
    assert!(!made.contains(&a0_id) && !made.contains(&a1_id), "{v:#}");
    assert_restores(&dst, &made[0], &a0)?;
    assert_restores(&dst, &made[1], &a)?;
    for id in &made {
        assert_verifies(&dst, id)?;
    }
    // The copies describe the originals: disk, time, and where they came from.
    for (orig, copied) in [(&a0_id, &made[0]), (&a1_id, &made[1])] {
        let (_, o, _) = sv_json(&["show", p(&src), orig])?;
        let (_, c, _) = sv_json(&["show", p(&dst), copied])?;
        assert_eq!(c["disk"], o["disk"]);
        assert_eq!(c["time"], o["time"], "{c:#}");
        assert_eq!(c["change_source"], format!("copy-of:{orig}"), "{c:#}");
    }
    // Only the two copies are there (the backups' interim manifests are gone).
    assert_eq!(snapshot_ids(&dst)?, made);
    assert_eq!(check(&dst)?["ok"], true);

    // A second copy knows them by their origin.
    let again = copy(&src, &dst, &[])?;
    assert_eq!(again["snapshots_skipped"], 2, "{again:#}");
    assert_eq!(again["chunks_sent"], 0, "{again:#}");
    assert_eq!(ids(&again, "destination_snapshot_id"), made);
    Ok(())
}

/// A source with one 48 MiB snapshot that neither compresses nor deduplicates (three 16 MiB
/// packs' worth), an empty destination like it, and the chunk count a complete copy sends.
fn big_source(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf, String, u64)> {
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    sv_ok(&["init", p(&src), "--encryption", "none"])?;
    sv_ok(&["init", p(&dst), "--like", p(&src), "--encryption", "none"])?;
    let disk = dir.join("vm.img");
    Disk::random(48 * MIB, 11).write(&disk)?;
    let id = backup_disk(&src, &disk, "vm")?;
    let total = check(&src)?["chunks"].as_u64().context("chunk count")?;
    Ok((src, dst, disk, id, total))
}

#[test]
fn an_interrupted_copy_resumes_and_sends_only_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst, disk, id, total) = big_source(dir.path())?;
    // Paused before its 10th segment: 36 MiB of chunks were taken, two packs stored.
    let (code, stderr) = interrupt_at(
        &["copy", "--from", p(&src), "--to", p(&dst)],
        "copy-segment:10",
        "INT",
    )?;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: copy stopped"), "{stderr}");
    // What it read is stored and indexed; the snapshot is not there yet.
    let partial = check(&dst)?;
    let kept = partial["chunks"].as_u64().context("chunks")?;
    assert!(kept > 0 && kept < total, "{kept} of {total}: {partial:#}");
    assert_eq!(partial["snapshots"], 0);
    assert!(snapshot_ids(&dst)?.is_empty());
    assert!(
        fs::read_dir(dst.join("locks"))?.next().is_none(),
        "a lock was left behind"
    );

    let v = copy(&src, &dst, &[])?;
    assert_eq!(v["snapshots_copied"], 1, "{v:#}");
    assert_eq!(v["chunks_sent"].as_u64(), Some(total - kept), "{v:#}");
    assert_eq!(
        v["chunks_skipped"].as_u64(),
        Some(kept),
        "the chunks of the first run are not sent again: {v:#}"
    );
    assert_eq!(snapshot_ids(&dst)?, vec![id.clone()]);
    assert_restores(&dst, &id, &disk)?;
    assert_verifies(&dst, &id)?;
    Ok(())
}

#[test]
fn a_killed_copy_indexes_the_pack_it_stored_and_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst, disk, id, total) = big_source(dir.path())?;
    // Killed right after storing its second pack, before indexing it.
    let out = sv_env(
        &["copy", "--from", p(&src), "--to", p(&dst)],
        &[("STACKVAULT_CRASH_AT", "pack-stored:2")],
    )?;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the copy was not killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let indexed = check(&dst)?["chunks"].as_u64().context("chunks")?;
    assert!(indexed > 0, "the first pack is indexed");

    let v = copy(&src, &dst, &[])?;
    assert_eq!(v["packs_adopted"], 1, "{v:#}");
    let sent = v["chunks_sent"].as_u64().context("chunks_sent")?;
    // The stored but unindexed pack's chunks are reused too, not only the indexed one's.
    assert!(
        sent < total - indexed,
        "sent {sent} of {total}, {indexed} indexed: {v:#}"
    );
    assert_eq!(check(&dst)?["chunks"].as_u64(), Some(total));
    assert_restores(&dst, &id, &disk)?;
    assert_verifies(&dst, &id)?;
    Ok(())
}

#[test]
fn a_damaged_chunk_fails_only_its_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    sv_ok(&["init", p(&src), "--encryption", "none"])?;
    sv_ok(&["init", p(&dst), "--like", p(&src), "--encryption", "none"])?;
    let packs = |repo: &Path| -> anyhow::Result<BTreeSet<PathBuf>> {
        let mut out = BTreeSet::new();
        for sub in fs::read_dir(repo.join("packs"))? {
            for f in fs::read_dir(sub?.path())? {
                out.insert(f?.path());
            }
        }
        Ok(out)
    };
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    Disk::random(4 * MIB, 1).write(&a)?;
    Disk::random(4 * MIB, 2).write(&b)?;
    let a_id = backup_disk(&src, &a, "a")?;
    let a_packs = packs(&src)?;
    let b_id = backup_disk(&src, &b, "b")?;
    // Flip a byte inside the first frame of a's only pack.
    let damaged = a_packs.iter().next().context("a pack of disk a")?;
    let mut bytes = fs::read(damaged)?;
    bytes[1000] ^= 0x55;
    fs::write(damaged, bytes)?;

    let (code, v, stderr) = sv_json(&["copy", "--from", p(&src), "--to", p(&dst)])?;
    assert_eq!(code, Some(3), "damage is exit 3: {stderr} {v:#}");
    assert!(stderr.contains("corrupt data"), "{stderr}");
    assert_eq!(v["snapshots_failed"], 1, "{v:#}");
    assert_eq!(v["snapshots_copied"], 1, "{v:#}");
    let failed: Vec<_> = v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["outcome"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["snapshot_id"], a_id.as_str());
    // The destination holds b, whole and consistent, and nothing of a's manifest.
    assert_eq!(snapshot_ids(&dst)?, vec![b_id.clone()]);
    let c = check(&dst)?;
    assert_eq!(c["ok"], true, "{c:#}");
    assert_restores(&dst, &b_id, &b)?;
    Ok(())
}
