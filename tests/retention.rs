//! Retention: forget (named and by policy), prune (exact space accounting, exclusion of
//! concurrent backups, crash safety) and stats, through the real CLI. The policy's own
//! logic is tested with synthetic clocks in `engine/src/forget.rs`.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, ensure, Context as _};
use stackvault_tests::{p, same_bytes, scribble, sv, sv_env, sv_json, sv_ok, Disk, Scribble};

const MIB: u64 = 1 << 20;
/// Pack structure per chunk (frame list entry + table entry), per frame (frame header) and
/// per pack (header + footer), from `format-spec/README.md`.
const CHUNK_OVERHEAD: u64 = 36 + 64;
const FRAME_OVERHEAD: u64 = 24;
const PACK_OVERHEAD: u64 = 16 + 32;

/// Total size of the pack files of a repository.
fn pack_bytes(repo: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut stack = vec![repo.join("packs")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                total += e.metadata()?.len();
            }
        }
    }
    Ok(total)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// A repository holding three generations of one 16 MiB disk (`vm`), with a copy of each
/// generation's disk for comparison. Each generation also rewrites a 1 MiB file, so that
/// older generations own whole frames (prune frees frames, not single chunks).
struct History {
    dir: tempfile::TempDir,
    /// (snapshot id, copy of the disk it was taken of), oldest first.
    gens: Vec<(String, PathBuf)>,
}

