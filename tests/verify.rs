//! verify, check, index rebuild, locks, disk full: the trust commands against real damage.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use stackvault::store::testing::DiskFullAfter;
use stackvault::store::LocalDir;
use stackvault::{BackupOptions, NoProgress, Repo};
use stackvault_tests::{make_disk, p, sv, sv_json, sv_ok, Fixture};

const MIB: u64 = 1 << 20;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn flip_byte(path: &Path, at: u64) -> anyhow::Result<()> {
    let f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= 0x40;
    f.write_all_at(&b, at)?;
    Ok(())
}

/// Everything the index knows, as comparable sets (chunk → pack name and location).
fn index_contents(
    repo: &Path,
) -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>, BTreeSet<String>)> {
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    let collect = |sql: &str| -> anyhow::Result<BTreeSet<String>> {
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    };
    Ok((
        collect(
            "SELECT hex(c.id) || ' ' || p.name || ' ' || c.offset || ' ' || c.raw_len || ' ' || \
             c.stored_len FROM chunks c JOIN packs p ON p.id = c.pack",
        )?,
        collect("SELECT name || ' ' || size || ' ' || chunk_count FROM packs")?,
        collect("SELECT id || ' ' || meta FROM snapshots")?,
    ))
}

#[test]
fn verify_records_survive_index_rebuild() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, id) = f.backup_new_disk("web01", 16 * MIB, 0)?;
    let (code, v, _) = sv_json(&["verify", p(&repo), &id])?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["outcome"], "ok");
    assert_eq!(v["checked_bytes"].as_u64(), Some(16 * MIB));
    assert!(v["duration_ms"].is_u64() && v["throughput_bytes_per_second"].as_u64() > Some(0));
    let key = v["record"].as_str().context("record key")?.to_string();
    assert!(key.starts_with(&format!("verifications/{id}/")), "{key}");
    assert!(repo.join(&key).is_file());

    let restored = f.path("restored.img");
    sv_ok(&["restore", p(&repo), &id, p(&restored)])?;
    let (code, v, _) = sv_json(&["verify", p(&repo), "latest", "--target", p(&restored)])?;
    assert_eq!((code, v["outcome"].as_str()), (Some(0), Some("ok")), "{v}");
    assert_eq!(v["mode"], "target");

    let (_, list, _) = sv_json(&["snapshots", p(&repo)])?;
    let last = &list["snapshots"][0]["last_verification"];
    assert_eq!(last["mode"], "target", "{list}");
    assert_eq!(last["outcome"], "ok");
    let text = sv_ok(&["snapshots", p(&repo)])?;
    assert!(text.contains("ok (target"), "{text}");

    // The index is derived state: rebuilt from the objects it equals the lost one.
    let before = index_contents(&repo)?;
    let report = sv_ok(&["index", "rebuild", p(&repo)])?;
    assert!(report.contains("2 verification records"), "{report}");
    assert_eq!(index_contents(&repo)?, before);
    fs::remove_file(repo.join("index.sqlite"))?;
    sv_ok(&["index", "rebuild", p(&repo)])?;
    assert_eq!(index_contents(&repo)?, before);
    let (_, list2, _) = sv_json(&["snapshots", p(&repo)])?;
    assert_eq!(list2, list);
    // Lost index, plain open: rebuilt on the fly, same contents.
    fs::remove_file(repo.join("index.sqlite"))?;
    f.assert_restores(&id, &disk)?;
    assert_eq!(index_contents(&repo)?, before);
    Ok(())
}

#[test]
fn verify_target_names_differing_ranges() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (_, id) = f.backup_new_disk("db01", 16 * MIB, 40)?;
    let restored = f.path("restored.img");
    sv_ok(&["restore", p(&repo), &id, p(&restored)])?;
    let changed = [3 * MIB + 17, 11 * MIB + 4096 * 3];
    for at in changed {
        flip_byte(&restored, at)?;
    }
    let (code, v, stderr) = sv_json(&["verify", p(&repo), &id, "--target", p(&restored)])?;
    // Exit 5: the target is wrong, not the repository.
    assert_eq!(code, Some(5), "{stderr}");
    assert_eq!(v["outcome"], "differs");
    assert_eq!(v["problem_count"].as_u64(), Some(2), "{v}");
    let problems = v["problems"].as_array().context("problems")?;
    for (prob, at) in problems.iter().zip(changed) {
        let start = prob["offset"].as_u64().context("offset")?;
        let len = prob["length"].as_u64().context("length")?;
        assert!(
            start <= at && at < start + len,
            "{prob} does not cover {at}"
        );
        // Either a chunk or a zero run that now holds data, narrowed to the byte.
        if prob["chunk"].is_null() {
            assert_eq!((start, len), (at, 1), "{prob}");
        } else {
            assert_eq!(prob["chunk"].as_str().map(str::len), Some(64));
        }
    }
    // A target of the wrong size is a difference too, not a crash.
    let f2 = fs::OpenOptions::new().write(true).open(&restored)?;
    f2.set_len(10 * MIB)?;
    let (code, v, _) = sv_json(&["verify", p(&repo), &id, "--target", p(&restored)])?;
    assert_eq!(code, Some(5));
    assert!(v["problem_count"].as_u64() > Some(2), "{v}");
    Ok(())
}

