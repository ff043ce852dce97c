//! Encryption at rest, the data path (issue 15): in an encrypted repository chunk ids and cut
//! points are keyed, pack frames and tables are sealed, every read authenticates, and a
//! damaged sealed byte is repository damage naming the pack and offset. Repositories are made
//! encrypted through `Repo::set_protection_for_tests` (the key objects and `init` with a
//! password come with the key work); everything else is the real engine on real files.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _};
use stackvault::crypto::{MasterSecret, Protection, RepoKeys};
use stackvault::format::manifest::Extent;
use stackvault::read::{ReaderOptions, SnapshotReader};
use stackvault::verify::{CheckOptions, ReadData, VerifyOptions};
use stackvault::{
    BackupOptions, ChunkId, CopyOptions, Error, ErrorClass, InitOptions, NoProgress, Repo,
    RestoreOptions, SourceOptions,
};
use stackvault_tests::{make_disk, scribble_disk, Disk, Fixture};

const DISK_SIZE: u64 = 8 << 20;

fn keys(seed: u8) -> Protection {
    Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [seed; 32],
    ))))
}

/// A new repository at `path`, encrypted with the key of `seed` (plain when `None`).
fn repo(path: &Path, seed: Option<u8>) -> anyhow::Result<Repo> {
    // The fixture's repository exists already; others are made here.
    let mut repo = if path.join("config").exists() {
        Repo::open(path)?
    } else {
        Repo::init(path, &InitOptions::default())?
    };
    if let Some(seed) = seed {
        repo.set_protection_for_tests(keys(seed));
    }
    Ok(repo)
}

fn backup(repo: &Repo, disk: &Path) -> anyhow::Result<String> {
    let source = stackvault::open_source(disk, &SourceOptions::default())?;
    let report = stackvault::backup(
        repo,
        source.as_ref(),
        &BackupOptions {
            disk: "d".into(),
            ..Default::default()
        },
        &NoProgress,
    )?;
    Ok(report.snapshot_id.into())
}

fn restore(repo: &Repo, id: &str, out: &Path) -> stackvault::Result<()> {
    stackvault::restore_to_file(
        repo,
        &repo.resolve_snapshot(id, None)?,
        out,
        &RestoreOptions {
            force: true,
            ..Default::default()
        },
        &NoProgress,
    )
    .map(drop)
}

/// The chunks of a snapshot: (disk offset, length, id), in disk order.
fn chunks_of(repo: &Repo, id: &str) -> anyhow::Result<Vec<(u64, u32, ChunkId)>> {
    let manifest = repo.load_manifest(id)?;
    let mut out = Vec::new();
    let mut at = 0u64;
    for i in 0..manifest.segment_count() {
        for e in manifest.segment(i)?.iter() {
            if let Extent::Chunk { id, len } = *e {
                out.push((at, len, id));
            }
            at += u64::from(e.len());
        }
    }
    Ok(out)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

fn packs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    files(&root.join("packs"))
}

fn pack_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// A backed-up disk in an encrypted repository.
struct Encrypted {
    f: Fixture,
    disk: PathBuf,
    repo: Repo,
    id: String,
}

fn encrypted_backup(seed: u8) -> anyhow::Result<Encrypted> {
    let f = Fixture::new()?;
    let disk = f.path("d.img");
    // Files of /usr/bin (they compress, as a VM's disk does) in the first half, seeded random
    // bytes in the second: some 256 chunks whatever this machine's /usr/bin holds. Made of its
    // files alone, the disk had 45 chunks (135 needles) where they were all short.
    make_disk(&disk, DISK_SIZE / 2, 7)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(&disk)?;
    file.write_all(&Disk::random(DISK_SIZE / 2, 7).bytes()?)?;
    drop(file);
    let repo = repo(&f.repo(), Some(seed))?;
    let id = backup(&repo, &disk)?;
    Ok(Encrypted { f, disk, repo, id })
}

