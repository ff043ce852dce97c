//! Sealed manifests: how an encrypted repository stores a manifest without giving up
//! streaming (`format-spec/README.md`, "Sealed manifests").
//!
//! The manifest's plaintext (the format 2 bytes, exactly as a plain repository stores them)
//! is cut into blocks of [`SEALED_BLOCK_LEN`] bytes, the last one shorter, and each block is
//! sealed on its own under `ObjectAd {Manifest, name: <salt hex>, part: <block index>}`, where
//! the salt is 16 random bytes drawn per manifest. A sealed footer follows, under
//! `ObjectAd {Manifest, name: <snapshot id>, part: u64::MAX}`, holding the format version,
//! the block length, the salt and the plaintext length. So:
//! - the footer binds the object to its name: bytes stored under another snapshot's name fail
//!   authentication before a byte of the manifest is parsed;
//! - the salt binds every block to this manifest (a block of another manifest fails), the
//!   block index to its place (reordered blocks fail), and the authenticated plaintext length
//!   fixes the object's size (a truncated or extended object is refused before any block is
//!   opened);
//! - memory stays bounded: the writer holds one block, the reader the blocks a read spans.
//!
//! The snapshot id of a sealed manifest is the BLAKE3 of its plaintext keyed with the
//! repository's object-id subkey ([`Protection::object_id_hasher`]): deterministic, so
//! `verify` can recompute it, and no fingerprint of the plaintext for whoever lacks the key.

use std::io::Write;
use std::sync::Mutex;

use super::reader::ObjectRead;
use crate::crypto::{ObjectAd, ObjectKind, Protection, SEAL_OVERHEAD};
use crate::error::{Error, Result};
use crate::format::hex;

/// Plaintext bytes per sealed block (the last block of a manifest may be shorter).
pub const SEALED_BLOCK_LEN: u32 = 64 * 1024;
/// Largest block length a reader accepts from a footer.
pub const MAX_SEALED_BLOCK_LEN: u32 = 16 * 1024 * 1024;
/// Version of the sealed manifest layout this build writes and reads.
pub const SEALED_MANIFEST_VERSION: u32 = 1;
/// The footer's plaintext: version (4), block length (4), salt (16), plaintext length (8).
pub const SEALED_FOOTER_PLAIN_LEN: usize = 32;
/// The footer as stored: its plaintext sealed.
pub const SEALED_FOOTER_LEN: usize = SEALED_FOOTER_PLAIN_LEN + SEAL_OVERHEAD;
/// The `part` of the footer's associated data.
pub const FOOTER_PART: u64 = u64::MAX;
/// Length of the per-manifest salt.
pub const SALT_LEN: usize = 16;

/// Seals a manifest's plaintext block by block as the manifest writer emits it.
pub(crate) struct BlockSealer {
    protection: Protection,
    block_len: u32,
    salt: [u8; SALT_LEN],
    salt_hex: String,
    buf: Vec<u8>,
    next_block: u64,
    plain_len: u64,
    stored_len: u64,
}

impl BlockSealer {
    /// A sealer for one manifest, with a fresh random salt.
    pub(crate) fn new(protection: Protection) -> Result<BlockSealer> {
        Self::with_block_len(protection, SEALED_BLOCK_LEN)
    }

