//! Remote repositories from the command line, the points a user meets after the first
//! backup: an unchanged incremental with a change list costs requests by the segments it
//! touches, not by the disk's size (manifests are read from this host's copy); `copy` between
//! two stores reaches each through its own endpoint (`--from-endpoint`, `--to-endpoint`), and
//! one `--endpoint` never silently applies to both; and the errors of a wrong location say what
//! to do.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault::store::Backend;
use stackvault_tests::{json_change_list, p, same_bytes, Disk};

use crate::remote_maintain::{azurite, moto, Remote};

const MIB: u64 = 1 << 20;

fn count(report: &Value, kind: &str) -> u64 {
    report["requests"][kind].as_u64().unwrap_or(u64::MAX)
}

/// The requests of an incremental with a change list touching three segments, after a
/// full backup, on a disk of `size`.
fn incremental_requests(r: &Remote, size: u64, name: &str) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(size, 21).write(&disk)?;
    r.json(&["backup", p(&disk), "--disk", name])?;
    let ranges = [(0, 65536), (MIB, 65536), (size - 65536, 65536)];
    let changes = dir.path().join("changes.json");
    std::fs::write(&changes, json_change_list(&ranges))?;
    let inc = r.json(&[
        "backup",
        p(&disk),
        "--disk",
        name,
        "--changed-ranges",
        p(&changes),
    ])?;
    // And it is right: the restore is the disk.
    let restored = dir.path().join("r.img");
    let id = inc["snapshot_id"].as_str().context("no snapshot id")?;
    r.json(&["restore", id, p(&restored), "--force"])?;
    ensure!(same_bytes(&restored, &disk)?, "restore differs");
    Ok(inc)
}

#[test]
fn an_incremental_with_a_change_list_costs_the_same_requests_whatever_the_disk_size() -> Result<()>
{
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "economy")?;
    r.json(&["init"])?;
    // 16 MiB and 128 MiB disks: 4 and 32 segments of 4 MiB, three touched in each.
    let small = incremental_requests(&r, 16 * MIB, "small")?;
    let large = incremental_requests(&r, 128 * MIB, "large")?;
    let (gs, gl) = (count(&small, "get"), count(&large, "get"));
    ensure!(
        gl <= gs + 1,
        "GETs grew with the disk: {gs} for 4 segments, {gl} for 32 (three touched in each): \
         {small:#} {large:#}"
    );
    let (ts, tl) = (count(&small, "total"), count(&large, "total"));
    ensure!(
        tl <= ts + 2,
        "requests grew with the disk: {ts} → {tl}: {small:#} {large:#}"
    );
    Ok(())
}

