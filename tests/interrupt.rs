//! Interrupts: SIGINT and SIGTERM sent to the real binary mid-run stop backup, restore,
//! verify and prune cleanly: exit 130, a one-line summary of what was kept, no lock or
//! temporary files left, a repository that checks clean, and (for backup) packs the next
//! backup reuses. The engine's pause hook (`STACKVAULT_PAUSE_AT`, `testing` builds) holds the
//! run at a chosen point until the signal lands, so the signal always arrives mid-work.
//!
//! Also: `check` lists what interrupted or crashed runs leave behind (temporary objects,
//! stale locks) and `prune` removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use stackvault_tests::{interrupt_at, p, sv_json, sv_ok, Disk, Fixture};

const MIB: u64 = 1 << 20;

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// No lock, no temporary object, and a check that finds no damage and no leftovers.
fn assert_clean(repo: &Path, what: &str) -> anyhow::Result<()> {
    let stray: Vec<_> = files_under(repo)
        .into_iter()
        .filter(|f| {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            f.starts_with("locks") || name.starts_with(".tmp-") || name.contains(".rebuild-")
        })
        .collect();
    assert!(stray.is_empty(), "{what}: left behind {stray:?}");
    let (code, v, stderr) = sv_json(&["check", p(repo), "--read-data"])?;
    assert_eq!(code, Some(0), "{what}: {stderr} {v:#}");
    assert_eq!(v["ok"], true, "{what}: {v:#}");
    assert_eq!(v["leftovers"], serde_json::json!([]), "{what}: {v:#}");
    Ok(())
}

#[test]
fn an_interrupted_backup_keeps_its_packs_for_the_next() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    let size = 48 * MIB;
    Disk::random(size, 7).write(&disk)?;
    // Paused before its 10th 4 MiB segment: 36 MiB went to the pack store, two 16 MiB packs.
    let (code, stderr) = interrupt_at(
        &["backup", p(&repo), p(&disk), "--disk", "vm"],
        "backup-segment:10",
        "INT",
    )?;
    assert_eq!(code, Some(130), "{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("interrupted: backup stopped; "))
        .with_context(|| format!("no summary line: {stderr}"))?;
    assert!(
        summary.ends_with(" packs stored are reused by the next backup"),
        "{summary}"
    );
    let packs: u64 = summary
        .trim_start_matches("interrupted: backup stopped; ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("pack count in {summary}"))?;
    assert!(packs >= 1, "{summary}");
    assert!(
        !stderr.contains("error:"),
        "one summary, no error: {stderr}"
    );
    assert_clean(&repo, "backup")?;
    let (_, list, _) = sv_json(&["snapshots", p(&repo)])?;
    assert_eq!(
        list["snapshots"],
        serde_json::json!([]),
        "no snapshot from the interrupted run"
    );

    let (code, report, stderr) = sv_json(&["backup", p(&repo), p(&disk), "--disk", "vm"])?;
    assert_eq!(code, Some(0), "{stderr}");
    let new_bytes = report["stats"]["new_bytes"].as_u64().context("new_bytes")?;
    assert!(
        new_bytes + packs * 15 * MIB <= size,
        "the next backup stored {new_bytes} of {size} bytes again despite {packs} stored packs"
    );
    let id = report["snapshot_id"].as_str().context("snapshot_id")?;
    f.assert_restores(id, &disk)?;
    Ok(())
}

#[test]
fn an_interrupted_restore_removes_its_partial_output() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (_, id) = f.backup_new_disk("vm", 24 * MIB, 3)?;
    let out = f.path("out.img");
    let (code, stderr) = interrupt_at(
        &["restore", p(&f.repo()), &id, p(&out)],
        "restore-segment:3",
        "TERM",
    )?;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: restore stopped; its partial output was removed"),
        "{stderr}"
    );
    assert_eq!(
        files_under(f.dir.path())
            .iter()
            .filter(|p| p.starts_with("out"))
            .count(),
        0
    );
    assert_clean(&f.repo(), "restore")?;
    Ok(())
}

#[test]
fn an_interrupted_verify_records_nothing() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (_, id) = f.backup_new_disk("vm", 24 * MIB, 4)?;
    let before = files_under(&f.repo());
    let (code, stderr) = interrupt_at(&["verify", p(&f.repo()), &id], "verify-segment:2", "INT")?;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: verify stopped before the end; nothing was recorded"),
        "{stderr}"
    );
    let after: Vec<_> = files_under(&f.repo())
        .into_iter()
        .filter(|f| !f.starts_with("index.sqlite-wal") && !f.starts_with("index.sqlite-shm"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|f| !f.starts_with("index.sqlite-wal") && !f.starts_with("index.sqlite-shm"))
        .collect();
    assert_eq!(after, before, "the interrupted verify left files");
    assert_clean(&f.repo(), "verify")?;
    Ok(())
}

