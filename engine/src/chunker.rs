//! Zero filter and content-defined chunking of one segment.
//!
//! The virtual disk is cut into aligned segments (the unit of parallelism and of change
//! tracking); this module splits one segment's bytes into pieces. First the zero filter marks
//! runs of whole, aligned 4 KiB zero blocks of at least `zero_run_min` bytes as holes: they are
//! never hashed, compressed or stored. The data between holes is cut by the repository's
//! chunker (FastCDC 2020 or fixed size); a hole and a segment boundary always cut.
//!
//! Invariant: the pieces depend only on the segment's bytes and the repository config, so the
//! same disk content always gives the same pieces, whichever container or parent it came
//! from. This module knows nothing of repositories or I/O.

use fastcdc::v2020::{FastCDC, Normalization};

use crate::format::config::{ChunkerParams, RepoConfig, ZERO_BLOCK};

/// One piece of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` zero bytes starting at `start` (segment-relative).
    Zero { start: usize, len: usize },
    /// A chunk: `data[start..start + len]`.
    Data { start: usize, len: usize },
}

impl Piece {
    pub fn len(&self) -> usize {
        match *self {
            Piece::Zero { len, .. } | Piece::Data { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Splits segments into zero runs and chunks according to a repository config.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    zero_run_min: usize,
}

impl Chunker {
    pub fn new(config: &RepoConfig) -> Self {
        Chunker {
            params: config.chunker,
            zero_run_min: config.zero_run_min as usize,
        }
    }

    /// Splits one segment. `data` is the whole segment (disk offset a multiple of 4 KiB).
    /// Pieces are appended to `out` in order and cover `data` exactly.
    pub fn split(&self, data: &[u8], out: &mut Vec<Piece>) {
        let mut data_start = 0;
        for (zero_start, zero_len) in zero_runs(data, self.zero_run_min) {
            self.cut_data(data, data_start, zero_start, out);
            out.push(Piece::Zero {
                start: zero_start,
                len: zero_len,
            });
            data_start = zero_start + zero_len;
        }
        self.cut_data(data, data_start, data.len(), out);
    }

    fn cut_data(&self, data: &[u8], start: usize, end: usize, out: &mut Vec<Piece>) {
        if start >= end {
            return;
        }
        match self.params {
            ChunkerParams::FastCdc2020 {
                min,
                avg,
                max,
                level,
                seed,
            } => {
                let level = match level {
                    0 => Normalization::Level0,
                    1 => Normalization::Level1,
                    2 => Normalization::Level2,
                    _ => Normalization::Level3,
                };
                let cdc = FastCDC::with_level_and_seed(
                    &data[start..end],
                    min as usize,
                    avg as usize,
                    max as usize,
                    level,
                    seed,
                );
                out.extend(cdc.map(|c| Piece::Data {
                    start: start + c.offset,
                    len: c.length,
                }));
            }
            ChunkerParams::Fixed { size } => {
                // Cut at multiples of `size` from the segment start, so that fixed chunks stay
                // aligned to the disk whatever holes surround them.
                let size = size as usize;
                let mut pos = start;
                while pos < end {
                    let next = ((pos / size) + 1) * size;
                    let stop = next.min(end);
                    out.push(Piece::Data {
                        start: pos,
                        len: stop - pos,
                    });
                    pos = stop;
                }
            }
        }
    }
}

/// True when every byte is zero. Folds in blocks so the compiler can vectorise.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(128);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// Runs of whole 4 KiB zero blocks (the last block may be short) of at least `min_len` bytes,
/// as `(start, len)` pairs in order.
pub fn zero_runs(data: &[u8], min_len: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut run_start: Option<usize> = None;
    let block = ZERO_BLOCK as usize;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + block).min(data.len());
        if is_zero(&data[pos..end]) {
            run_start.get_or_insert(pos);
        } else if let Some(s) = run_start.take() {
            if pos - s >= min_len {
                runs.push((s, pos - s));
            }
        }
        pos = end;
    }
    if let Some(s) = run_start {
        if data.len() - s >= min_len {
            runs.push((s, data.len() - s));
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(chunker: ChunkerParams) -> RepoConfig {
        RepoConfig::new([0; 16], 0, chunker)
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn covers_exactly(pieces: &[Piece], len: usize) -> bool {
        let mut pos = 0;
        for p in pieces {
            let start = match *p {
                Piece::Zero { start, .. } | Piece::Data { start, .. } => start,
            };
            if start != pos || p.is_empty() {
                return false;
            }
            pos += p.len();
        }
        pos == len
    }

    #[test]
    fn zero_runs_respect_minimum_and_blocks() {
        let mut d = vec![1u8; 64 * 1024];
        d[4096..4096 * 5].fill(0); // 16 KiB hole
        d[4096 * 8 + 1..4096 * 10].fill(0); // not block aligned: only one whole block
        assert_eq!(zero_runs(&d, 8192), vec![(4096, 16384)]);
        assert_eq!(zero_runs(&d, 4096), vec![(4096, 16384), (4096 * 9, 4096)]);
        let z = vec![0u8; 10000];
        assert_eq!(zero_runs(&z, 4096), vec![(0, 10000)]);
    }

    #[test]
    fn holes_cut_and_data_chunks_bounded() {
        let c = Chunker::new(&config(ChunkerParams::DEFAULT));
        let mut d = pseudo_random(4 << 20, 1);
        d[1 << 20..(1 << 20) + (256 << 10)].fill(0);
        let mut pieces = Vec::new();
        c.split(&d, &mut pieces);
        assert!(covers_exactly(&pieces, d.len()));
        assert!(pieces.contains(&Piece::Zero {
            start: 1 << 20,
            len: 256 << 10
        }));
        let data: Vec<_> = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Data { .. }))
            .collect();
        assert!(data.iter().all(|p| p.len() <= 64 << 10));
        let avg = (d.len() - (256 << 10)) / data.len();
        assert!((8 << 10..=32 << 10).contains(&avg), "avg chunk {avg}");
    }

    #[test]
    fn fixed_chunks_align_to_segment() {
        let c = Chunker::new(&config(ChunkerParams::Fixed { size: 65536 }));
        let mut d = pseudo_random(300_000, 2);
        d[65536..65536 * 3].fill(0);
        let mut pieces = Vec::new();
        c.split(&d, &mut pieces);
        assert!(covers_exactly(&pieces, d.len()));
        assert_eq!(
            pieces[1],
            Piece::Zero {
                start: 65536,
                len: 131072
            }
        );
        assert_eq!(
            pieces[2],
            Piece::Data {
                start: 196608,
                len: 65536
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn deterministic_and_covering(seed in any::<u64>(), len in 0usize..600_000, hole in 0usize..600_000) {
            let mut d = pseudo_random(len, seed);
            let h = hole.min(len);
            d[h..(h + 150_000).min(len)].fill(0);
            let c = Chunker::new(&config(ChunkerParams::DEFAULT));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            c.split(&d, &mut a);
            c.split(&d.clone(), &mut b);
            prop_assert_eq!(&a, &b);
            prop_assert!(covers_exactly(&a, len));
        }
    }
}
