//! The real `stackvault` binary: the user's commands, their output and their errors.

use anyhow::Result;
use stackvault_tests::{make_sample_disk, p, run_cli, same_bytes, sv, sv_env, Fixture};

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
    assert_eq!(code, 2, "a bad disk name is a usage error: {err}");
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
    assert_eq!(code, 2, "a bad --chunker is a usage error: {err}");
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

/// Exit code, stdout and stderr of a run.
fn outcome(out: &std::process::Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_option_values_are_usage_errors() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    make_sample_disk(&disk, 1 << 20, 50, 13)?;
    let r = p(&repo);
    let r2 = f.path("r2");
    // Each: the command, and a word of the message that says what to type instead.
    let cases: &[(&[&str], &str)] = &[
        (&["check", r, "--read-data-subset", "0%"], "above 0"),
        (&["check", r, "--read-data-subset", "3/2"], "N <= M"),
        (&["forget", r, "--keep-within", "7x"], "like 7d"),
        (&["prune", r, "--max-unused", "200%"], "between 0% and 100%"),
        (&["prune", r, "--max-unused", "lots"], "like 10%"),
        (&["snapshots", r, "--disk", ""], "disk name"),
        (&["stats", r, "--disk", ""], "disk name"),
        (
            &["forget", r, "--disk", "", "--keep-last", "1"],
            "disk name",
        ),
        (&["backup", r, p(&disk), "--disk", ""], "disk name"),
        (&["forget", r], "--keep-daily"),
        (&["forget", r, "latest", "--keep-last", "1"], "not both"),
        (
            &["backup", r, p(&disk), "--disk", "d", "--format", "qcow2"],
            "raw",
        ),
        (
            &[
                "restore",
                r,
                "latest",
                "/nonexistent/o",
                "--output-format",
                "vmdk",
            ],
            "vhd-fixed",
        ),
        (&["init", p(&r2), "--zstd-level", "40"], "1..=22"),
        (&["restore", "-r", r, "latest"], "missing OUTPUT"),
        (&["restore", r, "latest"], "-r REPO"),
    ];
    for (args, hint) in cases {
        let (code, out, err) = outcome(&sv(args)?);
        assert_eq!(code, Some(2), "{args:?} should exit 2 (usage): {out}{err}");
        assert!(
            err.contains(hint),
            "{args:?}: the message lacks {hint:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // Nothing was done: no snapshot of the refused backup, no second repository.
    assert!(!r2.exists());
    let (code, out, _) = outcome(&sv(&["snapshots", r])?);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 snapshots"), "{out}");
    Ok(())
}

#[test]
fn help_and_readme_list_the_exit_codes() -> Result<()> {
    let (code, out, err) = run_cli(["--help"])?;
    assert_eq!(code, 0, "{err}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))?;
    for (n, word) in [
        (1, "failure"),
        (2, "usage"),
        (3, "repository"),
        (4, "source"),
        (5, "does not match"),
        (6, "support"),
        (130, "interrupted"),
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{n} ")))
            .unwrap_or_default();
        assert!(
            line.contains(word),
            "--help lacks exit code {n} ({word}): {out}"
        );
        assert!(
            readme
                .lines()
                .any(|l| l.contains(&format!("| {n} ")) && l.contains(word)),
            "README's exit code table lacks {n} ({word})"
        );
        // The code is the one the engine's error classes use.
    }
    for class in [
        (stackvault::ErrorClass::Usage, 2),
        (stackvault::ErrorClass::RepositoryDamaged, 3),
        (stackvault::ErrorClass::SourceDamaged, 4),
        (stackvault::ErrorClass::TargetMismatch, 5),
        (stackvault::ErrorClass::Unsupported, 6),
        (stackvault::ErrorClass::Cancelled, 130),
    ] {
        assert_eq!(class.0.exit_code(), class.1);
    }
    Ok(())
}

#[test]
fn repository_from_flag_environment_or_position() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("d.img");
    make_sample_disk(&disk, 2 << 20, 50, 14)?;
    let (code, _, err) = outcome(&sv(&["init", "-r", p(&repo)])?);
    assert_eq!(code, Some(0), "{err}");
    // -r before or after the subcommand, --repo, the variable, the old positional form.
    let (code, _, err) = outcome(&sv(&["-r", p(&repo), "backup", p(&disk), "--disk", "a"])?);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = outcome(&sv(&[
        "backup",
        "--repo",
        p(&repo),
        p(&disk),
        "--disk",
        "b",
    ])?);
    assert_eq!(code, Some(0), "{err}");
    let env = [("STACKVAULT_REPOSITORY", p(&repo))];
    let (code, _, err) = outcome(&sv_env(&["backup", p(&disk), "--disk", "c"], &env)?);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = outcome(&sv(&["backup", p(&repo), p(&disk), "--disk", "d"])?);
    assert_eq!(code, Some(0), "{err}");
    for args in [
        vec!["snapshots", "-r", p(&repo)],
        vec!["snapshots", p(&repo)],
        vec!["snapshots"],
    ] {
        let (code, out, err) = outcome(&sv_env(&args, &env)?);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(out.contains("4 snapshots"), "{args:?}: {out}");
    }
    // Snapshot arguments shift into place when the repository comes from -r.
    let out = dir.path().join("o.img");
    let (code, _, err) = outcome(&sv(&[
        "restore",
        "-r",
        p(&repo),
        "latest",
        p(&out),
        "--disk",
        "c",
    ])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(same_bytes(&disk, &out)?);
    // forget: with -r every positional is a snapshot.
    let (code, out, err) = outcome(&sv(&["forget", "-r", p(&repo), "latest", "--dry-run"])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("would remove 1 snapshots"), "{out}");
    // Nowhere to find it, or given twice: usage errors that say what to type.
    let (code, _, err) = outcome(&sv(&["snapshots"])?);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("-r REPO") && err.contains("STACKVAULT_REPOSITORY"),
        "{err}"
    );
    let (code, _, err) = outcome(&sv(&["snapshots", "-r", p(&repo), p(&repo)])?);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("twice"), "{err}");
    Ok(())
}

#[test]
fn completion_scripts_and_man_page() -> Result<()> {
    for (shell, marker) in [
        ("bash", "_stackvault()"),
        ("zsh", "#compdef stackvault"),
        ("fish", "complete -c stackvault"),
    ] {
        let (code, out, err) = run_cli(["completion", shell])?;
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell} completion lacks {marker:?}");
        // Every subcommand and the repository option complete.
        for word in ["backup", "restore", "forget", "repo"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, err) = run_cli(["completion", "tcsh"])?;
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run_cli(["man"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".TH stackvault 1"), "{out}");
    assert!(
        out.contains("Exit codes") && out.contains("130"),
        "the man page lacks the exit codes"
    );
    Ok(())
}

#[test]
fn an_error_prints_its_cause_once() -> Result<()> {
    let f = Fixture::new()?;
    let missing = f.path("missing.img");
    let (code, _, err) = outcome(&sv(&["backup", p(&f.repo()), p(&missing), "--disk", "d"])?);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause is printed more than once:\n{err}"
    );
    assert!(err.contains("missing.img"), "{err}");
    Ok(())
}
