//! VM snapshots (`backup-vm`, `vm-snapshots`, `restore-vm`, retention as a unit): a VM of
//! three disks, backed up in parallel through the CLI, restored byte for byte; a kill before
//! the VM record leaves no VM snapshot; `forget` keeps or removes a VM's disks together.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde_json::Value;
use stackvault_tests::{
    make_disk, p, same_bytes, scribble_disk, sv, sv_env, sv_json, sv_ok, Fixture,
};

const MIB: u64 = 1024 * 1024;
const DISKS: [&str; 3] = ["os", "data1", "data2"];

/// Makes the three disks of VM `erp` (different sizes and contents).
fn make_vm(f: &Fixture) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (i, name) in DISKS.iter().enumerate() {
        let path = f.path(&format!("erp-{name}.img"));
        make_disk(&path, (6 + 2 * i as u64) * MIB, 300 + 17 * i)?;
        out.push((name.to_string(), path));
    }
    Ok(out)
}

fn disk_args(disks: &[(String, PathBuf)]) -> Vec<String> {
    disks
        .iter()
        .map(|(n, path)| format!("{n}={}", p(path)))
        .collect()
}

/// Runs `backup-vm --vm erp` with `--json`; returns its report.
fn backup_vm(f: &Fixture, disks: &[(String, PathBuf)]) -> anyhow::Result<Value> {
    let repo = f.repo();
    let specs = disk_args(disks);
    let mut args = vec!["-r", p(&repo), "backup-vm", "--vm", "erp"];
    args.extend(specs.iter().map(String::as_str));
    let (code, v, stderr) = sv_json(&args)?;
    if code != Some(0) {
        bail!("backup-vm failed: {stderr}");
    }
    Ok(v)
}

fn vm_snapshots(repo: &Path) -> anyhow::Result<Vec<Value>> {
    let (code, v, stderr) = sv_json(&["-r", p(repo), "vm-snapshots", "--vm", "erp"])?;
    if code != Some(0) {
        bail!("vm-snapshots failed: {stderr}");
    }
    Ok(v["vm_snapshots"]
        .as_array()
        .context("vm_snapshots list")?
        .clone())
}

/// The disk snapshot ids of a `backup-vm` report, by disk name within the VM.
fn snapshot_of(report: &Value, repo_disk: &str) -> anyhow::Result<String> {
    report["disks"]
        .as_array()
        .context("disks")?
        .iter()
        .find(|d| d["disk"] == repo_disk)
        .and_then(|d| d["snapshot_id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no disk {repo_disk} in {report}"))
}

fn all_snapshot_ids(repo: &Path) -> anyhow::Result<Vec<String>> {
    stackvault_tests::snapshot_ids(repo)
}

#[test]
fn backup_vm_twice_lists_and_restores_every_disk() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disks = make_vm(&f)?;
    let first = backup_vm(&f, &disks)?;
    assert_eq!(first["consistency"], "per-disk", "{first}");
    for (name, _) in &disks {
        let d = first["disks"]
            .as_array()
            .context("disks")?
            .iter()
            .find(|d| d["disk"] == format!("erp:{name}"))
            .with_context(|| format!("disk {name} missing: {first}"))?;
        assert_eq!(d["kind"], "full");
    }
    for (i, (_, path)) in disks.iter().enumerate() {
        scribble_disk(path, 3, 40 + i)?;
    }
    let second = backup_vm(&f, &disks)?;
    for (name, path) in &disks {
        let repo_disk = format!("erp:{name}");
        let d = second["disks"]
            .as_array()
            .context("disks")?
            .iter()
            .find(|d| d["disk"] == repo_disk)
            .context("disk in second report")?;
        // Incremental per disk: the parent is that disk's snapshot of the first VM backup,
        // and only the scribbled data is new.
        assert_eq!(d["kind"], "incremental", "{d}");
        assert_eq!(
            d["parent"].as_str(),
            Some(snapshot_of(&first, &repo_disk)?.as_str())
        );
        let added = d["stats"]["bytes_added"].as_u64().context("bytes_added")?;
        let size = fs::metadata(path)?.len();
        assert!(
            added < size / 4,
            "{repo_disk}: {added} of {size} bytes added"
        );
    }

    let listed = vm_snapshots(&repo)?;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let newest = &listed[1];
    assert_eq!(newest["id"], second["vm_snapshot_id"]);
    assert_eq!(newest["vm"], "erp");
    assert_eq!(newest["complete"], true);
    assert_eq!(newest["consistency"], "per-disk");
    assert!(newest["read_window_ms"].is_u64());
    let listed_disks = newest["disks"].as_array().context("disks")?;
    let names: Vec<&str> = listed_disks
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["data1", "data2", "os"]);
    for d in listed_disks {
        let repo_disk = d["disk"].as_str().context("disk")?;
        assert_eq!(
            d["snapshot_id"].as_str(),
            Some(snapshot_of(&second, repo_disk)?.as_str())
        );
        assert_eq!(d["root_digest"].as_str().map(str::len), Some(64));
        assert!(d["read_started"].as_str() <= d["read_finished"].as_str());
    }

    // `latest`, raw: every disk byte for byte.
    let out = f.path("restored-raw");
    let (code, report, stderr) = sv_json(&[
        "-r",
        p(&repo),
        "restore-vm",
        "--vm",
        "erp",
        "latest",
        p(&out),
        "--format",
        "raw",
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["vm_snapshot_id"], second["vm_snapshot_id"]);
    for (name, path) in &disks {
        let restored = out.join(format!("{name}.img"));
        assert!(
            same_bytes(&restored, path)?,
            "{name} differs after restore-vm"
        );
    }
    // The older VM snapshot by id prefix, as fixed VHDs (the default): the disk, zeros to a
    // whole MiB, then the VHD footer.
    let older = first["vm_snapshot_id"].as_str().context("id")?;
    let out = f.path("restored-vhd");
    sv_ok(&[
        "-r",
        p(&repo),
        "restore-vm",
        "--vm",
        "erp",
        &older[..12],
        p(&out),
    ])?;
    for (name, _) in &disks {
        let vhd = fs::read(out.join(format!("{name}.vhd")))?;
        let footer = vhd
            .len()
            .checked_sub(512)
            .context("VHD shorter than a footer")?;
        assert_eq!(&vhd[footer..footer + 8], b"conectix", "{name}");
        assert_eq!(
            footer as u64 % MIB,
            0,
            "{name}: not rounded up to a whole MiB"
        );
    }
    Ok(())
}

