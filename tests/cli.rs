//! The real `stackvault` binary: the user's commands, their output and their errors.

use anyhow::Result;
use stackvault_tests::{
    outcome, p, same_bytes, scribble, sv, sv_as_typed, sv_env, sv_json, Disk, Fixture, Scribble,
};

#[test]
fn init_backup_snapshots_restore() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let disk = dir.path().join("disk.img");
    Disk::filled(10 << 20, 50, 11).write(&disk)?;

    let (code, out, err) = outcome(&sv_as_typed(&["init", p(&repo)], &[])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("created repository"), "{out}");

    let (code, out, err) = outcome(&sv_as_typed(
        &["backup", p(&repo), p(&disk), "--disk", "web01-os", "--json"],
        &[],
    )?);
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["format_version"], 2);
    assert_eq!(report["disk"], "web01-os");
    assert_eq!(report["virtual_size_bytes"], 10 << 20);
    assert_eq!(report["stats"]["bytes_read"], 10 << 20);
    let id = report["snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(id.len(), 64);
    // Without a terminal there is no progress output on stderr.
    assert!(err.is_empty(), "unexpected stderr: {err}");

    // Human summary of a second backup.
    let (code, out, _) = outcome(&sv_as_typed(
        &["backup", p(&repo), p(&disk), "--disk", "web01-os"],
        &[],
    )?);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 new"), "{out}");
    // A binary unit, as the progress bars use (MiB/s or GiB/s, depending on the machine).
    assert!(out.contains("iB/s"), "{out}");

    let (code, out, _) = outcome(&sv_as_typed(&["snapshots", p(&repo), "--json"], &[])?);
    assert_eq!(code, Some(0));
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let snaps = list["snapshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["snapshot_id"], id.as_str());
    assert_eq!(snaps[0]["kind"], "full");
    assert_eq!(snaps[0]["virtual_size_bytes"], 10 << 20);
    let (code, out, _) = outcome(&sv_as_typed(
        &["snapshots", p(&repo), "--disk", "web01-os"],
        &[],
    )?);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&id[..12]) && out.contains("2 snapshots"),
        "{out}"
    );

    // Restore by short prefix.
    let restored = dir.path().join("restored.img");
    let (code, out, err) = outcome(&sv_as_typed(
        &["restore", p(&repo), &id[..8], p(&restored)],
        &[],
    )?);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("restored snapshot"), "{out}");
    assert!(same_bytes(&disk, &restored)?);

    // The output exists now: refused without --force, accepted with it.
    let (code, _, err) = outcome(&sv_as_typed(
        &[
            "restore",
            p(&repo),
            "latest",
            p(&restored),
            "--disk",
            "web01-os",
        ],
        &[],
    )?);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (code, _, err) = outcome(&sv_as_typed(
        &[
            "restore",
            p(&repo),
            "latest",
            p(&restored),
            "--force",
            "--json",
        ],
        &[],
    )?);
    assert_eq!(code, Some(0), "{err}");
    assert!(same_bytes(&disk, &restored)?);
    Ok(())
}

