//! Helpers shared by the integration suite and benches, so that a test reads as a story:
//! arrange with a fixture ([`Fixture`], sample disks from the one builder [`Disk`] and its
//! shorthand [`make_disk`], the next generation of a disk from the one mutator [`scribble`] or
//! [`scribble_disk`]), act with the one CLI runner family (`sv`, `sv_env`, `sv_ok`, `sv_json`,
//! `sv_json_ok`, and `sv_as_typed` for a run without `--quiet`; `pause_at`/`interrupt_at` for
//! runs stopped by the test pause hook), and assert on outcomes. Peers that may be missing
//! ([`Azurite::start_or_skip`], [`skip_for`], [`loop_device`]) fail under `CI=true` and skip
//! with a message elsewhere. Sample disks are built from real files of this machine.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

/// Path of the `stackvault` binary the suite runs: this package's `stackvault-under-test`
/// (the CLI library's entry point), which `cargo test` builds beside the test executable before
/// any test starts.
pub fn stackvault_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Repositories the CLI made are encrypted under TEST_PASSWORD; tests that open them
        // in this process get the same password.
        stackvault::crypto::unlock::set_password_provider(std::sync::Arc::new(|_, _| {
            Ok(zeroize_string(TEST_PASSWORD))
        }));
        // target/<profile>/deps/main-xxxx -> target/<profile>/stackvault-under-test
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory")
            .join("stackvault-under-test");
        assert!(
            bin.is_file(),
            "{} is missing: run the suite through `cargo test`, which builds it",
            bin.display()
        );
        bin
    })
}

/// A tiny deterministic PRNG (splitmix64) so sample disks are reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Regular files of this machine (binaries, libraries, text), sorted by path: real data that
/// compresses and deduplicates like a VM's root disk does.
pub fn machine_files() -> &'static [PathBuf] {
    static FILES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    FILES.get_or_init(|| {
        let mut out = Vec::new();
        for root in ["/usr/bin", "/usr/lib", "/usr/share"] {
            let mut stack = vec![PathBuf::from(root)];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let Ok(ft) = e.file_type() else { continue };
                    if ft.is_dir() {
                        stack.push(e.path());
                    } else if ft.is_file() {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        if (4096..=8 << 20).contains(&len) {
                            out.push(e.path());
                        }
                    }
                }
                if out.len() > 20_000 {
                    break;
                }
            }
        }
        out.sort();
        out
    })
}

/// How a sample disk lays real files out: the one builder of the suite, [`Disk`], makes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// /usr/bin binaries in name order from the `seed`-th, each followed by 256 KiB of
    /// zeros, as unallocated space on a real disk ([`make_disk`]).
    Packed,
    /// Random files of /usr at 4 KiB-aligned offsets with random zero gaps between them (a
    /// file system with free space), about this percentage full.
    Filled(u64),
    /// /usr/bin binaries in name order from the `seed`-th, each followed by a gap of 0..4 MiB
    /// at odd offsets: some 2 MiB blocks stay empty, most are partial (VHD block allocation).
    Sparse,
    /// Pseudo-random bytes from the seed: a disk that neither compresses nor deduplicates,
    /// so every byte stored is a pack byte.
    Random,
}

/// A sample disk of exactly `size` bytes built from real files of this machine, which
/// compress and deduplicate like a VM's disk does. Deterministic for a seed on one machine.
#[derive(Clone, Copy, Debug)]
pub struct Disk {
    pub size: u64,
    pub seed: u64,
    pub layout: Layout,
}

impl Disk {
    /// [`Layout::Packed`]: what [`make_disk`] writes.
    pub fn packed(size: u64, seed: u64) -> Disk {
        Disk {
            size,
            seed,
            layout: Layout::Packed,
        }
    }

    /// [`Layout::Filled`] to about `percent` of `size`.
    pub fn filled(size: u64, percent: u64, seed: u64) -> Disk {
        Disk {
            size,
            seed,
            layout: Layout::Filled(percent),
        }
    }

    /// [`Layout::Sparse`].
    pub fn sparse(size: u64, seed: u64) -> Disk {
        Disk {
            size,
            seed,
            layout: Layout::Sparse,
        }
    }

    /// [`Layout::Random`].
    pub fn random(size: u64, seed: u64) -> Disk {
        Disk {
            size,
            seed,
            layout: Layout::Random,
        }
    }

