//! Repositories written by earlier versions keep working: a snapshot whose manifest is in
//! format 1 (metadata before the extents, as written before manifests were streamed) is
//! listed, verified, restored, compared, and serves as the parent of a new backup.

use std::fs;

use anyhow::{ensure, Context as _};
use stackvault_tests::{make_disk, p, scribble_disk, sv_json, sv_ok, Fixture};

const MIB: u64 = 1 << 20;

/// Rewrites a format 2 manifest as format 1, from the layouts in `format-spec/README.md`.
fn to_format_1(v2: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(
        v2.len() >= 56 && v2[8..12] == 2u32.to_le_bytes(),
        "not a format 2 manifest"
    );
    let trailer = &v2[v2.len() - 16..];
    ensure!(&trailer[8..] == b"SVSNAPND", "no format 2 trailer");
    let meta_len = u32::from_le_bytes(trailer[..4].try_into()?) as usize;
    let meta_at = v2.len() - 16 - meta_len;
    let mut v1 = v2[..40].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1[12..16].copy_from_slice(&(meta_len as u32).to_le_bytes());
    v1.extend_from_slice(&v2[meta_at..meta_at + meta_len]);
    v1.extend_from_slice(&v2[40..meta_at]);
    Ok(v1)
}

#[test]
fn format_1_snapshots_restore_and_parent_new_backups() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let disk = f.path("vm.img");
    make_disk(&disk, 12 * MIB, 3)?;
    let v2_id = f.backup(&disk, "vm")?;

    // Replace the snapshot by the same map in format 1, and drop the index: it is rebuilt
    // from the objects on the next open.
    let snapshots = repo.join("snapshots");
    let v1 = to_format_1(&fs::read(snapshots.join(&v2_id))?)?;
    let v1_id = blake3::hash(&v1).to_hex().to_string();
    fs::write(snapshots.join(&v1_id), &v1)?;
    fs::remove_file(snapshots.join(&v2_id))?;
    for name in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = fs::remove_file(repo.join(name));
    }

    let (_, list, _) = sv_json(&["snapshots", p(&repo)])?;
    let listed: Vec<&str> = list["snapshots"]
        .as_array()
        .context("snapshot list")?
        .iter()
        .filter_map(|s| s["snapshot_id"].as_str())
        .collect();
    assert_eq!(listed, vec![v1_id.as_str()]);
    let (code, v, stderr) = sv_json(&["verify", p(&repo), &v1_id, "--no-record"])?;
    assert_eq!(code, Some(0), "{stderr} {v}");
    f.assert_restores(&v1_id, &disk)?;

    // An incremental backup from the format 1 parent, written in format 2.
    scribble_disk(&disk, 6, 2)?;
    let next = f.backup(&disk, "vm")?;
    let (_, shown, _) = sv_json(&["show", p(&repo), &next])?;
    assert_eq!(shown["parent"].as_str(), Some(v1_id.as_str()), "{shown}");
    assert_eq!(fs::read(snapshots.join(&next))?[8..12], 2u32.to_le_bytes());
    f.assert_restores(&next, &disk)?;
    let (code, diff, _) = sv_json(&["diff", p(&repo), &v1_id, &next])?;
    assert_eq!(code, Some(0));
    assert!(
        diff["changed_bytes"].as_u64().unwrap_or(0) >= 6 * 65536,
        "{diff}"
    );
    let (code, check, stderr) = sv_json(&["check", p(&repo), "--read-data"])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(check["ok"], true, "{check}");
    sv_ok(&["stats", p(&repo)])?;
    Ok(())
}

/// Repositories written by each shipped format, committed under `tests/fixtures/` (see its
/// README): current code must read, verify and extend them. Each test works on a copy.
mod fixtures {
    use std::fs;
    use std::path::{Path, PathBuf};

    use anyhow::{ensure, Context as _};
    use stackvault::format::config::RepoConfig;
    use stackvault_tests::{outcome, p, same_bytes, sv, sv_as_typed, sv_json, sv_ok};

    const MIB: usize = 1 << 20;