#[test]
fn errors_are_clear_and_never_panics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    let missing = dir.path().join("missing.img");

    let (code, _, err) = outcome(&sv_as_typed(&["snapshots", p(&repo)], &[])?);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a stackvault repository"), "{err}");

    let (code, _, _) = outcome(&sv_as_typed(&["init", p(&repo)], &[])?);
    assert_eq!(code, Some(0));
    let (code, _, err) = outcome(&sv_as_typed(&["init", p(&repo)], &[])?);
    assert_eq!(code, Some(1));
    assert!(err.contains("already a stackvault repository"), "{err}");

    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", p(&repo), p(&missing), "--disk", "d"],
        &[],
    )?);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("missing.img") && err.contains("No such file"),
        "{err}"
    );

    let (code, _, err) = outcome(&sv_as_typed(
        &["backup", p(&repo), p(dir.path()), "--disk", "d"],
        &[],
    )?);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a directory"), "{err}");

    let disk = dir.path().join("d.img");
    Disk::filled(1 << 20, 50, 12).write(&disk)?;
    let (code, _, err) = outcome(&sv_as_typed(
        &[
            "backup",
            p(&repo),
            p(&disk),
            "--disk",
            "bad name/with slash",
        ],
        &[],
    )?);
    assert_eq!(code, Some(2), "a bad disk name is a usage error: {err}");
    assert!(err.contains("disk name"), "{err}");

    let out = dir.path().join("o.img");
    let (code, _, err) = outcome(&sv_as_typed(
        &["restore", p(&repo), "abcdef", p(&out)],
        &[],
    )?);
    assert_eq!(code, Some(1));
    assert!(err.contains("no snapshot matches"), "{err}");
    let (code, _, err) = outcome(&sv_as_typed(
        &["restore", p(&repo), "not-hex", p(&out)],
        &[],
    )?);
    assert_eq!(
        code,
        Some(2),
        "a malformed snapshot id is a usage error: {err}"
    );
    assert!(err.contains("hex snapshot id"), "{err}");
    assert!(!out.exists());

    let (code, _, err) = outcome(&sv_as_typed(
        &["init", p(&dir.path().join("r2")), "--chunker", "fixed:1000"],
        &[],
    )?);
    assert_eq!(code, Some(2), "a bad --chunker is a usage error: {err}");
    assert!(err.contains("fixed chunk size"), "{err}");

    // A damaged manifest: restore fails with the location and the "damaged" exit code.
    let (code, out, _) = outcome(&sv_as_typed(
        &["backup", p(&repo), p(&disk), "--disk", "d", "--json"],
        &[],
    )?);
    assert_eq!(code, Some(0));
    let id = serde_json::from_str::<serde_json::Value>(&out)?["snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let manifest = repo.join("snapshots").join(&id);
    let mut bytes = std::fs::read(&manifest)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&manifest, &bytes)?;
    let (code, _, err) = outcome(&sv_as_typed(
        &["restore", p(&repo), &id, p(&out_path(&dir))],
        &[],
    )?);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("corrupt") && err.contains(&id), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

fn out_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("damaged-restore.img")
}

#[test]
fn bad_option_values_are_usage_errors() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    Disk::filled(1 << 20, 50, 13).write(&disk)?;
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
        (
            &[
                "backup",
                r,
                p(&disk),
                "--disk",
                "d",
                "--since-snapshot",
                "2026-01-01",
            ],
            "page blob source",
        ),
        (
            &["restore", r, "latest", "/nonexistent/o", "--existing"],
            "page blob targets",
        ),
        (
            &[
                "restore",
                r,
                "latest",
                "https://acct.blob.core.windows.net/c/d.vhd?sig=x",
                "--existing",
                "--force",
            ],
            "pick one",
        ),
        (
            &[
                "restore",
                r,
                "latest",
                "https://acct.blob.core.windows.net/c/d.vhd?sig=x",
                "--target-profile",
                "azurestak",
            ],
            "use azure or azurestack",
        ),
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
    let (code, out, err) = outcome(&sv_as_typed(&["--help"], &[])?);
    assert_eq!(code, Some(0), "{err}");
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
    Disk::filled(2 << 20, 50, 14).write(&disk)?;
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
        let (code, out, err) = outcome(&sv_as_typed(&["completion", shell], &[])?);
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(out.contains(marker), "{shell} completion lacks {marker:?}");
        // Every subcommand and the repository option complete.
        for word in ["backup", "restore", "forget", "repo"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, err) = outcome(&sv_as_typed(&["completion", "tcsh"], &[])?);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, err) = outcome(&sv_as_typed(&["man"], &[])?);
    assert_eq!(code, Some(0), "{err}");
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

