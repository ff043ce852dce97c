//! Page blobs against a real Blob endpoint (Azurite, started per test) and against small local
//! stubs: round trips with SAS and Shared Key, the service's page ranges after an upload,
//! footers checked by qemu-img, retries and resume through a fault-injecting proxy, the
//! service version each profile sends and the Stack Hub step-down, and a recorded
//! Get Page Ranges diff.
//!
//! Azurite comes from `.ci/azurite.sh`. Without it the Azurite tests say so and return,
//! except under `CI=true`, where its absence is a failure.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use stackvault::azure::sign::SharedKey;
use stackvault::azure::{BlobClient, BlobOptions, Profile, RetryPolicy};
use stackvault::format::vhd_footer::{self as footer, DiskType, Footer, FOOTER_COOKIE};
use stackvault::source::PageBlobSource;
use stackvault::{
    backup, restore_to_page_blob, BackupOptions, DiskSource, InitOptions, NoProgress,
    PageBlobRestoreOptions, Repo,
};
use stackvault_tests::{outcome, p, sv_as_typed, Azurite, Disk};

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const MIB: u64 = 1 << 20;

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        tries: 6,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
    }
}

fn key_options(endpoint: &str) -> BlobOptions {
    BlobOptions {
        endpoint: Some(endpoint.to_string()),
        account_key: Some(KEY.to_string()),
        retry: fast_retry(),
        ..Default::default()
    }
}

pub(crate) fn sas_options() -> BlobOptions {
    BlobOptions {
        retry: fast_retry(),
        ..Default::default()
    }
}

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}/{ACCOUNT}")
}

fn sas_url(port: u16, container: &str, blob: &str) -> Result<String> {
    let sas = SharedKey::new(ACCOUNT, KEY)?.account_sas("racwdl", "2099-01-01T00:00:00Z");
    Ok(format!("{}/{container}/{blob}?{sas}", endpoint(port)))
}

fn create_container(port: u16, container: &str) -> Result<()> {
    let c = BlobClient::new(
        &format!("azure://{ACCOUNT}/{container}/x"),
        &key_options(&endpoint(port)),
    )?;
    c.create_container()?;
    Ok(())
}

/// Downloads a whole blob.
fn download(client: &BlobClient) -> Result<Vec<u8>> {
    let size = client.properties()?.context("blob missing")?.size;
    let mut out = vec![0u8; size as usize];
    for (i, piece) in out.chunks_mut(4 << 20).enumerate() {
        client.read_range(i as u64 * (4 << 20), piece, None)?;
    }
    Ok(out)
}

/// 512-byte pages of `data` that hold a non-zero byte, merged into ranges (end exclusive).
fn nonzero_pages(data: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, p) in data.chunks(512).enumerate() {
        if p.iter().any(|&b| b != 0) {
            let s = i as u64 * 512;
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = s + 512,
                _ => out.push((s, s + 512)),
            }
        }
    }
    out
}

