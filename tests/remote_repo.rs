//! Repositories on object storage from the command line, end to end: every command on an
//! S3 repository (moto) and on an Azure one (Azurite), restores compared byte for byte; two
//! hosts with separate caches backing up into one repository at once; copies local → S3 →
//! Azure → local; and the request economy the `requests` object of `--json` reports.
//!
//! Every command runs the real `stackvault` binary as a child process with credentials in its
//! environment only and `XDG_CACHE_HOME` pointing at the host's own cache, so the per-host
//! endpoint memory and index cache are exercised as a user meets them: `--endpoint` is given
//! once (at `init`, or at a host's first command) and remembered.
//!
//! moto runs with signature checks off ([`Moto::start_unchecked`]): repositories list their
//! objects, and moto 5.2.1 checks listing signatures wrongly (see tests/moto.rs).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions};
use stackvault_tests::{
    azurite_bin, have_qemu_img, json_change_list, make_disk, p, qemu_img, same_bytes,
    scribble_disk, served_uri, Azurite, Disk,
};

use crate::moto::Moto;

const MIB: u64 = 1 << 20;
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret).
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn moto() -> Option<Moto> {
    Moto::start_unchecked()
}

fn azurite() -> Result<Option<Azurite>> {
    if !azurite_bin().exists() {
        ensure!(
            !in_ci(),
            "{} missing under CI=true: run .ci/azurite.sh",
            azurite_bin().display()
        );
        eprintln!("SKIP: Azurite not installed; run .ci/azurite.sh to enable this test");
        return Ok(None);
    }
    Azurite::start().map(Some)
}

/// A repository location on a running server, with the endpoint to reach it.
struct Remote {
    location: String,
    endpoint: String,
}

/// `s3://BUCKET/PREFIX` on moto, the bucket created.
fn s3_remote(moto: &Moto, bucket: &str, prefix: &str) -> Result<Remote> {
    moto.backend(&format!("s3://{bucket}"))?;
    Ok(Remote {
        location: format!("s3://{bucket}/{prefix}"),
        endpoint: moto.endpoint(),
    })
}

/// `azure://devstoreaccount1/CONTAINER/PREFIX` on Azurite, the container created.
fn azure_remote(azurite: &Azurite, container: &str, prefix: &str) -> Result<Remote> {
    let endpoint = format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", azurite.port);
    let options = AzureStoreOptions {
        endpoint: Some(endpoint.clone()),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(AZURITE_KEY.into()))
    };
    let container_location = format!("azure://{AZURITE_ACCOUNT}/{container}");
    AzureBlobBackend::open(&container_location, &options)?.create_container()?;
    Ok(Remote {
        location: format!("{container_location}/{prefix}"),
        endpoint,
    })
}

/// One backup host: its own cache directory and the credentials of every store in its
/// environment (never on the command line).
struct Host {
    cache: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
}

impl Host {
    fn new(moto: Option<&Moto>) -> Result<Host> {
        let mut env = vec![("AZURE_STORAGE_KEY", AZURITE_KEY.to_string())];
        if let Some(m) = moto {
            env.push(("AWS_ACCESS_KEY_ID", m.access_key_id.clone()));
            env.push(("AWS_SECRET_ACCESS_KEY", m.secret_access_key.clone()));
            env.push(("AWS_REGION", "us-east-1".to_string()));
        }
        Ok(Host {
            cache: tempfile::tempdir()?,
            env,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = stackvault_tests::sv_command();
        cmd.arg("--quiet")
            .args(args)
            .env("XDG_CACHE_HOME", self.cache.path())
            .env_remove("STACKVAULT_REPOSITORY")
            .env_remove("STACKVAULT_ENDPOINT");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("run stackvault {args:?}"))
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        checked(self.run(args)?, args)
    }

    /// Runs a command with `--json` that must succeed; returns its document.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all)?;
        serde_json::from_str(&out).with_context(|| format!("{args:?} printed no JSON: {out}"))
    }

