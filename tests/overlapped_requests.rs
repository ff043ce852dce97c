//! Requests of a remote backup that overlap others (`format-spec/remote.md`, "Requests of a
//! backup"): the key object's GET goes out as soon as the `keys/` listing answers, while the
//! catch-up listings of the open are still out; the re-check's reads before the manifest go
//! out while the last pack's index delta is still being stored. Each test holds back the
//! request that used to come first until the one that used to follow it has arrived (or a
//! generous timeout has passed, as it would in the old order, failing the test).
//!
//! That the re-check's reads made early still catch a prune is pinned by
//! `shared_prune.rs`, whose gate stops the re-check's listing (now the early one) while a
//! prune condemns the packs the backup deduplicated against.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use stackvault::store::{Backend, MemoryBackend, ObjectInfo, ObjectWriter, Version};
use stackvault_tests::{backup_with_engine, make_disk, restores_to, SharedStore};

use crate::faultproxy::FaultProxy;
use crate::remote_maintain::{moto, Remote};

/// How long a held request waits for the one that should overtake it. The overlapped order
/// needs milliseconds; the old order would never release it.
const HOLD: Duration = Duration::from_secs(10);

/// A request held until another is seen: `seen` is set (and waiters woken) when the other
/// arrives; `overtaken` records, for the held request, whether it came in time.
#[derive(Default)]
struct Hold {
    state: Mutex<HoldState>,
    moved: Condvar,
}

#[derive(Default)]
struct HoldState {
    /// How many of the awaited requests arrived.
    seen: u32,
    /// For each held request: whether the awaited one had arrived before [`HOLD`] ran out.
    overtaken: Vec<bool>,
}

impl Hold {
    fn saw(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.seen += 1;
        self.moved.notify_all();
    }

    /// Waits until `n` awaited requests arrived, at most [`HOLD`]; records the outcome.
    fn wait_for(&self, n: u32) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut s, _) = self
            .moved
            .wait_timeout_while(s, HOLD, |s| s.seen < n)
            .unwrap_or_else(|p| p.into_inner());
        let came = s.seen >= n;
        s.overtaken.push(came);
    }

    fn overtaken(&self) -> Vec<bool> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .overtaken
            .clone()
    }
}

#[test]
fn the_key_object_is_read_while_the_open_still_lists_packs() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    // Encrypted (the suite's default): the open reads a key object.
    let r = Remote::s3(&moto, "overlapkeys")?;
    r.json(&["init"])?;
    let hold = Arc::new(Hold::default());
    let rule_hold = hold.clone();
    // The `packs/` listing waits for the GET of a key object (a path under keys/, not a
    // listing): before, that GET was sent only once every listing of the open had answered.
    let proxy = FaultProxy::start(moto.port, move |req| {
        if req.method == "GET" && req.target.contains("prefix=repo%2Fpacks%2F") {
            rule_hold.wait_for(1);
        } else if req.method == "GET"
            && req.target.contains("/repo/keys/")
            && !req.target.contains('?')
        {
            rule_hold.saw();
        }
        None
    })?;
    let via = Remote {
        endpoint: proxy.endpoint(),
        ..r
    };
    via.json(&["snapshots"])?;
    ensure!(
        hold.overtaken() == vec![true],
        "the key object's GET waited for the packs/ listing: {:?}",
        hold.overtaken()
    );
    Ok(())
}

/// A handle on shared in-memory objects whose index-delta PUTs wait for a second listing of
/// `condemned/` (the backup's first is rule 2's read before deduplicating; the second, its
/// re-check before the manifest).
struct HoldDeltas {
    objects: Arc<MemoryBackend>,
    hold: Hold,
}

impl Backend for HoldDeltas {
    fn put(&self, key: &str, data: &[u8]) -> stackvault::Result<()> {
        if key.starts_with("index/") {
            self.hold.wait_for(2);
        }
        self.objects.put(key, data)
    }
    fn put_versioned(&self, key: &str, data: &[u8]) -> stackvault::Result<Version> {
        self.objects.put_versioned(key, data)
    }
    fn get(&self, key: &str) -> stackvault::Result<Vec<u8>> {
        self.objects.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> stackvault::Result<Vec<u8>> {
        self.objects.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> stackvault::Result<u64> {
        self.objects.size(key)
    }
    fn exists(&self, key: &str) -> stackvault::Result<bool> {
        self.objects.exists(key)
    }
    fn list_with_sizes(&self, prefix: &str) -> stackvault::Result<Vec<ObjectInfo>> {
        if prefix == "condemned/" {
            self.hold.saw();
        }
        self.objects.list_with_sizes(prefix)
    }
    fn remove(&self, key: &str) -> stackvault::Result<()> {
        self.objects.remove(key)
    }
    fn version(&self, key: &str) -> stackvault::Result<Version> {
        self.objects.version(key)
    }
    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> stackvault::Result<Version> {
        self.objects.replace(key, data, expected)
    }
    fn delete_if(&self, key: &str, expected: &Version) -> stackvault::Result<()> {
        self.objects.delete_if(key, expected)
    }
    fn writer<'a>(&'a self, dir: &str) -> stackvault::Result<Box<dyn ObjectWriter + 'a>> {
        self.objects.writer(dir)
    }
}

#[test]
fn the_recheck_before_the_manifest_reads_while_the_last_delta_is_stored() -> Result<()> {
    let shared = SharedStore::init(MemoryBackend::new(), "memory://overlapped")?;
    let held = Arc::new(HoldDeltas {
        objects: shared.store.clone(),
        hold: Hold::default(),
    });
    let host = shared.host_via(held.clone(), "a")?;
    let disk = shared.path().join("d.img");
    // Under one pack: its delta is the backup's last upload.
    make_disk(&disk, 6 << 20, 3)?;
    let report = backup_with_engine(&host, &disk, "d")?;
    ensure!(
        held.hold.overtaken() == vec![true],
        "the delta's PUT waited for the re-check's listing in vain: the re-check came after \
         the uploads ({:?})",
        held.hold.overtaken()
    );
    // The snapshot is whole on another host, which knows its pack from the delta.
    let other = shared.host("b")?;
    ensure!(restores_to(
        &other,
        &report.snapshot_id,
        &disk,
        &shared.path().join("out.img")
    )?);
    Ok(())
}
