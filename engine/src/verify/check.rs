//! [`check`]: the repository's structure (manifests, index, pack footers and tables, index
//! deltas, verification and VM snapshot records), and
//! optionally every stored chunk or a subset of packs read back; orphan packs listed; every
//! piece of damage mapped to the snapshots and disk byte ranges it affects. Also
//! [`leftovers`]: what interrupted or crashed runs left behind (temporary objects, stale
//! locks), which is not damage and which `prune` removes. Nothing here writes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use rusqlite::params;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::manifest::Extent;
use crate::format::pack::{
    chunk_in_frame, decode_footer, decode_frame_header, decode_frame_into, decode_frame_list,
    decode_header, decode_table, frames, open_sealed_frame_in_place, unpack_opened_frame,
    RecordLocation, FRAME_HEADER_LEN, PACK_FOOTER_LEN, PACK_HEADER_LEN, PACK_VERSION_SEALED,
    PACK_VERSION_V1,
};
use crate::format::ChunkId;
use crate::index::{sql_err, PackRow, SnapshotSummary};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::pack::read_pack_table;
use crate::store::pack_key;

use super::deltas::OrphanDelta;
use super::{MAX_LISTED_AFFECTED, MAX_LISTED_DAMAGE};

/// Which stored chunks `check` reads back.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ReadData {
    /// Structure only.
    #[default]
    None,
    /// Every pack.
    All,
    /// Part of the packs; see [`Subset`].
    Subset(Subset),
}

/// Which stored chunks a `check` read back, as reported (`none`, `all`, `subset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadDataKind {
    None,
    All,
    Subset,
}

/// A part of the packs to scrub, so that a large repository can be read over several runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Subset {
    /// `N/M`: the N-th of M slices of the packs in name order (deterministic: running 1/M to
    /// M/M reads every pack once).
    Slice { n: u64, of: u64 },
    /// `P%`: a random choice of that share of the packs.
    Percent(f64),
    /// `2GiB`: a random choice of packs adding up to at least that many bytes.
    Bytes(u64),
}

impl std::fmt::Display for Subset {
    /// The form `parse` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::Slice { n, of } => write!(f, "{n}/{of}"),
            Subset::Percent(p) => write!(f, "{p}%"),
            Subset::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl Subset {
    /// Parses `1/5`, `10%`, `2GiB` (units B, K/KiB, M/MiB, G/GiB, T/TiB; binary).
    pub fn parse(s: &str) -> Result<Subset> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "read-data subset {s:?}: {why} (expected N/M, P% or a size like 2GiB)"
            ))
        };
        let s = s.trim();
        if let Some((n, of)) = s.split_once('/') {
            let n: u64 = n.trim().parse().map_err(|_| bad("bad N"))?;
            let of: u64 = of.trim().parse().map_err(|_| bad("bad M"))?;
            if n == 0 || of == 0 || n > of {
                return Err(bad("need 1 <= N <= M"));
            }
            return Ok(Subset::Slice { n, of });
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad("bad percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("percentage must be above 0 and at most 100"));
            }
            return Ok(Subset::Percent(p));
        }
        let digits = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(digits);
        let num: f64 = num.parse().map_err(|_| bad("bad size"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => 1 << 10,
            "m" | "mib" | "mb" => 1 << 20,
            "g" | "gib" | "gb" => 1 << 30,
            "t" | "tib" | "tb" => 1 << 40,
            _ => return Err(bad("unknown unit")),
        };
        let bytes = num * mult as f64;
        if !(1.0..1e19).contains(&bytes) {
            return Err(bad("size out of range"));
        }
        Ok(Subset::Bytes(bytes as u64))
    }
}

/// Options of [`check`].
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    pub read_data: ReadData,
    /// Age after which orphans (packs no snapshot needs, deltas without a pack) are a
    /// warning rather than a run in flight; `None`: prune's default grace period.
    pub grace: Option<std::time::Duration>,
}

/// What [`check`] found damaged; the JSON name is the kebab-case variant (`pack-missing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DamageKind {
    /// The SQLite index failed its integrity check.
    Index,
    /// A snapshot manifest is unreadable or damaged.
    Manifest,
    /// A chunk a snapshot needs is in no pack the index knows.
    MissingChunk,
    /// A pack the index lists is not in the store.
    PackMissing,
    /// A pack's stored size differs from the index's.
    PackSize,
    /// A pack's header or table is damaged.
    PackStructure,
    /// A pack's table and the index disagree about a chunk.
    IndexMismatch,
    /// A chunk's bytes do not hash to its id (`--read-data`).
    ChunkData,
    /// An index delta fails authentication or decoding (readers use its pack's table).
    IndexDelta,
    /// A verification record fails authentication or decoding.
    VerificationRecord,
    /// A VM snapshot record fails authentication, its checksum or decoding.
    VmRecord,
    /// A pack a snapshot needs has no index delta (a remote repository: other hosts cannot
    /// learn it).
    DeltaMissing,
    /// An index delta is damaged or disagrees with its pack's size, version or table.
    DeltaMismatch,
}