    /// Backs up `disk` as `name`; returns the report.
    fn backup(&self, repo: &str, disk: &Path, name: &str, extra: &[&str]) -> Result<Value> {
        let mut args = vec!["backup", repo, p(disk), "--disk", name];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Restores `snapshot` to a fresh file and checks it equals `expected` byte for byte.
    fn assert_restores(&self, repo: &str, snapshot: &str, expected: &Path) -> Result<Value> {
        let out = self
            .cache
            .path()
            .join(format!("restored-{}.img", &snapshot[..12]));
        let report = self.json(&["restore", repo, snapshot, p(&out), "--force"])?;
        ensure!(
            same_bytes(&out, expected)?,
            "restore of {snapshot} from {repo} differs from {}",
            expected.display()
        );
        std::fs::remove_file(&out)?;
        Ok(report)
    }
}

fn checked(out: Output, args: &[&str]) -> Result<String> {
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

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v[key]
        .as_str()
        .with_context(|| format!("no {key} in {v:#}"))
}

/// Requests in a `requests` object that upload: a single PUT, or the parts of a multipart / block upload with the
/// calls that open and complete it.
fn upload_requests(requests: &Value) -> u64 {
    [
        "put",
        "put_blob",
        "put_block",
        "put_block_list",
        "upload_part",
        "create_multipart",
        "complete_multipart",
    ]
    .iter()
    .map(|k| requests[*k].as_u64().unwrap_or(0))
    .sum()
}

// ---- 1. every command on a remote repository

/// Walks every command over the repository `remote`, comparing each restore with its disk.
fn every_command_on(host: &Host, remote: &Remote, work: &Path) -> Result<()> {
    let repo = remote.location.as_str();
    host.ok(&["--endpoint", &remote.endpoint, "init", repo])?;

    let disk = work.join("vm.img");
    make_disk(&disk, 40 * MIB, 11)?;
    let gen0 = work.join("vm-gen0.img");
    std::fs::copy(&disk, &gen0)?;
    let full = host.backup(repo, &disk, "vm", &[])?;
    ensure!(full["kind"] == "full", "{full:#}");
    ensure!(
        full["requests"]["total"].as_u64().unwrap_or(0) > 0,
        "a backup to {repo} reports no requests: {full:#}"
    );
    let id0 = text(&full, "snapshot_id")?.to_string();

    scribble_disk(&disk, 12, 5)?;
    let incr = host.backup(repo, &disk, "vm", &[])?;
    ensure!(incr["parent"] == id0.as_str(), "{incr:#}");
    let id1 = text(&incr, "snapshot_id")?.to_string();

    let list = host.json(&["snapshots", repo])?;
    let ids: Vec<&str> = list["snapshots"]
        .as_array()
        .context("snapshot list")?
        .iter()
        .filter_map(|s| s["snapshot_id"].as_str())
        .collect();
    ensure!(ids == [id0.as_str(), id1.as_str()], "{list:#}");

    let restored = host.assert_restores(repo, &id0, &gen0)?;
    ensure!(
        ["get", "get_blob"]
            .iter()
            .any(|k| restored["requests"][*k].as_u64().unwrap_or(0) > 0),
        "a restore from {repo} reports no GET: {restored:#}"
    );
    host.assert_restores(repo, &id1, &disk)?;
    // Human output on a remote repository ends with one line of request counts.
    let human = host.ok(&["restore", repo, &id1, p(&work.join("h.img")), "--force"])?;
    ensure!(
        human
            .lines()
            .any(|l| l.trim_start().starts_with("requests: ")),
        "{human}"
    );

    // A fixed VHD: the disk's bytes followed by a 512-byte footer.
    let vhd = work.join("vm.vhd");
    host.ok(&[
        "restore",
        repo,
        &id1,
        p(&vhd),
        "--output-format",
        "vhd-fixed",
    ])?;
    let (vhd_bytes, raw_bytes) = (std::fs::read(&vhd)?, std::fs::read(&disk)?);
    ensure!(
        vhd_bytes.len() == raw_bytes.len() + 512
            && vhd_bytes[..raw_bytes.len()] == raw_bytes[..]
            && vhd_bytes[raw_bytes.len()..].starts_with(b"conectix"),
        "the fixed VHD restored from {repo} is not the disk plus a footer"
    );
    std::fs::remove_file(&vhd)?;

    host.ok(&["verify", repo, &id1])?;
    host.ok(&["check", repo])?;
    let read_data = host.json(&["check", repo, "--read-data"])?;
    ensure!(read_data["ok"] != false, "{read_data:#}");

    let diff = host.json(&["diff", repo, &id0, &id1])?;
    ensure!(
        diff["changed_bytes"].as_u64().unwrap_or(0) > 0,
        "diff saw no change: {diff:#}"
    );
    let stats = host.json(&["stats", repo])?;
    ensure!(stats["repository"].is_object(), "{stats:#}");

    // copy to a local repository with the same parameters.
    let local = work.join("local");
    host.ok(&["init", p(&local), "--like", repo])?;
    let copied = host.json(&["copy", "--from", repo, "--to", p(&local)])?;
    ensure!(
        copied["requests"]["from"].is_object() && copied["requests"]["to"].is_null(),
        "{copied:#}"
    );
    // The copy is named by the destination's keys: its id comes from the copy's report.
    let copy_of_id1 = copied["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["snapshot_id"] == id1.as_str()))
        .and_then(|s| s["destination_snapshot_id"].as_str())
        .context("the copy report names no copy of the newest snapshot")?
        .to_string();
    host.assert_restores(p(&local), &copy_of_id1, &disk)?;

    serve_through_nbd(host, repo, &id1, &disk, work)?;

    let standby = work.join("standby.img");
    host.json(&["standby", "sync", "-r", repo, "--disk", "vm", p(&standby)])?;
    ensure!(
        same_bytes(&standby, &disk)?,
        "standby file synced from {repo} differs from the disk"
    );

    host.json(&["forget", repo, &id0])?;
    host.json(&["prune", repo, "--max-unused", "0%"])?;
    host.assert_restores(repo, &id1, &disk)?;
    host.ok(&["check", repo, "--read-data"])?;
    Ok(())
}

/// `serve` one snapshot over NBD and read it whole with `qemu-img convert`.
fn serve_through_nbd(host: &Host, repo: &str, id: &str, disk: &Path, work: &Path) -> Result<()> {
    if !have_qemu_img() {
        ensure!(!in_ci(), "qemu-img missing under CI=true");
        eprintln!("SKIP (serve only): qemu-img not installed");
        return Ok(());
    }
    let socket = work.join("sv.sock");
    let nbd = format!("unix:{}", p(&socket));
    let mut child = host
        .command(&["-r", repo, "serve", id, "--json", "--nbd", &nbd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<()> {
        let uri = served_uri(&mut child)?;
        let out = work.join("served.img");
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, p(&out)])?;
        ensure!(
            same_bytes(&out, disk)?,
            "the disk served from {repo} differs"
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn every_command_works_on_an_s3_repository() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let work = tempfile::tempdir()?;
    let remote = s3_remote(&moto, "vault", "erp")?;
    every_command_on(&Host::new(Some(&moto))?, &remote, work.path())
}

#[test]
fn every_command_works_on_an_azure_repository() -> Result<()> {
    let Some(azurite) = azurite()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let remote = azure_remote(&azurite, "vault", "erp")?;
    every_command_on(&Host::new(None)?, &remote, work.path())
}

// ---- 2. two hosts, separate caches, one repository, at the same time

fn spawn_backup(host: &Host, remote: &Remote, disk: &Path, name: &str) -> Result<Child> {
    Ok(host
        .command(&[
            "--endpoint",
            &remote.endpoint,
            "backup",
            &remote.location,
            p(disk),
            "--disk",
            name,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn two_hosts_at_once(remote: &Remote, a: &Host, b: &Host, work: &Path) -> Result<()> {
    let repo = remote.location.as_str();
    a.ok(&["--endpoint", &remote.endpoint, "init", repo])?;
    let (disk_a, disk_b) = (work.join("a.img"), work.join("b.img"));
    make_disk(&disk_a, 36 * MIB, 21)?;
    make_disk(&disk_b, 36 * MIB, 57)?;
    // Started together: both write packs, deltas and a manifest while the other does.
    let (child_a, child_b) = (
        spawn_backup(a, remote, &disk_a, "web01")?,
        spawn_backup(b, remote, &disk_b, "db01")?,
    );
    let (out_a, out_b) = (child_a.wait_with_output()?, child_b.wait_with_output()?);
    let report = |out: Output, who: &str| -> Result<String> {
        let doc: Value = serde_json::from_str(&checked(out, &[who])?)?;
        Ok(text(&doc, "snapshot_id")?.to_string())
    };
    let (id_a, id_b) = (report(out_a, "backup A")?, report(out_b, "backup B")?);
    // Each host restores the other's snapshot, learning its packs from the index deltas.
    a.assert_restores(repo, &id_b, &disk_b)?;
    b.assert_restores(repo, &id_a, &disk_a)?;
    b.ok(&["check", repo, "--read-data"])?;
    Ok(())
}

#[test]
fn two_hosts_back_up_into_one_s3_repository_at_once() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let work = tempfile::tempdir()?;
    let remote = s3_remote(&moto, "shared", "fleet")?;
    let (a, b) = (Host::new(Some(&moto))?, Host::new(Some(&moto))?);
    two_hosts_at_once(&remote, &a, &b, work.path())
}

#[test]
fn two_hosts_back_up_into_one_azure_repository_at_once() -> Result<()> {
    let Some(azurite) = azurite()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let remote = azure_remote(&azurite, "shared", "fleet")?;
    let (a, b) = (Host::new(None)?, Host::new(None)?);
    two_hosts_at_once(&remote, &a, &b, work.path())
}

// ---- 3. copy local → S3 → Azure → local

#[test]
fn copies_go_local_to_s3_to_azure_to_local_unchanged() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let Some(azurite) = azurite()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let work = work.path();
    let host = Host::new(Some(&moto))?;
    let s3 = s3_remote(&moto, "offsite", "copy")?;
    let azure = azure_remote(&azurite, "offsite", "copy")?;

    let local = work.join("local");
    // Plain, and so are the copies made `--like` it: ids then survive every hop (between
    // encrypted repositories with their own keys a copy is re-chunked and renamed).
    host.ok(&["init", p(&local), "--encryption", "none"])?;
    let disk = work.join("vm.img");
    make_disk(&disk, 36 * MIB, 31)?;
    let gen0 = work.join("vm-gen0.img");
    std::fs::copy(&disk, &gen0)?;
    let id0 = text(&host.backup(p(&local), &disk, "vm", &[])?, "snapshot_id")?.to_string();
    scribble_disk(&disk, 10, 9)?;
    let id1 = text(&host.backup(p(&local), &disk, "vm", &[])?, "snapshot_id")?.to_string();

    // Both remote repositories take the local one's chunker parameters, so copies dedup.
    // (One `--endpoint` per command: it applies to every remote location the command opens.)
    host.ok(&[
        "--endpoint",
        &s3.endpoint,
        "init",
        &s3.location,
        "--like",
        p(&local),
        "--encryption",
        "none",
    ])?;
    host.ok(&[
        "--endpoint",
        &azure.endpoint,
        "init",
        &azure.location,
        "--like",
        p(&local),
        "--encryption",
        "none",
    ])?;
    let back = work.join("back");
    host.ok(&[
        "init",
        p(&back),
        "--like",
        p(&local),
        "--encryption",
        "none",
    ])?;

    let hops = [
        (p(&local).to_string(), s3.location.clone()),
        (s3.location.clone(), azure.location.clone()),
        (azure.location.clone(), p(&back).to_string()),
    ];
    for (from, to) in &hops {
        let first = host.json(&["copy", "--from", from, "--to", to])?;
        ensure!(first["snapshots_copied"] == 2, "{from} → {to}: {first:#}");
        let list = host.json(&["snapshots", to])?;
        let ids: Vec<&str> = list["snapshots"]
            .as_array()
            .context("snapshot list")?
            .iter()
            .filter_map(|s| s["snapshot_id"].as_str())
            .collect();
        ensure!(ids == [id0.as_str(), id1.as_str()], "ids at {to}: {list:#}");
        host.assert_restores(to, &id0, &gen0)?;
        host.assert_restores(to, &id1, &disk)?;
        host.ok(&["verify", to, &id0])?;
        host.ok(&["verify", to, &id1])?;
        // A second copy sends nothing: every snapshot is there already.
        let again = host.json(&["copy", "--from", from, "--to", to])?;
        ensure!(
            again["snapshots_copied"] == 0
                && again["snapshots_skipped"] == 2
                && again["chunks_sent"] == 0
                && again["packs_written"] == 0
                && again["written_bytes"] == 0
                // The copy's lock object is the one thing it may write.
                && upload_requests(&again["requests"]["to"]) <= 1,
            "second copy {from} → {to} sent something: {again:#}"
        );
    }
    Ok(())
}

// ---- 4. request economy

#[test]
fn an_incremental_backup_costs_requests_by_segments_touched_not_by_repository() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let work = tempfile::tempdir()?;
    let work = work.path();
    let host = Host::new(Some(&moto))?;
    let remote = s3_remote(&moto, "economy", "r")?;
    let repo = remote.location.as_str();
    host.ok(&["--endpoint", &remote.endpoint, "init", repo])?;

    // A full backup: PUT-class requests bounded by the packed bytes it added.
    let disk = work.join("vm.img");
    make_disk(&disk, 96 * MIB, 3)?;
    // 16 MiB of seeded random bytes among the files: a thousand chunks whatever this machine's
    // /usr/bin holds (with its files alone, short ones made 835).
    let noise = Disk::random(16 * MIB, 3).bytes()?;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&disk)?,
        &noise,
        56 * MIB,
    )?;
    let full = host.backup(repo, &disk, "vm", &[])?;
    let added = full["stats"]["bytes_added"]
        .as_u64()
        .with_context(|| format!("no added bytes in {full:#}"))?;
    let chunks = full["stats"]["chunks"].as_u64().context("chunks")?;
    let uploads = upload_requests(&full["requests"]);
    // One per 8 MiB of new packed data, plus packs' multipart open/complete, their deltas,
    // the manifest and the catalogue: a small constant.
    let bound = added / (8 * MIB) + 12;
    ensure!(
        uploads <= bound,
        "full backup of {added} packed bytes sent {uploads} uploads (bound {bound}): {full:#}"
    );
    ensure!(
        chunks > 1000,
        "the disk must have many chunks for the bound below to mean something: {full:#}"
    );

    // Grow the repository with other disks, so a cost proportional to it would show.
    let incremental = |tag: &str| -> Result<Value> {
        // Three 64 KiB writes, declared in a change list: three segments touched.
        let ranges = [(4 * MIB, 65536), (40 * MIB, 65536), (80 * MIB, 65536)];
        let changes = work.join(format!("changes-{tag}.json"));
        std::fs::write(&changes, json_change_list(&ranges))?;
        host.backup(repo, &disk, "vm", &["--changed-ranges", p(&changes)])
    };
    let small = incremental("small")?;
    for (i, seed) in [41usize, 77, 93].iter().enumerate() {
        let other = work.join(format!("other{i}.img"));
        make_disk(&other, 48 * MIB, *seed)?;
        host.backup(repo, &other, &format!("other{i}"), &[])?;
        std::fs::remove_file(&other)?;
    }
    let grown = incremental("grown")?;
    let total = |r: &Value| r["requests"]["total"].as_u64().unwrap_or(u64::MAX);
    let (small_total, grown_total) = (total(&small), total(&grown));
    // A request per chunk (of the disk, or of the repository) would exceed this at once:
    // the disk alone has thousands of chunks.
    let bound = 64.min(chunks / 16);
    ensure!(
        small_total <= bound && grown_total <= bound,
        "an incremental touching three segments made {small_total} requests, and {grown_total} \
         in a repository four times larger (bound {bound}; the disk has {chunks} chunks): \
         {small:#} {grown:#}"
    );
    ensure!(
        grown_total <= small_total + 4,
        "requests grew with the repository: {small_total} → {grown_total}: {grown:#}"
    );
    host.assert_restores(repo, text(&grown, "snapshot_id")?, &disk)?;
    Ok(())
}

#[test]
fn local_repositories_report_no_requests() -> Result<()> {
    let work = tempfile::tempdir()?;
    let host = Host::new(None)?;
    let repo = work.path().join("repo");
    host.ok(&["init", p(&repo)])?;
    let disk = work.path().join("vm.img");
    make_disk(&disk, 4 * MIB, 1)?;
    let report = host.backup(p(&repo), &disk, "vm", &[])?;
    ensure!(report.get("requests") == Some(&Value::Null), "{report:#}");
    let id = text(&report, "snapshot_id")?;
    let restored = host.assert_restores(p(&repo), id, &disk)?;
    ensure!(
        restored.get("requests") == Some(&Value::Null),
        "{restored:#}"
    );
    let human = host.ok(&["backup", p(&repo), p(&disk), "--disk", "vm"])?;
    ensure!(!human.contains("requests:"), "{human}");
    Ok(())
}