#[test]
fn copy_between_two_stores_takes_an_endpoint_for_each() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let Some(az) = azurite()? else { return Ok(()) };
    let s3 = Remote::s3(&moto, "copyfrom")?;
    let azure = Remote::azure(&az, "copyto")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(6 * MIB, 31).write(&disk)?;
    s3.json(&["init"])?;
    s3.json(&["backup", p(&disk), "--disk", "d"])?;

    // A host that has never reached either store: nothing remembered.
    let host = tempfile::tempdir()?;
    let cmd = |args: &[&str]| {
        let mut c = stackvault_tests::sv_command();
        c.arg("--quiet")
            .args(args)
            .env("XDG_CACHE_HOME", host.path())
            .env_remove("STACKVAULT_REPOSITORY")
            .env_remove("STACKVAULT_ENDPOINT");
        for (k, v) in s3.env.iter().chain(&azure.env) {
            c.env(k, v);
        }
        c.output()
    };
    // One --endpoint for two remote locations is refused, naming the per-location options.
    let out = cmd(&[
        "--endpoint",
        &s3.endpoint,
        "copy",
        "--from",
        &s3.location,
        "--to",
        &azure.location,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{:?}: {err}", out.status);
    ensure!(
        err.contains("--from-endpoint") && err.contains("--to-endpoint"),
        "{err}"
    );

    azure.json(&["init"])?;
    // Copy with an endpoint for each.
    let out = cmd(&[
        "copy",
        "--from",
        &s3.location,
        "--from-endpoint",
        &s3.endpoint,
        "--to",
        &azure.location,
        "--to-endpoint",
        &azure.endpoint,
        "--json",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(report["snapshots_copied"] == 1, "{report:#}");
    // Each was remembered for its own location: restores work with no endpoint given.
    let restored = dir.path().join("r.img");
    for location in [&s3.location, &azure.location] {
        let out = cmd(&["restore", location, "latest", p(&restored), "--force"])?;
        ensure!(
            out.status.success(),
            "{location}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(same_bytes(&restored, &disk)?, "{location}: restore differs");
    }
    Ok(())
}

#[test]
fn a_wrong_remote_location_says_what_to_do() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "hints")?;
    r.json(&["init"])?;
    // A prefix with no repository: check the prefix, or init.
    let wrong = Remote {
        location: format!("{}-typo", r.location),
        endpoint: r.endpoint.clone(),
        env: r.env.clone(),
        objects: Box::new(moto.backend("s3://hints")?),
        cache: tempfile::tempdir()?,
    };
    let (code, _, out) = wrong.run_json(&["snapshots"])?;
    ensure!(code == Some(1), "{out}");
    ensure!(
        out.contains("is not a stackvault repository")
            && out.contains("prefix")
            && out.contains("stackvault init"),
        "{out}"
    );
    // A bucket that does not exist: one line, saying to create it.
    let missing = Remote {
        location: "s3://no-such-bucket/x".into(),
        endpoint: r.endpoint.clone(),
        env: r.env.clone(),
        objects: Box::new(moto.backend("s3://hints")?),
        cache: tempfile::tempdir()?,
    };
    let (code, _, out) = missing.run_json(&["init"])?;
    ensure!(code == Some(1), "{out}");
    ensure!(out.contains("create it"), "{out}");
    let error_lines = out.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(error_lines == 1, "not one line: {out}");
    // verify --read-only names the repository's location, not this host's cache.
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(2 * MIB, 41).write(&disk)?;
    r.json(&["backup", p(&disk), "--disk", "d"])?;
    let mut args = vec!["--read-only", "verify", r.location.as_str(), "latest"];
    let out = r.command(&args).output()?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cache = r.cache.path().to_string_lossy().into_owned();
    ensure!(!all.contains(&cache), "names the cache: {all}");
    args.push("--no-record");
    let out = r.command(&args).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_read_and_list_sas_serves_and_copies_and_backup_names_the_missing_permission() -> Result<()> {
    use stackvault::azure::sign::SharedKey;
    use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions};
    use std::io::BufRead;
    let Some(az) = azurite()? else { return Ok(()) };
    let writer = Remote::azure(&az, "rosas")?;
    writer.json(&["init"])?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(4 * MIB, 51).write(&disk)?;
    writer.json(&["backup", p(&disk), "--disk", "d"])?;

    let key = writer
        .env
        .iter()
        .find(|(k, _)| *k == "AZURE_STORAGE_KEY")
        .map(|(_, v)| v.clone())
        .context("no key")?;
    let sas = SharedKey::new("devstoreaccount1", &key)?.account_sas("rl", "2099-01-01T00:00:00Z");
    let options = AzureStoreOptions {
        endpoint: Some(writer.endpoint.clone()),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(key.clone()))
    };
    let reader = Remote {
        location: writer.location.clone(),
        endpoint: writer.endpoint.clone(),
        env: vec![("AZURE_STORAGE_SAS_TOKEN", sas.clone())],
        objects: Box::new(AzureBlobBackend::open(&writer.location, &options)?),
        cache: tempfile::tempdir()?,
    };
    let before = reader.keys("")?;

    // copy --from the read-only location into a local repository.
    let local = dir.path().join("local");
    let out = reader
        .command(&["init", p(&local)])
        .output()
        .context("init local")?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = reader
        .command(&["copy", "--from", &reader.location, "--to", p(&local)])
        .output()?;
    ensure!(
        out.status.success(),
        "copy --from: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = dir.path().join("r.img");
    let out = reader
        .command(&["restore", p(&local), "latest", p(&restored), "--force"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        same_bytes(&restored, &disk)?,
        "the copy restores differently"
    );

    // serve opens the snapshot and listens.
    let socket = dir.path().join("nbd.sock");
    let nbd = format!("unix:{}", p(&socket));
    let mut serve = reader
        .command(&["serve", &reader.location, "latest", "--nbd", &nbd, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    let stdout = serve.stdout.take().context("stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut first)?;
    let _ = serve.kill();
    let status = serve.wait()?;
    ensure!(
        first.contains("unix:") || socket.exists(),
        "serve did not get ready ({status}): {first}"
    );

    // backup: one error, naming the permissions a writer needs; nothing written.
    let out = reader
        .command(&["backup", &reader.location, p(&disk), "--disk", "d"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{:?}: {err}", out.status);
    ensure!(
        err.contains("write (w)") && err.contains("create (c)"),
        "{err}"
    );
    ensure!(
        !err.contains(sas.split("sig=").nth(1).unwrap_or("-")),
        "the SAS is shown: {err}"
    );
    ensure!(
        reader.keys("")? == before,
        "a read-only run changed the store"
    );
    Ok(())
}

/// The manifests under this host's cache of remote repositories (`<cache>/<repo>/manifests/`).
fn cached_manifests(r: &Remote) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for repo in std::fs::read_dir(r.cache.path().join("stackvault"))? {
        let dir = repo?.path().join("manifests");
        if dir.is_dir() {
            for m in std::fs::read_dir(dir)? {
                let path = m?.path();
                if !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    out.push(path);
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn a_backup_keeps_its_manifest_so_the_next_incremental_downloads_no_parent() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "tee")?;
    r.json(&["init"])?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(8 * MIB, 23).write(&disk)?;
    let changes = dir.path().join("changes.json");
    std::fs::write(&changes, json_change_list(&[(MIB, 65536)]))?;
    let incremental = || -> Result<Value> {
        r.json(&[
            "backup",
            p(&disk),
            "--disk",
            "d",
            "--changed-ranges",
            p(&changes),
        ])
    };
    let full = r.json(&["backup", p(&disk), "--disk", "d"])?;
    let id = full["snapshot_id"].as_str().context("no snapshot id")?;
    // The copy is the stored object, byte for byte, kept without reading it back.
    let cached = cached_manifests(&r)?;
    ensure!(cached.len() == 1, "cached after one backup: {cached:?}");
    ensure!(
        cached[0].file_name().is_some_and(|n| n == id),
        "{cached:?} is not {id}"
    );
    let stored = moto.backend(&r.location)?.get(&format!("snapshots/{id}"))?;
    ensure!(std::fs::read(&cached[0])? == stored, "the copy differs");

    // An incremental whose parent's copy is gone downloads it; one whose parent was just
    // written by this host does not.
    std::fs::remove_file(&cached[0])?;
    let downloading = incremental()?;
    let kept = incremental()?;
    ensure!(
        count(&kept, "get") < count(&downloading, "get"),
        "the parent written by this host was downloaded again: {kept:#} against {downloading:#}"
    );
    ensure!(
        cached_manifests(&r)?.len() == 3,
        "{:?}",
        cached_manifests(&r)?
    );
    Ok(())
}
