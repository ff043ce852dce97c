//! Incremental and differential backups: what is read, what is recorded, and that the result
//! is always the same disk a full backup would record.

use std::path::Path;

use anyhow::Result;
use stackvault::{
    backup, BackupMode, BackupOptions, BackupReport, ChangeList, Error, InitOptions, NoProgress,
    Repo, SnapshotKind,
};
use stackvault_tests::{
    json_change_list, outcome, p, restores_to, scribble, sv_as_typed, Disk, Scribble,
};

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
    Disk::filled(64 << 20, 60, 21).write(&disk)?;
    let gen0 = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    assert_eq!(gen0.kind, SnapshotKind::Full);

    let changed = scribble(&disk, Scribble::Week, 6, 22)?;
    let list = ChangeList::parse(&json_change_list(&changed), "test")?;
    let inc = run(&repo, &disk, opts(BackupMode::Auto, Some(list)))?;
    assert_eq!(inc.kind, SnapshotKind::Incremental);
    assert_eq!(inc.parent.as_deref(), Some(gen0.snapshot_id.as_str()));
    assert_eq!(inc.change_source.to_string(), "changed-ranges");
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
    Disk::filled(24 << 20, 60, 23).write(&disk)?;
    run(&repo, &disk, opts(BackupMode::Auto, None))?;
    scribble(&disk, Scribble::Week, 10, 24)?;
    let inc = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    assert_eq!(inc.kind, SnapshotKind::Incremental);
    assert_eq!(inc.change_source.to_string(), "full-read");
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
    Disk::filled(24 << 20, 90, 25).write(&disk)?;
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
    Disk::filled(8 << 20, 60, 26).write(&disk)?;
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
        r.change_source.to_string().starts_with("full-read ("),
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
    Disk::filled(32 << 20, 60, 27).write(&disk)?;
    let full = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    let c1 = scribble(&disk, Scribble::Week, 4, 28)?;
    let list1 = ChangeList::parse(&json_change_list(&c1), "1")?;
    let inc1 = run(&repo, &disk, opts(BackupMode::Auto, Some(list1)))?;
    let c2 = scribble(&disk, Scribble::Week, 4, 29)?;
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
        std::fs::remove_file(dir.path().join("repo/snapshots").join(id.as_str()))?;
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
    Disk::filled(16 << 20, 60, 30).write(&disk)?;
    let (code, _, err) = outcome(&sv_as_typed(&["init", p(&repo)], &[])?);
    assert_eq!(code, Some(0), "{err}");
    let backup = |extra: &[&str]| -> Result<serde_json::Value> {
        let mut args = vec!["backup", p(&repo), p(&disk), "--disk", "web01", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = outcome(&sv_as_typed(&args, &[])?);
        anyhow::ensure!(code == Some(0), "backup failed: {err}");
        Ok(serde_json::from_str(&out)?)
    };
    let first = backup(&[])?;
    assert_eq!(first["kind"], "full");
    let before = dir.path().join("before.img");
    std::fs::copy(&disk, &before)?;
    let changed = scribble(&disk, Scribble::Week, 3, 31)?;
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
    let (code, out, err) = outcome(&sv_as_typed(&["diff", p(&repo), a, b, "--json"], &[])?);
    assert_eq!(code, Some(0), "{err}");
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
    let (code, out, _) = outcome(&sv_as_typed(&["diff", p(&repo), a, a], &[])?);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 B changed"), "{out}");

    let (code, out, _) = outcome(&sv_as_typed(&["snapshots", p(&repo)], &[])?);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("differential") && out.contains(&a[..12]),
        "{out}"
    );
    Ok(())
}

/// Azure page range XML of the same ranges as `json_change_list`.
fn xml_change_list(ranges: &[(u64, u64)]) -> String {
    let items: String = ranges
        .iter()
        .map(|(o, l)| {
            format!(
                "<PageRange><Start>{o}</Start><End>{}</End></PageRange>",
                o + l - 1
            )
        })
        .collect();
    format!("<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>{items}<NextMarker/></PageList>")
}