#[test]
fn an_encrypted_repository_backs_up_restores_reads_verifies_and_checks() -> anyhow::Result<()> {
    let e = encrypted_backup(1)?;
    let disk = std::fs::read(&e.disk)?;
    // Every pack is sealed (format 3).
    for pack in packs(&e.f.repo())? {
        let bytes = std::fs::read(&pack)?;
        ensure!(
            bytes.get(8..12) == Some(&3u32.to_le_bytes()[..]),
            "{pack:?}"
        );
    }
    let out = e.f.path("restored.img");
    restore(&e.repo, &e.id, &out)?;
    ensure!(std::fs::read(&out)? == disk, "restore differs");
    // An incremental backup, then a restore of it (dedup against keyed ids).
    scribble_disk(&e.disk, 20, 3)?;
    let second = backup(&e.repo, &e.disk)?;
    restore(&e.repo, &second, &out)?;
    ensure!(
        std::fs::read(&out)? == std::fs::read(&e.disk)?,
        "second restore differs"
    );
    // The random-access reader (behind `serve` and NBD).
    let reader = SnapshotReader::open(&e.repo, &e.id, ReaderOptions::default())?;
    let mut buf = vec![0u8; 300_000];
    reader.read_at(1_000_003, &mut buf)?;
    ensure!(buf[..] == disk[1_000_003..1_300_003], "reader differs");
    let summary = e.repo.resolve_snapshot(&e.id, None)?;
    let verified = stackvault::verify_snapshot(
        &e.repo,
        &summary,
        &VerifyOptions { record: false },
        &NoProgress,
    )?;
    ensure!(verified.problem_count == 0, "{verified:?}");
    let report = stackvault::check(
        &e.repo,
        &CheckOptions {
            read_data: ReadData::All,
            ..Default::default()
        },
        &NoProgress,
    )?;
    ensure!(report.ok && report.chunks_read > 0, "{:?}", report.damage);
    Ok(())
}

/// Needles for a scan: the plain BLAKE3 id and the repository's id of every chunk of
/// snapshot `id`, and 24 bytes taken from each chunk's plaintext.
fn needles(repo: &Repo, id: &str, disk: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for (at, len, cid) in chunks_of(repo, id)? {
        let bytes = &disk[at as usize..at as usize + len as usize];
        ensure!(repo.protection().chunk_id(bytes) == cid, "chunk at {at}");
        out.push(ChunkId::of(bytes).0[..24].to_vec());
        out.push(cid.0[..24].to_vec());
        out.push(bytes[100..124].to_vec());
    }
    Ok(out)
}

/// How many (file, needle) pairs of the files under `dirs` of `root` contain the needle.
fn scan(root: &Path, dirs: &[&str], needles: &[Vec<u8>]) -> anyhow::Result<usize> {
    let mut found = 0;
    for dir in dirs {
        for file in files(&root.join(dir))? {
            let bytes = std::fs::read(&file)?;
            let present: HashSet<&[u8]> = bytes.windows(24).collect();
            found += needles
                .iter()
                .filter(|n| present.contains(n.as_slice()))
                .count();
        }
    }
    Ok(found)
}

#[test]
fn packs_of_an_encrypted_repository_hold_no_plaintext_and_no_plain_ids() -> anyhow::Result<()> {
    let e = encrypted_backup(1)?;
    let disk = std::fs::read(&e.disk)?;
    let wanted = needles(&e.repo, &e.id, &disk)?;
    ensure!(wanted.len() > 150, "{} needles", wanted.len());
    // Packs and index deltas (manifests are sealed by the metadata work).
    let found = scan(&e.f.repo(), &["packs", "index"], &wanted)?;
    ensure!(
        found == 0,
        "{found} needles found in an encrypted repository"
    );
    // Control: the same disk in a plain repository shows its chunks' ids.
    let plain_root = e.f.path("plain");
    let plain = repo(&plain_root, None)?;
    let plain_id = backup(&plain, &e.disk)?;
    let control = needles(&plain, &plain_id, &disk)?;
    ensure!(
        scan(&plain_root, &["packs", "index"], &control)? > control.len() / 3,
        "the control found nothing: the scan is blind"
    );
    Ok(())
}