// ---- One JSON schema: every command's `--json` document against tests/golden/<command>.json.
//
// A golden file is the document's shape with placeholder values: every key, recursively, with
// a value of the same JSON type ("" for strings, 0 for integers, 0.5 for floats, false, an
// array holding the shape of its elements, [] for an array that must be empty; null for an
// optional value the scenario never fills, which then matches anything). A renamed,
// added or removed key, or a changed type, fails the command's test. After a deliberate change
// (and a `format_version` bump, docs/json.md), rewrite them with
// `STACKVAULT_BLESS_GOLDEN=1 cargo test --test main cli::json_` and review the diff.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"))
}

/// The document's shape: the same keys and types, placeholder values.
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => Value::Null,
        Value::Bool(_) => Value::Bool(false),
        Value::Number(n) if n.is_f64() => serde_json::json!(0.5),
        Value::Number(_) => serde_json::json!(0),
        Value::String(_) => Value::String(String::new()),
        // One element holding the shapes of all: optional fields and lists filled where any is.
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(shape)
                .reduce(|a, b| merge(a, &b))
                .into_iter()
                .collect(),
        ),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
    }
}

/// Two shapes of the same thing as one: a null or empty list gives way to the other's.
fn merge(a: Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b.clone(),
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, bv) in b {
                let merged = match a.remove(k) {
                    Some(av) => merge(av, bv),
                    None => bv.clone(),
                };
                a.insert(k.clone(), merged);
            }
            Value::Object(a)
        }
        (Value::Array(a), Value::Array(b)) => {
            Value::Array(match (a.into_iter().next(), b.first()) {
                (Some(x), Some(y)) => vec![merge(x, y)],
                (x, y) => x.or_else(|| y.cloned()).into_iter().collect(),
            })
        }
        (a, _) => a,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every difference between the golden shape and a document, as "path: what".
/// `null` stands for an absent optional value (either side), and an empty list for a list
/// whose elements this run did not produce.
fn differences(at: &str, golden: &Value, actual: &Value, out: &mut Vec<String>) {
    if golden.is_null() || actual.is_null() {
        return;
    }
    if kind(golden) != kind(actual) {
        out.push(format!(
            "{at}: {} in the golden file, {} now",
            kind(golden),
            kind(actual)
        ));
        return;
    }
    match (golden, actual) {
        (Value::Object(g), Value::Object(a)) => {
            for k in g.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{at}.{k}: missing (renamed or removed?)"));
            }
            for k in a.keys().filter(|k| !g.contains_key(*k)) {
                out.push(format!(
                    "{at}.{k}: not in the golden file (new or renamed?)"
                ));
            }
            for (k, gv) in g {
                if let Some(av) = a.get(k) {
                    differences(&format!("{at}.{k}"), gv, av, out);
                }
            }
        }
        (Value::Array(g), Value::Array(a)) => match g.first() {
            None if !a.is_empty() => out.push(format!("{at}: empty in the golden file")),
            None => {}
            Some(element) => {
                for (i, av) in a.iter().enumerate() {
                    differences(&format!("{at}[{i}]"), element, av, out);
                }
            }
        },
        _ => {}
    }
}

/// Checks a document against tests/golden/<name>.json.
fn assert_golden(name: &str, doc: &Value) -> Result<()> {
    let path = golden_path(name);
    if std::env::var_os("STACKVAULT_BLESS_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(&path, serde_json::to_string_pretty(&shape(doc))? + "\n")?;
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; see the comment above assert_golden",
            path.display()
        )
    })?)?;
    let mut diffs = Vec::new();
    differences(name, &golden, doc, &mut diffs);
    assert!(
        diffs.is_empty(),
        "`{name} --json` no longer matches {} (docs/json.md; bump format_version for a \
         deliberate change):\n  {}",
        path.display(),
        diffs.join("\n  ")
    );
    assert_eq!(doc["format_version"], 2, "{name}: format_version");
    Ok(())
}

