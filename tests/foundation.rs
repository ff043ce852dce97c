//! Backup and restore of raw images through the engine API: round trips, dedup, errors.

use std::path::Path;

use anyhow::Result;
use stackvault::{
    backup, restore_to_file, BackupOptions, BackupReport, ChunkerParams, Error, InitOptions,
    NoProgress, Repo, RestoreOptions,
};
use stackvault_tests::{same_bytes, scribble, shared_small_dataset, Disk, Scribble};

fn init(dir: &Path) -> Result<Repo> {
    Ok(Repo::init(&dir.join("repo"), &InitOptions::default())?)
}

fn backup_file(repo: &Repo, path: &Path, disk: &str) -> Result<BackupReport> {
    let source = stackvault::open_source(path, &Default::default())?;
    Ok(backup(
        repo,
        source.as_ref(),
        &BackupOptions {
            disk: disk.into(),
            ..BackupOptions::default()
        },
        &NoProgress,
    )?)
}

/// Restores `id` and asserts the output equals `original`, byte for byte.
fn assert_restores(repo: &Repo, id: &str, original: &Path, out: &Path) -> Result<()> {
    assert!(
        stackvault_tests::restores_to(repo, id, original, out)?,
        "restore of {id} differs from {}",
        original.display()
    );
    Ok(())
}

#[test]
fn round_trip_of_odd_sized_real_data_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    // Not a multiple of the segment (4 MiB), the sector (512) or the zero block (4 KiB).
    let disk = dir.path().join("odd.img");
    Disk::filled(21 * (1 << 20) + 12_345, 60, 1).write(&disk)?;
    let report = backup_file(&repo, &disk, "odd")?;
    assert_eq!(report.virtual_size, 21 * (1 << 20) + 12_345);
    assert!(report.stats.zero_bytes > 0, "sample disk has free space");
    assert!(
        report.stats.bytes_added < report.stats.new_bytes,
        "real data compresses"
    );
    assert_restores(
        &repo,
        &report.snapshot_id,
        &disk,
        &dir.path().join("out.img"),
    )
}

#[test]
fn restore_is_sparse_where_the_disk_is_zero() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let disk = dir.path().join("mostly-empty.img");
    Disk::filled(32 << 20, 10, 2).write(&disk)?;
    let r = backup_file(&repo, &disk, "sparse")?;
    let out = dir.path().join("out.img");
    assert_restores(&repo, &r.snapshot_id, &disk, &out)?;
    let allocated = std::fs::metadata(&out)?.blocks() * 512;
    assert!(
        allocated < (32 << 20) / 2,
        "restored file allocates {allocated} bytes of a 32 MiB disk that is 10% full"
    );
    Ok(())
}

#[test]
fn all_zero_and_empty_images() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let zero = dir.path().join("zero.img");
    std::fs::write(&zero, vec![0u8; 9 << 20])?;
    let r = backup_file(&repo, &zero, "zero")?;
    assert_eq!(r.stats.chunks, 0);
    assert_eq!(r.stats.zero_bytes, 9 << 20);
    assert_eq!(r.stats.bytes_added, 0);
    assert_restores(&repo, &r.snapshot_id, &zero, &dir.path().join("zero.out"))?;

    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"")?;
    let r = backup_file(&repo, &empty, "empty")?;
    assert_eq!(r.virtual_size, 0);
    assert_restores(&repo, &r.snapshot_id, &empty, &dir.path().join("empty.out"))?;

    // Short odd tail that is not zero.
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, b"x")?;
    let r = backup_file(&repo, &tiny, "tiny")?;
    assert_restores(&repo, &r.snapshot_id, &tiny, &dir.path().join("tiny.out"))
}

#[test]
fn second_backup_adds_nothing_and_generations_share_chunks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let gen0 = dir.path().join("gen0.img");
    Disk::filled(40 << 20, 55, 3).write(&gen0)?;
    let first = backup_file(&repo, &gen0, "web01")?;
    let again = backup_file(&repo, &gen0, "web01")?;
    assert_eq!(again.stats.new_chunks, 0);
    assert_eq!(again.stats.bytes_added, 0);
    assert_eq!(again.root_digest, first.root_digest);

    let gen1 = dir.path().join("gen1.img");
    std::fs::copy(&gen0, &gen1)?;
    scribble(&gen1, Scribble::Week, 40, 4)?;
    let next = backup_file(&repo, &gen1, "web01")?;
    assert_ne!(next.root_digest, first.root_digest);
    assert!(
        next.stats.bytes_added * 3 < first.stats.bytes_added,
        "gen1 added {} bytes, gen0 {}",
        next.stats.bytes_added,
        first.stats.bytes_added
    );
    // A different disk shares what it has in common.
    let other = backup_file(&repo, &gen1, "web02")?;
    assert_eq!(other.stats.new_chunks, 0);
    assert_restores(&repo, &first.snapshot_id, &gen0, &dir.path().join("0.out"))?;
    assert_restores(&repo, &next.snapshot_id, &gen1, &dir.path().join("1.out"))
}