    /// Writes the disk at `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        self.write_to(&mut out)?;
        out.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .with_context(|| format!("sync {}", path.display()))
    }

    /// The disk's bytes, in memory.
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(self.size)?);
        self.write_to(&mut out)?;
        Ok(out)
    }

    fn write_to(&self, out: &mut impl Write) -> anyhow::Result<()> {
        match self.layout {
            Layout::Packed => self.write_packed(out),
            Layout::Filled(percent) => self.write_filled(out, percent),
            Layout::Sparse => self.write_sparse(out),
            Layout::Random => self.write_random(out),
        }
    }

    fn write_packed(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let files = usr_bin_files()?;
        let zeros = vec![0u8; 256 * 1024];
        let mut written: u64 = 0;
        let mut i = usize::try_from(self.seed)?;
        while written < self.size {
            let data = fs::read(&files[i % files.len()]).unwrap_or_default();
            i += 1;
            for part in [&data[..], &zeros[..]] {
                let n = (part.len() as u64).min(self.size - written) as usize;
                out.write_all(&part[..n])?;
                written += n as u64;
            }
        }
        Ok(())
    }

    fn write_filled(&self, out: &mut impl Write, fill_percent: u64) -> anyhow::Result<()> {
        let size = self.size;
        let files = machine_files();
        anyhow::ensure!(
            !files.is_empty(),
            "no files under /usr to build a sample disk from"
        );
        let mut rng = Rng::new(self.seed);
        let target_data = size / 100 * fill_percent;
        let mut pos = 0u64;
        let mut data = 0u64;
        while pos < size {
            let f = &files[rng.below(files.len() as u64) as usize];
            let Ok(bytes) = fs::read(f) else {
                continue;
            };
            // At most 1 MiB of each file, so the fill level is met closely.
            let take = (bytes.len() as u64).min(size - pos).min(1 << 20);
            if data < target_data {
                out.write_all(&bytes[..take as usize])?;
                pos += take;
                data += take;
            }
            // A gap of free space (zeros), keeping files 4 KiB aligned as a file system would.
            let gap = match (data < target_data, rng.below(4)) {
                (false, _) => size,
                (true, 0) => (16 + rng.below(240)) * 4096, // 64 KiB to 1 MiB of free space
                (true, _) => rng.below(16) * 4096,
            };
            let next = (pos.div_ceil(4096) * 4096 + gap).min(size);
            let zeros = vec![0u8; 1 << 16];
            while pos < next {
                let n = (next - pos).min(zeros.len() as u64);
                out.write_all(&zeros[..n as usize])?;
                pos += n;
            }
        }
        Ok(())
    }

    fn write_random(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let mut rng = Rng::new(self.seed);
        let mut data = vec![0u8; usize::try_from(self.size)?];
        for word in data.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        out.write_all(&data)?;
        Ok(())
    }

    fn write_sparse(&self, out: &mut impl Write) -> anyhow::Result<()> {
        let size = usize::try_from(self.size)?;
        let mut disk = vec![0u8; size];
        let mut pos = 0usize;
        let skip = usize::try_from(self.seed)?;
        for (i, path) in usr_bin_files()?.iter().skip(skip).enumerate() {
            let Ok(bytes) = fs::read(path) else {
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
        out.write_all(&disk)?;
        Ok(())
    }
}

/// Writes a [`Layout::Packed`] sample disk of exactly `size` bytes at `path` (different seeds
/// give mostly different content).
pub fn make_disk(path: &Path, size: u64, seed: usize) -> anyhow::Result<()> {
    Disk::packed(size, seed as u64).write(path)
}

/// How [`scribble`] changes a disk: the suite's one mutator makes the next generation of a
/// disk in one of these ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scribble {
    /// `count` 64 KiB ranges, evenly spread, overwritten with bytes of one other file
    /// ([`scribble_disk`]).
    Spread,
    /// `count` random 4 KiB blocks overwritten with bytes of other files, and one 256 KiB
    /// region shifted by 7 bytes (an edited file, which content-defined chunking must
    /// resynchronise after): like a week of VM life.
    Week,
}

