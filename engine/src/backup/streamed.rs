//! Reading, splitting and naming a segment in one pass over the CPU cache.
//!
//! A full read of a segment (4 MiB) into its buffer leaves the buffer in main memory, not in
//! the cache: the zero filter, the cut decisions and the chunk ids then each read it back
//! from memory, and for an incremental backup of a disk that barely changed those passes
//! (and the kernel's copy from the page cache) are nearly all the work. Here the segment is
//! read in windows of [`WINDOW`] bytes, and each window is scanned for zero blocks, cut and
//! hashed right after it is read, while it is still in the cache; only the new chunks'
//! compression reads the buffer again later.
//!
//! Invariant: the pieces and ids equal [`Chunker::split`] of the whole segment and
//! [`Protection::chunk_id`] of each data piece (a property test holds it to that). The cut
//! decisions are made block by block as the aligned chunker's are, so this applies to the
//! aligned chunker only; a run of zero blocks is held back until it either reaches the hole
//! minimum (then it is a hole and ends the data run before it) or ends short (then its
//! blocks are data and are decided in order). A chunk's bytes are fed to its hasher up to
//! the first held-back zero block, so no byte is hashed twice.

use crate::chunker::{is_zero, AlignedSizes, Chunker, Piece};
use crate::crypto::Protection;
use crate::error::Result;
use crate::format::config::ZERO_BLOCK;
use crate::format::ChunkId;
use crate::source::{fill_from_map, DiskSource, SourceExtent};

/// Bytes read and processed at a time: small enough to stay in a core's L2 cache while it is
/// scanned, cut and hashed, large enough that a read's system call costs nothing. (Reading
/// the 4 GiB bench disk from the page cache in 4 MiB reads, each followed by one pass over
/// the buffer, cost 1.8× the CPU seconds of 256 KiB reads each followed by its pass: a C
/// loop, same run; the kernel's copy was 40 % of a gen1 backup's samples.)
pub(super) const WINDOW: usize = 256 * 1024;

/// A segment read, split and named in one pass.
pub(super) struct Streamed {
    pub(super) pieces: Vec<Piece>,
    /// The id of each data piece, in order.
    pub(super) ids: Vec<ChunkId>,
    pub(super) bytes_read: u64,
}

/// Fills `buf` (the segment at disk `offset`, whose source extents are `map`) window by
/// window, splitting and hashing each window as it arrives. `None` when the chunker cannot
/// cut block by block (FastCDC, fixed size): the caller reads and splits the whole segment.
pub(super) fn read_split_hash(
    source: &dyn DiskSource,
    map: &[SourceExtent],
    offset: u64,
    buf: &mut [u8],
    chunker: &Chunker,
    protection: &Protection,
) -> Result<Option<Streamed>> {
    let Some(mut splitter) = Splitter::new(chunker, protection, buf.len()) else {
        return Ok(None);
    };
    let mut bytes_read = 0u64;
    let mut from = 0usize;
    while from < buf.len() {
        let to = from.saturating_add(WINDOW).min(buf.len());
        let (at, end) = (offset + from as u64, offset + to as u64);
        let window = clip(map, at, end);
        bytes_read += fill_from_map(source, &window, at, &mut buf[from..to])?;
        splitter.advance(buf, to);
        from = to;
    }
    let (pieces, ids) = splitter.finish(buf);
    Ok(Some(Streamed {
        pieces,
        ids,
        bytes_read,
    }))
}

/// The parts of `map` inside `[from, to)`.
fn clip(map: &[SourceExtent], from: u64, to: u64) -> Vec<SourceExtent> {
    map.iter()
        .filter_map(|e| {
            let start = e.offset.max(from);
            let end = e.offset.saturating_add(e.len).min(to);
            // `then`, not `then_some`: the length exists only when the extent meets the range.
            (start < end).then(|| SourceExtent {
                offset: start,
                len: end - start,
                kind: e.kind,
            })
        })
        .collect()
}

