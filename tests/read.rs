//! `SnapshotReader`, the random-access reader behind `serve`: random reads of any length and
//! alignment equal the disk, the allocation map's zero runs are the backup's, the frame cache
//! stays within its bytes, and read-ahead loads frames before a sequential reader asks.

use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use stackvault::read::{ReaderOptions, SnapshotReader};
use stackvault::Repo;
use stackvault_tests::{make_disk, p, reader_without_read_ahead, sv_json_ok, Fixture, Rng};

const DISK_SIZE: u64 = 12 << 20;

fn backed_up(f: &Fixture) -> anyhow::Result<(Vec<u8>, String, u64)> {
    let disk = f.path("d.img");
    make_disk(&disk, DISK_SIZE, 11)?;
    let v = sv_json_ok(&["-r", p(&f.repo()), "backup", p(&disk), "--disk", "d"])?;
    let id = v["snapshot_id"].as_str().context("id")?.to_string();
    let zero = v["stats"]["zero_bytes"].as_u64().context("zero_bytes")?;
    Ok((std::fs::read(&disk)?, id, zero))
}

#[test]
fn random_reads_equal_the_disk_within_a_bounded_cache() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id, zero_bytes) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    let cache = 1 << 20;
    let reader = reader_without_read_ahead(&repo, &id, cache)?;
    assert_eq!(reader.size(), DISK_SIZE);
    let mut rng = Rng::new(5);
    for _ in 0..400 {
        let len = 1 + rng.below(200_000) as usize;
        let at = rng.below(DISK_SIZE - len as u64);
        let mut buf = vec![0xeeu8; len];
        reader.read_at(at, &mut buf)?;
        assert!(
            buf[..] == disk[at as usize..at as usize + len],
            "read of {len} at {at} differs"
        );
        assert!(reader.cached_bytes() <= cache, "cache over its bound");
    }
    // The whole disk at once, and the last byte.
    let mut all = vec![0u8; DISK_SIZE as usize];
    reader.read_at(0, &mut all)?;
    assert!(all == disk);
    let mut last = [0u8; 1];
    reader.read_at(DISK_SIZE - 1, &mut last)?;
    assert_eq!(last[0], disk[disk.len() - 1]);
    // Past the end is refused, not truncated.
    assert!(reader.read_at(DISK_SIZE - 1, &mut [0u8; 2]).is_err());
    assert!(reader.read_at(u64::MAX, &mut [0u8; 2]).is_err());

    // The map: contiguous runs, zero runs read as zeros and add up to the backup's zeros.
    let runs = reader.map(0, DISK_SIZE, usize::MAX)?;
    let mut at = 0;
    let mut zeros = 0;
    for r in &runs {
        assert_eq!(r.offset, at);
        at += r.len;
        if r.zero {
            zeros += r.len;
            assert!(disk[r.offset as usize..(r.offset + r.len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
    }
    assert_eq!(at, DISK_SIZE);
    assert_eq!(zeros, zero_bytes);
    assert_eq!(
        reader.map(0, DISK_SIZE, 1)?.len(),
        1,
        "max_runs is honoured"
    );
    Ok(())
}

#[test]
fn read_ahead_loads_the_next_frames_of_a_sequential_reader() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id, _) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    let reader = SnapshotReader::open(&repo, &id, ReaderOptions::default())?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> anyhow::Result<()> {
        s.spawn(|| reader.read_ahead_worker(&stop));
        reader.hint_sequential(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reader.stats().read_ahead_frames == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })?;
    let before = reader.stats();
    assert!(before.read_ahead_frames > 0, "read-ahead loaded nothing");
    // The first 4 MiB now come from the cache.
    let mut buf = vec![0u8; 4 << 20];
    reader.read_at(0, &mut buf)?;
    assert!(buf[..] == disk[..4 << 20]);
    let after = reader.stats();
    assert!(
        after.frames_decoded - before.frames_decoded < before.read_ahead_frames,
        "reads after read-ahead decoded {} frames again",
        after.frames_decoded - before.frames_decoded
    );
    Ok(())
}
