//! Repository locks between real processes: liveness comes from the holder's OS file lock,
//! so a killed holder's lock is reclaimed at once, a live holder is never displaced whatever
//! its lock file says, two maintainers never run together (also while both clean up an
//! abandoned lock), backups and maintenance exclude each other, and a lock of another host is
//! refused with what to do. Holders are this test binary started again as a helper
//! ([`lock_holder`]), so each lock really belongs to another process.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use stackvault::lock::{acquire_maintenance, acquire_writer, LOCKS_DIR, MAINTENANCE_LOCK};
use stackvault_tests::{make_disk, p, Fixture};

const ROLE: &str = "STACKVAULT_TEST_LOCK_ROLE";
const REPO: &str = "STACKVAULT_TEST_LOCK_REPO";
const ROUNDS: &str = "STACKVAULT_TEST_LOCK_ROUNDS";
const MARKERS: &str = "STACKVAULT_TEST_LOCK_MARKERS";
const ABANDONED_PID: &str = "STACKVAULT_TEST_ABANDONED_PID";

/// Not a test: the body of the helper processes the tests below start (it does nothing unless
/// started by them). Roles: `maintenance` / `writer` take that lock, print `LOCK HELD` and
/// wait to be killed; `race-maintenance` / `race-writer` take and release the lock
/// `ROUNDS` times, checking the markers of the others while they hold it.
#[test]
#[ignore = "helper process of the lock tests, started by them"]
fn lock_holder() -> anyhow::Result<()> {
    let (Ok(role), Ok(repo)) = (std::env::var(ROLE), std::env::var(REPO)) else {
        return Ok(());
    };
    let repo = PathBuf::from(repo);
    match role.as_str() {
        "maintenance" | "writer" => {
            let _guard = if role == "writer" {
                acquire_writer(&repo, "backup")?
            } else {
                acquire_maintenance(&repo, "prune")?
            };
            println!("LOCK HELD");
            std::thread::sleep(Duration::from_secs(120));
            Ok(())
        }
        "race-maintenance" | "race-writer" => race(&role, &repo),
        other => bail!("unknown role {other}"),
    }
}

/// One racer: `ROUNDS` times take the lock (retrying until it is free), then, holding it,
/// put a marker in `MARKERS` and check that nobody it excludes holds one. A maintainer that
/// released leaves an abandoned maintenance lock behind (the state a killed maintainer
/// leaves), so every round starts with racing to clean up after a dead holder. The abandoned
/// lock names `ABANDONED_PID`, a live process (the test runner): pids are reused, and a lock
/// is abandoned whatever its pid now belongs to.
fn race(role: &str, repo: &Path) -> anyhow::Result<()> {
    let rounds: u32 = std::env::var(ROUNDS)?.parse()?;
    let markers = PathBuf::from(std::env::var(MARKERS)?);
    let abandoned_pid: u32 = std::env::var(ABANDONED_PID)?.parse()?;
    let maintainer = role == "race-maintenance";
    let me = format!(
        "{}-{}",
        if maintainer { "m" } else { "w" },
        std::process::id()
    );
    let mut done = 0;
    let mut progress = std::time::Instant::now();
    while done < rounds {
        ensure!(
            progress.elapsed() < Duration::from_secs(30),
            "{role}: no lock for 30 s after {done} rounds"
        );
        let guard = if maintainer {
            acquire_maintenance(repo, "prune")
        } else {
            acquire_writer(repo, "backup")
        };
        let Ok(guard) = guard else {
            std::thread::yield_now();
            continue;
        };
        let mine = markers.join(&me);
        fs::write(&mine, b"")?;
        for e in fs::read_dir(&markers)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let excluded = name != me && (maintainer || name.starts_with("m-"));
            if excluded {
                println!("VIOLATION: {me} and {name} held locks at the same time");
            }
        }
        std::thread::sleep(Duration::from_micros(200));
        fs::remove_file(&mine)?;
        drop(guard);
        progress = std::time::Instant::now();
        if maintainer {
            plant_lock(
                repo,
                MAINTENANCE_LOCK,
                "maintenance",
                &hostname(),
                abandoned_pid,
            )?;
        }
        done += 1;
    }
    println!("ROUNDS DONE {done}");
    Ok(())
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Writes a lock file nobody holds, as a holder that died (or one on another host) leaves
/// it; keeps an existing file of that name.
fn plant_lock(repo: &Path, name: &str, kind: &str, host: &str, pid: u32) -> anyhow::Result<()> {
    let dir = repo.join(LOCKS_DIR);
    let tmp = dir.join(format!(".tmp-planted-{}", std::process::id()));
    let body = serde_json::json!({
        "kind": kind, "purpose": "prune", "host": host, "pid": pid,
        "time": "2026-01-01T00:00:00.000000Z",
    });
    fs::write(&tmp, body.to_string())?;
    let linked = fs::hard_link(&tmp, dir.join(name));
    fs::remove_file(&tmp)?;
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e.into()),
        _ => Ok(()),
    }
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> anyhow::Result<u32> {
    let mut child = Command::new("true").spawn()?;
    let pid = child.id();
    child.wait()?;
    Ok(pid)
}

/// Starts this binary again as a helper with `role` on `repo`.
fn helper(role: &str, repo: &Path, extra: &[(&str, String)]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "locks::lock_holder",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .env(REPO, repo)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Ok(cmd.spawn()?)
}

