//! What a [`check`](super::check) reports: the [`CheckReport`] and its parts (each piece of
//! [`Damage`] and its [`DamageKind`], [`Orphan`] packs, [`AffectedSnapshot`]s and their
//! ranges), and the [`Findings`] its stages add damage to. The JSON names of every field and
//! kind are part of the CLI's `--json` output (`docs/json.md`) and do not change.

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{ChunkId, SnapshotId};
use crate::verify::deltas::OrphanDelta;
use crate::verify::MAX_LISTED_DAMAGE;

use super::{Leftover, ReadDataKind};

/// What [`check`](super::check) found damaged; the JSON name is the kebab-case variant
/// (`pack-missing`).
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

/// One piece of damage found by [`check`](super::check).
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
    pub snapshot_id: SnapshotId,
    pub disk: Option<String>,
    pub time: Option<String>,
    /// The manifest itself is damaged: nothing of this snapshot can be restored.
    pub whole_snapshot: bool,
    pub damaged_bytes: u64,
    pub range_count: u64,
    /// The first [`MAX_LISTED_AFFECTED`](crate::verify::MAX_LISTED_AFFECTED) damaged ranges of
    /// the disk.
    pub ranges: Vec<AffectedRange>,
}

/// The outcome of [`check`](super::check) (`--json` serialises this).
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

/// The damage a check has found so far, shared by its stages in the order they run (which is
/// the order of the report): every piece counted, the first [`MAX_LISTED_DAMAGE`] kept, and
/// the damaged chunks and manifests remembered for mapping to snapshots at the end.
#[derive(Default)]
pub(in crate::verify) struct Findings {
    pub(super) damage_count: u64,
    pub(super) damage: Vec<Damage>,
    pub(super) damaged_chunks: HashSet<ChunkId>,
    pub(super) damaged_manifests: BTreeSet<SnapshotId>,
}

impl Findings {
    /// Records `e` as damage of `kind`, placed where a [`Error::Corrupt`] says (else at the
    /// pack, when there is one).
    pub(super) fn add(
        &mut self,
        kind: DamageKind,
        pack: Option<&str>,
        chunk: Option<&ChunkId>,
        e: &Error,
    ) {
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

    /// Records one piece of damage.
    pub(in crate::verify) fn push(&mut self, d: Damage) {
        self.damage_count += 1;
        if self.damage.len() < MAX_LISTED_DAMAGE {
            self.damage.push(d);
        }
    }
}
