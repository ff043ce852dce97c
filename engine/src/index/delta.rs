//! Index deltas: one small immutable object per pack, `index/xx/<pack name>`, holding the
//! pack's chunk table, so that any host learns which chunks another host's packs hold
//! without reading the packs.
//!
//! A delta is written after its pack is durable and before the index row of the pack (and so
//! before any manifest that needs the pack); it is deleted before its pack. Hence every
//! delta names a pack that exists, and a pack without a delta is one whose backup died
//! between the two writes (no manifest needs it) or one written by a build without deltas.
//! A delta carries the pack's table byte for byte, with the footer fields needed to check it,
//! and its own crc32: decoding reuses the pack table decoder, so a delta and its pack can
//! never be read differently. The encoding is specified in `format-spec/index-deltas.md`.
//!
//! In an encrypted repository the stored delta is that encoding sealed under
//! `ObjectAd {IndexDelta, name: <pack name>, part: 0}` ([`seal_delta`], [`open_delta`]): a
//! delta filed under another pack's name fails authentication before it is decoded.
//!
//! [`sync`] brings an index up to date from the deltas it has not seen (one listing of
//! `index/` and one of `packs/`, then one GET per new delta whose pack exists: a delta whose
//! pack is gone teaches nothing); [`reindex`] rebuilds the pack part of an index
//! from all deltas, reading the tables of packs that have none.

use std::collections::{HashMap, HashSet};

use crate::crypto::{ObjectAd, ObjectKind, Protection};
use crate::error::{Error, Result};
use crate::format::pack::{check_sealed_table, PACK_VERSION_SEALED};
use crate::format::pack::{decode_footer, decode_table, PackEntry, PackFooter, PACK_FOOTER_LEN};
use crate::store::pack::read_pack_table;
use crate::store::{pack_key, Backend};

use super::Index;

/// Magic of a delta object.
pub const DELTA_MAGIC: [u8; 8] = *b"SVDELTA\x01";
/// Format version of the deltas this build writes and reads.
pub const DELTA_VERSION: u32 = 1;
/// Length of the fixed part before the table.
pub const DELTA_HEADER_LEN: usize = 56;
/// Directory of the deltas.
pub const DELTAS_PREFIX: &str = "index/";

/// Key of the delta of pack `name`: `index/xx/<name>`, like `packs/xx/<name>`.
pub fn delta_key(name: &str) -> String {
    format!("{DELTAS_PREFIX}{}/{name}", name.get(..2).unwrap_or(name))
}

/// The pack name in a delta key, when the key is one (`index/xx/<32 hex>`, `xx` its first
/// two digits). Anything else under `index/` is not a delta and is ignored.
pub fn pack_of_delta_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(DELTAS_PREFIX)?;
    let (dir, name) = rest.split_once('/')?;
    let valid = name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && name.get(..2) == Some(dir);
    valid.then_some(name)
}

/// The name of a pack in a pack key (`packs/xx/<name>`), when the key is one.
pub fn pack_of_pack_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("packs/")?;
    let (dir, name) = rest.split_once('/')?;
    (name.len() == 32 && name.get(..2) == Some(dir)).then_some(name)
}

/// What a delta says about its pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub pack: String,
    pub pack_size: u64,
    pub pack_version: u32,
    pub entries: Vec<PackEntry>,
}

/// Encodes the delta of the complete pack `pack` named `name`, from the pack's own footer
/// and table (checked on the way: a delta is never made from a damaged pack).
pub fn encode_delta(name: &str, pack: &[u8]) -> Result<Vec<u8>> {
    let location = format!("pack {name}");
    let raw_name = crate::format::unhex(name)
        .filter(|b| b.len() == 16)
        .ok_or_else(|| Error::Internal(format!("pack name {name:?} is not 32 hex digits")))?;
    let size = pack.len() as u64;
    let footer_at = pack
        .len()
        .checked_sub(PACK_FOOTER_LEN)
        .ok_or_else(|| Error::corrupt(&location, 0, "pack too short to hold a footer"))?;
    let footer = decode_footer(&pack[footer_at..], size, &location)?;
    let table = usize::try_from(footer.table_offset)
        .ok()
        .and_then(|start| pack.get(start..footer_at))
        .ok_or_else(|| Error::corrupt(&location, footer.table_offset, "table outside the pack"))?;
    // Checks the table as a reader of the delta will; a sealed table (format 3) is copied
    // sealed, bound to its pack's name, and opened by the reader with the repository's keys:
    // here only its length and crc are checked (no keys needed to describe a pack).
    if footer.version == PACK_VERSION_SEALED {
        check_sealed_table(table, &footer, &location)?;
    } else {
        decode_table(table, &footer, &Protection::Plain, name, &location)?;
    }
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + table.len() + 4);
    out.extend_from_slice(&DELTA_MAGIC);
    out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
    out.extend_from_slice(&footer.version.to_le_bytes());
    out.extend_from_slice(&raw_name);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&footer.table_offset.to_le_bytes());
    out.extend_from_slice(&footer.chunk_count.to_le_bytes());
    out.extend_from_slice(&footer.table_crc32.to_le_bytes());
    out.extend_from_slice(table);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes and checks the delta stored under `key`: its crc, its version, that it names the
