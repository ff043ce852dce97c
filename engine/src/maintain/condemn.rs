//! Condemnation records: phase 1 of prune's two-phase deletion on a shared store.
//!
//! On a repository many hosts write (a remote store), prune does not delete a pack the moment
//! it finds it unreferenced: a backup on another host may have deduplicated against it and
//! not yet written its manifest. Prune instead writes an immutable record
//! `condemned/<time>-<16 hex>` naming the packs, and a later prune deletes them once the record
//! is older than the grace period and no manifest present references them. Backups treat
//! condemned packs as absent when they deduplicate, and right before their manifest they look
//! again and copy any pack they use that got condemned meanwhile ([`before_manifest`]). The
//! rule and its proof are in `format-spec/locks.md` ("Prune on a shared store"); the record
//! format is specified there too.
//!
//! Invariant: a record is written once, create-only, and never changed; it is deleted only by
//! the prune that has dealt with every pack it names. In an encrypted repository it is sealed
//! (kind `Condemned`, bound to its key), like every other object with metadata: its host name
//! and times are nobody else's business.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::crypto::{ObjectAd, ObjectKind, Protection};
use crate::error::{Error, Result};
use crate::format::ChunkId;
use crate::repo::Repo;
use crate::store::Backend;

/// Directory of the condemnation records.
pub const CONDEMNED_PREFIX: &str = "condemned/";

/// The body of a condemnation record (UTF-8 JSON; readers ignore unknown fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// When the record was written, RFC 3339 UTC.
    pub time: String,
    /// Host name of the prune that wrote it.
    pub host: String,
    /// Names (32 hex digits) of the packs it condemns.
    pub packs: Vec<String>,
}

/// A condemnation record found in the repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub body: RecordBody,
}

impl Record {
    /// How long ago the record was written, by its `time` and this host's clock; `None` when
    /// the time is unreadable or in the future (then it never counts as old enough).
    pub fn age(&self) -> Option<Duration> {
        let t = time::OffsetDateTime::parse(
            &self.body.time,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let elapsed = time::OffsetDateTime::now_utc() - t;
        Duration::try_from(elapsed).ok()
    }
}

/// Whether `key` is a record's key (`condemned/<time>-<16 hex>`; temporary objects are not).
fn is_record_key(key: &str) -> bool {
    key.strip_prefix(CONDEMNED_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.starts_with('.'))
}

/// Reads every condemnation record in the repository (one listing, one GET each). A record
/// that cannot be read is damage: nobody can know which packs it condemns, so backups and
/// prune stop rather than guess.
pub fn read_all(backend: &dyn Backend, protection: &Protection) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for key in backend.list(CONDEMNED_PREFIX)? {
        if !is_record_key(&key) {
            continue;
        }
        let bytes = match backend.get(&key) {
            Ok(b) => b,
            // Deleted by a prune between the listing and the read: its packs are dealt with.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let bytes = protection.open(&ad(&key), &bytes, &key, 0)?;
        let body: RecordBody = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(
                &key,
                0,
                format!(
                    "unreadable condemnation record ({e}); if it cannot be restored, delete it \
                     only while no prune and no backup runs"
                ),
            )
        })?;
        out.push(Record { key, body });
    }
    Ok(out)
}

/// The associated data of the record stored under `key`.
fn ad(key: &str) -> ObjectAd<'_> {
    ObjectAd {
        kind: ObjectKind::Condemned,
        name: key,
        part: 0,
    }
}

/// The packs named by `records`.
pub fn packs_of(records: &[Record]) -> HashSet<String> {
    records
        .iter()
        .flat_map(|r| r.body.packs.iter().cloned())
        .collect()
}

/// Writes a new record condemning `packs` (create-only); returns it.
pub fn write(backend: &dyn Backend, protection: &Protection, packs: Vec<String>) -> Result<Record> {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let key = format!("{CONDEMNED_PREFIX}{stamp}-{}", crate::lock::random_hex());
    let body = RecordBody {
        time: crate::host::rfc3339(now),
        host: crate::host::hostname(),
        packs,
    };
    let bytes = serde_json::to_vec(&body)
        .map_err(|e| Error::Internal(format!("cannot encode a condemnation record: {e}")))?;
    backend.put(&key, &protection.seal(&ad(&key), bytes)?)?;
    Ok(Record { key, body })
}

/// How many times a backup copies packs condemned under it before it gives up.
const RESCUE_ATTEMPTS: usize = 3;

