//! Snapshot manifests: the authoritative, immutable record of one backed-up disk.
//!
//! A manifest maps the whole virtual disk, segment by segment, to an ordered list of extents:
//! a chunk (id and length) or a zero run. Every snapshot is a complete map, so any snapshot
//! restores on its own. The manifest's name in the repository is the BLAKE3 of its bytes, so a
//! reader checks integrity by hashing what it read. The root digest in the metadata commits to
//! the disk's size, segmenting and every extent, and therefore to every byte of the disk.
//!
//! Manifests are streamed, never held whole: [`ManifestWriter`] appends each segment's extents
//! as the backup finishes it and the metadata last (format version 2), and [`Manifest::open`]
//! checks a stored manifest in one pass (its hash, structure and root digest), keeping only
//! where each segment's extents are and their crc32 (12 bytes per segment); a segment's
//! extents are read again when asked for. A 1 TiB disk has ~67 M chunks at 16 KiB: 2.5 GB of
//! extents that are never in memory at once.

mod provenance;
mod reader;
pub mod sealed;
mod writer;

pub use provenance::{ChangeSource, ContainerFormat};
pub use reader::{Manifest, ObjectRead, Segments};
pub use sealed::SealedObject;
pub use writer::{encode, encode_with, FinishedManifest, ManifestWriter};

use serde::{Deserialize, Serialize};

use super::vhd_footer::DiskType;
use super::{ChunkId, SnapshotId};

/// Magic at offset 0 of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SVSNAP\0\x01";
/// The manifest format version this build writes and the newest it reads (1 is still read).
pub const MANIFEST_VERSION: u32 = 2;
/// Fixed header: magic (8), version (4), meta length (4; 0 in version 2), virtual size (8),
/// segment size (4), reserved (4), segment count (8).
pub const MANIFEST_HEADER_LEN: usize = 40;
/// Version 2 trailer: metadata length (4), reserved (4), end magic (8).
pub const MANIFEST_TRAILER_LEN: usize = 16;
/// Magic at the end of a version 2 manifest.
pub const MANIFEST_END_MAGIC: [u8; 8] = *b"SVSNAPND";
/// Largest metadata document accepted.
pub const MAX_META_LEN: u32 = 1024 * 1024;
/// Extent tag of a zero run.
pub const TAG_ZERO: u8 = 0;
/// Extent tag of a chunk.
pub const TAG_CHUNK: u8 = 1;
/// Encoded size of a zero-run extent (tag, length).
const ZERO_EXTENT_LEN: usize = 5;
/// Domain separation prefix of the root digest.
pub const ROOT_DIGEST_DOMAIN: &[u8] = b"stackvault root digest v1\0";
/// Bytes a manifest reader fetches at a time.
const READ_WINDOW: usize = 1 << 20;

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

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
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
    pub format: ContainerFormat,
    /// The VHD footer's metadata when the source was a VHD (see `format-spec/vhd.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhd: Option<VhdInfo>,
    /// For a page blob source: the blob snapshot and ETag that were read (see
    /// `format-spec/README.md`); absent for files and in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobInfo>,
}

/// What a page blob source was, as read: the blob snapshot (absent when the base blob itself
/// was read) and the ETag every read was conditioned on. An incremental backup of the same
/// blob asks the service for the ranges changed since `snapshot`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// Blob snapshot time as the service names it (`2026-01-01T00:00:00.0000000Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// What a VHD source's footer (and dynamic header) said, kept so a restore can give the disk
/// back its identity and so operators can see where a snapshot came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdInfo {
    /// `fixed`, `dynamic` or `differencing`.
    pub disk_type: DiskType,
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
    pub disk_type: DiskType,
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
    pub parent: Option<SnapshotId>,
    pub hostname: String,
    pub source: SourceInfo,
    /// Where the knowledge of what changed came from (`full-read` when everything was read).
    pub change_source: ChangeSource,
    /// The chunker that cut this snapshot, as described by the repository config.
    pub chunker: String,
    pub stats: BackupStats,
    /// Hex BLAKE3 root digest over the disk map (see `format-spec/README.md`; computed by
    /// [`ManifestWriter`]).
    pub root_digest: String,
    /// Version of stackvault that wrote the snapshot.
    pub tool_version: String,
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

