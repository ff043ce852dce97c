//! Frames: the new chunks of a segment, grouped in disk order and compressed together.
//!
//! A frame holds consecutive new chunks of one segment up to [`FRAME_TARGET_LEN`] raw bytes
//! (a larger chunk is a frame alone) and is compressed as one zstd frame, so that small
//! chunks compress with their neighbours while a restore still decompresses little more than
//! it needs. Frames never span segments: segments are compressed in parallel. The byte
//! layout of a frame in a pack is `format::pack`'s; this module only decides the grouping.

use crate::error::Result;
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
pub(super) fn compress_frames(
    buf: &[u8],
    pieces: &[NewPiece],
    level: i32,
) -> Result<Vec<NewFrame>> {
    let mut frames = Vec::new();
    let mut raw: Vec<u8> = Vec::with_capacity(FRAME_TARGET_LEN);
    let mut chunks: Vec<(ChunkId, u32)> = Vec::new();
    let mut flush = |raw: &mut Vec<u8>, chunks: &mut Vec<(ChunkId, u32)>| -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (compression, stored) = compress(raw, level)?;
        frames.push(NewFrame {
            chunks: std::mem::take(chunks),
            compression,
            stored,
        });
        raw.clear();
        Ok(())
    };
    for p in pieces {
        if !raw.is_empty() && raw.len() + p.len > FRAME_TARGET_LEN {
            flush(&mut raw, &mut chunks)?;
        }
        raw.extend_from_slice(&buf[p.start..p.start + p.len]);
        chunks.push((p.id, p.len as u32));
    }
    flush(&mut raw, &mut chunks)?;
    Ok(frames)
}
