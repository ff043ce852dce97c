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
        let mut child = std::process::Command::new(stackvault_tests::stackvault_bin())
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
