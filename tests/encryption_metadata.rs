//! Sealed metadata in an encrypted repository, through the engine API (`init --encryption`
//! arrives with the key objects; until then the keys are set with `set_protection_for_tests`):
//! manifests, index deltas, verification records and VM snapshot records are sealed, contain
//! nothing readable, fail authentication when damaged, swapped or replayed, and are read back
//! by restore, check, verify, vm-snapshots and an index rebuild.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stackvault::crypto::{MasterSecret, Protection, RepoKeys};
use stackvault::format::manifest::Extent;
use stackvault::index::Index;
use stackvault::verify::{DamageKind, VerifyOptions};
use stackvault::{backup, BackupOptions, CheckOptions, Error, InitOptions, NoProgress, Repo};
use stackvault_tests::{machine_bytes, same_bytes, MemDisk};

/// A string the disk holds many times: it must appear in no stored object.
const MARKER: &[u8] = b"PAYROLL-LEDGER-2026-CONFIDENTIAL";
/// The disk's name: stored only inside sealed manifests.
const DISK: &str = "payroll-db01";

fn keys(byte: u8) -> Protection {
    Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [byte; 32],
    ))))
}

/// A repository in `dir`, encrypted with `keys(1)`.
fn encrypted_repo(dir: &Path) -> Result<Repo> {
    let mut repo = Repo::init(&dir.join("repo"), &InitOptions::default())?;
    repo.set_protection_for_tests(keys(1));
    Ok(repo)
}

