//! VHD in and out, end to end through the CLI: qemu-img makes fixed and dynamic VHDs of a
//! disk built from real files, our own writer (tests/lib.rs) makes differencing chains, and
//! qemu-img checks what restore writes.

use std::path::Path;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use stackvault_tests::{
    have_qemu_img, outcome, p, qemu_img, skip_for, sv, sv_as_typed, sv_json_ok, vhd_unique_id,
    write_differencing_vhd, Disk, Fixture, Locators,
};

/// Not a multiple of 1 MiB, so fixed restores have something to round.
const DISK_SIZE: usize = (26 << 20) + 3 * 512;

/// True (after saying why) when qemu-img is missing outside CI; a failure under CI.
fn skip_without_qemu() -> bool {
    skip_for((!have_qemu_img()).then(|| {
        "qemu-img is not installed (apt-get install qemu-utils; .ci/setup.sh installs it)".into()
    }))
}

/// Whether `vhdiinfo` runs; outside CI its absence is said, under CI it is a failure.
fn have_vhdiinfo() -> bool {
    let present = std::process::Command::new("vhdiinfo")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    !skip_for((!present).then(|| {
        "vhdiinfo is not installed (apt-get install libvhdi-utils; .ci/setup.sh installs it)".into()
    }))
}

/// `vhdiinfo`'s "Media size" in bytes.
fn vhdiinfo_media_size(path: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("vhdiinfo").arg(path).output()?;
    ensure!(out.status.success(), "vhdiinfo {} failed", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Media size"))
        .context("vhdiinfo printed no media size")?;
    line.rsplit_once('(')
        .and_then(|(_, b)| b.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("vhdiinfo: {line}"))
}

/// The suite's [`Fixture`] with this module's steps: the sample disk as raw and VHDs, and
/// backups and restores that return their JSON reports.
struct VhdFixture(Fixture);

impl VhdFixture {
    fn new() -> anyhow::Result<Self> {
        Ok(VhdFixture(Fixture::new()?))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.path(name)
    }

    /// Writes the sample raw disk and qemu-img's fixed and dynamic VHDs of it.
    fn disks(&self) -> anyhow::Result<()> {
        let mut raw = Disk::sparse(DISK_SIZE as u64, 0).bytes()?;
        // The disk ends in zeros (from 25 MiB: its last, partial 2 MiB block is unallocated)
        // whatever /usr/bin holds. Where its files reached the end, that block was the VHD's
        // last, its padding past the disk's end lay between its data and the footer, so a
        // cut footer left all data in place (read with the copy at offset 0, not refused),
        // and a fixed VHD's zero padding rewrote the last chunk.
        if let Some(tail) = raw.get_mut(25 << 20..) {
            tail.fill(0);
        }
        std::fs::write(self.path("disk.raw"), raw)?;
        for sub in ["fixed", "dynamic"] {
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                &format!("subformat={sub},force_size=on"),
                &self.path("disk.raw").to_string_lossy(),
                &self.path(&format!("disk.{sub}.vhd")).to_string_lossy(),
            ])?;
        }
        Ok(())
    }

    fn backup(&self, source: &str, extra: &[&str]) -> anyhow::Result<Value> {
        let (repo, source) = (self.path("repo"), self.path(source));
        let mut args = vec!["backup", p(&repo), p(&source), "--disk", "d1"];
        args.extend_from_slice(extra);
        sv_json_ok(&args)
    }

    fn restore(&self, snapshot: &str, out: &str, extra: &[&str]) -> anyhow::Result<Value> {
        let (repo, out) = (self.path("repo"), self.path(out));
        let mut args = vec!["restore", p(&repo), snapshot, p(&out)];
        args.extend_from_slice(extra);
        sv_json_ok(&args)
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn vsize(path: &Path) -> anyhow::Result<u64> {
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        "vpc",
        "--output=json",
        &path.to_string_lossy(),
    ])?)?;
    info["virtual-size"]
        .as_u64()
        .context("qemu-img info has no virtual-size")
}

/// `qemu-img compare` of a raw image and a VHD: identical contents (a larger VHD's extra
/// bytes must be zeros).
fn compare(raw: &Path, vhd: &Path) -> anyhow::Result<()> {
    let out = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        &raw.to_string_lossy(),
        &vhd.to_string_lossy(),
    ])?;
    ensure!(out.contains("identical"), "qemu-img compare: {out}");
    Ok(())
}