    /// The fixtures: directory name, config version, manifest versions of its snapshots.
    const FIXTURES: &[(&str, u32, &[u32])] = &[
        // Written by a real release of that time (commit ccc03ae, the last before pack format
        // 2), not converted: config 1 with the fastcdc2020 chunker, pack 1 (one zstd frame per
        // chunk), manifest 1; a full and an incremental. `generate` cannot make it.
        ("config1-pack1-manifest1", 1, &[1, 1]),
        // Written by a real release of commit 39c680a (the last before manifest format 2):
        // config 1 with the aligned chunker, pack 2, manifest 1. `generate` cannot make it.
        ("config1-pack2-manifest1", 1, &[1]),
        // The current formats: config 2, pack 2, manifest 2; a full and an incremental.
        ("config2-pack2-manifest2", 2, &[2, 2]),
    ];

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// Generation `gen` of the fixtures' 3 MiB disk: compressible text with a zero run;
    /// each generation rewrites a few 64 KiB ranges. Deterministic, so the disks are not
    /// committed, only the repositories.
    pub fn fixture_disk(gen: usize) -> Vec<u8> {
        let mut disk = Vec::with_capacity(3 * MIB);
        let mut line = 0usize;
        while disk.len() < 3 * MIB {
            disk.extend_from_slice(format!("stackvault compat fixture line {line}\n").as_bytes());
            line += 1;
        }
        disk.truncate(3 * MIB);
        disk[MIB..MIB + 256 * 1024].fill(0);
        for g in 1..=gen {
            for k in 0..4 {
                let at = (g * 5 + k * 11) % 46 * 65536;
                let text = format!("generation {g} range {k} ");
                for (i, b) in disk[at..at + 65536].iter_mut().enumerate() {
                    *b = text.as_bytes()[i % text.len()];
                }
            }
        }
        disk
    }

