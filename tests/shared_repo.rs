//! One repository on an object store, many hosts: each host is a `Repo` handle with its own
//! cache directory on one shared in-memory store. Hosts back up at the same time, learn each
//! other's packs from index deltas (never by reading packs), deduplicate against them, and
//! restore each other's snapshots byte for byte.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use stackvault::store::{Backend, MemoryBackend};
use stackvault::{InitOptions, NoProgress, Repo};
use stackvault_tests::{backup_with_engine, make_disk, restores_to, SharedStore, Watched, Watcher};

/// Counts the reads of pack bytes (what learning through deltas saves).
#[derive(Default)]
struct PackReads(AtomicU64);

impl Watcher for PackReads {
    fn reading(&self, key: &str) {
        if key.starts_with("packs/") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The shared store, counting the reads of pack bytes.
type Store = Watched<PackReads>;

fn pack_reads(store: &Store) -> u64 {
    store.watcher.0.load(Ordering::Relaxed)
}

const LOCATION: &str = "memory://shared";

/// A shared store (counting pack reads) with a new repository in it, and a temporary
/// directory for caches and disks.
fn shared_store() -> Result<SharedStore<Store>> {
    let store = Watched {
        objects: Arc::default(),
        watcher: PackReads::default(),
    };
    SharedStore::init(store, LOCATION)
}

fn disk(dir: &Path, name: &str, seed: usize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.img"));
    make_disk(&path, 12 << 20, seed)?;
    Ok(path)
}

#[test]
fn two_hosts_back_up_at_once_and_restore_each_others_snapshots() -> Result<()> {
    let shared = shared_store()?;
    let (d, store) = (shared.path(), &shared.store);
    let (disk_a, disk_b) = (disk(d, "a", 1)?, disk(d, "b", 40)?);
    let (host_a, host_b) = (shared.host("a")?, shared.host("b")?);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| backup_with_engine(&host_a, &disk_a, "web01"));
        let b = s.spawn(|| backup_with_engine(&host_b, &disk_b, "db01"));
        (a.join(), b.join())
    });
    let (Ok(a), Ok(b)) = (a, b) else {
        anyhow::bail!("a backup thread panicked");
    };
    let (a, b) = (a?, b?);
    // Neither host has read the other's snapshot yet: each finds it on demand.
    assert!(restores_to(
        &host_a,
        &b.snapshot_id,
        &disk_b,
        &d.join("b-at-a.img")
    )?);
    assert!(restores_to(
        &host_b,
        &a.snapshot_id,
        &disk_a,
        &d.join("a-at-b.img")
    )?);
    for h in [&host_a, &host_b] {
        assert_eq!(h.snapshots(None)?.len(), 2);
    }
    // A verification one host records is in the other's history after a refresh.
    let snap = host_a.resolve_snapshot(&b.snapshot_id, None)?;
    let options = stackvault::verify::VerifyOptions::default();
    stackvault::verify_snapshot(&host_a, &snap, &options, &NoProgress)?;
    host_b.refresh()?;
    assert!(host_b
        .last_verifications()?
        .contains_key(b.snapshot_id.as_str()));
    // No lock is left behind by either host.
    assert!(store.list("locks/")?.is_empty());
    Ok(())
}

#[test]
fn a_host_learns_anothers_packs_from_deltas_and_deduplicates_against_them() -> Result<()> {
    let shared = shared_store()?;
    let (d, store) = (shared.path(), &shared.store);
    let disk_a = disk(d, "a", 7)?;
    let (host_a, host_b) = (shared.host("a")?, shared.host("b")?);
    let first = backup_with_engine(&host_a, &disk_a, "web01")?;
    assert!(first.stats.bytes_added > 0);
    let packs = store.list("packs/")?.len();
    assert!(packs > 0);
    assert_eq!(store.list("index/")?.len(), packs, "one delta per pack");

    let reads = pack_reads(store);
    host_b.refresh()?;
    assert_eq!(pack_reads(store), reads, "learning packs reads no pack");
    assert_eq!(host_b.index().counts()?, host_a.index().counts()?);
    // The same disk from the other host: everything is already stored.
    let again = backup_with_engine(&host_b, &disk_a, "web01")?;
    assert_eq!(again.stats.new_chunks, 0, "{:?}", again.stats);
    assert_eq!(again.stats.bytes_added, 0);
    assert_eq!(store.list("packs/")?.len(), packs);

    // A third host with an empty cache builds it from deltas alone.
    let reads = pack_reads(store);
    let host_c = shared.host("c")?;
    assert_eq!(pack_reads(store), reads);
    assert!(restores_to(
        &host_c,
        &first.snapshot_id,
        &disk_a,
        &d.join("out.img")
    )?);
    Ok(())
}

