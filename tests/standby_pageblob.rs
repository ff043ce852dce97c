//! Page blob standby targets under concurrency and crashes, against Azurite: a sync holds the
//! blob's lease, so a second sync (or any writer without the lease) is refused while it runs;
//! a sync killed midway leaves the blob's record `applying`, `standby status` says so, and the
//! next sync breaks the dead sync's lease (the rule of `format-spec/standby.md`, "Leases"),
//! completes the blob, and `verify --target` proves it equals the snapshot; a lease held by
//! someone else is waited out, never broken.

use anyhow::{bail, Context as _};
use stackvault::azure::sign::SharedKey;
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault_tests::{
    make_disk, p, pause_at, scribble_disk, sv, sv_json, Azurite, Fixture, Paused,
};

const MIB: u64 = 1 << 20;
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A container on Azurite and the ways to reach a blob in it.
pub(crate) struct Standby {
    _azurite: Azurite,
    endpoint: String,
    sas: String,
    key_options: BlobOptions,
}

impl Standby {
    pub(crate) fn start() -> anyhow::Result<Option<Standby>> {
        let Some(azurite) = Azurite::start_or_skip()? else {
            return Ok(None);
        };
        let endpoint = format!("http://127.0.0.1:{}/{ACCOUNT}", azurite.port);
        let key_options = BlobOptions {
            endpoint: Some(endpoint.clone()),
            account_key: Some(KEY.into()),
            ..Default::default()
        };
        BlobClient::new(&format!("azure://{ACCOUNT}/standby/x"), &key_options)?
            .create_container()?;
        let sas = SharedKey::new(ACCOUNT, KEY)?.account_sas("racwdl", "2099-01-01T00:00:00Z");
        Ok(Some(Standby {
            _azurite: azurite,
            endpoint,
            sas,
            key_options,
        }))
    }

    /// The SAS URL of blob `name` (what an operator passes).
    pub(crate) fn url(&self, name: &str) -> String {
        format!("{}/standby/{name}?{}", self.endpoint, self.sas)
    }

    /// A Shared Key client of blob `name` that holds no lease (someone else).
    pub(crate) fn client(&self, name: &str) -> anyhow::Result<BlobClient> {
        Ok(BlobClient::new(
            &format!("azure://{ACCOUNT}/standby/{name}"),
            &self.key_options,
        )?)
    }
}

pub(crate) fn sync(repo: &str, target: &str) -> anyhow::Result<serde_json::Value> {
    let (code, v, stderr) = sv_json(&["standby", "sync", "-r", repo, "--disk", "vm", target])?;
    if code != Some(0) {
        bail!("standby sync failed ({code:?}): {stderr}");
    }
    Ok(v)
}

pub(crate) fn status(target: &str) -> anyhow::Result<serde_json::Value> {
    let (code, v, stderr) = sv_json(&["standby", "status", target])?;
    anyhow::ensure!(code == Some(0), "standby status failed: {stderr}");
    Ok(v)
}

/// A sync of `target` paused at `point` (one worker thread).
fn paused_sync(repo: &str, target: &str, point: &str) -> anyhow::Result<Paused> {
    let args = ["standby", "sync", "-r", repo, "--disk", "vm", target];
    pause_at(&args, &[("RAYON_NUM_THREADS", "1")], point)
}

/// `verify --target` of the blob against `snapshot` passes.
pub(crate) fn verify_target(repo: &str, snapshot: &str, target: &str) -> anyhow::Result<()> {
    let (code, v, stderr) = sv_json(&["verify", repo, snapshot, "--target", target])?;
    anyhow::ensure!(
        code == Some(0) && v["outcome"] == "ok",
        "verify --target ({code:?}): {stderr} {v:#}"
    );
    Ok(())
}

/// A repository with two snapshots of disk `vm` (`size` bytes), the first of them synced to
/// blob `vm.vhd`: the fixture, gen0 and gen1.
pub(crate) fn gen0_synced(
    az: &Standby,
    size: u64,
    seed: usize,
) -> anyhow::Result<(Fixture, String, String)> {
    let f = Fixture::new()?;
    let disk = f.path("vm.img");
    make_disk(&disk, size, seed)?;
    let gen0 = f.backup(&disk, "vm")?;
    sync(p(&f.repo()), &az.url("vm.vhd"))?;
    scribble_disk(&disk, 5, seed)?;
    let gen1 = f.backup(&disk, "vm")?;
    Ok((f, gen0, gen1))
}