#[test]
fn flipped_bit_in_a_pack_is_found_and_located() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let (_, a) = f.backup_new_disk("a", 16 * MIB, 100)?;
    let packs_a = files_under(&repo.join("packs"));
    let (disk_b, b) = f.backup_new_disk("b", 16 * MIB, 400)?;
    assert_eq!(packs_a.len(), 1);
    let pack = &packs_a[0];
    let pack_name = pack.file_name().and_then(|n| n.to_str()).context("name")?;
    flip_byte(pack, 5000)?;

    // Structure is intact: the damage is in chunk data, which only --read-data reads.
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!((code, v["ok"].as_bool()), (Some(0), Some(true)), "{v}");
    let (code, v, stderr) = sv_json(&["check", p(&repo), "--read-data"])?;
    assert_eq!(code, Some(3), "{stderr}");
    let d = &v["damage"][0];
    assert_eq!(d["kind"], "chunk-data", "{v}");
    assert_eq!(d["pack"], pack_name);
    assert!(d["offset"].as_u64().is_some_and(|o| o <= 5000), "{d}");
    assert!(d["chunk"].is_string());
    let affected = v["affected"].as_array().context("affected")?;
    assert_eq!(affected.len(), 1, "{v}");
    assert_eq!(affected[0]["snapshot_id"], a.as_str());
    assert_eq!(affected[0]["disk"], "a");
    assert_eq!(affected[0]["ranges"][0]["chunk"], d["chunk"]);

    // A subset that holds the pack finds it too; slices cover all packs.
    let mut found = 0;
    for n in 1..=2 {
        let (code, _, _) = sv_json(&["check", p(&repo), "--read-data-subset", &format!("{n}/2")])?;
        found += usize::from(code == Some(3));
    }
    assert_eq!(found, 1);
    let (code, _, _) = sv_json(&["check", p(&repo), "--read-data-subset", "100%"])?;
    assert_eq!(code, Some(3));

    // Restore of the damaged snapshot fails loudly, naming the pack; the other restores.
    let out = sv(&["restore", p(&repo), &a, p(&f.path("a-restored.img"))])?;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(pack_name) && stderr.contains("crc32"),
        "{stderr}"
    );
    assert!(!f.path("a-restored.img").exists());
    assert!(!f.path("a-restored.img.stackvault-partial").exists());
    f.assert_restores(&b, &disk_b)?;
    // verify says the same and records the failure.
    let (code, v, _) = sv_json(&["verify", p(&repo), &a])?;
    assert_eq!((code, v["outcome"].as_str()), (Some(3), Some("damaged")));
    Ok(())
}

#[test]
fn truncated_and_deleted_packs_are_found() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (_, a) = f.backup_new_disk("a", 16 * MIB, 200)?;
    let pack = files_under(&repo.join("packs")).pop().context("pack")?;
    let len = fs::metadata(&pack)?.len();
    let saved = fs::read(&pack)?;

    fs::OpenOptions::new()
        .write(true)
        .open(&pack)?
        .set_len(len - 100)?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3), "{v}");
    let kinds: Vec<&str> = v["damage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"pack-size") && kinds.contains(&"pack-structure"),
        "{kinds:?}"
    );
    assert_eq!(v["affected"][0]["snapshot_id"], a.as_str());

    fs::remove_file(&pack)?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3));
    assert_eq!(v["damage"][0]["kind"], "pack-missing", "{v}");
    let out = sv(&["restore", p(&repo), &a, p(&f.path("x.img"))])?;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));

    fs::write(&pack, saved)?;
    sv_ok(&["check", p(&repo), "--read-data"])?;
    Ok(())
}

