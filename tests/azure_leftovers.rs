//! Leftovers of a repository on Azure (issue 14, "a killed backup leaves only unreferenced
//! objects that … prune removes"): a writer killed between staging an object's blocks and
//! committing them leaves an uncommitted blob, which no read or plain listing sees and which
//! Azure has no call to abort. `check` lists it as an unfinished upload; `prune` leaves it while
//! it is younger than the grace period plus the clock skew allowed (it may belong to a writer
//! still running) and removes it once older; nothing of the repository is touched.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};
use stackvault_tests::{p, same_bytes, Disk};

use crate::remote_leftovers::{leftovers, prune_removes_the_one_upload};
use crate::remote_maintain::{azurite, Remote};

const MIB: u64 = 1 << 20;

/// The repository's store, as the Azure backend itself (to stage blocks without committing).
fn store(r: &Remote) -> Result<AzureBlobBackend> {
    let key = r
        .env
        .iter()
        .find(|(k, _)| *k == "AZURE_STORAGE_KEY")
        .map(|(_, v)| v.clone())
        .context("no key")?;
    let options = AzureStoreOptions {
        endpoint: Some(r.endpoint.clone()),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(key))
    };
    Ok(AzureBlobBackend::open(&r.location, &options)?)
}

#[test]
fn check_lists_uncommitted_blocks_and_prune_removes_them_once_old() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let r = Remote::azure(&az, "leftovers")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(4 * MIB, 82).write(&disk)?;
    r.json(&["init"])?;
    let backup = r.json(&["backup", p(&disk), "--disk", "d"])?;
    let id = backup["snapshot_id"].as_str().context("no snapshot id")?;
    let clean = r.json(&["check"])?;
    ensure!(leftovers(&clean).is_empty(), "{clean:#}");
    let objects = r.keys("")?;

    // A writer killed after its Put Blocks, before its Put Block List.
    let store = store(&r)?;
    let key = "packs/7e/7e0123456789abcdef0123456789abcd";
    store.stage_unfinished_upload(key, &vec![7u8; 3 * MIB as usize])?;
    ensure!(
        !store.list("packs/")?.iter().any(|k| k == key) && !store.exists(key)?,
        "uncommitted blocks are visible as an object"
    );

    let found = r.json(&["check"])?;
    ensure!(
        leftovers(&found) == [("unfinished-upload".to_string(), key.to_string())],
        "check does not list exactly the uncommitted blob: {found:#}"
    );
    ensure!(found["ok"] == true, "a leftover is not damage: {found:#}");

    // Young (Azurite dates it now): it may be a running writer's, so it stays.
    let young = r.json(&["prune", "--grace", "0"])?;
    ensure!(young["leftovers_removed"] == 0, "{young:#}");
    ensure!(
        store.unfinished_uploads()?.len() == 1,
        "prune removed a young upload"
    );

    // Older than the grace period (0) and the 30 s of clock skew allowed.
    std::thread::sleep(Duration::from_secs(32));
    prune_removes_the_one_upload(&r, &store)?;
    ensure!(!store.exists(key)?, "prune left an object under the key");
    ensure!(
        r.keys("")? == objects,
        "prune changed the repository's objects"
    );
    let restored = dir.path().join("r.img");
    r.json(&["restore", id, p(&restored), "--force"])?;
    ensure!(same_bytes(&restored, &disk)?, "restore differs");
    Ok(())
}

/// The race prune must lose: a writer commits the name after prune listed it as an unfinished
/// upload. Discarding that listed upload must leave the committed blob, whole.
#[test]
fn discarding_an_upload_committed_since_the_listing_keeps_the_blob() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let r = Remote::azure(&az, "leftover-race")?;
    r.json(&["init"])?;
    let store = store(&r)?;
    let key = "packs/5a/5a0123456789abcdef0123456789abcd";
    store.stage_unfinished_upload(key, &vec![5u8; MIB as usize])?;
    let listed = store.unfinished_uploads()?;
    ensure!(listed.len() == 1, "listed {listed:?}");
    // The store dates changes to the second: commit in a later one than the staging.
    std::thread::sleep(Duration::from_millis(1100));
    let committed = vec![9u8; 2 * MIB as usize];
    // Committed the way a writer commits a pack too large for one Put Blob.
    store.put_as_blocks(key, &committed)?;
    store.discard_upload(&listed[0])?;
    ensure!(
        store.get(key)? == committed,
        "discarding a stale listing deleted or changed a committed blob"
    );
    ensure!(store.unfinished_uploads()?.is_empty(), "blocks left");
    Ok(())
}