#[test]
fn containers_of_one_disk_have_one_digest_and_share_all_chunks() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let raw = f.backup("disk.raw", &[])?;
    let fixed = f.backup("disk.fixed.vhd", &[])?;
    let dynamic = f.backup("disk.dynamic.vhd", &[])?;
    assert_eq!(s(&raw, "source_format"), "raw");
    assert_eq!(s(&fixed, "source_format"), "vhd-fixed");
    assert_eq!(s(&dynamic, "source_format"), "vhd-dynamic");
    for r in [&raw, &fixed, &dynamic] {
        assert_eq!(r["virtual_size_bytes"].as_u64(), Some(DISK_SIZE as u64));
    }
    assert_eq!(s(&raw, "root_digest"), s(&fixed, "root_digest"));
    assert_eq!(s(&raw, "root_digest"), s(&dynamic, "root_digest"));
    assert!(raw["stats"]["new_chunks"].as_u64() > Some(0));
    assert_eq!(fixed["stats"]["new_chunks"].as_u64(), Some(0));
    assert_eq!(dynamic["stats"]["new_chunks"].as_u64(), Some(0));
    // The dynamic VHD's unallocated blocks were never read.
    assert!(dynamic["stats"]["unallocated_bytes"].as_u64() > Some(0));
    assert!(dynamic["stats"]["bytes_read"].as_u64() < Some(DISK_SIZE as u64));
    // --format vhd on a raw image is refused as such, --format raw reads a VHD's bytes.
    let out = sv(&[
        "backup",
        p(&f.path("repo")),
        p(&f.path("disk.raw")),
        "--disk",
        "x",
        "--format",
        "vhd",
    ])?;
    // Source damage, not repository damage: exit 4.
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cookie"));
    let as_raw = f.backup("disk.fixed.vhd", &["--format", "raw"])?;
    assert_eq!(
        as_raw["virtual_size_bytes"].as_u64(),
        Some(DISK_SIZE as u64 + 512)
    );
    // The footer metadata is in the snapshot, shown by `snapshots --json` and `show`.
    let show = sv_json_ok(&["show", p(&f.path("repo")), s(&dynamic, "snapshot_id")])?;
    let vhd = &show["source"]["vhd"];
    assert_eq!(vhd["disk_type"], "dynamic");
    assert_eq!(vhd["current_size"].as_u64(), Some(DISK_SIZE as u64));
    assert_eq!(vhd["block_size"].as_u64(), Some(2 << 20));
    assert_eq!(vhd["creator_application"], "qem2");
    let id = vhd_unique_id(&f.path("disk.dynamic.vhd"))?;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        vhd["unique_id"].as_str().map(|u| u.replace('-', "")),
        Some(hex)
    );
    let list = sv_json_ok(&["snapshots", p(&f.path("repo"))])?;
    let with_vhd = list["snapshots"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["source"]["vhd"].is_object()).count());
    assert_eq!(with_vhd, Some(2));
    Ok(())
}

