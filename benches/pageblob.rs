//! Page blobs across a slow link: Azurite (from `.ci/azurite.sh`) behind a local proxy that
//! delays every byte by half a round trip each way, so each request costs a round trip as it
//! would between a Stack Hub region and a repository elsewhere.
//!
//! Backup direction: the page blob source's concurrent reads (each backup worker fetches its
//! segment in pieces of `READ_PIECE`, `READ_CONCURRENCY` at a time) against one request at a
//! time per worker, at several round-trip times, alternating the two.
//!
//! Restore direction: `restore` to a page blob against Microsoft's Python SDK
//! (`azure-storage-blob`, installed by the bench into a virtualenv with pip), whose
//! `BlobClient.upload_blob(f, blob_type="PageBlob", max_concurrency=8)` uploads the same fixed
//! VHD (restored to a file beforehand) to the same Azurite in the same run, alternating the
//! two at every round trip; then the coalescing gap and the requests in flight, swept at one
//! round trip. The SDK's time is its upload alone (measured inside Python, interpreter start
//! excluded); ours is the whole `restore` process (repository open, decompression, upload).
//! A page blob accepts about 500 requests/s and 60 MiB/s, so the sweep also shows
//! `max(requests / 500, bytes / 60 MiB/s)`: the least time the service would need.
//!
//! Each backup and restore runs in a child process under `/usr/bin/time` for its peak RSS.
//!
//! `cargo bench --bench pageblob [-- --size-mib N --reps N --rtt-ms 0,20,50
//! --direction backup|restore|both --sweep-rtt-ms 20 --no-sweep --disk RAW --work DIR
//! --azurite-location DIR]`. `--disk` takes an existing raw disk (the 4 GiB gen0 of the
//! dataset) instead of a generated one; `--work` is where the repository and the fixed VHD go;
//! `--azurite-location` keeps Azurite's blobs on disk there instead of in memory (a fresh
//! Azurite, and directory, for every round trip, so the space of one round trip's blobs is
//! given back before the next). Skips with a message when Azurite or `/usr/bin/time` is
//! missing; fails when the Python SDK cannot be installed.

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
    backup, restore_to_file, restore_to_page_blob, BackupOptions, DiskSource, InitOptions,
    NoProgress, OutputFormat, PageBlobRestoreOptions, Repo, RestoreOptions,
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

/// Azurite for the bench: `stackvault_tests::Azurite` (in memory), or one keeping its blobs in
/// a directory (removed when dropped).
enum Blobs {
    InMemory(stackvault_tests::Azurite),
    OnDisk {
        child: std::process::Child,
        port: u16,
        location: std::path::PathBuf,
    },
}

impl Blobs {
    fn start(location: Option<&Path>) -> Result<Blobs> {
        let Some(location) = location else {
            return Ok(Blobs::InMemory(stackvault_tests::Azurite::start()?));
        };
        let _ = std::fs::remove_dir_all(location);
        std::fs::create_dir_all(location)?;
        let mut child = Command::new(stackvault_tests::azurite_bin())
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--location"])
            .arg(location)
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start Azurite")?;
        let stdout = child.stdout.take().context("azurite stdout")?;
        let (tx, rx) = channel();
        // Keep reading its output: Azurite dies of SIGPIPE when nobody does.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                if let Some(rest) = line.split("listens on http://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().ok());
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(port)) => port,
            _ => {
                let _ = child.kill();
                bail!("Azurite did not say which port it listens on")
            }
        };
        Ok(Blobs::OnDisk {
            child,
            port,
            location: location.to_path_buf(),
        })
    }

    fn port(&self) -> u16 {
        match self {
            Blobs::InMemory(a) => a.port,
            Blobs::OnDisk { port, .. } => *port,
        }
    }

    /// A fresh Azurite with the bench's container.
    fn start_with_container(location: Option<&Path>) -> Result<Blobs> {
        let blobs = Blobs::start(location)?;
        BlobClient::new(
            &format!("azure://{ACCOUNT}/vhds/x"),
            &BlobOptions {
                endpoint: Some(format!("http://127.0.0.1:{}/{ACCOUNT}", blobs.port())),
                account_key: Some(KEY.to_string()),
                ..Default::default()
            },
        )?
        .create_container()?;
        Ok(blobs)
    }
}