/// 6 MiB of real machine data with the marker planted every 64 KiB; `seed` varies it.
fn disk(seed: u64) -> MemDisk {
    let mut bytes = machine_bytes(6 << 20, seed);
    for at in (0..bytes.len() - MARKER.len()).step_by(64 << 10) {
        bytes[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    MemDisk { bytes }
}

fn backup_disk(repo: &Repo, source: &MemDisk, disk: &str) -> Result<String> {
    let report = backup(
        repo,
        source,
        &BackupOptions {
            disk: disk.into(),
            ..BackupOptions::default()
        },
        &NoProgress,
    )?;
    Ok(report.snapshot_id.into())
}

/// Every file under `dir/repo/<sub>`.
fn files_under(repo: &Repo, sub: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![repo.root().join(sub)];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn flip(path: &Path, at: u64) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    let i = usize::try_from(at)?;
    bytes[i] ^= 0x20;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// The chunk ids snapshot `id` references.
fn chunk_ids(repo: &Repo, id: &str) -> Result<Vec<[u8; 32]>> {
    let manifest = repo.load_manifest(id)?;
    let mut ids = Vec::new();
    for segment in manifest.segments() {
        for e in segment? {
            if let Extent::Chunk { id, .. } = e {
                ids.push(id.0);
            }
        }
    }
    Ok(ids)
}

fn verify(repo: &Repo, id: &str) -> Result<()> {
    let snap = repo.resolve_snapshot(id, None)?;
    let report = stackvault::verify_snapshot(repo, &snap, &VerifyOptions::default(), &NoProgress)?;
    anyhow::ensure!(report.ok, "verify of {id} found damage: {report:?}");
    Ok(())
}

#[test]
fn sealed_metadata_reveals_no_plaintext_and_reads_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = encrypted_repo(dir.path())?;
    let source = disk(1);
    let id = backup_disk(&repo, &source, DISK)?;
    verify(&repo, &id)?;
    // Restore reads the sealed manifest.
    let (image, out) = (dir.path().join("disk.img"), dir.path().join("out.img"));
    std::fs::write(&image, &source.bytes)?;
    assert!(stackvault_tests::restores_to(&repo, &id, &image, &out)?);
    assert!(same_bytes(&image, &out)?);

    let ids = chunk_ids(&repo, &id)?;
    assert!(ids.len() > 10, "{} chunks", ids.len());
    let manifests = files_under(&repo, "snapshots")?;
    let deltas = files_under(&repo, "index")?;
    let records = files_under(&repo, "verifications")?;
    assert_eq!(manifests.len(), 1);
    assert!(!deltas.is_empty());
    assert_eq!(records.len(), 1);
    for path in manifests.iter().chain(&deltas).chain(&records) {
        let bytes = std::fs::read(path)?;
        let what = path.display();
        assert!(!contains(&bytes, DISK.as_bytes()), "disk name in {what}");
        assert!(!contains(&bytes, MARKER), "disk contents in {what}");
        assert!(!contains(&bytes, b"SVSNAP"), "manifest magic in {what}");
        assert!(!contains(&bytes, b"SVDELTA"), "delta magic in {what}");
        assert!(!contains(&bytes, b"hostname"), "JSON in {what}");
        for chunk in &ids {
            assert!(!contains(&bytes, &chunk[..16]), "a chunk id in {what}");
        }
    }
    // The snapshot id is keyed: not the BLAKE3 of any stored bytes or of the plaintext.
    let stored = std::fs::read(&manifests[0])?;
    assert_ne!(blake3::hash(&stored).to_hex().as_str(), id);
    // Check reads every sealed object and finds nothing wrong.
    let report = stackvault::check(&repo, &CheckOptions::default(), &NoProgress)?;
    assert!(report.ok, "{:?}", report.damage);
    assert_eq!(report.snapshots, 1);
    Ok(())
}

#[test]
fn a_flipped_byte_in_any_metadata_object_is_damage_naming_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = encrypted_repo(dir.path())?;
    let id = backup_disk(&repo, &disk(2), DISK)?;
    verify(&repo, &id)?;
    let root = repo.root().to_path_buf();
    let manifest = root.join("snapshots").join(&id);
    let delta = files_under(&repo, "index")?
        .into_iter()
        .next()
        .context("no delta")?;
    let record = files_under(&repo, "verifications")?
        .into_iter()
        .next()
        .context("no verification record")?;
    let relative =
        |p: &Path| -> Result<String> { Ok(p.strip_prefix(&root)?.to_string_lossy().into_owned()) };

    // The manifest: a byte of its first sealed block (the unit tests name later blocks).
    flip(&manifest, 100)?;
    match repo.load_manifest(&id) {
        Err(Error::Corrupt {
            location, offset, ..
        }) => {
            assert_eq!(location, format!("snapshots/{id}"));
            assert_eq!(offset, 0, "the damaged block's offset");
        }
        other => anyhow::bail!("expected Corrupt, got {other:?}"),
    }
    let snap = repo.resolve_snapshot(&id, None)?;
    let restored = stackvault::restore_to_file(
        &repo,
        &snap,
        &dir.path().join("out.img"),
        &Default::default(),
        &NoProgress,
    );
    assert!(
        matches!(&restored, Err(e) if e.class().exit_code() == 3),
        "{restored:?}"
    );
    let verified =
        stackvault::verify_snapshot(&repo, &snap, &VerifyOptions { record: false }, &NoProgress);
    assert!(
        matches!(&verified, Err(Error::Corrupt { .. })) || verified.as_ref().is_ok_and(|r| !r.ok),
        "{verified:?}"
    );

    // A delta and a verification record: check names each.
    flip(&delta, 30)?;
    flip(&record, 50)?;
    let report = stackvault::check(&repo, &CheckOptions::default(), &NoProgress)?;
    assert!(!report.ok);
    let found = |kind: DamageKind, location: &str| {
        report
            .damage
            .iter()
            .any(|d| d.kind == kind && d.location == location && d.offset.is_some())
    };
    assert!(
        found(DamageKind::Manifest, &format!("snapshots/{id}")),
        "{:?}",
        report.damage
    );
    assert!(
        found(DamageKind::IndexDelta, &relative(&delta)?),
        "{:?}",
        report.damage
    );
    assert!(
        found(DamageKind::VerificationRecord, &relative(&record)?),
        "{:?}",
        report.damage
    );
    let verdict = report.verdict().err().context("a verdict")?;
    assert_eq!(verdict.class().exit_code(), 3);
    Ok(())
}

#[test]
fn swapped_manifests_and_a_delta_under_another_name_fail_authentication() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = encrypted_repo(dir.path())?;
    let a = backup_disk(&repo, &disk(3), "a")?;
    let b = backup_disk(&repo, &disk(4), "b")?;
    let (pa, pb) = (
        repo.root().join("snapshots").join(&a),
        repo.root().join("snapshots").join(&b),
    );
    let (ba, bb) = (std::fs::read(&pa)?, std::fs::read(&pb)?);
    std::fs::write(&pa, &bb)?;
    std::fs::write(&pb, &ba)?;
    for id in [&a, &b] {
        let err = repo.load_manifest(id).err();
        assert!(
            matches!(&err, Some(Error::Corrupt { what, .. }) if what.contains("authentication")),
            "{err:?}"
        );
    }
    std::fs::write(&pa, &ba)?;
    std::fs::write(&pb, &bb)?;
    assert_eq!(repo.load_manifest(&a)?.meta.disk, "a");

    // One pack's delta stored as another pack's.
    let deltas = files_under(&repo, "index")?;
    anyhow::ensure!(deltas.len() >= 2, "two backups, two packs at least");
    std::fs::write(&deltas[1], std::fs::read(&deltas[0])?)?;
    let report = stackvault::check(&repo, &CheckOptions::default(), &NoProgress)?;
    let damaged: Vec<_> = report
        .damage
        .iter()
        .filter(|d| d.kind == DamageKind::IndexDelta)
        .collect();
    assert_eq!(damaged.len(), 1, "{:?}", report.damage);
    assert!(damaged[0].what.contains("authentication failed"));
    Ok(())
}