#[test]
fn xml_and_json_lists_of_the_same_ranges_back_up_the_same() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let disk = dir.path().join("disk.img");
    Disk::filled(32 << 20, 60, 41).write(&disk)?;
    let gen0 = run(&repo, &disk, opts(BackupMode::Auto, None))?;
    let changed = scribble(&disk, Scribble::Week, 5, 42)?;
    let mut reports = Vec::new();
    for list in [
        ChangeList::parse(&json_change_list(&changed), "json")?,
        ChangeList::parse(&xml_change_list(&changed), "xml")?,
    ] {
        let mut o = opts(BackupMode::Auto, Some(list));
        o.parent = Some(gen0.snapshot_id.to_string());
        reports.push(run(&repo, &disk, o)?);
    }
    let (j, x) = (&reports[0], &reports[1]);
    assert_eq!(j.root_digest, x.root_digest);
    assert_eq!(j.stats.bytes_read, x.stats.bytes_read);
    assert_eq!(j.stats.skipped_bytes, x.stats.skipped_bytes);
    assert!(j.stats.skipped_bytes > 0);
    let full = run(&repo, &disk, opts(BackupMode::Full, None))?;
    assert_eq!(full.root_digest, j.root_digest);
    Ok(())
}

#[test]
fn change_lists_with_numbers_that_wrap_or_missing_pages_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.img");
    Disk::filled(8 << 20, 60, 43).write(&disk)?;
    let (r, d) = (repo.to_string_lossy(), disk.to_string_lossy());
    let (code, _, err) = outcome(&sv_as_typed(&["init", &*r], &[])?);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = outcome(&sv_as_typed(&["backup", &*r, &*d, "--disk", "d"], &[])?);
    assert_eq!(code, Some(0), "{err}");
    let list = dir.path().join("changes.xml");
    let l = list.to_string_lossy();
    // <End> of 2^64-1: the inclusive length wraps to 0, which read nothing and recorded the
    // parent's data for a disk that changed.
    std::fs::write(
        &list,
        "<PageList><PageRange><Start>0</Start><End>18446744073709551615</End></PageRange></PageList>",
    )?;
    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", &*r, &*d, "--disk", "d", "--changed-ranges", &*l],
        &[],
    )?);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("18446744073709551615") && err.contains(&*l),
        "{err}"
    );
    // One page of a paginated answer.
    std::fs::write(
        &list,
        "<PageList><PageRange><Start>0</Start><End>4095</End></PageRange>\
         <NextMarker>2!104!MDAwMDQ2IXBhZ2Uy</NextMarker></PageList>",
    )?;
    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", &*r, &*d, "--disk", "d", "--changed-ranges", &*l],
        &[],
    )?);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("incomplete") && err.contains("2!104!MDAwMDQ2IXBhZ2Uy"),
        "{err}"
    );
    // Nothing was recorded by the refused backups.
    let (_, out, _) = outcome(&sv_as_typed(&["snapshots", &*r, "--json"], &[])?);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn a_list_naming_its_base_must_name_the_parent_and_diff_json_is_a_list() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.img");
    Disk::filled(16 << 20, 60, 44).write(&disk)?;
    let (r, d) = (repo.to_string_lossy().into_owned(), disk.to_string_lossy());
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let (code, out, err) = outcome(&sv_as_typed(args, &[])?);
        anyhow::ensure!(code == Some(0), "stackvault {args:?}: {err}");
        Ok(serde_json::from_str(&out)?)
    };
    json(&["init", &r, "--json"])?;
    let a = json(&["backup", &r, &d, "--disk", "d", "--json"])?;
    let a_id = a["snapshot_id"].as_str().unwrap_or_default().to_string();
    scribble(&disk, Scribble::Week, 4, 45)?;
    let b = json(&["backup", &r, &d, "--disk", "d", "--full", "--json"])?;
    let b_id = b["snapshot_id"].as_str().unwrap_or_default().to_string();
    // What changed from A to B, as `diff --json` says, is a change list relative to A.
    let diff = dir.path().join("diff.json");
    let (code, out, err) = outcome(&sv_as_typed(&["diff", &*r, &*a_id, &*b_id, "--json"], &[])?);
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(&diff, out)?;
    let df = diff.to_string_lossy();
    // The latest snapshot (B) is not its base: refused, naming both.
    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", &*r, &*d, "--disk", "d", "--changed-ranges", &*df],
        &[],
    )?);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("relative to") && err.contains(&a_id) && err.contains(&b_id[..12]),
        "{err}"
    );
    // With A as the parent it is accepted, and records the same disk as B.
    let c = json(&[
        "backup",
        &r,
        &d,
        "--disk",
        "d",
        "--parent",
        &a_id,
        "--changed-ranges",
        &df,
        "--json",
    ])?;
    assert_eq!(c["root_digest"], b["root_digest"]);
    assert_eq!(c["change_source"], "changed-ranges");
    assert!(c["stats"]["skipped_bytes"].as_u64() > Some(0), "{c}");
    // --fallback-full reads everything instead of refusing.
    let f = json(&[
        "backup",
        &r,
        &d,
        "--disk",
        "d",
        "--changed-ranges",
        &df,
        "--fallback-full",
        "--json",
    ])?;
    assert!(
        f["change_source"]
            .as_str()
            .is_some_and(|s| s.starts_with("full-read")),
        "{f}"
    );
    assert_eq!(f["root_digest"], b["root_digest"]);
    // A JSON document naming its base by id prefix; a bare list stays accepted.
    let doc = dir.path().join("doc.json");
    let prefix = &a_id[..16];
    std::fs::write(&doc, format!(r#"{{"base": "{prefix}", "ranges": []}}"#))?;
    let dc = doc.to_string_lossy();
    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", &*r, &*d, "--disk", "d", "--changed-ranges", &*dc],
        &[],
    )?);
    assert_ne!(code, Some(0), "a base that is not the parent was accepted");
    assert!(err.contains(prefix), "{err}");
    json(&[
        "backup",
        &r,
        &d,
        "--disk",
        "d",
        "--parent",
        &a_id,
        "--changed-ranges",
        &dc,
        "--json",
    ])?;
    Ok(())
}