impl Drop for Blobs {
    fn drop(&mut self) {
        if let Blobs::OnDisk {
            child, location, ..
        } = self
        {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(location);
        }
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

/// Child mode: one restore of `--repo`'s latest snapshot to the page blob `--blob` at
/// `--endpoint` (replacing it), with `--parallel` requests in flight and `--gap` bytes of
/// coalescing gap. Prints requests, uploaded bytes and coalesced zero bytes.
fn measure_restore() -> Result<()> {
    let repo = Repo::open(Path::new(&arg("--repo", "")))?;
    let snapshot = repo.resolve_snapshot("latest", None)?;
    let options = PageBlobRestoreOptions {
        blob: BlobOptions {
            endpoint: Some(arg("--endpoint", "")),
            account_key: Some(KEY.to_string()),
            ..Default::default()
        },
        force: true,
        journal_dir: Some(Path::new(&arg("--journals", "")).to_path_buf()),
        parallel: arg("--parallel", "0").parse()?,
        coalesce_gap: Some(arg("--gap", "65536").parse()?),
        ..Default::default()
    };
    let url = format!("azure://{ACCOUNT}/vhds/{}", arg("--blob", ""));
    let r = restore_to_page_blob(&repo, &snapshot, &url, &options, &NoProgress)?;
    println!(
        "{} {} {}",
        r.requests, r.uploaded_bytes, r.coalesced_zero_bytes
    );
    Ok(())
}

/// Runs `cmd` under `/usr/bin/time`; returns (wall seconds, stdout, peak RSS MiB).
fn timed(mut cmd: Command, rss_file: &Path) -> Result<(f64, String, f64)> {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M", "-o"])
        .arg(rss_file)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let _ = &mut cmd;
    let started = Instant::now();
    let out = timed.output().context("run /usr/bin/time")?;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let kb: f64 = std::fs::read_to_string(rss_file)?
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()?;
    Ok((
        wall,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        kb / 1024.0,
    ))
}

/// One restore in a child process: (wall s, requests, uploaded bytes, zero bytes, RSS MiB).
fn run_restore_child(
    endpoint: &str,
    repo: &Path,
    work: &Path,
    parallel: usize,
    gap: u64,
) -> Result<(f64, u64, u64, u64, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--measure-restore", "--endpoint", endpoint, "--repo"])
        .arg(repo)
        .arg("--journals")
        .arg(work.join("journals"))
        .args(["--blob", "ours.vhd", "--parallel"])
        .arg(parallel.to_string())
        .arg("--gap")
        .arg(gap.to_string());
    let (wall, out, rss) = timed(cmd, &work.join("restore.rss"))?;
    let v: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    let [requests, bytes, zeros] = v[..] else {
        bail!("restore child printed {out:?}");
    };
    Ok((wall, requests, bytes, zeros, rss))
}

/// The SDK's upload script: prints upload seconds and the number of HTTP answers.
const SDK_UPLOAD: &str = r#"
import sys, time
from azure.storage.blob import BlobServiceClient
endpoint, key, path = sys.argv[1], sys.argv[2], sys.argv[3]
conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;"
        "BlobEndpoint=%s;" % (key, endpoint))
blob = BlobServiceClient.from_connection_string(conn).get_blob_client("vhds", "sdk.vhd")
answers, sent = [0], [0]
def count(response):
    answers[0] += 1
    request = response.http_request
    if request.method == "PUT" and "comp=page" in request.url:
        sent[0] += int(request.headers.get("Content-Length") or 0)
started = time.monotonic()
with open(path, "rb") as f:
    blob.upload_blob(f, blob_type="PageBlob", max_concurrency=8, overwrite=True,
                     raw_response_hook=count)
print(time.monotonic() - started, answers[0], sent[0])
"#;

/// A virtualenv with `azure-storage-blob`, made once under `target/`.
fn sdk_python() -> Result<std::path::PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-venv");
    let python = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import azure.storage.blob"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok(&python) {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        ensure_ok(status, "python3 -m venv")?;
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "azure-storage-blob"])
            .status()
            .context("pip install azure-storage-blob")?;
        ensure_ok(status, "pip install azure-storage-blob")?;
    }
    Ok(python)
}