/// Checks a downloaded fixed-VHD blob against the raw disk, also with qemu-img.
fn check_vhd(blob: &[u8], raw: &Path, dir: &Path, name: &str) -> Result<()> {
    let raw_bytes = std::fs::read(raw)?;
    let data_size = (raw_bytes.len() as u64).div_ceil(MIB) * MIB;
    ensure!(
        blob.len() as u64 == data_size + 512,
        "blob size {}",
        blob.len()
    );
    ensure!(
        blob[..raw_bytes.len()] == raw_bytes[..],
        "{name}: disk bytes differ from the raw source"
    );
    ensure!(blob[raw_bytes.len()..data_size as usize]
        .iter()
        .all(|&b| b == 0));
    let mut f = [0u8; 512];
    f.copy_from_slice(&blob[data_size as usize..]);
    let (parsed, warning) = Footer::decode(&f, name, data_size)?;
    ensure!(warning.is_none(), "{warning:?}");
    ensure!(parsed.current_size == data_size && parsed.disk_type == DiskType::Fixed);
    let vhd = dir.join(format!("{name}.vhd"));
    std::fs::write(&vhd, blob)?;
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(&vhd)
        .output()?;
    ensure!(
        info.status.success(),
        "qemu-img info: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    ensure!(
        info["virtual-size"].as_u64() == Some(data_size),
        "qemu-img info: {info}"
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(&vhd)
        .arg(raw)
        .output()?;
    ensure!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    Ok(())
}

/// Checks the ranges Get Page Ranges reports for a restored blob (`blob`, downloaded) against
/// its bytes: every non-zero page is written, every range begins and ends with data, no zero
/// run inside a range is longer than `gap`, all is aligned to `align`, the footer is written,
/// and the report's byte counts match.
fn check_page_ranges(
    client: &BlobClient,
    blob: &[u8],
    align: u64,
    gap: u64,
    report: &stackvault::PageBlobRestoreReport,
) -> Result<()> {
    let size = blob.len() as u64;
    let ranges = client.written_ranges(0, size)?;
    ensure!(
        ranges.last().is_some_and(|r| r.1 == size),
        "footer not written: {ranges:?}"
    );
    let page = |o: u64| &blob[o as usize..(o + align).min(size) as usize];
    let zero = |p: &[u8]| p.iter().all(|&b| b == 0);
    let written = |o: u64| ranges.iter().any(|&(s, e)| s <= o && o < e);
    for o in (0..size).step_by(align as usize) {
        ensure!(
            zero(page(o)) || written(o),
            "data page at {o} is not written: {ranges:?}"
        );
    }
    let mut zeros_inside = 0u64;
    for &(s, e) in &ranges {
        ensure!(
            s % align == 0 && (e % align == 0 || e == size),
            "range {s}..{e} is not {align}-aligned"
        );
        ensure!(
            !zero(page(s)) && !zero(page(e - (e - s).min(align))),
            "range {s}..{e} begins or ends with zeros"
        );
        let mut run = 0u64;
        for o in (s..e).step_by(align as usize) {
            if zero(page(o)) {
                run += align;
                zeros_inside += align;
                ensure!(run <= gap, "a zero run of {run} bytes at {o} was written");
            } else {
                run = 0;
            }
        }
    }
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    ensure!(
        report.uploaded_bytes == total,
        "uploaded {} bytes, the blob has {total} written",
        report.uploaded_bytes
    );
    ensure!(
        report.coalesced_zero_bytes == zeros_inside,
        "reported {} coalesced zero bytes, the ranges hold {zeros_inside}",
        report.coalesced_zero_bytes
    );
    Ok(())
}

fn new_repo(dir: &Path) -> Result<Repo> {
    Ok(Repo::init(&dir.join("repo"), &InitOptions::default())?)
}

fn backup_source(
    repo: &Repo,
    source: &dyn DiskSource,
    disk: &str,
) -> Result<stackvault::BackupReport> {
    Ok(backup(
        repo,
        source,
        &BackupOptions {
            disk: disk.into(),
            ..Default::default()
        },
        &NoProgress,
    )?)
}

#[test]
fn page_blob_round_trip_with_sas_and_shared_key() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    Disk::filled(20 * MIB + 4096 * 3, 40, 61).write(&raw)?;
    let raw_bytes = std::fs::read(&raw)?;
    let repo = new_repo(dir.path())?;
    let first = backup_source(
        &repo,
        stackvault::open_source(&raw, &Default::default())?.as_ref(),
        "web01-os",
    )?;
    create_container(az.port, "vhds")?;

    // Upload through SAS: only non-zero pages go, footer last.
    let url_a = sas_url(az.port, "vhds", "a.vhd")?;
    let snap = repo.resolve_snapshot(&first.snapshot_id, None)?;
    let options = PageBlobRestoreOptions {
        blob: sas_options(),
        journal_dir: Some(dir.path().join("journals")),
        ..Default::default()
    };
    let report = restore_to_page_blob(&repo, &snap, &url_a, &options, &NoProgress)?;
    let json = serde_json::to_string(&report)?;
    ensure!(
        !json.contains("sig=") && !json.contains("sv=2019"),
        "secret in report: {json}"
    );
    let a = BlobClient::new(&url_a, &sas_options())?;
    let data_size = (raw_bytes.len() as u64).div_ceil(MIB) * MIB;
    let expected = nonzero_pages(&raw_bytes);
    let blob_a = download(&a)?;
    check_page_ranges(&a, &blob_a, 512, report.coalesce_gap_bytes, &report)?;
    check_vhd(&blob_a, &raw, dir.path(), "a")?;

    // Back up from the blob with Shared Key, through the CLI: same disk, same root digest.
    let repo_path = dir.path().join("repo");
    let key_var = "STACKVAULT_TEST_AZURITE_KEY";
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "backup",
            p(&repo_path),
            "azure://devstoreaccount1/vhds/a.vhd",
            "--disk",
            "web01-os",
            "--full",
            "--endpoint",
            &endpoint(az.port),
            "--account-key-env",
            key_var,
            "--json",
        ],
        &[(key_var, KEY)],
    )?);
    ensure!(code == Some(0), "backup from blob failed: {err}");
    let second: serde_json::Value = serde_json::from_str(&out)?;
    // The VHD's disk is the raw disk padded to a whole MiB. (Root digests can differ from a
    // backup of the raw file: unwritten pages are known zero and never read, which this
    // branch's backup records as one hole per segment; so compare bytes.)
    ensure!(second["virtual_size_bytes"] == data_size, "{out}");
    let second_id = second["snapshot_id"].as_str().context("id")?;
    let restored = dir.path().join("from-blob.raw");
    stackvault::restore_to_file(
        &repo,
        &repo.resolve_snapshot(second_id, None)?,
        &restored,
        &stackvault::RestoreOptions {
            output_format: Some(stackvault::OutputFormat::Raw),
            ..Default::default()
        },
        &NoProgress,
    )?;
    let restored = std::fs::read(&restored)?;
    ensure!(restored.len() as u64 == data_size);
    // The snapshot keeps the blob's VHD identity, so a restore can give the disk back its id.
    let shown = repo.resolve_snapshot(second_id, None)?;
    let vhd = shown
        .meta
        .source
        .vhd
        .as_ref()
        .context("blob snapshot lacks VHD metadata")?;
    ensure!(vhd.disk_type == DiskType::Fixed && vhd.current_size == data_size);
    ensure!(
        restored[..raw_bytes.len()] == raw_bytes[..],
        "backup from the blob differs"
    );
    ensure!(restored[raw_bytes.len()..].iter().all(|&b| b == 0));
    ensure!(second["source_format"] == "vhd-fixed", "{out}");
    ensure!(!out.contains(KEY) && !err.contains(KEY));
    // A SAS URL as source: recorded redacted in the manifest.
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "backup",
            p(&repo_path),
            &url_a,
            "--disk",
            "web01-os",
            "--json",
        ],
        &[],
    )?);
    ensure!(code == Some(0), "backup via SAS failed: {err}");
    let third: serde_json::Value = serde_json::from_str(&out)?;
    let id = third["snapshot_id"].as_str().context("id")?.to_string();
    let manifest = repo.load_manifest(&id)?;
    ensure!(
        manifest
            .meta
            .source
            .path
            .ends_with("/vhds/a.vhd?<redacted>"),
        "{}",
        manifest.meta.source.path
    );
    ensure!(!out.contains("sig=") && !err.contains("sig="), "{out}{err}");

    // Restore that snapshot with Shared Key to a new blob, through the CLI.
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "restore",
            p(&repo_path),
            &id,
            "azure://devstoreaccount1/vhds/b.vhd",
            "--endpoint",
            &endpoint(az.port),
            "--account-key-env",
            key_var,
            "--journal-dir",
            p(&dir.path().join("journals")),
            "--json",
        ],
        &[(key_var, KEY)],
    )?);
    ensure!(code == Some(0), "restore to blob failed: {err}");
    let r: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        r["api_version"] == "2021-08-06" && r["output_format"] == "vhd-fixed",
        "{out}"
    );
    let b = BlobClient::new(
        "azure://devstoreaccount1/vhds/b.vhd",
        &key_options(&endpoint(az.port)),
    )?;
    let blob_b = download(&b)?;
    check_vhd(&blob_b, &raw, dir.path(), "b")?;
    ensure!(blob_b[..data_size as usize] == blob_a[..data_size as usize]);
    // verify --target proves the restored blob equals the snapshot, reading it over the API.
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "verify",
            p(&repo_path),
            &id,
            "--target",
            "azure://devstoreaccount1/vhds/b.vhd",
            "--endpoint",
            &endpoint(az.port),
            "--account-key-env",
            key_var,
            "--json",
        ],
        &[(key_var, KEY)],
    )?);
    ensure!(
        code == Some(0),
        "verify of the restored blob failed: {err}{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["outcome"] == "ok" && v["mode"] == "target", "{out}");

    // A second restore to the same blob needs --force; --existing writes into it and clears
    // what the snapshot has as zero.
    let again = restore_to_page_blob(&repo, &snap, &url_a, &options, &NoProgress);
    ensure!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("--force")),
        "{again:?}"
    );
    // Junk in the middle of a zero gap too long to be sent inside a coalesced request.
    let junk = vec![0xA5u8; 8192];
    let margin = report.coalesce_gap_bytes + 8192;
    let zero_at = (expected[0].1.div_ceil(4096) * 4096 + margin..data_size - 8192 - margin)
        .step_by(4096)
        .find(|&o| {
            raw_bytes[(o - margin) as usize..(o + 8192 + margin) as usize]
                .iter()
                .all(|&x| x == 0)
        })
        .context("no long zero gap in the sample disk")?;
    a.put_pages(zero_at, &junk)?;
    let existing = PageBlobRestoreOptions {
        existing: true,
        ..options.clone()
    };
    let r = restore_to_page_blob(&repo, &snap, &url_a, &existing, &NoProgress)?;
    ensure!(r.clear_requests >= 2, "junk not cleared: {r:?}");
    check_vhd(&download(&a)?, &raw, dir.path(), "a2")?;
    Ok(())
}