#[test]
fn fixed_chunker_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let options = InitOptions {
        chunker: ChunkerParams::Fixed { size: 1 << 20 },
        zstd_level: 1,
    };
    let repo = Repo::init(&dir.path().join("repo"), &options)?;
    let disk = dir.path().join("d.img");
    Disk::filled(13 << 20, 50, 5).write(&disk)?;
    let r = backup_file(&repo, &disk, "d")?;
    let manifest = repo.load_manifest(&r.snapshot_id)?;
    let mut offset = 0u64;
    for extents in manifest.segments() {
        for e in extents? {
            if let stackvault::format::manifest::Extent::Chunk { len, .. } = e {
                // Fixed chunks never cross a 1 MiB boundary of the disk.
                assert_eq!(
                    offset >> 20,
                    (offset + u64::from(len) - 1) >> 20,
                    "chunk at {offset}"
                );
            }
            offset += u64::from(e.len());
        }
    }
    assert!(r.stats.chunks >= 7, "{} chunks", r.stats.chunks);
    assert_restores(&repo, &r.snapshot_id, &disk, &dir.path().join("out"))
}

#[test]
fn shared_dataset_generations_dedup() -> Result<()> {
    let Some(data) = shared_small_dataset() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let g0 = backup_file(&repo, &data.join("gen0.raw"), "ds")?;
    let g1 = backup_file(&repo, &data.join("gen1.raw"), "ds")?;
    assert!(
        g1.stats.bytes_added * 2 < g0.stats.bytes_added,
        "gen1 added {} of gen0's {}",
        g1.stats.bytes_added,
        g0.stats.bytes_added
    );
    assert_restores(
        &repo,
        &g1.snapshot_id,
        &data.join("gen1.raw"),
        &dir.path().join("g1"),
    )
}

#[test]
fn repository_open_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope");
    assert!(matches!(
        Repo::open(&missing),
        Err(Error::NotARepository { .. })
    ));
    std::fs::create_dir(dir.path().join("plain"))?;
    assert!(matches!(
        Repo::open(&dir.path().join("plain")),
        Err(Error::NotARepository { .. })
    ));
    // init refuses a non-empty directory and an existing repository.
    std::fs::write(dir.path().join("plain/file"), b"x")?;
    assert!(matches!(
        Repo::init(&dir.path().join("plain"), &InitOptions::default()),
        Err(Error::DirectoryNotEmpty { .. })
    ));
    let repo_path = dir.path().join("repo");
    Repo::init(&repo_path, &InitOptions::default())?;
    let again = Repo::init(&repo_path, &InitOptions::default());
    assert!(
        again
            .as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("already a stackvault repository")),
        "{again:?}"
    );
    // A config from a newer format version.
    let config = repo_path.join("config");
    let mut bytes = std::fs::read(&config)?;
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    let crc = crc32(&bytes[..92]);
    bytes[92..96].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&config, &bytes)?;
    assert!(matches!(
        Repo::open(&repo_path),
        Err(Error::UnsupportedVersion { found: 9, .. })
    ));
    Ok(())
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), enough for a test fixture and independent of the engine's crate.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn snapshot_resolution_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    assert!(matches!(
        repo.resolve_snapshot("latest", None),
        Err(Error::SnapshotNotFound { .. })
    ));
    let disk = dir.path().join("d.img");
    Disk::filled(2 << 20, 50, 6).write(&disk)?;
    let mut ids = Vec::new();
    for i in 0..20 {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[i as u8 + 1], 0))?;
        ids.push(backup_file(&repo, &disk, "d")?.snapshot_id);
    }
    assert!(matches!(
        repo.resolve_snapshot("zzzz", None),
        Err(Error::Usage(_))
    ));
    assert!(matches!(
        repo.resolve_snapshot("ffffffff00000000", None),
        Err(Error::SnapshotNotFound { .. })
    ));
    // 20 ids over 16 possible first digits: two share one, and that prefix is ambiguous.
    let shared = ids
        .iter()
        .map(|id| &id[..1])
        .find(|p| ids.iter().filter(|id| id.starts_with(*p)).count() > 1)
        .unwrap_or("0");
    assert!(matches!(
        repo.resolve_snapshot(shared, None),
        Err(Error::AmbiguousSnapshot { .. })
    ));
    let unique = &ids[0][..8];
    assert_eq!(repo.resolve_snapshot(unique, None)?.id, ids[0]);
    assert_eq!(repo.resolve_snapshot("latest", Some("d"))?.id, ids[19]);
    assert!(matches!(
        repo.resolve_snapshot("latest", Some("other")),
        Err(Error::SnapshotNotFound { .. })
    ));
    Ok(())
}