#[test]
fn two_keys_give_unrelated_ids_and_cut_points() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("d.img");
    // Seeded random bytes: nearly every cut is a content cut. Files of /usr/bin, each followed
    // by zeros, cut at both ends of each file whatever the key, and where the files are small
    // (a run of short scripts on another machine) those forced cuts were most of them.
    Disk::random(DISK_SIZE, 9).write(&disk)?;
    let mut runs = Vec::new();
    for (name, seed) in [("plain", None), ("a", Some(1)), ("b", Some(2))] {
        let r = repo(&f.path(name), seed)?;
        let id = backup(&r, &disk)?;
        runs.push(chunks_of(&r, &id)?);
    }
    let ids = |c: &[(u64, u32, ChunkId)]| c.iter().map(|x| x.2).collect::<HashSet<_>>();
    let cuts = |c: &[(u64, u32, ChunkId)]| {
        c.iter()
            .map(|x| x.0 + u64::from(x.1))
            .collect::<HashSet<_>>()
    };
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let (x, y) = (&runs[i], &runs[j]);
        ensure!(
            ids(x).intersection(&ids(y)).count() == 0,
            "runs {i} and {j} share chunk ids"
        );
        let shared = cuts(x).intersection(&cuts(y)).count();
        // Forced cuts (maximum size, holes, segment ends) are shared; content cuts are not.
        ensure!(
            shared * 2 < x.len().min(y.len()),
            "runs {i} and {j} share {shared} of {} cut points",
            x.len()
        );
    }
    // Keyed chunk sizes keep the configured distribution (4 KiB..64 KiB, average near 16).
    for run in &runs[1..] {
        ensure!(run.iter().all(|c| (4096..=65536).contains(&c.1)));
        let avg = run.iter().map(|c| u64::from(c.1)).sum::<u64>() / run.len() as u64;
        ensure!((10 << 10..=24 << 10).contains(&avg), "average chunk {avg}");
    }
    Ok(())
}

/// Offsets of the sealed frames of a pack, from the index (frame offsets are what readers
/// are pointed at).
fn frame_offsets(repo: &Repo, pack: &str) -> anyhow::Result<Vec<u64>> {
    let table = stackvault::store::pack::read_pack_table(repo.backend(), repo.protection(), pack)?;
    let mut offsets: Vec<u64> = table.entries.iter().map(|e| e.offset).collect();
    offsets.dedup();
    Ok(offsets)
}

fn flip(path: &Path, at: u64) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let b = bytes.get_mut(at as usize).context("offset past the pack")?;
    *b ^= 0x20;
    std::fs::write(path, bytes)?;
    Ok(())
}

fn corrupt_in(err: &Error, pack: &str) -> Option<u64> {
    match err {
        Error::Corrupt {
            location, offset, ..
        } if location.contains(pack) => Some(*offset),
        _ => None,
    }
}

#[test]
fn a_flipped_byte_in_a_sealed_frame_is_damage_at_its_pack_and_offset() -> anyhow::Result<()> {
    let e = encrypted_backup(1)?;
    let pack = packs(&e.f.repo())?.into_iter().next().context("a pack")?;
    let name = pack_name(&pack);
    let frames = frame_offsets(&e.repo, &name)?;
    ensure!(frames.len() >= 2, "{} frames", frames.len());
    // A byte in the middle of the second frame's ciphertext.
    let frame = frames[1];
    flip(
        &pack,
        frame + (frames.get(2).copied().unwrap_or(frame + 200) - frame) / 2,
    )?;
    let err = restore(&e.repo, &e.id, &e.f.path("r.img"))
        .err()
        .context("restore of a damaged pack succeeded")?;
    ensure!(corrupt_in(&err, &name) == Some(frame), "{err}");
    ensure!(
        err.class() == ErrorClass::RepositoryDamaged,
        "exit code: {err}"
    );
    let report = stackvault::check(
        &e.repo,
        &CheckOptions {
            read_data: ReadData::All,
            ..Default::default()
        },
        &NoProgress,
    )?;
    ensure!(!report.ok);
    ensure!(
        report
            .damage
            .iter()
            .any(|d| d.pack.as_deref() == Some(name.as_str()) && d.offset == Some(frame)),
        "{:?}",
        report.damage
    );
    let summary = e.repo.resolve_snapshot(&e.id, None)?;
    let verified = stackvault::verify_snapshot(
        &e.repo,
        &summary,
        &VerifyOptions { record: false },
        &NoProgress,
    );
    ensure!(
        verified.as_ref().map_or(true, |v| v.problem_count > 0),
        "verify passed a damaged frame"
    );
    Ok(())
}

