//! Read-only repositories, the disaster-recovery case: every command that does not change the
//! repository works on one the user cannot write (a non-root user on a `chmod -R a-w` tree,
//! through `setpriv`), and on a writable one with `--read-only`; commands that must write fail
//! early and say why. Nothing is ever written into the repository: its tree (names, sizes,
//! modes, mtimes) is compared before and after. The index then comes from a per-user cache
//! (`$XDG_CACHE_HOME/stackvault/<repo id>/`, else `$HOME/.cache/...`) whenever the one in the
//! repository is missing or stale.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context as _};
use stackvault_tests::{make_disk, p, same_bytes, scribble_disk, stackvault_bin, sv_ok};

const NOBODY: &str = "65534";

/// A world-readable scratch directory under /tmp holding a copy of the binary (the build
/// tree may not be readable by the unprivileged user), a repository with two snapshots of
/// disk `d`, and the disk as of each snapshot.
struct Setup {
    dir: tempfile::TempDir,
    bin: PathBuf,
    first: String,
    second: String,
}

impl Setup {
    fn new() -> anyhow::Result<Setup> {
        let dir = tempfile::Builder::new()
            .prefix("sv-readonly-")
            .tempdir_in("/tmp")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let bin = dir.path().join("stackvault");
        fs::copy(stackvault_bin(), &bin)?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        let repo = dir.path().join("repo");
        sv_ok(&["init", p(&repo)])?;
        let disk = dir.path().join("d.img");
        make_disk(&disk, 3 << 20, 11)?;
        let first = backup(&repo, &disk)?;
        fs::copy(&disk, dir.path().join("d1.img"))?;
        scribble_disk(&disk, 8, 12)?;
        let second = backup(&repo, &disk)?;
        for sub in ["out", "home", "cache"] {
            let d = dir.path().join(sub);
            fs::create_dir(&d)?;
            // Writable by anyone: the unprivileged user's restore target, home and cache.
            fs::set_permissions(&d, fs::Permissions::from_mode(0o777))?;
        }
        for f in ["d.img", "d1.img"] {
            fs::set_permissions(dir.path().join(f), fs::Permissions::from_mode(0o644))?;
        }
        Ok(Setup {
            dir,
            bin,
            first,
            second,
        })
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the copied binary, as the unprivileged user when `nobody`, with its cache and
    /// home in this directory.
    fn run(&self, nobody: bool, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = if nobody {
            let mut c = Command::new(setpriv()?);
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(&self.bin);
            c
        } else {
            Command::new(&self.bin)
        };
        cmd.envs(stackvault_tests::test_env())
            .args(args)
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env("HOME", self.path("home"))
            .current_dir(self.dir.path());
        cmd.output().with_context(|| format!("run {args:?}"))
    }

    /// Runs the commands that only read, all of which must succeed.
    fn read_everything(&self, nobody: bool, extra: &[&str]) -> anyhow::Result<()> {
        let repo = self.repo();
        let repo = p(&repo);
        let restored = self.path("out/restored.img");
        let _ = fs::remove_file(&restored);
        let commands: Vec<Vec<&str>> = vec![
            vec!["snapshots", repo],
            vec!["show", repo, "latest"],
            vec!["diff", repo, &self.first, &self.second],
            vec!["restore", repo, &self.first, p(&restored)],
            vec!["verify", repo, "latest", "--no-record"],
            vec!["check", repo, "--read-data"],
            vec!["stats", repo],
            vec!["forget", repo, "--keep-last", "1", "--dry-run"],
            vec!["prune", repo, "--dry-run"],
        ];
        for mut args in commands {
            args.extend_from_slice(extra);
            let out = self.run(nobody, &args)?;
            if !out.status.success() {
                bail!(
                    "{args:?} failed on a read-only repository ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if args[0] == "snapshots" {
                let text = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    text.contains(&self.first[..12]) && text.contains(&self.second[..12]),
                    "snapshots does not list both snapshots:\n{text}"
                );
            }
        }
        ensure!(
            same_bytes(&restored, &self.path("d1.img"))?,
            "the restore from the read-only repository differs"
        );
        Ok(())
    }

    /// Runs the commands that must write; each must fail with `code`, naming the read-only
    /// repository.
    fn refuse_writes(&self, nobody: bool, extra: &[&str], code: i32) -> anyhow::Result<()> {
        let repo = self.repo();
        let repo = p(&repo);
        let disk = self.path("d.img");
        let commands: Vec<Vec<&str>> = vec![
            vec!["backup", repo, p(&disk), "--disk", "d"],
            vec!["forget", repo, &self.first],
            vec!["forget", repo, "--keep-last", "1"],
            vec!["prune", repo],
            vec!["index", "rebuild", repo],
            vec!["verify", repo, "latest"],
        ];
        for mut args in commands {
            args.extend_from_slice(extra);
            let out = self.run(nobody, &args)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.code() == Some(code),
                "{args:?} on a read-only repository: expected exit {code}, got {}:\n{stderr}",
                out.status
            );
            ensure!(
                stderr.contains("read-only"),
                "{args:?}: the refusal does not say the repository is read-only:\n{stderr}"
            );
        }
        Ok(())
    }
}

