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

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{ChunkId, Reader};
use crate::error::{Error, Result};

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

/// Number of segments of a disk.
pub fn segment_count(virtual_size: u64, segment_size: u32) -> u64 {
    virtual_size.div_ceil(u64::from(segment_size))
}

/// Length of segment `index` (the last one may be short).
pub fn segment_len(virtual_size: u64, segment_size: u32, index: u64) -> u32 {
    let start = index * u64::from(segment_size);
    (virtual_size - start).min(u64::from(segment_size)) as u32
}

/// Appends one segment's encoding (extent count, then the extents) to `out`.
fn encode_segment(extents: &[Extent], out: &mut Vec<u8>) {
    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for e in extents {
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

/// Writes a manifest as a stream (format version 2): the header, each segment's extents in
/// disk order as they come, then the metadata with the root digest of what was written.
/// Memory stays constant however large the disk. The snapshot id (BLAKE3 of every byte
/// written) is known at [`ManifestWriter::finish`]; the caller names the object after it.
pub struct ManifestWriter<W: Write> {
    out: W,
    location: String,
    object_hash: blake3::Hasher,
    root: blake3::Hasher,
    virtual_size: u64,
    segment_size: u32,
    next_segment: u64,
    buf: Vec<u8>,
}

/// A manifest written whole.
#[derive(Debug)]
pub struct FinishedManifest<W> {
    pub out: W,
    /// Snapshot id: hex BLAKE3 of the manifest's bytes.
    pub id: String,
    /// Bytes written.
    pub len: u64,
}

impl<W: Write> ManifestWriter<W> {
    /// Starts a manifest of a disk of `virtual_size` bytes in segments of `segment_size`.
    /// `location` names the output in errors.
    pub fn new(out: W, location: &str, virtual_size: u64, segment_size: u32) -> Result<Self> {
        if !segment_size.is_power_of_two() || segment_size < 4096 {
            return Err(Error::InvalidArgument(format!(
                "segment size {segment_size} is not a power of two >= 4096"
            )));
        }
        let mut w = ManifestWriter {
            out,
            location: location.to_string(),
            object_hash: blake3::Hasher::new(),
            root: root_hasher(virtual_size, segment_size),
            virtual_size,
            segment_size,
            next_segment: 0,
            buf: Vec::with_capacity(64 << 10),
        };
        let mut header = Vec::with_capacity(MANIFEST_HEADER_LEN);
        header.extend_from_slice(&MANIFEST_MAGIC);
        header.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&virtual_size.to_le_bytes());
        header.extend_from_slice(&segment_size.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&segment_count(virtual_size, segment_size).to_le_bytes());
        w.emit(&header)?;
        Ok(w)
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        self.object_hash.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io("write", &self.location, e))
    }

    /// Appends the next segment's extents; they must cover the segment exactly.
    pub fn push_segment(&mut self, extents: &[Extent]) -> Result<()> {
        let count = segment_count(self.virtual_size, self.segment_size);
        if self.next_segment >= count {
            return Err(Error::InvalidArgument(format!(
                "manifest {}: more than {count} segments",
                self.location
            )));
        }
        let expected = segment_len(self.virtual_size, self.segment_size, self.next_segment);
        let covered: u64 = extents.iter().map(|e| u64::from(e.len())).sum();
        if covered != u64::from(expected) || extents.iter().any(Extent::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "manifest {}: segment {} extents cover {covered} bytes, expected {expected}",
                self.location, self.next_segment
            )));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        encode_segment(extents, &mut buf);
        self.root.update(&buf);
        let written = self.emit(&buf);
        self.buf = buf;
        written?;
        self.next_segment += 1;
        Ok(())
    }

    /// Sets `meta.root_digest`, writes the metadata and the trailer, and flushes.
    pub fn finish(mut self, meta: &mut SnapshotMeta) -> Result<FinishedManifest<W>> {
        let count = segment_count(self.virtual_size, self.segment_size);
        if self.next_segment != count {
            return Err(Error::InvalidArgument(format!(
                "manifest {}: {} of {count} segments written",
                self.location, self.next_segment
            )));
        }
        meta.root_digest = super::hex(self.root.finalize().as_bytes());
        let json = serde_json::to_vec(&*meta)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode snapshot metadata: {e}")))?;
        if json.len() > MAX_META_LEN as usize {
            return Err(Error::InvalidArgument(
                "snapshot metadata exceeds 1 MiB".into(),
            ));
        }
        self.emit(&json)?;
        let mut trailer = Vec::with_capacity(MANIFEST_TRAILER_LEN);
        trailer.extend_from_slice(&(json.len() as u32).to_le_bytes());
        trailer.extend_from_slice(&0u32.to_le_bytes());
        trailer.extend_from_slice(&MANIFEST_END_MAGIC);
        self.emit(&trailer)?;
        self.out
            .flush()
            .map_err(|e| Error::io("write", &self.location, e))?;
        let len = self.object_hash.count();
        Ok(FinishedManifest {
            out: self.out,
            id: super::hex(self.object_hash.finalize().as_bytes()),
            len,
        })
    }
}

