//! The last stage of a check, also run on its own by `prune`: [`leftovers`], what interrupted
//! or crashed runs left behind (temporary objects and index-rebuild files in a local
//! directory, stale locks, uploads an object store holds uncommitted). Leftovers are not
//! damage; [`Leftover::removable_by_prune`] says which of them no running writer can still
//! own. Reading only.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repo;

/// What kind of [`Leftover`] a crashed or interrupted run left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeftoverKind {
    /// The temporary object of a write that never finished (or of one running now).
    Temporary,
    /// A lock whose holder is gone.
    StaleLock,
    /// An upload a remote store holds uncommitted (an S3 multipart upload never completed):
    /// invisible to readers, but stored until discarded.
    UnfinishedUpload,
}

impl LeftoverKind {
    /// The name used in JSON and in the text report.
    pub fn as_str(self) -> &'static str {
        match self {
            LeftoverKind::Temporary => "temporary",
            LeftoverKind::StaleLock => "stale-lock",
            LeftoverKind::UnfinishedUpload => "unfinished-upload",
        }
    }
}

impl std::fmt::Display for LeftoverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something an interrupted or crashed run left in the repository (see [`leftovers`]).
#[derive(Clone, Debug, Serialize)]
pub struct Leftover {
    pub kind: LeftoverKind,
    /// Path relative to the repository.
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// Seconds since it was last modified.
    #[serde(rename = "age_seconds")]
    pub age_secs: u64,
    /// Why a lock is stale; empty for temporary objects.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub why: String,
    /// The store's id of an unfinished upload (not a secret), for discarding it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
}

/// Temporary objects younger than this in directories that writers do not lock (verification
/// records, locks) may belong to a run in progress: prune leaves them.
pub const LEFTOVER_MIN_AGE_SECS: u64 = 3600;

impl Leftover {
    /// Whether `prune`, holding the maintenance lock, may remove it: no writer or maintainer
    /// can be running, so any temporary object of packs, manifests and index rebuilds is
    /// dead; elsewhere (verify records, lock publishing) only old ones are.
    pub fn removable_by_prune(&self) -> bool {
        if self.kind == LeftoverKind::UnfinishedUpload {
            // Prune on a shared store runs beside writers: see `maintain::uploads`.
            return self.age_secs >= LEFTOVER_MIN_AGE_SECS;
        }
        self.kind == LeftoverKind::StaleLock
            || self.path.starts_with("packs/")
            || self.path.starts_with("snapshots/")
            || !self.path.contains('/')
            || self.age_secs >= LEFTOVER_MIN_AGE_SECS
    }
}

/// Lists the leftovers of interrupted or crashed runs. In a local repository: temporary
/// objects (`.tmp-` names in any directory, an index rebuild's `<index>.rebuild-*` files) and
/// stale locks, found by walking its directory. In a repository on an object store, whose
/// writes are atomic: what the store holds uncommitted ([`Backend::unfinished_uploads`]),
/// never anything of this host's cache directory, which is not the repository. Reading only.
///
/// [`Backend::unfinished_uploads`]: crate::store::Backend::unfinished_uploads
pub fn leftovers(repo: &Repo) -> Result<Vec<Leftover>> {
    if repo.is_remote() {
        return remote_leftovers(repo);
    }
    let root = repo.root();
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let now = std::time::SystemTime::now();
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Renamed or removed while we looked: a write that just finished.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &path, e)),
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let rebuild = dir == root && name.contains(".rebuild-");
            if !name.starts_with(".tmp-") && !rebuild {
                continue;
            }
            out.push(Leftover {
                kind: LeftoverKind::Temporary,
                path: relative(root, &path),
                size: meta.len(),
                age_secs: meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .map_or(0, |d| d.as_secs()),
                why: String::new(),
                upload_id: None,
            });
        }
    }
    for (path, why) in crate::lock::stale_locks(root)? {
        out.push(Leftover {
            kind: LeftoverKind::StaleLock,
            path: relative(root, &path),
            size: std::fs::metadata(&path).map_or(0, |m| m.len()),
            age_secs: 0,
            why,
            upload_id: None,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// [`leftovers`] of a repository on an object store.
fn remote_leftovers(repo: &Repo) -> Result<Vec<Leftover>> {
    let mut out: Vec<Leftover> = repo
        .backend()
        .unfinished_uploads()?
        .into_iter()
        .map(|u| Leftover {
            kind: LeftoverKind::UnfinishedUpload,
            size: 0,
            // Unknown: never old enough to be removed.
            age_secs: u.age().map_or(0, |a| a.as_secs()),
            why: String::new(),
            path: u.key,
            upload_id: Some(u.id),
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}