#[test]
fn restore_in_every_format_is_what_qemu_reads() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let raw_path = f.path("disk.raw");
    let snap = f.backup("disk.dynamic.vhd", &[])?;
    let id = s(&snap, "snapshot_id").to_string();
    let source_id = vhd_unique_id(&f.path("disk.dynamic.vhd"))?;

    // Default: the format the snapshot came from.
    let r = f.restore(&id, "default.vhd", &[])?;
    assert_eq!(s(&r, "output_format"), "vhd-dynamic");

    let r = f.restore(&id, "out.raw", &["--output-format", "raw"])?;
    assert_eq!(s(&r, "output_format"), "raw");
    ensure!(std::fs::read(f.path("out.raw"))? == std::fs::read(&raw_path)?);

    // Fixed: a whole MiB by default, data then a 512-byte footer, the source's id.
    let r = f.restore(&id, "fixed.vhd", &["--output-format", "vhd-fixed"])?;
    assert_eq!(s(&r, "output_format"), "vhd-fixed");
    let mib = (DISK_SIZE as u64).next_multiple_of(1 << 20);
    assert_eq!(vsize(&f.path("fixed.vhd"))?, mib);
    assert_eq!(std::fs::metadata(f.path("fixed.vhd"))?.len(), mib + 512);
    compare(&raw_path, &f.path("fixed.vhd"))?;
    assert_eq!(vhd_unique_id(&f.path("fixed.vhd"))?, source_id);

    // --exact-size keeps the size; --new-id changes the id.
    f.restore(
        &id,
        "exact.vhd",
        &["--output-format", "vhd-fixed", "--exact-size", "--new-id"],
    )?;
    assert_eq!(vsize(&f.path("exact.vhd"))?, DISK_SIZE as u64);
    compare(&raw_path, &f.path("exact.vhd"))?;
    assert_ne!(vhd_unique_id(&f.path("exact.vhd"))?, source_id);

    // Dynamic: only blocks with data, so about as small as the data.
    f.restore(&id, "dyn.vhd", &["--output-format", "vhd-dynamic"])?;
    assert_eq!(vsize(&f.path("dyn.vhd"))?, DISK_SIZE as u64);
    compare(&raw_path, &f.path("dyn.vhd"))?;
    let dyn_len = std::fs::metadata(f.path("dyn.vhd"))?.len();
    let qemu_len = std::fs::metadata(f.path("disk.dynamic.vhd"))?.len();
    assert!(
        dyn_len <= qemu_len + (1 << 20),
        "{dyn_len} vs qemu's {qemu_len}"
    );
    assert!(dyn_len < DISK_SIZE as u64);
    // qemu-img converts it back to the same bytes (it walks our BAT and bitmaps).
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        &f.path("dyn.vhd").to_string_lossy(),
        &f.path("dyn.back.raw").to_string_lossy(),
    ])?;
    ensure!(std::fs::read(f.path("dyn.back.raw"))? == std::fs::read(&raw_path)?);

    // Our own reader takes our output back to the same snapshot digest.
    for out in ["fixed.vhd", "dyn.vhd", "exact.vhd"] {
        let again = f.backup(out, &[])?;
        if out != "fixed.vhd" {
            assert_eq!(s(&again, "root_digest"), s(&snap, "root_digest"), "{out}");
        }
        assert_eq!(again["stats"]["new_chunks"].as_u64(), Some(0), "{out}");
    }

    // A raw source restores as raw by default, and as a VHD with a fresh id.
    let raw_snap = f.backup("disk.raw", &[])?;
    let raw_id = s(&raw_snap, "snapshot_id").to_string();
    assert_eq!(
        s(&f.restore(&raw_id, "r.img", &[])?, "output_format"),
        "raw"
    );
    f.restore(&raw_id, "r1.vhd", &["--output-format", "vhd-fixed"])?;
    f.restore(&raw_id, "r2.vhd", &["--output-format", "vhd-fixed"])?;
    assert_ne!(
        vhd_unique_id(&f.path("r1.vhd"))?,
        vhd_unique_id(&f.path("r2.vhd"))?
    );
    compare(&raw_path, &f.path("r1.vhd"))?;
    // Nothing partial is left behind.
    let leftovers = std::fs::read_dir(f.0.dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .count();
    assert_eq!(leftovers, 0);
    Ok(())
}

/// Three generations of one disk: gen0 as a qemu-made dynamic VHD, gen1 and gen2 as
/// differencing VHDs (ours), each naming its parent differently.
struct Chain {
    f: VhdFixture,
    gens: Vec<Vec<u8>>,
}