/// A page blob stub: a fixed VHD of 16 MiB whose byte at `o` is a function of `o`; the written
/// page list comes in two pages (a `NextMarker` between them); a diff against blob snapshot
/// `T1` answers a recorded page range XML. A stub because Azurite answers 501 to
/// `prevsnapshot` and never paginates.
mod page_blob {
    use super::*;
    use crate::azure::{page_blob_head, sas_options, serve, Answer, Server};
    use stackvault::format::vhd_footer::{chs_geometry, DiskType, Footer};
    use stackvault::source::PageBlobSource;

    pub const SIZE: u64 = 16 << 20;
    pub const T1: &str = "2026-01-01T00:00:00.0000000Z";
    pub const T1_QUERY: &str = "2026-01-01T00%3A00%3A00.0000000Z";

    fn byte(o: u64) -> u8 {
        (o / 4096 % 251) as u8 ^ (o % 7) as u8
    }

    pub fn stub() -> Result<Server> {
        let foot = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: u64::MAX,
            timestamp: 0,
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_host_os: *b"Wi2k",
            original_size: SIZE,
            current_size: SIZE,
            geometry: chs_geometry(SIZE),
            disk_type: DiskType::Fixed,
            unique_id: [5; 16],
            saved_state: 0,
        }
        .encode();
        serve(move |req| {
            if req.method == "HEAD" {
                return page_blob_head(SIZE + 512);
            }
            let range =
                |s: u64, e: u64| format!("<PageRange><Start>{s}</Start><End>{e}</End></PageRange>");
            if req.target.contains("prevsnapshot=") {
                let body = format!("<PageList>{}</PageList>", range(4 << 20, (4 << 20) + 4095));
                return Answer::Reply(200, vec![], body.into_bytes());
            }
            if req.target.contains("comp=pagelist") {
                let body = if req.target.contains("marker=page2") {
                    format!(
                        "<PageList>{}<NextMarker/></PageList>",
                        range(8 << 20, SIZE - 1)
                    )
                } else {
                    format!(
                        "<PageList>{}<NextMarker>page2</NextMarker></PageList>",
                        range(0, (8 << 20) - 1)
                    )
                };
                return Answer::Reply(200, vec![], body.into_bytes());
            }
            let Some((s, e)) = req
                .header("x-ms-range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
            else {
                return Answer::Reply(400, vec![], Vec::new());
            };
            let body = (s..=e)
                .map(|o| {
                    if o >= SIZE {
                        foot[(o - SIZE) as usize]
                    } else {
                        byte(o)
                    }
                })
                .collect();
            Answer::Reply(206, vec![], body)
        })
    }