/// A helper holding the lock of `role` until killed.
struct Holder(Child);

impl Holder {
    fn start(role: &str, repo: &Path) -> anyhow::Result<Holder> {
        let mut child = helper(role, repo, &[])?;
        let stdout = child.stdout.take().context("helper stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        loop {
            match lines.next() {
                Some(line) => {
                    let line = line?;
                    if line.contains("LOCK HELD") {
                        return Ok(Holder(child));
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                None => {
                    let _ = child.wait();
                    bail!("helper {role} did not take its lock:\n{seen}");
                }
            }
        }
    }

    fn kill(mut self) -> anyhow::Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the CLI with notices on (no `--quiet`); returns (exit code, stderr).
fn sv_loud(args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let out = stackvault_tests::sv_command().args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn lock_files(repo: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(repo.join(LOCKS_DIR))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// Rewrites every lock file in `repo` to claim a pid that is dead: liveness must not come
/// from what the file says.
fn falsify_pids(repo: &Path) -> anyhow::Result<()> {
    let dead = dead_pid()?;
    for name in lock_files(repo)? {
        let path = repo.join(LOCKS_DIR).join(&name);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
        v["pid"] = dead.into();
        v["pid_start"] = 1.into();
        // In place: the holder's open file (and its lock) stays the same.
        fs::write(&path, v.to_string())?;
    }
    Ok(())
}

#[test]
fn a_killed_holders_lock_is_reclaimed_at_once_without_guessing() -> anyhow::Result<()> {
    for role in ["maintenance", "writer"] {
        let f = Fixture::new()?;
        let repo = f.repo();
        let holder = Holder::start(role, &repo)?;
        holder.kill()?;
        ensure!(
            !lock_files(&repo)?.is_empty(),
            "the killed {role} left no lock"
        );
        // Maintenance needs both kinds gone: it is refused by a live writer and a maintainer.
        let (code, stderr) = sv_loud(&["index", "rebuild", p(&repo)])?;
        ensure!(code == Some(0), "rebuild after a killed {role}: {stderr}");
        ensure!(
            !stderr.contains("no longer exists") && !stderr.contains("different process"),
            "the reclaim guessed from pids: {stderr}"
        );
        ensure!(
            lock_files(&repo)?.is_empty(),
            "locks left: {:?}",
            lock_files(&repo)?
        );
    }
    Ok(())
}

#[test]
fn a_live_holder_is_never_displaced_whatever_its_file_says() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    make_disk(&disk, 1 << 20, 3)?;
    {
        let _maintainer = Holder::start("maintenance", &repo)?;
        falsify_pids(&repo)?;
        let (code, stderr) = sv_loud(&["backup", p(&repo), p(&disk), "--disk", "d"])?;
        ensure!(code == Some(1), "backup beside a live maintainer: {stderr}");
        ensure!(stderr.contains("maintenance is"), "{stderr}");
        let (code, stderr) = sv_loud(&["prune", p(&repo)])?;
        ensure!(code == Some(1), "prune beside a live maintainer: {stderr}");
        ensure!(lock_files(&repo)?.len() == 1, "{:?}", lock_files(&repo)?);
    }
    {
        let _writer = Holder::start("writer", &repo)?;
        falsify_pids(&repo)?;
        let (code, stderr) = sv_loud(&["index", "rebuild", p(&repo)])?;
        ensure!(code == Some(1), "rebuild beside a live backup: {stderr}");
        ensure!(stderr.contains("being written"), "{stderr}");
        ensure!(lock_files(&repo)?.len() == 1, "{:?}", lock_files(&repo)?);
    }
    Ok(())
}

#[test]
fn maintainers_and_writers_racing_never_overlap() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let markers = f.path("markers");
    fs::create_dir(&markers)?;
    let env = [
        (ROUNDS, "200".to_string()),
        (MARKERS, p(&markers).to_string()),
        (ABANDONED_PID, std::process::id().to_string()),
    ];
    let racers = [
        helper("race-maintenance", &repo, &env)?,
        helper("race-maintenance", &repo, &env)?,
        helper("race-maintenance", &repo, &env)?,
        helper("race-maintenance", &repo, &env)?,
        helper("race-writer", &repo, &env)?,
    ];
    let mut report = String::new();
    let mut failed = false;
    for racer in racers {
        let out = racer.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        failed |= !out.status.success() || text.contains("VIOLATION") || !text.contains("DONE");
        report.push_str(&text);
    }
    ensure!(!failed, "racers overlapped or failed:\n{report}");
    Ok(())
}

#[test]
fn a_lock_of_another_host_is_refused_with_what_to_do() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    make_disk(&disk, 1 << 20, 4)?;
    // Another host's backup is (or was) running: its file lock is invisible from here.
    plant_lock(
        &repo,
        "backup-77-00.lock",
        "backup",
        "elsewhere.invalid",
        77,
    )?;
    for args in [
        vec!["backup", p(&repo), p(&disk), "--disk", "d"],
        vec!["index", "rebuild", p(&repo)],
    ] {
        let (code, stderr) = sv_loud(&args)?;
        ensure!(code == Some(1), "{args:?} beside another host: {stderr}");
        ensure!(
            stderr.contains("elsewhere.invalid") && stderr.contains("backup-77-00.lock"),
            "{args:?}: the message names neither the host nor the file: {stderr}"
        );
    }
    ensure!(lock_files(&repo)? == ["backup-77-00.lock"]);
    Ok(())
}