/// Changes the disk at `path` in place as `how` says; returns the byte ranges written,
/// `(offset, len)`. Deterministic for a seed.
pub fn scribble(
    path: &Path,
    how: Scribble,
    count: u64,
    seed: u64,
) -> anyhow::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut written = Vec::new();
    match how {
        Scribble::Spread => {
            let files = usr_bin_files()?;
            let donor_at = usize::try_from(seed)?.wrapping_mul(7).wrapping_add(3) % files.len();
            let donor = fs::read(&files[donor_at]).unwrap_or_default();
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
                let len = 65536u64.min(size - at);
                f.write_all_at(&block[..len as usize], at)?;
                written.push((at, len));
            }
        }
        Scribble::Week => {
            anyhow::ensure!(size >= 1 << 20, "disk too small to mutate");
            let files = machine_files();
            let mut rng = Rng::new(seed);
            for _ in 0..count {
                let src = fs::read(&files[rng.below(files.len() as u64) as usize])?;
                let off = rng.below(src.len() as u64 / 4096) * 4096;
                let block = &src[off as usize..(off as usize + 4096).min(src.len())];
                let at = rng.below(size / 4096) * 4096;
                let block = &block[..block.len().min((size - at) as usize)];
                f.write_all_at(block, at)?;
                written.push((at, block.len() as u64));
            }
            let at = rng.below(size / 2);
            let mut region = vec![0u8; 256 << 10];
            f.read_exact_at(&mut region, at)?;
            f.write_all_at(&region, at + 7)?;
            written.push((at + 7, region.len() as u64));
        }
    }
    f.sync_all()?;
    Ok(written)
}

/// Overwrites `count` evenly spread 64 KiB ranges of the disk at `path` ([`Scribble::Spread`]).
pub fn scribble_disk(path: &Path, count: u64, seed: usize) -> anyhow::Result<()> {
    scribble(path, Scribble::Spread, count, seed as u64).map(drop)
}

/// Regular files of /usr/bin, sorted by name (the raw material of packed and sparse disks).
fn usr_bin_files() -> anyhow::Result<&'static [PathBuf]> {
    static FILES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    let files = FILES.get_or_init(|| {
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
    });
    if files.is_empty() {
        bail!("no files in /usr/bin to build a sample disk from");
    }
    Ok(files)
}

/// A JSON change list (`[{"offset":N,"length":N}]`) of the given ranges.
pub fn json_change_list(ranges: &[(u64, u64)]) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("{{\"offset\": {o}, \"length\": {l}}}"))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Whether two files have the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Restores snapshot `id` (forcing over `out`) and says whether it equals `expected`.
pub fn restores_to(
    repo: &stackvault::Repo,
    id: &str,
    expected: &Path,
    out: &Path,
) -> anyhow::Result<bool> {
    let snap = repo.resolve_snapshot(id, None)?;
    let options = stackvault::RestoreOptions {
        force: true,
        ..Default::default()
    };
    stackvault::restore_to_file(repo, &snap, out, &options, &stackvault::NoProgress)?;
    same_bytes(expected, out)
}

/// The shared dataset directory built by `../shared/datasets/make-disks.sh --small`, made on
/// first use into the target directory; `None` (with a message) where the script is absent.
pub fn shared_small_dataset() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("../shared/datasets/make-disks.sh");
        if !script.exists() {
            eprintln!(
                "skipping: {} not found (shared dataset absent)",
                script.display()
            );
            return None;
        }
        let out = root.join("target/datasets/small");
        if out.join("gen2.raw").exists() {
            return Some(out);
        }
        let status = Command::new("bash")
            .arg(&script)
            .args(["--small", "--no-vhd", "-o"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            _ => {
                eprintln!("skipping: make-disks.sh --small failed");
                None
            }
        }
    })
    .clone()
}

/// A virtual disk held in memory, for benches and tests that must not touch the file system.
#[derive(Debug, Clone)]
pub struct MemDisk {
    pub bytes: Vec<u8>,
}

