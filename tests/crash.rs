//! Crash safety: a real backup process is SIGKILLed at every step of its write path (the
//! engine's `STACKVAULT_CRASH_AT` hook) and at random times; after each kill the repository
//! must open, check clean (orphans allowed), show no half-made snapshot, and take the next
//! backup, which restores byte for byte.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use stackvault_tests::{make_disk, p, scribble_disk, sv_env, sv_json, sv_ok, Fixture};

const MIB: u64 = 1 << 20;

/// What a surviving repository must show after a crash; returns the snapshot and orphan
/// pack counts.
fn assert_consistent_after_crash(f: &Fixture, what: &str) -> anyhow::Result<(usize, usize)> {
    let repo = f.repo();
    let (code, v, stderr) = sv_json(&["check", p(&repo), "--read-data"])?;
    if code != Some(0) || v["ok"] != true {
        bail!("{what}: check after the crash found damage ({stderr}): {v:#}");
    }
    let (_, list, _) = sv_json(&["snapshots", p(&repo)])?;
    let snaps = list["snapshots"].as_array().context("snapshot list")?;
    // Whatever is listed is whole: every chunk reads back.
    for s in snaps {
        let id = s["snapshot_id"].as_str().context("snapshot_id")?;
        sv_ok(&["verify", p(&repo), id, "--no-record"]).with_context(|| what.to_string())?;
    }
    let orphans = v["orphans"].as_array().map_or(0, Vec::len);
    Ok((snaps.len(), orphans))
}

/// Backs up `disk` again (no crash) and restores it byte for byte.
fn assert_next_backup_works(f: &Fixture, disk: &Path, what: &str) -> anyhow::Result<()> {
    let id = f.backup(disk, "vm").with_context(|| what.to_string())?;
    f.assert_restores(&id, disk)
        .with_context(|| what.to_string())
}

#[test]
fn kill_at_every_fault_point() -> anyhow::Result<()> {
    // `manifest-stored` leaves a complete snapshot that is not yet catalogued: it must
    // appear (whole) on the next open. Every earlier point must leave no new snapshot.
    // A crash after a pack is stored and before its manifest leaves it as an orphan.
    let cases = [
        ("chunk:1", false, false),
        ("chunk:3", false, false),
        ("pack-write:1", false, false),
        ("pack-stored:1", false, true),
        ("pack-indexed:1", false, true),
        ("before-manifest:1", false, true),
        ("manifest-write:1", false, true),
        ("manifest-stored:1", true, false),
    ];
    for (point, snapshot_expected, orphan_expected) in cases {
        let f = Fixture::new()?;
        let disk = f.path("vm.img");
        make_disk(&disk, 16 * MIB, 1000)?;
        f.backup(&disk, "vm")?;
        scribble_disk(&disk, 12, 1)?;
        let out = sv_env(
            &["backup", p(&f.repo()), p(&disk), "--disk", "vm"],
            &[("STACKVAULT_CRASH_AT", point)],
        )?;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: the backup was not killed: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (count, orphans) = assert_consistent_after_crash(&f, point)?;
        assert_eq!(count, 1 + usize::from(snapshot_expected), "{point}");
        assert_eq!(
            orphans > 0,
            orphan_expected,
            "{point}: {orphans} orphan packs"
        );
        assert_next_backup_works(&f, &disk, point)?;
    }
    Ok(())
}

#[test]
fn unknown_fault_point_is_ignored_loudly() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("vm.img");
    make_disk(&disk, 4 * MIB, 5)?;
    let out = sv_env(
        &["backup", p(&f.repo()), p(&disk), "--disk", "vm"],
        &[("STACKVAULT_CRASH_AT", "no-such-point")],
    )?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignoring STACKVAULT_CRASH_AT"));
    Ok(())
}

