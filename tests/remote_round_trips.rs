//! What a backup into a remote repository pays in requests before and after its data: the
//! catch-up of the cache lists each prefix once per command (the backup does not list them
//! again after the open that just did), the lease lock costs a create and one look at the
//! maintenance lock (the create's answer carries the version; no HEAD of the bucket), and
//! skipping that second catch-up never lets a backup publish a snapshot that needs a pack a
//! prune deleted meanwhile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault::store::Backend;
use stackvault_tests::{
    backup_with_engine, json_change_list, make_disk, p, restores_to, SharedStore, Watched, Watcher,
};

use crate::remote_maintain::{azurite, moto, Remote};

const LOCATION: &str = "memory://round-trips";
const MIB: u64 = 1 << 20;

/// Counts listings by prefix.
#[derive(Default)]
struct Listings(Mutex<HashMap<String, u32>>);

impl Watcher for Listings {
    fn listing(&self, prefix: &str) {
        if let Ok(mut seen) = self.0.lock() {
            *seen.entry(prefix.to_string()).or_default() += 1;
        }
    }
}

fn disk(dir: &Path, name: &str, seed: usize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.img"));
    make_disk(&path, 12 * MIB, seed)?;
    Ok(path)
}

#[test]
fn a_backup_lists_each_prefix_of_the_catch_up_once() -> Result<()> {
    let shared = SharedStore::init(stackvault::store::MemoryBackend::new(), LOCATION)?;
    let d = disk(shared.path(), "d", 3)?;
    backup_with_engine(&shared.host("a")?, &d, "web01")?;
    let watched = Arc::new(Watched {
        objects: shared.store.clone(),
        watcher: Listings::default(),
    });
    // Host b has a cache already (a first open builds it, with listings of its own).
    drop(shared.host("b")?);
    let repo = shared.host_via(watched.clone(), "b")?;
    // As the command line does: the backup follows the open at once.
    repo.let_next_backup_use_the_open_catch_up();
    backup_with_engine(&repo, &d, "web01")?;
    let seen = watched
        .watcher
        .0
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let count = |prefix: &str| seen.get(prefix).copied().unwrap_or(0);
    // Once each, at open: not again when the backup starts right after.
    for prefix in ["index/", "snapshots/", "verifications/"] {
        ensure!(
            count(prefix) == 1,
            "{prefix} listed {}: {seen:?}",
            count(prefix)
        );
    }
    // `packs/`: at open, and in the re-check before the manifest (`format-spec/locks.md`,
    // rule 2); `condemned/`: before deduplicating and in that re-check.
    ensure!(count("packs/") == 2, "{seen:?}");
    ensure!(count("condemned/") == 2, "{seen:?}");
    Ok(())
}

#[test]
fn a_backup_never_publishes_against_a_pack_deleted_after_its_cache_listed_it() -> Result<()> {
    let shared = SharedStore::init(stackvault::store::MemoryBackend::new(), LOCATION)?;
    let d = disk(shared.path(), "d", 5)?;
    let first = backup_with_engine(&shared.host("a")?, &d, "old")?;
    // Host b's open lists (and its cache knows) the packs of that snapshot...
    let b = shared.host("b")?;
    b.let_next_backup_use_the_open_catch_up();
    // ...then a prune's phase 3 deletes them, with the snapshot that used them and the record
    // that condemned them, before b's backup starts (b's cache is fresh: it does not list again).
    let store = &shared.store;
    store.remove(&format!("snapshots/{}", first.snapshot_id))?;
    let mut gone = 0;
    for key in store
        .list("packs/")?
        .into_iter()
        .chain(store.list("index/")?)
    {
        store.remove(&key)?;
        gone += 1;
    }
    ensure!(gone > 0, "no pack was stored");
    let err = backup_with_engine(&b, &d, "new")
        .err()
        .context("a backup deduplicating against deleted packs published a snapshot")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("deleted by a prune") && msg.contains("run the backup again"),
        "{msg}"
    );
    ensure!(
        store.list("snapshots/")?.is_empty(),
        "a manifest was published"
    );
    // The next run's catch-up forgets the gone packs and stores the chunks anew.
    let again = backup_with_engine(&shared.host("b")?, &d, "new")?;
    ensure!(
        restores_to(
            &shared.host("c")?,
            &again.snapshot_id,
            &d,
            &shared.path().join("r.img")
        )?,
        "the snapshot stored again does not restore"
    );
    Ok(())
}

