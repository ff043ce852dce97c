//! Restores onto block devices: loop devices over sparse files stand in for `/dev/sdX`. The
//! device is written in place (its node stays a device), zero runs over old data read back
//! as zeros, bytes past the disk are left alone, a too-small device is refused before
//! anything is written, and `verify --target` checks the device.
//!
//! Loop devices need root and util-linux's `losetup`; where one cannot be made the tests
//! fail under `CI=true` and skip with a message otherwise.

use std::fs;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::Context as _;
use stackvault_tests::{in_ci, loop_device, mknod_like, p, sv, sv_json, sv_ok, Fixture, GARBAGE};

const MIB: u64 = 1 << 20;

fn read_range(path: &Path, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

#[test]
fn restore_onto_a_block_device_writes_in_place() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    // make_disk leaves a 256 KiB zero gap after every file, at unaligned offsets.
    let (disk, id) = f.backup_new_disk("vm", 24 * MIB, 5)?;
    let (_, v, _) = sv_json(&["show", p(&f.repo()), &id])?;
    let zero_bytes = v["stats"]["zero_bytes"].as_u64().unwrap_or(0);
    assert!(zero_bytes > MIB, "the disk has zero runs to restore: {v:#}");
    let Some(dev) = loop_device(&f.path("backing"), 32 * MIB, 32 * MIB)? else {
        return Ok(());
    };
    let dev_path = dev.dev.clone();

    // Without --force the device is left alone.
    let out = sv(&["restore", p(&f.repo()), &id, p(&dev_path)])?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(read_range(&dev_path, 0, 4096)?, vec![GARBAGE; 4096]);

    let (code, report, stderr) = sv_json(&["restore", p(&f.repo()), &id, p(&dev_path), "--force"])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["output_format"], "raw");
    let kind = fs::metadata(&dev_path)?.file_type();
    assert!(
        kind.is_block_device(),
        "{} was replaced by a file",
        dev_path.display()
    );
    assert!(
        !Path::new(&format!("{}.stackvault-partial", dev_path.display())).exists(),
        "no temporary file next to the device"
    );
    // The disk, zero runs included, then the device's own bytes past it, untouched.
    let restored = read_range(&dev_path, 0, 24 * MIB)?;
    assert!(
        restored == fs::read(&disk)?,
        "the device does not hold the disk"
    );
    assert_eq!(
        read_range(&dev_path, 24 * MIB, 8 * MIB)?,
        vec![GARBAGE; 8 * MIB as usize]
    );

    // verify --target reads the device (its tail past the disk is not the disk's).
    let (code, v, stderr) = sv_json(&["verify", p(&f.repo()), &id, "--target", p(&dev_path)])?;
    assert_eq!(code, Some(0), "{stderr} {v:#}");
    assert_eq!(v["outcome"], "ok", "{v:#}");
    // And sees a difference on the device.
    fs::OpenOptions::new()
        .write(true)
        .open(&dev_path)?
        .write_all_at(&[0x5a; 512], MIB)?;
    let (code, v, _) = sv_json(&["verify", p(&f.repo()), &id, "--target", p(&dev_path)])?;
    assert_eq!(code, Some(5), "{v:#}");
    assert_eq!(v["outcome"], "differs", "{v:#}");
    Ok(())
}

#[test]
fn a_block_device_smaller_than_the_disk_is_refused() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (_, id) = f.backup_new_disk("vm", 24 * MIB, 9)?;
    let Some(dev) = loop_device(&f.path("backing"), 8 * MIB, 8 * MIB)? else {
        return Ok(());
    };
    let out = sv(&["restore", p(&f.repo()), &id, p(&dev.dev), "--force"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&(8 * MIB).to_string()) && stderr.contains(&(24 * MIB).to_string()),
        "both sizes named: {stderr}"
    );
    assert!(fs::metadata(&dev.dev)?.file_type().is_block_device());
    assert_eq!(
        read_range(&dev.dev, 0, 8 * MIB)?,
        vec![GARBAGE; 8 * MIB as usize],
        "nothing written"
    );
    Ok(())
}

#[test]
fn a_character_device_is_written_in_place_and_gets_the_raw_disk() -> anyhow::Result<()> {
    // A character device has no size to check; a null device (a node of /dev/null made in
    // the test's directory) takes any disk.
    let f = Fixture::new()?;
    let (_, id) = f.backup_new_disk("vm", 4 * MIB, 2)?;
    let null = f.path("null");
    if let Err(e) = mknod_like(Path::new("/dev/null"), &null, "c") {
        if in_ci() {
            return Err(e);
        }
        eprintln!("SKIPPED: cannot make a device node ({e:#})");
        return Ok(());
    }
    let out = sv(&[
        "restore",
        p(&f.repo()),
        &id,
        p(&null),
        "--force",
        "--output-format",
        "vhd-fixed",
    ])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let (code, _, stderr) = sv_json(&["restore", p(&f.repo()), &id, p(&null), "--force"])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        fs::metadata(&null)?.file_type().is_char_device(),
        "the device node was replaced by a file"
    );
    sv_ok(&["check", p(&f.repo())])?;
    Ok(())
}