#[test]
fn kill_at_random_times() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("vm.img");
    make_disk(&disk, 40 * MIB, 2000)?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    for round in 0..4u32 {
        scribble_disk(&disk, 8, round as usize)?;
        let delay = Duration::from_millis(u64::from((seed >> round) % 400 + 10));
        let mut child = stackvault_tests::sv_command()
            .args(["--quiet", "backup", p(&f.repo()), p(&disk), "--disk", "vm"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(delay);
        // SIGKILL; the backup may already have finished, which is fine too.
        let _ = child.kill();
        child.wait()?;
        let what = format!("round {round}, killed after {delay:?}");
        assert_consistent_after_crash(&f, &what)?;
    }
    assert_next_backup_works(&f, &disk, "after random kills")
}

/// Power cuts: the engine's operations run in this process under a
/// [`PowerCutRecorder`], which keeps only what the store made durable (file data after
/// its fsync, names after their directory's fsync). The state after every durable step of
/// a backup, a forget, a prune and an index rebuild is written out as its own repository;
/// each must open, pass `check --read-data`, and restore every snapshot it lists byte for
/// byte. The SQLite index is kept as SQLite left it at the cut (see the recorder's docs).
mod power {
    use std::collections::{BTreeMap, HashSet};
    use std::path::{Path, PathBuf};

    use anyhow::{bail, ensure, Context as _};
    use stackvault::store::testing::power::{PowerCut, PowerCutRecorder};
    use stackvault::{BackupOptions, NoProgress, PruneOptions, Repo, SourceOptions};
    use stackvault_tests::{make_disk, p, same_bytes, scribble_disk, sv, sv_json, sv_ok, Fixture};

    use super::MIB;

    /// Snapshot id -> a copy of the disk it was taken of.
    type Expected = BTreeMap<String, PathBuf>;

    /// Checks every distinct cut; returns how many were checked.
    fn check_cuts(
        f: &Fixture,
        what: &str,
        cuts: &[PowerCut],
        expected: &Expected,
    ) -> anyhow::Result<usize> {
        ensure!(cuts.len() > 1, "{what}: no durable step was recorded");
        let mut seen = HashSet::new();
        for cut in cuts {
            if !seen.insert(cut.digest()) {
                continue;
            }
            let dir = f.path(&format!("cut-{what}-{}", cut.step));
            cut.materialize(&dir)?;
            let ctx = format!("{what}: power cut after step {} ({})", cut.step, cut.after);
            assert_repo_whole(f, &dir, expected).context(ctx)?;
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(seen.len())
    }

    /// The repository at `repo` opens, checks clean with all data read, and restores each
    /// listed snapshot to the disk it was taken of.
    fn assert_repo_whole(f: &Fixture, repo: &Path, expected: &Expected) -> anyhow::Result<()> {
        let (code, v, stderr) = sv_json(&["check", p(repo), "--read-data"])?;
        if code != Some(0) || v["ok"] != true {
            bail!("check found damage (exit {code:?}): {stderr} {v:#}");
        }
        for id in stackvault_tests::snapshot_ids(repo)? {
            let disk = expected
                .get(&id)
                .with_context(|| format!("snapshot {id} was never taken"))?;
            let out = f.path("restored.img");
            sv_ok(&["restore", p(repo), &id, p(&out), "--force"])?;
            ensure!(
                same_bytes(&out, disk)?,
                "snapshot {id} restores wrong bytes"
            );
            std::fs::remove_file(&out)?;
        }
        Ok(())
    }

    /// Backs `disk` up through the CLI and keeps a copy of it as the snapshot's expectation.
    fn cli_backup(f: &Fixture, disk: &Path, expected: &mut Expected) -> anyhow::Result<String> {
        backup_as(f, disk, "vm", expected)
    }

    fn backup_as(
        f: &Fixture,
        disk: &Path,
        name: &str,
        expected: &mut Expected,
    ) -> anyhow::Result<String> {
        let id = f.backup(disk, name)?;
        let copy = f.path(&format!("expect-{id}"));
        std::fs::copy(disk, &copy)?;
        expected.insert(id.clone(), copy);
        Ok(id)
    }

    #[test]
    fn power_cut_at_every_durable_step() -> anyhow::Result<()> {
        let f = Fixture::new()?;
        let repo = f.repo();
        let disk = f.path("vm.img");
        let mut expected = Expected::new();
        make_disk(&disk, 6 * MIB, 41)?;
        cli_backup(&f, &disk, &mut expected)?;
        scribble_disk(&disk, 40, 1)?;
        cli_backup(&f, &disk, &mut expected)?;
        scribble_disk(&disk, 40, 2)?;
        // A second disk whose first half is then replaced: forgetting its first snapshot
        // leaves half of that snapshot's pack unused, so prune rewrites it.
        let other = f.path("other.img");
        make_disk(&other, 4 * MIB, 97)?;
        let first = backup_as(&f, &other, "other", &mut expected)?;
        make_disk(&f.path("half.img"), 2 * MIB, 98)?;
        let half = std::fs::read(f.path("half.img"))?;
        std::fs::write(
            &other,
            [half, std::fs::read(&other)?.split_off(2 * MIB as usize)].concat(),
        )?;
        backup_as(&f, &other, "other", &mut expected)?;

        // Backup.
        let copy = f.path("expect-next");
        std::fs::copy(&disk, &copy)?;
        let rec;
        let id = {
            let r = Repo::open(&repo)?;
            let source = stackvault::open_source(&disk, &SourceOptions::default())?;
            let options = BackupOptions {
                disk: "vm".into(),
                ..BackupOptions::default()
            };
            rec = PowerCutRecorder::start(&repo)?;
            stackvault::backup(&r, source.as_ref(), &options, &NoProgress)?.snapshot_id
        };
        let backup_cuts = rec.finish();
        expected.insert(id.to_string(), copy);
        let n = check_cuts(&f, "backup", &backup_cuts, &expected)?;
        eprintln!("backup: {n} distinct power-cut states checked");
        // A completed backup is durable: the state after its last step lists it.
        let last = backup_cuts.last().context("no cut")?;
        let dir = f.path("cut-backup-last");
        last.materialize(&dir)?;
        ensure!(
            stackvault_tests::snapshot_ids(&dir)?.contains(&id.to_string()),
            "the finished backup did not survive"
        );

        // An index newer than the objects (rows naming a pack the cut lost): `check`
        // reports it (opening does not look at packs), `index rebuild` repairs it.
        // Cut 0 is the state before the backup: none of its new packs.
        let early = &backup_cuts[0];
        let stale = f.path("index-newer-than-packs");
        early.materialize_with_index_of(&stale, last)?;
        let (code, v, _) = sv_json(&["check", p(&stale), "--read-data"])?;
        ensure!(
            code == Some(3) && v["ok"] == false,
            "check missed the lost pack: {v:#}"
        );
        let kinds: Vec<_> = v["damage"]
            .as_array()
            .context("damage list")?
            .iter()
            .filter_map(|d| d["kind"].as_str())
            .collect();
        ensure!(kinds.contains(&"pack-missing"), "{v:#}");
        let out = sv(&["index", "rebuild", p(&stale)])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_repo_whole(&f, &stale, &expected).context("after index rebuild")?;

        // Forget the first snapshot of the other disk.
        let rec = PowerCutRecorder::start(&repo)?;
        {
            let r = Repo::open(&repo)?;
            stackvault::maintain::forget::forget(&r, std::slice::from_ref(&first), false)?;
        }
        let cuts = rec.finish();
        let n = check_cuts(&f, "forget", &cuts, &expected)?;
        eprintln!("forget: {n} distinct power-cut states checked");
        let dir = f.path("cut-forget-last");
        cuts.last().context("no cut")?.materialize(&dir)?;
        ensure!(
            !stackvault_tests::snapshot_ids(&dir)?.contains(&first),
            "the forget did not survive"
        );

        // Prune what that snapshot alone held, rewriting every partly used pack.
        let rec = PowerCutRecorder::start(&repo)?;
        let report = {
            let r = Repo::open(&repo)?;
            let options = PruneOptions {
                max_unused: 0.0,
                ..PruneOptions::default()
            };
            stackvault::prune(&r, &options, &NoProgress)?
        };
        let cuts = rec.finish();
        ensure!(
            report.packs_rewritten > 0,
            "prune rewrote nothing: {report:?}"
        );
        let n = check_cuts(&f, "prune", &cuts, &expected)?;
        eprintln!("prune: {n} distinct power-cut states checked");
        let dir = f.path("cut-prune-last");
        cuts.last().context("no cut")?.materialize(&dir)?;
        let live: HashSet<_> = Repo::open(&repo)?
            .backend()
            .list("packs/")?
            .into_iter()
            .collect();
        let kept: HashSet<_> = Repo::open(&dir)?
            .backend()
            .list("packs/")?
            .into_iter()
            .collect();
        ensure!(kept == live, "the prune's deletions did not all survive");

        // Index rebuild.
        let rec = PowerCutRecorder::start(&repo)?;
        stackvault::repo::rebuild_index(&repo)?;
        let cuts = rec.finish();
        let n = check_cuts(&f, "index rebuild", &cuts, &expected)?;
        eprintln!("index rebuild: {n} distinct power-cut states checked");
        Ok(())
    }
}