/// One repository with a history that fills every list of every report: two disks, a full and
/// an incremental snapshot, a verification, a restore, a target that differs.
struct Scenario {
    dir: tempfile::TempDir,
    full: String,
    incremental: String,
    init: Value,
    backup: Value,
    restore: Value,
    verify: Value,
}

impl Scenario {
    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn build() -> Result<Scenario> {
        let dir = tempfile::tempdir()?;
        let repo = dir.path().join("repo");
        let r = p(&repo);
        let (code, init, _) = sv_json(&["init", r])?;
        anyhow::ensure!(code == Some(0), "init: {init}");
        let disk = dir.path().join("d.img");
        Disk::filled(3 << 20, 50, 21).write(&disk)?;
        let (code, first, _) = sv_json(&["backup", r, p(&disk), "--disk", "web01-os"])?;
        anyhow::ensure!(code == Some(0), "backup: {first}");
        scribble(&disk, Scribble::Week, 8, 22)?;
        let (code, backup, _) = sv_json(&["backup", r, p(&disk), "--disk", "web01-os"])?;
        anyhow::ensure!(code == Some(0), "backup: {backup}");
        let id = |v: &Value| v["snapshot_id"].as_str().unwrap_or_default().to_string();
        let (full, incremental) = (id(&first), id(&backup));
        let out = dir.path().join("restored.vhd");
        let (code, restore, _) =
            sv_json(&["restore", r, &full, p(&out), "--output-format", "vhd-fixed"])?;
        anyhow::ensure!(code == Some(0), "restore: {restore}");
        let (code, verified, _) = sv_json(&["verify", r, &incremental])?;
        anyhow::ensure!(code == Some(0), "verify: {verified}");
        // A target that is not the snapshot's disk: the report lists the differing ranges.
        let (code, verify, _) = sv_json(&["verify", r, &incremental, "--target", p(&out)])?;
        anyhow::ensure!(code == Some(5), "verify --target: {verify}");
        Ok(Scenario {
            dir,
            full,
            incremental,
            init,
            backup,
            restore,
            verify,
        })
    }

    fn get() -> &'static Scenario {
        static SCENARIO: OnceLock<Result<Scenario, String>> = OnceLock::new();
        match SCENARIO.get_or_init(|| Scenario::build().map_err(|e| format!("{e:#}"))) {
            Ok(s) => s,
            Err(e) => panic!("building the JSON scenario failed: {e}"),
        }
    }
}

#[test]
fn json_init() -> Result<()> {
    assert_golden("init", &Scenario::get().init)
}

#[test]
fn json_backup() -> Result<()> {
    assert_golden("backup", &Scenario::get().backup)
}

#[test]
fn json_restore() -> Result<()> {
    assert_golden("restore", &Scenario::get().restore)
}

#[test]
fn json_verify() -> Result<()> {
    assert_golden("verify", &Scenario::get().verify)
}

#[test]
fn json_snapshots() -> Result<()> {
    let s = Scenario::get();
    let (code, doc, _) = sv_json(&["snapshots", p(&s.repo())])?;
    assert_eq!(code, Some(0), "{doc}");
    // Only the verified incremental's entry has a record: check that one's shape.
    let list = doc["snapshots"].as_array().cloned().unwrap_or_default();
    let verified: Vec<Value> = list
        .into_iter()
        .filter(|e| e["snapshot_id"] == s.incremental.as_str())
        .collect();
    assert_eq!(verified.len(), 1, "{doc}");
    let mut one = doc.clone();
    one["snapshots"] = Value::Array(verified);
    assert_golden("snapshots", &one)
}

#[test]
fn json_show() -> Result<()> {
    let s = Scenario::get();
    let (code, doc, _) = sv_json(&["show", p(&s.repo()), &s.incremental])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("show", &doc)
}

#[test]
fn json_diff() -> Result<()> {
    let s = Scenario::get();
    let (code, doc, _) = sv_json(&["diff", p(&s.repo()), &s.full, &s.incremental])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("diff", &doc)
}