#[test]
fn packs_without_deltas_are_indexed_from_their_tables() -> Result<()> {
    let shared = shared_store()?;
    let (d, store) = (shared.path(), &shared.store);
    let disk_a = disk(d, "a", 3)?;
    let first = backup_with_engine(&shared.host("a")?, &disk_a, "web01")?;
    // As a backup killed between a pack and its delta leaves it (or a build without deltas).
    let deltas = store.list("index/")?;
    assert!(!deltas.is_empty());
    for key in &deltas {
        store.remove(key)?;
    }
    let fresh = shared.host("fresh")?;
    assert!(restores_to(
        &fresh,
        &first.snapshot_id,
        &disk_a,
        &d.join("out.img")
    )?);
    // The writable host wrote the missing deltas back: the next host needs no pack.
    assert_eq!(store.list("index/")?.len(), deltas.len());
    let reads = pack_reads(store);
    shared.host("next")?;
    assert_eq!(pack_reads(store), reads);
    Ok(())
}

#[test]
fn a_host_forgets_packs_another_host_pruned() -> Result<()> {
    let shared = shared_store()?;
    let (d, store) = (shared.path(), &shared.store);
    let (disk_a, disk_b) = (disk(d, "a", 11)?, disk(d, "b", 60)?);
    let (host_a, host_b) = (shared.host("a")?, shared.host("b")?);
    let kept = backup_with_engine(&host_a, &disk_a, "web01")?;
    let gone = backup_with_engine(&host_a, &disk_b, "db01")?;
    host_b.refresh()?;
    stackvault::maintain::forget::forget(&host_a, std::slice::from_ref(&gone.snapshot_id), false)?;
    let options = stackvault::PruneOptions {
        max_unused: 0.0,
        ..Default::default()
    };
    // Two-phase on a shared store: the first prune condemns, one after the grace period
    // deletes (the records are aged here in place of the clock).
    let condemned = stackvault::prune(&host_a, &options, &NoProgress)?;
    assert!(condemned.packs_condemned > 0, "{condemned:?}");
    let ago = options.grace + std::time::Duration::from_secs(31);
    for key in store.list("condemned/")? {
        let mut body: serde_json::Value = serde_json::from_slice(&store.get(&key)?)?;
        body["time"] =
            stackvault::host::rfc3339(stackvault::maintain::forget::now_utc() - ago).into();
        store.remove(&key)?;
        store.put(&key, &serde_json::to_vec(&body)?)?;
    }
    let pruned = stackvault::prune(&host_a, &options, &NoProgress)?;
    assert!(pruned.packs_deleted > 0, "{pruned:?}");
    // Every delta still names a pack: prune's deletions went delta first.
    assert_eq!(store.list("index/")?.len(), store.list("packs/")?.len());
    // Host b's cache still lists the deleted packs; a refresh drops them, and what it still
    // needs is found where prune put it.
    host_b.refresh()?;
    assert_eq!(host_b.index().counts()?, host_a.index().counts()?);
    // The snapshot host a forgot is gone from host b's catalogue too, not reported as damage.
    let ids: Vec<String> = host_b
        .snapshots(None)?
        .into_iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(ids, vec![kept.snapshot_id.clone()]);
    assert!(restores_to(
        &host_b,
        &kept.snapshot_id,
        &disk_a,
        &d.join("out.img")
    )?);
    Ok(())
}

