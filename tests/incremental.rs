//! Incremental and differential backups: what is read, what is recorded, and that the result
//! is always the same disk a full backup would record.

use std::path::Path;

use anyhow::Result;
use stackvault::{
    backup, BackupMode, BackupOptions, BackupReport, ChangeList, Error, InitOptions, NoProgress,
    Repo, SnapshotKind,
};
use stackvault_tests::{json_change_list, make_sample_disk, mutate_disk, restores_to, run_cli};

const SEGMENT: u64 = 4 << 20;

fn run(repo: &Repo, disk: &Path, options: BackupOptions) -> Result<BackupReport> {
    let source = stackvault::open_source(disk, &Default::default())?;
    Ok(backup(repo, source.as_ref(), &options, &NoProgress)?)
}

fn opts(mode: BackupMode, changes: Option<ChangeList>) -> BackupOptions {
    BackupOptions {
        disk: "web01".into(),
        mode,
        changes,
        ..BackupOptions::default()
    }
}

/// Segments touched by `ranges`.
fn touched_segments(ranges: &[(u64, u64)]) -> u64 {
    let mut segs: Vec<u64> = ranges
        .iter()
        .flat_map(|(o, l)| (o / SEGMENT)..=((o + l - 1) / SEGMENT))
        .collect();
    segs.sort_unstable();
    segs.dedup();
    segs.len() as u64
}

#[test]
fn change_list_reads_only_touched_segments_and_matches_full() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 64 << 20, 60, 21)?;
    let gen0 = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    assert_eq!(gen0.kind, SnapshotKind::Full);

    let changed = mutate_disk(&disk, 6, 22)?;
    let list = ChangeList::parse(&json_change_list(&changed), "test")?;
    let inc = run(&repo, &disk, opts(BackupMode::Auto, Some(list)))?;
    assert_eq!(inc.kind, SnapshotKind::Incremental);
    assert_eq!(inc.parent.as_deref(), Some(gen0.snapshot_id.as_str()));
    assert_eq!(inc.change_source, "changed-ranges");
    let touched = touched_segments(&changed);
    assert!(
        touched < 16,
        "test should touch few of the 16 segments, touched {touched}"
    );
    // Only around each change: the changed bytes (widened to 4 KiB blocks), the chunk
    // before and the chunks until the cuts meet the parent's again.
    let changed_bytes: u64 = changed.iter().map(|(_, l)| l + 8192).sum();
    let per_change = 256 << 10;
    assert!(
        inc.stats.bytes_read <= changed_bytes + changed.len() as u64 * per_change,
        "read {} bytes for {changed_bytes} changed bytes in {} ranges",
        inc.stats.bytes_read,
        changed.len()
    );
    assert!(inc.stats.bytes_read < touched * SEGMENT / 4);
    assert!(inc.stats.skipped_bytes >= (16 - touched) * SEGMENT);

    let full = run(&repo, &disk, opts(BackupMode::Full, None))?;
    assert_eq!(full.kind, SnapshotKind::Full);
    assert_eq!(inc.root_digest, full.root_digest);
    assert!(restores_to(
        &repo,
        &inc.snapshot_id,
        &disk,
        &dir.path().join("out")
    )?);
    Ok(())
}

#[test]
fn incremental_without_change_knowledge_reads_all_and_matches_full() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 24 << 20, 60, 23)?;
    run(&repo, &disk, opts(BackupMode::Auto, None))?;
    mutate_disk(&disk, 10, 24)?;
    let inc = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    assert_eq!(inc.kind, SnapshotKind::Incremental);
    assert_eq!(inc.change_source, "full-read");
    assert_eq!(inc.stats.skipped_bytes, 0);
    let full = run(&repo, &disk, opts(BackupMode::Full, None))?;
    assert_eq!(inc.root_digest, full.root_digest);
    Ok(())
}