fn notes(report: &serde_json::Value) -> String {
    report["notes"].to_string()
}

#[test]
fn a_sync_holds_the_blob_lease_and_a_killed_one_is_completed_by_the_next() -> anyhow::Result<()> {
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let (f, gen0, gen1) = gen0_synced(&az, 16 * MIB, 21)?;
    let repo = f.repo();
    let repo = p(&repo);
    let url = az.url("vm.vhd");

    let running = paused_sync(repo, &url, "standby-segment:1")?;
    // The service itself keeps other writers out while the sync runs.
    let other = az.client("vm.vhd")?;
    match other.put_pages(0, &[0u8; 512]) {
        Err(stackvault::Error::Http { status: 412, .. }) => {}
        other => bail!("a write without the sync's lease was not refused: {other:?}"),
    }
    let st = status(&url)?;
    assert_eq!(
        (st["state"].as_str(), st["sync_running"].as_bool()),
        (Some("applying"), Some(true)),
        "{st:#}"
    );
    let out = sv(&["standby", "sync", "-r", repo, "--disk", "vm", &url])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another standby sync"), "{stderr}");

    // A crash midway: the record stays `applying`, and the lease stays until it lapses.
    running.kill()?;
    let st = status(&url)?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("applying"), Some(gen0.as_str())),
        "{st:#}"
    );
    assert_eq!(st["applying"], serde_json::json!([gen1]), "{st:#}");
    assert!(
        other.put_pages(0, &[0u8; 512]).is_err(),
        "the dead sync's lease is still active"
    );
    // The next sync breaks the dead sync's lease at once and completes the blob.
    let r = sync(repo, &url)?;
    assert!(notes(&r).contains("broke the lease"), "{r:#}");
    assert_eq!(
        r["completed_interrupted"],
        serde_json::json!([gen1]),
        "{r:#}"
    );
    let st = status(&url)?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("clean"), Some(gen1.as_str())),
        "{st:#}"
    );
    verify_target(repo, &gen1, &url)?;
    // Released at the end: anyone may write again.
    other.put_pages(0, &[0u8; 512])?;

    // A first (full) sync killed midway is redone in full by the next.
    let fresh = az.url("fresh.vhd");
    paused_sync(repo, &fresh, "restore-segment:3")?.kill()?;
    let st = status(&fresh)?;
    assert_eq!(
        (st["state"].as_str(), &st["snapshot_id"]),
        (Some("applying"), &serde_json::Value::Null),
        "{st:#}"
    );
    let r = sync(repo, &fresh)?;
    assert_eq!(r["mode"], "full", "{r:#}");
    assert!(notes(&r).contains("broke the lease"), "{r:#}");
    verify_target(repo, &gen1, &fresh)?;
    Ok(())
}

#[test]
fn a_lease_held_by_another_writer_is_waited_out_not_broken() -> anyhow::Result<()> {
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let (f, gen0, gen1) = gen0_synced(&az, 8 * MIB, 22)?;
    let repo = f.repo();
    let repo = p(&repo);
    let url = az.url("vm.vhd");

    let other = az.client("vm.vhd")?;
    anyhow::ensure!(other.acquire_lease()?, "the test could not lease the blob");
    let out = sv(&["standby", "sync", "-r", repo, "--disk", "vm", &url])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("leased by another writer"), "{stderr}");
    // Refused before any write: the record still says what the blob holds.
    let st = status(&url)?;
    assert_eq!(
        (st["state"].as_str(), st["snapshot_id"].as_str()),
        (Some("clean"), Some(gen0.as_str())),
        "{st:#}"
    );
    // Our own lease still holds: the sync did not break it.
    other.renew_lease().context("renew the test's lease")?;
    other.release_lease()?;
    let r = sync(repo, &url)?;
    assert_eq!(r["mode"], "incremental", "{r:#}");
    verify_target(repo, &gen1, &url)?;
    Ok(())
}