/// pack its key names, and its table as the pack decoder checks a pack's.
pub fn decode_delta(data: &[u8], key: &str, protection: &Protection) -> Result<Delta> {
    let bad = |at: usize, what: &str| Error::corrupt(key, at as u64, what.to_string());
    let expected = pack_of_delta_key(key).ok_or_else(|| bad(0, "not a delta key"))?;
    if data.len() < DELTA_HEADER_LEN + 4 {
        return Err(bad(0, "delta too short"));
    }
    if data.get(..8) != Some(&DELTA_MAGIC[..]) {
        return Err(bad(0, "bad delta magic"));
    }
    let body_len = data.len() - 4;
    let u32_at = |at: usize| -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&data[at..at + 4]);
        u32::from_le_bytes(b)
    };
    let u64_at = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if crc32fast::hash(&data[..body_len]) != u32_at(body_len) {
        return Err(bad(body_len, "delta checksum mismatch"));
    }
    let version = u32_at(8);
    if version != DELTA_VERSION {
        return Err(Error::UnsupportedVersion {
            what: format!("index delta {key}"),
            found: version,
            supported: DELTA_VERSION,
        });
    }
    let pack = crate::format::hex(&data[16..32]);
    if pack != expected {
        return Err(bad(16, "delta names another pack than its key"));
    }
    let footer = PackFooter {
        version: u32_at(12),
        chunk_count: u32_at(48),
        table_offset: u64_at(40),
        table_crc32: u32_at(52),
    };
    let pack_size = u64_at(32);
    let table = &data[DELTA_HEADER_LEN..body_len];
    let table_end = footer
        .table_offset
        .checked_add(table.len() as u64)
        .and_then(|e| e.checked_add(PACK_FOOTER_LEN as u64));
    if table_end != Some(pack_size)
        || footer.version == 0
        || table.len() as u64 != footer.table_len()
    {
        return Err(bad(32, "delta sizes do not fit together"));
    }
    let entries = decode_table(table, &footer, protection, &pack, key)?;
    Ok(Delta {
        pack,
        pack_size,
        pack_version: footer.version,
        entries,
    })
}

/// The associated data of the delta of pack `name`.
fn delta_ad(name: &str) -> ObjectAd<'_> {
    ObjectAd {
        kind: ObjectKind::IndexDelta,
        name,
        part: 0,
    }
}

/// The stored form of the delta of the complete pack `pack` named `name`: [`encode_delta`],
/// sealed when `protection` is encrypted.
pub fn seal_delta(protection: &Protection, name: &str, pack: &[u8]) -> Result<Vec<u8>> {
    protection.seal(&delta_ad(name), encode_delta(name, pack)?)
}

/// Authenticates (when `protection` is encrypted) and decodes the delta stored under `key`;
/// see [`decode_delta`]. A key that is not a delta's is refused before anything else.
pub fn open_delta(protection: &Protection, stored: &[u8], key: &str) -> Result<Delta> {
    let name = pack_of_delta_key(key).ok_or_else(|| Error::corrupt(key, 0, "not a delta key"))?;
    let plain = protection.open(&delta_ad(name), stored, key, 0)?;
    decode_delta(&plain, key, protection)
}

/// What [`sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Deltas read and applied (packs new to the index).
    pub applied: u64,
    /// Whether packs known to the index had vanished (pruned by another host), so that the
    /// pack part of the index was rebuilt from all deltas.
    pub reindexed: bool,
}

