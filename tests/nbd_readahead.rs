//! Read-ahead of `serve --nbd` starts for streams, not for luck: random reads that each land
//! just after the previous one (within the sequential gap) but never twice in a row load
//! nothing ahead, while a client reading on from where it stopped does get read-ahead. And the
//! read-ahead's work (`SnapshotReader::prefetch`) is all a read of its range needs: the read
//! after it makes no index lookup and decodes no frame.

use anyhow::Context as _;
use stackvault::Repo;
use stackvault_tests::{p, reader_without_read_ahead, sv_json_ok, Fixture, Rng};

use crate::nbd_support::{skip_without_clients, Raw, Served};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 48 * MIB;

fn backed_up(f: &Fixture) -> anyhow::Result<(Vec<u8>, String)> {
    f.backup_new_disk_bytes("d", DISK_SIZE, 29)
}

/// Serves `id`, reads `reads` (offset, length) through one client, checks the bytes, and
/// returns the server's reader counters from its "stopped" line.
fn served_reads(
    f: &Fixture,
    disk: &[u8],
    id: &str,
    socket: &str,
    reads: &[(u64, u32)],
) -> anyhow::Result<serde_json::Value> {
    let served = Served::start(&f.repo(), &f.path(socket), &[id, "--cache-mib", "64"])?;
    let mut client = Raw::go(&served.socket)?;
    for &(at, len) in reads {
        let got = client
            .read(at, len)?
            .map_err(|e| anyhow::anyhow!("read at {at} failed with error {e}"))?;
        let want = disk
            .get(at as usize..at as usize + len as usize)
            .context("read inside the disk")?;
        assert!(got == want, "read at {at} differs from the disk");
    }
    drop(client);
    let (code, stopped, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "{stderr}");
    Ok(stopped["reader"].clone())
}

#[test]
fn random_reads_just_after_the_last_start_no_read_ahead() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id) = backed_up(&f)?;
    // Pairs: a read anywhere, then one that starts a little after it ended (within the
    // 64 MiB a client may skip over holes), then back before it: each second read looks
    // sequential, but no two in a row do.
    let mut rng = Rng::new(41);
    let mut reads = Vec::new();
    let mut last_end = DISK_SIZE;
    for _ in 0..40 {
        let first = rng.below(last_end.min(DISK_SIZE - 8 * MIB) - 8192) & !4095;
        let next = first + 4096 + (rng.below(4 * MIB) & !4095);
        reads.push((first, 4096));
        reads.push((next, 4096));
        last_end = next + 4096;
    }
    let reader = served_reads(&f, &disk, &id, "r.sock", &reads)?;
    let batches = reader["read_ahead_batches"]
        .as_u64()
        .with_context(|| format!("read_ahead_batches in the stopped line's reader: {reader}"))?;
    let frames = reader["read_ahead_frames"]
        .as_u64()
        .context("read_ahead_frames")?;
    assert_eq!(
        (batches, frames),
        (0, 0),
        "random reads started read-ahead: {reader}"
    );

    // A stream: 256 KiB reads, each where the last ended.
    let stream: Vec<_> = (0..24).map(|i| (i * 256 * 1024, 256 * 1024)).collect();
    let reader = served_reads(&f, &disk, &id, "s.sock", &stream)?;
    let batches = reader["read_ahead_batches"]
        .as_u64()
        .context("read_ahead_batches")?;
    assert!(
        batches > 0,
        "a sequential reader got no read-ahead: {reader}"
    );
    Ok(())
}

#[test]
fn a_prefetched_range_is_read_without_lookups_or_decoding() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    let reader = reader_without_read_ahead(&repo, &id, 64 << 20)?;
    let (at, len) = (3 * MIB + 777, 5 * MIB);
    reader.prefetch(at, len)?;
    let prefetched = reader.stats();
    assert!(
        prefetched.index_lookups > 0 && prefetched.frames_decoded > 0,
        "prefetch loaded nothing: {prefetched:?}"
    );
    let mut buf = vec![0u8; len as usize];
    reader.read_at(at, &mut buf)?;
    assert!(buf[..] == disk[at as usize..(at + len) as usize]);
    let read = reader.stats();
    assert_eq!(
        (read.index_lookups, read.frames_decoded),
        (prefetched.index_lookups, prefetched.frames_decoded),
        "the read after prefetch looked chunks up or decoded frames again"
    );
    // Prefetching it again finds every chunk checked: no lookup either.
    reader.prefetch(at, len)?;
    assert_eq!(reader.stats().index_lookups, prefetched.index_lookups);
    Ok(())
}

/// The read-ahead looks up the first chunk of each frame and places the chunks that follow it
/// in the frame by their hashes, as a restore does: on a fresh backup, about one index lookup
/// per frame, not one per chunk (before: one per chunk, and SQLite was a quarter of a
/// `qemu-img convert`'s server CPU).
#[test]
fn prefetch_looks_up_about_one_chunk_per_frame() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    let reader = reader_without_read_ahead(&repo, &id, 64 << 20)?;
    let (at, len) = (MIB + 4096, 16 * MIB);
    let data_runs = reader
        .map(at, len, usize::MAX)?
        .iter()
        .filter(|r| !r.zero)
        .count();
    assert!(data_runs > 0, "the range holds no data");
    reader.prefetch(at, len)?;
    let s = reader.stats();
    assert!(s.frames_decoded > 0, "prefetch loaded nothing: {s:?}");
    assert!(
        s.index_lookups <= 2 * s.frames_decoded,
        "{} index lookups for {} frames: prefetch looked up every chunk",
        s.index_lookups,
        s.frames_decoded
    );
    let mut buf = vec![0u8; len as usize];
    reader.read_at(at, &mut buf)?;
    assert!(buf[..] == disk[at as usize..(at + len) as usize]);
    assert_eq!(
        reader.stats().index_lookups,
        s.index_lookups,
        "the read after prefetch looked chunks up"
    );
    Ok(())
}

/// A guess that misses (the chunk after one in a frame is another frame's: a later snapshot
/// that moved data) is hashed, found wrong, and looked up: the bytes served are the disk's.
#[test]
fn prefetch_guesses_that_miss_are_looked_up() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, _) = backed_up(&f)?;
    // The second generation: the disk's halves swapped, so at the middle of each half the
    // chunk after one that lies inside a frame lies in another.
    let half = disk.len() / 2;
    let mut moved = disk[half..].to_vec();
    moved.extend_from_slice(&disk[..half]);
    let path = f.path("moved.img");
    std::fs::write(&path, &moved)?;
    let v = sv_json_ok(&["-r", p(&f.repo()), "backup", p(&path), "--disk", "d"])?;
    let id = v["snapshot_id"].as_str().context("id")?.to_string();
    let repo = Repo::open(&f.repo())?;
    let reader = reader_without_read_ahead(&repo, &id, 128 << 20)?;
    let len = moved.len() as u64;
    reader.prefetch(0, len)?;
    let prefetched = reader.stats();
    let mut buf = vec![0u8; moved.len()];
    reader.read_at(0, &mut buf)?;
    assert!(
        buf == moved,
        "the served disk differs from the backed-up one"
    );
    assert_eq!(
        reader.stats().index_lookups,
        prefetched.index_lookups,
        "a chunk the prefetch guessed wrong was not looked up and checked by it: {:?}",
        reader.stats()
    );
    Ok(())
}
