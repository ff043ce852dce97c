//! Frames: the new chunks of a segment, grouped in disk order and compressed together.
//!
//! A frame holds consecutive new chunks of one segment up to [`FRAME_TARGET_LEN`] raw bytes
//! (a larger chunk is a frame alone) and is compressed as one zstd frame, so that small
//! chunks compress with their neighbours while a restore still decompresses little more than
//! it needs. Frames never span segments: segments are compressed in parallel. The byte
//! layout of a frame in a pack is `format::pack`'s; this module only decides the grouping.

use crate::error::{Error, Result};
use crate::format::pack::{Compression, FRAME_TARGET_LEN};
use crate::format::ChunkId;
use crate::store::pack::compress;

/// Chunks that the repository did not have when their segment was processed, in disk
/// order, compressed together as one frame.
pub(super) struct NewFrame {
    /// (id, raw length) of each chunk, in frame order.
    pub(super) chunks: Vec<(ChunkId, u32)>,
    pub(super) compression: Compression,
    pub(super) stored: Vec<u8>,
    /// Packs the run had indexed before its segment's dedup lookups (see `dedup`).
    pub(super) since: u64,
}

/// A chunk of the segment buffer that the repository does not have yet.
pub(super) struct NewPiece {
    pub(super) id: ChunkId,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// The compress step of a segment: groups its new chunks, in disk order, into frames of at
/// most [`FRAME_TARGET_LEN`] raw bytes (a larger chunk is a frame alone) and compresses each
/// frame as one zstd frame. Frames never span segments: segments are compressed in parallel.
///
/// A frame whose chunks lie back to back in `buf` (all of a gen0's new data, most of an
/// incremental's) is compressed where it lies; only a frame with gaps (a known chunk or a
/// zero run between its chunks) is first gathered into one buffer. The bytes are the same
/// either way: zstd sees the concatenation of the frame's chunks.
pub(super) fn compress_frames(
    buf: &[u8],
    pieces: &[NewPiece],
    level: i32,
    since: u64,
) -> Result<Vec<NewFrame>> {
    let mut frames = Vec::new();
    let mut gathered: Vec<u8> = Vec::new();
    let mut first = 0usize;
    while first < pieces.len() {
        // The frame: pieces[first..end], at most FRAME_TARGET_LEN raw bytes unless one chunk
        // alone is larger.
        let mut end = first;
        let mut raw_len = 0usize;
        let mut contiguous = true;
        while let Some(p) = pieces.get(end) {
            if end > first && raw_len + p.len > FRAME_TARGET_LEN {
                break;
            }
            if end > first && pieces[end - 1].start + pieces[end - 1].len != p.start {
                contiguous = false;
            }
            raw_len += p.len;
            end += 1;
        }
        let frame = &pieces[first..end];
        let raw: &[u8] = if contiguous {
            let start = frame[0].start;
            piece_bytes(buf, start, raw_len)?
        } else {
            gathered.clear();
            for p in frame {
                gathered.extend_from_slice(piece_bytes(buf, p.start, p.len)?);
            }
            &gathered
        };
        let (compression, stored) = compress(raw, level)?;
        frames.push(NewFrame {
            chunks: frame.iter().map(|p| (p.id, p.len as u32)).collect(),
            compression,
            stored,
            since,
        });
        first = end;
    }
    Ok(frames)
}

/// `len` bytes of the segment buffer from `start`: a piece the chunker cut from it.
fn piece_bytes(buf: &[u8], start: usize, len: usize) -> Result<&[u8]> {
    start
        .checked_add(len)
        .and_then(|end| buf.get(start..end))
        .ok_or_else(|| {
            Error::Internal(format!(
                "chunk at {start} of {len} bytes lies outside its segment of {} bytes",
                buf.len()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames cut from pieces back to back and from pieces with gaps hold the same bytes as
    /// the concatenation of their chunks, within the target size.
    #[test]
    fn frames_hold_their_chunks_whether_or_not_contiguous() -> Result<()> {
        let buf: Vec<u8> = (0..1_200_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let piece = |start: usize, len: usize| NewPiece {
            id: ChunkId::of(&buf[start..start + len]),
            start,
            len,
        };
        let back_to_back: Vec<NewPiece> = (0..20).map(|i| piece(i * 40_000, 40_000)).collect();
        let gaps: Vec<NewPiece> = (0..20).map(|i| piece(i * 50_000, 40_000)).collect();
        let big = vec![
            piece(0, 100_000),
            piece(100_000, FRAME_TARGET_LEN + 5),
            piece(900_000, 7),
        ];
        for pieces in [back_to_back, gaps, big] {
            let frames = compress_frames(&buf, &pieces, 3, 0)?;
            let mut next = pieces.iter();
            for f in &frames {
                let mut expected = Vec::new();
                for &(id, len) in &f.chunks {
                    let p = next
                        .next()
                        .ok_or_else(|| Error::Internal("extra chunk".into()))?;
                    assert_eq!((id, len as usize), (p.id, p.len));
                    expected.extend_from_slice(&buf[p.start..p.start + p.len]);
                }
                assert!(expected.len() <= FRAME_TARGET_LEN || f.chunks.len() == 1);
                let raw = match f.compression {
                    Compression::Zstd => zstd::bulk::decompress(&f.stored, expected.len())
                        .map_err(|e| Error::Internal(e.to_string()))?,
                    _ => f.stored.clone(),
                };
                assert_eq!(raw, expected);
            }
            assert!(next.next().is_none(), "every chunk is in a frame");
        }
        assert!(compress_frames(&buf, &[piece(0, 10)], 3, 0).is_ok());
        let outside = NewPiece {
            id: ChunkId::of(b""),
            start: buf.len() - 1,
            len: 2,
        };
        assert!(compress_frames(&buf, &[outside], 3, 0).is_err());
        Ok(())
    }
}