/// Brings `index` up to date with the deltas in `backend`: one listing of `index/`, then one
/// of `packs/` (in that order: a delta is written after its pack, so a delta listed first
/// whose pack the later listing lacks names a pack that is gone, never one in flight), then
/// the deltas of packs the index does not know.
///
/// - A delta whose pack is not in the store is an orphan (its pack was deleted, by hand or by
///   a build without deltas): the index learns nothing from it, since a backup must never
///   deduplicate against a pack that is gone. `check` lists it, `prune` removes it, and a
///   snapshot that needs its chunks fails as damage naming the pack ([`gone_pack_holding`]).
/// - A pack the index knows that is gone from the store (pruned by another host, deleted
///   behind the repository's back) makes the pack part of the index be rebuilt ([`reindex`]),
///   since its chunks may also live in packs the index already knows.
/// - When `write_missing` is set, a delta found missing for a pack that exists is written
///   (deterministic contents, create-only), so the next sync need not look again.
pub fn sync(
    index: &mut Index,
    backend: &dyn Backend,
    protection: &Protection,
    write_missing: bool,
) -> Result<SyncReport> {
    let listed: HashMap<String, String> = backend
        .list(DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|k| pack_of_delta_key(&k).map(|n| (n.to_string(), k.clone())))
        .collect();
    let packs: HashMap<String, u64> = backend
        .list_with_sizes("packs/")?
        .into_iter()
        .filter_map(|o| pack_of_pack_key(&o.key).map(|n| (n.to_string(), o.size)))
        .collect();
    let known: HashSet<String> = index.pack_names()?.into_iter().collect();
    if known.iter().any(|n| !packs.contains_key(n)) {
        let report = reindex(index, backend, protection, write_missing)?;
        return Ok(SyncReport {
            applied: report.packs,
            reindexed: true,
        });
    }
    if write_missing {
        for name in known.iter().filter(|n| !listed.contains_key(*n)) {
            write_delta_of_stored_pack(backend, protection, name)?;
        }
    }
    let mut report = SyncReport::default();
    for (name, key) in &listed {
        if known.contains(name) {
            continue;
        }
        // An orphan delta: see the doc above.
        let Some(&size) = packs.get(name) else {
            continue;
        };
        let delta = backend
            .get(key)
            .and_then(|b| open_delta(protection, &b, key));
        match delta {
            Ok(d) if d.pack_size == size => {
                index.add_pack(&d.pack, d.pack_size, d.pack_version, &d.entries)?
            }
            // A damaged delta, or one that disagrees with its pack's size: the pack's own
            // table says what the pack holds.
            Ok(_) => add_from_table(index, backend, protection, name, size)?,
            Err(e) if e.is_corruption() => add_from_table(index, backend, protection, name, size)?,
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
        report.applied += 1;
    }
    Ok(report)
}

/// Indexes the stored pack `name` of `size` bytes from its own table.
fn add_from_table(
    index: &mut Index,
    backend: &dyn Backend,
    protection: &Protection,
    name: &str,
    size: u64,
) -> Result<()> {
    let table = read_pack_table(backend, protection, name)?;
    index.add_pack(name, size, table.version, &table.entries)
}

/// The pack that held chunk `id` and is gone from the store, as its orphan delta says (a
/// delta whose pack is not listed): what names the missing pack when a snapshot needs a chunk
/// the index does not know. One listing of `index/` and of `packs/`, then a GET of each orphan
/// delta; only for error paths. `None` when no orphan delta holds the chunk.
pub fn gone_pack_holding(
    backend: &dyn Backend,
    protection: &Protection,
    id: &crate::format::ChunkId,
) -> Result<Option<String>> {
    Ok(gone_packs(backend, protection)?
        .into_iter()
        .find(|(_, ids)| ids.contains(id))
        .map(|(pack, _)| pack))
}

/// The packs gone from the store whose deltas remain, with the chunks each delta lists
/// (damaged orphan deltas are skipped: `check` reports them).
pub fn gone_packs(
    backend: &dyn Backend,
    protection: &Protection,
) -> Result<Vec<(String, HashSet<crate::format::ChunkId>)>> {
    let deltas: Vec<(String, String)> = backend
        .list(DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|k| pack_of_delta_key(&k).map(|n| (n.to_string(), k.clone())))
        .collect();
    let packs: HashSet<String> = backend
        .list("packs/")?
        .iter()
        .filter_map(|k| pack_of_pack_key(k).map(str::to_string))
        .collect();
    let mut out = Vec::new();
    for (name, key) in deltas {
        if packs.contains(&name) {
            continue;
        }
        match backend
            .get(&key)
            .and_then(|b| open_delta(protection, &b, &key))
        {
            Ok(d) => out.push((name, d.entries.iter().map(|e| e.id).collect())),
            Err(e) if e.is_corruption() || matches!(e, Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Writes the delta of the stored pack `name` if it has none (read from the pack's table;
/// the contents are a function of the pack, so two hosts doing it at once write the same).
fn write_delta_of_stored_pack(
    backend: &dyn Backend,
    protection: &Protection,
    name: &str,
) -> Result<()> {
    let bytes = backend.get(&pack_key(name)?)?;
    match backend.put(&delta_key(name), &seal_delta(protection, name, &bytes)?) {
        Ok(()) | Err(Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// What [`reindex`] found.
#[derive(Debug, Default)]
pub struct ReindexReport {
    pub packs: u64,
    pub chunks: u64,
    /// Damaged packs (their chunks are not indexed).
    pub problems: Vec<Error>,
}

/// Replaces the packs and chunks of `index`, in one transaction, with what the repository
/// holds: each listed pack from its delta, or from its own table when it has none (a backup
/// killed between the two writes, a build without deltas) or its delta is damaged. A delta
/// whose pack is gone (a build without deltas pruned it) is ignored. With `write_missing`,
/// missing deltas are written.
pub fn reindex(
    index: &mut Index,
    backend: &dyn Backend,
    protection: &Protection,
    write_missing: bool,
) -> Result<ReindexReport> {
    let deltas: HashMap<String, String> = backend
        .list(DELTAS_PREFIX)?
        .into_iter()
        .filter_map(|k| pack_of_delta_key(&k).map(|n| (n.to_string(), k.clone())))
        .collect();
    let mut report = ReindexReport::default();
    let packs = backend.list_with_sizes("packs/")?;
    index.replace_packs(|add| {
        for object in &packs {
            let Some(name) = pack_of_pack_key(&object.key) else {
                continue;
            };
            let from_delta = match deltas.get(name) {
                Some(key) => match backend
                    .get(key)
                    .and_then(|b| open_delta(protection, &b, key))
                {
                    Ok(d) if d.pack_size == object.size => Some(d),
                    Ok(_) => None,
                    Err(e) if e.is_corruption() || matches!(e, Error::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let (version, entries) = match from_delta {
                Some(d) => (d.pack_version, d.entries),
                None => match read_pack_table(backend, protection, name) {
                    Ok(t) => {
                        if write_missing && !deltas.contains_key(name) {
                            write_delta_of_stored_pack(backend, protection, name)?;
                        }
                        (t.version, t.entries)
                    }
                    Err(e) if e.is_corruption() => {
                        report.problems.push(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            add(name, object.size, version, &entries)?;
            report.packs += 1;
            report.chunks += entries.len() as u64;
        }
        Ok(())
    })?;
    Ok(report)
}

/// A backend that keeps every pack paired with its delta, whoever writes or deletes the pack
/// (a backup, prune's repacking, a repair): `put` of a pack writes the pack, then its delta;
/// `remove` of a pack removes the delta, then the pack. So the ordering rules of the module
/// doc hold at the one place packs are written and deleted, and callers need not know about
/// deltas. Everything else passes through. Deltas are sealed with the repository's
/// protection, which the repository hands over once it has unlocked its keys.
pub struct WithDeltas {
    inner: std::sync::Arc<dyn Backend>,
    protection: std::sync::RwLock<Protection>,
}

impl WithDeltas {
    /// A plain repository's backend (deltas stored as encoded).
    pub fn new(inner: std::sync::Arc<dyn Backend>) -> Self {
        Self::with_protection(inner, Protection::Plain)
    }

    /// A backend whose deltas are sealed with `protection`.
    pub fn with_protection(inner: std::sync::Arc<dyn Backend>, protection: Protection) -> Self {
        WithDeltas {
            inner,
            protection: std::sync::RwLock::new(protection),
        }
    }

    /// Seals the deltas written from now on with `protection`.
    pub fn set_protection(&self, protection: Protection) {
        *self.protection.write().unwrap_or_else(|p| p.into_inner()) = protection;
    }

    /// Stores pack `key` and then its delta, as [`Backend::put`] does, handing the pack's
    /// bytes to `stored` as soon as the pack is stored: a backup fills its next pack in that
    /// buffer while the delta goes up (a round trip on a remote store).
    pub fn put_pack(&self, key: &str, data: Vec<u8>, stored: impl FnOnce(Vec<u8>)) -> Result<()> {
        let Some(name) = pack_of_pack_key(key) else {
            return Err(Error::Internal(format!("{key} is not a pack's key")));
        };
        let delta = self.delta_of(name, &data)?;
        self.inner.put(key, &data)?;
        stored(data);
        self.put_delta(name, &delta)
    }

    /// Pack `name`'s delta, encoded first: a pack that cannot be described is refused before
    /// it is stored.
    fn delta_of(&self, name: &str, pack: &[u8]) -> Result<Vec<u8>> {
        seal_delta(
            &self.protection.read().unwrap_or_else(|p| p.into_inner()),
            name,
            pack,
        )
    }

    /// Stores a delta after its pack.
    fn put_delta(&self, name: &str, delta: &[u8]) -> Result<()> {
        match self.inner.put(&delta_key(name), delta) {
            // Same pack, same bytes: a repair or another host was first.
            Ok(()) | Err(Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Backend for WithDeltas {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let Some(name) = pack_of_pack_key(key) else {
            return self.inner.put(key, data);
        };
        let delta = self.delta_of(name, data)?;
        self.inner.put(key, data)?;
        self.put_delta(name, &delta)
    }

    fn put_versioned(&self, key: &str, data: &[u8]) -> Result<crate::store::Version> {
        if pack_of_pack_key(key).is_some() {
            self.put(key, data)?;
            return self.version(key);
        }
        self.inner.put_versioned(key, data)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.inner.get(key)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }

    fn get_range_into(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.get_range_into(key, offset, len, buf)
    }

    fn open_range<'a>(
        &'a self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send + 'a>> {
        self.inner.open_range(key, offset, len)
    }

    fn size(&self, key: &str) -> Result<u64> {
        self.inner.size(key)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }

    fn list_with_sizes(&self, prefix: &str) -> Result<Vec<crate::store::ObjectInfo>> {
        self.inner.list_with_sizes(prefix)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }

    fn remove(&self, key: &str) -> Result<()> {
        if let Some(name) = pack_of_pack_key(key) {
            self.inner.remove(&delta_key(name))?;
        }
        self.inner.remove(key)
    }

    fn version(&self, key: &str) -> Result<crate::store::Version> {
        self.inner.version(key)
    }

    fn replace(
        &self,
        key: &str,
        data: &[u8],
        expected: &crate::store::Version,
    ) -> Result<crate::store::Version> {
        self.inner.replace(key, data, expected)
    }

    fn delete_if(&self, key: &str, expected: &crate::store::Version) -> Result<()> {
        self.inner.delete_if(key, expected)
    }

    fn writer<'a>(&'a self, dir: &str) -> Result<Box<dyn crate::store::ObjectWriter + 'a>> {
        self.inner.writer(dir)
    }

    fn unfinished_uploads(&self) -> Result<Vec<crate::store::UnfinishedUpload>> {
        self.inner.unfinished_uploads()
    }

    fn discard_upload(&self, upload: &crate::store::UnfinishedUpload) -> Result<()> {
        self.inner.discard_upload(upload)
    }

    fn request_counts(&self) -> Option<std::collections::BTreeMap<&'static str, u64>> {
        self.inner.request_counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::{Compression, PACK_VERSION};
    use crate::format::ChunkId;
    use crate::store::pack::PackWriter;

    fn sample_pack() -> Result<crate::store::pack::FinishedPack> {
        sample_pack_in(&Protection::Plain)
    }

    /// A pack of three chunks in two frames, written for a repository with `p`.
    fn sample_pack_in(p: &Protection) -> Result<crate::store::pack::FinishedPack> {
        let mut w = PackWriter::new(1 << 16, p)?;
        let chunks: [&[u8]; 2] = [b"first chunk", b"second chunk, a little longer"];
        let stored: Vec<u8> = chunks.concat();
        let list: Vec<(ChunkId, u32)> = chunks
            .iter()
            .map(|c| (p.chunk_id(c), c.len() as u32))
            .collect();
        w.add_frame(p, &list, &stored, Compression::None)?;
        let third: &[u8] = b"third chunk, alone in its frame";
        w.add_frame(
            p,
            &[(p.chunk_id(third), third.len() as u32)],
            third,
            Compression::None,
        )?;
        w.finish(p)
    }

    #[test]
    fn a_delta_round_trips_and_refuses_damage() -> Result<()> {
        let pack = sample_pack()?;
        let key = delta_key(&pack.name);
        let bytes = encode_delta(&pack.name, &pack.bytes)?;
        let d = decode_delta(&bytes, &key, &Protection::Plain)?;
        assert_eq!(d.pack, pack.name);
        assert_eq!(d.pack_size, pack.bytes.len() as u64);
        assert_eq!(d.pack_version, PACK_VERSION);
        assert_eq!(d.entries, pack.entries);
        for at in [0, 9, 20, 33, 45, 50, DELTA_HEADER_LEN + 3, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let err = decode_delta(&bad, &key, &Protection::Plain).err();
            assert!(
                err.as_ref().is_some_and(Error::is_corruption),
                "byte {at}: {err:?}"
            );
        }
        for len in [0, 10, DELTA_HEADER_LEN, bytes.len() - 1] {
            assert!(
                decode_delta(&bytes[..len], &key, &Protection::Plain).is_err(),
                "length {len}"
            );
        }
        // Filed under another pack's name: refused.
        // (The pack name is random: change its last digit to one it does not have.)
        let last = if pack.name.ends_with('0') { '1' } else { '0' };
        let other = delta_key(&format!("{}{last}", &pack.name[..31]));
        assert!(decode_delta(&bytes, &other, &Protection::Plain).is_err());
        Ok(())
    }

    #[test]
    fn a_sealed_delta_opens_only_as_the_delta_of_its_pack() -> Result<()> {
        use crate::crypto::{MasterSecret, RepoKeys};
        let p = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [9; 32],
        ))));
        let pack = sample_pack_in(&p)?;
        let key = delta_key(&pack.name);
        let sealed = seal_delta(&p, &pack.name, &pack.bytes)?;
        assert_eq!(open_delta(&p, &sealed, &key)?.entries, pack.entries);
        // No chunk id and no table bytes in the clear.
        let plain = encode_delta(&pack.name, &pack.bytes)?;
        for e in &pack.entries {
            assert!(!sealed.windows(32).any(|w| w == e.id.0));
        }
        assert!(!sealed
            .windows(16)
            .any(|w| w == &plain[DELTA_HEADER_LEN..][..16]));
        for at in [0, 23, 24, 60, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 2;
            assert!(matches!(
                open_delta(&p, &bad, &key),
                Err(Error::Corrupt { location, offset: 0, .. }) if location == key
            ));
        }
        // The same delta filed under another pack's name: authentication fails.
        let last = if pack.name.ends_with('0') { '1' } else { '0' };
        let other = delta_key(&format!("{}{last}", &pack.name[..31]));
        assert!(matches!(
            open_delta(&p, &sealed, &other),
            Err(Error::Corrupt { .. })
        ));
        // Plain repositories keep the plain encoding.
        assert_eq!(
            seal_delta(&Protection::Plain, &pack.name, &pack.bytes)?,
            plain
        );
        assert!(open_delta(&p, &plain, &key).is_err());
        Ok(())
    }

    #[test]
    fn keys_name_packs() {
        let name = "0123456789abcdef0123456789abcdef";
        assert_eq!(delta_key(name), format!("index/01/{name}"));
        assert_eq!(pack_of_delta_key(&delta_key(name)), Some(name));
        assert_eq!(
            pack_of_delta_key("index/02/0123456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(pack_of_delta_key("index/01/.tmp-x"), None);
        assert_eq!(
            pack_of_pack_key(&pack_key(name).expect("a pack name")),
            Some(name)
        );
    }

    /// `format-spec/vectors/index-delta.hex` is the delta of the pack vector `pack.hex`
    /// named `00112233445566778899aabbccddeeff` (regenerated with STACKVAULT_UPDATE_VECTORS).
    #[test]
    fn the_vector_is_the_delta_of_the_pack_vector() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../format-spec/vectors");
        let read_hex = |name: &str| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
            let digits: String = text.split_whitespace().collect();
            crate::format::unhex(&digits)
                .ok_or_else(|| Error::corrupt(path.display(), 0, "not hex"))
        };
        let name = "00112233445566778899aabbccddeeff";
        let delta = encode_delta(name, &read_hex("pack.hex")?)?;
        let path = dir.join("index-delta.hex");
        if std::env::var_os("STACKVAULT_UPDATE_VECTORS").is_some() {
            let text: String = delta
                .chunks(32)
                .map(|l| format!("{}\n", crate::format::hex(l)))
                .collect();
            std::fs::write(&path, text).map_err(|e| Error::io("write", &path, e))?;
        }
        assert_eq!(
            delta,
            read_hex("index-delta.hex")?,
            "regenerate with STACKVAULT_UPDATE_VECTORS=1"
        );
        let d = decode_delta(&delta, &delta_key(name), &Protection::Plain)?;
        assert_eq!(d.entries.len(), 3);
        Ok(())
    }
}