    /// Copies a fixture into a fresh temporary directory (fixtures are never written).
    fn copy_fixture(name: &str, into: &Path) -> anyhow::Result<PathBuf> {
        let repo = into.join(name);
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            fs::create_dir_all(repo.join(&rel))?;
            for entry in fs::read_dir(fixtures_dir().join(name).join(&rel))? {
                let entry = entry?;
                let rel = rel.join(entry.file_name());
                if entry.file_type()?.is_dir() {
                    stack.push(rel);
                } else {
                    fs::copy(entry.path(), repo.join(&rel))?;
                }
            }
        }
        Ok(repo)
    }

    fn assert_restores(repo: &Path, id: &str, disk: &Path, scratch: &Path) -> anyhow::Result<()> {
        let out = scratch.join("restored.img");
        sv_ok(&["restore", p(repo), id, p(&out), "--force"])?;
        ensure!(same_bytes(&out, disk)?, "{id} restores wrong bytes");
        fs::remove_file(out)?;
        Ok(())
    }

    #[test]
    fn fixture_repositories_read_verify_and_extend() -> anyhow::Result<()> {
        for (name, config_version, manifests) in FIXTURES {
            let tmp = tempfile::tempdir()?;
            let repo = copy_fixture(name, tmp.path()).with_context(|| format!("fixture {name}"))?;
            let config = RepoConfig::decode(&fs::read(repo.join("config"))?, name)?;
            ensure!(config.version == *config_version, "{name}: {config:?}");
            let ids = stackvault_tests::snapshot_ids(&repo)?;
            ensure!(ids.len() == manifests.len(), "{name}: {ids:?}");
            let (code, v, stderr) = sv_json(&["check", p(&repo), "--read-data"])?;
            ensure!(code == Some(0) && v["ok"] == true, "{name}: {stderr} {v:#}");
            // Every pack is in the format the fixture's name says.
            let pack_version: u32 = if name.contains("-pack1-") { 1 } else { 2 };
            let store = stackvault::store::LocalDir::new(&repo);
            for key in stackvault::store::Backend::list(&store, "packs/")? {
                let bytes = fs::read(repo.join(&key))?;
                ensure!(
                    bytes.get(8..12) == Some(&pack_version.to_le_bytes()[..]),
                    "{name}: {key} is not in pack format {pack_version}"
                );
            }
            for (gen, id) in ids.iter().enumerate() {
                let bytes = fs::read(repo.join("snapshots").join(id))?;
                ensure!(
                    bytes.get(8..12) == Some(&manifests[gen].to_le_bytes()[..]),
                    "{name}: {id} is not in manifest format {}",
                    manifests[gen]
                );
                sv_ok(&["verify", p(&repo), id, "--no-record"])
                    .with_context(|| format!("{name}: verify {id}"))?;
                let disk = tmp.path().join(format!("gen{gen}.img"));
                fs::write(&disk, fixture_disk(gen))?;
                assert_restores(&repo, id, &disk, tmp.path()).context(name.to_string())?;
            }
            // Extend it: an incremental backup of the next generation, parent the last one.
            let next = tmp.path().join("next.img");
            fs::write(&next, fixture_disk(ids.len()))?;
            let (code, v, stderr) = sv_json(&["backup", p(&repo), p(&next), "--disk", "fixture"])?;
            ensure!(code == Some(0), "{name}: backup: {stderr}");
            ensure!(
                v["parent"].as_str() == ids.last().map(String::as_str),
                "{name}: {v}"
            );
            let id = v["snapshot_id"].as_str().context("snapshot id")?;
            assert_restores(&repo, id, &next, tmp.path()).context(name.to_string())?;
            let (code, v, stderr) = sv_json(&["check", p(&repo), "--read-data"])?;
            ensure!(code == Some(0) && v["ok"] == true, "{name}: {stderr} {v:#}");
            // The config is never rewritten.
            let after = RepoConfig::decode(&fs::read(repo.join("config"))?, name)?;
            ensure!(after == config, "{name}: the config changed");
        }
        Ok(())
    }

    #[test]
    fn unknown_incompatible_feature_is_refused_at_open() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = copy_fixture("config2-pack2-manifest2", tmp.path())?;
        let ids = stackvault_tests::snapshot_ids(&repo)?;
        let mut config = RepoConfig::decode(&fs::read(repo.join("config"))?, "config")?;
        config.features.incompat |= 1 << 9;
        config.features.min_reader = [0, 9, 2];
        fs::write(repo.join("config"), config.encode())?;
        let out = tmp.path().join("out.img");
        for args in [
            vec!["snapshots", p(&repo)],
            vec!["restore", p(&repo), &ids[0], p(&out)],
        ] {
            let (code, _, stderr) = outcome(&sv_as_typed(&args, &[])?);
            ensure!(code == Some(6), "{args:?}: exit {code:?}: {stderr}");
            ensure!(
                stderr.contains("needs stackvault >= 0.9.2 (features: incompat-bit-9)"),
                "{args:?}: {stderr}"
            );
        }
        ensure!(!out.exists(), "a restore started");
        Ok(())
    }

    #[test]
    fn index_rebuild_names_what_it_cannot_read() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = copy_fixture("config2-pack2-manifest2", tmp.path())?;
        let pack = stackvault::store::LocalDir::new(&repo);
        let packs = stackvault::store::Backend::list(&pack, "packs/")?;
        let victim = packs.first().context("no pack")?;
        // A damaged footer: the pack cannot be indexed.
        let path = repo.join(victim);
        let mut bytes = fs::read(&path)?;
        if let Some(last) = bytes.last_mut() {
            *last ^= 0xff;
        }
        fs::write(&path, bytes)?;
        let out = sv(&["index", "rebuild", p(&repo)])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(3),
            "{:?}: {stdout} {stderr}",
            out.status
        );
        let name = victim.rsplit('/').next().unwrap_or_default();
        ensure!(stdout.contains(name), "the pack is not named: {stdout}");
        ensure!(stderr.contains("could not be indexed"), "{stderr}");
        Ok(())
    }

    /// Writes the fixtures from scratch with this build, converting to the older formats
    /// as `format-spec/README.md` describes them. Run only to add a fixture:
    /// `cargo test --test main compat::fixtures::generate -- --ignored`, then commit.
    #[test]
    #[ignore = "writes tests/fixtures; run by hand to add a fixture"]
    fn generate() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        for (name, config_version, manifests) in FIXTURES {
            if *config_version == 1 {
                continue; // written by old releases (see FIXTURES and tests/fixtures/README.md)
            }
            let repo = fixtures_dir().join(name);
            let _ = fs::remove_dir_all(&repo);
            sv_ok(&["init", p(&repo), "--encryption", "none"])?;
            for gen in 0..manifests.len() {
                let disk = tmp.path().join("disk.img");
                fs::write(&disk, fixture_disk(gen))?;
                let (code, _, stderr) =
                    sv_json(&["backup", p(&repo), p(&disk), "--disk", "fixture"])?;
                ensure!(code == Some(0), "{stderr}");
            }
            // Derived state is not part of a fixture: the index is rebuilt on open.
            for entry in fs::read_dir(&repo)? {
                let entry = entry?;
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("index.sqlite")
                {
                    fs::remove_file(entry.path())?;
                }
            }
            let _ = fs::remove_dir_all(repo.join("locks"));
        }
        Ok(())
    }
}