impl History {
    fn new(generations: u64) -> anyhow::Result<History> {
        let dir = tempfile::tempdir()?;
        let repo = dir.path().join("repo");
        // Plain: the scribbles are laid out so that old generations own whole frames, which
        // holds for the plain chunker's cut points; keyed cut points fall elsewhere.
        sv_ok(&["init", p(&repo), "--encryption", "none"])?;
        let disk = dir.path().join("vm.img");
        Disk::filled(16 * MIB, 60, 11).write(&disk)?;
        // The 1 MiB files are seeded random bytes, and gen0 holds one at each place a later
        // generation rewrites: what a rewrite replaces is whole frames of data, unshared.
        // Files of this machine there left it to the sample disk whether gen0 had data at
        // those places; where it had free space, gen0 owned no whole frame and prune freed
        // nothing.
        let slot = |g: u64| (g % 4) * 4 * MIB + MIB;
        let write_file = |at: u64, seed: u64| -> anyhow::Result<()> {
            let f = fs::OpenOptions::new().write(true).open(&disk)?;
            let file = Disk::random(MIB, seed).bytes()?;
            Ok(std::os::unix::fs::FileExt::write_all_at(&f, &file, at)?)
        };
        let mut gens = Vec::new();
        for g in 0..generations {
            if g == 0 {
                for k in 0..4 {
                    write_file(slot(k), 300 + k)?;
                }
            } else {
                scribble(&disk, Scribble::Week, 8, 100 + g)?;
                write_file(slot(g), 200 + g)?;
            }
            let id = backup(&repo, &disk, "vm")?;
            let copy = dir.path().join(format!("gen{g}.img"));
            fs::copy(&disk, &copy)?;
            gens.push((id, copy));
        }
        Ok(History { dir, gens })
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
}

fn backup(repo: &Path, disk: &Path, name: &str) -> anyhow::Result<String> {
    let (code, v, stderr) = sv_json(&["backup", p(repo), p(disk), "--disk", name])?;
    ensure!(code == Some(0), "backup failed: {stderr}");
    v["snapshot_id"]
        .as_str()
        .map(str::to_owned)
        .context("backup report without snapshot_id")
}

/// `check --read-data` finds no damage; returns the number of orphan packs it lists.
fn assert_check_clean(repo: &Path, what: &str) -> anyhow::Result<usize> {
    let (code, v, stderr) = sv_json(&["check", p(repo), "--read-data"])?;
    if code != Some(0) || v["ok"] != true {
        bail!("{what}: check found damage ({stderr}): {v:#}");
    }
    Ok(v["orphans"].as_array().map_or(0, Vec::len))
}

/// Restores `id` and compares it with `disk` byte for byte.
fn assert_restores(repo: &Path, id: &str, disk: &Path, what: &str) -> anyhow::Result<()> {
    let out = disk.with_extension(format!("restored-{}", &id[..8]));
    sv_ok(&["restore", p(repo), id, p(&out), "--force"]).context(what.to_string())?;
    ensure!(
        same_bytes(&out, disk)?,
        "{what}: restore of {id} differs from {}",
        disk.display()
    );
    fs::remove_file(&out)?;
    Ok(())
}

#[test]
fn retention_forget_and_prune_free_exactly_the_unique_bytes() -> anyhow::Result<()> {
    let h = History::new(3)?;
    let repo = h.repo();
    let old = h.gens[0].0.clone();
    // A verification record of the snapshot to forget goes with it.
    sv_ok(&["verify", p(&repo), &old])?;
    ensure!(repo.join("verifications").join(&old).is_dir());

    let (code, stats, _) = sv_json(&["stats", p(&repo), "--disk", "vm"])?;
    ensure!(code == Some(0), "stats failed");
    let s0 = stats["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["snapshot_id"] == old.as_str()))
        .context("stats of gen0")?;
    let unique = s0["unique_bytes"].as_u64().context("unique_bytes")?;
    let unique_chunks = s0["unique_chunks"].as_u64().context("unique_chunks")?;
    ensure!(
        unique > 0 && unique_chunks > 0,
        "gen0 has no unique data: {s0}"
    );
    ensure!(stats["repository"]["unreferenced_bytes"] == 0, "{stats}");
    let dedup = stats["repository"]["dedup_ratio"].as_f64().unwrap_or(0.0);
    // Each generation keeps ~3.8 of its ~5.3 MB of data (8 blocks, a 256 KiB region shifted
    // by 7 bytes and 1 MiB change): about 1.9x when dedup works, 1.0x when it does not.
    ensure!(
        dedup > 1.6,
        "three nearly equal generations dedup > 1.6x: {dedup}"
    );

    let (code, f, stderr) = sv_json(&["forget", p(&repo), &old[..12]])?;
    ensure!(code == Some(0), "forget failed: {stderr}");
    assert_eq!(f["removed"].as_array().map(Vec::len), Some(1), "{f}");
    assert_eq!(f["verification_records_removed"], 1, "{f}");
    // gen1 was an incremental of gen0: its parent link is now informational.
    assert_eq!(
        f["parent_removed"][0]["snapshot_id"],
        h.gens[1].0.as_str(),
        "{f}"
    );
    ensure!(!repo.join("snapshots").join(&old).exists());
    let records = fs::read_dir(repo.join("verifications").join(&old))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        records, 0,
        "verification records of a forgotten snapshot are deleted"
    );

    // Forgetting alone frees nothing; stats now sees the data as unreferenced.
    let before = pack_bytes(&repo)?;
    let (_, stats, _) = sv_json(&["stats", p(&repo)])?;
    assert_eq!(stats["repository"]["unreferenced_bytes"], unique, "{stats}");

    let (code, r, stderr) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
    ensure!(code == Some(0), "prune failed: {stderr}");
    let after = pack_bytes(&repo)?;
    let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    let old_packs = n("packs_deleted") + n("packs_rewritten");
    ensure!(old_packs > 0, "prune removed no pack: {r}");
    // Whole frames go: their stored bytes are what stats called unique, and their chunks
    // are gen0's alone (some of gen0's chunks stay, in frames later generations still use).
    let expected = unique
        + n("frames_removed") * FRAME_OVERHEAD
        + n("chunks_removed") * CHUNK_OVERHEAD
        + old_packs * PACK_OVERHEAD
        - n("packs_written") * PACK_OVERHEAD;
    assert_eq!(before - after, expected, "{r}");
    assert_eq!(n("freed_bytes"), before - after, "{r}");
    assert_eq!(n("removed_chunk_bytes"), unique, "{r}");
    ensure!(
        n("chunks_removed") > 0 && n("chunks_removed") <= unique_chunks,
        "{unique_chunks} unique chunks: {r}"
    );

    // The rest is intact and complete; nothing unreferenced or orphaned is left.
    assert_eq!(assert_check_clean(&repo, "after prune")?, 0);
    for (id, disk) in &h.gens[1..] {
        assert_restores(&repo, id, disk, "after prune")?;
    }
    let (_, stats, _) = sv_json(&["stats", p(&repo)])?;
    assert_eq!(stats["repository"]["unreferenced_bytes"], 0, "{stats}");
    // A second prune has nothing to do.
    let (_, r, _) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
    assert_eq!(
        (r["freed_bytes"].as_u64(), r["packs_written"].as_u64()),
        (Some(0), Some(0))
    );
    Ok(())
}

#[test]
fn retention_prune_dry_run_changes_nothing_and_plans_the_real_run() -> anyhow::Result<()> {
    let h = History::new(2)?;
    let repo = h.repo();
    sv_ok(&["forget", p(&repo), &h.gens[0].0])?;
    let before = pack_bytes(&repo)?;
    let (code, dry, _) = sv_json(&["prune", p(&repo), "--dry-run", "--max-unused", "0%"])?;
    ensure!(code == Some(0) && dry["dry_run"] == true, "{dry}");
    assert_eq!(pack_bytes(&repo)?, before);
    let (_, real, _) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
    for k in [
        "packs_deleted",
        "packs_rewritten",
        "chunks_removed",
        "chunks_moved",
        "removed_chunk_bytes",
    ] {
        assert_eq!(dry[k], real[k], "{k}: dry {dry} real {real}");
    }
    ensure!(real["freed_bytes"].as_u64() > Some(0), "{real}");
    // At 100% only wholly unused packs go: nothing left to do here.
    let (_, again, _) = sv_json(&["prune", p(&repo), "--max-unused", "100%"])?;
    assert_eq!(again["freed_bytes"], 0, "{again}");
    assert_restores(&repo, &h.gens[1].0, &h.gens[1].1, "after dry run and prune")
}

#[test]
fn retention_forget_by_policy_keeps_the_newest() -> anyhow::Result<()> {
    let h = History::new(3)?;
    let repo = h.repo();
    let (code, dry, _) = sv_json(&["forget", p(&repo), "--keep-last", "1", "--dry-run"])?;
    ensure!(code == Some(0), "{dry}");
    let decisions = dry["decisions"].as_array().context("decisions")?;
    let keep: Vec<&str> = decisions
        .iter()
        .filter(|d| d["keep"] == true)
        .filter_map(|d| d["snapshot_id"].as_str())
        .collect();
    assert_eq!(keep, [h.gens[2].0.as_str()]);
    assert_eq!(decisions[0]["reasons"][0], "last");
    assert_eq!(
        stackvault_tests::snapshot_ids(&repo)?.len(),
        3,
        "a dry run removes nothing"
    );
    // No rule at all is refused rather than removing everything.
    let out = sv(&["forget", p(&repo)])?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("no retention rule"));

