//! The warm read path of `SnapshotReader` (what `serve --nbd` does for every cached read):
//! a chunk checked once in a cached frame is served again without an index lookup, a hash or
//! a decode, and the entries that remember checked chunks are charged to the memory budget
//! like the frames they point into.

use stackvault::Repo;
use stackvault_tests::{reader_without_read_ahead, Fixture, Rng};

const DISK_SIZE: u64 = 12 << 20;

fn backed_up(f: &Fixture) -> anyhow::Result<(Vec<u8>, String)> {
    f.backup_new_disk_bytes("d", DISK_SIZE, 23)
}

fn random_offsets(count: usize, len: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..count).map(|_| rng.below(DISK_SIZE - len)).collect()
}

#[test]
fn warm_reads_need_no_index_lookup_and_no_decode() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    // The whole disk's frames fit: every chunk read twice is a hit the second time.
    let reader = reader_without_read_ahead(&repo, &id, 64 << 20)?;
    let offsets = random_offsets(300, 4096, 3);
    let mut buf = vec![0u8; 4096];
    let read_all = |buf: &mut Vec<u8>| -> anyhow::Result<()> {
        for &at in &offsets {
            reader.read_at(at, buf)?;
            assert!(
                buf[..] == disk[at as usize..at as usize + 4096],
                "read at {at} differs"
            );
        }
        Ok(())
    };
    read_all(&mut buf)?;
    let cold = reader.stats();
    assert!(
        cold.index_lookups > 0 && cold.frames_decoded > 0,
        "the cold pass read nothing from the repository: {cold:?}"
    );
    read_all(&mut buf)?;
    let warm = reader.stats();
    assert_eq!(
        warm.index_lookups, cold.index_lookups,
        "warm reads looked chunks up in the index again"
    );
    assert_eq!(
        warm.frames_decoded, cold.frames_decoded,
        "warm reads decoded frames again"
    );
    assert!(warm.cache_hits > cold.cache_hits);
    // Other bytes of chunks read before: hits too, and equal to the disk.
    for &at in &offsets {
        let near = (at / 4096) * 4096;
        reader.read_at(near, &mut buf)?;
        assert!(buf[..] == disk[near as usize..near as usize + 4096]);
    }
    assert_eq!(reader.stats().frames_decoded, cold.frames_decoded);
    Ok(())
}

#[test]
fn remembered_chunks_are_charged_to_the_budget() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let (disk, id) = backed_up(&f)?;
    let repo = Repo::open(&f.repo())?;
    let capacity = 1 << 20;
    let reader = reader_without_read_ahead(&repo, &id, capacity)?;
    let mut buf = vec![0u8; 64 << 10];
    for at in random_offsets(400, buf.len() as u64, 9) {
        reader.read_at(at, &mut buf)?;
        assert!(buf[..] == disk[at as usize..at as usize + buf.len()]);
        let s = reader.budget().stats();
        assert!(s.used_bytes <= capacity, "over the budget: {s:?}");
    }
    let s = reader.budget().stats();
    // Nothing is in flight now: what is charged beyond the cached frames is the entries.
    assert!(
        s.used_bytes > s.cached_bytes,
        "the checked-chunk entries are not charged: {s:?}"
    );
    assert!(s.peak_bytes <= capacity, "{s:?}");
    Ok(())
}