#[test]
fn kill_before_the_vm_record_leaves_no_vm_snapshot() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disks = make_vm(&f)?;
    let specs = disk_args(&disks);
    let mut args = vec!["-r", p(&repo), "backup-vm", "--vm", "erp"];
    args.extend(specs.iter().map(String::as_str));
    let out = sv_env(&args, &[("STACKVAULT_CRASH_AT", "vm-disks-stored")])?;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "backup-vm was not killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        vm_snapshots(&repo)?.is_empty(),
        "a VM snapshot survived the kill"
    );
    // The disk manifests were durable: they are ordinary disk snapshots now.
    assert_eq!(all_snapshot_ids(&repo)?.len(), 3);
    let (code, check, stderr) = sv_json(&["-r", p(&repo), "check"])?;
    assert_eq!(code, Some(0), "check after the kill: {stderr} {check}");
    let latest = sv(&[
        "-r",
        p(&repo),
        "restore-vm",
        "--vm",
        "erp",
        "latest",
        p(&f.path("x")),
    ])?;
    assert!(
        !latest.status.success(),
        "restore-vm latest found a VM snapshot"
    );
    // The next VM backup completes, incremental on the snapshots the killed one left.
    let report = backup_vm(&f, &disks)?;
    assert_eq!(vm_snapshots(&repo)?.len(), 1);
    for d in report["disks"].as_array().context("disks")? {
        assert_eq!(d["kind"], "incremental", "{d}");
    }
    Ok(())
}

#[test]
fn forget_keeps_or_removes_a_vm_snapshot_as_a_unit() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let disks = make_vm(&f)?;
    let first = backup_vm(&f, &disks)?;
    // A later, ordinary snapshot of one VM disk: a per-disk policy would keep it and drop
    // that disk's VM snapshot, breaking the unit.
    let (_, os) = &disks[2];
    scribble_disk(os, 2, 9)?;
    let (code, lone, stderr) = sv_json(&["-r", p(&repo), "backup", p(os), "--disk", "erp:os"])?;
    assert_eq!(code, Some(0), "{stderr}");
    let lone = lone["snapshot_id"].as_str().context("id")?.to_string();
    for (i, (_, path)) in disks.iter().enumerate() {
        scribble_disk(path, 2, 70 + i)?;
    }
    let second = backup_vm(&f, &disks)?;

    // A disk snapshot of a kept VM snapshot cannot be forgotten alone.
    let member = snapshot_of(&second, "erp:data1")?;
    let refused = sv(&["-r", p(&repo), "forget", &member])?;
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("belongs to VM snapshot") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(all_snapshot_ids(&repo)?.len(), 7);

    // keep-last 1 decides per VM: the whole first VM snapshot goes, the second stays whole;
    // the lone disk snapshot is decided as its disk's own history (kept as its newest).
    let (code, report, stderr) = sv_json(&["-r", p(&repo), "forget", "--keep-last", "1"])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        report["vm_snapshots_removed"],
        serde_json::json!([first["vm_snapshot_id"]])
    );
    let left = all_snapshot_ids(&repo)?;
    for (name, _) in &disks {
        let repo_disk = format!("erp:{name}");
        assert!(
            !left.contains(&snapshot_of(&first, &repo_disk)?),
            "{repo_disk} of the first VM snapshot kept"
        );
        assert!(
            left.contains(&snapshot_of(&second, &repo_disk)?),
            "{repo_disk} of the second VM snapshot removed"
        );
    }
    assert!(left.contains(&lone));
    assert_eq!(left.len(), 4);
    let listed = vm_snapshots(&repo)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], second["vm_snapshot_id"]);

    // --force forgets the disk snapshot and drops its VM snapshot; the other disks stay.
    sv_ok(&["-r", p(&repo), "forget", "--force", &member])?;
    assert!(vm_snapshots(&repo)?.is_empty());
    let left = all_snapshot_ids(&repo)?;
    assert_eq!(left.len(), 3);
    assert!(left.contains(&snapshot_of(&second, "erp:os")?));
    Ok(())
}
