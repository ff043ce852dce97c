//! `serve --vm NAME SNAPSHOT`: every disk of a VM snapshot as one named export. nbdinfo
//! `--list` shows every disk by its name within the VM, `latest` is the newest VM snapshot,
//! and `qemu-img convert` of each export is byte-identical with `restore-vm --format raw`.

use anyhow::Context as _;
use stackvault_tests::{
    make_disk, p, qemu_img, same_bytes, scribble_disk, sv, sv_json_ok, Fixture,
};

use crate::nbd_support::{nbdinfo, skip_without_clients, Served};

const MIB: u64 = 1 << 20;
const DISKS: [&str; 3] = ["os", "data1", "data2"];

#[test]
fn serve_vm_exports_every_disk_of_the_latest_vm_snapshot() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let repo = f.repo();
    let mut disks = Vec::new();
    for (i, name) in DISKS.iter().enumerate() {
        let path = f.path(&format!("erp-{name}.img"));
        make_disk(&path, (4 + 3 * i as u64) * MIB, 40 + 11 * i)?;
        disks.push((name.to_string(), path));
    }
    let specs: Vec<String> = disks
        .iter()
        .map(|(n, path)| format!("{n}={}", p(path)))
        .collect();
    let mut backup = vec!["-r", p(&repo), "backup-vm", "--vm", "erp"];
    backup.extend(specs.iter().map(String::as_str));
    let first = sv_json_ok(&backup)?;
    // Change every disk, so that `latest` must pick the second VM snapshot to match.
    for (i, (_, path)) in disks.iter().enumerate() {
        scribble_disk(path, 40, 900 + i)?;
    }
    let second = sv_json_ok(&backup)?;
    let latest_id = second["vm_snapshot_id"].as_str().context("vm id")?;
    assert_ne!(first["vm_snapshot_id"], second["vm_snapshot_id"]);

    let served = Served::start(&repo, &f.path("erp.sock"), &["--vm", "erp", "latest"])?;
    assert_eq!(served.ready["vm_snapshot_id"], latest_id);

    // NBD_OPT_LIST: the three disks by their names within the VM.
    let list: serde_json::Value = serde_json::from_str(&nbdinfo(&[
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", p(&served.socket)),
    ])?)?;
    let mut names: Vec<&str> = list["exports"]
        .as_array()
        .context("exports")?
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    names.sort_unstable();
    let mut want = DISKS.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "nbdinfo --list: {list}");

    let restored = f.path("restored");
    sv_json_ok(&[
        "-r",
        p(&repo),
        "restore-vm",
        "--vm",
        "erp",
        "latest",
        p(&restored),
        "--format",
        "raw",
    ])?;
    for (name, path) in &disks {
        let copy = f.path(&format!("nbd-{name}.img"));
        qemu_img(&["convert", "-O", "raw", &served.uri(name)?, p(&copy)])?;
        assert!(
            same_bytes(&copy, &restored.join(format!("{name}.img")))?,
            "export {name} differs from restore-vm"
        );
        assert!(
            same_bytes(&copy, path)?,
            "export {name} differs from the disk"
        );
    }
    let (code, stopped, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stopped["event"], "stopped");

    // --vm and --disk together are a usage error; an unknown VM names what to do.
    let out = sv(&[
        "-r",
        p(&repo),
        "serve",
        "--vm",
        "erp",
        "--disk",
        "os",
        "latest",
        "--nbd",
        "unix:/tmp/x",
    ])?;
    assert_eq!(out.status.code(), Some(2));
    let out = sv(&[
        "-r",
        p(&repo),
        "serve",
        "--vm",
        "nosuchvm",
        "latest",
        "--nbd",
        &format!("unix:{}", p(&f.path("none.sock"))),
    ])?;
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm-snapshots"), "{err}");
    Ok(())
}