/// Encodes a whole manifest in memory (small manifests: tests, test vectors).
pub fn encode(
    meta: &mut SnapshotMeta,
    virtual_size: u64,
    segment_size: u32,
    segments: &[Vec<Extent>],
) -> Result<FinishedManifest<Vec<u8>>> {
    let mut w = ManifestWriter::new(Vec::new(), "manifest", virtual_size, segment_size)?;
    for s in segments {
        w.push_segment(s)?;
    }
    w.finish(meta)
}

/// Positional reads of a stored object, all a manifest reader needs: a repository object
/// read through its backend, or bytes in memory.
pub trait ObjectRead: Send + Sync {
    /// Size of the object in bytes.
    fn size(&self) -> Result<u64>;
    /// Exactly `len` bytes at `offset`; fewer is a [`Error::Corrupt`].
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
}

impl ObjectRead for &[u8] {
    fn size(&self) -> Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::corrupt("object", offset, format!("{len} bytes past the end")))
    }
}

/// A stored manifest, checked whole when opened, whose segments are read when asked for.
pub struct Manifest<'a> {
    pub meta: SnapshotMeta,
    pub virtual_size: u64,
    pub segment_size: u32,
    /// Object offset of each segment's encoding, then the end of the extents section.
    offsets: Vec<u64>,
    /// crc32 of each segment's encoding: a segment read again is checked against it.
    crcs: Vec<u32>,
    /// BLAKE3 of the whole object: the snapshot id of a stored manifest.
    object_hash: [u8; 32],
    version: u32,
    object: Box<dyn ObjectRead + 'a>,
    location: String,
}

impl std::fmt::Debug for Manifest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("location", &self.location)
            .field("version", &self.version)
            .field("virtual_size", &self.virtual_size)
            .field("segment_size", &self.segment_size)
            .field("meta", &self.meta)
            .finish()
    }
}

/// Sequential reads of an object's bytes, each byte fetched once and fed to the object hash.
struct Stream<'o> {
    object: &'o dyn ObjectRead,
    location: &'o str,
    buf: Vec<u8>,
    /// Consumed bytes of `buf`.
    at: usize,
    /// Object offset of `buf[0]`.
    buf_offset: u64,
    /// Object offset up to which bytes were fetched (and hashed).
    fetched: u64,
    /// Reads past this object offset are refused (the end of the section being parsed).
    limit: u64,
    size: u64,
    hash: blake3::Hasher,
}

impl<'o> Stream<'o> {
    fn new(object: &'o dyn ObjectRead, location: &'o str, size: u64) -> Self {
        Stream {
            object,
            location,
            buf: Vec::new(),
            at: 0,
            buf_offset: 0,
            fetched: 0,
            limit: size,
            size,
            hash: blake3::Hasher::new(),
        }
    }