#[test]
fn json_forget() -> Result<()> {
    let s = Scenario::get();
    // Keeping only the incremental removes its parent: decisions, removed and parent_removed
    // all have entries.
    let (code, doc, _) = sv_json(&["forget", p(&s.repo()), "--keep-last", "1", "--dry-run"])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("forget", &doc)
}

#[test]
fn json_prune() -> Result<()> {
    let s = Scenario::get();
    let (code, doc, _) = sv_json(&["prune", p(&s.repo()), "--dry-run"])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("prune", &doc)
}

#[test]
fn json_stats() -> Result<()> {
    let s = Scenario::get();
    let (code, doc, _) = sv_json(&["stats", p(&s.repo())])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("stats", &doc)
}

/// A copy of the scenario's repository, with one stored byte flipped when `damage`.
fn repo_copy(s: &Scenario, name: &str, damage: bool) -> Result<PathBuf> {
    let copy = s.dir.path().join(name);
    // Other tests read the shared repository meanwhile: their lock files and SQLite's `-shm`
    // come and go, so a file that vanishes between listing and copying is skipped (`cp -a`
    // failed on that), and locks are never copied.
    let mut dirs = vec![std::path::PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        std::fs::create_dir_all(copy.join(&rel))?;
        for e in std::fs::read_dir(s.repo().join(&rel))? {
            let e = e?;
            let rel = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                if rel != std::path::Path::new("locks") {
                    dirs.push(rel);
                }
                continue;
            }
            match std::fs::copy(e.path(), copy.join(&rel)) {
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err.into()),
            }
        }
    }
    if !damage {
        return Ok(copy);
    }
    let mut packs = Vec::new();
    let mut dirs = vec![copy.join("packs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                packs.push(path);
            }
        }
    }
    packs.sort();
    let pack = packs
        .first()
        .ok_or_else(|| anyhow::anyhow!("no pack in {}", copy.display()))?;
    let mut bytes = std::fs::read(pack)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(pack, &bytes)?;
    Ok(copy)
}

#[test]
fn json_check() -> Result<()> {
    let s = Scenario::get();
    let repo = repo_copy(s, "check-copy", true)?;
    let (code, doc, _) = sv_json(&["check", p(&repo), "--read-data-subset", "1/1"])?;
    assert_eq!(code, Some(3), "{doc}");
    // Enums are lowercase words, never Rust debug text such as `Slice { n: 1, of: 1 }`.
    assert_eq!(doc["read_data"], "subset", "{doc}");
    assert_eq!(doc["read_data_subset"], "1/1", "{doc}");
    assert_golden("check", &doc)
}

#[test]
fn json_index_rebuild() -> Result<()> {
    let s = Scenario::get();
    let repo = repo_copy(s, "rebuild-copy", false)?;
    std::fs::remove_file(repo.join("index.sqlite"))?;
    let (code, doc, _) = sv_json(&["index", "rebuild", p(&repo)])?;
    assert_eq!(code, Some(0), "{doc}");
    assert_golden("index-rebuild", &doc)
}

#[test]
fn json_names_one_thing_one_way() -> Result<()> {
    // Across every golden file: no `id`, `len`, `virtual_size` or `throughput_mb_s` outside
    // the stored verification records (whose names are part of the repository format).
    fn walk(at: &str, v: &Value, bad: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let stored = at.ends_with("last_verification") || at.contains("verifications");
                    if !stored
                        && ["id", "len", "size", "virtual_size", "throughput_mb_s"]
                            .contains(&k.as_str())
                    {
                        bad.push(format!("{at}.{k}"));
                    }
                    walk(&format!("{at}.{k}"), v, bad);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(&format!("{at}[]"), v, bad)),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))? {
        let path = e?.path();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        walk(&path.display().to_string(), &doc, &mut bad);
    }
    assert!(
        bad.is_empty(),
        "names outside docs/json.md's vocabulary: {bad:?}"
    );
    Ok(())
}