    /// A sealer with blocks of `block_len` plaintext bytes (small ones for test vectors).
    pub(crate) fn with_block_len(protection: Protection, block_len: u32) -> Result<BlockSealer> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt)
            .map_err(|e| Error::Internal(format!("draw a manifest salt: {e}")))?;
        Ok(BlockSealer {
            protection,
            salt,
            salt_hex: hex(&salt),
            block_len: block_len.clamp(1, MAX_SEALED_BLOCK_LEN),
            buf: Vec::with_capacity(block_len.clamp(1, MAX_SEALED_BLOCK_LEN) as usize),
            next_block: 0,
            plain_len: 0,
            stored_len: 0,
        })
    }

    /// Takes `bytes` of plaintext; every block filled is sealed and written to `out`.
    pub(crate) fn write(
        &mut self,
        out: &mut impl Write,
        mut bytes: &[u8],
        location: &str,
    ) -> Result<()> {
        self.plain_len += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = self.block_len as usize - self.buf.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buf.extend_from_slice(now);
            bytes = rest;
            if self.buf.len() == self.block_len as usize {
                self.seal_block(out, location)?;
            }
        }
        Ok(())
    }

    fn seal_block(&mut self, out: &mut impl Write, location: &str) -> Result<()> {
        let ad = ObjectAd {
            kind: ObjectKind::Manifest,
            name: &self.salt_hex,
            part: self.next_block,
        };
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(self.block_len as usize));
        let sealed = self.protection.seal(&ad, block)?;
        out.write_all(&sealed)
            .map_err(|e| Error::io("write", location, e))?;
        self.stored_len += sealed.len() as u64;
        self.next_block += 1;
        Ok(())
    }

    /// Seals the last (partial) block and the footer naming the manifest `id`; returns the
    /// stored length.
    pub(crate) fn finish(mut self, out: &mut impl Write, id: &str, location: &str) -> Result<u64> {
        if !self.buf.is_empty() {
            self.seal_block(out, location)?;
        }
        let mut footer = Vec::with_capacity(SEALED_FOOTER_PLAIN_LEN);
        footer.extend_from_slice(&SEALED_MANIFEST_VERSION.to_le_bytes());
        footer.extend_from_slice(&self.block_len.to_le_bytes());
        footer.extend_from_slice(&self.salt);
        footer.extend_from_slice(&self.plain_len.to_le_bytes());
        let ad = ObjectAd {
            kind: ObjectKind::Manifest,
            name: id,
            part: FOOTER_PART,
        };
        let sealed = self.protection.seal(&ad, footer)?;
        out.write_all(&sealed)
            .map_err(|e| Error::io("write", location, e))?;
        Ok(self.stored_len + sealed.len() as u64)
    }
}

/// The stored size of a sealed manifest of `plain_len` plaintext bytes in blocks of
/// `block_len`; `None` on overflow.
pub fn sealed_size(plain_len: u64, block_len: u32) -> Option<u64> {
    let blocks = plain_len.div_ceil(u64::from(block_len));
    plain_len
        .checked_add(blocks.checked_mul(SEAL_OVERHEAD as u64)?)?
        .checked_add(SEALED_FOOTER_LEN as u64)
}

/// The plaintext of a sealed manifest, read through positional reads of the stored object:
/// each block is authenticated before any byte of it is returned.
pub struct SealedObject<'a> {
    stored: Box<dyn ObjectRead + 'a>,
    protection: &'a Protection,
    location: String,
    salt_hex: String,
    block_len: u64,
    plain_len: u64,
    /// The last block opened (index and plaintext): sequential reads that straddle a block
    /// boundary open each block once.
    last: Mutex<Option<(u64, Vec<u8>)>>,
}