    fn offset(&self) -> u64 {
        self.buf_offset + self.at as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let at = self.offset();
        if at + n as u64 > self.limit {
            return Err(Error::corrupt(
                self.location,
                at,
                format!("truncated {what}: need {n} bytes, {} left", self.limit - at),
            ));
        }
        if self.buf.len() - self.at < n {
            self.buf.drain(..self.at);
            self.buf_offset += self.at as u64;
            self.at = 0;
            let want = (n - self.buf.len()).max(READ_WINDOW) as u64;
            let len = want.min(self.size - self.fetched) as usize;
            let more = self.object.read_at(self.fetched, len)?;
            self.hash.update(&more);
            self.buf.extend_from_slice(&more);
            self.fetched += len as u64;
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Hashes the bytes not fetched yet; returns the BLAKE3 of the whole object.
    fn finish(mut self) -> Result<[u8; 32]> {
        while self.fetched < self.size {
            let len = (self.size - self.fetched).min(READ_WINDOW as u64) as usize;
            self.hash.update(&self.object.read_at(self.fetched, len)?);
            self.fetched += len as u64;
        }
        Ok(*self.hash.finalize().as_bytes())
    }
}

/// Decodes one segment's encoding and checks that its extents cover `seg_len` bytes.
fn decode_segment(
    bytes: &[u8],
    seg_len: u32,
    index: u64,
    at: u64,
    location: &str,
) -> Result<Vec<Extent>> {
    let mut r = Reader::new(bytes, at, location);
    let n = r.u32("extent count")?;
    let mut extents = Vec::with_capacity((n as usize).min(r.remaining() / ZERO_EXTENT_LEN));
    let mut covered: u64 = 0;
    for _ in 0..n {
        let at = r.offset();
        let tag = r.u8("extent tag")?;
        let len = r.u32("extent length")?;
        extents.push(match tag {
            TAG_ZERO => Extent::Zero { len },
            TAG_CHUNK => Extent::Chunk {
                id: r.chunk_id("chunk id")?,
                len,
            },
            other => return Err(unknown_extent_tag(other, location, at)),
        });
        if len == 0 {
            return Err(Error::corrupt(location, at, "empty extent"));
        }
        covered += u64::from(len);
    }
    if covered != u64::from(seg_len) || r.remaining() != 0 {
        return Err(r.corrupt(format!(
            "segment {index} extents cover {covered} bytes, expected {seg_len}"
        )));
    }
    Ok(extents)
}

impl<'a> Manifest<'a> {
    /// Opens a manifest of `location` in one streaming pass: the header and metadata, every
    /// segment's extents (each must cover its segment exactly), the root digest in the
    /// metadata against the extents, and the BLAKE3 of the whole object (see
    /// [`Manifest::object_hash`]). Keeps 12 bytes per segment.
    pub fn open(object: Box<dyn ObjectRead + 'a>, location: &str) -> Result<Manifest<'a>> {
        let size = object.size()?;
        let corrupt = |offset: u64, what: &str| Error::corrupt(location, offset, what);
        if size < MANIFEST_HEADER_LEN as u64 {
            return Err(corrupt(0, "truncated manifest header"));
        }
        let header = object.read_at(0, MANIFEST_HEADER_LEN)?;
        let mut r = Reader::new(&header, 0, location);
        if r.array::<8>("manifest magic")? != MANIFEST_MAGIC {
            return Err(corrupt(0, "bad manifest magic: not a snapshot"));
        }
        let version = r.u32("manifest version")?;
        if version == 0 || version > MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("snapshot {location}"),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let header_meta_len = r.u32("metadata length")?;
        let virtual_size = r.u64("virtual size")?;
        let segment_size = r.u32("segment size")?;
        let reserved = r.u32("reserved")?;
        let count = r.u64("segment count")?;
        if version >= 2 && (header_meta_len != 0 || reserved != 0) {
            return Err(corrupt(12, "reserved header fields are not zero"));
        }
        if !segment_size.is_power_of_two() || segment_size < 4096 {
            return Err(corrupt(
                24,
                &format!("segment size {segment_size} is not a power of two >= 4096"),
            ));
        }
        if count != segment_count(virtual_size, segment_size) {
            return Err(corrupt(
                32,
                &format!("segment count {count} does not match virtual size {virtual_size}"),
            ));
        }
        // Where the metadata and the extents section are.
        let header_len = MANIFEST_HEADER_LEN as u64;
        let (meta_at, meta_len, extents_at, extents_end) = if version == 1 {
            let m = u64::from(header_meta_len);
            if header_meta_len > MAX_META_LEN || header_len + m > size {
                return Err(corrupt(12, "metadata length over 1 MiB or past the end"));
            }
            (header_len, m, header_len + m, size)
        } else {
            let trailer_at = size
                .checked_sub(MANIFEST_TRAILER_LEN as u64)
                .filter(|&t| t >= header_len)
                .ok_or_else(|| corrupt(size, "truncated manifest: no trailer"))?;
            let trailer = object.read_at(trailer_at, MANIFEST_TRAILER_LEN)?;
            let mut t = Reader::new(&trailer, trailer_at, location);
            let m = t.u32("metadata length")?;
            let reserved = t.u32("reserved")?;
            if t.array::<8>("end magic")? != MANIFEST_END_MAGIC || reserved != 0 {
                return Err(corrupt(
                    trailer_at + 8,
                    "bad manifest end magic (truncated?)",
                ));
            }
            let m = u64::from(m);
            if m > u64::from(MAX_META_LEN) || header_len + m > trailer_at {
                return Err(corrupt(
                    trailer_at,
                    "metadata length over 1 MiB or past the start",
                ));
            }
            (trailer_at - m, m, header_len, trailer_at - m)
        };
        let meta_bytes = object.read_at(meta_at, meta_len as usize)?;
        let meta: SnapshotMeta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| corrupt(meta_at, &format!("metadata: {e}")))?;
        // Each segment takes at least 4 + 5 bytes: bound the tables by what is there.
        if count.saturating_mul(4 + ZERO_EXTENT_LEN as u64) > extents_end - extents_at {
            return Err(corrupt(
                extents_at,
                &format!("extents section too short for {count} segments"),
            ));
        }
        let mut offsets = Vec::with_capacity(count as usize + 1);
        let mut crcs = Vec::with_capacity(count as usize);
        let mut root = root_hasher(virtual_size, segment_size);
        let mut stream = Stream::new(object.as_ref(), location, size);
        stream.take(extents_at as usize, "manifest header and metadata")?;
        stream.limit = extents_end;
        let mut seg = Vec::new();
        for index in 0..count {
            let seg_len = segment_len(virtual_size, segment_size, index);
            let start = stream.offset();
            offsets.push(start);
            seg.clear();
            let n = stream.u32("extent count")?;
            seg.extend_from_slice(&n.to_le_bytes());
            let mut covered: u64 = 0;
            for _ in 0..n {
                let at = stream.offset();
                let tag = stream.u8("extent tag")?;
                let len = stream.u32("extent length")?;
                seg.push(tag);
                seg.extend_from_slice(&len.to_le_bytes());
                match tag {
                    TAG_ZERO => {}
                    TAG_CHUNK => seg.extend_from_slice(stream.take(32, "chunk id")?),
                    other => return Err(unknown_extent_tag(other, location, at)),
                }
                if len == 0 {
                    return Err(corrupt(at, "empty extent"));
                }
                covered += u64::from(len);
                if covered > u64::from(seg_len) {
                    break;
                }
            }
            if covered != u64::from(seg_len) {
                return Err(corrupt(
                    start,
                    &format!("segment {index} extents cover {covered} bytes, expected {seg_len}"),
                ));
            }
            root.update(&seg);
            crcs.push(crc32fast::hash(&seg));
        }
        if stream.offset() != extents_end {
            return Err(corrupt(
                stream.offset(),
                "trailing bytes after the last segment",
            ));
        }
        offsets.push(extents_end);
        stream.limit = size;
        let object_hash = stream.finish()?;
        if super::hex(root.finalize().as_bytes()) != meta.root_digest {
            return Err(corrupt(
                meta_at,
                "root digest in the metadata does not match the extents",
            ));
        }
        Ok(Manifest {
            meta,
            virtual_size,
            segment_size,
            offsets,
            crcs,
            object_hash,
            version,
            object,
            location: location.to_string(),
        })
    }

    /// Opens a manifest held in memory.
    pub fn from_bytes(data: &'a [u8], location: &str) -> Result<Manifest<'a>> {
        Manifest::open(Box::new(data), location)
    }

    /// BLAKE3 of the manifest's bytes, as read when it was opened.
    pub fn object_hash(&self) -> [u8; 32] {
        self.object_hash
    }

    /// The format version the manifest was written in.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn segment_count(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// The extents of segment `index`, read again and checked against the crc32 taken when
    /// the manifest was opened.
    pub fn segment(&self, index: u64) -> Result<Vec<Extent>> {
        let i = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.crcs.len())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "segment {index} is past the end of snapshot {}",
                    self.location
                ))
            })?;
        let (start, end) = (self.offsets[i], self.offsets[i + 1]);
        let bytes = self.object.read_at(start, (end - start) as usize)?;
        self.decode_checked(index, start, &bytes)
    }

    fn decode_checked(&self, index: u64, at: u64, bytes: &[u8]) -> Result<Vec<Extent>> {
        if crc32fast::hash(bytes) != self.crcs[index as usize] {
            return Err(Error::corrupt(
                &self.location,
                at,
                format!("segment {index} changed since the manifest was checked"),
            ));
        }
        let seg_len = segment_len(self.virtual_size, self.segment_size, index);
        decode_segment(bytes, seg_len, index, at, &self.location)
    }

    /// Every segment's extents in disk order, read in large pieces.
    pub fn segments(&self) -> Segments<'_, 'a> {
        Segments {
            manifest: self,
            next: 0,
            buf: Vec::new(),
            buf_first: 0,
            buf_end: 0,
        }
    }
}