#[test]
fn damaged_and_deleted_manifests_are_found() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (_, a) = f.backup_new_disk("a", 16 * MIB, 300)?;
    let (disk_b, b) = f.backup_new_disk("b", 16 * MIB, 500)?;
    let manifest = repo.join("snapshots").join(&a);
    let saved = fs::read(&manifest)?;
    flip_byte(&manifest, saved.len() as u64 / 2)?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3));
    assert_eq!(v["damage"][0]["kind"], "manifest", "{v}");
    assert_eq!(v["affected"][0]["whole_snapshot"], true);
    assert_eq!(v["affected"][0]["disk"], "a");
    let out = sv(&["restore", p(&repo), &a, p(&f.path("x.img"))])?;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("snapshots/{a}")));
    f.assert_restores(&b, &disk_b)?;

    // A deleted manifest of a catalogued snapshot is damage, not forgotten.
    fs::remove_file(&manifest)?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3));
    assert!(
        v["damage"][0]["what"]
            .as_str()
            .is_some_and(|w| w.contains("missing")),
        "{v}"
    );
    let out = sv(&["restore", p(&repo), &a, p(&f.path("x.img"))])?;
    assert_eq!(out.status.code(), Some(3));

    fs::write(&manifest, saved)?;
    sv_ok(&["check", p(&repo), "--read-data"])?;
    Ok(())
}

#[test]
fn damaged_index_says_how_to_rebuild_it() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, id) = f.backup_new_disk("a", 16 * MIB, 600)?;
    sv_ok(&["verify", p(&repo), &id])?;
    let index = repo.join("index.sqlite");
    // A clean exit leaves the whole index in the file, with no log beside it.
    assert!(!repo.join("index.sqlite-wal").exists());
    let f2 = fs::OpenOptions::new().write(true).open(&index)?;
    f2.write_all_at(b"this is not SQLite, not at all", 0)?;
    drop(f2);
    for cmd in [vec!["snapshots", p(&repo)], vec!["check", p(&repo)]] {
        let out = sv(&cmd)?;
        assert_eq!(out.status.code(), Some(3), "{cmd:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("stackvault index rebuild"), "{stderr}");
    }
    let out = sv_ok(&["index", "rebuild", p(&repo)])?;
    assert!(out.contains("1 snapshots, 1 verification records"), "{out}");
    sv_ok(&["check", p(&repo), "--read-data"])?;
    f.assert_restores(&id, &disk)?;
    Ok(())
}

#[test]
fn concurrent_backups_of_two_disks_both_succeed() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disks = [f.path("x.img"), f.path("y.img")];
    make_disk(&disks[0], 24 * MIB, 700)?;
    make_disk(&disks[1], 24 * MIB, 800)?;
    let children: Vec<std::process::Child> = disks
        .iter()
        .zip(["x", "y"])
        .map(|(d, name)| {
            stackvault_tests::sv_command()
                .args([
                    "--quiet",
                    "backup",
                    p(&repo),
                    p(d),
                    "--disk",
                    name,
                    "--json",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut ids = Vec::new();
    for child in children {
        let out = child.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ids.push(v["snapshot_id"].as_str().context("id")?.to_string());
    }
    sv_ok(&["check", p(&repo), "--read-data"])?;
    for (id, disk) in ids.iter().zip(&disks) {
        f.assert_restores(id, disk)?;
    }
    Ok(())
}

#[test]
fn maintenance_lock_excludes_writers_and_stale_locks_are_removed() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let locks = repo.join("locks");
    let host = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string();
    let lock = |pid: u32| {
        serde_json::json!({"kind": "backup", "host": host, "pid": pid, "time": "2026-01-01T00:00:00Z"})
            .to_string()
    };
    // A live writer (this test process, holding the lock's file lock) blocks index rebuild.
    let live = stackvault::lock::acquire_writer(&repo, "backup")?;
    let out = sv(&["index", "rebuild", p(&repo)])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("locked") && stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    assert!(!locks.join("maintenance.lock").exists());
    drop(live);

    // A writer whose process is gone is stale: removed with a notice.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    fs::write(locks.join("backup-dead.lock"), lock(dead))?;
    let out = stackvault_tests::sv_command()
        .args(["index", "rebuild", p(&repo)])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("notice: removed stale lock"), "{stderr}");
    assert!(!locks.join("backup-dead.lock").exists());

    // A held maintenance lock makes backups refuse with a clear message.
    let maint = stackvault::lock::acquire_maintenance(&repo, "prune")?;
    let disk = f.path("d.img");
    make_disk(&disk, 4 * MIB, 1)?;
    let out = sv(&["backup", p(&repo), p(&disk), "--disk", "d"])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("maintenance is running (prune"), "{stderr}");
    let leftover: Vec<_> = files_under(&locks);
    assert_eq!(leftover, vec![locks.join("maintenance.lock")]);
    drop(maint);
    f.backup(&disk, "d")?;
    Ok(())
}

