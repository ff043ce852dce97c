//! Requests per MiB written to a page blob for a realistic disk: an ext4 file system made by
//! `mke2fs -d` from real files of this machine (files laid out contiguously, metadata in a
//! few places, the rest never written), restored to an Azurite page blob and synced to a
//! standby blob in full. A page blob accepts about 500 requests/s and 60 MiB/s; at most one
//! Put Page per MiB of data leaves the request rate far below its target when the bandwidth
//! is used up (`docs/pageblobs.md`, "Requests per MiB"). The synthetic layouts of
//! `azure::page_blob_restore_coalesces_runs_of_every_shape` pin the exact request counts; this
//! pins the ratio on a disk shaped like a VM's.

use std::path::Path;
use std::process::Command;

use stackvault_tests::{p, skip_for, sv_json, Fixture};

use crate::standby_pageblob::Standby;

const MIB: u64 = 1 << 20;

/// Copies regular files of `/usr/lib` and `/usr/share` (sorted walk) into `dir` until `budget`
/// bytes; returns the bytes copied.
fn copy_real_files(dir: &Path, budget: u64) -> anyhow::Result<u64> {
    let mut copied = 0u64;
    let mut stack = vec![
        std::path::PathBuf::from("/usr/lib"),
        std::path::PathBuf::from("/usr/share"),
    ];
    let mut n = 0u64;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries.into_iter().rev() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let len = e.metadata().map_or(0, |m| m.len());
                if len == 0 || len > 4 * MIB || copied + len > budget {
                    continue;
                }
                if std::fs::copy(e.path(), dir.join(format!("f{n:06}"))).is_ok() {
                    copied += len;
                    n += 1;
                }
            }
        }
        if copied + 64 * 1024 > budget {
            break;
        }
    }
    Ok(copied)
}

/// Requests per MiB of data written, from a report's `requests` and `written_bytes`.
fn per_mib(report: &serde_json::Value) -> anyhow::Result<f64> {
    let requests = report["requests"].as_u64();
    let written = report["written_bytes"].as_u64();
    match (requests, written) {
        (Some(r), Some(w)) if w >= MIB => Ok(r as f64 / (w as f64 / MIB as f64)),
        _ => anyhow::bail!("no requests or too little written: {report:#}"),
    }
}

#[test]
fn a_file_system_disk_costs_at_most_one_request_per_mib_written() -> anyhow::Result<()> {
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .into_iter()
        .find(|m| Path::new(m).exists());
    if skip_for(
        mke2fs
            .is_none()
            .then(|| "mke2fs (apt-get install e2fsprogs)".into()),
    ) {
        return Ok(());
    }
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let f = Fixture::new()?;
    let tree = f.path("tree");
    std::fs::create_dir(&tree)?;
    let copied = copy_real_files(&tree, 40 * MIB)?;
    anyhow::ensure!(copied > 24 * MIB, "only {copied} bytes of files to copy");
    let disk = f.path("fs.img");
    let made = Command::new(mke2fs.unwrap_or("mke2fs"))
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("96M")
        .output()?;
    anyhow::ensure!(
        made.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let snapshot = f.backup(&disk, "vm")?;
    let repo = f.repo();
    let repo = p(&repo);

    let (code, restored, stderr) = sv_json(&["restore", repo, &snapshot, &az.url("restored.vhd")])?;
    anyhow::ensure!(code == Some(0), "restore: {stderr}");
    let (code, synced, stderr) = sv_json(&[
        "standby",
        "sync",
        "-r",
        repo,
        "--disk",
        "vm",
        &az.url("standby.vhd"),
    ])?;
    anyhow::ensure!(code == Some(0), "standby sync: {stderr}");
    for (what, report) in [("restore", &restored), ("standby sync", &synced)] {
        let ratio = per_mib(report)?;
        eprintln!(
            "{what}: {} requests for {} bytes of data: {ratio:.3} per MiB",
            report["requests"], report["written_bytes"]
        );
        assert!(
            ratio <= 1.0,
            "{what} sent {ratio:.2} requests per MiB of data (at most 1): {report:#}"
        );
    }
    Ok(())
}
