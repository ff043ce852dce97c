//! Zero filter and content-defined chunking of one segment.
//!
//! The virtual disk is cut into aligned segments (the unit of parallelism and of change
//! tracking); this module splits one segment's bytes into pieces. First the zero filter marks
//! runs of whole, aligned 4 KiB zero blocks of at least `zero_run_min` bytes as holes: they are
//! never hashed, compressed or stored. The data between holes is cut by the repository's
//! chunker (block-aligned CDC, FastCDC 2020 or fixed size); a hole and a segment boundary
//! always cut.
//!
//! Invariant: the pieces depend only on the segment's bytes and the repository config (and,
//! in an encrypted repository, its chunker key), so the same disk content always gives the
//! same pieces, whichever container or parent it came from. This module knows nothing of
//! repositories or I/O.
//!
//! Keyed cuts (encrypted repositories, [`Chunker::keyed`]): the aligned chunker's decision
//! for a block is read from `PRF(k_cut, block_hash(block))` instead of the block hash itself,
//! with the PRF keyed BLAKE3 over the hash's 8 little-endian bytes, so whoever knows a file
//! but not the key cannot predict where its chunks end (the fix of Truong et al., "Breaking
//! and Fixing Content-Defined Chunking", 2025: a PRF applied to the per-position hash before
//! the cut decision). One PRF evaluation per 4 KiB block, only for blocks past the minimum
//! chunk size. Fixed-size chunks depend on offsets only and leak nothing about content, so
//! they need no key. FastCDC decides per byte from a gear table; keying it (a secret seed or
//! table) is what the paper breaks, so an encrypted repository refuses it.

use fastcdc::v2020::{FastCDC, Normalization};

use crate::error::{Error, Result};
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

    /// Segment-relative offset of the first byte.
    pub fn start(&self) -> usize {
        match *self {
            Piece::Zero { start, .. } | Piece::Data { start, .. } => start,
        }
    }

    /// Segment-relative offset just past the last byte.
    pub fn end(&self) -> usize {
        self.start() + self.len()
    }
}

/// Where a piece of a re-split segment comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resplit {
    /// The parent's piece number `i` of this segment, unchanged and not read.
    Parent(usize),
    /// A piece cut from the new bytes, which the caller hashes.
    New(Piece),
}

/// The aligned chunker's chunk sizes, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlignedSizes {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

/// Splits segments into zero runs and chunks according to a repository config.
#[derive(Clone, Debug)]
pub struct Chunker {
    params: ChunkerParams,
    zero_run_min: usize,
    /// The key of the cut decision (encrypted repositories), see the module doc.
    cut_key: Option<CutKey>,
}

/// The chunker's cut key; never printed.
#[derive(Clone)]
struct CutKey(zeroize::Zeroizing<[u8; 32]>);

impl std::fmt::Debug for CutKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CutKey(…)")
    }
}

impl Chunker {
    /// The unkeyed chunker of a plain repository.
    pub fn new(config: &RepoConfig) -> Self {
        Chunker {
            params: config.chunker,
            zero_run_min: config.zero_run_min as usize,
            cut_key: None,
        }
    }

    /// The chunker of a repository whose cut key is `key` (`Protection::chunker_key`): the
    /// unkeyed one when `None`. FastCDC with a key is refused (see the module doc).
    pub fn keyed(config: &RepoConfig, key: Option<&[u8; 32]>) -> Result<Self> {
        let mut chunker = Chunker::new(config);
        if let Some(key) = key {
            if let ChunkerParams::FastCdc2020 { .. } = config.chunker {
                return Err(Error::unsupported(format!(
                    "the {} chunker cannot be used in an encrypted repository: its cut points \
                     fingerprint known files whatever its seed; encrypted repositories use the \
                     aligned chunker (the default) or fixed-size chunks",
                    config.chunker.describe()
                )));
            }
            chunker.cut_key = Some(CutKey(zeroize::Zeroizing::new(*key)));
        }
        Ok(chunker)
    }

    /// The aligned chunker's sizes and seed, when this chunker is one: the chunker a segment
    /// can be split by while it is read, block by block (`backup::streamed`).
    pub fn aligned(&self) -> Option<(AlignedSizes, u64)> {
        match self.params {
            ChunkerParams::Aligned {
                min,
                avg,
                max,
                seed,
            } => Some((
                AlignedSizes {
                    min: min as usize,
                    avg: avg as usize,
                    max: max as usize,
                },
                seed,
            )),
            _ => None,
        }
    }