/// A 13 MiB disk with data runs of every shape, and how many Put Page requests (footer
/// included) a restore with a coalescing gap of 64 KiB needs in 4 MiB windows:
/// - window 0: a single 512-byte sector at 1536 (1); at 1 MiB, 8 KiB of data, a 16 KiB gap,
///   8 KiB (joined: 1), a 100 KiB gap, 4 KiB (1); data up to the 4 MiB boundary (1);
/// - window 1: the run crossing 4 MiB, to 4 MiB + 70000 (1); a long zero gap; dense data
///   from 6 MiB (1), crossing 8 MiB into
/// - window 2: to 10.5 MiB (1); a long zero gap to
/// - window 3: the last sector before the footer (1);
/// - the footer (1).
fn shapes_disk(path: &Path) -> Result<u64> {
    let mut disk = vec![0u8; 13 * MIB as usize];
    let mut fill = |s: u64, e: u64| {
        for (i, b) in disk[s as usize..e as usize].iter_mut().enumerate() {
            *b = ((s as usize + i) % 251) as u8 | 1;
        }
    };
    fill(1536, 2048);
    fill(MIB, MIB + 8192);
    fill(MIB + 24 * 1024, MIB + 32 * 1024);
    fill(MIB + 132 * 1024, MIB + 136 * 1024);
    fill(4 * MIB - 6000, 4 * MIB + 70_000);
    fill(6 * MIB, 10 * MIB + MIB / 2);
    fill(13 * MIB - 512, 13 * MIB);
    std::fs::write(path, &disk)?;
    Ok(9)
}

