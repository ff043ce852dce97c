//! A pack deleted behind a remote repository's back while its index delta stays (issue 14,
//! "a repository whose objects were deleted behind its back"): the index sync must learn
//! nothing from such a delta, on the host that wrote the pack and on a fresh one alike. The
//! snapshot that needs the pack fails `check` and `restore` as damage naming the pack (exit
//! 3), `check` lists the delta as an orphan, and a new full backup stores the lost data again
//! instead of deduplicating against the pack that is gone: its restore is byte-identical on
//! both hosts.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use stackvault_tests::{p, same_bytes, Disk};

use crate::remote_maintain::{moto, Remote};

const MIB: u64 = 1 << 20;

/// A remote repository with one snapshot of a random disk, one of whose packs was then
/// deleted by hand (not through the repository: its delta stays).
pub(crate) struct GonePack {
    pub(crate) disk: PathBuf,
    pub(crate) id: String,
    /// The name of the deleted pack.
    pub(crate) pack: String,
}

/// Initialises `r`, backs up a random 24 MiB disk (`seed`) written in `dir`, and deletes the
/// first pack by hand. Random data: two packs at least, and nothing in one pack is also in
/// another, so the snapshot's data in the deleted pack is nowhere else.
pub(crate) fn backed_up_then_a_pack_deleted(r: &Remote, dir: &Path, seed: u64) -> Result<GonePack> {
    let disk = dir.join("d.img");
    Disk::random(24 * MIB, seed).write(&disk)?;
    r.json(&["init"])?;
    let id = r.backup(&disk)?;
    let pack_key = r.keys("packs/")?.first().context("no pack")?.clone();
    let pack = pack_key.rsplit('/').next().unwrap_or(&pack_key).to_string();
    r.objects.remove(&pack_key)?;
    Ok(GonePack { disk, id, pack })
}

#[test]
fn a_delta_whose_pack_is_gone_teaches_nothing_and_a_new_backup_stores_the_data_again() -> Result<()>
{
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "gonepack")?;
    let dir = tempfile::tempdir()?;
    let gone = backed_up_then_a_pack_deleted(&r, dir.path(), 71)?;
    let (disk, first_id, pack) = (&gone.disk, gone.id.as_str(), &gone.pack);
    ensure!(
        r.keys("index/")?.iter().any(|k| k.ends_with(pack.as_str())),
        "the delta went with the pack"
    );

    // The host that wrote the pack (its cache knows it) and a fresh host (an empty cache).
    let fresh = tempfile::tempdir()?;
    let hosts = [("writer", r.cache.path()), ("fresh", fresh.path())];
    let on = |cache: &std::path::Path, args: &[&str]| -> Result<std::process::Output> {
        r.command(args)
            .env("XDG_CACHE_HOME", cache)
            .output()
            .context("run stackvault")
    };
    for (host, cache) in hosts {
        let out = on(cache, &["check", &r.location, "--json"])?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(3), "{host}: check: {doc:#} {err}");
        let named = doc["damage"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["kind"] == "pack-missing" && d["pack"] == pack.as_str())
        });
        ensure!(
            named,
            "{host}: check does not name the pack {pack}: {doc:#}"
        );
        let orphan = doc["orphan_deltas"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["pack"] == pack.as_str()));
        ensure!(
            orphan,
            "{host}: the delta is not listed as an orphan: {doc:#}"
        );

        let out_img = dir.path().join(format!("{host}-old.img"));
        let out = on(
            cache,
            &["restore", &r.location, first_id, p(&out_img), "--force"],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(3) && err.contains(pack.get(..16).unwrap_or(pack)),
            "{host}: restore of the damaged snapshot: {:?} {err}",
            out.status
        );
    }

    // A new full backup on the host whose cache knew the pack stores its data again.
    let second = r.json(&["backup", p(disk), "--disk", "d", "--full"])?;
    let second_id = second["snapshot_id"].as_str().context("no snapshot id")?;
    for (host, cache) in hosts {
        let out_img = dir.path().join(format!("{host}-new.img"));
        let out = on(
            cache,
            &["restore", &r.location, second_id, p(&out_img), "--force"],
        )?;
        ensure!(
            out.status.success(),
            "{host}: restore of the new snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            same_bytes(&out_img, disk)?,
            "{host}: the new snapshot restores differently"
        );
    }
    Ok(())
}