impl<'a> SealedObject<'a> {
    /// Opens the footer of the sealed manifest `id` stored in `stored` (named `location` in
    /// errors) and checks the object's size against it. Fails with [`Error::Corrupt`] when
    /// the footer does not authenticate as the footer of `id` (damage, another manifest's
    /// bytes, a plain manifest) or the size does not match.
    pub fn open(
        stored: Box<dyn ObjectRead + 'a>,
        protection: &'a Protection,
        id: &str,
        location: &str,
    ) -> Result<SealedObject<'a>> {
        let size = stored.size()?;
        let footer_at = size.checked_sub(SEALED_FOOTER_LEN as u64).ok_or_else(|| {
            Error::corrupt(
                location,
                0,
                format!("sealed manifest of {size} bytes is shorter than its footer"),
            )
        })?;
        let ad = ObjectAd {
            kind: ObjectKind::Manifest,
            name: id,
            part: FOOTER_PART,
        };
        let footer = protection.open(
            &ad,
            &stored.read_at(footer_at, SEALED_FOOTER_LEN)?,
            location,
            footer_at,
        )?;
        let field = |at: usize, len: usize| footer.get(at..at + len).unwrap_or(&[]);
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(field(at, 4));
            u32::from_le_bytes(b)
        };
        if footer.len() != SEALED_FOOTER_PLAIN_LEN {
            return Err(Error::corrupt(
                location,
                footer_at,
                "sealed manifest footer has the wrong length",
            ));
        }
        let version = u32_at(0);
        if version != SEALED_MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("sealed manifest {location}"),
                found: version,
                supported: SEALED_MANIFEST_VERSION,
            });
        }
        let block_len = u32_at(4);
        let mut len = [0u8; 8];
        len.copy_from_slice(field(24, 8));
        let plain_len = u64::from_le_bytes(len);
        if block_len == 0 || block_len > MAX_SEALED_BLOCK_LEN {
            return Err(Error::corrupt(
                location,
                footer_at,
                format!("sealed manifest block length {block_len} is out of range"),
            ));
        }
        if sealed_size(plain_len, block_len) != Some(size) {
            return Err(Error::corrupt(
                location,
                footer_at,
                format!(
                    "sealed manifest is {size} bytes, its footer says {plain_len} bytes of \
                     plaintext (truncated or extended)"
                ),
            ));
        }
        Ok(SealedObject {
            stored,
            protection,
            location: location.to_string(),
            salt_hex: hex(field(8, SALT_LEN)),
            block_len: u64::from(block_len),
            plain_len,
            last: Mutex::new(None),
        })
    }

    /// Where block `index` is stored and how many plaintext bytes it holds.
    fn block_extent(&self, index: u64) -> (u64, u64) {
        let start = index * self.block_len;
        let plain = (self.plain_len - start).min(self.block_len);
        (index * (self.block_len + SEAL_OVERHEAD as u64), plain)
    }

    fn open_block(&self, index: u64, sealed: &[u8], at: u64) -> Result<Vec<u8>> {
        let ad = ObjectAd {
            kind: ObjectKind::Manifest,
            name: &self.salt_hex,
            part: index,
        };
        self.protection.open(&ad, sealed, &self.location, at)
    }
}