/// Holds back a backup's look at the maintenance lock until a pack is stored, or 2 s.
#[derive(Default)]
struct PackBeforeLock {
    pack_stored: Mutex<bool>,
    stored: std::sync::Condvar,
}

impl Watcher for PackBeforeLock {
    fn reading(&self, key: &str) {
        if key != "locks/maintenance" {
            return;
        }
        let Ok(stored) = self.pack_stored.lock() else {
            return;
        };
        let _ =
            self.stored
                .wait_timeout_while(stored, std::time::Duration::from_secs(2), |stored| !*stored);
    }

    fn storing(&self, key: &str) {
        if key.starts_with("packs/") {
            if let Ok(mut stored) = self.pack_stored.lock() {
                *stored = true;
                self.stored.notify_all();
            }
        }
    }
}

/// On a shared store a backup deduplicates while its lease is still being taken
/// (`backup/pending_lock.rs`), but stores nothing before it holds it: one that finds
/// maintenance running leaves no pack behind.
#[test]
fn a_backup_stores_no_pack_before_its_lock_is_held() -> Result<()> {
    let shared = SharedStore::init(stackvault::store::MemoryBackend::new(), LOCATION)?;
    let d = disk(shared.path(), "d", 11)?;
    let maintainer = shared.host("m")?;
    let _maintenance = maintainer.lock_maintenance("key remove")?;
    let watched = Arc::new(Watched {
        objects: shared.store.clone(),
        watcher: PackBeforeLock::default(),
    });
    let repo = shared.host_via(watched.clone(), "b")?;
    let err = backup_with_engine(&repo, &d, "web01")
        .err()
        .context("a backup ran while maintenance held the repository")?;
    let msg = format!("{err:#}");
    ensure!(msg.contains("maintenance is running"), "{msg}");
    let store = &shared.store;
    ensure!(
        store.list("packs/")?.is_empty() && store.list("index/")?.is_empty(),
        "a pack was stored before the lock was held: {:?}",
        store.list("packs/")?
    );
    Ok(())
}

fn count(report: &Value, kind: &str) -> u64 {
    report["requests"][kind].as_u64().unwrap_or(u64::MAX)
}

/// An incremental with a change list touching one segment, after a full backup; its report.
fn small_incremental(r: &Remote) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 16 * MIB, 9)?;
    r.json(&["init"])?;
    r.json(&["backup", p(&disk), "--disk", "d"])?;
    let changes = dir.path().join("changes.json");
    std::fs::write(&changes, json_change_list(&[(MIB, 65536)]))?;
    r.json(&[
        "backup",
        p(&disk),
        "--disk",
        "d",
        "--changed-ranges",
        p(&changes),
    ])
}

#[test]
fn a_small_incremental_on_s3_lists_each_prefix_once_and_heads_only_the_maintenance_lock(
) -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let inc = small_incremental(&Remote::s3(&moto, "roundtrips")?)?;
    // Listings: keys/ (unlock); index/, packs/, snapshots/, verifications/ (catch-up, once);
    // condemned/ twice and packs/ once more (rule 2 and its re-check). Before, the backup
    // listed the catch-up's four prefixes a second time after taking its lock.
    ensure!(count(&inc, "list") == 8, "{inc:#}");
    // HEADs: the maintenance lock only. The lock's create answers with its version, and a
    // successful listing showed the bucket exists (no HeadBucket after a bodiless 404).
    ensure!(count(&inc, "head") == 1, "{inc:#}");
    Ok(())
}

#[test]
fn a_small_incremental_on_azure_lists_each_prefix_once_and_heads_only_the_maintenance_lock(
) -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let inc = small_incremental(&Remote::azure(&az, "roundtrips")?)?;
    // As on S3: eight listings, and one Get Blob Properties (of the maintenance lock).
    ensure!(count(&inc, "list_blobs") == 8, "{inc:#}");
    let props = count(&inc, "get_blob_properties");
    ensure!(props == 1, "{inc:#}");
    Ok(())
}
