//! Snapshot manifests: the authoritative, immutable record of one backed-up disk.
//!
//! A manifest maps the whole virtual disk, segment by segment, to an ordered list of extents:
//! a chunk (id and length) or a zero run. Every snapshot is a complete map, so any snapshot
//! restores on its own. The manifest's name in the repository is the BLAKE3 of its bytes, so a
//! reader checks integrity by hashing what it read. The root digest in the metadata commits to
//! the disk's size, segmenting and every extent, and therefore to every byte of the disk.

use serde::{Deserialize, Serialize};

use super::{ChunkId, Reader};
use crate::error::{Error, Result};

/// Magic at offset 0 of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SVSNAP\0\x01";
/// The manifest format version this build writes and the newest it reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Fixed header: magic (8), version (4), meta length (4), virtual size (8), segment size (4),
/// reserved (4), segment count (8).
pub const MANIFEST_HEADER_LEN: usize = 40;
/// Largest metadata document accepted.
pub const MAX_META_LEN: u32 = 1024 * 1024;
/// Extent tag of a zero run.
pub const TAG_ZERO: u8 = 0;
/// Extent tag of a chunk.
pub const TAG_CHUNK: u8 = 1;
/// Domain separation prefix of the root digest.
pub const ROOT_DIGEST_DOMAIN: &[u8] = b"stackvault root digest v1\0";

/// One piece of a segment: a stored chunk or a run of zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    Zero { len: u32 },
    Chunk { id: ChunkId, len: u32 },
}

impl Extent {
    pub fn len(&self) -> u32 {
        match *self {
            Extent::Zero { len } | Extent::Chunk { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kind of a snapshot: which parent its reading was relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Full,
    Incremental,
    Differential,
}

impl SnapshotKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Incremental => "incremental",
            SnapshotKind::Differential => "differential",
        }
    }
}

/// Counters of one backup run, stored in the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of the virtual disk recorded as zero runs (read and found zero, or never read
    /// because the source knows they are unallocated).
    pub zero_bytes: u64,
    /// Bytes the source reported as unallocated and that were therefore never read.
    pub unallocated_bytes: u64,
    /// Bytes taken from the parent snapshot (or known cleared, or known zero) without reading,
    /// thanks to change knowledge: whole segments and the untouched parts of touched ones.
    #[serde(default)]
    pub skipped_bytes: u64,
    /// Chunks referenced by the snapshot.
    pub chunks: u64,
    /// Chunks that were not yet in the repository.
    pub new_chunks: u64,
    /// Uncompressed bytes of the new chunks.
    pub new_bytes: u64,
    /// Bytes added to the repository's packs (compressed data and pack structure).
    pub bytes_added: u64,
    /// Wall time of the backup, in milliseconds.
    pub duration_ms: u64,
}

/// Where a snapshot's data came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Path or (redacted) URL of the source.
    pub path: String,
    /// Detected container format: `raw`, `vhd-fixed`, `vhd-dynamic`, `vhd-differencing`.
    pub format: String,
    /// The VHD footer's metadata when the source was a VHD (see `format-spec/vhd.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhd: Option<VhdInfo>,
}

/// What a VHD source's footer (and dynamic header) said, kept so a restore can give the disk
/// back its identity and so operators can see where a snapshot came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdInfo {
    /// `fixed`, `dynamic` or `differencing`.
    pub disk_type: String,
    /// The footer's unique id, as a hyphenated UUID of its 16 bytes in file order.
    pub unique_id: String,
    /// Creator application, four characters (`win `, `qem2`, `vpc `...), non-printable
    /// bytes as `\xNN`.
    pub creator_application: String,
    /// Creator version as `major.minor` (the u32's high and low 16 bits).
    pub creator_version: String,
    /// Creator host OS (`Wi2k`, `Mac `), same escaping as the application.
    pub creator_host_os: String,
    /// The footer's current size: the virtual size of the disk, in bytes.
    pub current_size: u64,
    /// The footer's original size, in bytes.
    pub original_size: u64,
    pub geometry: VhdGeometry,
    /// Footer timestamp: seconds since 2000-01-01T00:00:00Z.
    pub timestamp: u32,
    /// The same instant as RFC 3339 UTC.
    pub time: String,
    /// Block size of a dynamic or differencing disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// For a differencing disk: its ancestors, nearest parent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<VhdParentInfo>,
    /// Tolerated irregularities (a wrong checksum, a missing footer copy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// CHS geometry as recorded in a VHD footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdGeometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