#[test]
fn an_interrupted_prune_leaves_what_the_next_prune_finishes() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (keep_disk, keep) = f.backup_new_disk("keep", 8 * MIB, 11)?;
    let gone = f.path("gone.img");
    Disk::random(40 * MIB, 12).write(&gone)?;
    let gone_id = f.backup(&gone, "gone")?;
    sv_ok(&["forget", p(&repo), &gone_id])?;
    let (code, stderr) = interrupt_at(&["prune", p(&repo)], "prune-pack:2", "TERM")?;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: prune stopped; 1 of ")
            && stderr.contains("unused packs deleted, the next prune deletes the rest"),
        "{stderr}"
    );
    assert_clean(&repo, "prune")?;
    let (code, report, stderr) = sv_json(&["prune", p(&repo)])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        report["orphans_deleted"].as_u64().unwrap_or(0) >= 1,
        "the next prune deletes the rest: {report:#}"
    );
    f.assert_restores(&keep, &keep_disk)?;
    Ok(())
}

#[test]
fn check_lists_leftovers_and_prune_removes_them() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, id) = f.backup_new_disk("vm", 8 * MIB, 21)?;
    // What a killed run leaves: temporary objects of a pack, a manifest and an old
    // verification record, a young one (perhaps a verify running now), and a lock whose
    // process is gone.
    fs::create_dir_all(repo.join("packs/ab"))?;
    fs::write(
        repo.join("packs/ab/.tmp-ab12-0011223344556677"),
        b"half a pack",
    )?;
    fs::write(
        repo.join("snapshots/.tmp-8899aabbccddeeff"),
        b"half a manifest",
    )?;
    fs::create_dir_all(repo.join("verifications"))?;
    let old = repo.join("verifications/.tmp-old-record");
    fs::write(&old, b"{}")?;
    let touched = Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(&old)
        .status()?;
    assert!(touched.success());
    fs::write(repo.join("verifications/.tmp-young-record"), b"{}")?;
    let mut gone = Command::new("true").spawn()?;
    let dead_pid = gone.id();
    gone.wait()?;
    let host = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string();
    fs::create_dir_all(repo.join("locks"))?;
    fs::write(
        repo.join(format!("locks/backup-{dead_pid}-0123456789abcdef.lock")),
        serde_json::json!({"kind": "backup", "host": host, "pid": dead_pid,
                           "time": "2026-01-01T00:00:00.000000Z"})
        .to_string(),
    )?;

    let (code, v, stderr) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(0), "leftovers are not damage: {stderr}");
    assert_eq!(v["ok"], true);
    let listed: Vec<(String, String)> = v["leftovers"]
        .as_array()
        .context("leftovers in check's report")?
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap_or("").into(),
                l["path"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want = [
        (
            "stale-lock".to_string(),
            format!("locks/backup-{dead_pid}-0123456789abcdef.lock"),
        ),
        (
            "temporary".into(),
            "packs/ab/.tmp-ab12-0011223344556677".into(),
        ),
        ("temporary".into(), "snapshots/.tmp-8899aabbccddeeff".into()),
        ("temporary".into(), "verifications/.tmp-old-record".into()),
        ("temporary".into(), "verifications/.tmp-young-record".into()),
    ];
    assert_eq!(listed, want, "{v:#}");
    let human = sv_ok(&["check", p(&repo)])?;
    assert!(
        human.contains("leftover temporary snapshots/.tmp-8899aabbccddeeff"),
        "{human}"
    );

    let (code, dry, _) = sv_json(&["prune", p(&repo), "--dry-run"])?;
    assert_eq!(code, Some(0));
    assert_eq!(dry["leftovers_removed"], 4, "{dry:#}");
    assert_eq!(
        files_under(&repo.join("locks")).len(),
        1,
        "a dry run removes nothing"
    );

    let (code, r, stderr) = sv_json(&["prune", p(&repo)])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["leftovers_removed"], 3, "{r:#}");
    let (_, v, _) = sv_json(&["check", p(&repo)])?;
    let left: Vec<&str> = v["leftovers"]
        .as_array()
        .context("leftovers")?
        .iter()
        .filter_map(|l| l["path"].as_str())
        .collect();
    assert_eq!(left, ["verifications/.tmp-young-record"], "{v:#}");
    assert!(
        files_under(&repo.join("locks")).is_empty(),
        "the stale lock is gone"
    );
    f.assert_restores(&id, &disk)?;
    Ok(())
}

#[test]
fn an_interrupted_check_stops_cleanly() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    f.backup_new_disk("vm", 8 * MIB, 31)?;
    let (code, stderr) = interrupt_at(
        &["check", p(&f.repo()), "--read-data"],
        "check-pack:1",
        "INT",
    )?;
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: check stopped before the end"),
        "{stderr}"
    );
    assert_clean(&f.repo(), "check")?;
    Ok(())
}
