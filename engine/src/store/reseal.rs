//! Taking one sealed frame out of an encrypted repository's pack, for another repository to
//! seal again (`copy` between repositories that share their naming keys, see
//! [`crate::copy`]).
//!
//! A frame is fetched with one ranged read (its sealed length, from the source's index),
//! opened with the source's data key under its pack name and offset, and taken apart into
//! its chunk list and its stored (compressed) bytes; the destination's pack writer seals
//! those again under its own key, pack name and offset. Nothing is decompressed or
//! recompressed: the bytes are authenticated (the source's tag) and their crc32 checked, and
//! the chunk the caller looked up must sit in the frame where the index says.
//!
//! Invariants: no byte of an opened frame is used before its tag verified; a frame that
//! opens but disagrees with its header or with the index is damage at the source (exit 3),
//! named by pack and offset.

use super::{pack_key, Backend};
use crate::crypto::Protection;
use crate::error::{Error, Result};
use crate::format::pack::{
    check_protection, decode_frame_list, open_sealed_frame, Compression, RecordLocation,
    FRAME_HEADER_LEN, MAX_SEALED_FRAME_LEN,
};
use crate::format::ChunkId;

/// The contents of one opened frame, ready for
/// [`PackWriter::add_frame`](super::pack::PackWriter::add_frame).
#[derive(Debug)]
pub struct OpenedFrame {
    /// The frame's chunks (id, raw length), in frame order.
    pub chunks: Vec<(ChunkId, u32)>,
    pub compression: Compression,
    /// The frame's stored bytes, compressed as `compression` says.
    pub stored: Vec<u8>,
    /// The sum of its chunks' raw lengths.
    pub raw_len: u32,
}

/// Fetches and opens the sealed frame holding the chunk at `loc` in pack `pack` of the
/// encrypted repository served by `backend` with `protection`.
pub fn open_frame(
    backend: &dyn Backend,
    protection: &Protection,
    pack: &str,
    loc: &RecordLocation,
) -> Result<OpenedFrame> {
    let location = format!("pack {pack}");
    let offset = loc.offset;
    check_protection(loc.version, protection, &location, offset)?;
    if !protection.is_encrypted() {
        return Err(Error::Internal(format!(
            "{location}: only sealed frames are taken whole"
        )));
    }
    if loc.stored_len > MAX_SEALED_FRAME_LEN {
        return Err(Error::corrupt(
            &location,
            offset,
            format!(
                "sealed frame of {} bytes is larger than any frame (rebuild the index)",
                loc.stored_len
            ),
        ));
    }
    let len = usize::try_from(loc.read_len())
        .map_err(|_| Error::corrupt(&location, offset, "frame too large"))?;
    let sealed = backend
        .get_range(&pack_key(pack)?, offset, len)
        .map_err(|e| match e {
            Error::NotFound { .. } => Error::corrupt(&location, offset, "the pack file is missing"),
            other => other,
        })?;
    let (plain, header) = open_sealed_frame(protection, pack, offset, &sealed, &location)?;
    let stored_end = FRAME_HEADER_LEN + header.stored_len as usize;
    let (stored, list) = match (
        plain.get(FRAME_HEADER_LEN..stored_end),
        plain.get(stored_end..),
    ) {
        (Some(stored), Some(list)) => (stored, list),
        _ => return Err(Error::corrupt(&location, offset, "sealed frame truncated")),
    };
    if crc32fast::hash(stored) != header.crc32 {
        return Err(Error::corrupt(
            &location,
            offset,
            "the frame's stored bytes fail their crc32",
        ));
    }
    let chunks = decode_frame_list(list, &header, offset + stored_end as u64, &location)?;
    // The chunk the caller looked up must be where its index row says.
    let mut at = 0u32;
    let mut found = false;
    for (id, len) in &chunks {
        found |= *id == loc.id && at == loc.in_frame && *len == loc.raw_len;
        at = at.saturating_add(*len);
    }
    if !found || header.raw_len != loc.frame_raw_len {
        return Err(Error::corrupt(
            &location,
            offset,
            format!(
                "frame does not hold chunk {} where the index says (rebuild the index)",
                loc.id.to_hex()
            ),
        ));
    }
    Ok(OpenedFrame {
        chunks,
        compression: header.compression,
        stored: stored.to_vec(),
        raw_len: header.raw_len,
    })
}