/// The aligned chunker's split of one segment, made block by block as the bytes arrive.
struct Splitter<'a> {
    chunker: &'a Chunker,
    sizes: AlignedSizes,
    seed: u64,
    /// The segment's length.
    len: usize,
    /// The next block to look at.
    pos: usize,
    /// Where the open chunk starts (nothing open when it equals the position decided up to).
    chunk_start: usize,
    /// The start of the run of zero blocks just before `pos`, held back.
    zero_run: Option<usize>,
    /// The held-back run has reached the hole minimum: it is a hole, whatever follows.
    hole: bool,
    /// Holds the open chunk's bytes `chunk_start..hashed_to`.
    hasher: blake3::Hasher,
    hashed_to: usize,
    pieces: Vec<Piece>,
    ids: Vec<ChunkId>,
}

impl<'a> Splitter<'a> {
    fn new(chunker: &'a Chunker, protection: &Protection, len: usize) -> Option<Self> {
        let (sizes, seed) = chunker.aligned()?;
        Some(Splitter {
            chunker,
            sizes,
            seed,
            len,
            pos: 0,
            chunk_start: 0,
            zero_run: None,
            hole: false,
            hasher: protection.chunk_hasher(),
            hashed_to: 0,
            pieces: Vec::new(),
            ids: Vec::new(),
        })
    }

    /// Decides the blocks of `buf[..upto]` not looked at yet; `upto` is a multiple of the
    /// block size or the segment's length, and `buf[..upto]` holds the segment's bytes.
    fn advance(&mut self, buf: &[u8], upto: usize) {
        let block = ZERO_BLOCK as usize;
        let upto = upto.min(self.len);
        while self.pos < upto {
            let p = self.pos;
            let end = (p + block).min(self.len);
            if is_zero(&buf[p..end]) {
                let z = *self.zero_run.get_or_insert(p);
                if !self.hole && end - z >= self.chunker.zero_run_min() {
                    // A hole ends the data run before it, and with it the open chunk.
                    self.end_chunk(buf, z);
                    self.hole = true;
                }
            } else {
                self.end_zero_run(buf, p);
                self.data_block(buf, p, end);
            }
            self.pos = end;
        }
        // Hash what is decided of the open chunk while it is in the cache.
        let hash_to = self.zero_run.unwrap_or(self.pos);
        if !self.hole && hash_to > self.hashed_to {
            self.hasher.update(&buf[self.hashed_to..hash_to]);
            self.hashed_to = hash_to;
        }
    }

    /// The pieces and the ids of the data pieces, once every block was seen.
    fn finish(mut self, buf: &[u8]) -> (Vec<Piece>, Vec<ChunkId>) {
        self.advance(buf, self.len);
        self.end_zero_run(buf, self.len);
        // The end of the segment ends the last chunk.
        self.end_chunk(buf, self.len);
        (self.pieces, self.ids)
    }

    /// The held-back zero run ends at `at`: a hole, or data blocks decided now in order.
    fn end_zero_run(&mut self, buf: &[u8], at: usize) {
        let Some(z) = self.zero_run.take() else {
            return;
        };
        if self.hole {
            self.pieces.push(Piece::Zero {
                start: z,
                len: at - z,
            });
            self.hole = false;
            self.chunk_start = at;
            self.hashed_to = at;
        } else {
            let block = ZERO_BLOCK as usize;
            let mut q = z;
            while q < at {
                let e = (q + block).min(at);
                self.data_block(buf, q, e);
                q = e;
            }
        }
    }

    /// The data block `buf[p..end]` joins the open chunk, which may end after it.
    fn data_block(&mut self, buf: &[u8], p: usize, end: usize) {
        let len = end - self.chunk_start;
        if self
            .chunker
            .aligned_cut(&buf[p..end], len, self.sizes, self.seed)
        {
            self.end_chunk(buf, end);
        }
    }