impl DamageKind {
    /// The name used in JSON and in the text report.
    pub fn as_str(self) -> &'static str {
        match self {
            DamageKind::Index => "index",
            DamageKind::Manifest => "manifest",
            DamageKind::MissingChunk => "missing-chunk",
            DamageKind::PackMissing => "pack-missing",
            DamageKind::PackSize => "pack-size",
            DamageKind::PackStructure => "pack-structure",
            DamageKind::IndexMismatch => "index-mismatch",
            DamageKind::ChunkData => "chunk-data",
            DamageKind::IndexDelta => "index-delta",
            DamageKind::VerificationRecord => "verification-record",
            DamageKind::VmRecord => "vm-record",
            DamageKind::DeltaMissing => "delta-missing",
            DamageKind::DeltaMismatch => "delta-mismatch",
        }
    }
}

impl std::fmt::Display for DamageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// One piece of damage found by [`check`].
#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    pub kind: DamageKind,
    /// File, pack or snapshot where it was found.
    pub location: String,
    pub pack: Option<String>,
    /// Byte offset in the pack or file, when known.
    pub offset: Option<u64>,
    pub chunk: Option<String>,
    pub what: String,
}

/// A pack that no snapshot needs (left by an interrupted backup; collected by a later prune).
#[derive(Clone, Debug, Serialize)]
pub struct Orphan {
    pub pack: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub why: String,
}

/// A range of a snapshot's disk that cannot be restored because of damage.
#[derive(Clone, Debug, Serialize)]
pub struct AffectedRange {
    pub offset: u64,
    #[serde(rename = "length")]
    pub len: u64,
    pub chunk: String,
}

/// A snapshot that damage makes unrestorable, in whole or in part.
#[derive(Clone, Debug, Serialize)]
pub struct AffectedSnapshot {
    pub snapshot_id: String,
    pub disk: Option<String>,
    pub time: Option<String>,
    /// The manifest itself is damaged: nothing of this snapshot can be restored.
    pub whole_snapshot: bool,
    pub damaged_bytes: u64,
    pub range_count: u64,
    /// The first [`MAX_LISTED_AFFECTED`] damaged ranges of the disk.
    pub ranges: Vec<AffectedRange>,
}

/// The outcome of [`check`] (`--json` serialises this).
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// No damage (orphans are not damage).
    pub ok: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub chunks: u64,
    /// `none`, `all` or `subset`.
    pub read_data: ReadDataKind,
    /// The subset asked for, as typed (`10%`, `1/5`, `2147483648` bytes); `null` unless
    /// `read_data` is `subset`.
    pub read_data_subset: Option<String>,
    pub packs_read: u64,
    pub chunks_read: u64,
    #[serde(rename = "read_bytes")]
    pub bytes_read: u64,
    pub damage_count: u64,
    /// The first [`MAX_LISTED_DAMAGE`] pieces of damage.
    pub damage: Vec<Damage>,
    pub orphans: Vec<Orphan>,
    /// Index deltas in the store.
    pub deltas: u64,
    /// Index deltas whose pack is not in the store (not damage; see `verify::deltas`).
    pub orphan_deltas: Vec<OrphanDelta>,
    /// Not damage, but worth acting on: orphans older than the grace period, packs without
    /// deltas in a local repository.
    pub warnings: Vec<String>,
    /// What interrupted or crashed runs left behind (not damage; `prune` removes it).
    pub leftovers: Vec<Leftover>,
    pub affected: Vec<AffectedSnapshot>,
    pub duration_ms: u64,
}

impl CheckReport {
    /// The run's verdict as a result: `Ok` when the repository is sound, else
    /// [`Error::Corrupt`] at the first piece of damage (exit code 3: the repository is
    /// damaged). The report lists every piece.
    pub fn verdict(&self) -> Result<()> {
        match self.damage.first() {
            None => Ok(()),
            Some(d) => Err(Error::corrupt(
                &d.location,
                d.offset.unwrap_or(0),
                format!(
                    "check found {} problems (listed above); the first: {}",
                    self.damage_count, d.what
                ),
            )),
        }
    }
}

