//! The streaming manifest writer (format version 2): the header, each segment's extents in
//! disk order as the backup finishes them, then the metadata with the root digest and the
//! trailer. Memory stays constant however large the disk; the snapshot id (BLAKE3 of every
//! byte written) is known only when the writer finishes, so the caller names the object then.

use std::io::Write;

use super::sealed::BlockSealer;
use super::{
    root_hasher, segment_count, segment_len, Extent, SnapshotMeta, MANIFEST_END_MAGIC,
    MANIFEST_HEADER_LEN, MANIFEST_MAGIC, MANIFEST_TRAILER_LEN, MANIFEST_VERSION, MAX_META_LEN,
    TAG_CHUNK, TAG_ZERO,
};
use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::{hex, SnapshotId};

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

/// Writes a manifest as a stream (format version 2): the header, each segment's extents in
/// disk order as they come, then the metadata with the root digest of what was written.
/// Memory stays constant however large the disk. The snapshot id (BLAKE3 of every byte
/// written) is known at [`ManifestWriter::finish`]; the caller names the object after it.
/// In an encrypted repository ([`ManifestWriter::with_protection`]) the bytes are sealed in
/// blocks as they come and the id is a keyed hash (see [`super::sealed`]).
pub struct ManifestWriter<W: Write> {
    out: W,
    location: String,
    /// Names the manifest: BLAKE3 of its plaintext, keyed when the repository is encrypted.
    object_hash: blake3::Hasher,
    /// Seals the plaintext on its way to `out`, in an encrypted repository.
    sealer: Option<BlockSealer>,
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
    /// Snapshot id: hex BLAKE3 of the manifest's bytes (keyed when encrypted).
    pub id: SnapshotId,
    /// Bytes written (stored: sealed bytes in an encrypted repository).
    pub len: u64,
}

impl<W: Write> ManifestWriter<W> {
    /// Starts a manifest of a disk of `virtual_size` bytes in segments of `segment_size`.
    /// `location` names the output in errors.
    pub fn new(out: W, location: &str, virtual_size: u64, segment_size: u32) -> Result<Self> {
        Self::with_protection(
            out,
            location,
            virtual_size,
            segment_size,
            &Protection::Plain,
        )
    }

    /// As [`ManifestWriter::new`], for a repository with `protection`: when it is encrypted,
    /// the manifest is sealed block by block as it is written and named by a keyed hash.
    pub fn with_protection(
        out: W,
        location: &str,
        virtual_size: u64,
        segment_size: u32,
        protection: &Protection,
    ) -> Result<Self> {
        if !segment_size.is_power_of_two() || segment_size < 4096 {
            return Err(Error::InvalidArgument(format!(
                "segment size {segment_size} is not a power of two >= 4096"
            )));
        }
        let mut w = ManifestWriter {
            out,
            location: location.to_string(),
            object_hash: protection.object_id_hasher(),
            sealer: match protection {
                Protection::Plain => None,
                Protection::Encrypted(_) => Some(BlockSealer::new(protection.clone())?),
            },
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
        match &mut self.sealer {
            Some(sealer) => sealer.write(&mut self.out, bytes, &self.location),
            None => self
                .out
                .write_all(bytes)
                .map_err(|e| Error::io("write", &self.location, e)),
        }
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
        meta.root_digest = hex(self.root.finalize().as_bytes());
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
        let id = SnapshotId::from_digest(&self.object_hash.finalize());
        let len = match self.sealer.take() {
            Some(sealer) => sealer.finish(&mut self.out, &id, &self.location)?,
            None => self.object_hash.count(),
        };
        self.out
            .flush()
            .map_err(|e| Error::io("write", &self.location, e))?;
        Ok(FinishedManifest {
            out: self.out,
            id,
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
    encode_with(
        meta,
        virtual_size,
        segment_size,
        segments,
        &Protection::Plain,
    )
}

/// [`encode`] for a repository with `protection` (sealed when it is encrypted).
pub fn encode_with(
    meta: &mut SnapshotMeta,
    virtual_size: u64,
    segment_size: u32,
    segments: &[Vec<Extent>],
    protection: &Protection,
) -> Result<FinishedManifest<Vec<u8>>> {
    let mut w = ManifestWriter::with_protection(
        Vec::new(),
        "manifest",
        virtual_size,
        segment_size,
        protection,
    )?;
    for s in segments {
        w.push_segment(s)?;
    }
    w.finish(meta)
}