#[test]
fn page_blob_restore_coalesces_runs_of_every_shape() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("shapes.raw");
    let expected_puts = shapes_disk(&raw)?;
    let repo = new_repo(dir.path())?;
    let first = backup_source(
        &repo,
        stackvault::open_source(&raw, &Default::default())?.as_ref(),
        "shapes",
    )?;
    let snap = repo.resolve_snapshot(&first.snapshot_id, None)?;
    create_container(az.port, "shapes")?;
    let options = PageBlobRestoreOptions {
        blob: key_options(&endpoint(az.port)),
        journal_dir: Some(dir.path().join("journals")),
        ..Default::default()
    };

    // Default gap (64 KiB): requests as counted by shapes_disk, blob identical to the disk.
    let url = "azure://devstoreaccount1/shapes/a.vhd";
    let r = restore_to_page_blob(&repo, &snap, url, &options, &NoProgress)?;
    ensure!(r.coalesce_gap_bytes == 64 * 1024, "{r:?}");
    ensure!(
        r.put_requests == expected_puts && r.requests == expected_puts,
        "{} Put Page requests, {} in all; the layout needs {expected_puts}",
        r.put_requests,
        r.requests
    );
    ensure!(
        r.coalesced_zero_bytes == 16 * 1024,
        "coalesced zeros {}",
        r.coalesced_zero_bytes
    );
    let a = BlobClient::new(url, &key_options(&endpoint(az.port)))?;
    let blob = download(&a)?;
    check_vhd(&blob, &raw, dir.path(), "shapes-a")?;
    check_page_ranges(&a, &blob, 512, 64 * 1024, &r)?;

    // Through the CLI with a gap of 128 KiB: the 100 KiB gap joins too; the JSON report says
    // so with its byte counts.
    let (code, out, err) = outcome(&sv_as_typed(
        &[
            "restore",
            p(&dir.path().join("repo")),
            &first.snapshot_id,
            "azure://devstoreaccount1/shapes/b.vhd",
            "--endpoint",
            &endpoint(az.port),
            "--account-key-env",
            "STACKVAULT_TEST_AZURITE_KEY",
            "--journal-dir",
            p(&dir.path().join("journals")),
            "--coalesce-gap",
            "128KiB",
            "--parallel",
            "3",
            "--json",
        ],
        &[("STACKVAULT_TEST_AZURITE_KEY", KEY)],
    )?);
    ensure!(code == Some(0), "restore failed: {err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        j["put_requests"] == expected_puts - 1
            && j["coalesce_gap_bytes"] == 128 * 1024
            && j["parallel"] == 3
            && j["uploaded_bytes"].as_u64().is_some()
            && j["coalesced_zero_bytes"].as_u64().is_some()
            && j["throughput_bytes_per_second"].as_u64().is_some(),
        "{out}"
    );
    let b = BlobClient::new(
        "azure://devstoreaccount1/shapes/b.vhd",
        &key_options(&endpoint(az.port)),
    )?;
    let data_end = blob.len() - 512; // footers differ: a raw source gets a random id
    ensure!(
        download(&b)?[..data_end] == blob[..data_end],
        "gap 128 KiB restored other bytes"
    );
    // Gap 0: data pages only, the 16 KiB gap splits its request.
    let zero_gap = PageBlobRestoreOptions {
        coalesce_gap: Some(0),
        force: true,
        ..options.clone()
    };
    let r0 = restore_to_page_blob(&repo, &snap, url, &zero_gap, &NoProgress)?;
    ensure!(
        r0.put_requests == expected_puts + 1 && r0.coalesced_zero_bytes == 0,
        "{r0:?}"
    );
    check_page_ranges(&a, &download(&a)?, 512, 0, &r0)?;

    // Azure Stack Hub: 4 KiB pages (the lone sector at 1536 goes as the page at 0).
    let stack = PageBlobRestoreOptions {
        blob: BlobOptions {
            profile: Profile::AzureStack,
            ..key_options(&endpoint(az.port))
        },
        force: true,
        ..options.clone()
    };
    let rs = restore_to_page_blob(&repo, &snap, url, &stack, &NoProgress)?;
    ensure!(
        rs.api_version == "2019-07-07" && rs.put_requests == expected_puts,
        "{rs:?}"
    );
    let blob_s = download(&a)?;
    check_vhd(&blob_s, &raw, dir.path(), "shapes-stack")?;
    check_page_ranges(&a, &blob_s, 4096, 64 * 1024, &rs)?;
    ensure!(a.written_ranges(0, 4096)? == [(0, 4096)]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server for stubs and the fault proxy: one request per connection.

#[derive(Clone, Debug)]
pub(crate) struct Req {
    pub(crate) method: String,
    pub(crate) target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) enum Answer {
    Reply(u16, Vec<(String, String)>, Vec<u8>),
    /// Close the connection without answering.
    Reset,
    /// Answer after a pause.
    Slow(Duration, Box<Answer>),
}

pub(crate) struct Server {
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
    pub(crate) requests: Arc<Mutex<Vec<Req>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 || buf.len() > 65536 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(Req {
        method,
        target,
        headers,
        body,
    })
}

fn write_answer(stream: &mut TcpStream, answer: Answer, head_request: bool) {
    match answer {
        Answer::Reset => {
            let _ = stream.shutdown(Shutdown::Both);
        }
        Answer::Slow(d, inner) => {
            std::thread::sleep(d);
            write_answer(stream, *inner, head_request)
        }
        Answer::Reply(status, headers, body) => {
            let mut out = format!("HTTP/1.1 {status} Status\r\n");
            let has_len = headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
            for (k, v) in &headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            if !has_len {
                out.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            out.push_str("Connection: close\r\n\r\n");
            let _ = stream.write_all(out.as_bytes());
            if !head_request {
                let _ = stream.write_all(&body);
            }
            let _ = stream.flush();
        }
    }
}

pub(crate) fn serve(handler: impl Fn(&Req) -> Answer + Send + Sync + 'static) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let (stop2, requests2) = (stop.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            let (handler, requests) = (handler.clone(), requests2.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                if let Some(req) = read_request(&mut stream) {
                    if let Ok(mut r) = requests.lock() {
                        r.push(req.clone());
                    }
                    let head = req.method == "HEAD";
                    write_answer(&mut stream, handler(&req), head);
                }
            });
        }
    });
    Ok(Server {
        port,
        stop,
        requests,
    })
}