impl stackvault::DiskSource for MemDisk {
    fn virtual_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn info(&self) -> stackvault::format::manifest::SourceInfo {
        stackvault::format::manifest::SourceInfo {
            path: "memory".into(),
            format: stackvault::format::manifest::ContainerFormat::Raw,
            vhd: None,
            blob: None,
        }
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> stackvault::Result<Vec<stackvault::source::SourceExtent>> {
        Ok(vec![stackvault::source::SourceExtent {
            offset,
            len,
            kind: stackvault::source::ExtentKind::Data,
        }])
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> stackvault::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }
}

/// `len` bytes of real data from files of this machine (binaries, libraries, text), with no
/// zero gaps: what new data looks like to the compressor.
pub fn machine_bytes(len: usize, seed: u64) -> Vec<u8> {
    let files = machine_files();
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len && !files.is_empty() {
        if let Ok(b) = std::fs::read(&files[rng.below(files.len() as u64) as usize]) {
            let take = b.len().min(len - out.len()).min(1 << 20);
            out.extend_from_slice(&b[..take]);
        }
    }
    out.resize(len, 0);
    out
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

/// The password of every repository the test runners create (unless a test gives another).
pub const TEST_PASSWORD: &str = "stackvault test password";

fn zeroize_string(s: &str) -> stackvault::crypto::Zeroizing<String> {
    stackvault::crypto::Zeroizing::new(s.to_string())
}

/// The environment every CLI run of the suite gets before its own: the default password
/// ([`TEST_PASSWORD`] in `STACKVAULT_PASSWORD`) and `STACKVAULT_INSECURE_TEST_KDF=1`, the
/// test-only knob that makes new keys use cheap Argon2id parameters (a second per CLI call
/// at RFC 9106 strength would add minutes to the suite). A test's own variables win.
pub fn test_env() -> [(&'static str, &'static str); 2] {
    [
        ("STACKVAULT_INSECURE_TEST_KDF", "1"),
        ("STACKVAULT_PASSWORD", TEST_PASSWORD),
    ]
}

/// A command running the CLI binary with [`test_env`] set.
pub fn sv_command() -> Command {
    let mut cmd = Command::new(stackvault_bin());
    cmd.envs(test_env());
    cmd
}

/// Runs the CLI (quiet) and returns its output, whatever the exit status.
pub fn sv(args: &[&str]) -> anyhow::Result<Output> {
    sv_env(args, &[])
}

/// Runs the CLI (quiet) with extra environment variables.
pub fn sv_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    run(args, env, true)
}

/// Runs the CLI exactly as a user types it, without `--quiet`, so notices and progress
/// decisions show; returns its output whatever the exit status.
pub fn sv_as_typed(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    run(args, env, false)
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

/// Runs the CLI with `--json` appended and fails (with its stderr) unless it exits 0;
/// returns its report.
pub fn sv_json_ok(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let (code, v, stderr) = sv_json(args)?;
    if code != Some(0) {
        bail!("stackvault {args:?} failed ({code:?}): {stderr} {v:#}");
    }
    Ok(v)
}

/// A finished command's exit code (`None` when a signal ended it), stdout and stderr as text.
pub fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(args: &[&str], env: &[(&str, &str)], quiet: bool) -> anyhow::Result<Output> {
    let mut cmd = sv_command();
    if quiet {
        cmd.arg("--quiet");
    }
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .with_context(|| format!("run stackvault {args:?}"))
}

/// A CLI run (quiet) stopped by the test pause hook: it waits at its pause point until it is
/// signalled or killed (the hooks exist in binaries built with the `testing` feature).
pub struct Paused {
    pub child: std::process::Child,
    stderr: BufReader<std::process::ChildStderr>,
    seen: String,
}

/// Starts the CLI (quiet) with the pause hook armed at `point` and extra environment
/// variables, and returns it once it says it has paused there.
pub fn pause_at(args: &[&str], env: &[(&str, &str)], point: &str) -> anyhow::Result<Paused> {
    let mut cmd = sv_command();
    cmd.arg("--quiet")
        .args(args)
        .env("STACKVAULT_PAUSE_AT", point);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run stackvault {args:?}"))?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr pipe")?);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line)? == 0 {
            let status = child.wait()?;
            bail!("stackvault {args:?} never paused at {point} ({status}): {seen}");
        }
        seen.push_str(&line);
        if line.starts_with("paused at ") {
            return Ok(Paused {
                child,
                stderr,
                seen,
            });
        }
    }
}

impl Paused {
    /// Sends `signal` (`INT`, `TERM`) and returns the exit code and all of stderr.
    pub fn signal(mut self, signal: &str) -> anyhow::Result<(Option<i32>, String)> {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !sent.success() {
            bail!("kill -{signal} failed");
        }
        self.stderr.read_to_string(&mut self.seen)?;
        Ok((self.child.wait()?.code(), self.seen))
    }

    /// SIGKILLs the run (a crash: no handler runs) and checks that it died of it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.code().is_none(), "killed, not exited: {status}");
        Ok(())
    }
}