    /// The minimum length of a run of zero blocks that becomes a hole.
    pub fn zero_run_min(&self) -> usize {
        self.zero_run_min
    }

    /// The aligned chunker's decision inside a data run: whether a chunk that is `len` bytes
    /// long once `block` (its last block) is added ends after it. A data run's last block
    /// always ends a chunk too; that is the caller's to know.
    pub fn aligned_cut(&self, block: &[u8], len: usize, sizes: AlignedSizes, seed: u64) -> bool {
        len >= sizes.max
            || (len >= sizes.min && {
                let mut h = block_hash(block, seed);
                if let Some(key) = &self.cut_key {
                    h = keyed_cut_bits(&key.0, h);
                }
                let mask = if len < sizes.avg {
                    ALIGNED_MASK_SMALL
                } else {
                    ALIGNED_MASK_LARGE
                };
                h & mask == 0
            })
    }

    /// Whether cut decisions are keyed.
    pub fn is_keyed(&self) -> bool {
        self.cut_key.is_some()
    }

    /// Splits one segment. `data` is the whole segment (disk offset a multiple of 4 KiB).
    /// Pieces are appended to `out` in order and cover `data` exactly.
    pub fn split(&self, data: &[u8], out: &mut Vec<Piece>) {
        self.split_from(data, 0, out);
    }

    /// Splits `data[start..]`, where `data` is (a prefix of) a segment and `start` a restart
    /// point: the segment start, or a cut whose 4 KiB block holding byte `start - 1` is not
    /// all zero, so that no zero run crosses it and the pieces after it depend only on the
    /// bytes after it. On a prefix, only cuts before its trailing zero blocks are final.
    fn split_from(&self, data: &[u8], start: usize, out: &mut Vec<Piece>) {
        let block = ZERO_BLOCK as usize;
        // The block holding `start` (if `start` is inside one) is data: scan from the next.
        let scan = (start.div_ceil(block) * block).min(data.len());
        let mut data_start = start;
        for (zero_start, zero_len) in zero_runs(&data[scan..], self.zero_run_min) {
            let zero_start = zero_start + scan;
            self.cut_data(data, data_start, zero_start, out);
            out.push(Piece::Zero {
                start: zero_start,
                len: zero_len,
            });
            data_start = zero_start + zero_len;
        }
        self.cut_data(data, data_start, data.len(), out);
    }