#[test]
fn azure_clear_range_becomes_zeros() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 24 << 20, 90, 25)?;
    let gen0 = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    // Clear segment 2 entirely and half of segment 4; write one page in segment 0.
    let f = std::fs::OpenOptions::new().write(true).open(&disk)?;
    f.write_all_at(&vec![0u8; SEGMENT as usize], 2 * SEGMENT)?;
    f.write_all_at(&vec![0u8; (SEGMENT / 2) as usize], 4 * SEGMENT)?;
    f.write_all_at(&[0xab; 512], 4096)?;
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>\
         <PageRange><Start>4096</Start><End>4607</End></PageRange>\
         <ClearRange><Start>{}</Start><End>{}</End></ClearRange>\
         <ClearRange><Start>{}</Start><End>{}</End></ClearRange></PageList>",
        2 * SEGMENT,
        3 * SEGMENT - 1,
        4 * SEGMENT,
        4 * SEGMENT + SEGMENT / 2 - 1
    );
    let inc = run(
        &repo,
        &disk,
        opts(BackupMode::Auto, Some(ChangeList::parse(&xml, "xml")?)),
    )?;
    // Segment 0 is read around its page, segment 4 around its cleared half; segment 2
    // becomes a hole without reading.
    assert!(
        inc.stats.bytes_read <= SEGMENT / 2 + (1 << 20),
        "read {}",
        inc.stats.bytes_read
    );
    assert!(inc.stats.skipped_bytes >= 4 * SEGMENT);
    let manifest = repo.load_manifest(&inc.snapshot_id)?;
    assert_eq!(
        manifest.segment(2)?,
        vec![stackvault::format::manifest::Extent::Zero {
            len: SEGMENT as u32
        }]
    );
    let full = run(&repo, &disk, opts(BackupMode::Full, None))?;
    assert_eq!(inc.root_digest, full.root_digest);
    assert!(restores_to(
        &repo,
        &inc.snapshot_id,
        &disk,
        &dir.path().join("out")
    )?);
    assert_ne!(gen0.root_digest, inc.root_digest);
    Ok(())
}

#[test]
fn change_lists_that_do_not_fit_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 8 << 20, 60, 26)?;
    run(&repo, &disk, opts(BackupMode::Auto, None))?;

    // The list describes another disk size.
    let wrong = ChangeList::parse(r#"{"disk_size": 1048576, "ranges": []}"#, "j")?;
    let err = run(&repo, &disk, opts(BackupMode::Auto, Some(wrong.clone())));
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("change list refused") && msg.contains("--fallback-full"),
        "{msg}"
    );

    // The disk grew since the parent.
    let bigger = dir.path().join("bigger.img");
    std::fs::copy(&disk, &bigger)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bigger)?
        .set_len(12 << 20)?;
    let list = ChangeList::parse("[]", "j")?;
    let err = run(&repo, &bigger, opts(BackupMode::Auto, Some(list)));
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("parent snapshot's disk was"), "{msg}");

    // With --fallback-full the whole disk is read instead.
    let mut o = opts(BackupMode::Auto, Some(wrong));
    o.fallback_full = true;
    let r = run(&repo, &disk, o)?;
    assert!(
        r.change_source.starts_with("full-read"),
        "{}",
        r.change_source
    );
    assert_eq!(r.stats.skipped_bytes, 0);

    // A change list needs a parent.
    let mut first = opts(BackupMode::Auto, Some(ChangeList::parse("[]", "j")?));
    first.disk = "new-disk".into();
    assert!(matches!(run(&repo, &disk, first), Err(e) if e.to_string().contains("needs a parent")));
    // An explicit parent must be of the same disk.
    let mut other = opts(BackupMode::Auto, None);
    other.disk = "other".into();
    other.parent = Some("latest".into());
    let err = run(&repo, &disk, other)
        .err()
        .and_then(|e| e.downcast::<Error>().ok());
    assert!(
        matches!(err, Some(Error::SnapshotNotFound { .. })),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn differential_after_incrementals_and_parents_are_not_needed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 32 << 20, 60, 27)?;
    let full = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    let c1 = mutate_disk(&disk, 4, 28)?;
    let list1 = ChangeList::parse(&json_change_list(&c1), "1")?;
    let inc1 = run(&repo, &disk, opts(BackupMode::Auto, Some(list1)))?;
    let c2 = mutate_disk(&disk, 4, 29)?;
    let list2 = ChangeList::parse(&json_change_list(&c2), "2")?;
    let inc2 = run(&repo, &disk, opts(BackupMode::Auto, Some(list2)))?;
    assert_eq!(inc2.parent.as_deref(), Some(inc1.snapshot_id.as_str()));

    // A differential carries both sets of changes relative to the full.
    let both: Vec<(u64, u64)> = c1.iter().chain(c2.iter()).copied().collect();
    let list = ChangeList::parse(&json_change_list(&both), "both")?;
    let diff = run(&repo, &disk, opts(BackupMode::Differential, Some(list)))?;
    assert_eq!(diff.kind, SnapshotKind::Differential);
    assert_eq!(diff.parent.as_deref(), Some(full.snapshot_id.as_str()));
    assert_eq!(diff.root_digest, inc2.root_digest);

    // Deleting the parents breaks no child: every snapshot is complete.
    for id in [&full.snapshot_id, &inc1.snapshot_id] {
        std::fs::remove_file(dir.path().join("repo/snapshots").join(id))?;
        repo.index().remove_snapshot(id)?;
    }
    drop(repo);
    let repo = Repo::open(&dir.path().join("repo"))?;
    assert_eq!(repo.snapshots(None)?.len(), 2);
    assert!(restores_to(
        &repo,
        &diff.snapshot_id,
        &disk,
        &dir.path().join("o1")
    )?);
    assert!(restores_to(
        &repo,
        &inc2.snapshot_id,
        &disk,
        &dir.path().join("o2")
    )?);
    Ok(())
}

