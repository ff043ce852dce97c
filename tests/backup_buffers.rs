//! A backup into a remote repository holds a fixed number of pack buffers however slowly the
//! store answers: the writer fills a pack only in a buffer an uploader gave back, and an
//! uploader gives its buffer back as soon as the pack is stored, before the pack's index delta.
//! (Before, each of the three uploads held its pack until its delta was stored too, and the
//! writer filled a fourth meanwhile: four 17 MiB buffers, half of a gen0's peak.) Through the
//! engine API on an in-memory store whose writes are slow; the store sees every pack's bytes,
//! and their addresses tell the buffers apart (they are reused, never freed during a backup).
//! An uploader that panics gives its buffer back too: the backup fails, it does not hang.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use stackvault::backup::DEFAULT_REMOTE_UPLOADS;
use stackvault::store::{Backend, MemoryBackend, ObjectInfo, Version};
use stackvault::{InitOptions, Repo};
use stackvault_tests::{backup_with_engine, Disk};

/// How long the store takes to answer each pack or delta PUT: long enough for the writer to
/// fill its next pack meanwhile.
const SLOW: Duration = Duration::from_millis(300);

/// An in-memory store whose pack and delta PUTs are slow, noting the address of every pack's
/// bytes; or (`panics`) one whose every pack PUT panics, as a bug in the upload path would.
#[derive(Default)]
struct SlowStore {
    inner: MemoryBackend,
    pack_buffers: Mutex<HashSet<usize>>,
    packs: Mutex<usize>,
    panics: bool,
}

impl Backend for SlowStore {
    fn put(&self, key: &str, data: &[u8]) -> stackvault::Result<()> {
        assert!(
            !(self.panics && key.starts_with("packs/")),
            "a bug in the upload path (this panic is the test's)"
        );
        if key.starts_with("packs/") {
            if let Ok(mut seen) = self.pack_buffers.lock() {
                seen.insert(data.as_ptr() as usize);
            }
            if let Ok(mut packs) = self.packs.lock() {
                *packs += 1;
            }
        }
        if key.starts_with("packs/") || key.starts_with("index/") {
            std::thread::sleep(SLOW);
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> stackvault::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> stackvault::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> stackvault::Result<u64> {
        self.inner.size(key)
    }
    fn exists(&self, key: &str) -> stackvault::Result<bool> {
        self.inner.exists(key)
    }
    fn list_with_sizes(&self, prefix: &str) -> stackvault::Result<Vec<ObjectInfo>> {
        self.inner.list_with_sizes(prefix)
    }
    fn remove(&self, key: &str) -> stackvault::Result<()> {
        self.inner.remove(key)
    }
    fn version(&self, key: &str) -> stackvault::Result<Version> {
        self.inner.version(key)
    }
    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> stackvault::Result<Version> {
        self.inner.replace(key, data, expected)
    }
    fn delete_if(&self, key: &str, expected: &Version) -> stackvault::Result<()> {
        self.inner.delete_if(key, expected)
    }
}

#[test]
fn a_remote_backup_holds_as_many_pack_buffers_as_uploads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SlowStore::default());
    let repo = Repo::init_on(
        store.clone(),
        &dir.path().join("cache"),
        "memory://slow",
        &InitOptions::default(),
    )?;
    ensure!(repo.is_remote(), "the store must be used as a remote one");
    // Incompressible: 126 MiB make seven 18 MiB packs.
    let disk = dir.path().join("d.img");
    Disk::random(126 << 20, 50).write(&disk)?;
    backup_with_engine(&repo, &disk, "d")?;
    let packs = *store
        .packs
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let buffers = store
        .pack_buffers
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .len();
    ensure!(packs >= 7, "only {packs} packs stored");
    ensure!(
        buffers <= DEFAULT_REMOTE_UPLOADS,
        "{packs} packs were stored from {buffers} buffers, more than the \
         {DEFAULT_REMOTE_UPLOADS} uploads"
    );
    Ok(())
}

#[test]
fn a_panicking_uploader_fails_the_backup_instead_of_hanging_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SlowStore {
        panics: true,
        ..SlowStore::default()
    });
    let repo = Repo::init_on(
        store,
        &dir.path().join("cache"),
        "memory://panics",
        &InitOptions::default(),
    )?;
    // Five packs' worth: more packs than buffers, so that buffers lost with their uploaders
    // would leave the writer waiting for one.
    let disk = dir.path().join("d.img");
    Disk::random(90 << 20, 51).write(&disk)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = backup_with_engine(&repo, &disk, "d").map_err(|e| format!("{e:#}"));
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Err(e)) => {
            ensure!(e.contains("uploader panicked"), "another error: {e}");
            Ok(())
        }
        Ok(Ok(_)) => anyhow::bail!("the backup succeeded although every pack upload panicked"),
        Err(_) => anyhow::bail!("the backup hung after its uploaders panicked"),
    }
}