    /// Re-splits a segment whose bytes differ from its parent's only inside `changed`
    /// (segment-relative, sorted, disjoint ranges of whole 4 KiB blocks, the last possibly
    /// cut short by the segment end), reading as little as it can.
    ///
    /// `buf` is the segment's buffer (its length is the segment's); `load(start, dest)` must
    /// fill `dest` with the new bytes at `start`. Around each change, splitting restarts at
    /// the last parent cut between two chunks before it whose preceding block holds data (a
    /// restart point, see `split_from`: the parent's cut there cannot move), and stops at the
    /// first new cut after it that is also a parent cut: from there on the pieces are the
    /// parent's, because cut points depend only on the bytes since the previous cut. The result equals what [`Chunker::split`] gives for the whole new
    /// segment (a property test holds it to that).
    pub fn resplit(
        &self,
        parent: &[Piece],
        changed: &[(usize, usize)],
        buf: &mut [u8],
        load: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<Resplit>> {
        let seg_len = buf.len();
        let block = ZERO_BLOCK as usize;
        let starts: Vec<usize> = parent.iter().map(Piece::start).collect();
        if parent.last().map(Piece::end) != Some(seg_len) || starts.first() != Some(&0) {
            return Err(Error::InvalidArgument(
                "parent pieces do not cover the segment".into(),
            ));
        }
        // Blocks inside the parent's zero runs that no change touches are zeros: never read.
        let mut loaded = vec![false; seg_len.div_ceil(block)];
        for p in parent {
            if let Piece::Zero { start, len } = *p {
                loaded[start / block..(start + len).div_ceil(block)].fill(true);
            }
        }
        let blocks = loaded.len();
        for &(s, e) in changed {
            loaded[(s / block).min(blocks)..e.div_ceil(block).min(blocks)].fill(false);
        }
        for (i, known_zero) in loaded.iter().enumerate() {
            if *known_zero {
                buf[i * block..((i + 1) * block).min(seg_len)].fill(0);
            }
        }
        let mut ensure = |buf: &mut [u8], start: usize, end: usize| -> Result<()> {
            let (mut i, last) = (start / block, end.div_ceil(block));
            while i < last {
                if loaded[i] {
                    i += 1;
                    continue;
                }
                let j = (i..last).find(|&j| loaded[j]).unwrap_or(last);
                let (from, to) = (i * block, (j * block).min(seg_len));
                load(from, &mut buf[from..to])?;
                loaded[i..j].fill(true);
                i = j;
            }
            Ok(())
        };
        // The block holding byte q - 1 is not all zero (it must be loaded).
        let data_before = |buf: &[u8], q: usize| {
            let b = (q - 1) / block * block;
            !is_zero(&buf[b..(b + block).min(seg_len)])
        };
        let is_data = |k: usize| matches!(parent[k], Piece::Data { .. });

        let mut out = Vec::with_capacity(parent.len() + 8);
        let mut pieces = Vec::new();
        // Everything before `cursor` is final; `cursor` is a parent cut and a restart point.
        let (mut cursor, mut next_parent, mut next_change) = (0usize, 0usize, 0usize);
        while let Some(&(change_start, change_end)) = changed.get(next_change) {
            if change_end <= cursor {
                next_change += 1;
                continue;
            }
            // Restart at the last parent cut between two chunks before the change whose
            // preceding block holds data; the cursor always qualifies.
            let mut restart = cursor;
            let mut k = starts.partition_point(|&p| p <= change_start);
            while k > 1 {
                k -= 1;
                let p = starts[k];
                if p <= cursor {
                    break;
                }
                if is_data(k) && is_data(k - 1) {
                    ensure(buf, p - 1, p)?;
                    if data_before(buf, p) {
                        restart = p;
                        break;
                    }
                }
            }
            while next_parent < parent.len() && starts[next_parent] < restart {
                out.push(Resplit::Parent(next_parent));
                next_parent += 1;
            }
            // Read up to a little past the first parent cut after the change, and further
            // until the new cuts meet the parent's again.
            let after = starts.partition_point(|&p| p <= change_end);
            let first_cut = starts.get(after).copied().unwrap_or(seg_len);
            let mut read_end = (first_cut.div_ceil(block) * block + block).min(seg_len);
            loop {
                ensure(buf, restart, read_end)?;
                pieces.clear();
                self.split_from(&buf[..read_end], restart, &mut pieces);
                // On a prefix, cuts at or past its trailing zero blocks may still move.
                let mut final_before = read_end;
                if read_end < seg_len {
                    while final_before >= restart + block
                        && is_zero(&buf[final_before - block..final_before])
                    {
                        final_before -= block;
                    }
                } else {
                    final_before = seg_len + 1;
                }
                let (mut need, mut k) = (change_end, next_change);
                let mut resync = None;
                for (n, piece) in pieces.iter().enumerate() {
                    let q = piece.end();
                    if q >= final_before {
                        break;
                    }
                    while k < changed.len() && changed[k].0 < q {
                        need = need.max(changed[k].1);
                        k += 1;
                    }
                    // A cut of both splits after the changes: no zero run can cross it in
                    // either (it would not be a cut), so both continue from the same bytes.
                    if q >= need && (q == seg_len || starts.binary_search(&q).is_ok()) {
                        resync = Some((n, q, k));
                        break;
                    }
                }
                if let Some((n, q, k)) = resync {
                    out.extend(pieces[..=n].iter().map(|&p| Resplit::New(p)));
                    cursor = q;
                    next_change = k;
                    next_parent = starts.partition_point(|&p| p < q);
                    break;
                }
                if read_end >= seg_len {
                    // The segment end always resyncs; not reaching it is a bug, not bad input.
                    return Err(Error::InvalidArgument(
                        "re-split found no resync point".into(),
                    ));
                }
                let grow = (read_end - restart).max(64 * 1024);
                read_end = ((read_end + grow).div_ceil(block) * block).min(seg_len);
            }
        }
        out.extend((next_parent..parent.len()).map(Resplit::Parent));
        Ok(out)
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
            ChunkerParams::Aligned {
                min,
                avg,
                max,
                seed,
            } => {
                let (min, avg, max) = (min as usize, avg as usize, max as usize);
                let block = ZERO_BLOCK as usize;
                let mut chunk_start = start;
                let mut pos = start;
                while pos < end {
                    let block_end = (pos + block).min(end);
                    let len = block_end - chunk_start;
                    let cut = block_end == end
                        || self.aligned_cut(
                            &data[pos..block_end],
                            len,
                            AlignedSizes { min, avg, max },
                            seed,
                        );
                    if cut {
                        out.push(Piece::Data {
                            start: chunk_start,
                            len,
                        });
                        chunk_start = block_end;
                    }
                    pos = block_end;
                }
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

/// Aligned chunker: below the average size a block ends a chunk when the top 3 bits of its
/// hash are zero (probability 1/8), from the average on when the top bit is (1/2). Like
/// FastCDC's normalized chunking, this keeps chunk sizes close to the average.
const ALIGNED_MASK_SMALL: u64 = 0b111 << 61;
const ALIGNED_MASK_LARGE: u64 = 1 << 63;

/// The aligned chunker's hash of one block (at most 4 KiB; a short last block is hashed as
/// its bytes followed by zeros up to a multiple of 8). Four multiply-xor lanes over
/// little-endian u64 words, folded and finished with the SplitMix64 finalizer: several GB/s,
/// and every bit of the block reaches the top bits the cut decision reads.
pub fn block_hash(block: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [
        seed ^ K,
        seed ^ K.rotate_left(16),
        seed ^ K.rotate_left(32),
        seed ^ K.rotate_left(48),
    ];
    let mut words = block.chunks_exact(32);
    for w in &mut words {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&w[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(b)).wrapping_mul(K);
        }
    }
    let rest = words.remainder();
    for (i, w) in rest.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        lanes[i] = (lanes[i] ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    let mut h =
        lanes[0] ^ lanes[1].rotate_left(17) ^ lanes[2].rotate_left(31) ^ lanes[3].rotate_left(47);
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// The keyed cut bits of a block whose [`block_hash`] is `h`: the first 8 bytes (little
/// endian) of keyed BLAKE3 of `h`'s 8 little-endian bytes. A PRF of the hash, so the top bits
/// the cut decision reads are unpredictable without the key.
pub fn keyed_cut_bits(key: &[u8; 32], h: u64) -> u64 {
    let out = blake3::keyed_hash(key, &h.to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(b)
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
    fn aligned_chunks_cut_between_blocks_and_resync_after_an_inserted_block() {
        let c = Chunker::new(&config(ChunkerParams::DEFAULT));
        let old = blocks_of(&[1; 600], 5, 0);
        let mut pieces = Vec::new();
        c.split(&old, &mut pieces);
        assert!(pieces.iter().all(|p| p.start() % 4096 == 0));
        let sizes: Vec<usize> = pieces.iter().map(Piece::len).collect();
        assert!(sizes.iter().all(|&l| (4096..=65536).contains(&l)));
        let avg = old.len() / pieces.len();
        assert!((12 << 10..=20 << 10).contains(&avg), "avg chunk {avg}");
        // A block inserted near the start: every chunk after the next cut or two is shared.
        let mut new = old[..40960].to_vec();
        new.extend_from_slice(&pseudo_random(4096, 77));
        new.extend_from_slice(&old[40960..old.len() - 4096]);
        let mut moved = Vec::new();
        c.split(&new, &mut moved);
        let ids = |d: &[u8], ps: &[Piece]| -> std::collections::HashSet<[u8; 32]> {
            ps.iter()
                .map(|p| *blake3::hash(&d[p.start()..p.end()]).as_bytes())
                .collect()
        };
        let (a, b) = (ids(&old, &pieces), ids(&new, &moved));
        let shared = a.intersection(&b).count();
        assert!(
            shared + 4 >= pieces.len(),
            "{shared} of {} shared",
            pieces.len()
        );
    }

    fn cuts(c: &Chunker, d: &[u8]) -> Vec<usize> {
        let mut pieces = Vec::new();
        c.split(d, &mut pieces);
        pieces.iter().map(Piece::end).collect()
    }

    #[test]
    fn keyed_cuts_differ_per_key_and_keep_the_size_distribution() -> Result<()> {
        let cfg = config(ChunkerParams::DEFAULT);
        let d = pseudo_random(16 << 20, 11);
        let plain = Chunker::new(&cfg);
        let (ka, kb) = (
            Chunker::keyed(&cfg, Some(&[1; 32]))?,
            Chunker::keyed(&cfg, Some(&[2; 32]))?,
        );
        assert!(ka.is_keyed() && !plain.is_keyed());
        assert_eq!(cuts(&Chunker::keyed(&cfg, None)?, &d), cuts(&plain, &d));
        let (p, a, b) = (cuts(&plain, &d), cuts(&ka, &d), cuts(&kb, &d));
        assert_eq!(a, cuts(&ka, &d), "keyed cuts are deterministic");
        // Cut points are unrelated: only the forced ones (64 KiB maxima, the end) and chance
        // coincidences are shared.
        let shared = |x: &[usize], y: &[usize]| {
            let y: std::collections::HashSet<_> = y.iter().collect();
            x.iter().filter(|c| y.contains(c)).count()
        };
        for (x, y) in [(&p, &a), (&a, &b), (&p, &b)] {
            assert!(
                shared(x, y) * 3 < x.len(),
                "{} of {} cuts shared",
                shared(x, y),
                x.len()
            );
        }
        for c in [&a, &b] {
            let avg = d.len() / c.len();
            assert!((12 << 10..=20 << 10).contains(&avg), "avg chunk {avg}");
            let mut prev = 0;
            for &end in c.iter() {
                assert!(end % 4096 == 0 && end - prev <= 64 << 10 && end - prev >= 4096);
                prev = end;
            }
        }
        Ok(())
    }

    #[test]
    fn fastcdc_is_refused_with_a_key_and_fixed_ignores_it() -> Result<()> {
        let err = Chunker::keyed(&config(ChunkerParams::FASTCDC), Some(&[1; 32])).err();
        assert!(matches!(err, Some(Error::Unsupported { .. })), "{err:?}");
        let fixed = config(ChunkerParams::Fixed { size: 65536 });
        let d = pseudo_random(1 << 20, 3);
        assert_eq!(
            cuts(&Chunker::keyed(&fixed, Some(&[1; 32]))?, &d),
            cuts(&Chunker::new(&fixed), &d)
        );
        Ok(())
    }

    #[test]
    fn block_hash_reads_every_byte() {
        let block = pseudo_random(4096, 6);
        let h = block_hash(&block, 0);
        for i in [0, 7, 8, 31, 32, 2048, 4095] {
            let mut b = block.clone();
            b[i] ^= 0x10;
            assert_ne!(block_hash(&b, 0), h, "byte {i}");
        }
        assert_ne!(block_hash(&block, 1), h);
        assert_ne!(block_hash(&block[..4095], 0), h);
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

    /// A segment of 4 KiB blocks drawn from `kinds`: 0 zero, 1 random, 2 random head and
    /// zero tail (like a file's last block), 3 one repeated byte.
    fn blocks_of(kinds: &[u8], seed: u64, tail: usize) -> Vec<u8> {
        let noise = pseudo_random(kinds.len() * 4096, seed);
        let mut d = vec![0u8; kinds.len() * 4096];
        for (i, k) in kinds.iter().enumerate() {
            let b = &mut d[i * 4096..(i + 1) * 4096];
            match k % 4 {
                1 => b.copy_from_slice(&noise[i * 4096..(i + 1) * 4096]),
                2 => b[..1000].copy_from_slice(&noise[i * 4096..i * 4096 + 1000]),
                3 => b.fill(0x5a),
                _ => {}
            }
        }
        d.truncate(d.len().saturating_sub(tail));
        d
    }

    /// Re-splits `new` against the pieces of `old`, claiming `changed` changed; returns the
    /// resulting pieces and how many bytes were loaded.
    fn resplit_pieces(
        c: &Chunker,
        old: &[u8],
        new: &[u8],
        changed: &[(usize, usize)],
    ) -> (Vec<Piece>, usize) {
        let mut parent = Vec::new();
        c.split(old, &mut parent);
        let mut buf = vec![0xeeu8; new.len()];
        let mut loaded = 0;
        let mut load = |start: usize, dest: &mut [u8]| {
            loaded += dest.len();
            dest.copy_from_slice(&new[start..start + dest.len()]);
            Ok(())
        };
        let out = c
            .resplit(&parent, changed, &mut buf, &mut load)
            .expect("resplit");
        let pieces = out
            .into_iter()
            .map(|r| match r {
                Resplit::Parent(i) => parent[i],
                Resplit::New(p) => p,
            })
            .collect();
        (pieces, loaded)
    }

    #[test]
    fn resplit_reads_only_around_a_change() {
        for params in [ChunkerParams::DEFAULT, ChunkerParams::FASTCDC] {
            let c = Chunker::new(&config(params));
            let old = pseudo_random(4 << 20, 3);
            let mut new = old.clone();
            let at = 1_000 * 4096;
            new[at..at + 4096].copy_from_slice(&pseudo_random(4096, 4));
            let mut expected = Vec::new();
            c.split(&new, &mut expected);
            let (pieces, loaded) = resplit_pieces(&c, &old, &new, &[(at, at + 4096)]);
            assert_eq!(pieces, expected, "{params:?}");
            assert!(loaded <= 256 << 10, "{params:?}: loaded {loaded} bytes");
        }
    }

    #[test]
    fn resplit_waits_for_zero_runs_that_reach_past_what_it_read() {
        // Parent: zeros at 64K..124K, 60 KiB, one block short of a zero run. The change
        // zeroes the block before them: the new zero run starts at 60K and covers the parent
        // cuts at 64K and 80K, which are therefore not resync points.
        let mut cfg = config(ChunkerParams::Fixed { size: 16384 });
        cfg.zero_run_min = 64 * 1024;
        let c = Chunker::new(&cfg);
        let mut old = pseudo_random(256 * 1024, 9);
        old[64 * 1024..124 * 1024].fill(0);
        let mut new = old.clone();
        new[60 * 1024..64 * 1024].fill(0);
        let mut expected = Vec::new();
        c.split(&new, &mut expected);
        assert!(expected.contains(&Piece::Zero {
            start: 60 * 1024,
            len: 64 * 1024
        }));
        let (pieces, _) = resplit_pieces(&c, &old, &new, &[(60 * 1024, 64 * 1024)]);
        assert_eq!(pieces, expected);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Whatever the content and the changes (including ones that make or break zero runs
        /// and ranges claimed changed that did not change), re-splitting gives the pieces of
        /// a full split.
        #[test]
        fn resplit_equals_full_split(
            kinds in proptest::collection::vec(0u8..8, 1..160),
            tail in 0usize..4096,
            seed in any::<u64>(),
            edits in proptest::collection::vec((0usize..160, 1usize..24, 0u8..5), 0..5),
            chunker in 0usize..4,
            zero_min_blocks in 1u32..24,
        ) {
            let params = match chunker {
                0 => ChunkerParams::parse("fastcdc:4K:8K:32K").expect("fastcdc"),
                1 | 3 => ChunkerParams::parse("aligned:4K:8K:32K").expect("aligned"),
                _ => ChunkerParams::Fixed { size: 16384 },
            };
            let mut cfg = config(params);
            cfg.zero_run_min = zero_min_blocks * 4096;
            let key = (chunker == 3).then_some([9u8; 32]);
            let c = Chunker::keyed(&cfg, key.as_ref()).expect("keyed");
            let old = blocks_of(&kinds, seed, tail);
            let mut new = old.clone();
            let mut changed: Vec<(usize, usize)> = Vec::new();
            for (i, &(at, len, kind)) in edits.iter().enumerate() {
                let start = (at * 4096).min(old.len());
                let end = ((at + len) * 4096).min(old.len());
                if start >= end {
                    continue;
                }
                let fill: Vec<u8> = match kind {
                    0 => vec![0; end - start],
                    1 | 2 => pseudo_random(end - start, seed ^ (i as u64 + 1)),
                    3 => vec![0x5a; end - start],
                    _ => new[start..end].to_vec(), // claimed, not changed
                };
                new[start..end].copy_from_slice(&fill);
                changed.push((start, end));
            }
            changed.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::new();
            for (s, e) in changed {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            let mut expected = Vec::new();
            c.split(&new, &mut expected);
            let (pieces, _) = resplit_pieces(&c, &old, &new, &merged);
            prop_assert_eq!(pieces, expected);
        }
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
