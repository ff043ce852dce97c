//! Backup from a page blob across a slow link: Azurite (from `.ci/azurite.sh`) behind a local
//! proxy that delays every byte by half a round trip each way, so each ranged GET costs a
//! round trip as it would between a Stack Hub region and a repository elsewhere. Compares the
//! page blob source's concurrent reads (each backup worker fetches its segment in pieces of
//! `READ_PIECE`, `READ_CONCURRENCY` at a time) with one request at a time per worker, at
//! several round-trip times, alternating the two.
//!
//! Each backup runs in a child process under `/usr/bin/time` for its peak RSS.
//!
//! `cargo bench --bench pageblob [-- --size-mib N --reps N --rtt-ms 0,20,50]`. Skips with a
//! message when Azurite or `/usr/bin/time` is missing.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stackvault::azure::sign::SharedKey;
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault::format::manifest::SourceInfo;
use stackvault::source::pageblob::READ_CONCURRENCY;
use stackvault::source::{PageBlobSource, SourceChanges, SourceExtent};
use stackvault::{
    backup, restore_to_page_blob, BackupOptions, DiskSource, InitOptions, NoProgress,
    PageBlobRestoreOptions, Repo,
};

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Copies `from` to `to`, each piece no earlier than `delay` after it arrived: latency
/// without a bandwidth limit.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    for (at, data) in rx {
        std::thread::sleep((at + delay).saturating_duration_since(Instant::now()));
        if to.write_all(&data).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = reader.join();
}

/// A proxy to `127.0.0.1:upstream` adding `rtt` per request-response exchange.
fn start_proxy(upstream: u16, rtt: Duration) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(|c| c.ok()) {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || delayed_copy(client, s2, rtt / 2));
            std::thread::spawn(move || delayed_copy(server, c2, rtt / 2));
        }
    });
    Ok(port)
}

/// The page blob source read one request at a time per backup worker (the default
/// `read_many`), as before concurrent reads.
struct OneReadPerCore(PageBlobSource);

impl DiskSource for OneReadPerCore {
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn info(&self) -> SourceInfo {
        self.0.info()
    }
    fn extents(&self, offset: u64, len: u64) -> stackvault::Result<Vec<SourceExtent>> {
        self.0.extents(offset, len)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> stackvault::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn changes_since(&self, parent: &SourceInfo) -> stackvault::Result<SourceChanges> {
        self.0.changes_since(parent)
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Child mode: one backup of the blob at `--endpoint`, into `--repo`, with one read per core
/// (`--one-per-core`) or the source's own concurrency. Run under `/usr/bin/time` for its
/// peak RSS.
fn measure() -> Result<()> {
    let endpoint = arg("--endpoint", "");
    let options = BlobOptions {
        endpoint: Some(endpoint),
        account_key: Some(KEY.to_string()),
        ..Default::default()
    };
    let blob = PageBlobSource::open(&format!("azure://{ACCOUNT}/vhds/disk.vhd"), &options)?;
    let repo = Repo::init(Path::new(&arg("--repo", "")), &InitOptions::default())?;
    let options = BackupOptions {
        disk: "bench".into(),
        ..Default::default()
    };
    let report = if std::env::args().any(|a| a == "--one-per-core") {
        backup(&repo, &OneReadPerCore(blob), &options, &NoProgress)?
    } else {
        backup(&repo, &blob, &options, &NoProgress)?
    };
    println!("{}", report.stats.bytes_read);
    Ok(())
}

/// Runs [`measure`] in a child process; returns (wall seconds, bytes read, peak RSS MiB).
fn run_child(endpoint: &str, repo: &Path, one_per_core: bool) -> Result<(f64, u64, f64)> {
    let exe = std::env::current_exe()?;
    let rss_file = repo.with_extension("rss");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(exe)
        .args(["--measure", "--endpoint", endpoint, "--repo"])
        .arg(repo);
    if one_per_core {
        cmd.arg("--one-per-core");
    }
    let started = Instant::now();
    let out = cmd.output().context("run /usr/bin/time")?;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("backup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let read = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let kb: f64 = std::fs::read_to_string(&rss_file)?
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()?;
    Ok((wall, read, kb / 1024.0))
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--measure") {
        return measure();
    }
    if !stackvault_tests::azurite_bin().exists() || !Path::new("/usr/bin/time").exists() {
        println!(
            "SKIP: needs Azurite (run .ci/azurite.sh) and /usr/bin/time (apt-get install time)"
        );
        return Ok(());
    }
    let size_mib: u64 = arg("--size-mib", "512").parse()?;
    let reps: usize = arg("--reps", "3").parse()?;
    let rtts: Vec<u64> = arg("--rtt-ms", "0,20,50")
        .split(',')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;

    let azurite = stackvault_tests::Azurite::start()?;
    let port = azurite.port;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    stackvault_tests::make_sample_disk(&disk, size_mib << 20, 60, 7)?;
    let repo = Repo::init(&dir.path().join("seed"), &InitOptions::default())?;
    let options = BackupOptions {
        disk: "bench".into(),
        ..Default::default()
    };
    let source = stackvault::open_source(&disk, &Default::default())?;
    let first = backup(&repo, source.as_ref(), &options, &NoProgress)?;
    let key_options = |endpoint: String| BlobOptions {
        endpoint: Some(endpoint),
        account_key: Some(KEY.to_string()),
        ..Default::default()
    };
    let direct = format!("http://127.0.0.1:{port}/{ACCOUNT}");
    let url = format!("azure://{ACCOUNT}/vhds/disk.vhd");
    BlobClient::new(&url, &key_options(direct.clone()))?.create_container()?;
    let snapshot = repo.resolve_snapshot(&first.snapshot_id, None)?;
    restore_to_page_blob(
        &repo,
        &snapshot,
        &format!(
            "{direct}/vhds/disk.vhd?{}",
            SharedKey::new(ACCOUNT, KEY)?.account_sas("racwdl", "2099-01-01T00:00:00Z")
        ),
        &PageBlobRestoreOptions {
            journal_dir: Some(dir.path().join("journals")),
            ..Default::default()
        },
        &NoProgress,
    )?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!(
        "| round trip | GETs in flight, at most | backup s (median of {reps}) | MB/s of data read | \
         peak RSS MiB |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for rtt in rtts {
        let endpoint = if rtt == 0 {
            direct.clone()
        } else {
            let proxy = start_proxy(port, Duration::from_millis(rtt))?;
            format!("http://127.0.0.1:{proxy}/{ACCOUNT}")
        };
        let mut times = [Vec::new(), Vec::new()];
        let mut rss = [0f64; 2];
        let mut read = 0;
        for rep in 0..reps {
            for concurrent in [[false, true], [true, false]][rep % 2] {
                let target = dir.path().join(format!("r-{rtt}-{rep}-{concurrent}"));
                let (wall, bytes, peak) = run_child(&endpoint, &target, !concurrent)?;
                times[usize::from(concurrent)].push(wall);
                rss[usize::from(concurrent)] = rss[usize::from(concurrent)].max(peak);
                read = bytes;
                std::fs::remove_dir_all(&target)?;
            }
        }
        for (concurrent, t) in times.iter_mut().enumerate() {
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            let flight = if concurrent == 1 {
                cores * READ_CONCURRENCY
            } else {
                cores
            };
            println!(
                "| {rtt} ms | {flight} | {median:.2} | {:.0} | {:.0} |",
                read as f64 / median / 1e6,
                rss[concurrent]
            );
        }
    }
    Ok(())
}