fn chain() -> anyhow::Result<Chain> {
    let f = VhdFixture::new()?;
    let gen0 = Disk::sparse(DISK_SIZE as u64, 0).bytes()?;
    let mut gen1 = gen0.clone();
    // Overwrite a few ranges with other real data, partial sectors and whole blocks.
    let other = Disk::sparse(DISK_SIZE as u64, 40).bytes()?;
    for (at, len) in [(1000, 70_000), (5 << 20, 3 << 20), (20 << 20, 4096)] {
        gen1[at..at + len].copy_from_slice(&other[at..at + len]);
    }
    let mut gen2 = gen1.clone();
    for (at, len) in [(3000, 10_000), (12 << 20, 1 << 20), (DISK_SIZE - 700, 700)] {
        gen2[at..at + len].fill(0x5a);
    }
    gen2[(5 << 20) + 512..(5 << 20) + 8192].fill(0); // back to zeros over gen1's data
    std::fs::write(f.path("gen0.raw"), &gen0)?;
    std::fs::write(f.path("gen2.raw"), &gen2)?;
    std::fs::create_dir(f.path("vms"))?;
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        &f.path("gen0.raw").to_string_lossy(),
        &f.path("vms/base.vhd").to_string_lossy(),
    ])?;
    let base_id = vhd_unique_id(&f.path("vms/base.vhd"))?;
    // gen1: a relative W2ru, plus a Windows absolute W2ku that cannot exist here.
    write_differencing_vhd(
        &f.path("vms/child1.vhd"),
        base_id,
        [0x11; 16],
        &gen0,
        &gen1,
        &Locators {
            w2ru: Some(".\\base.vhd".into()),
            w2ku: Some("C:\\Hyper-V\\base.vhd".into()),
            macx: None,
        },
    )?;
    // gen2: only a MacX file URL (absolute, with an escaped character in the name).
    std::fs::rename(f.path("vms/child1.vhd"), f.path("vms/child 1.vhd"))?;
    let url = format!(
        "file://localhost{}",
        f.path("vms/child%201.vhd").to_string_lossy()
    );
    write_differencing_vhd(
        &f.path("child2.vhd"),
        [0x11; 16],
        [0x22; 16],
        &gen1,
        &gen2,
        &Locators {
            w2ru: None,
            w2ku: None,
            macx: Some(url),
        },
    )?;
    Ok(Chain {
        f,
        gens: vec![gen0, gen1, gen2],
    })
}

#[test]
fn differencing_chain_backs_up_as_its_last_generation() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let Chain { f, gens } = chain()?;
    assert_eq!(gens.len(), 3);
    let diff = f.backup("child2.vhd", &[])?;
    let raw = f.backup("gen2.raw", &[])?;
    assert_eq!(s(&diff, "source_format"), "vhd-differencing");
    assert_eq!(s(&diff, "root_digest"), s(&raw, "root_digest"));
    assert_eq!(raw["stats"]["new_chunks"].as_u64(), Some(0));
    let show = sv_json_ok(&["show", p(&f.path("repo")), s(&diff, "snapshot_id")])?;
    let parents = show["source"]["vhd"]["parents"]
        .as_array()
        .map(|p| p.iter().map(|x| x["disk_type"].clone()).collect::<Vec<_>>());
    assert_eq!(
        parents,
        Some(vec![Value::from("differencing"), Value::from("dynamic")])
    );
    // Restores whole, as a dynamic VHD by default.
    let r = f.restore(s(&diff, "snapshot_id"), "merged.vhd", &[])?;
    assert_eq!(s(&r, "output_format"), "vhd-dynamic");
    compare(&f.path("gen2.raw"), &f.path("merged.vhd"))?;
    Ok(())
}

#[test]
fn differencing_parent_missing_wrong_or_cyclic() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let Chain { f, gens } = chain()?;
    let repo = f.path("repo");
    // Missing: the child's locators point at a file that is gone.
    std::fs::rename(f.path("vms/child 1.vhd"), f.path("moved.vhd"))?;
    let out = sv(&["backup", p(&repo), p(&f.path("child2.vhd")), "--disk", "d"])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("parent of differencing VHD") && err.contains("--parent-vhd"),
        "{err}"
    );
    // --parent finds it; its own parent still comes from its locators.
    let moved = f.path("vms/moved.vhd");
    std::fs::rename(f.path("moved.vhd"), &moved)?;
    let ok = f.backup("child2.vhd", &["--parent-vhd", &moved.to_string_lossy()])?;
    let raw = f.backup("gen2.raw", &[])?;
    assert_eq!(s(&ok, "root_digest"), s(&raw, "root_digest"));
    // The wrong parent: its unique id is not the one the child names.
    let out = sv(&[
        "backup",
        p(&repo),
        p(&f.path("child2.vhd")),
        "--disk",
        "d",
        "--parent-vhd",
        p(&f.path("vms/base.vhd")),
    ])?;
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parent unique id"), "{err}");
    // A cycle: a and b each name the other as parent.
    let (g0, g1) = (&gens[0], &gens[1]);
    let loc = |name: &str| Locators {
        w2ru: Some(name.into()),
        ..Locators::default()
    };
    write_differencing_vhd(
        &f.path("a.vhd"),
        [0xbb; 16],
        [0xaa; 16],
        g0,
        g1,
        &loc("b.vhd"),
    )?;
    write_differencing_vhd(
        &f.path("b.vhd"),
        [0xaa; 16],
        [0xbb; 16],
        g1,
        g0,
        &loc("a.vhd"),
    )?;
    let out = sv(&["backup", p(&repo), p(&f.path("a.vhd")), "--disk", "d"])?;
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cycle"), "{err}");
    Ok(())
}