    let (code, r, stderr) = sv_json(&["forget", p(&repo), "--keep-last", "1", "--disk", "vm"])?;
    ensure!(code == Some(0), "{stderr}");
    assert_eq!(r["removed"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(
        stackvault_tests::snapshot_ids(&repo)?,
        [h.gens[2].0.clone()]
    );
    // The survivor was an incremental of a removed snapshot, and restores on its own.
    assert_eq!(
        r["parent_removed"][0]["snapshot_id"],
        h.gens[2].0.as_str(),
        "{r}"
    );
    assert_eq!(assert_check_clean(&repo, "after forget")?, 0);
    sv_ok(&["prune", p(&repo)])?;
    assert_restores(&repo, &h.gens[2].0, &h.gens[2].1, "after forget and prune")
}

#[test]
fn retention_stats_per_disk_and_dedup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    // Plain: "exactly 2x" needs a disk without repeats inside it at the plain cut points.
    sv_ok(&["init", p(&repo), "--encryption", "none"])?;
    let disk = dir.path().join("a.img");
    Disk::filled(8 * MIB, 50, 3).write(&disk)?;
    backup(&repo, &disk, "a")?;
    backup(&repo, &disk, "b")?;
    let (code, v, _) = sv_json(&["stats", p(&repo)])?;
    ensure!(code == Some(0), "{v}");
    // Same content on two disks: nothing is unique to either snapshot or disk.
    for s in v["snapshots"].as_array().context("snapshots")? {
        assert_eq!(s["unique_bytes"], 0, "{s}");
        assert_eq!(s["logical_bytes"], 8 * MIB, "{s}");
        assert_eq!(s["stored_bytes"], v["repository"]["stored_bytes"], "{s}");
    }
    for d in v["disks"].as_array().context("disks")? {
        assert_eq!(d["unique_bytes"], 0, "{d}");
    }
    let r = &v["repository"];
    let ratio = r["dedup_ratio"].as_f64().unwrap_or(0.0);
    ensure!(
        (ratio - 2.0).abs() < 1e-9,
        "two copies dedup 2x exactly: {r}"
    );
    ensure!(r["compression_ratio"].as_f64() > Some(1.0), "{r}");
    // Per disk, the other disk's snapshots still count against uniqueness.
    let (_, one, _) = sv_json(&["stats", p(&repo), "--disk", "a"])?;
    assert_eq!(one["snapshots"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["snapshots"][0]["unique_bytes"], 0);
    ensure!(!sv(&["stats", p(&repo), "--disk", "zzz"])?.status.success());
    Ok(())
}

#[test]
fn retention_prune_refuses_when_a_manifest_is_unreadable() -> anyhow::Result<()> {
    let h = History::new(2)?;
    let repo = h.repo();
    sv_ok(&["forget", p(&repo), &h.gens[0].0])?;
    let manifest = repo.join("snapshots").join(&h.gens[1].0);
    let mut bytes = fs::read(&manifest)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&manifest, bytes)?;
    let before = pack_bytes(&repo)?;
    let out = sv(&["prune", p(&repo)])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    ensure!(stderr.contains("prune deletes nothing"), "{stderr}");
    assert_eq!(pack_bytes(&repo)?, before);
    Ok(())
}

/// Backups (real processes) and prune run at the same time, many times. The hazard: a backup
/// deduplicates against chunks of a forgotten snapshot while prune deletes them. Each side
/// must succeed or be refused by the lock, and every snapshot left must verify.
#[test]
fn retention_prune_and_concurrent_backups_never_lose_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    sv_ok(&["init", p(&repo)])?;
    // Two contents; each round backs up the one whose snapshot was just forgotten, so its
    // chunks are exactly what prune wants to delete.
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    Disk::filled(16 * MIB, 60, 21).write(&a)?;
    fs::copy(&a, &b)?;
    scribble(&b, Scribble::Week, 300, 5)?;
    backup(&repo, &a, "vm")?;
    let (mut refused_backups, mut refused_prunes, mut ran_together) = (0, 0, 0);
    let spawn = |args: &[&str]| {
        stackvault_tests::sv_command()
            .arg("--quiet")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    for round in 0..10u64 {
        let (disk, other) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        backup(&repo, disk, "vm")?;
        // Forget every snapshot of `other`'s content: its unique chunks become garbage.
        sv_ok(&["forget", p(&repo), "--keep-last", "1"])?;
        // Alternate who starts first, so each side sometimes holds its lock first.
        let prune_args = ["prune", p(&repo), "--max-unused", "0%"];
        let backup_args = ["backup", p(&repo), p(other), "--disk", "vm"];
        let mut backups = Vec::new();
        let prune = if round % 2 == 0 {
            let prune = spawn(&prune_args)?;
            backups.push(spawn(&backup_args)?);
            backups.push(spawn(&backup_args)?);
            prune
        } else {
            backups.push(spawn(&backup_args)?);
            backups.push(spawn(&backup_args)?);
            std::thread::sleep(std::time::Duration::from_millis(15 * (round % 4)));
            spawn(&prune_args)?
        };
        let mut outcomes = Vec::new();
        for child in backups.into_iter().chain(std::iter::once(prune)) {
            let out = child.wait_with_output()?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() {
                ensure!(
                    stderr.contains("repository is locked"),
                    "round {round}: failed without a lock refusal: {stderr}"
                );
            }
            outcomes.push(out.status.success());
        }
        let (backups_ok, prune_ok) = (&outcomes[..2], outcomes[2]);
        refused_backups += backups_ok.iter().filter(|ok| !**ok).count();
        refused_prunes += usize::from(!prune_ok);
        ran_together += usize::from(prune_ok && backups_ok.iter().any(|ok| *ok));
        for id in stackvault_tests::snapshot_ids(&repo)? {
            sv_ok(&["verify", p(&repo), &id, "--no-record"])
                .with_context(|| format!("round {round}: snapshot {id}"))?;
        }
    }
    assert_check_clean(&repo, "after the concurrent rounds")?;
    let (_, list, _) = sv_json(&["snapshots", p(&repo)])?;
    let latest = list["snapshots"]
        .as_array()
        .and_then(|s| s.last())
        .and_then(|s| s["snapshot_id"].as_str())
        .context("latest")?
        .to_string();
    assert_restores(&repo, &latest, &b, "latest")?;
    // Both sides ran (or were refused) in some round; the test is void if nothing overlapped.
    eprintln!(
        "concurrent rounds: {refused_backups} backups and {refused_prunes} prunes refused; \
         {ran_together} rounds where prune and a backup both succeeded (one after the other)"
    );
    ensure!(
        refused_backups + refused_prunes > 0,
        "no round had prune and a backup overlap"
    );
    Ok(())
}

#[test]
fn retention_prune_killed_at_every_step_leaves_a_sound_repository() -> anyhow::Result<()> {
    let base = History::new(3)?;
    sv_ok(&["forget", p(&base.repo()), &base.gens[0].0])?;
    // (point, whether unreferenced packs are left): gen0's one pack is rewritten, so after
    // its deletion nothing is left over.
    let points = [
        ("prune-pack-stored:1", true),
        ("prune-pack-indexed:1", true),
        ("prune-index-updated:1", true),
        ("prune-pack-deleted:1", false),
    ];
    for (point, leftovers) in points {
        let repo = base.dir.path().join(format!("repo-{point}"));
        copy_dir(&base.repo(), &repo)?;
        let before = pack_bytes(&repo)?;
        let out = sv_env(
            &["prune", p(&repo), "--max-unused", "0%"],
            &[("STACKVAULT_CRASH_AT", point)],
        )?;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: prune was not killed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Sound right after the kill: no damage, every remaining snapshot restores.
        let orphans = assert_check_clean(&repo, point)?;
        assert_eq!(orphans > 0, leftovers, "{point}: {orphans} orphan packs");
        for (id, disk) in &base.gens[1..] {
            assert_restores(&repo, id, disk, point)?;
        }
        // The next prune collects what the killed one left; then nothing is orphaned.
        let (code, r, stderr) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
        ensure!(code == Some(0), "{point}: prune after the crash: {stderr}");
        assert_eq!(assert_check_clean(&repo, point)?, 0, "{point}: {r}");
        ensure!(pack_bytes(&repo)? < before, "{point}: {r}");
        assert_restores(&repo, &base.gens[2].0, &base.gens[2].1, point)?;
    }
    Ok(())
}

#[test]
fn retention_forget_killed_between_row_and_manifest_is_undone_whole() -> anyhow::Result<()> {
    let h = History::new(2)?;
    let repo = h.repo();
    let old = &h.gens[0].0;
    let out = sv_env(
        &["forget", p(&repo), old],
        &[("STACKVAULT_CRASH_AT", "forget-row-removed")],
    )?;
    assert_eq!(out.status.signal(), Some(9));
    // The manifest is still there, so the snapshot comes back on the next open, whole.
    ensure!(stackvault_tests::snapshot_ids(&repo)?.contains(old));
    assert_eq!(assert_check_clean(&repo, "forget killed")?, 0);
    assert_restores(&repo, old, &h.gens[0].1, "forget killed")?;
    sv_ok(&["forget", p(&repo), old])?;
    assert_eq!(
        stackvault_tests::snapshot_ids(&repo)?,
        [h.gens[1].0.clone()]
    );
    assert_eq!(assert_check_clean(&repo, "forget repeated")?, 0);
    Ok(())
}