#[test]
fn a_flipped_byte_in_a_sealed_table_is_found_by_check() -> anyhow::Result<()> {
    let e = encrypted_backup(1)?;
    let pack = packs(&e.f.repo())?.into_iter().next().context("a pack")?;
    let name = pack_name(&pack);
    let len = std::fs::metadata(&pack)?.len();
    // The footer's table offset (bytes 16..24 of the 32-byte footer).
    let bytes = std::fs::read(&pack)?;
    let footer = &bytes[bytes.len() - 32..];
    let table_at = u64::from_le_bytes(footer[16..24].try_into()?);
    ensure!(table_at < len - 32);
    flip(&pack, table_at + 40)?;
    let report = stackvault::check(&e.repo, &CheckOptions::default(), &NoProgress)?;
    ensure!(
        report
            .damage
            .iter()
            .any(|d| d.pack.as_deref() == Some(name.as_str())),
        "{:?}",
        report.damage
    );
    let err =
        stackvault::store::pack::read_pack_table(e.repo.backend(), e.repo.protection(), &name)
            .err()
            .context("a damaged table was read")?;
    ensure!(corrupt_in(&err, &name) == Some(table_at), "{err}");
    Ok(())
}

#[test]
fn frames_moved_between_packs_are_refused() -> anyhow::Result<()> {
    // Two packs of the same repository: a frame of one put at the same offset of the other
    // (same length, since both hold the same data) fails authentication there.
    let e = encrypted_backup(1)?;
    let other_root = e.f.path("second");
    let second = repo(&other_root, Some(1))?;
    backup(&second, &e.disk)?;
    let (a, b) = (
        packs(&e.f.repo())?.into_iter().next().context("pack a")?,
        packs(&other_root)?.into_iter().next().context("pack b")?,
    );
    let (name_a, name_b) = (pack_name(&a), pack_name(&b));
    let fa = frame_offsets(&e.repo, &name_a)?;
    let fb = frame_offsets(&second, &name_b)?;
    ensure!(
        fa[..2] == fb[..2],
        "packs laid out differently: {fa:?} {fb:?}"
    );
    let (bytes_a, bytes_b) = (std::fs::read(&a)?, std::fs::read(&b)?);
    let mut mixed = bytes_a.clone();
    let (s, t) = (fa[0] as usize, fa[1] as usize);
    mixed[s..t].copy_from_slice(&bytes_b[s..t]);
    ensure!(mixed != bytes_a, "the frames are identical");
    std::fs::write(&a, mixed)?;
    let err = restore(&e.repo, &e.id, &e.f.path("r.img"))
        .err()
        .context("restore with a foreign frame succeeded")?;
    ensure!(corrupt_in(&err, &name_a) == Some(fa[0]), "{err}");
    Ok(())
}

#[test]
fn copy_into_an_encrypted_repository_rechunks_with_its_keys() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let disk = f.path("d.img");
    make_disk(&disk, DISK_SIZE, 5)?;
    let src = repo(&f.path("src"), None)?;
    let id = backup(&src, &disk)?;
    let dst = repo(&f.path("dst"), Some(3))?;
    let report = stackvault::copy(&src, &dst, &CopyOptions::default(), &NoProgress)?;
    ensure!(
        report.rechunked && report.snapshots_copied == 1,
        "{report:?}"
    );
    let copied = dst.snapshots(None)?;
    let new_id = copied.first().context("copied snapshot")?.id.to_string();
    let (before, after) = (chunks_of(&src, &id)?, chunks_of(&dst, &new_id)?);
    let plain: HashSet<ChunkId> = before.iter().map(|c| c.2).collect();
    ensure!(
        after.iter().all(|c| !plain.contains(&c.2)),
        "plain ids reached the copy"
    );
    let bytes = std::fs::read(&disk)?;
    for &(at, len, cid) in &after {
        ensure!(
            dst.protection()
                .chunk_id(&bytes[at as usize..(at + u64::from(len)) as usize])
                == cid
        );
    }
    let out = f.path("r.img");
    restore(&dst, &new_id, &out)?;
    ensure!(std::fs::read(&out)? == bytes);
    // Between two encrypted repositories with different keys: re-chunked again.
    let third = repo(&f.path("third"), Some(4))?;
    let again = stackvault::copy(&dst, &third, &CopyOptions::default(), &NoProgress)?;
    ensure!(again.rechunked && again.snapshots_copied == 1, "{again:?}");
    // And a rerun sends nothing.
    let rerun = stackvault::copy(&src, &dst, &CopyOptions::default(), &NoProgress)?;
    ensure!(
        rerun.snapshots_copied == 0 && rerun.snapshots_skipped == 1,
        "{rerun:?}"
    );
    Ok(())
}