#[test]
fn damaged_vhd_is_reported_with_file_and_offset() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    // Point the first allocated BAT entry far past the end of the file.
    let path = f.path("disk.dynamic.vhd");
    let mut b = std::fs::read(&path)?;
    let bat = u64::from_be_bytes(b[512 + 16..512 + 24].try_into()?) as usize;
    let entry = (0..64)
        .map(|i| bat + 4 * i)
        .find(|&e| b[e..e + 4] != [0xff; 4])
        .context("no allocated block")?;
    b[entry..entry + 4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    std::fs::write(&path, &b)?;
    let out = sv(&["backup", p(&f.path("repo")), p(&path), "--disk", "d"])?;
    // A damaged source is exit 4; 3 is kept for a damaged repository.
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{} is damaged at offset {entry}", path.display());
    assert!(
        err.contains(&expected) && err.contains("past the end"),
        "{err}"
    );
    Ok(())
}

#[test]
fn vhdiinfo_reads_our_vhds() -> anyhow::Result<()> {
    if !have_vhdiinfo() || skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let snap = f.backup("disk.dynamic.vhd", &[])?;
    let id = s(&snap, "snapshot_id");
    for (fmt, name) in [("vhd-fixed", "x.fixed.vhd"), ("vhd-dynamic", "x.dyn.vhd")] {
        f.restore(id, name, &["--output-format", fmt])?;
        let out = std::process::Command::new("vhdiinfo")
            .arg(f.path(name))
            .output()?;
        ensure!(out.status.success(), "vhdiinfo {name} failed");
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let kind = if fmt == "vhd-fixed" {
            "fixed"
        } else {
            "dynamic"
        };
        assert!(text.contains(kind), "{text}");
        let source = &vhd_unique_id(&f.path("disk.dynamic.vhd"))?;
        assert_eq!(&vhd_unique_id(&f.path(name))?, source);
    }
    Ok(())
}

#[test]
fn differencing_chain_incremental_reads_only_the_children() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    const SEG: u64 = 4 << 20;
    let Chain { f, .. } = chain()?;
    let base = f.backup("vms/base.vhd", &[])?;
    assert_eq!(s(&base, "kind"), "full");
    // child 1 changed segments 0, 1 and 5; only they are read.
    let c1 = f.backup("vms/child 1.vhd", &[])?;
    assert_eq!(s(&c1, "kind"), "incremental");
    assert_eq!(s(&c1, "parent"), s(&base, "snapshot_id"));
    assert_eq!(s(&c1, "change_source"), "vhd-differencing-chain");
    let read = c1["stats"]["bytes_read"].as_u64().unwrap_or(u64::MAX);
    assert!(read <= 3 * SEG, "read {read} bytes for 3 touched segments");
    // At least the 4 untouched of 7 segments are copied from the parent without reading.
    let skipped = c1["stats"]["skipped_bytes"].as_u64().unwrap_or(0);
    assert!(
        skipped >= DISK_SIZE as u64 - 3 * SEG,
        "skipped only {skipped}"
    );
    // child 2 relative to child 1's snapshot: the same disk as a full read of gen2.
    let c2 = f.backup("child2.vhd", &[])?;
    assert_eq!(s(&c2, "change_source"), "vhd-differencing-chain");
    assert!(c2["stats"]["bytes_read"].as_u64().unwrap_or(u64::MAX) <= 4 * SEG);
    let full = f.backup("gen2.raw", &["--full"])?;
    assert_eq!(s(&c2, "root_digest"), s(&full, "root_digest"));
    let r = f.restore(s(&c2, "snapshot_id"), "c2.raw", &["--output-format", "raw"])?;
    assert_eq!(s(&r, "output_format"), "raw");
    assert!(stackvault_tests::same_bytes(
        &f.path("gen2.raw"),
        &f.path("c2.raw")
    )?);

    // Relative to a snapshot of another disk (the raw full), the chain's knowledge does not
    // apply: refused, or read in full with --fallback-full.
    let repo = f.path("repo");
    let out = sv(&[
        "backup",
        p(&repo),
        p(&f.path("child2.vhd")),
        "--disk",
        "d1",
        "--parent",
        s(&full, "snapshot_id"),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not descend") && err.contains("--fallback-full"),
        "{err}"
    );
    let fb = f.backup(
        "child2.vhd",
        &["--parent", s(&full, "snapshot_id"), "--fallback-full"],
    )?;
    assert!(s(&fb, "change_source").starts_with("full-read"));
    assert_eq!(s(&fb, "root_digest"), s(&full, "root_digest"));
    Ok(())
}

