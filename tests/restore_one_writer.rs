//! A restore from object storage into a file writes from one thread, straight from the
//! decoded frames: the fetchers (32 GETs in flight) decode, one writer thread writes, so the
//! file's inode lock is never fought over, and a frame's chunks that follow each other on the
//! disk are one write of up to a whole frame, never gathered into a smaller run first.
//! (Targets that do not ask for one writer, a page blob, are still written by the fetchers:
//! `vm_blobs` restores into page blobs.) Through the engine API, on a repository shared through
//! an in-memory store (a remote repository, restored pack by pack), so the test can see the
//! threads and the writes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use anyhow::{ensure, Result};
use stackvault::restore::{restore_into, DiskTarget};
use stackvault::store::{Backend, MemoryBackend};
use stackvault::{backup, BackupOptions, InitOptions, NoProgress, Repo};
use stackvault_tests::{machine_bytes, MemDisk};

/// The largest write of a restore before writes came straight from frames: chunks were
/// gathered into runs of at most this many bytes.
const OLD_RUN_MAX: usize = 128 * 1024;

/// A disk image in memory that records which threads wrote it and how much at once.
struct Recording {
    one_writer: bool,
    image: Mutex<Vec<u8>>,
    threads: Mutex<HashSet<ThreadId>>,
    largest_write: Mutex<usize>,
}

impl Recording {
    fn new(len: usize, one_writer: bool) -> Self {
        Recording {
            one_writer,
            image: Mutex::new(vec![0; len]),
            threads: Mutex::default(),
            largest_write: Mutex::new(0),
        }
    }
}

fn poisoned<T>(_: T) -> stackvault::Error {
    stackvault::Error::Internal("a lock of the test target was poisoned".into())
}

impl DiskTarget for Recording {
    fn write_at(&self, offset: u64, data: &[u8]) -> stackvault::Result<()> {
        let start = usize::try_from(offset).map_err(poisoned)?;
        let mut image = self.image.lock().map_err(poisoned)?;
        let Some(place) = image.get_mut(start..start + data.len()) else {
            return Err(stackvault::Error::Internal(format!(
                "a write of {} bytes at {offset}, past the disk",
                data.len()
            )));
        };
        place.copy_from_slice(data);
        self.threads
            .lock()
            .map_err(poisoned)?
            .insert(std::thread::current().id());
        let mut largest = self.largest_write.lock().map_err(poisoned)?;
        *largest = (*largest).max(data.len());
        Ok(())
    }

    fn one_writer(&self) -> bool {
        self.one_writer
    }
}

/// Backs up 24 MiB of real machine data into a repository on an in-memory store and
/// restores it into a [`Recording`] asking for one writer or not; checks the bytes.
fn restored(dir: &std::path::Path, one_writer: bool) -> Result<Recording> {
    let store: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
    let repo = Repo::init_on(
        store.clone(),
        &dir.join("cache-a"),
        "memory://shared",
        &InitOptions::default(),
    )?;
    let disk = MemDisk {
        bytes: machine_bytes(24 << 20, 5),
    };
    let id: String = backup(
        &repo,
        &disk,
        &BackupOptions {
            disk: "d".into(),
            ..BackupOptions::default()
        },
        &NoProgress,
    )?
    .snapshot_id
    .into();
    // Another host's cache: it learns the packs from the index deltas, as a restore would.
    let reader = Repo::open_on(store, &dir.join("cache-b"), "memory://shared")?;
    ensure!(
        reader.is_remote(),
        "a repository on a store must restore pack by pack"
    );
    let manifest = reader.load_manifest(&id)?;
    let target = Recording::new(disk.bytes.len(), one_writer);
    let counts = restore_into(&reader, &id, &manifest, &target, &NoProgress)?;
    ensure!(
        counts.chunks > 100,
        "only {} chunks restored",
        counts.chunks
    );
    let image = target.image.lock().map_err(poisoned)?;
    ensure!(
        *image == disk.bytes,
        "the restored image differs from the disk"
    );
    drop(image);
    Ok(target)
}

#[test]
fn a_remote_restore_into_a_file_writes_from_one_thread_straight_from_frames() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let target = restored(dir.path(), true)?;
    let threads = target.threads.lock().map_err(poisoned)?;
    ensure!(
        threads.len() == 1,
        "{} threads wrote the file, not one writer",
        threads.len()
    );
    ensure!(
        !threads.contains(&std::thread::current().id()),
        "the planner wrote the file itself"
    );
    let largest = *target.largest_write.lock().map_err(poisoned)?;
    ensure!(
        largest > OLD_RUN_MAX,
        "the largest write was {largest} bytes: a frame's consecutive chunks must be one \
         write, not runs of {OLD_RUN_MAX}"
    );
    Ok(())
}
