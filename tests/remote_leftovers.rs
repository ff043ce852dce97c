//! Leftovers of a repository on an object store (issue 14, "a killed backup leaves only
//! unreferenced objects that … prune removes"): what the store holds uncommitted, here an S3
//! multipart upload a writer started and never completed, as a process killed mid-upload
//! leaves it. `check` lists it (and nothing of this host's cache directory, which is not the
//! repository); `prune --dry-run` counts it, and `prune` on the shared store aborts it once it
//! is older than the grace period plus the clock skew allowed (younger, it may belong to a
//! writer still running).

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault::store::Backend;
use stackvault_tests::{p, Disk};

use crate::remote_maintain::{moto, Remote};

const MIB: u64 = 1 << 20;

/// The leftovers `check --json` lists, as (kind, path).
pub(crate) fn leftovers(check: &Value) -> Vec<(String, String)> {
    check["leftovers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    (
                        l["kind"].as_str().unwrap_or("").to_string(),
                        l["path"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn check_lists_the_stores_unfinished_uploads_and_prune_aborts_the_old_ones() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "leftovers")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(4 * MIB, 81).write(&disk)?;
    r.json(&["init"])?;
    r.json(&["backup", p(&disk), "--disk", "d"])?;
    let clean = r.json(&["check"])?;
    ensure!(leftovers(&clean).is_empty(), "{clean:#}");

    // A temporary file in this host's cache directory is not the repository's.
    let cache_dirs: Vec<_> = std::fs::read_dir(r.cache.path().join("stackvault"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "locations"))
        .collect();
    for d in &cache_dirs {
        std::fs::write(d.join(".tmp-cache-only"), b"x")?;
    }

    // A writer killed between starting a pack's multipart upload and completing it.
    let store = moto.backend(&r.location)?;
    let key = "packs/7e/7e0123456789abcdef0123456789abcd";
    store.start_unfinished_upload(key, &vec![7u8; 5 * MIB as usize])?;
    ensure!(
        !store.list("packs/")?.iter().any(|k| k == key),
        "an unfinished upload is listed as an object"
    );

    let found = r.json(&["check"])?;
    ensure!(
        leftovers(&found) == [("unfinished-upload".to_string(), key.to_string())],
        "check does not list exactly the unfinished upload: {found:#}"
    );
    ensure!(found["ok"] == true, "a leftover is not damage: {found:#}");

    // moto answers every upload's start time with a fixed date of 2010, so every upload is
    // old here: that a young one is left is pinned by `maintain::uploads`' unit test.
    prune_removes_the_one_upload(&r, &store)?;
    ensure!(!cache_dirs.is_empty(), "no cache directory found");
    ensure!(
        cache_dirs
            .first()
            .context("cache")?
            .join(".tmp-cache-only")
            .exists(),
        "prune removed a file of this host's cache"
    );
    Ok(())
}

/// A dry-run prune counts the one old unfinished upload `store` holds and keeps it; a prune
/// removes it; `check` then finds no leftover.
pub(crate) fn prune_removes_the_one_upload(r: &Remote, store: &dyn Backend) -> Result<()> {
    let dry = r.json(&["prune", "--grace", "0", "--dry-run"])?;
    ensure!(dry["leftovers_removed"] == 1, "{dry:#}");
    ensure!(
        store.unfinished_uploads()?.len() == 1,
        "a dry run discarded the upload"
    );
    let pruned = r.json(&["prune", "--grace", "0"])?;
    ensure!(pruned["leftovers_removed"] == 1, "{pruned:#}");
    ensure!(
        store.unfinished_uploads()?.is_empty(),
        "prune left the upload"
    );
    let after = r.json(&["check"])?;
    ensure!(leftovers(&after).is_empty(), "{after:#}");
    Ok(())
}