#[test]
fn verify_target_reads_restored_vhds() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let snap = f.backup("disk.raw", &[])?;
    let id = s(&snap, "snapshot_id").to_string();
    let repo = f.path("repo");
    // A fixed VHD rounded up to a whole MiB (zeros past the disk) and a dynamic VHD both
    // verify against the snapshot by their guest contents.
    for (out, format) in [("fixed.vhd", "vhd-fixed"), ("dyn.vhd", "vhd-dynamic")] {
        f.restore(&id, out, &["--output-format", format])?;
        let v = sv_json_ok(&["verify", p(&repo), &id, "--target", p(&f.path(out))])?;
        assert_eq!(s(&v, "outcome"), "ok", "{format}: {v}");
    }
    // A byte changed inside the VHD's data is found, at its guest offset.
    let path = f.path("fixed.vhd");
    let mut bytes = std::fs::read(&path)?;
    let at = 3 * 1024 * 1024 + 17;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes)?;
    let out = sv(&["verify", p(&repo), &id, "--target", p(&path), "--json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s(&v, "outcome"), "differs", "{v}");
    let at = at as u64;
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(
        problems.iter().any(|p| {
            let (o, l) = (
                p["offset"].as_u64().unwrap_or(0),
                p["length"].as_u64().unwrap_or(0),
            );
            o <= at && at < o + l
        }),
        "no problem range covers guest offset {at}: {v}"
    );
    // A restored VHD whose footer no longer fits its file does not hold the snapshot: the
    // target is wrong (exit 5), not a damaged backup source (4) or repository (3).
    let len = bytes.len();
    // The current size field (footer offset 48, 8 bytes big-endian): one bit of it flipped.
    bytes[len - 512 + 48 + 5] ^= 0x01;
    std::fs::write(&path, &bytes)?;
    let out = sv(&["verify", p(&repo), &id, "--target", p(&path)])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("does not match snapshot"), "{err}");
    Ok(())
}

/// The fixture's `name` with one bit of byte `at` (from the end when negative) flipped.
fn flip(
    f: &VhdFixture,
    name: &str,
    out: &str,
    at: i64,
    bit: u8,
) -> anyhow::Result<std::path::PathBuf> {
    let mut b = std::fs::read(f.path(name))?;
    let i = if at < 0 {
        b.len() - at.unsigned_abs() as usize
    } else {
        at as usize
    };
    b[i] ^= bit;
    let path = f.path(out);
    std::fs::write(&path, &b)?;
    Ok(path)
}

