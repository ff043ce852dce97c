//! Reading a stored manifest: [`Manifest::open`] checks the whole object in one pass (its
//! hash, structure and root digest) and keeps only where each segment's extents are and
//! their crc32; a segment's extents are read and checked again when asked for. Every length
//! and count is checked before anything is allocated from it: the object is hostile input.

use super::{
    root_hasher, segment_count, segment_len, Extent, SnapshotMeta, MANIFEST_END_MAGIC,
    MANIFEST_HEADER_LEN, MANIFEST_MAGIC, MANIFEST_TRAILER_LEN, MANIFEST_VERSION, MAX_META_LEN,
    READ_WINDOW, TAG_CHUNK, TAG_ZERO, ZERO_EXTENT_LEN,
};
use crate::error::{Error, Result};
use crate::format::{hex, Reader};

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
    fn new(object: &'o dyn ObjectRead, location: &'o str, size: u64, hash: blake3::Hasher) -> Self {
        Stream {
            object,
            location,
            buf: Vec::new(),
            at: 0,
            buf_offset: 0,
            fetched: 0,
            limit: size,
            size,
            hash,
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
        Manifest::open_hashed(object, location, blake3::Hasher::new())
    }

    /// [`Manifest::open`], with [`Manifest::object_hash`] taken by `hasher` (keyed in an
    /// encrypted repository, where `object` is the plaintext of a [`super::SealedObject`]).
    pub fn open_hashed(
        object: Box<dyn ObjectRead + 'a>,
        location: &str,
        hasher: blake3::Hasher,
    ) -> Result<Manifest<'a>> {
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
        let mut stream = Stream::new(object.as_ref(), location, size, hasher);
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
        if hex(root.finalize().as_bytes()) != meta.root_digest {
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