/// The root digest's hasher before the extents section: BLAKE3 of the domain prefix, the
/// virtual size (u64) and the segment size (u32), to be fed the encoded extents section.
/// Two snapshots of the same disk bytes in one repository have the same root digest, whichever
/// way they were taken (full, incremental, any container, either manifest version).
fn root_hasher(virtual_size: u64, segment_size: u32) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DIGEST_DOMAIN);
    h.update(&virtual_size.to_le_bytes());
    h.update(&segment_size.to_le_bytes());
    h
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
                format: ContainerFormat::Raw,
                vhd: None,
                blob: None,
            },
            change_source: ChangeSource::full_read(),
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
    use crate::error::{Error, Result};

    #[test]
    fn source_info_without_vhd_still_decodes() -> serde_json::Result<()> {
        // Manifests written before the `vhd` field existed.
        let old: SourceInfo = serde_json::from_str(r#"{"path":"d.img","format":"raw"}"#)?;
        assert_eq!(old.vhd, None);
        assert!(!serde_json::to_string(&old)?.contains("vhd"));
        Ok(())
    }

    /// The parent is a typed id stored as its hex, byte for byte as when it was a string;
    /// a parent that is no snapshot id is refused, never carried along.
    #[test]
    fn parent_is_a_snapshot_id_stored_as_hex() -> serde_json::Result<()> {
        let mut meta = sample_meta();
        let parent = "0a".repeat(32);
        meta.parent = SnapshotId::parse(&parent).ok();
        let json = serde_json::to_string(&meta)?;
        assert!(json.contains(&format!(r#""parent":"{parent}""#)), "{json}");
        assert_eq!(serde_json::from_str::<SnapshotMeta>(&json)?, meta);
        let short = json.replace(&parent, &parent[..12]);
        assert!(serde_json::from_str::<SnapshotMeta>(&short).is_err());
        Ok(())
    }

    fn sample() -> (SnapshotMeta, u64, Vec<Vec<Extent>>) {
        let id = ChunkId::of(b"x");
        let segments = vec![
            vec![Extent::Zero { len: 4096 }],
            vec![Extent::Chunk { id, len: 96 }, Extent::Zero { len: 4000 }],
            vec![Extent::Chunk { id, len: 100 }],
        ];
        (sample_meta(), 4096 * 2 + 100, segments)
    }

    fn written(meta: &mut SnapshotMeta, size: u64, segments: &[Vec<Extent>]) -> Vec<u8> {
        encode(meta, size, 4096, segments)
            .map(|f| f.out)
            .unwrap_or_default()
    }

    #[test]
    fn round_trip() -> Result<()> {
        let (mut meta, size, segments) = sample();
        let f = encode(&mut meta, size, 4096, &segments)?;
        assert_eq!(f.len, f.out.len() as u64);
        assert_eq!(f.id, super::super::hex(blake3::hash(&f.out).as_bytes()));
        let m = Manifest::from_bytes(&f.out, "s")?;
        assert_eq!(m.meta, meta);
        assert_eq!(m.version(), MANIFEST_VERSION);
        assert_eq!(super::super::hex(&m.object_hash()), f.id);
        assert_eq!(m.segments().collect::<Result<Vec<_>>>()?, segments);
        for (i, s) in segments.iter().enumerate() {
            assert_eq!(&m.segment(i as u64)?, s);
        }
        assert!(m.segment(3).is_err());
        Ok(())
    }

    #[test]
    fn every_damaged_structure_byte_is_caught_on_open() {
        let (mut meta, size, segments) = sample();
        let bytes = written(&mut meta, size, &segments);
        let json = serde_json::to_vec(&meta).unwrap_or_default();
        let meta_at = bytes.len() - MANIFEST_TRAILER_LEN - json.len();
        // The metadata's own bytes are covered by the snapshot id (checked by the caller);
        // everything else is checked by the structure and the root digest.
        for i in (0..meta_at).chain(bytes.len() - MANIFEST_TRAILER_LEN..bytes.len()) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                Manifest::from_bytes(&bad, "s").is_err(),
                "flip at {i} undetected"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                Manifest::from_bytes(&bytes[..cut], "s").is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn unknown_extent_tag_is_unsupported_not_damage() {
        let (mut meta, size, segments) = sample();
        let mut bytes = written(&mut meta, size, &segments);
        // The first extent's tag: after the header and the segment's extent count.
        let at = MANIFEST_HEADER_LEN + 4;
        assert_eq!(bytes[at], TAG_ZERO);
        bytes[at] = 9;
        let err = Manifest::from_bytes(&bytes, "s").err();
        assert!(
            matches!(&err, Some(Error::Unsupported { what }) if what.contains("extent tag 9")),
            "{err:?}"
        );
    }

    /// An object whose bytes can change after the manifest was opened.
    struct Mutable(std::sync::Mutex<Vec<u8>>);

    impl ObjectRead for Mutable {
        fn size(&self) -> Result<u64> {
            Ok(self.0.lock().map(|b| b.len() as u64).unwrap_or(0))
        }
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
            let b = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            (&b[..]).read_at(offset, len)
        }
    }

    #[test]
    fn a_segment_changed_after_open_is_caught() -> Result<()> {
        let (mut meta, size, segments) = sample();
        let bytes = written(&mut meta, size, &segments);
        let object = std::sync::Arc::new(Mutable(std::sync::Mutex::new(bytes)));
        struct Shared(std::sync::Arc<Mutable>);
        impl ObjectRead for Shared {
            fn size(&self) -> Result<u64> {
                self.0.size()
            }
            fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
                self.0.read_at(offset, len)
            }
        }
        let m = Manifest::open(Box::new(Shared(object.clone())), "s")?;
        // Segment 1 starts after the header and segment 0 (count + one zero extent); its
        // first chunk id's first byte:
        let at = MANIFEST_HEADER_LEN + 4 + ZERO_EXTENT_LEN + 4 + 5;
        if let Ok(mut b) = object.0.lock() {
            b[at] ^= 0xff;
        }
        assert_eq!(m.segment(0)?, segments[0]);
        let err = m
            .segment(1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("segment 1 changed"), "{err}");
        assert!(m.segments().any(|s| s.is_err()));
        Ok(())
    }

    #[test]
    fn segments_spanning_read_windows() -> Result<()> {
        // 60,000 one-chunk segments: 2.5 MB of extents, more than two read windows.
        let count = 60_000u64;
        let segments: Vec<Vec<Extent>> = (0..count)
            .map(|i| {
                vec![Extent::Chunk {
                    id: ChunkId::of(&i.to_le_bytes()),
                    len: 4096,
                }]
            })
            .collect();
        let mut meta = sample_meta();
        let bytes = written(&mut meta, count * 4096, &segments);
        assert!(bytes.len() > 2 * READ_WINDOW);
        let m = Manifest::from_bytes(&bytes, "s")?;
        let mut n = 0;
        for (i, s) in m.segments().enumerate() {
            assert_eq!(s?, segments[i]);
            n += 1;
        }
        assert_eq!(n, count as usize);
        assert_eq!(m.segment(count - 1)?, segments[count as usize - 1]);
        Ok(())
    }

    #[test]
    fn writer_refuses_what_is_not_a_disk_map() -> Result<()> {
        let (mut meta, size, segments) = sample();
        let mut w = ManifestWriter::new(Vec::new(), "s", size, 4096)?;
        assert!(w.push_segment(&[Extent::Zero { len: 4095 }]).is_err());
        w.push_segment(&segments[0])?;
        assert!(w.finish(&mut meta).is_err(), "two segments missing");
        let mut w = ManifestWriter::new(Vec::new(), "s", size, 4096)?;
        for s in &segments {
            w.push_segment(s)?;
        }
        assert!(
            w.push_segment(&segments[2]).is_err(),
            "one segment too many"
        );
        assert!(ManifestWriter::new(Vec::new(), "s", size, 1000).is_err());
        Ok(())
    }
}