#[test]
fn vm_snapshot_records_are_sealed_and_keyed() -> Result<()> {
    use stackvault::vm::{backup_vm, vm_snapshots, VmBackupOptions, VmDiskSource};
    let dir = tempfile::tempdir()?;
    let repo = encrypted_repo(dir.path())?;
    let (os, data) = (disk(5), disk(6));
    let report = backup_vm(
        &repo,
        vec![
            VmDiskSource {
                name: "os".into(),
                source: &os,
                changes: None,
            },
            VmDiskSource {
                name: "data".into(),
                source: &data,
                changes: None,
            },
        ],
        &VmBackupOptions {
            vm: "payroll".into(),
            mode: Default::default(),
            blob_snapshots_taken_together: false,
        },
        &NoProgress,
    )?;
    let id = report.vm_snapshot_id;
    let listed = vm_snapshots(&repo, Some("payroll"))?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].complete);
    let path = repo.root().join("vms").join(id.as_str());
    let stored = std::fs::read(&path)?;
    assert!(!contains(&stored, b"payroll"));
    assert_ne!(blake3::hash(&stored).to_hex().as_str(), id);
    for disk in &report.disks {
        assert!(!contains(&stored, disk.snapshot_id.as_bytes()));
    }
    flip(&path, 10)?;
    let err = vm_snapshots(&repo, None).err();
    assert!(
        matches!(&err, Some(Error::Corrupt { location, .. }) if location == &format!("vms/{id}")),
        "{err:?}"
    );
    let check = stackvault::check(&repo, &CheckOptions::default(), &NoProgress)?;
    assert!(
        check
            .damage
            .iter()
            .any(|d| d.kind == DamageKind::VmRecord && d.location == format!("vms/{id}")),
        "{:?}",
        check.damage
    );
    Ok(())
}

#[test]
fn an_index_rebuilt_from_an_encrypted_repository_is_complete_and_honest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = encrypted_repo(dir.path())?;
    let a = backup_disk(&repo, &disk(7), "a")?;
    let b = backup_disk(&repo, &disk(8), "b")?;
    verify(&repo, &a)?;
    let (live_packs, live_chunks) = repo.index().counts()?;

    let rebuilt = |protection: &Protection, name: &str| -> Result<_> {
        let mut index = Index::open(&dir.path().join(name))?;
        let report = stackvault::index::rebuild(&mut index, repo.backend(), protection)?;
        Ok((index, report))
    };
    let (index, report) = rebuilt(repo.protection(), "rebuilt.sqlite")?;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.snapshots, report.verifications), (2, 1));
    assert_eq!(index.counts()?, (live_packs, live_chunks));
    let mut ids: Vec<String> = index
        .snapshots(None)?
        .into_iter()
        .map(|s| s.id.into())
        .collect();
    ids.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(index.snapshots(Some("a"))?.len(), 1);

    // Without the keys nothing sealed is taken for a snapshot or a pack: each manifest and
    // verification record, and each sealed pack, is listed as damage.
    let (index, report) = rebuilt(&Protection::Plain, "plain.sqlite")?;
    assert_eq!(report.snapshots, 0);
    assert_eq!(
        report.problems.len() as u64,
        3 + live_packs,
        "{:?}",
        report.problems
    );
    assert!(index.snapshots(None)?.is_empty());

    // A damaged manifest is left out and reported; the other snapshot is still listed.
    flip(&repo.root().join("snapshots").join(&b), 5)?;
    let (index, report) = rebuilt(repo.protection(), "damaged.sqlite")?;
    assert_eq!(report.snapshots, 1);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains(&b), "{:?}", report.problems);
    let listed: Vec<String> = index
        .snapshots(None)?
        .into_iter()
        .map(|s| s.id.into())
        .collect();
    assert_eq!(listed, vec![a]);
    Ok(())
}

#[test]
fn another_host_learns_sealed_snapshots_and_deltas_on_refresh() -> Result<()> {
    use stackvault::store::{Backend, MemoryBackend};
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
    let cache = |host: &str| dir.path().join(host);
    let mut first = Repo::init_on(
        store.clone(),
        &cache("host-a"),
        "memory://shared",
        &InitOptions::default(),
    )?;
    first.set_protection_for_tests(keys(1));
    let mut second = Repo::open_on(store.clone(), &cache("host-b"), "memory://shared")?;
    second.set_protection_for_tests(keys(1));
    let id = backup_disk(&first, &disk(9), DISK)?;
    second.refresh()?;
    let listed = second.snapshots(Some(DISK))?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    let (image, out) = (dir.path().join("disk.img"), dir.path().join("out.img"));
    std::fs::write(&image, &disk(9).bytes)?;
    assert!(stackvault_tests::restores_to(&second, &id, &image, &out)?);
    // The second host's cache index holds the packs from the sealed deltas.
    assert_eq!(second.index().counts()?, first.index().counts()?);
    Ok(())
}
