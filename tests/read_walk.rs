//! The one verified chunk path (`read::verified`, `read::walk`): a `ChunkWalker` yields a
//! snapshot's segments as verified bytes and zero runs, exactly the disk; damage ends the walk
//! naming the pack; and the random-access `SnapshotReader` finds its chunks the way every
//! other reader does, including a chunk another host stored after this handle opened.

use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use stackvault::read::{ChunkWalker, Piece, ReaderOptions, SnapshotReader};
use stackvault::store::{Backend, MemoryBackend};
use stackvault::Repo;
use stackvault_tests::{backup_with_engine, Disk, SharedStore};

const LOCATION: &str = "memory://walk";
const DISK_SIZE: u64 = 12 << 20;

/// A repository on a shared in-memory object store (a remote repository: each host has its
/// own index cache), and a directory for caches and disks.
fn shared_store() -> Result<SharedStore<MemoryBackend>> {
    SharedStore::init(MemoryBackend::default(), LOCATION)
}

/// Backs up a sample disk with zero gaps (`Layout::Filled`) through `repo`; its bytes and id.
fn backed_up(repo: &Repo, dir: &Path, seed: u64) -> Result<(Vec<u8>, String)> {
    let disk = Disk::filled(DISK_SIZE, 60, seed);
    let path = dir.join(format!("disk-{seed}.img"));
    disk.write(&path)?;
    let report = backup_with_engine(repo, &path, "d")?;
    Ok((std::fs::read(&path)?, report.snapshot_id.to_string()))
}

/// Pieces as a walk yields them: (disk offset, bytes or `None` for zeros, length).
type Walked = Vec<(u64, Option<Vec<u8>>, u64)>;

/// Every piece a walker yields for `range` of snapshot `id`, segment by segment.
fn walk(repo: &Repo, id: &str, range: std::ops::Range<u64>) -> Result<Walked> {
    let manifest = repo.load_manifest(id)?;
    let seg = u64::from(manifest.segment_size);
    let mut walker = ChunkWalker::new(repo, id);
    let mut pieces = Vec::new();
    for i in range.start / seg..range.end.div_ceil(seg) {
        let extents = manifest.segment(i)?;
        walker.walk(&extents, i * seg, range.clone(), &mut |piece| {
            pieces.push(match piece {
                Piece::Zero { offset, len } => (offset, None, len),
                Piece::Data { offset, data } => (offset, Some(data.to_vec()), data.len() as u64),
            });
            Ok(())
        })?;
    }
    Ok(pieces)
}

#[test]
fn a_walk_yields_the_disk_as_verified_bytes_and_the_manifests_zero_runs() -> Result<()> {
    let shared = shared_store()?;
    let repo = shared.host("a")?;
    let (disk, id) = backed_up(&repo, shared.path(), 5)?;
    let pieces = walk(&repo, &id, 0..DISK_SIZE)?;
    // In disk order, without gaps, and byte for byte the disk.
    let mut at = 0u64;
    let mut zero_runs = Vec::new();
    for (offset, data, len) in &pieces {
        ensure!(*offset == at, "piece at {offset}, expected {at}");
        let want = &disk[*offset as usize..(*offset + *len) as usize];
        match data {
            Some(d) => ensure!(d[..] == *want, "bytes at {offset} differ"),
            None => {
                ensure!(
                    want.iter().all(|&b| b == 0),
                    "zero run at {offset} is not zeros"
                );
                match zero_runs.last_mut() {
                    Some((start, n)) if *start + *n == *offset => *n += len,
                    _ => zero_runs.push((*offset, *len)),
                }
            }
        }
        at += len;
    }
    ensure!(at == DISK_SIZE, "the walk ended at {at}");
    // The zero runs are the manifest's: those the random-access reader maps.
    let reader = SnapshotReader::open(&repo, &id, ReaderOptions::default())?;
    let mapped: Vec<(u64, u64)> = reader
        .map(0, DISK_SIZE, usize::MAX)?
        .into_iter()
        .filter(|r| r.zero)
        .map(|r| (r.offset, r.len))
        .collect();
    ensure!(!mapped.is_empty(), "the sample disk has no zero runs");
    assert_eq!(zero_runs, mapped);

    // A range that cuts chunks and segments yields just its bytes.
    let (from, to) = (3 * 1024 * 1024 + 12_345, 9 * 1024 * 1024 + 777);
    let mut got = Vec::new();
    for (offset, data, len) in walk(&repo, &id, from..to)? {
        ensure!(offset == from + got.len() as u64, "gap before {offset}");
        match data {
            Some(d) => got.extend_from_slice(&d),
            None => got.resize(got.len() + len as usize, 0),
        }
    }
    ensure!(
        got[..] == disk[from as usize..to as usize],
        "the range's bytes differ"
    );
    Ok(())
}

#[test]
fn a_damaged_frame_ends_the_walk_naming_its_pack() -> Result<()> {
    let shared = shared_store()?;
    let repo = shared.host("a")?;
    let (_, id) = backed_up(&repo, shared.path(), 6)?;
    // One byte in the middle of the (first) pack, inside some frame.
    let pack = shared
        .store
        .list_with_sizes("packs/")?
        .into_iter()
        .next()
        .context("no pack")?;
    let mut bytes = shared.store.get(&pack.key)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    shared.store.remove(&pack.key)?;
    shared.store.put(&pack.key, &bytes)?;
    let err = walk(&repo, &id, 0..DISK_SIZE)
        .err()
        .context("a walk over a damaged pack succeeded")?;
    let err = err
        .downcast::<stackvault::Error>()
        .context("not an engine error")?;
    assert!(err.is_corruption(), "{err}");
    let name = pack.key.trim_start_matches("packs/");
    let name = name.rsplit('/').next().unwrap_or(name);
    assert!(err.to_string().contains(name), "{err} does not name {name}");
    Ok(())
}

#[test]
fn a_reader_finds_chunks_another_host_stored_after_it_opened() -> Result<()> {
    let shared = shared_store()?;
    // Host A opens the repository first; host B then backs up a disk A has never seen.
    let host_a = shared.host("a")?;
    let host_b = shared.host("b")?;
    let (disk, id) = backed_up(&host_b, shared.path(), 7)?;
    // A serves B's snapshot by id (as `serve --nbd` would): its index cache learns B's packs
    // on the first chunk it does not know, as a restore's lookups do.
    let reader = SnapshotReader::open(&host_a, &id, ReaderOptions::default())?;
    let mut buf = vec![0u8; DISK_SIZE as usize];
    reader.read_at(0, &mut buf)?;
    ensure!(buf == disk, "host A read other bytes than host B backed up");
    Ok(())
}