/// Forwards `req` to the server at `port` and returns its answer.
fn forward(port: u16, req: &Req) -> Answer {
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", port)) else {
        return Answer::Reset;
    };
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        if !k.eq_ignore_ascii_case("connection") {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    if up.write_all(head.as_bytes()).is_err() || up.write_all(&req.body).is_err() {
        return Answer::Reset;
    }
    let mut raw = Vec::new();
    if up.read_to_end(&mut raw).is_err() {
        return Answer::Reset;
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer::Reset;
    };
    let text = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(502);
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.eq_ignore_ascii_case("connection"))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("transfer-encoding"));
    }
    Answer::Reply(status, headers, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

#[test]
fn faults_are_retried_and_an_interrupted_restore_resumes() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    Disk::filled(24 * MIB, 60, 62).write(&raw)?;
    let repo = new_repo(dir.path())?;
    let first = backup_source(
        &repo,
        stackvault::open_source(&raw, &Default::default())?.as_ref(),
        "db01",
    )?;
    let snap = repo.resolve_snapshot(&first.snapshot_id, None)?;
    create_container(az.port, "faults")?;

    // Mode 0: a request (method, URL, range) faults on its first one or two attempts, chosen
    // by its hash: 503, connection reset, or a pause past the client's timeout then 503.
    // Every request thus needs retries but succeeds within its tries. Mode 1: after half as
    // many Put Pages as a full restore needs, every Put Page gets 503. Mode 2: pass through.
    let mode = Arc::new(AtomicU64::new(0));
    let attempts: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let puts_ok = Arc::new(AtomicU64::new(0));
    let faults = Arc::new(AtomicU64::new(0));
    let half = Arc::new(AtomicU64::new(0));
    let h = half.clone();
    let (m, seen, p, f) = (
        mode.clone(),
        attempts.clone(),
        puts_ok.clone(),
        faults.clone(),
    );
    let upstream = az.port;
    let proxy = serve(move |req| {
        let put_page = req.method == "PUT" && req.target.contains("comp=page");
        let id = format!(
            "{} {} {:?}",
            req.method,
            req.target,
            req.header("x-ms-range")
        );
        let attempt = seen
            .lock()
            .map(|mut a| {
                let n = a.entry(id.clone()).or_insert(0);
                *n += 1;
                *n
            })
            .unwrap_or(1);
        let kind = blake3::hash(id.as_bytes()).as_bytes()[0] % 4;
        let busy = || {
            Answer::Reply(
                503,
                vec![("x-ms-error-code".into(), "ServerBusy".into())],
                Vec::new(),
            )
        };
        let fault = match (m.load(Ordering::SeqCst), kind, attempt) {
            (0, 0, 1) => Some(busy()),
            (0, 1, 1) => Some(Answer::Reset),
            (0, 2, 1) => Some(Answer::Slow(Duration::from_millis(1500), Box::new(busy()))),
            (0, 2, 2) => Some(busy()),
            (1, _, _) if put_page && p.load(Ordering::SeqCst) >= h.load(Ordering::SeqCst) => {
                Some(busy())
            }
            _ => None,
        };
        if let Some(a) = fault {
            f.fetch_add(1, Ordering::SeqCst);
            return a;
        }
        let a = forward(upstream, req);
        if put_page {
            p.fetch_add(1, Ordering::SeqCst);
        }
        a
    })?;
    let mut blob = BlobOptions {
        endpoint: Some(endpoint(proxy.port)),
        account_key: Some(KEY.into()),
        retry: RetryPolicy {
            timeout: Duration::from_secs(1),
            ..fast_retry()
        },
        ..Default::default()
    };
    let options = PageBlobRestoreOptions {
        blob: blob.clone(),
        journal_dir: Some(dir.path().join("journals")),
        parallel: 3,
        ..Default::default()
    };
    let url = "azure://devstoreaccount1/faults/d.vhd";
    let report = restore_to_page_blob(&repo, &snap, url, &options, &NoProgress)?;
    ensure!(
        faults.load(Ordering::SeqCst) >= 3,
        "no faults were injected"
    );
    let direct = BlobClient::new(url, &key_options(&endpoint(az.port)))?;
    check_vhd(&download(&direct)?, &raw, dir.path(), "faulty")?;
    // Backing up through the faulty proxy reads the same disk.
    blob.retry.timeout = Duration::from_secs(1);
    let src = PageBlobSource::open(url, &blob)?;
    let again = backup_source(&repo, &src, "db01")?;
    ensure!(again.root_digest == first.root_digest);

    // Interrupted: the restore fails loudly after its tries, with the blob left without footer.
    half.store(report.put_requests / 2, Ordering::SeqCst);
    mode.store(1, Ordering::SeqCst);
    puts_ok.store(0, Ordering::SeqCst);
    faults.store(0, Ordering::SeqCst);
    let forced = PageBlobRestoreOptions {
        force: true,
        ..options.clone()
    };
    let err = restore_to_page_blob(&repo, &snap, url, &forced, &NoProgress);
    ensure!(
        matches!(err, Err(stackvault::Error::Http { status: 503, .. })),
        "expected a 503 failure, got {err:?}"
    );
    let blob_now = download(&direct)?;
    ensure!(
        blob_now[blob_now.len() - 512..][..8] != FOOTER_COOKIE,
        "footer before completion"
    );
    // Resume: confirmed windows are not sent again, the result is complete.
    mode.store(2, Ordering::SeqCst);
    let before = puts_ok.load(Ordering::SeqCst);
    let resume = PageBlobRestoreOptions {
        resume: true,
        ..options.clone()
    };
    let resumed = restore_to_page_blob(&repo, &snap, url, &resume, &NoProgress)?;
    let sent = puts_ok.load(Ordering::SeqCst) - before;
    ensure!(resumed.windows_resumed >= 1, "nothing resumed: {resumed:?}");
    // Resumed windows are not even decompressed.
    ensure!(
        resumed.restore.chunks < report.restore.chunks,
        "resume read {} chunks, a full restore {}",
        resumed.restore.chunks,
        report.restore.chunks
    );
    ensure!(
        sent < report.put_requests,
        "resume sent {sent} Put Pages, a full restore {}",
        report.put_requests
    );
    check_vhd(&download(&direct)?, &raw, dir.path(), "resumed")?;
    ensure!(
        std::fs::read_dir(dir.path().join("journals"))?.count() == 0,
        "journal left behind"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Stubs: service versions, step-down, recorded diff.

pub(crate) fn page_blob_head(size: u64) -> Answer {
    Answer::Reply(
        200,
        vec![
            ("Content-Length".into(), size.to_string()),
            ("x-ms-blob-type".into(), "PageBlob".into()),
            ("ETag".into(), "\"0x1\"".into()),
        ],
        Vec::new(),
    )
}

#[test]
fn profiles_send_their_service_versions_and_stack_hub_steps_down() -> Result<()> {
    let stub = serve(|req| match req.header("x-ms-version") {
        Some("2019-02-02" | "2019-07-07") => Answer::Reply(
            400,
            vec![("x-ms-error-code".into(), "InvalidHeaderValue".into())],
            b"<?xml version=\"1.0\"?><Error><Code>InvalidHeaderValue</Code><Message>The value \
              for one of the HTTP headers is not in the correct format.</Message><HeaderName>\
              x-ms-version</HeaderName><HeaderValue>2019-02-02</HeaderValue></Error>"
                .to_vec(),
        ),
        _ => page_blob_head(4096),
    })?;
    let url = format!(
        "http://127.0.0.1:{}/acct/c/b.vhd?sv=2019-02-02&sig=SECRET",
        stub.port
    );
    let versions = |stub: &Server| -> Vec<String> {
        let r: Vec<Req> = stub
            .requests
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default();
        r.iter()
            .filter_map(|q| q.header("x-ms-version").map(str::to_string))
            .collect()
    };
    let take = |stub: &Server| {
        if let Ok(mut r) = stub.requests.lock() {
            r.clear()
        }
    };
    // Azure: current version; a 400 is an error, no step-down.
    let azure = BlobClient::new(&url, &sas_options())?;
    azure.properties()?;
    {
        // The SAS travels in the query, untouched; no Shared Key header.
        let r = stub.requests.lock().map(|r| r.clone()).unwrap_or_default();
        ensure!(r.len() == 1 && r[0].target.ends_with("?sv=2019-02-02&sig=SECRET"));
        ensure!(r[0].header("Authorization").is_none());
    }
    ensure!(versions(&stub) == ["2021-08-06"]);
    let c = BlobClient::new(
        &url,
        &BlobOptions {
            api_version: Some("2019-02-02".into()),
            ..sas_options()
        },
    )?;
    let e = c.properties();
    ensure!(
        matches!(&e, Err(stackvault::Error::Http { status: 400, code, .. }) if code == "InvalidHeaderValue"),
        "{e:?}"
    );
    ensure!(!format!("{e:?}").contains("SECRET"));
    take(&stub);
    // Azure Stack Hub: 2019-07-07, then 2017-11-09 once refused, with a note.
    let stack = BlobOptions {
        profile: Profile::AzureStack,
        ..sas_options()
    };
    let c = BlobClient::new(&url, &stack)?;
    ensure!(c.properties()?.is_some_and(|p| p.size == 4096));
    ensure!(versions(&stub) == ["2019-07-07", "2017-11-09"]);
    ensure!(c.api_version() == "2017-11-09" && c.notes().iter().any(|n| n.contains("2017-11-09")));
    c.properties()?;
    ensure!(
        versions(&stub) == ["2017-11-09"],
        "the step-down is remembered"
    );
    // An explicit version is sent as given.
    let c = BlobClient::new(
        &url,
        &BlobOptions {
            api_version: Some("2020-04-08".into()),
            ..stack
        },
    )?;
    c.properties()?;
    ensure!(versions(&stub) == ["2020-04-08"]);
    Ok(())
}

#[test]
fn stack_hub_limits_are_checked_before_sending() -> Result<()> {
    use stackvault::restore::pageblob::check_limits;
    ensure!(check_limits(Profile::AzureStack, 1023 << 30, true).is_ok());
    let e = check_limits(Profile::AzureStack, 1024 << 30, true);
    ensure!(e.is_err_and(|e| e.to_string().contains("1023 GiB")));
    let e = check_limits(Profile::AzureStack, 1 << 40, false);
    ensure!(e.is_err_and(|e| e.to_string().contains("1 TB")));
    ensure!(check_limits(Profile::Azure, 2 << 40, false).is_ok());
    Ok(())
}

#[test]
fn since_snapshot_diff_from_a_recorded_answer() -> Result<()> {
    // Recorded from Get Page Ranges with prevsnapshot (Azurite answers 501 to it).
    const DIFF: &str = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>\
        <PageRange><Start>0</Start><End>4095</End></PageRange>\
        <ClearRange><Start>4194304</Start><End>8388607</End></ClearRange>\
        <PageRange><Start>12582912</Start><End>12587007</End></PageRange></PageList>";
    let size = 16 * MIB;
    let foot = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: u64::MAX,
        timestamp: 0,
        creator_app: *b"win ",
        creator_version: 0x000a_0000,
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: footer::chs_geometry(size),
        disk_type: DiskType::Fixed,
        unique_id: [9; 16],
        saved_state: 0,
    }
    .encode();
    let stub = serve(move |req| {
        if req.method == "HEAD" {
            return page_blob_head(size + 512);
        }
        if req.target.contains("prevsnapshot=") {
            return Answer::Reply(200, vec![], DIFF.as_bytes().to_vec());
        }
        if req.target.contains("comp=pagelist") {
            return Answer::Reply(200, vec![], b"<?xml version=\"1.0\"?><PageList><PageRange><Start>0</Start><End>4095</End></PageRange></PageList>".to_vec());
        }
        Answer::Reply(206, vec![], foot.to_vec())
    })?;
    let url = format!("http://127.0.0.1:{}/acct/c/b.vhd?sig=S", stub.port);
    let src = PageBlobSource::open(&url, &sas_options())?;
    ensure!(src.virtual_size() == size && src.info().format.as_str() == "vhd-fixed");
    ensure!(src.written_bytes() == 4096);
    let list = src.changes_since_snapshot("2026-01-01T00:00:00.0000000Z")?;
    ensure!(
        list.ranges().len() == 3 && list.disk_size() == Some(size + 512),
        "{list:?}"
    );
    let plan = list.plan(size, size, 4 << 20)?;
    use stackvault::changes::SegmentPlan::*;
    ensure!(plan == [Read, Zero, CopyParent, Read], "{plan:?}");
    let reqs = stub.requests.lock().map(|r| r.clone()).unwrap_or_default();
    let diff = reqs
        .iter()
        .find(|r| r.target.contains("prevsnapshot="))
        .context("no diff request")?;
    ensure!(
        diff.target
            .contains("prevsnapshot=2026-01-01T00%3A00%3A00.0000000Z"),
        "{}",
        diff.target
    );
    ensure!(diff.header("x-ms-range") == Some(&format!("bytes=0-{}", size + 511)[..]));
    // Reads carry If-Match with the ETag seen at open.
    ensure!(reqs
        .iter()
        .filter(|r| r.method == "GET" && !r.target.contains("comp="))
        .all(|r| r.header("If-Match") == Some("\"0x1\"")));
    Ok(())
}

#[test]
fn a_segment_is_read_in_concurrent_pieces_and_a_failed_piece_fails_it() -> Result<()> {
    use stackvault::source::pageblob::{READ_CONCURRENCY, READ_PIECE};
    let size = 4 * MIB;
    // Byte at disk offset o: a function of o, so misplaced pieces show.
    let byte = |o: u64| (o / 4096 % 251) as u8 ^ (o % 7) as u8;
    let (in_flight, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let fail_at = Arc::new(AtomicU64::new(u64::MAX));
    let (flight2, most2, fail2) = (in_flight.clone(), most.clone(), fail_at.clone());
    let stub = serve(move |req| {
        if req.method == "HEAD" {
            return page_blob_head(size);
        }
        if req.target.contains("comp=pagelist") {
            return Answer::Reply(200, vec![], format!("<?xml version=\"1.0\"?><PageList><PageRange><Start>0</Start><End>{}</End></PageRange></PageList>", size - 1).into_bytes());
        }
        let range = req
            .header("x-ms-range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)));
        let Some((start, end)) = range else {
            return Answer::Reply(400, vec![], Vec::new());
        };
        if start == fail2.load(Ordering::SeqCst) {
            return Answer::Reply(
                412,
                vec![("x-ms-error-code".into(), "ConditionNotMet".into())],
                Vec::new(),
            );
        }
        // Hold the request a while, counting how many are held at once.
        let now = flight2.fetch_add(1, Ordering::SeqCst) + 1;
        most2.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        flight2.fetch_sub(1, Ordering::SeqCst);
        Answer::Reply(206, vec![], (start..=end).map(byte).collect())
    })?;
    let url = format!("http://127.0.0.1:{}/acct/c/raw.img?sig=S", stub.port);
    // No footer cookie in the last 512 bytes: a raw disk of the blob's size.
    let src = PageBlobSource::open(&url, &sas_options())?;
    ensure!(src.virtual_size() == size && src.info().format.as_str() == "raw");

    let mut buf = vec![0u8; size as usize];
    let (head, tail) = buf.split_at_mut(3 * MIB as usize);
    src.read_many(&mut [(0, head), (3 * MIB, tail)])?;
    ensure!(
        buf.iter().enumerate().all(|(i, &b)| b == byte(i as u64)),
        "pieces landed in the wrong place"
    );
    let peak = most.load(Ordering::SeqCst);
    ensure!(
        peak >= 4 && peak <= READ_CONCURRENCY as u64,
        "{peak} GETs in flight at most"
    );
    let gets = stub
        .requests
        .lock()
        .map(|r| {
            r.iter()
                .filter(|q| {
                    q.header("x-ms-range").is_some()
                        && q.method == "GET"
                        && !q.target.contains("comp=")
                })
                .count()
        })
        .unwrap_or(0);
    // The footer probe, then 4 MiB in pieces.
    ensure!(
        gets == 1 + (size as usize).div_ceil(READ_PIECE),
        "{gets} GETs"
    );

    // The blob changed under us (If-Match fails) for one piece: the whole read fails.
    fail_at.store(2 * READ_PIECE as u64, Ordering::SeqCst);
    let mut buf = vec![0u8; size as usize];
    let err = src.read_many(&mut [(0, &mut buf[..])]).err();
    ensure!(
        err.as_ref().is_some_and(|e| e.to_string().contains("412")),
        "{err:?}"
    );
    Ok(())
}
