//! Whole `stackvault backup` / `restore` runs on remote repositories through the fault proxy
//! (tests/faultproxy.rs) to Azurite and to moto: injected 500/503/408/429 (with
//! `Retry-After`), connections reset mid-upload and mid-download, bodies cut short and slow
//! answers are retried, the backup succeeds, the restore is byte-identical, `check` is
//! clean, and no key or SAS signature shows in the output. Also the Azure Stack Hub profile
//! given to `init`: its service version is sent, remembered and kept by later commands.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use stackvault_tests::{make_disk, p, same_bytes, scribble_disk};

use crate::faultproxy::{Fault, FaultProxy, Incoming};
use crate::moto::Moto;
use crate::remote_errors::{azure_backend, azurite, run, ACCOUNT, KEY};

/// Faults every `every`-th request, cycling through the kinds that fit its method: error
/// statuses for all, a reset while uploading for PUTs, a cut body for GETs, a pause.
fn rotating_faults(every: u64) -> impl Fn(&Incoming<'_>) -> Option<Fault> + Send + Sync {
    move |r| {
        if r.number % every != 0 {
            return None;
        }
        let status = |status, code, retry_after| Fault::Status {
            status,
            code,
            retry_after,
        };
        Some(match (r.number / every) % 7 {
            0 => status(503, "ServerBusy", Some(1)),
            1 => status(500, "InternalError", None),
            2 => status(408, "RequestTimeout", None),
            3 => status(429, "SlowDown", Some(1)),
            4 if r.method == "PUT" => Fault::ResetMidUpload,
            5 if r.method == "GET" => Fault::TruncateBody,
            _ => Fault::Delay(Duration::from_millis(700)),
        })
    }
}

/// Two backups (a full one, then an incremental), a restore of each, and a check, all through
/// `proxy_endpoint`; fails unless all succeed byte-identically with no secret in the output.
fn backup_and_restore_through(
    repo: &str,
    proxy_endpoint: &str,
    env: &[(&str, &str)],
    secrets: &[&str],
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let go = |args: &[&str], what: &str| -> Result<String> {
        let r = run(&cache, args, env)?;
        r.no_secret(secrets)?;
        Ok(r.ok(what)?.stdout)
    };
    go(&["-r", repo, "--endpoint", proxy_endpoint, "init"], "init")?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 24 << 20, 11)?;
    go(&["-r", repo, "backup", p(&disk), "--disk", "d"], "backup 1")?;
    let first = dir.path().join("first.img");
    std::fs::copy(&disk, &first)?;
    scribble_disk(&disk, 300, 12)?;
    go(&["-r", repo, "backup", p(&disk), "--disk", "d"], "backup 2")?;
    let list = go(&["-r", repo, "snapshots", "--json"], "snapshots")?;
    let v: serde_json::Value = serde_json::from_str(&list)?;
    let ids: Vec<&str> = v["snapshots"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["snapshot_id"].as_str()).collect())
        .unwrap_or_default();
    ensure!(ids.len() == 2, "{ids:?}");
    for (id, want) in [(ids[0], &first), (ids[1], &disk)] {
        let out = dir.path().join("out.img");
        go(&["-r", repo, "restore", id, p(&out), "--force"], "restore")?;
        ensure!(same_bytes(&out, want)?, "restore of {id} differs");
    }
    go(&["-r", repo, "check", "--read-data"], "check")?;
    Ok(())
}

#[test]
fn azure_backup_and_restore_survive_injected_faults() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    azure_backend(az.port, "azure://devstoreaccount1/faults")?.create_container()?;
    let proxy = FaultProxy::start(az.port, rotating_faults(5))?;
    backup_and_restore_through(
        "azure://devstoreaccount1/faults/erp",
        &format!("http://127.0.0.1:{}/{ACCOUNT}", proxy.port),
        &[("AZURE_STORAGE_KEY", KEY)],
        &[KEY],
    )?;
    let faulted = proxy.seen().iter().filter(|s| s.fault.is_some()).count();
    ensure!(faulted >= 7, "only {faulted} faults were injected");
    Ok(())
}

#[test]
fn s3_backup_and_restore_survive_injected_faults() -> Result<()> {
    // Unchecked: moto 5 refuses valid signatures on listings with `/` in the prefix.
    let Some(moto) = Moto::start_unchecked() else {
        return Ok(());
    };
    moto.backend("s3://faults/x")?;
    let proxy = FaultProxy::start(moto.port, rotating_faults(5))?;
    backup_and_restore_through(
        "s3://faults/erp",
        &format!("http://127.0.0.1:{}", proxy.port),
        &[
            ("AWS_ACCESS_KEY_ID", moto.access_key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key.as_str()),
            ("AWS_REGION", "us-east-1"),
        ],
        &[&moto.secret_access_key],
    )?;
    let faulted = proxy.seen().iter().filter(|s| s.fault.is_some()).count();
    ensure!(faulted >= 7, "only {faulted} faults were injected");
    Ok(())
}

#[test]
fn the_azurestack_profile_given_to_init_is_sent_remembered_and_kept() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    azure_backend(az.port, "azure://devstoreaccount1/stack")?.create_container()?;
    let versions: Arc<Mutex<Vec<String>>> = Arc::default();
    let v = versions.clone();
    let proxy = FaultProxy::start(az.port, move |r| {
        if let Ok(mut v) = v.lock() {
            v.push(r.header("x-ms-version").unwrap_or("").to_string());
        }
        None
    })?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let key = [("AZURE_STORAGE_KEY", KEY)];
    let repo = "azure://devstoreaccount1/stack/erp";
    let ep = format!("http://127.0.0.1:{}/{ACCOUNT}", proxy.port);
    run(
        &cache,
        &[
            "-r",
            repo,
            "init",
            "--endpoint",
            &ep,
            "--target-profile",
            "azurestack",
        ],
        &key,
    )?
    .ok("init")?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 4 << 20, 21)?;
    // Later commands name only the location.
    run(
        &cache,
        &["-r", repo, "backup", p(&disk), "--disk", "d"],
        &key,
    )?
    .ok("backup")?;
    run(&cache, &["-r", repo, "snapshots"], &key)?.ok("snapshots")?;
    let sent = versions.lock().map(|v| v.clone()).unwrap_or_default();
    ensure!(sent.len() > 3, "{sent:?}");
    ensure!(
        sent.iter().all(|v| v == "2019-07-07"),
        "not every request sent the Stack Hub version: {sent:?}"
    );
    Ok(())
}