fn backup(repo: &Path, disk: &Path) -> anyhow::Result<String> {
    let out = sv_ok(&["backup", p(repo), p(disk), "--disk", "d", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["snapshot_id"]
        .as_str()
        .map(str::to_owned)
        .context("backup report without snapshot_id")
}

/// `setpriv` (util-linux); its absence fails the test (there is no other way to drop root).
fn setpriv() -> anyhow::Result<&'static str> {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let candidate = format!("{dir}/setpriv");
        if Path::new(&candidate).exists() {
            return Ok(Box::leak(candidate.into_boxed_str()));
        }
    }
    bail!("setpriv not found: install util-linux (the read-only tests run as an unprivileged user)")
}

/// Every entry under `root` (the root included) with its size, mode and mtime.
fn tree(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, (u64, u32, i64, i64)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let m = fs::symlink_metadata(&path)?;
        if m.is_dir() {
            for e in fs::read_dir(&path)? {
                stack.push(e?.path());
            }
        }
        out.insert(path, (m.len(), m.mode(), m.mtime(), m.mtime_nsec()));
    }
    Ok(out)
}

/// `chmod -R a-w`.
fn make_read_only(root: &Path) -> anyhow::Result<()> {
    let status = Command::new("chmod")
        .args(["-R", "a-w"])
        .arg(root)
        .status()?;
    ensure!(status.success(), "chmod -R a-w failed");
    Ok(())
}

/// Undoes [`make_read_only`] so the temporary directory can be removed.
fn make_writable(root: &Path) {
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(root).status();
}

/// The index copies (`<repo id>/index-<state>.sqlite`) of the per-user cache under
/// `cache_root`.
fn cached_indexes(cache_root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let base = cache_root.join("stackvault");
    if !base.exists() {
        return Ok(out);
    }
    for repo in fs::read_dir(base)? {
        for e in fs::read_dir(repo?.path())? {
            let path = e?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with("index-") && n.ends_with(".sqlite")) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[test]
fn an_unprivileged_user_reads_a_read_only_repository_and_writes_nothing() -> anyhow::Result<()> {
    let s = Setup::new()?;
    let repo = s.repo();
    make_read_only(&repo)?;
    let before = tree(&repo)?;
    let result = (|| {
        s.read_everything(true, &[])?;
        s.refuse_writes(true, &[], 1)
    })();
    let after = tree(&repo)?;
    make_writable(&repo);
    result?;
    ensure!(before == after, "the read-only repository changed");
    Ok(())
}

#[test]
fn a_missing_or_stale_index_is_rebuilt_in_the_users_cache() -> anyhow::Result<()> {
    let s = Setup::new()?;
    let repo = s.repo();
    // Stale: the index as it was before the second backup (and no log beside it).
    let old = s.path("index-after-first");
    fs::copy(repo.join("index.sqlite"), &old)?;
    let conn = rusqlite::Connection::open(&old)?;
    conn.execute("DELETE FROM snapshots WHERE id = ?1", [&s.second])?;
    drop(conn);
    fs::rename(&old, repo.join("index.sqlite"))?;
    make_read_only(&repo)?;
    let before = tree(&repo)?;
    let stale = s.read_everything(true, &[]);
    let after_stale = tree(&repo)?;
    let cached_stale = cached_indexes(&s.path("cache"));
    // Missing: no index at all; the cache comes from `$HOME/.cache` without XDG_CACHE_HOME.
    make_writable(&repo);
    fs::remove_file(repo.join("index.sqlite"))?;
    make_read_only(&repo)?;
    let before_missing = tree(&repo)?;
    let missing = (|| {
        let out = Command::new(setpriv()?)
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(&s.bin)
            .args(["snapshots", p(&repo)])
            .envs(stackvault_tests::test_env())
            .env_remove("XDG_CACHE_HOME")
            .env("HOME", s.path("home"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(&s.second[..12]),
            "snapshots without an index: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })();
    let after = tree(&repo)?;
    make_writable(&repo);
    stale?;
    missing?;
    ensure!(before == after_stale, "the read-only repository changed");
    ensure!(before_missing == after, "the read-only repository changed");
    ensure!(
        cached_stale?.len() == 1,
        "no index copy in $XDG_CACHE_HOME/stackvault/<repo id>/"
    );
    ensure!(
        cached_indexes(&s.path("home/.cache"))?.len() == 1,
        "no index in $HOME/.cache/stackvault/<repo id>/"
    );
    Ok(())
}

#[test]
fn the_read_only_flag_reads_a_writable_repository_and_writes_nothing() -> anyhow::Result<()> {
    let s = Setup::new()?;
    let repo = s.repo();
    let before = tree(&repo)?;
    s.read_everything(false, &["--read-only"])?;
    // Asked for explicitly, a refused write is a usage error.
    s.refuse_writes(false, &["--read-only"], 2)?;
    ensure!(before == tree(&repo)?, "--read-only changed the repository");
    Ok(())
}