#[test]
fn restore_refuses_existing_output_without_force() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let disk = dir.path().join("d.img");
    Disk::filled(3 << 20, 50, 7).write(&disk)?;
    let r = backup_file(&repo, &disk, "d")?;
    let snap = repo.resolve_snapshot(&r.snapshot_id, None)?;
    let out = dir.path().join("exists.img");
    std::fs::write(&out, b"precious")?;
    let err = restore_to_file(&repo, &snap, &out, &RestoreOptions::default(), &NoProgress);
    assert!(matches!(err, Err(Error::OutputExists { .. })), "{err:?}");
    assert_eq!(std::fs::read(&out)?, b"precious");
    restore_to_file(
        &repo,
        &snap,
        &out,
        &RestoreOptions {
            force: true,
            ..RestoreOptions::default()
        },
        &NoProgress,
    )?;
    assert!(same_bytes(&disk, &out)?);
    Ok(())
}

#[test]
fn disk_full_while_writing_a_pack_leaves_repository_usable() -> Result<()> {
    use stackvault::store::{testing::DiskFullAfter, LocalDir};
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("repo");
    Repo::init(&path, &InitOptions::default())?;
    // Incompressible data: about three 16 MiB packs.
    let disk = dir.path().join("d.img");
    let mut data = vec![0u8; 44 << 20];
    blake3::Hasher::new()
        .update(b"disk full")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&disk, &data)?;
    {
        // Room for about one pack: the second pack write fails with ENOSPC.
        let full = Arc::new(DiskFullAfter::new(LocalDir::new(&path), 20 << 20));
        let repo = Repo::open_with_backend(&path, full)?;
        let err = backup_file(&repo, &disk, "d").err();
        let err = err.and_then(|e| e.downcast::<Error>().ok());
        assert!(err.as_ref().is_some_and(Error::is_disk_full), "{err:?}");
        assert!(
            repo.snapshots(None)?.is_empty(),
            "no snapshot after a failed backup"
        );
    }
    let repo = Repo::open(&path)?;
    let r = backup_file(&repo, &disk, "d")?;
    assert_restores(&repo, &r.snapshot_id, &disk, &dir.path().join("out"))
}

#[test]
fn sparse_64_gib_disk_reads_only_its_data() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir()?;
    let repo = init(dir.path())?;
    let disk = dir.path().join("sparse.img");
    let f = std::fs::File::create(&disk)?;
    f.set_len(64 << 30)?;
    let data = stackvault_tests::machine_bytes(4 << 20, 9);
    for gib in [0u64, 17, 63] {
        f.write_all_at(&data, gib << 30)?;
    }
    drop(f);
    let r = backup_file(&repo, &disk, "big")?;
    assert_eq!(r.virtual_size, 64 << 30);
    // Holes are found with SEEK_DATA/SEEK_HOLE and never read or hashed (file systems that
    // cannot report holes would read zeros; tmpfs and ext4 both can).
    assert!(
        r.stats.bytes_read <= 3 * (4 << 20) + (3 << 20),
        "read {} bytes of a 64 GiB disk holding 12 MiB",
        r.stats.bytes_read
    );
    assert!(r.stats.unallocated_bytes >= (64 << 30) - (16 << 20));
    let manifest = repo.load_manifest(&r.snapshot_id)?;
    assert_eq!(manifest.segment_count(), 16384);
    Ok(())
}
