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
    let f = Fixture::new()?;
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