    /// Ends the open chunk at `at`, naming it, if it holds any bytes.
    fn end_chunk(&mut self, buf: &[u8], at: usize) {
        if at > self.chunk_start {
            if at > self.hashed_to {
                self.hasher.update(&buf[self.hashed_to..at]);
            }
            self.ids.push(ChunkId(*self.hasher.finalize().as_bytes()));
            self.hasher.reset();
            self.pieces.push(Piece::Data {
                start: self.chunk_start,
                len: at - self.chunk_start,
            });
        }
        self.chunk_start = at;
        self.hashed_to = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{MasterSecret, RepoKeys};
    use crate::format::config::{ChunkerParams, RepoConfig};
    use crate::source::ExtentKind;
    use proptest::prelude::*;

    #[test]
    fn clip_keeps_only_what_meets_the_window() {
        // An extent wholly before and one wholly after the window: a window of a sparse
        // file's segment (`then_some` computed their lengths anyway and overflowed).
        let e = |offset, len, kind| SourceExtent { offset, len, kind };
        let map = [
            e(0, 100, ExtentKind::Data),
            e(100, 400, ExtentKind::Zero),
            e(500, 100, ExtentKind::Data),
        ];
        assert_eq!(clip(&map, 150, 450), vec![e(150, 300, ExtentKind::Zero)]);
        assert_eq!(
            clip(&map, 50, 550),
            vec![
                e(50, 50, ExtentKind::Data),
                e(100, 400, ExtentKind::Zero),
                e(500, 50, ExtentKind::Data)
            ]
        );
        assert!(clip(&map, 600, 700).is_empty());
    }

    /// Blocks of random data, zeros and short zero runs, by `kinds` (0 zero, else data).
    fn disk(kinds: &[u8], seed: u64, tail: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::new();
        for &k in kinds {
            for _ in 0..ZERO_BLOCK {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push(if k == 0 { 0 } else { x as u8 });
            }
        }
        out.extend(std::iter::repeat_n(7u8, tail));
        out
    }

    fn streamed(c: &Chunker, p: &Protection, data: &[u8], window: usize) -> Streamed {
        let mut s = Splitter::new(c, p, data.len()).expect("aligned chunker");
        let mut to = 0;
        while to < data.len() {
            to = (to + window).min(data.len());
            s.advance(data, to);
        }
        let (pieces, ids) = s.finish(data);
        Streamed {
            pieces,
            ids,
            bytes_read: 0,
        }
    }

    proptest! {
        /// Block by block, in any window size, plain or keyed: the pieces of a whole split
        /// and the ids `chunk_id` gives them.
        #[test]
        fn streamed_split_equals_whole_split(
            kinds in proptest::collection::vec(0u8..4, 0..96),
            seed in any::<u64>(),
            tail in prop_oneof![Just(0usize), 1usize..4096],
            window_blocks in 1usize..40,
            keyed in any::<bool>(),
            zero_run_blocks in 1u32..5,
        ) {
            let mut cfg = RepoConfig::new([0; 16], 0, ChunkerParams::DEFAULT);
            cfg.zero_run_min = zero_run_blocks * ZERO_BLOCK;
            let keys = RepoKeys::derive(&MasterSecret::from_bytes([5; 32]));
            let protection = if keyed { Protection::Encrypted(Box::new(keys)) } else { Protection::Plain };
            let chunker = Chunker::keyed(&cfg, protection.chunker_key()).expect("chunker");
            // Half data blocks, half zero blocks: zero runs both shorter and longer than holes.
            let data = disk(&kinds.iter().map(|k| u8::from(*k >= 2)).collect::<Vec<_>>(), seed, tail);
            let mut whole = Vec::new();
            chunker.split(&data, &mut whole);
            let ids: Vec<ChunkId> = whole
                .iter()
                .filter_map(|p| match *p {
                    Piece::Data { start, len } => Some(protection.chunk_id(&data[start..start + len])),
                    Piece::Zero { .. } => None,
                })
                .collect();
            let s = streamed(&chunker, &protection, &data, window_blocks * ZERO_BLOCK as usize);
            prop_assert_eq!(&s.pieces, &whole);
            prop_assert_eq!(&s.ids, &ids);
        }
    }

    /// Chunkers that cannot cut block by block are left to the whole-segment path.
    #[test]
    fn fastcdc_and_fixed_are_not_streamed() {
        for params in [ChunkerParams::FASTCDC, ChunkerParams::Fixed { size: 65536 }] {
            let cfg = RepoConfig::new([0; 16], 0, params);
            assert!(Splitter::new(&Chunker::new(&cfg), &Protection::Plain, 1 << 20).is_none());
        }
    }
}
