//! Helpers shared by the integration suite and benches: sample disks built from real files on
//! this machine, the `stackvault` binary, temporary repositories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

/// True when `qemu-img` can be run; tests that need it say so and skip otherwise.
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `qemu-img` with `args`; its stdout, or an error with its stderr.
pub fn qemu_img(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("qemu-img").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs the `stackvault` binary; returns its output whatever the exit status.
pub fn stackvault(args: &[&dyn AsRef<std::ffi::OsStr>]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(stackvault_bin())
        .arg("--quiet")
        .args(args.iter().map(|a| a.as_ref()))
        .output()?)
}

/// Runs `stackvault ... --json` and parses its report; fails with stderr if it failed.
pub fn stackvault_json(args: &[&dyn AsRef<std::ffi::OsStr>]) -> anyhow::Result<serde_json::Value> {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = args.to_vec();
    all.push(&"--json");
    let out = stackvault(&all)?;
    anyhow::ensure!(
        out.status.success(),
        "stackvault failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A disk image of `size` bytes built from real files of this machine (binaries of
/// /usr/bin, in name order from `skip`), each followed by a zero gap so the disk has holes.
pub fn sample_disk(size: usize, skip: usize) -> anyhow::Result<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir("/usr/bin")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut disk = vec![0u8; size];
    let mut pos = 0usize;
    for (i, p) in names.iter().skip(skip).enumerate() {
        let Ok(bytes) = std::fs::read(p) else {
            continue;
        };
        let n = bytes.len().min(size.saturating_sub(pos)).min(1 << 20);
        disk[pos..pos + n].copy_from_slice(&bytes[..n]);
        // Gaps of 0..4 MiB at odd offsets: some 2 MiB blocks stay empty, most are partial.
        pos += n + (i * 1_234_567) % (4 << 20);
        if pos >= size {
            break;
        }
    }
    Ok(disk)
}

/// The unique id in a VHD's footer (the last 512 bytes).
pub fn vhd_unique_id(path: &Path) -> anyhow::Result<[u8; 16]> {
    let b = std::fs::read(path)?;
    anyhow::ensure!(b.len() >= 512, "{} is too short for a VHD", path.display());
    let f = &b[b.len() - 512..];
    anyhow::ensure!(
        &f[..8] == b"conectix",
        "{} has no VHD footer",
        path.display()
    );
    Ok(f[68..84].try_into()?)
}

/// Which parent locators [`write_differencing_vhd`] writes, each `Some(path text)`.
#[derive(Clone, Debug, Default)]
pub struct Locators {
    /// Relative Windows path (UTF-16LE), e.g. `.\parent.vhd`.
    pub w2ru: Option<String>,
    /// Absolute Windows path (UTF-16LE).
    pub w2ku: Option<String>,
    /// `file://` URL (UTF-8).
    pub macx: Option<String>,
}

/// Writes a differencing VHD at `out` whose parent has unique id `parent_id` and content
/// `old`, so that the chain reads as `new`: written independently of the engine (from the
/// VHD specification) so the two cross-check each other. Blocks are 2 MiB; a block is
/// allocated when a sector of it differs, and its bitmap has exactly the differing sectors.
pub fn write_differencing_vhd(
    out: &Path,
    parent_id: [u8; 16],
    unique_id: [u8; 16],
    old: &[u8],
    new: &[u8],
    locators: &Locators,
) -> anyhow::Result<()> {
    const BS: usize = 2 << 20;
    anyhow::ensure!(new.len().is_multiple_of(512) && old.len() == new.len());
    fn sum(b: &[u8]) -> u32 {
        !b.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)))
    }
    let blocks = new.len().div_ceil(BS);
    let bat_at = 1536usize;
    let bat_len = (blocks * 4).next_multiple_of(512);
    let mut file = vec![0u8; bat_at + bat_len];
    // Parent locator data, each in its own sector-padded area after the BAT.
    let mut entries = Vec::new();
    for (code, text) in [
        (b"W2ru", &locators.w2ru),
        (b"W2ku", &locators.w2ku),
        (b"MacX", &locators.macx),
    ] {
        let Some(text) = text else { continue };
        let data: Vec<u8> = if code == b"MacX" {
            text.as_bytes().to_vec()
        } else {
            text.encode_utf16().flat_map(u16::to_le_bytes).collect()
        };
        let at = file.len();
        let space = data.len().next_multiple_of(512).max(512);
        file.extend_from_slice(&data);
        file.resize(at + space, 0);
        entries.push((*code, (space / 512) as u32, data.len() as u32, at as u64));
    }
    let mut bat = vec![u32::MAX; blocks];
    for (b, entry) in bat.iter_mut().enumerate() {
        let range = b * BS..((b + 1) * BS).min(new.len());
        let differs: Vec<usize> = (range.start / 512..range.end / 512)
            .filter(|&s| new[s * 512..s * 512 + 512] != old[s * 512..s * 512 + 512])
            .collect();
        if differs.is_empty() {
            continue;
        }
        let start = file.len();
        *entry = (start / 512) as u32;
        file.resize(start + 512 + BS, 0);
        for s in differs {
            let i = s - range.start / 512;
            file[start + i / 8] |= 0x80 >> (i % 8);
            file[start + 512 + i * 512..start + 512 + i * 512 + 512]
                .copy_from_slice(&new[s * 512..s * 512 + 512]);
        }
    }
    for (i, e) in bat.iter().enumerate() {
        file[bat_at + 4 * i..bat_at + 4 * i + 4].copy_from_slice(&e.to_be_bytes());
    }
    file[bat_at + blocks * 4..bat_at + bat_len].fill(0xff);
    // Dynamic header.
    let mut h = [0u8; 1024];
    h[0..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&(bat_at as u64).to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(blocks as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(BS as u32).to_be_bytes());
    h[40..56].copy_from_slice(&parent_id);
    let name = locators
        .w2ru
        .as_deref()
        .or(locators.w2ku.as_deref())
        .unwrap_or("parent.vhd");
    let name = name.rsplit(['\\', '/']).next().unwrap_or(name);
    for (i, u) in name.encode_utf16().take(256).enumerate() {
        h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
    }
    for (i, (code, space, len, at)) in entries.iter().enumerate() {
        let e = 576 + 24 * i;
        h[e..e + 4].copy_from_slice(code);
        h[e + 4..e + 8].copy_from_slice(&space.to_be_bytes());
        h[e + 8..e + 12].copy_from_slice(&len.to_be_bytes());
        h[e + 16..e + 24].copy_from_slice(&at.to_be_bytes());
    }
    let c = sum(&h);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    file[512..1536].copy_from_slice(&h);
    // Footer, at both ends.
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&(new.len() as u64).to_be_bytes());
    f[48..56].copy_from_slice(&(new.len() as u64).to_be_bytes());
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    f[60..64].copy_from_slice(&4u32.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let c = sum(&f);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    file[..512].copy_from_slice(&f);
    file.extend_from_slice(&f);
    std::fs::write(out, file)?;
    Ok(())
}