/// One ancestor of a differencing VHD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdParentInfo {
    /// The path it was opened from.
    pub path: String,
    pub unique_id: String,
    /// `fixed`, `dynamic` or `differencing`.
    pub disk_type: String,
}

/// The metadata document of a manifest (UTF-8 JSON). Readers ignore fields they do not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub disk: String,
    /// Time the backup started, RFC 3339 in UTC.
    pub time: String,
    pub kind: SnapshotKind,
    /// Id of the parent snapshot (informational: every snapshot is complete on its own).
    #[serde(default)]
    pub parent: Option<String>,
    pub hostname: String,
    pub source: SourceInfo,
    /// Where the knowledge of what changed came from (`full-read` when everything was read).
    pub change_source: String,
    /// The chunker that cut this snapshot, as described by the repository config.
    pub chunker: String,
    pub stats: BackupStats,
    /// Hex BLAKE3 root digest over the disk map; see [`root_digest`].
    pub root_digest: String,
    /// Version of stackvault that wrote the snapshot.
    pub tool_version: String,
}

/// A decoded manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub meta: SnapshotMeta,
    pub virtual_size: u64,
    pub segment_size: u32,
    /// One extent list per segment, in disk order.
    pub segments: Vec<Vec<Extent>>,
}

/// Number of segments of a disk.
pub fn segment_count(virtual_size: u64, segment_size: u32) -> u64 {
    virtual_size.div_ceil(u64::from(segment_size))
}

/// Length of segment `index` (the last one may be short).
pub fn segment_len(virtual_size: u64, segment_size: u32, index: u64) -> u32 {
    let start = index * u64::from(segment_size);
    (virtual_size - start).min(u64::from(segment_size)) as u32
}

/// Encodes the extents section.
pub fn encode_extents(segments: &[Vec<Extent>]) -> Vec<u8> {
    let n: usize = segments.iter().map(|s| 4 + s.len() * 37).sum();
    let mut out = Vec::with_capacity(n);
    for seg in segments {
        out.extend_from_slice(&(seg.len() as u32).to_le_bytes());
        for e in seg {
            match e {
                Extent::Zero { len } => {
                    out.push(TAG_ZERO);
                    out.extend_from_slice(&len.to_le_bytes());
                }
                Extent::Chunk { id, len } => {
                    out.push(TAG_CHUNK);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&id.0);
                }
            }
        }
    }
    out
}

/// The root digest: BLAKE3 of the domain prefix, virtual size (u64), segment size (u32) and
/// the encoded extents section. Two snapshots of the same disk bytes in one repository have
/// the same root digest, whichever way they were taken (full, incremental, any container).
pub fn root_digest(virtual_size: u64, segment_size: u32, extents_section: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DIGEST_DOMAIN);
    h.update(&virtual_size.to_le_bytes());
    h.update(&segment_size.to_le_bytes());
    h.update(extents_section);
    *h.finalize().as_bytes()
}

impl Manifest {
    /// Root digest of this manifest's disk map.
    pub fn compute_root_digest(&self) -> [u8; 32] {
        root_digest(
            self.virtual_size,
            self.segment_size,
            &encode_extents(&self.segments),
        )
    }