/// Runs the CLI (quiet) paused at `point`, sends it `signal` (`INT`, `TERM`), and returns its
/// exit code and stderr.
pub fn interrupt_at(
    args: &[&str],
    point: &str,
    signal: &str,
) -> anyhow::Result<(Option<i32>, String)> {
    pause_at(args, &[], point)?.signal(signal)
}

/// Whether the suite runs under CI (`CI=true`), where a missing peer is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether a test must skip because `missing` (what is absent and how to install it) is not
/// `None`: under CI a missing peer fails the test; elsewhere it prints why and returns true.
pub fn skip_for(missing: Option<String>) -> bool {
    let Some(what) = missing else {
        return false;
    };
    assert!(!in_ci(), "missing under CI=true: {what}");
    eprintln!("SKIPPED: {what}");
    true
}

/// What [`loop_device`] writes into the backing file first: old data a restore must overwrite.
pub const GARBAGE: u8 = 0xa5;

/// A loop device, detached on drop. Tests write through `dev`, a node of the same device made
/// in the test's directory, never through `/dev/loopN`: a restore that replaced its target
/// node (as restores did before writing devices in place) then harms nothing shared.
pub struct LoopDevice {
    pub loop_dev: PathBuf,
    pub dev: PathBuf,
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_dev)
            .status();
    }
}