#[derive(Default)]
pub(super) struct Findings {
    damage_count: u64,
    damage: Vec<Damage>,
    damaged_chunks: HashSet<ChunkId>,
    damaged_manifests: BTreeSet<String>,
}

impl Findings {
    fn add(&mut self, kind: DamageKind, pack: Option<&str>, chunk: Option<&ChunkId>, e: &Error) {
        let (location, offset, what) = match e {
            Error::Corrupt {
                location,
                offset,
                what,
            } => (location.clone(), Some(*offset), what.clone()),
            other => (
                pack.map(|p| format!("pack {p}")).unwrap_or_default(),
                None,
                other.to_string(),
            ),
        };
        self.push(Damage {
            kind,
            location,
            pack: pack.map(str::to_string),
            offset,
            chunk: chunk.map(ChunkId::to_hex),
            what,
        });
    }

    pub(super) fn push(&mut self, d: Damage) {
        self.damage_count += 1;
        if self.damage.len() < MAX_LISTED_DAMAGE {
            self.damage.push(d);
        }
    }
}

/// Checks the repository; see the module doc. Damage is reported in the result (`ok` false);
/// an `Err` means the check could not run.
pub fn check(repo: &Repo, options: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
    let started = Instant::now();
    let backend = repo.backend();
    let mut f = Findings::default();
    let index_location = repo.index().path().display().to_string();
    for problem in repo.index().integrity_problems()? {
        f.push(Damage {
            kind: DamageKind::Index,
            location: index_location.clone(),
            pack: None,
            offset: None,
            chunk: None,
            what: format!("{problem} (rebuild the index with `stackvault index rebuild`)"),
        });
    }

    // Manifests: every one readable, every chunk it names indexed.
    let mut ids: BTreeSet<String> = backend
        .list("snapshots/")?
        .into_iter()
        .filter_map(|k| k.strip_prefix("snapshots/").map(str::to_owned))
        .collect();
    ids.extend(repo.index().snapshot_ids()?);
    let mut snapshots = 0;
    // The chunks the manifests reference go to a temporary table, which SQLite spills to
    // disk, not to a set in memory: a repository of a hundred million chunks must check too.
    let referenced_packs: HashSet<i64> = {
        let mut index = repo.index();
        let path = index.path().to_path_buf();
        let err = sql_err(&path);
        let conn = index.conn_mut();
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS check_refs (id BLOB PRIMARY KEY, \
                 snapshot TEXT NOT NULL) WITHOUT ROWID;
             DELETE FROM temp.check_refs;",
        )
        .map_err(&err)?;
        for id in &ids {
            let tx = conn.transaction().map_err(&err)?;
            // Errors that say damage can only come from the manifest here.
            let scanned = (|| -> Result<()> {
                let manifest = repo.load_manifest(id)?;
                snapshots += 1;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO temp.check_refs (id, snapshot) VALUES (?1, ?2)",
                    )
                    .map_err(&err)?;
                for extents in manifest.segments() {
                    for e in extents? {
                        if let Extent::Chunk { id: chunk, .. } = e {
                            insert.execute(params![&chunk.0[..], id]).map_err(&err)?;
                        }
                    }
                }
                Ok(())
            })();
            tx.commit().map_err(&err)?;
            match scanned {
                Ok(()) => {}
                Err(e) if e.is_corruption() => {
                    f.add(DamageKind::Manifest, None, None, &e);
                    f.damaged_manifests.insert(id.clone());
                }
                Err(e) => return Err(e),
            }
        }
        // Referenced chunks the index does not know, named with a snapshot that needs them.
        let mut missing = conn
            .prepare(
                "SELECT r.id, r.snapshot FROM temp.check_refs r \
                 WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = r.id)",
            )
            .map_err(&err)?;
        let mut rows = missing.query([]).map_err(&err)?;
        let mut lost: Vec<(ChunkId, String)> = Vec::new();
        while let Some(row) = rows.next().map_err(&err)? {
            let chunk: Vec<u8> = row.get(0).map_err(&err)?;
            let snapshot: String = row.get(1).map_err(&err)?;
            if let Ok(chunk) = <[u8; 32]>::try_from(chunk.as_slice()).map(ChunkId) {
                lost.push((chunk, snapshot));
            }
        }
        report_lost_chunks(repo, lost, &mut f)?;
        drop(rows);
        drop(missing);
        // Packs the index takes a referenced chunk from: the others are orphans.
        let mut packs = conn
            .prepare("SELECT DISTINCT c.pack FROM temp.check_refs r JOIN chunks c ON c.id = r.id")
            .map_err(&err)?;
        let keys = packs
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(&err)?
            .collect::<rusqlite::Result<HashSet<i64>>>()
            .map_err(&err)?;
        keys
    };

    // Packs: the index against the files and their own tables.
    let listed: HashMap<String, String> = backend
        .list("packs/")?
        .into_iter()
        .filter_map(|k| Some((k.rsplit('/').next()?.to_string(), k)))
        .collect();
    let packs_found = {
        let index = repo.index();
        let rows = index.packs()?;
        let mut pc = PackChecker {
            repo,
            index_location: index_location.clone(),
            listed: &listed,
            referenced_packs: &referenced_packs,
            rows: rows.iter().map(|r| (r.key, r)).collect(),
            seen: HashSet::new(),
            current: None,
            entries: Vec::new(),
            valid: Vec::new(),
            orphans: Vec::new(),
            chunks: 0,
        };
        index.scan_chunks_by_pack(|pack, loc| {
            pc.chunks += 1;
            if pc.current != Some(pack) {
                pc.flush(&mut f)?;
                pc.current = Some(pack);
            }
            pc.entries.push(loc);
            Ok(())
        })?;
        pc.flush(&mut f)?;
        for row in &rows {
            if !pc.seen.contains(&row.key) {
                pc.current = Some(row.key);
                pc.flush(&mut f)?;
            }
        }
        let indexed: HashSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let mut orphans = std::mem::take(&mut pc.orphans);
        let mut unindexed: Vec<(&String, &String)> = listed
            .iter()
            .filter(|(name, _)| !indexed.contains(name.as_str()))
            .collect();
        unindexed.sort();
        for (name, key) in unindexed {
            let why = match read_pack_table(backend, repo.protection(), name) {
                Ok(t) => format!("not in the index ({} chunks)", t.entries.len()),
                Err(e) => format!("not in the index, and unreadable: {e}"),
            };
            orphans.push(Orphan {
                pack: name.clone(),
                size: backend.size(key).unwrap_or(0),
                why,
            });
        }
        let valid = std::mem::take(&mut pc.valid);
        let chunks = pc.chunks;
        drop(pc);
        let referenced: HashSet<String> = rows
            .iter()
            .filter(|r| referenced_packs.contains(&r.key))
            .map(|r| r.name.clone())
            .collect();
        (valid, orphans, chunks, rows.len() as u64, referenced)
    };
    let (mut valid, orphans, chunks, packs, referenced) = packs_found;
    let grace = options
        .grace
        .unwrap_or(crate::maintain::prune::DEFAULT_GRACE);
    let deltas = super::deltas::compare(repo, &referenced, grace, &mut f)?;

    // Records: deltas, verification and VM snapshot records authenticate and decode.
    for (kind, e) in super::records::damaged_records(repo)? {
        f.add(kind, None, None, &e);
    }

    // Data: crc32 first, then decompression and BLAKE3, pack by pack in parallel.
    valid.sort();
    let selected = select(valid, &options.read_data)?;
    let total: u64 = selected.iter().map(|(_, size)| size).sum();
    progress.start("check", total);
    let scrubbed: Vec<Result<Scrubbed>> = selected
        .par_iter()
        .map(|(name, size)| {
            // Reading only: an interrupted check has nothing to clean up.
            crate::progress::checkpoint(progress, "check-pack")
                .map_err(|_| Error::Cancelled("check stopped before the end".into()))?;
            let r = scrub_pack(repo, name);
            progress.advance(*size);
            r
        })
        .collect();
    progress.finish();
    let (mut chunks_read, mut bytes_read) = (0, 0);
    for r in scrubbed {
        let (c, b, damage) = r?;
        chunks_read += c;
        bytes_read += b;
        for (d, id) in damage {
            f.damaged_chunks.extend(id);
            f.push(d);
        }
    }

    let affected = affected_snapshots(repo, &ids, &f)?;
    let leftovers = leftovers(repo)?;
    Ok(CheckReport {
        ok: f.damage_count == 0,
        snapshots,
        packs,
        chunks,
        read_data: match &options.read_data {
            ReadData::None => ReadDataKind::None,
            ReadData::All => ReadDataKind::All,
            ReadData::Subset(_) => ReadDataKind::Subset,
        },
        read_data_subset: match &options.read_data {
            ReadData::Subset(s) => Some(s.to_string()),
            _ => None,
        },
        packs_read: selected.len() as u64,
        chunks_read,
        bytes_read,
        damage_count: f.damage_count,
        damage: f.damage,
        orphans,
        deltas: deltas.deltas,
        orphan_deltas: deltas.orphan_deltas,
        warnings: deltas.warnings,
        leftovers,
        affected,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Reports chunks snapshots need that the index does not know. On a remote repository, one
/// `pack-missing` per pack that held some of them and is gone from the store while its delta
/// remains (deleted behind the repository's back: the index sync learns nothing from such a
/// delta), naming the pack; a `missing-chunk` for each other one. A local repository's index
/// is its own record (no sync), so there each is a `missing-chunk`, as ever.
fn report_lost_chunks(repo: &Repo, lost: Vec<(ChunkId, String)>, f: &mut Findings) -> Result<()> {
    if lost.is_empty() {
        return Ok(());
    }
    let gone = if repo.is_remote() {
        crate::index::delta::gone_packs(repo.backend(), repo.protection())?
    } else {
        Vec::new()
    };
    // pack name -> (chunks of it snapshots need, a snapshot needing one)
    let mut by_pack: std::collections::BTreeMap<&str, (u64, &str)> = Default::default();
    for (chunk, snapshot) in &lost {
        f.damaged_chunks.insert(*chunk);
        if let Some((pack, _)) = gone.iter().find(|(_, ids)| ids.contains(chunk)) {
            let entry = by_pack
                .entry(pack.as_str())
                .or_insert((0, snapshot.as_str()));
            entry.0 += 1;
            continue;
        }
        let err = Error::MissingChunk {
            id: chunk.to_hex(),
            snapshot: snapshot.clone(),
        };
        f.push(Damage {
            kind: DamageKind::MissingChunk,
            location: format!("snapshots/{snapshot}"),
            pack: None,
            offset: None,
            chunk: Some(chunk.to_hex()),
            what: err.to_string(),
        });
    }
    for (pack, (chunks, snapshot)) in by_pack {
        f.push(Damage {
            kind: DamageKind::PackMissing,
            location: format!("pack {pack}"),
            pack: Some(pack.to_string()),
            offset: None,
            chunk: None,
            what: format!(
                "pack {pack} is not in the store, but its index delta remains: {chunks} chunks \
                 that snapshots need (snapshot {snapshot} among them) were in it"
            ),
        });
    }
    Ok(())
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

/// Walks the index's chunk rows pack by pack and compares each pack with them.
struct PackChecker<'a> {
    repo: &'a Repo,
    /// The index connection is held by the scan: never call `repo.index()` from here.
    index_location: String,
    listed: &'a HashMap<String, String>,
    /// Packs holding a chunk some snapshot references (as the index places it).
    referenced_packs: &'a HashSet<i64>,
    rows: HashMap<i64, &'a PackRow>,
    seen: HashSet<i64>,
    current: Option<i64>,
    entries: Vec<crate::format::pack::RecordLocation>,
    /// Packs whose structure is sound: (name, size), for the data phase.
    valid: Vec<(String, u64)>,
    orphans: Vec<Orphan>,
    chunks: u64,
}

impl PackChecker<'_> {
    fn flush(&mut self, f: &mut Findings) -> Result<()> {
        let Some(key) = self.current.take() else {
            return Ok(());
        };
        self.seen.insert(key);
        let entries = std::mem::take(&mut self.entries);
        let Some(row) = self.rows.get(&key).copied() else {
            f.push(Damage {
                kind: DamageKind::Index,
                location: self.index_location.clone(),
                pack: None,
                offset: None,
                chunk: None,
                what: format!(
                    "{} chunk rows point at pack key {key}, which the index does not list \
                     (rebuild the index)",
                    entries.len()
                ),
            });
            f.damaged_chunks.extend(entries.iter().map(|e| e.id));
            return Ok(());
        };
        let name = row.name.as_str();
        let location = format!("pack {name}");
        let Some(obj) = self.listed.get(name) else {
            f.push(Damage {
                kind: DamageKind::PackMissing,
                location,
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: format!(
                    "the pack file is missing; the index places {} chunks in it",
                    entries.len()
                ),
            });
            f.damaged_chunks.extend(entries.iter().map(|e| e.id));
            return Ok(());
        };
        let backend = self.repo.backend();
        let size = backend.size(obj)?;
        if size != row.size {
            f.push(Damage {
                kind: DamageKind::PackSize,
                location: location.clone(),
                pack: Some(name.into()),
                offset: Some(size.min(row.size)),
                chunk: None,
                what: format!(
                    "the pack is {size} bytes, the index recorded {} (truncated or altered)",
                    row.size
                ),
            });
        }
        let table = match read_pack_table(backend, self.repo.protection(), name) {
            Ok(t) => t.entries,
            Err(e) if e.is_corruption() => {
                f.add(DamageKind::PackStructure, Some(name), None, &e);
                f.damaged_chunks.extend(entries.iter().map(|e| e.id));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut sound = size == row.size;
        if table.len() as u64 != row.chunk_count {
            sound = false;
            f.push(Damage {
                kind: DamageKind::IndexMismatch,
                location: location.clone(),
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: format!(
                    "the pack table lists {} chunks, the index recorded {}",
                    table.len(),
                    row.chunk_count
                ),
            });
        }
        let by_place: HashMap<(u64, u32), &crate::format::pack::PackEntry> =
            table.iter().map(|e| ((e.offset, e.in_frame), e)).collect();
        for e in &entries {
            let agrees = by_place.get(&(e.offset, e.in_frame)).is_some_and(|t| {
                t.id == e.id
                    && t.raw_len == e.raw_len
                    && t.stored_len == e.stored_len
                    && t.frame_raw_len == e.frame_raw_len
            });
            if !agrees {
                sound = false;
                f.push(Damage {
                    kind: DamageKind::IndexMismatch,
                    location: location.clone(),
                    pack: Some(name.into()),
                    offset: Some(e.offset),
                    chunk: Some(e.id.to_hex()),
                    what: "the index places this chunk here, the pack table disagrees \
                           (rebuild the index)"
                        .into(),
                });
                f.damaged_chunks.insert(e.id);
            }
        }
        if !self.referenced_packs.contains(&key) {
            self.orphans.push(Orphan {
                pack: name.into(),
                size,
                why: if entries.is_empty() {
                    "the index takes none of its chunks from it".into()
                } else {
                    format!(
                        "none of its {} indexed chunks is used by a snapshot",
                        entries.len()
                    )
                },
            });
        }
        if sound {
            self.valid.push((name.to_string(), size));
        }
        Ok(())
    }
}

/// Reads a whole pack and checks every frame: crc32 of the stored bytes first (cheap), then
/// its chunk list, decompression (once per frame) and the BLAKE3 id of every chunk.
fn scrub_pack(repo: &Repo, name: &str) -> Result<Scrubbed> {
    let location = format!("pack {name}");
    let keys = repo.protection();
    let mut bytes = repo.backend().get(&pack_key(name))?;
    let len = bytes.len() as u64;
    let mut damage = Vec::new();
    let table = bytes
        .len()
        .checked_sub(PACK_FOOTER_LEN)
        .ok_or_else(|| Error::corrupt(&location, 0, "pack shorter than its footer"))
        .and_then(|at| {
            let version = decode_header(bytes.get(..PACK_HEADER_LEN).unwrap_or(&[]), &location)?;
            let footer = decode_footer(&bytes[at..], len, &location)?;
            if footer.version != version {
                return Err(Error::corrupt(
                    &location,
                    at as u64,
                    "footer and header versions differ",
                ));
            }
            let start = footer.table_offset as usize;
            decode_table(&bytes[start..at], &footer, keys, name, &location).map(|t| (version, t))
        });
    let (version, table) = match table {
        Ok(t) => t,
        // The pack changed since the structure phase read it.
        Err(e) => {
            let d = Damage {
                kind: DamageKind::PackStructure,
                location: location.clone(),
                pack: Some(name.into()),
                offset: None,
                chunk: None,
                what: e.to_string(),
            };
            return Ok((0, len, vec![(d, None)]));
        }
    };
    let chunk_damage = |err: &Error, e: &crate::format::pack::PackEntry| {
        let offset = match err {
            Error::Corrupt { offset, .. } => *offset,
            _ => e.offset,
        };
        (
            Damage {
                kind: DamageKind::ChunkData,
                location: location.clone(),
                pack: Some(name.into()),
                offset: Some(offset),
                chunk: Some(e.id.to_hex()),
                what: err.to_string(),
            },
            Some(e.id),
        )
    };
    // Each frame is decompressed into the same buffer; chunks are checked where they lie.
    let mut raw = Vec::new();
    for frame in frames(&table) {
        let first = frame[0].location(version);
        let start = first.offset as usize;
        let end = start.saturating_add(first.read_len() as usize);
        let decoded = if version == PACK_VERSION_SEALED {
            // Opened once, where it lies in the pack's bytes (this pass owns them).
            match bytes.get_mut(start..end) {
                Some(record) => {
                    scrub_sealed_frame(record, frame, &first, keys, name, &location, &mut raw)
                }
                None => Err(outside(&location, first.offset)),
            }
        } else {
            match bytes.get(start..end) {
                Some(record) => {
                    check_frame_list(&bytes, version, frame, &location).and_then(|()| {
                        decode_frame_into(record, &first, keys, name, &location, &mut raw)
                    })
                }
                None => Err(outside(&location, first.offset)),
            }
        };
        match decoded {
            Ok(()) => {
                for e in frame {
                    if let Err(err) = chunk_in_frame(&raw, &e.location(version), keys, &location) {
                        damage.push(chunk_damage(&err, e));
                    }
                }
            }
            // Damage of the frame is damage of every chunk in it.
            Err(err) => damage.extend(frame.iter().map(|e| chunk_damage(&err, e))),
        }
    }
    Ok((table.len() as u64, len, damage))
}

/// A frame the pack's table places past the pack's end (decode_table refuses such tables, so
/// only a pack that changed under the check gets here).
fn outside(location: &str, offset: u64) -> Error {
    Error::corrupt(location, offset, "frame lies past the end of the pack")
}

/// A sealed frame, opened once where it lies: its chunk list (inside the seal) checked
/// against the table's entries of the frame, then its stored bytes decompressed into `raw`.
fn scrub_sealed_frame(
    record: &mut [u8],
    frame: &[crate::format::pack::PackEntry],
    first: &RecordLocation,
    protection: &crate::crypto::Protection,
    pack: &str,
    location: &str,
    raw: &mut Vec<u8>,
) -> Result<()> {
    let (plain, header) =
        open_sealed_frame_in_place(protection, pack, first.offset, record, location)?;
    if header.chunk_count as usize != frame.len() {
        return Err(Error::corrupt(
            location,
            first.offset,
            "frame header disagrees with the pack table",
        ));
    }
    // open_sealed_frame_in_place checked that the record is header, stored bytes and list.
    let list = plain
        .get(FRAME_HEADER_LEN + header.stored_len as usize..)
        .unwrap_or_default();
    let list = decode_frame_list(list, &header, first.offset, location)?;
    same_chunks(&list, frame, first.offset, location)?;
    unpack_opened_frame(plain, &header, first, location, raw)
}

/// Checks that a plain version 2 frame's own chunk list (after its stored bytes) agrees with
/// the table entries of the frame.
fn check_frame_list(
    bytes: &[u8],
    version: u32,
    frame: &[crate::format::pack::PackEntry],
    location: &str,
) -> Result<()> {
    if version == PACK_VERSION_V1 {
        return Ok(());
    }
    let first = &frame[0];
    let start = first.offset as usize;
    let header = decode_frame_header(
        bytes
            .get(start..start + FRAME_HEADER_LEN)
            .ok_or_else(|| outside(location, first.offset))?,
        first.offset,
        location,
    )?;
    let list_at = start + FRAME_HEADER_LEN + header.stored_len as usize;
    let list_len = frame.len() * crate::format::pack::FRAME_LIST_ENTRY_LEN;
    let list = bytes
        .get(list_at..list_at + list_len)
        .ok_or_else(|| Error::corrupt(location, list_at as u64, "frame list truncated"))?;
    if header.chunk_count as usize != frame.len() || header.stored_len != first.stored_len {
        return Err(Error::corrupt(
            location,
            first.offset,
            "frame header disagrees with the pack table",
        ));
    }
    let list = decode_frame_list(list, &header, list_at as u64, location)?;
    same_chunks(&list, frame, list_at as u64, location)
}

/// Checks that a frame's chunk list names the table's chunks of the frame.
fn same_chunks(
    list: &[(ChunkId, u32)],
    frame: &[crate::format::pack::PackEntry],
    list_at: u64,
    location: &str,
) -> Result<()> {
    if list
        .iter()
        .zip(frame)
        .any(|((id, len), e)| *id != e.id || *len != e.raw_len)
    {
        return Err(Error::corrupt(
            location,
            list_at,
            "frame chunk list disagrees with the pack table",
        ));
    }
    Ok(())
}

/// What reading one pack found: chunks read, bytes read, damage (with the damaged chunk).
type Scrubbed = (u64, u64, Vec<(Damage, Option<ChunkId>)>);

/// Picks the packs to read back.
fn select(packs: Vec<(String, u64)>, read: &ReadData) -> Result<Vec<(String, u64)>> {
    let subset = match read {
        ReadData::None => return Ok(Vec::new()),
        ReadData::All => return Ok(packs),
        ReadData::Subset(s) => s,
    };
    let count = packs.len() as u128;
    let mut chosen = match *subset {
        Subset::Slice { n, of } => packs
            .into_iter()
            .enumerate()
            .filter(|(j, _)| (*j as u128 * u128::from(of) / count.max(1)) as u64 + 1 == n)
            .map(|(_, p)| p)
            .collect(),
        Subset::Percent(p) => {
            let want = ((count as f64) * p / 100.0).ceil() as usize;
            let mut packs = shuffled(packs)?;
            packs.truncate(want);
            packs
        }
        Subset::Bytes(limit) => {
            let mut total = 0;
            shuffled(packs)?
                .into_iter()
                .take_while(|(_, size)| {
                    let take = total < limit;
                    total += size;
                    take
                })
                .collect()
        }
    };
    chosen.sort();
    Ok(chosen)
}

/// A random permutation (Fisher-Yates with a splitmix64 stream seeded by the OS).
fn shuffled<T>(mut items: Vec<T>) -> Result<Vec<T>> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| {
        Error::io(
            "draw a random seed",
            "/dev/urandom",
            std::io::Error::other(e.to_string()),
        )
    })?;
    let mut state = u64::from_le_bytes(seed);
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
    Ok(items)
}

/// Maps damaged chunks and manifests to the snapshots and disk ranges they make unrestorable.
fn affected_snapshots(
    repo: &Repo,
    ids: &BTreeSet<String>,
    f: &Findings,
) -> Result<Vec<AffectedSnapshot>> {
    if f.damaged_chunks.is_empty() && f.damaged_manifests.is_empty() {
        return Ok(Vec::new());
    }
    let catalogue: HashMap<String, SnapshotSummary> = repo
        .snapshots(None)?
        .into_iter()
        .map(|s| (s.id.to_string(), s))
        .collect();
    let mut out = Vec::new();
    for id in ids {
        if f.damaged_manifests.contains(id) {
            let known = catalogue.get(id);
            out.push(AffectedSnapshot {
                snapshot_id: id.clone(),
                disk: known.map(|s| s.meta.disk.clone()),
                time: known.map(|s| s.meta.time.clone()),
                whole_snapshot: true,
                damaged_bytes: known.map(|s| s.virtual_size).unwrap_or(0),
                range_count: 0,
                ranges: Vec::new(),
            });
            continue;
        }
        if f.damaged_chunks.is_empty() {
            continue;
        }
        let manifest = repo.load_manifest(id)?;
        let seg = u64::from(manifest.segment_size);
        let mut a = AffectedSnapshot {
            snapshot_id: id.clone(),
            disk: Some(manifest.meta.disk.clone()),
            time: Some(manifest.meta.time.clone()),
            whole_snapshot: false,
            damaged_bytes: 0,
            range_count: 0,
            ranges: Vec::new(),
        };
        for (i, extents) in manifest.segments().enumerate() {
            let mut offset = i as u64 * seg;
            for e in extents? {
                if let Extent::Chunk { id: chunk, len } = e {
                    if f.damaged_chunks.contains(&chunk) {
                        a.damaged_bytes += u64::from(len);
                        a.range_count += 1;
                        if a.ranges.len() < MAX_LISTED_AFFECTED {
                            a.ranges.push(AffectedRange {
                                offset,
                                len: u64::from(len),
                                chunk: chunk.to_hex(),
                            });
                        }
                    }
                }
                offset += u64::from(e.len());
            }
        }
        if a.range_count > 0 {
            out.push(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_parsing() {
        assert_eq!(
            Subset::parse("1/5").ok(),
            Some(Subset::Slice { n: 1, of: 5 })
        );
        assert_eq!(Subset::parse("10%").ok(), Some(Subset::Percent(10.0)));
        assert_eq!(Subset::parse("2GiB").ok(), Some(Subset::Bytes(2 << 30)));
        assert_eq!(Subset::parse("512M").ok(), Some(Subset::Bytes(512 << 20)));
        for bad in ["0/5", "6/5", "x/5", "0%", "101%", "2XB", "", "-1G"] {
            assert!(Subset::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn slices_cover_every_pack_once() -> Result<()> {
        let packs: Vec<(String, u64)> = (0..13).map(|i| (format!("{i:02}"), 10)).collect();
        let mut seen = Vec::new();
        for n in 1..=5 {
            let read = ReadData::Subset(Subset::Slice { n, of: 5 });
            seen.extend(select(packs.clone(), &read)?);
        }
        seen.sort();
        assert_eq!(seen, packs);
        let some = select(packs.clone(), &ReadData::Subset(Subset::Percent(30.0)))?;
        assert_eq!(some.len(), 4);
        let some = select(packs.clone(), &ReadData::Subset(Subset::Bytes(25)))?;
        assert_eq!(some.len(), 3);
        Ok(())
    }
}