#[test]
fn cli_incremental_chain_and_diff() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 16 << 20, 60, 30)?;
    let sv = |args: &[&std::ffi::OsStr]| run_cli(args.iter().copied());
    let (code, _, err) = sv(&["init".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 0, "{err}");
    let backup = |extra: &[&str]| -> Result<serde_json::Value> {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "backup".as_ref(),
            repo.as_os_str(),
            disk.as_os_str(),
            "--disk".as_ref(),
            "web01".as_ref(),
            "--json".as_ref(),
        ];
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        let (code, out, err) = sv(&args)?;
        anyhow::ensure!(code == 0, "backup failed: {err}");
        Ok(serde_json::from_str(&out)?)
    };
    let first = backup(&[])?;
    assert_eq!(first["kind"], "full");
    let before = dir.path().join("before.img");
    std::fs::copy(&disk, &before)?;
    let changed = mutate_disk(&disk, 3, 31)?;
    let list_path = dir.path().join("ranges.json");
    std::fs::write(&list_path, json_change_list(&changed))?;
    let list_arg = list_path.to_string_lossy().into_owned();
    let inc = backup(&["--changed-ranges", &list_arg])?;
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["parent"], first["snapshot_id"]);
    assert_eq!(inc["change_source"], "changed-ranges");
    let diff = backup(&["--differential"])?;
    assert_eq!(diff["kind"], "differential");
    assert_eq!(diff["parent"], first["snapshot_id"]);

    let a = first["snapshot_id"].as_str().unwrap_or_default();
    let b = inc["snapshot_id"].as_str().unwrap_or_default();
    let (code, out, err) = sv(&[
        "diff".as_ref(),
        repo.as_os_str(),
        a.as_ref(),
        b.as_ref(),
        "--json".as_ref(),
    ])?;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let ranges = report["changed_ranges"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Every byte that differs between the two disks is inside a reported range (the diff is
    // exact to chunk granularity). A write may leave bytes as they were: those need not be.
    let (old, new) = (std::fs::read(&before)?, std::fs::read(&disk)?);
    let covered = |pos: u64| {
        ranges.iter().any(|r| {
            let (ro, rl) = (
                r["offset"].as_u64().unwrap_or(0),
                r["length"].as_u64().unwrap_or(0),
            );
            ro <= pos && pos < ro + rl
        })
    };
    let mut differing = 0;
    for (pos, (a, b)) in old.iter().zip(&new).enumerate() {
        if a != b {
            differing += 1;
            assert!(
                covered(pos as u64),
                "byte {pos} changed but is missing from the diff"
            );
        }
    }
    assert!(differing > 0, "the mutation changed nothing");
    assert!(report["changed_bytes"].as_u64().unwrap_or(0) < 16 << 20);
    let (code, out, _) = sv(&["diff".as_ref(), repo.as_os_str(), a.as_ref(), a.as_ref()])?;
    assert_eq!(code, 0);
    assert!(out.contains("0 B changed"), "{out}");

    let (code, out, _) = sv(&["snapshots".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 0);
    assert!(
        out.contains("differential") && out.contains(&a[..12]),
        "{out}"
    );
    Ok(())
}