    /// Encodes the manifest. The caller sets `meta.root_digest` (see [`Manifest::seal`]).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode snapshot metadata: {e}")))?;
        if meta.len() > MAX_META_LEN as usize {
            return Err(Error::InvalidArgument(
                "snapshot metadata exceeds 1 MiB".into(),
            ));
        }
        let extents = encode_extents(&self.segments);
        let mut out = Vec::with_capacity(MANIFEST_HEADER_LEN + meta.len() + extents.len());
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.segments.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&extents);
        Ok(out)
    }

    /// Sets the root digest in the metadata from the extents.
    pub fn seal(&mut self) {
        self.meta.root_digest = super::hex(&self.compute_root_digest());
    }

    /// Decodes and validates a manifest: structure, extents summing to each segment's length,
    /// and the root digest in the metadata.
    pub fn decode(data: &[u8], location: &str) -> Result<Manifest> {
        let mut r = Reader::new(data, 0, location);
        if r.array::<8>("manifest magic")? != MANIFEST_MAGIC {
            return Err(Error::corrupt(
                location,
                0,
                "bad manifest magic: not a snapshot",
            ));
        }
        let version = r.u32("manifest version")?;
        if version == 0 || version > MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("snapshot {location}"),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let meta_len = r.u32("metadata length")?;
        let virtual_size = r.u64("virtual size")?;
        let segment_size = r.u32("segment size")?;
        r.u32("reserved")?;
        let count = r.u64("segment count")?;
        if !segment_size.is_power_of_two() || segment_size < 4096 {
            return Err(Error::corrupt(
                location,
                24,
                format!("segment size {segment_size} is not a power of two >= 4096"),
            ));
        }
        if count != segment_count(virtual_size, segment_size) {
            return Err(Error::corrupt(
                location,
                32,
                format!("segment count {count} does not match virtual size {virtual_size}"),
            ));
        }
        if meta_len > MAX_META_LEN {
            return Err(Error::corrupt(location, 12, "metadata length over 1 MiB"));
        }
        let meta_at = r.offset();
        let meta_bytes = r.bytes(meta_len as usize, "metadata")?;
        let meta: SnapshotMeta = serde_json::from_slice(meta_bytes)
            .map_err(|e| Error::corrupt(location, meta_at, format!("metadata: {e}")))?;
        let extents_at = r.offset() as usize;
        // Each segment needs at least 4 + 5 bytes: bound the allocation by what is there.
        let mut segments = Vec::with_capacity((count as usize).min(r.remaining() / 9));
        for index in 0..count {
            let seg_len = segment_len(virtual_size, segment_size, index);
            let n = r.u32("extent count")?;
            let mut extents = Vec::with_capacity((n as usize).min(r.remaining() / 5));
            let mut covered: u64 = 0;
            for _ in 0..n {
                let at = r.offset();
                let tag = r.u8("extent tag")?;
                let len = r.u32("extent length")?;
                let e = match tag {
                    TAG_ZERO => Extent::Zero { len },
                    TAG_CHUNK => Extent::Chunk {
                        id: r.chunk_id("chunk id")?,
                        len,
                    },
                    other => {
                        return Err(Error::corrupt(
                            location,
                            at,
                            format!("unknown extent tag {other}"),
                        ))
                    }
                };
                if len == 0 {
                    return Err(Error::corrupt(location, at, "empty extent"));
                }
                covered += u64::from(len);
                extents.push(e);
            }
            if covered != u64::from(seg_len) {
                return Err(r.corrupt(format!(
                    "segment {index} extents cover {covered} bytes, expected {seg_len}"
                )));
            }
            segments.push(extents);
        }
        if r.remaining() != 0 {
            return Err(r.corrupt("trailing bytes after the last segment"));
        }
        let digest = root_digest(virtual_size, segment_size, &data[extents_at..]);
        if super::hex(&digest) != meta.root_digest {
            return Err(Error::corrupt(
                location,
                meta_at,
                "root digest in the metadata does not match the extents",
            ));
        }
        Ok(Manifest {
            meta,
            virtual_size,
            segment_size,
            segments,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Metadata for unit tests of code that handles manifests.
    pub(crate) fn meta() -> SnapshotMeta {
        SnapshotMeta {
            disk: "web01-os".into(),
            time: "2026-11-25T00:00:00Z".into(),
            kind: SnapshotKind::Full,
            parent: None,
            hostname: "host".into(),
            source: SourceInfo {
                path: "disk.img".into(),
                format: "raw".into(),
                vhd: None,
            },
            change_source: "full-read".into(),
            chunker: "fixed 4K".into(),
            stats: BackupStats::default(),
            root_digest: String::new(),
            tool_version: "test".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::meta as sample_meta;
    use super::*;

    #[test]
    fn source_info_without_vhd_still_decodes() -> serde_json::Result<()> {
        // Manifests written before the `vhd` field existed.
        let old: SourceInfo = serde_json::from_str(r#"{"path":"d.img","format":"raw"}"#)?;
        assert_eq!(old.vhd, None);
        assert!(!serde_json::to_string(&old)?.contains("vhd"));
        Ok(())
    }

    #[test]
    fn round_trip_and_validation() {
        let id = ChunkId::of(b"x");
        let mut m = Manifest {
            meta: sample_meta(),
            virtual_size: 4096 * 2 + 100,
            segment_size: 4096,
            segments: vec![
                vec![Extent::Zero { len: 4096 }],
                vec![Extent::Chunk { id, len: 96 }, Extent::Zero { len: 4000 }],
                vec![Extent::Chunk { id, len: 100 }],
            ],
        };
        m.seal();
        let bytes = m.encode().ok().unwrap_or_default();
        assert_eq!(Manifest::decode(&bytes, "s").ok(), Some(m.clone()));
        // Any single flipped byte in the extents is caught.
        for i in (bytes.len() - 60)..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                Manifest::decode(&bad, "s").is_err(),
                "flip at {i} undetected"
            );
        }
        for cut in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..cut], "s").is_err());
        }
    }
}