#[test]
fn a_repository_string_with_an_unknown_scheme_is_a_usage_error_and_creates_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for location in [
        "s3:bucket",
        "https://acct.blob.core.windows.net/c",
        "foo://x/y",
    ] {
        let out = stackvault_tests::sv_command()
            .current_dir(dir.path())
            .args(["--quiet", "init", location])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{location}: {stderr}");
        assert!(stderr.contains(location), "{location}: {stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "nothing created");
    // A local directory whose name has a colon is still possible, spelled as a path.
    let out = stackvault_tests::sv_command()
        .current_dir(dir.path())
        .args(["--quiet", "init", "./backups:2024"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("backups:2024/config").exists());
    Ok(())
}

#[test]
fn a_repository_made_for_a_local_directory_is_not_shared_on_a_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let local = dir.path().join("local");
    Repo::init(&local, &InitOptions::default())?;
    let store = Arc::new(MemoryBackend::new());
    store.put("config", &std::fs::read(local.join("config"))?)?;
    let err = Repo::open_on(store, &dir.path().join("cache"), LOCATION).err();
    assert!(
        matches!(&err, Some(stackvault::Error::Unsupported { what }) if what.contains("index-deltas")),
        "{err:?}"
    );
    Ok(())
}

/// The index files of host `name`'s cache (the database and its write-ahead log).
fn cache_index_files(shared: &SharedStore<Store>, name: &str) -> Result<Vec<PathBuf>> {
    let root = shared
        .path()
        .join(format!("cache-{name}"))
        .join("stackvault");
    let mut files = Vec::new();
    for repo in std::fs::read_dir(&root)? {
        let dir = repo?.path();
        for file in ["index.sqlite", "index.sqlite-wal"] {
            if dir.join(file).exists() {
                files.push(dir.join(file));
            }
        }
    }
    anyhow::ensure!(!files.is_empty(), "no cache index under {}", root.display());
    Ok(files)
}

/// A remote repository's cache commits without syncing (`index::Durability::Cache`): a power
/// cut may roll it back to an earlier commit. That is safe only because every open brings the
/// cache up to date from the store: a cache rolled back past a backup's packs and snapshot
/// learns them again, deduplicates against them and restores the snapshot.
#[test]
fn a_cache_rolled_back_by_a_power_cut_learns_again_what_it_forgot() -> Result<()> {
    let shared = shared_store()?;
    let (d, store) = (shared.path(), &shared.store);
    let (disk_1, disk_2) = (disk(d, "one", 21)?, disk(d, "two", 22)?);
    backup_with_engine(&shared.host("a")?, &disk_1, "web01")?;
    // The cache as a power cut right after that backup's last commit could leave it.
    let saved: Vec<(PathBuf, Vec<u8>)> = cache_index_files(&shared, "a")?
        .into_iter()
        .map(|f| std::fs::read(&f).map(|bytes| (f, bytes)))
        .collect::<std::io::Result<_>>()?;
    let second = backup_with_engine(&shared.host("a")?, &disk_2, "db01")?;
    assert!(second.stats.bytes_added > 0);
    let packs = store.list("packs/")?.len();
    // Rolled back: the second backup's packs and snapshot are gone from the cache.
    for f in cache_index_files(&shared, "a")? {
        std::fs::remove_file(&f)?;
    }
    let _ = std::fs::remove_file(saved[0].0.with_extension("sqlite-shm"));
    for (f, bytes) in &saved {
        std::fs::write(f, bytes)?;
    }
    let disks_in = |index: &stackvault::index::Index| -> Result<Vec<String>> {
        Ok(index
            .snapshots(None)?
            .into_iter()
            .map(|s| s.meta.disk)
            .collect())
    };
    let rolled_back = disks_in(&stackvault::index::Index::open(&saved[0].0)?)?;
    assert!(
        !rolled_back.contains(&"db01".to_string()),
        "{rolled_back:?}"
    );
    let host_a = shared.host("a")?;
    let disks = disks_in(&host_a.index())?;
    assert!(disks.contains(&"db01".to_string()), "{disks:?}");
    let again = backup_with_engine(&host_a, &disk_2, "db01")?;
    assert_eq!(again.stats.bytes_added, 0, "{:?}", again.stats);
    assert_eq!(store.list("packs/")?.len(), packs);
    assert!(restores_to(
        &host_a,
        &second.snapshot_id,
        &disk_2,
        &d.join("out.img")
    )?);
    Ok(())
}

/// A cache keeps its log between commands. When only its database is deleted, the index is
/// rebuilt (under the cache's rebuild lock, the stale log removed first: SQLite's documentation
/// warns that a log replayed onto another database corrupts it; this test does not reproduce
/// that) and serves every snapshot, one another host stored meanwhile too.
#[test]
fn a_cache_index_deleted_without_its_log_is_rebuilt_whole() -> Result<()> {
    let shared = shared_store()?;
    let d = shared.path();
    let (disk_1, disk_2) = (disk(d, "one", 31)?, disk(d, "two", 32)?);
    let first = backup_with_engine(&shared.host("a")?, &disk_1, "web01")?;
    let second = backup_with_engine(&shared.host("a")?, &disk_2, "db01")?;
    let files = cache_index_files(&shared, "a")?;
    let log = files
        .iter()
        .find(|f| f.to_string_lossy().ends_with("-wal"))
        .context("the cache kept no log")?;
    anyhow::ensure!(std::fs::metadata(log)?.len() > 0, "the kept log is empty");
    std::fs::remove_file(&files[0])?;
    // The rebuilt index differs from the deleted one: another host stored more meanwhile.
    let disk_3 = disk(d, "three", 33)?;
    let third = backup_with_engine(&shared.host("b")?, &disk_3, "app01")?;
    let host_a = shared.host("a")?;
    let problems = host_a.index().integrity_problems()?;
    anyhow::ensure!(problems.is_empty(), "{problems:?}");
    assert_eq!(host_a.index().snapshots(None)?.len(), 3);
    for (report, source) in [(&first, &disk_1), (&second, &disk_2), (&third, &disk_3)] {
        assert!(restores_to(
            &host_a,
            &report.snapshot_id,
            source,
            &d.join("out.img")
        )?);
    }
    Ok(())
}