fn ensure_ok(status: std::process::ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// One SDK upload: (upload s, HTTP answers, bytes sent with Put Page, peak RSS MiB).
fn run_sdk(python: &Path, endpoint: &str, vhd: &Path, work: &Path) -> Result<(f64, u64, u64, f64)> {
    let mut cmd = Command::new(python);
    cmd.args(["-c", SDK_UPLOAD, endpoint, KEY]).arg(vhd);
    let (_, out, rss) = timed(cmd, &work.join("sdk.rss"))?;
    let mut it = out.split_whitespace();
    let secs: f64 = it.next().context("no time")?.parse()?;
    let answers: u64 = it.next().context("no count")?.parse()?;
    let sent: u64 = it.next().context("no byte count")?.parse()?;
    Ok((secs, answers, sent, rss))
}

/// Bytes in 512-byte pages of the file at `path` that hold a non-zero byte: the data.
fn nonzero_page_bytes(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += buf[..n]
            .chunks(512)
            .filter(|p| p.iter().any(|&b| b != 0))
            .map(|p| p.len() as u64)
            .sum::<u64>();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn endpoint_at(port: u16, rtt: u64) -> Result<String> {
    let port = if rtt == 0 {
        port
    } else {
        start_proxy(port, Duration::from_millis(rtt))?
    };
    Ok(format!("http://127.0.0.1:{port}/{ACCOUNT}"))
}

/// The restore direction: ours against the SDK at every round trip, then the sweeps.
fn bench_restore(
    location: Option<&Path>,
    repo: &Path,
    snapshot: &stackvault::SnapshotSummary,
    data_bytes: u64,
    dir: &Path,
    rtts: &[u64],
    reps: usize,
) -> Result<()> {
    let python = sdk_python()?;
    let repo_handle = Repo::open(repo)?;
    let vhd = dir.join("disk.vhd");
    restore_to_file(
        &repo_handle,
        snapshot,
        &vhd,
        &RestoreOptions {
            output_format: Some(OutputFormat::VhdFixed),
            force: true,
            ..Default::default()
        },
        &NoProgress,
    )?;
    let vhd_len = std::fs::metadata(&vhd)?.len();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\nrestore to a page blob: {:.0} MiB fixed VHD, {:.0} MiB of data",
        mib(vhd_len),
        mib(data_bytes)
    );
    println!(
        "| round trip | tool | wall s (median of {reps}) | requests | MiB sent | requests per MiB \
         of data | peak RSS MiB | ours / SDK |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut blobs = None;
    for &rtt in rtts {
        // The previous round trip's Azurite (and its blobs) goes before the next starts.
        drop(blobs.take());
        let fresh = Blobs::start_with_container(location)?;
        let endpoint = endpoint_at(fresh.port(), rtt)?;
        blobs = Some(fresh);
        let (mut ours, mut sdk) = (Vec::new(), Vec::new());
        let (mut ours_rss, mut sdk_rss) = (0f64, 0f64);
        let (mut ours_req, mut ours_bytes, mut sdk_req, mut sdk_bytes) = (0, 0, 0, 0);
        for rep in 0..reps {
            for sdk_first in [[true, false], [false, true]][rep % 2] {
                if sdk_first {
                    let (t, n, b, rss) = run_sdk(&python, &endpoint, &vhd, dir)?;
                    sdk.push(t);
                    sdk_rss = sdk_rss.max(rss);
                    (sdk_req, sdk_bytes) = (n, b);
                } else {
                    let (t, n, b, _, rss) = run_restore_child(
                        &endpoint,
                        repo,
                        dir,
                        0,
                        stackvault::azure::pagewriter::DEFAULT_COALESCE_GAP,
                    )?;
                    ours.push(t);
                    ours_rss = ours_rss.max(rss);
                    (ours_req, ours_bytes) = (n, b);
                }
            }
        }
        let (o, s) = (median(ours), median(sdk));
        println!(
            "| {rtt} ms | stackvault restore | {o:.2} | {ours_req} | {:.0} | {:.2} | {ours_rss:.0} | \
             {:.2} |",
            mib(ours_bytes),
            ours_req as f64 / mib(data_bytes),
            o / s
        );
        println!(
            "| {rtt} ms | SDK upload_blob(max_concurrency=8) | {s:.2} | {sdk_req} | {:.0} | {:.2} | \
             {sdk_rss:.0} | |",
            mib(sdk_bytes),
            sdk_req as f64 / mib(data_bytes)
        );
    }

    if std::env::args().any(|a| a == "--no-sweep") {
        return Ok(());
    }
    drop(blobs.take());
    let blobs = Blobs::start_with_container(location)?;
    let sweep_rtt: u64 = arg("--sweep-rtt-ms", "20").parse()?;
    let endpoint = endpoint_at(blobs.port(), sweep_rtt)?;
    println!("\ncoalescing gap at {sweep_rtt} ms round trip, default in flight:");
    println!(
        "| gap | wall s | requests | MiB sent | of them zeros MiB | service bound s \
         (500 req/s, 60 MiB/s) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for gap in [
        0u64,
        16 << 10,
        32 << 10,
        64 << 10,
        128 << 10,
        256 << 10,
        1 << 20,
    ] {
        let (t, n, b, z, _) = run_restore_child(&endpoint, repo, dir, 0, gap)?;
        let bound = (n as f64 / 500.0).max(mib(b) / 60.0);
        println!(
            "| {} KiB | {t:.2} | {n} | {:.0} | {:.1} | {bound:.2} |",
            gap >> 10,
            mib(b),
            mib(z)
        );
    }
    println!("\nrequests in flight at {sweep_rtt} ms round trip, gap 64 KiB:");
    println!("| in flight | wall s | peak RSS MiB |");
    println!("|---:|---:|---:|");
    for parallel in [1usize, 4, 8, 16, 32] {
        let (t, _, _, _, rss) = run_restore_child(&endpoint, repo, dir, parallel, 64 << 10)?;
        println!("| {parallel} | {t:.2} | {rss:.0} |");
    }
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--measure") {
        return measure();
    }
    if std::env::args().any(|a| a == "--measure-restore") {
        return measure_restore();
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
    let direction = arg("--direction", "both");

    let location = Some(arg("--azurite-location", ""))
        .filter(|l| !l.is_empty())
        .map(std::path::PathBuf::from);
    let work = arg("--work", "");
    let dir = if work.is_empty() {
        tempfile::tempdir()?
    } else {
        std::fs::create_dir_all(&work)?;
        tempfile::tempdir_in(&work)?
    };
    let given = arg("--disk", "");
    let disk = if given.is_empty() {
        let disk = dir.path().join("disk.raw");
        stackvault_tests::Disk::filled(size_mib << 20, 60, 7).write(&disk)?;
        disk
    } else {
        std::path::PathBuf::from(given)
    };
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
    let snapshot = repo.resolve_snapshot(&first.snapshot_id, None)?;
    if direction == "restore" || direction == "both" {
        bench_restore(
            location.as_deref(),
            &dir.path().join("seed"),
            &snapshot,
            nonzero_page_bytes(&disk)?,
            dir.path(),
            &rtts,
            reps,
        )?;
    }
    if direction == "restore" {
        return Ok(());
    }
    let azurite = Blobs::start(location.as_deref())?;
    let port = azurite.port();
    let direct = format!("http://127.0.0.1:{port}/{ACCOUNT}");
    let url = format!("azure://{ACCOUNT}/vhds/disk.vhd");
    BlobClient::new(&url, &key_options(direct.clone()))?.create_container()?;
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