/// A loop device over a new sparse file of `size` bytes whose first `garbage` bytes are
/// [`GARBAGE`]; `None` (after saying why) where loop devices cannot be made outside CI.
pub fn loop_device(backing: &Path, size: u64, garbage: u64) -> anyhow::Result<Option<LoopDevice>> {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let f = fs::File::create(backing)?;
    f.set_len(size)?;
    let block = vec![GARBAGE; MIB as usize];
    let mut at = 0;
    while at < garbage {
        let n = (garbage - at).min(MIB) as usize;
        f.write_all_at(&block[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output();
    let why = match out {
        Ok(o) if o.status.success() => {
            let loop_dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            let dev = backing.with_extension("dev");
            let device = LoopDevice { loop_dev, dev };
            mknod_like(&device.loop_dev, &device.dev, "b")?;
            return Ok(Some(device));
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("cannot run losetup: {e}"),
    };
    if in_ci() {
        bail!("cannot make a loop device ({why}); CI must run these tests as root with util-linux");
    }
    eprintln!("SKIPPED: cannot make a loop device ({why})");
    Ok(None)
}

/// Makes `node`, a device node (`kind` `b` or `c`) of the same device as `existing`.
pub fn mknod_like(existing: &Path, node: &Path, kind: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(existing)?.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let status = Command::new("mknod")
        .arg(node)
        .args([kind, &major.to_string(), &minor.to_string()])
        .status()
        .context("run mknod")?;
    if !status.success() {
        bail!("mknod {} failed", node.display());
    }
    Ok(())
}

/// Ids of the snapshots `snapshots --json` lists, in its order (oldest first).
pub fn snapshot_ids(repo: &Path) -> anyhow::Result<Vec<String>> {
    let list = sv_json_ok(&["snapshots", p(repo)])?;
    Ok(list["snapshots"]
        .as_array()
        .context("snapshot list")?
        .iter()
        .filter_map(|s| s["snapshot_id"].as_str().map(str::to_owned))
        .collect())
}

/// A path as `&str` (test paths are always UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap_or("<non-UTF-8 path>")
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

    /// A fixture whose repository is made with `--encryption none`: for tests of the plain
    /// formats' bytes (offsets in packs, format versions, hand-made old objects).
    pub fn plain() -> anyhow::Result<Fixture> {
        Self::plain_with(&[])
    }

    /// [`Fixture::plain`] made with more `init` arguments (`--chunker fixed:16384`).
    pub fn plain_with(init_args: &[&str]) -> anyhow::Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let f = Fixture { dir };
        let repo = f.repo();
        let mut args = vec!["init", p(&repo), "--encryption", "none"];
        args.extend_from_slice(init_args);
        sv_ok(&args)?;
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

    /// Builds a disk and backs it up; returns (the disk's bytes, snapshot id).
    pub fn backup_new_disk_bytes(
        &self,
        name: &str,
        size: u64,
        seed: usize,
    ) -> anyhow::Result<(Vec<u8>, String)> {
        let (disk, id) = self.backup_new_disk(name, size, seed)?;
        Ok((fs::read(&disk)?, id))
    }

    /// Backs up `disk` as `name`; returns the snapshot id.
    pub fn backup(&self, disk: &Path, name: &str) -> anyhow::Result<String> {
        backup_disk(&self.repo(), disk, name)
    }

    /// Restores `snapshot` and checks the result equals `disk` byte for byte.
    pub fn assert_restores(&self, snapshot: &str, disk: &Path) -> anyhow::Result<()> {
        assert_restores(&self.repo(), snapshot, disk)
    }
}

/// Backs `disk` up into `repo` as `name`; returns the snapshot id.
pub fn backup_disk(repo: &Path, disk: &Path, name: &str) -> anyhow::Result<String> {
    let v = sv_json_ok(&["backup", p(repo), p(disk), "--disk", name])?;
    v["snapshot_id"]
        .as_str()
        .map(str::to_owned)
        .context("backup report without snapshot_id")
}

/// Restores `snapshot` from `repo` (next to `disk`) and checks it equals `disk` byte for byte.
pub fn assert_restores(repo: &Path, snapshot: &str, disk: &Path) -> anyhow::Result<()> {
    let short = snapshot.get(..12).unwrap_or(snapshot);
    let out = disk.with_extension(format!("restored-{short}"));
    sv_ok(&["restore", p(repo), snapshot, p(&out), "--force"])?;
    if !same_bytes(&out, disk)? {
        bail!(
            "snapshot {snapshot} of {} does not restore {}",
            repo.display(),
            disk.display()
        );
    }
    fs::remove_file(&out)?;
    Ok(())
}

/// Where `.ci/azurite.sh` installs Azurite's blob service.
pub fn azurite_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/azurite/node_modules/.bin/azurite-blob")
}

/// A running Azurite (blob service, in memory, on a free port), killed on drop.
pub struct Azurite {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    /// Starts Azurite; `None` (after saying why) when it is not installed and this is not
    /// CI, where it must be (a missing Azurite fails the test there).
    pub fn start_or_skip() -> anyhow::Result<Option<Azurite>> {
        let bin = azurite_bin();
        if bin.exists() {
            return Azurite::start().map(Some);
        }
        if in_ci() {
            bail!(
                "{} missing under CI=true: run .ci/azurite.sh",
                bin.display()
            );
        }
        eprintln!(
            "SKIPPED: Azurite not installed at {}; run .ci/azurite.sh to enable these tests",
            bin.display()
        );
        Ok(None)
    }

    /// Starts the Azurite at [`azurite_bin`] and waits for its port.
    pub fn start() -> anyhow::Result<Azurite> {
        let bin = azurite_bin();
        let mut child = Command::new(&bin)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--loose",
                "--disableTelemetry",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().context("azurite stdout")?;
        let mut guard = Azurite { child, port: 0 };
        // Keep reading its output: Azurite dies of SIGPIPE when nobody does.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                if let Some(rest) = line.split("listens on http://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().ok());
                }
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Some(port)) => guard.port = port,
            _ => bail!("Azurite did not say which port it listens on"),
        }
        Ok(guard)
    }
}

/// A repository on one object store that several hosts share: each [`SharedStore::host`] is
/// a handle with its own index cache, as another machine would have; the temporary directory
/// holds those caches and any disk a test writes.
pub struct SharedStore<B> {
    dir: tempfile::TempDir,
    pub store: std::sync::Arc<B>,
    location: &'static str,
}

impl<B: stackvault::store::Backend + 'static> SharedStore<B> {
    /// `store` with a new repository (default options) initialised in it as `location`.
    pub fn init(store: B, location: &'static str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = std::sync::Arc::new(store);
        stackvault::Repo::init_on(
            store.clone(),
            &dir.path().join("cache-init"),
            location,
            &stackvault::InitOptions::default(),
        )?;
        Ok(SharedStore {
            dir,
            store,
            location,
        })
    }

    /// The temporary directory (caches `cache-<host>`, and room for disks).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Host `name`: a handle on the shared store with its own cache.
    pub fn host(&self, name: &str) -> anyhow::Result<stackvault::Repo> {
        self.host_via(self.store.clone(), name)
    }

    /// Host `name` reaching the same objects through `backend` (a wrapper that gates, counts
    /// or fails requests in front of [`SharedStore::store`]).
    pub fn host_via(
        &self,
        backend: std::sync::Arc<dyn stackvault::store::Backend>,
        name: &str,
    ) -> anyhow::Result<stackvault::Repo> {
        Ok(stackvault::Repo::open_on(
            backend,
            &self.path().join(format!("cache-{name}")),
            self.location,
        )?)
    }
}

