//! The real `stackvault` binary: the user's commands, their output and their errors.

use anyhow::Result;
use stackvault_tests::{make_sample_disk, run_cli, same_bytes};

#[test]
fn init_backup_snapshots_restore() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.img");
    make_sample_disk(&disk, 10 << 20, 50, 11)?;

    let (code, out, err) = run_cli(["init".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created repository"), "{out}");

    let (code, out, err) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        disk.as_os_str(),
        "--disk".as_ref(),
        "web01-os".as_ref(),
        "--json".as_ref(),
    ])?;
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["format_version"], 1);
    assert_eq!(report["disk"], "web01-os");
    assert_eq!(report["virtual_size"], 10 << 20);
    for field in [
        "bytes_read",
        "zero_bytes",
        "new_chunks",
        "bytes_added",
        "duration_ms",
        "throughput_mb_s",
    ] {
        assert!(
            report.get(field).is_some(),
            "backup --json lacks {field}: {out}"
        );
    }
    let id = report["snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(id.len(), 64);
    // Without a terminal there is no progress output on stderr.
    assert!(err.is_empty(), "unexpected stderr: {err}");

    // Human summary of a second backup.
    let (code, out, _) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        disk.as_os_str(),
        "--disk".as_ref(),
        "web01-os".as_ref(),
    ])?;
    assert_eq!(code, 0);
    assert!(out.contains("0 new"), "{out}");
    assert!(out.contains("MB/s"), "{out}");

    let (code, out, _) = run_cli(["snapshots".as_ref(), repo.as_os_str(), "--json".as_ref()])?;
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let snaps = list["snapshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["id"], id.as_str());
    assert_eq!(snaps[0]["kind"], "full");
    assert_eq!(snaps[0]["virtual_size"], 10 << 20);
    let (code, out, _) = run_cli([
        "snapshots".as_ref(),
        repo.as_os_str(),
        "--disk".as_ref(),
        "web01-os".as_ref(),
    ])?;
    assert_eq!(code, 0);
    assert!(
        out.contains(&id[..12]) && out.contains("2 snapshots"),
        "{out}"
    );

    // Restore by short prefix.
    let restored = dir.path().join("restored.img");
    let (code, out, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        id[..8].as_ref(),
        restored.as_os_str(),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("restored snapshot"), "{out}");
    assert!(same_bytes(&disk, &restored)?);

    // The output exists now: refused without --force, accepted with it.
    let (code, _, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        "latest".as_ref(),
        restored.as_os_str(),
        "--disk".as_ref(),
        "web01-os".as_ref(),
    ])?;
    assert_eq!(code, 1);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (code, _, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        "latest".as_ref(),
        restored.as_os_str(),
        "--force".as_ref(),
        "--json".as_ref(),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(same_bytes(&disk, &restored)?);
    Ok(())
}

#[test]
fn errors_are_clear_and_never_panics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let missing = dir.path().join("missing.img");

    let (code, _, err) = run_cli(["snapshots".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 1);
    assert!(err.contains("is not a stackvault repository"), "{err}");

    let (code, _, _) = run_cli(["init".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 0);
    let (code, _, err) = run_cli(["init".as_ref(), repo.as_os_str()])?;
    assert_eq!(code, 1);
    assert!(err.contains("already a stackvault repository"), "{err}");

    let (code, _, err) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        missing.as_os_str(),
        "--disk".as_ref(),
        "d".as_ref(),
    ])?;
    assert_eq!(code, 1);
    assert!(
        err.contains("missing.img") && err.contains("No such file"),
        "{err}"
    );

    let (code, _, err) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        dir.path().as_os_str(),
        "--disk".as_ref(),
        "d".as_ref(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("is a directory"), "{err}");

    let disk = dir.path().join("d.img");
    make_sample_disk(&disk, 1 << 20, 50, 12)?;
    let (code, _, err) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        disk.as_os_str(),
        "--disk".as_ref(),
        "bad name/with slash".as_ref(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("disk name"), "{err}");

    let out = dir.path().join("o.img");
    let (code, _, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        "abcdef".as_ref(),
        out.as_os_str(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("no snapshot matches"), "{err}");
    let (code, _, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        "not-hex".as_ref(),
        out.as_os_str(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("hex snapshot id"), "{err}");
    assert!(!out.exists());

    let (code, _, err) = run_cli([
        "init".as_ref(),
        dir.path().join("r2").as_os_str(),
        "--chunker".as_ref(),
        "fixed:1000".as_ref(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("fixed chunk size"), "{err}");

    // A damaged manifest: restore fails with the location and the "damaged" exit code.
    let (code, out, _) = run_cli([
        "backup".as_ref(),
        repo.as_os_str(),
        disk.as_os_str(),
        "--disk".as_ref(),
        "d".as_ref(),
        "--json".as_ref(),
    ])?;
    assert_eq!(code, 0);
    let id = serde_json::from_str::<serde_json::Value>(&out)?["snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let manifest = repo.join("snapshots").join(&id);
    let mut bytes = std::fs::read(&manifest)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&manifest, &bytes)?;
    let (code, _, err) = run_cli([
        "restore".as_ref(),
        repo.as_os_str(),
        id.as_ref(),
        out_path(&dir).as_os_str(),
    ])?;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("corrupt") && err.contains(&id), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

fn out_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("damaged-restore.img")
}