#[test]
fn disk_full_during_backup_leaves_a_consistent_repository() -> anyhow::Result<()> {
    let disk_dir = tempfile::tempdir()?;
    let disk = disk_dir.path().join("big.img");
    make_disk(&disk, 32 * MIB, 900)?;
    let source = stackvault::open_source(&disk, &Default::default())?;
    let options = BackupOptions {
        disk: "big".into(),
        ..BackupOptions::default()
    };
    // What a whole backup stores: its packs, then a small manifest.
    let probe = Fixture::new()?;
    let (_, v, _) = sv_json(&["backup", p(&probe.repo()), p(&disk), "--disk", "big"])?;
    let added = v["stats"]["bytes_added"].as_u64().context("bytes_added")?;
    // Full in the middle of the packs, and full with only the manifest left to write.
    for budget in [added / 2, added + 100] {
        let f = Fixture::new()?;
        let repo_path = f.repo();
        let backend = Arc::new(DiskFullAfter::new(LocalDir::new(&repo_path), budget));
        let repo = Repo::open_with_backend(&repo_path, backend)?;
        let err = stackvault::backup(&repo, source.as_ref(), &options, &NoProgress)
            .err()
            .context("the backup should have hit disk full")?;
        assert!(err.is_disk_full(), "budget {budget}: {err}");
        drop(repo);
        assert!(files_under(&repo_path.join("snapshots")).is_empty());
        assert!(files_under(&repo_path.join("locks")).is_empty());
        let (code, v, _) = sv_json(&["check", p(&repo_path), "--read-data"])?;
        assert_eq!((code, v["ok"].as_bool()), (Some(0), Some(true)), "{v}");
        let id = f.backup(&disk, "big")?;
        f.assert_restores(&id, &disk)?;
    }
    Ok(())
}

/// After a pack is lost and the index rebuilt, an incremental backup trusts its parent's
/// chunks and stores nothing again; `check` says so and a full backup stores the lost data,
/// which heals the older snapshots too (same chunk ids).
#[test]
fn lost_pack_is_stored_again_by_a_full_backup() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, a) = f.backup_new_disk("a", 16 * MIB, 700)?;
    for pack in files_under(&repo.join("packs")) {
        fs::remove_file(pack)?;
    }
    sv_ok(&["index", "rebuild", p(&repo)])?;
    let out = sv(&["check", p(&repo)])?;
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("AFFECTED") && text.contains("backup --full"),
        "{text}"
    );
    // Hundreds of missing chunks: a screenful, not a flood.
    assert!(
        text.contains(" more (--json lists up to") && text.lines().count() < 60,
        "{text}"
    );

    // The incremental copies its parent's map: still damaged.
    let inc = f.backup(&disk, "a")?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3), "{v}");
    let affected: Vec<&str> = v["affected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["snapshot_id"].as_str())
        .collect();
    assert!(affected.contains(&inc.as_str()) && affected.contains(&a.as_str()));

    let (code, v, stderr) = sv_json(&["backup", p(&repo), p(&disk), "--disk", "a", "--full"])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(v["stats"]["new_chunks"].as_u64() > Some(0), "{v}");
    sv_ok(&["check", p(&repo), "--read-data"])?;
    f.assert_restores(&a, &disk)?;
    f.assert_restores(&inc, &disk)
}

/// Snapshot ids shown to people are cut to 12 characters; an id shorter than that, or one
/// with a multi-byte character at the cut, comes from a damaged or hostile index: it is
/// reported as index damage (exit 3, with how to rebuild), never a panic.
#[test]
fn short_snapshot_ids_from_the_index_are_shown_not_panicked_on() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (_, first) = f.backup_new_disk("web01", MIB, 1)?;
    let (_, second) = f.backup_new_disk("web02", MIB, 2)?;
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    for (id, short) in [(&first, "ab1"), (&second, "ab2ab2ab2ab\u{e9}cd")] {
        conn.execute(
            "UPDATE snapshots SET id = ?1 WHERE id = ?2",
            [short, id.as_str()],
        )?;
    }
    drop(conn);
    let listing = sv(&["snapshots", p(&repo)])?;
    let stderr = String::from_utf8_lossy(&listing.stderr);
    assert_eq!(listing.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("\"ab1\"") || stderr.contains("ab2ab2ab2ab\u{e9}"),
        "{stderr}"
    );
    assert!(stderr.contains("index rebuild"), "{stderr}");
    let ambiguous = sv(&["verify", p(&repo), "ab"])?;
    let stderr = String::from_utf8_lossy(&ambiguous.stderr);
    assert_eq!(ambiguous.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("index rebuild"), "{stderr}");
    Ok(())
}