/// A reader of snapshot `id` keeping at most `cache_bytes` of frames and loading nothing
/// ahead, so that its counters say exactly what the test's own reads cost.
pub fn reader_without_read_ahead<'r>(
    repo: &'r stackvault::Repo,
    id: &str,
    cache_bytes: usize,
) -> anyhow::Result<stackvault::read::SnapshotReader<'r>> {
    let options = stackvault::read::ReaderOptions {
        cache_bytes,
        read_ahead_bytes: 0,
    };
    Ok(stackvault::read::SnapshotReader::open(repo, id, options)?)
}

/// What a test watches on a [`Watched`] store: told before each read, listing and put, it may
/// count them or hold one back; every request then goes through to the objects unchanged.
pub trait Watcher: Send + Sync {
    /// Before a `get` or `get_range` of `key`.
    fn reading(&self, _key: &str) {}
    /// Before a listing of `prefix`.
    fn listing(&self, _prefix: &str) {}
    /// Before a `put` of `key`.
    fn storing(&self, _key: &str) {}
}

/// A handle on shared in-memory objects that tells its [`Watcher`] about reads and listings.
pub struct Watched<W> {
    pub objects: std::sync::Arc<stackvault::store::MemoryBackend>,
    pub watcher: W,
}

impl<W: Watcher> stackvault::store::Backend for Watched<W> {
    fn put(&self, key: &str, data: &[u8]) -> stackvault::Result<()> {
        self.watcher.storing(key);
        self.objects.put(key, data)
    }
    fn get(&self, key: &str) -> stackvault::Result<Vec<u8>> {
        self.watcher.reading(key);
        self.objects.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> stackvault::Result<Vec<u8>> {
        self.watcher.reading(key);
        self.objects.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> stackvault::Result<u64> {
        self.objects.size(key)
    }
    fn exists(&self, key: &str) -> stackvault::Result<bool> {
        self.objects.exists(key)
    }
    fn list_with_sizes(
        &self,
        prefix: &str,
    ) -> stackvault::Result<Vec<stackvault::store::ObjectInfo>> {
        self.watcher.listing(prefix);
        self.objects.list_with_sizes(prefix)
    }
    fn remove(&self, key: &str) -> stackvault::Result<()> {
        self.objects.remove(key)
    }
    fn version(&self, key: &str) -> stackvault::Result<stackvault::store::Version> {
        self.objects.version(key)
    }
    fn replace(
        &self,
        key: &str,
        data: &[u8],
        expected: &stackvault::store::Version,
    ) -> stackvault::Result<stackvault::store::Version> {
        self.objects.replace(key, data, expected)
    }
    fn delete_if(
        &self,
        key: &str,
        expected: &stackvault::store::Version,
    ) -> stackvault::Result<()> {
        self.objects.delete_if(key, expected)
    }
    fn writer<'a>(
        &'a self,
        dir: &str,
    ) -> stackvault::Result<Box<dyn stackvault::store::ObjectWriter + 'a>> {
        self.objects.writer(dir)
    }
}

/// Backs up the disk image at `path` as disk `disk` of `repo` through the engine, in this
/// process (no CLI), as a host of a [`SharedStore`] does.
pub fn backup_with_engine(
    repo: &stackvault::Repo,
    path: &Path,
    disk: &str,
) -> anyhow::Result<stackvault::BackupReport> {
    let source = stackvault::open_source(path, &Default::default())?;
    let options = stackvault::BackupOptions {
        disk: disk.into(),
        ..stackvault::BackupOptions::default()
    };
    Ok(stackvault::backup(
        repo,
        source.as_ref(),
        &options,
        &stackvault::NoProgress,
    )?)
}

/// The NBD URI of the first export of a `serve --json` child, read from the "ready" line it
/// prints on its stdout (piped) before it serves.
pub fn served_uri(child: &mut std::process::Child) -> anyhow::Result<String> {
    let mut stdout = BufReader::new(child.stdout.take().context("serve stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let ready: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("serve not ready: {line}"))?;
    Ok(ready["exports"][0]["uri"]
        .as_str()
        .context("export uri")?
        .to_string())
}
