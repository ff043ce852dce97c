//! Helpers shared by the integration suite and benches: sample disks built from real files on
//! this machine, the `stackvault` binary, temporary repositories.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

/// Path of the `stackvault` binary of this build, building it first if needed.
pub fn stackvault_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/main-xxxx -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "stackvault-cli",
            "--bin",
            "stackvault",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo build for the stackvault binary");
        assert!(status.success(), "building the stackvault binary failed");
        profile_dir.join("stackvault")
    })
}

/// Regular files of /usr/bin, sorted by name (the raw material of sample disks).
fn usr_bin_files() -> &'static [PathBuf] {
    static FILES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    FILES.get_or_init(|| {
        let mut files: Vec<PathBuf> = fs::read_dir("/usr/bin")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    })
}

/// Writes a sample disk of exactly `size` bytes at `path`: /usr/bin binaries concatenated
/// (starting at the `seed`-th file, so different seeds give mostly different content) with a
/// 256 KiB zero gap after every file, as unallocated space on a real disk. Deterministic.
pub fn make_disk(path: &Path, size: u64, seed: usize) -> anyhow::Result<()> {
    let files = usr_bin_files();
    if files.is_empty() {
        bail!("no files in /usr/bin to build a sample disk from");
    }
    let mut out = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let zeros = vec![0u8; 256 * 1024];
    let mut written: u64 = 0;
    let mut i = seed;
    while written < size {
        let data = fs::read(&files[i % files.len()]).unwrap_or_default();
        i += 1;
        for part in [&data[..], &zeros[..]] {
            let n = (part.len() as u64).min(size - written) as usize;
            out.write_all(&part[..n])?;
            written += n as u64;
        }
    }
    out.sync_all()?;
    Ok(())
}

/// Overwrites `count` 64 KiB ranges of the disk at `path` with other real bytes, spread
/// deterministically: the next generation of a disk.
pub fn mutate_disk(path: &Path, count: u64, seed: usize) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    let files = usr_bin_files();
    let donor = fs::read(&files[(seed * 7 + 3) % files.len()]).unwrap_or_default();
    for k in 0..count {
        let at = (size / (count + 1)) * (k + 1) / 4096 * 4096;
        let mut block: Vec<u8> = donor
            .iter()
            .copied()
            .cycle()
            .skip(k as usize * 4096)
            .take(65536)
            .collect();
        block.resize(65536, 0xa5);
        f.write_all_at(&block[..(65536u64.min(size - at)) as usize], at)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Runs the CLI (quiet) and returns its output, whatever the exit status.
pub fn sv(args: &[&str]) -> anyhow::Result<Output> {
    sv_env(args, &[])
}

/// Runs the CLI (quiet) with extra environment variables.
pub fn sv_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(stackvault_bin());
    cmd.arg("--quiet").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .with_context(|| format!("run stackvault {args:?}"))
}

/// Runs the CLI and fails unless it exits 0; returns stdout.
pub fn sv_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = sv(args)?;
    if !out.status.success() {
        bail!(
            "stackvault {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the CLI with `--json` appended and parses its report.
pub fn sv_json(args: &[&str]) -> anyhow::Result<(Option<i32>, serde_json::Value, String)> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = sv(&all)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("stackvault {args:?} printed no JSON; stderr: {stderr}"))?;
    Ok((out.status.code(), v, stderr))
}

/// A path as `&str` (test paths are always UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap_or("<non-UTF-8 path>")
}

/// Whether two files have identical contents.
pub fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    Ok(fs::read(a)? == fs::read(b)?)
}

/// A temporary directory with a fresh repository in `repo/`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> anyhow::Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let f = Fixture { dir };
        sv_ok(&["init", p(&f.repo())])?;
        Ok(f)
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Builds a disk and backs it up; returns (disk path, snapshot id).
    pub fn backup_new_disk(
        &self,
        name: &str,
        size: u64,
        seed: usize,
    ) -> anyhow::Result<(PathBuf, String)> {
        let disk = self.path(&format!("{name}.img"));
        make_disk(&disk, size, seed)?;
        let id = self.backup(&disk, name)?;
        Ok((disk, id))
    }

    /// Backs up `disk` as `name`; returns the snapshot id.
    pub fn backup(&self, disk: &Path, name: &str) -> anyhow::Result<String> {
        let (code, v, stderr) = sv_json(&["backup", p(&self.repo()), p(disk), "--disk", name])?;
        if code != Some(0) {
            bail!("backup failed: {stderr}");
        }
        v["snapshot_id"]
            .as_str()
            .map(str::to_owned)
            .context("backup report without snapshot_id")
    }

    /// Restores `snapshot` and checks the result equals `disk` byte for byte.
    pub fn assert_restores(&self, snapshot: &str, disk: &Path) -> anyhow::Result<()> {
        let out = self.path(&format!("restored-{}.img", &snapshot[..12]));
        sv_ok(&["restore", p(&self.repo()), snapshot, p(&out), "--force"])?;
        if !same_file(&out, disk)? {
            bail!("restore of {snapshot} differs from {}", disk.display());
        }
        fs::remove_file(&out)?;
        Ok(())
    }
}