/// Iterator over a manifest's segments, in disk order; see [`Manifest::segments`].
pub struct Segments<'m, 'a> {
    manifest: &'m Manifest<'a>,
    next: u64,
    /// Encodings of segments `buf_first..buf_end`, read at once.
    buf: Vec<u8>,
    buf_first: u64,
    buf_end: u64,
}

impl Iterator for Segments<'_, '_> {
    type Item = Result<Vec<Extent>>;

    fn next(&mut self) -> Option<Self::Item> {
        let m = self.manifest;
        let index = self.next;
        if index >= m.segment_count() {
            return None;
        }
        self.next += 1;
        let offsets = &m.offsets;
        let i = index as usize;
        if index >= self.buf_end {
            // Read as many whole segments as fit in a window (at least this one).
            let start = offsets[i];
            let mut end = i + 1;
            while end < m.crcs.len() && offsets[end + 1] - start <= READ_WINDOW as u64 {
                end += 1;
            }
            match m.object.read_at(start, (offsets[end] - start) as usize) {
                Ok(b) => self.buf = b,
                Err(e) => {
                    self.next = m.segment_count();
                    return Some(Err(e));
                }
            }
            self.buf_first = index;
            self.buf_end = end as u64;
        }
        let base = offsets[self.buf_first as usize];
        let (start, end) = (offsets[i], offsets[i + 1]);
        let bytes = &self.buf[(start - base) as usize..(end - base) as usize];
        let result = m.decode_checked(index, start, bytes);
        if result.is_err() {
            self.next = m.segment_count();
        }
        Some(result)
    }
}

/// An extent tag this build does not know: a newer writer's, so `Unsupported`, not damage.
fn unknown_extent_tag(tag: u8, location: &str, offset: u64) -> Error {
    Error::unsupported(format!(
        "{location} at offset {offset}: extent tag {tag} is unknown to stackvault {}; read \
         this snapshot with the release that wrote it or a newer one (if no release knows the \
         tag, the manifest is damaged: `stackvault check` lists it)",
        env!("CARGO_PKG_VERSION")
    ))
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
                blob: None,
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