/// Rule 2's re-check, right before a backup writes its manifest: reads the condemned set
/// again, and copies every pack the backup used (`used`: packs it deduplicated against or
/// wrote) or its `parent` snapshot names that is now condemned into new packs, whose index
/// rows then hold those chunks, so that the manifest references only packs no record names.
/// Returns how many packs were copied. Gives up with an error after a few rounds of packs
/// condemned again (prunes running back to back).
pub fn before_manifest(
    repo: &Repo,
    used: &mut HashSet<String>,
    parent: Option<&str>,
) -> Result<u64> {
    let mut copied = 0;
    for _ in 0..RESCUE_ATTEMPTS {
        let condemned = packs_of(&read_all(repo.backend(), repo.protection())?);
        if condemned.is_empty() {
            return Ok(copied);
        }
        let mut affected: HashSet<String> = used.intersection(&condemned).cloned().collect();
        if let Some(parent) = parent {
            affected.extend(parent_packs_in(repo, parent, &condemned)?);
        }
        if affected.is_empty() {
            return Ok(copied);
        }
        let mut names: Vec<String> = affected.into_iter().collect();
        names.sort();
        let written = super::prune::copy_packs(repo, &names)?;
        copied += names.len() as u64;
        for n in &names {
            used.remove(n);
        }
        used.extend(written);
    }
    Err(Error::Locked(format!(
        "prunes condemned packs this backup uses {RESCUE_ATTEMPTS} times in a row; nothing was \
         published: run the backup again when no prune runs"
    )))
}

/// The condemned packs the index places chunks of the manifest `parent` in. The parent's
/// chunks are deduplicated without an index lookup, so a pack condemned under them (a parent
/// written while a prune decided) is found here.
pub(crate) fn parent_packs_in(
    repo: &Repo,
    parent: &str,
    condemned: &HashSet<String>,
) -> Result<HashSet<String>> {
    let mut condemned_chunks: std::collections::HashMap<ChunkId, String> =
        std::collections::HashMap::new();
    {
        let mut index = repo.index();
        for name in condemned {
            for id in chunks_of_pack(&mut index, name)? {
                condemned_chunks.insert(id, name.clone());
            }
        }
    }
    let mut out = HashSet::new();
    if condemned_chunks.is_empty() {
        return Ok(out);
    }
    let manifest = repo.load_manifest(parent)?;
    for extents in manifest.segments() {
        for e in extents? {
            if let crate::format::manifest::Extent::Chunk { id, .. } = e {
                if let Some(p) = condemned_chunks.get(&id) {
                    out.insert(p.clone());
                }
            }
        }
    }
    Ok(out)
}

/// The chunk ids the index places in pack `name`.
fn chunks_of_pack(index: &mut crate::index::Index, name: &str) -> Result<Vec<ChunkId>> {
    let path = index.path().to_path_buf();
    let err = crate::index::sql_err(&path);
    let conn = index.conn_mut();
    let mut stmt = conn
        .prepare_cached("SELECT c.id FROM chunks c JOIN packs p ON p.id = c.pack WHERE p.name = ?1")
        .map_err(&err)?;
    let rows = stmt
        .query_map([name], |r| r.get::<_, Vec<u8>>(0))
        .map_err(&err)?;
    let mut out = Vec::new();
    for row in rows {
        let id = row.map_err(&err)?;
        if let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) {
            out.push(ChunkId(id));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryBackend;

    #[test]
    fn records_round_trip_and_age() -> Result<()> {
        let b = MemoryBackend::new();
        let plain = &Protection::Plain;
        assert!(read_all(&b, plain)?.is_empty());
        let r = write(&b, plain, vec!["00112233445566778899aabbccddeeff".into()])?;
        assert!(is_record_key(&r.key), "{}", r.key);
        let all = read_all(&b, plain)?;
        assert_eq!(all, vec![r.clone()]);
        assert!(r.age().is_some_and(|a| a < Duration::from_secs(60)));
        assert_eq!(packs_of(&all).len(), 1);
        b.put("condemned/x-1", b"not json")?;
        assert!(read_all(&b, plain).err().is_some_and(|e| e.is_corruption()));
        Ok(())
    }

    #[test]
    fn sealed_records_hide_their_host_and_fail_when_touched_or_moved() -> Result<()> {
        use crate::crypto::{MasterSecret, RepoKeys};
        let keys = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [3; 32],
        ))));
        let b = MemoryBackend::new();
        let pack = "00112233445566778899aabbccddeeff";
        let r = write(&b, &keys, vec![pack.into()])?;
        let stored = b.get(&r.key)?;
        for secret in [r.body.host.as_bytes(), pack.as_bytes()] {
            assert!(!stored.windows(secret.len()).any(|w| w == secret));
        }
        assert_eq!(read_all(&b, &keys)?, vec![r.clone()]);
        // Plain readers (no keys) cannot take it for a record.
        assert!(read_all(&b, &Protection::Plain).is_err());
        // Under another key name, or with a flipped byte: damage.
        b.put("condemned/20260101T000000Z-0000000000000000", &stored)?;
        b.remove(&r.key)?;
        assert!(read_all(&b, &keys).err().is_some_and(|e| e.is_corruption()));
        Ok(())
    }
}
