//! Block device standby targets and their identity (`format-spec/standby.md`, "Block device"),
//! on loop devices: the record names the device by what stays when its number changes (here
//! the loop device's backing file), so a sync after "a reboot" (the same disk under another
//! device number) is incremental; and the record carries the device's size and the signature
//! of its first MiB, so a device that is not the one the record describes (another device given
//! the name, or the disk rewritten behind our back) is refused until `--full`.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};
use stackvault_tests::{
    loop_device, make_disk, mknod_like, p, same_bytes, scribble_disk, sv, sv_json, Fixture,
    LoopDevice,
};

const MIB: u64 = 1 << 20;

fn sync(repo: &Path, target: &Path, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["standby", "sync", "-r", p(repo), "--disk", "vm", p(target)];
    args.extend_from_slice(extra);
    let (code, v, stderr) = sv_json(&args)?;
    if code != Some(0) {
        bail!("standby sync failed ({code:?}): {stderr}");
    }
    Ok(v)
}

/// The device's first `len` bytes.
fn head(dev: &Path, len: u64) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    fs::File::open(dev)?.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// A second loop device over `backing` (another device number for the same disk).
fn attach_again(backing: &Path, node: &Path) -> anyhow::Result<LoopDevice> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .context("run losetup")?;
    anyhow::ensure!(out.status.success(), "losetup: {out:?}");
    let device = LoopDevice {
        loop_dev: String::from_utf8_lossy(&out.stdout).trim().into(),
        dev: node.to_path_buf(),
    };
    mknod_like(&device.loop_dev, node, "b")?;
    Ok(device)
}

#[test]
fn a_device_keeps_its_record_under_a_new_number_and_another_device_is_refused() -> anyhow::Result<()>
{
    let f = Fixture::new()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 16 * MIB, 31)?;
    f.backup(&disk, "vm")?;
    let backing = f.path("backing");
    let Some(first) = loop_device(&backing, 24 * MIB, 24 * MIB)? else {
        return Ok(());
    };
    let state = f.path("state");
    let sd = ["--state-dir", p(&state)];
    sync(&repo, &first.dev, &["--full", sd[0], sd[1]])?;
    let (code, st, stderr) = sv_json(&["standby", "status", p(&first.dev), sd[0], sd[1]])?;
    anyhow::ensure!(code == Some(0), "{stderr}");
    let record = &st["record"];
    assert!(
        record["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("loop-backing-file:")),
        "{st:#}"
    );
    assert_eq!(record["device_size"], 24 * MIB, "{st:#}");
    let signature = format!("blake3:{}", blake3::hash(&head(&first.dev, MIB)?).to_hex());
    assert_eq!(record["signature"], signature.as_str(), "{st:#}");

    // "After a reboot": the same disk under another device number; the old one is gone.
    let second = attach_again(&backing, &f.path("second.dev"))?;
    assert_ne!(
        fs::metadata(&first.dev)?.rdev(),
        fs::metadata(&second.dev)?.rdev()
    );
    drop(first);
    scribble_disk(&disk, 4, 12)?;
    f.backup(&disk, "vm")?;
    let r = sync(&repo, &second.dev, &sd)?;
    assert_eq!(r["mode"], "incremental", "{r:#}");
    assert_eq!(head(&second.dev, 16 * MIB)?, fs::read(&disk)?);

    // Another disk under this name: its first MiB is not what the last sync left there.
    fs::OpenOptions::new()
        .write(true)
        .open(&second.dev)?
        .write_all_at(&[0x5a; 4096], 0)?;
    let out = sv(&[
        "standby",
        "sync",
        "-r",
        p(&repo),
        "--disk",
        "vm",
        p(&second.dev),
        sd[0],
        sd[1],
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("does not describe this device"), "{stderr}");
    let (_, st, _) = sv_json(&["standby", "status", p(&second.dev), sd[0], sd[1]])?;
    assert_eq!(st["state"], "unknown", "{st:#}");
    assert!(st["notes"].to_string().contains("first MiB"), "{st:#}");
    let r = sync(&repo, &second.dev, &["--full", sd[0], sd[1]])?;
    assert_eq!(r["mode"], "full", "{r:#}");
    let copy = f.path("device-copy.img");
    fs::write(&copy, head(&second.dev, 16 * MIB)?)?;
    assert!(same_bytes(&copy, &disk)?);
    Ok(())
}