    pub fn open(stub: &Server, snapshot: Option<&str>) -> Result<PageBlobSource> {
        let query = snapshot.map_or(String::new(), |t| format!("snapshot={t}&"));
        let url = format!(
            "http://127.0.0.1:{}/acct/c/disk.vhd?{query}sig=S",
            stub.port
        );
        Ok(PageBlobSource::open(&url, &sas_options())?)
    }
}

#[test]
fn page_blob_backups_record_their_blob_snapshot_and_diff_from_it() -> Result<()> {
    use page_blob::{open, stub, T1, T1_QUERY};
    let stub = stub()?;
    let dir = tempfile::tempdir()?;
    let repo = Repo::init(&dir.path().join("repo"), &InitOptions::default())?;
    let backup_of = |src: &dyn stackvault::DiskSource, o: BackupOptions| -> Result<BackupReport> {
        Ok(backup(&repo, src, &o, &NoProgress)?)
    };
    // The written page list came in two pages: both were asked for and used.
    let first = open(&stub, Some(T1_QUERY))?;
    assert_eq!(first.written_bytes(), page_blob::SIZE);
    let reqs = stub.requests.lock().map(|r| r.clone()).unwrap_or_default();
    assert!(reqs.iter().any(|r| r.target.contains("marker=page2")));
    // The first backup records the blob snapshot and ETag it read.
    let a = backup_of(&first, opts(BackupMode::Auto, None))?;
    let meta = repo.resolve_snapshot(&a.snapshot_id, None)?.meta;
    let blob = meta.source.blob.clone().unwrap_or_default();
    assert_eq!(blob.snapshot.as_deref(), Some(T1));
    assert_eq!(blob.etag.as_deref(), Some("\"0x1\""));
    // The next backup, of a later blob snapshot, asks only for the pages changed since T1.
    let second = open(&stub, Some("2026-01-02T00%3A00%3A00.0000000Z"))?;
    let b = backup_of(&second, opts(BackupMode::Auto, None))?;
    assert_eq!(b.change_source.to_string(), "blob-snapshot-diff");
    assert_eq!(b.parent.as_deref(), Some(a.snapshot_id.as_str()));
    assert!(b.stats.skipped_bytes >= 8 << 20, "{:?}", b.stats);
    assert_eq!(b.root_digest, a.root_digest);
    let reqs = stub.requests.lock().map(|r| r.clone()).unwrap_or_default();
    assert!(
        reqs.iter()
            .any(|r| r.target.contains(&format!("prevsnapshot={T1_QUERY}"))),
        "no diff against the parent's blob snapshot"
    );
    // Changes since a blob snapshot that is not the parent's source are refused...
    let wrong = second.changes_since_snapshot("2025-12-01T00:00:00.0000000Z")?;
    let err = backup_of(&second, opts(BackupMode::Auto, Some(wrong.clone())));
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("2025-12-01T00:00:00.0000000Z")
            && msg.contains("2026-01-02T00:00:00.0000000Z"),
        "{msg}"
    );
    // ...or read in full with --fallback-full.
    let mut o = opts(BackupMode::Auto, Some(wrong));
    o.fallback_full = true;
    let c = backup_of(&second, o)?;
    assert!(
        c.change_source.to_string().starts_with("full-read"),
        "{}",
        c.change_source
    );
    assert_eq!(c.root_digest, a.root_digest);
    // The parent's own blob snapshot, named explicitly, is accepted.
    let mut o = opts(
        BackupMode::Auto,
        Some(second.changes_since_snapshot("2026-01-02T00:00:00.0000000Z")?),
    );
    o.parent = Some(c.snapshot_id.to_string());
    let d = backup_of(&second, o)?;
    assert_eq!(d.root_digest, a.root_digest);
    Ok(())
}