#[test]
fn options_that_do_nothing_warn() -> Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("d.img");
    Disk::filled(1 << 20, 50, 31).write(&disk)?;
    let id = f.backup(&disk, "web01-os")?;
    let repo = f.repo();
    let r = p(&repo);
    let out = f.path("o.img");
    // A raw snapshot restores as raw: --exact-size cannot apply.
    let (code, _, err) = outcome(&sv(&["restore", r, &id, p(&out), "--exact-size"])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("warning: --exact-size did nothing"), "{err}");
    assert!(same_bytes(&disk, &out)?);
    let vhd = f.path("o.vhd");
    let (code, _, err) = outcome(&sv(&[
        "restore",
        r,
        &id,
        p(&vhd),
        "--exact-size",
        "--output-format",
        "vhd-fixed",
    ])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("warning"), "{err}");
    // A --disk with a typo forgets nothing, and says which disks exist.
    let (code, out, err) = outcome(&sv(&[
        "forget",
        r,
        "--disk",
        "web01-0s",
        "--keep-last",
        "1",
    ])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: --disk web01-0s names no disk") && err.contains("web01-os"),
        "{err}"
    );
    assert!(out.contains("0 snapshots"), "{out}");
    let (code, _, err) = outcome(&sv(&[
        "forget",
        r,
        "--disk",
        "web01-os",
        "--keep-last",
        "1",
    ])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("warning"), "{err}");
    Ok(())
}

#[test]
fn summaries_rate_the_bytes_actually_moved() -> Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("d.img");
    Disk::filled(4 << 20, 50, 32).write(&disk)?;
    f.backup(&disk, "d")?;
    // Nothing changed and the change list says so: nothing is read, so the rate is zero
    // (not the disk size over the run time), in the progress bars' binary unit.
    let list = f.path("none.json");
    std::fs::write(&list, "[]")?;
    let repo = f.repo();
    let r = p(&repo);
    let (code, out, err) = outcome(&sv(&[
        "backup",
        r,
        p(&disk),
        "--disk",
        "d",
        "--changed-ranges",
        p(&list),
    ])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("read 0 B,") && out.contains("read at 0 B/s"),
        "{out}"
    );
    let (code, out, err) = outcome(&sv(&["backup", r, p(&disk), "--disk", "d", "--full"])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("read 4.00 MiB") && out.contains("iB/s"),
        "{out}"
    );
    assert!(
        !out.contains("MB/s"),
        "one unit, as the progress bars: {out}"
    );
    let (code, out, err) = outcome(&sv(&["restore", r, "latest", p(&f.path("o.img"))])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("written at") && out.contains("/s"), "{out}");
    Ok(())
}

#[test]
fn show_prints_a_summary_with_the_verification_history() -> Result<()> {
    let s = Scenario::get();
    let (code, out, err) = outcome(&sv(&["show", p(&s.repo()), &s.incremental])?);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.trim_start().starts_with('{'),
        "show without --json printed JSON: {out}"
    );
    for want in [
        format!("snapshot {}", s.incremental),
        "disk       web01-os".to_string(),
        format!("kind       incremental, parent {}", s.full),
        "verified   2 times:".to_string(),
    ] {
        assert!(out.contains(&want), "show lacks {want:?}:\n{out}");
    }
    // Both runs, oldest first: the repository read back, then the target that differs.
    let ok = out.find(" OK ").unwrap_or(usize::MAX);
    let differs = out.find(" DIFFERS ").unwrap_or(0);
    assert!(
        ok < differs,
        "the history is not listed oldest first:\n{out}"
    );
    let (code, out, _) = outcome(&sv(&["show", p(&s.repo()), &s.full])?);
    assert_eq!(code, Some(0));
    assert!(out.contains("verified   never"), "{out}");
    Ok(())
}