#[test]
fn fixed_vhd_whose_footer_disagrees_with_its_file_is_refused() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let file_len = std::fs::metadata(f.path("disk.fixed.vhd"))?.len();
    // One flipped bit in the current size (footer offset 48, bit 24 of the u64): the disk
    // would be backed up as 10 MiB of its 26 MiB, with only a warning.
    let path = flip(&f, "disk.fixed.vhd", "bitflip.vhd", -512 + 48 + 4, 0x01)?;
    let out = sv(&["backup", p(&f.path("repo")), p(&path), "--disk", "d"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let claimed = (DISK_SIZE as u64) ^ (1 << 24);
    assert!(claimed < DISK_SIZE as u64);
    for needle in [
        path.display().to_string(),
        claimed.to_string(),
        file_len.to_string(),
    ] {
        assert!(err.contains(&needle), "{needle} not in {err}");
    }
    // The peers agree the footer is damaged: qemu-img refuses its checksum, and libvhdi
    // reports the size the file holds, not the one in the damaged field.
    let q = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(&path)
        .output()?;
    assert!(!q.status.success());
    if have_vhdiinfo() {
        assert_eq!(vhdiinfo_media_size(&path)?, file_len - 512);
    }
    // Nothing was stored.
    let list = sv_json_ok(&["snapshots", p(&f.path("repo"))])?;
    assert_eq!(list["snapshots"].as_array().map(Vec::len), Some(0));
    Ok(())
}

#[test]
fn dynamic_vhd_with_a_damaged_end_footer_is_read_from_its_copy() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    // A flipped bit in the trailing footer's size field.
    let path = flip(&f, "disk.dynamic.vhd", "endbad.vhd", -512 + 48 + 4, 0x01)?;
    // Not --quiet: the notice is shown.
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "backup",
            p(&f.path("repo")),
            p(&path),
            "--disk",
            "d",
            "--json",
        ],
        &[],
    )?);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("notice:") && err.contains("copy at offset 0"),
        "{err}"
    );
    let report: Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["virtual_size_bytes"].as_u64(),
        Some(DISK_SIZE as u64)
    );
    let raw = f.backup("disk.raw", &[])?;
    assert_eq!(s(&report, "root_digest"), s(&raw, "root_digest"));
    // The snapshot's source information says so too.
    let show = sv_json_ok(&["show", p(&f.path("repo")), s(&report, "snapshot_id")])?;
    let warned = show["source"]["vhd"]["warnings"]
        .as_array()
        .is_some_and(|w| {
            w.iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("copy at offset 0")))
        });
    assert!(warned, "{show}");
    // qemu-img reads the same disk (it reads dynamic VHDs by their copy at offset 0).
    f.restore(
        s(&report, "snapshot_id"),
        "back.raw",
        &["--output-format", "raw"],
    )?;
    let out = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        &f.path("back.raw").to_string_lossy(),
        &path.to_string_lossy(),
    ])?;
    ensure!(out.contains("identical"), "{out}");
    Ok(())
}

#[test]
fn truncated_dynamic_vhd_is_refused_not_read_as_raw() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let b = std::fs::read(f.path("disk.dynamic.vhd"))?;
    // An export cut short: without its trailing footer, and cut in the middle of a block.
    let (cut_after, cut_mid) = (f.path("cut1.vhd"), f.path("cut2.vhd"));
    std::fs::write(&cut_after, &b[..b.len() - 512])?;
    std::fs::write(&cut_mid, &b[..b.len() - 512 - 300_000])?;
    // And one that also lost its footer copy: only the dynamic header says what it is.
    let mut headless = b[..b.len() - 512 - 300_000].to_vec();
    headless[..512].fill(0);
    let cut_both = f.path("cut3.vhd");
    std::fs::write(&cut_both, &headless)?;
    for path in [&cut_after, &cut_mid, &cut_both] {
        let out = sv(&["backup", p(&f.path("repo")), p(path), "--disk", "d"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{}: {err}", path.display());
        assert!(
            err.contains(&path.display().to_string()) && err.contains("lost its end"),
            "{err}"
        );
    }
    let list = sv_json_ok(&["snapshots", p(&f.path("repo"))])?;
    assert_eq!(list["snapshots"].as_array().map(Vec::len), Some(0));
    Ok(())
}

#[test]
fn vhdx_is_refused_with_the_conversion_command() -> anyhow::Result<()> {
    if skip_without_qemu() {
        return Ok(());
    }
    let f = VhdFixture::new()?;
    f.disks()?;
    let path = f.path("disk.vhdx");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        &f.path("disk.raw").to_string_lossy(),
        &path.to_string_lossy(),
    ])?;
    let out = sv(&["backup", p(&f.path("repo")), p(&path), "--disk", "d"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("VHDX is not supported")
            && err.contains("qemu-img convert -O vpc -o subformat=fixed"),
        "{err}"
    );
    // --format raw still backs up the file's bytes as they are.
    let raw = f.backup("disk.vhdx", &["--format", "raw"])?;
    assert_eq!(s(&raw, "source_format"), "raw");
    assert_eq!(
        raw["virtual_size_bytes"].as_u64(),
        Some(std::fs::metadata(&path)?.len())
    );
    Ok(())
}