impl ObjectRead for SealedObject<'_> {
    fn size(&self) -> Result<u64> {
        Ok(self.plain_len)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.plain_len)
            .ok_or_else(|| {
                Error::corrupt(
                    &self.location,
                    offset,
                    format!("{len} bytes past the end of the manifest"),
                )
            })?;
        let mut out = Vec::with_capacity(len);
        if len == 0 {
            return Ok(out);
        }
        let first = offset / self.block_len;
        let last = (end - 1) / self.block_len;
        let mut cached = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = first;
        // Blocks to open: those not in the cache.
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some((i, block)) = cached.as_ref() {
            if *i == first {
                pending.push((first, block.clone()));
                next = first + 1;
            }
        }
        if next <= last {
            let (at, _) = self.block_extent(next);
            let (last_at, last_plain) = self.block_extent(last);
            let stored_end = last_at + last_plain + SEAL_OVERHEAD as u64;
            let bytes = self.stored.read_at(at, (stored_end - at) as usize)?;
            let mut pos = 0usize;
            for index in next..=last {
                let (block_at, plain) = self.block_extent(index);
                let n = plain as usize + SEAL_OVERHEAD;
                let sealed = bytes.get(pos..pos + n).ok_or_else(|| {
                    Error::corrupt(&self.location, block_at, "short read of a sealed block")
                })?;
                pending.push((index, self.open_block(index, sealed, block_at)?));
                pos += n;
            }
        }
        for (index, block) in &pending {
            let block_start = index * self.block_len;
            let from = offset.max(block_start) - block_start;
            let to = end.min(block_start + block.len() as u64) - block_start;
            let piece = block.get(from as usize..to as usize).ok_or_else(|| {
                Error::corrupt(
                    &self.location,
                    self.block_extent(*index).0,
                    "sealed block shorter than its footer says",
                )
            })?;
            out.extend_from_slice(piece);
        }
        *cached = pending.pop();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{MasterSecret, RepoKeys};
    use crate::format::manifest::tests_support::meta;
    use crate::format::manifest::{encode_with, Extent, Manifest};
    use crate::format::{ChunkId, SnapshotId};

    fn keys(byte: u8) -> Protection {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [byte; 32],
        ))))
    }

    /// A manifest whose plaintext spans several sealed blocks: `n` segments of 4 KiB, each a
    /// distinct chunk.
    fn sample(
        p: &Protection,
        n: u64,
        disk: &str,
    ) -> Result<(Vec<u8>, SnapshotId, Vec<Vec<Extent>>)> {
        let segments: Vec<Vec<Extent>> = (0..n)
            .map(|i| {
                vec![
                    Extent::Chunk {
                        id: ChunkId::of(&i.to_le_bytes()),
                        len: 1024,
                    },
                    Extent::Zero { len: 3072 },
                ]
            })
            .collect();
        let mut m = meta();
        m.disk = disk.into();
        let f = encode_with(&mut m, n * 4096, 4096, &segments, p)?;
        Ok((f.out, f.id, segments))
    }

    fn open<'a>(p: &'a Protection, bytes: &'a [u8], id: &str) -> Result<Manifest<'a>> {
        let sealed = SealedObject::open(Box::new(bytes), p, id, "snapshots/x")?;
        let m = Manifest::open_hashed(Box::new(sealed), "snapshots/x", p.object_id_hasher())?;
        if hex(&m.object_hash()) != id {
            return Err(Error::corrupt("snapshots/x", 0, "not its name"));
        }
        Ok(m)
    }

    #[test]
    fn a_sealed_manifest_streams_in_blocks_and_reads_back() -> Result<()> {
        let p = keys(1);
        // 3000 segments x 45 bytes: the plaintext spans three blocks.
        let (bytes, id, segments) = sample(&p, 3000, "web01-os")?;
        let (plain, plain_id, _) = sample(&Protection::Plain, 3000, "web01-os")?;
        assert!(plain.len() > 2 * SEALED_BLOCK_LEN as usize);
        assert_eq!(
            Some(bytes.len() as u64),
            sealed_size(plain.len() as u64, SEALED_BLOCK_LEN)
        );
        // The id is keyed: not the plain id, not another repository's.
        assert_ne!(id, plain_id);
        assert_ne!(id, sample(&keys(2), 3000, "web01-os")?.1);
        let m = open(&p, &bytes, &id)?;
        assert_eq!(m.meta.disk, "web01-os");
        assert_eq!(m.segments().collect::<Result<Vec<_>>>()?, segments);
        assert_eq!(m.segment(2999)?, segments[2999]);
        assert_eq!(m.segment(1500)?, segments[1500]);
        // No plaintext: no disk name, no chunk id, no manifest magic.
        for needle in [
            &b"web01-os"[..],
            &ChunkId::of(&7u64.to_le_bytes()).0[..8],
            &crate::format::manifest::MANIFEST_MAGIC[..],
            &b"root_digest"[..],
        ] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        Ok(())
    }

    #[test]
    fn every_flipped_byte_of_a_sealed_manifest_fails_authentication() -> Result<()> {
        let p = keys(1);
        let (bytes, id, _) = sample(&p, 40, "d")?;
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            let err = open(&p, &bad, &id).err();
            assert!(
                matches!(&err, Some(Error::Corrupt { location, .. }) if location == "snapshots/x"),
                "flip at {at}: {err:?}"
            );
        }
        // Cut anywhere, or extended: refused.
        for cut in 0..bytes.len() {
            assert!(open(&p, &bytes[..cut], &id).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(open(&p, &longer, &id).is_err());
        Ok(())
    }

    #[test]
    fn the_damaged_block_is_named_by_its_offset() -> Result<()> {
        let p = keys(1);
        let (bytes, id, _) = sample(&p, 3000, "d")?;
        let second = u64::from(SEALED_BLOCK_LEN) + SEAL_OVERHEAD as u64;
        let mut bad = bytes.clone();
        bad[second as usize + 100] ^= 1;
        match open(&p, &bad, &id).err() {
            Some(Error::Corrupt { offset, what, .. }) => {
                assert_eq!(offset, second, "{what}");
                assert!(what.contains("authentication failed"), "{what}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn swapped_reordered_and_spliced_manifests_fail_authentication() -> Result<()> {
        let p = keys(1);
        let (a, a_id, _) = sample(&p, 3000, "a")?;
        let (b, b_id, _) = sample(&p, 3000, "b")?;
        assert_eq!(a.len(), b.len());
        // B's bytes under A's name: the footer does not authenticate.
        assert!(matches!(open(&p, &b, &a_id), Err(Error::Corrupt { .. })));
        assert!(matches!(open(&p, &a, &b_id), Err(Error::Corrupt { .. })));
        // Blocks 0 and 1 of A swapped: each is bound to its index.
        let block = SEALED_BLOCK_LEN as usize + SEAL_OVERHEAD;
        let mut reordered = a.clone();
        reordered[..2 * block].copy_from_slice(&[&a[block..2 * block], &a[..block]].concat());
        assert!(matches!(
            open(&p, &reordered, &a_id),
            Err(Error::Corrupt { .. })
        ));
        // Block 1 of B spliced into A: bound to B's salt.
        let mut spliced = a.clone();
        spliced[block..2 * block].copy_from_slice(&b[block..2 * block]);
        assert!(matches!(
            open(&p, &spliced, &a_id),
            Err(Error::Corrupt { .. })
        ));
        // A plain manifest in an encrypted repository, and another key: refused.
        let (plain, plain_id, _) = sample(&Protection::Plain, 3000, "a")?;
        assert!(open(&p, &plain, &plain_id).is_err());
        assert!(open(&keys(2), &a, &a_id).is_err());
        Ok(())
    }

    /// `format-spec/vectors/manifest-sealed.hex` is `manifest.hex` sealed with the master
    /// secret of 32 bytes 0x42 in blocks of 64 bytes (its first line gives its snapshot id);
    /// regenerated with STACKVAULT_UPDATE_VECTORS (new salt and nonces, same plaintext).
    #[test]
    fn the_sealed_vector_opens_to_the_manifest_vector() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../format-spec/vectors");
        let read = |name: &str| -> Result<(Option<String>, Vec<u8>)> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("# snapshot id "))
                .map(|s| s.trim().to_string());
            let digits: String = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .flat_map(|l| l.split_whitespace())
                .collect();
            let bytes = crate::format::unhex(&digits)
                .ok_or_else(|| Error::corrupt(path.display(), 0, "not hex"))?;
            Ok((id, bytes))
        };
        let (_, plain) = read("manifest.hex")?;
        let p = keys(0x42);
        let id = hex(p.object_id_hasher().update(&plain).finalize().as_bytes());
        let path = dir.join("manifest-sealed.hex");
        if std::env::var_os("STACKVAULT_UPDATE_VECTORS").is_some() {
            let mut out = Vec::new();
            let mut sealer = BlockSealer::with_block_len(p.clone(), 64)?;
            sealer.write(&mut out, &plain, "vector")?;
            sealer.finish(&mut out, &id, "vector")?;
            let mut text = format!("# snapshot id {id}\n");
            for line in out.chunks(32) {
                text.push_str(&hex(line));
                text.push('\n');
            }
            std::fs::write(&path, text).map_err(|e| Error::io("write", &path, e))?;
        }
        let (stated, sealed) = read("manifest-sealed.hex")?;
        assert_eq!(stated.as_deref(), Some(id.as_str()));
        assert_eq!(
            Some(sealed.len() as u64),
            sealed_size(plain.len() as u64, 64)
        );
        let object = SealedObject::open(Box::new(&sealed[..]), &p, &id, "vector")?;
        assert_eq!(object.read_at(0, plain.len())?, plain);
        assert_eq!(object.read_at(60, 10)?, plain[60..70]);
        let m = open(&p, &sealed, &id)?;
        assert_eq!(m.segment_count(), 2);
        Ok(())
    }

    #[test]
    fn plain_manifests_are_unchanged() -> Result<()> {
        let (plain, id, _) = sample(&Protection::Plain, 10, "d")?;
        assert_eq!(id, hex(blake3::hash(&plain).as_bytes()));
        assert_eq!(&plain[..8], &crate::format::manifest::MANIFEST_MAGIC);
        Ok(())
    }
}
