//! Criterion benches, one group per stage of the data path, throughput in bytes.
//! Inputs are deterministic: real files of this machine (binaries, libraries, text, which
//! compress like a VM's disk does) picked by a fixed seed, and BLAKE3-XOF noise where
//! incompressible data is the point.
//!
//! Run: `cargo bench --bench stages` (or `-- GROUP` for one group).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use stackvault::chunker::{zero_runs, Chunker, Piece};
use stackvault::crypto::{MasterSecret, Protection, RepoKeys};
use stackvault::format::config::{ChunkerParams, RepoConfig};
use stackvault::format::pack::{Compression, PackEntry, PACK_VERSION};
use stackvault::index::{Index, IndexReaders};
use stackvault::restore::{restore_into, DiskTarget};
use stackvault::store::pack::{compress, PackWriter};
use stackvault::{backup, BackupOptions, ChunkId, InitOptions, NoProgress, Repo};
use stackvault_tests::{machine_bytes, MemDisk};

const MIB: usize = 1 << 20;

fn real(len: usize) -> Vec<u8> {
    machine_bytes(len, 7)
}

fn noise(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"bench noise")
        .finalize_xof()
        .fill(&mut v);
    v
}

fn segmenting(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_filter");
    let mut half = real(64 * MIB);
    for chunk in half.chunks_mut(MIB).step_by(2) {
        chunk.fill(0);
    }
    g.throughput(Throughput::Bytes(half.len() as u64));
    g.bench_function("64MiB_half_zero", |b| b.iter(|| zero_runs(&half, 64 << 10)));
    g.finish();
}

fn chunking(c: &mut Criterion) {
    let data = real(64 * MIB);
    let mut g = c.benchmark_group("chunker");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let variants = [
        ("aligned_4k_16k_64k", ChunkerParams::DEFAULT),
        ("fastcdc_4k_16k_64k", ChunkerParams::FASTCDC),
        (
            "fastcdc_8k_32k_128k",
            ChunkerParams::parse("fastcdc:8K:32K:128K").unwrap_or(ChunkerParams::FASTCDC),
        ),
        ("fixed_1m", ChunkerParams::Fixed { size: 1 << 20 }),
    ];
    for (name, params) in variants {
        let chunker = Chunker::new(&RepoConfig::new([0; 16], 0, params));
        g.bench_function(name, |b| {
            let mut out = Vec::new();
            b.iter(|| {
                out.clear();
                for seg in data.chunks(4 * MIB) {
                    chunker.split(seg, &mut out);
                }
                out.len()
            })
        });
    }
    g.finish();
}

/// The aligned chunker with and without the keyed cut of encrypted repositories, on the same
/// data in one run (issue 15's target: the key costs at most 2 %). Twice: the cut decision
/// alone (`aligned_*`), and the cut with what a backup worker always does next, naming each
/// chunk (`aligned_ids_*`: plain BLAKE3 ids, or keyed ids and keyed cuts as an encrypted
/// repository does): the key's share of the stage it belongs to.
fn keyed_chunking(c: &mut Criterion) {
    let data = real(64 * MIB);
    let mut g = c.benchmark_group("chunker_keyed");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let config = RepoConfig::new([0; 16], 0, ChunkerParams::DEFAULT);
    let key = [7u8; 32];
    let encrypted = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [9u8; 32],
    ))));
    for (name, key) in [("aligned_unkeyed", None), ("aligned_keyed", Some(&key))] {
        let Ok(chunker) = Chunker::keyed(&config, key) else {
            continue;
        };
        g.bench_function(name, |b| {
            let mut out = Vec::new();
            b.iter(|| {
                out.clear();
                for seg in data.chunks(4 * MIB) {
                    chunker.split(seg, &mut out);
                }
                out.len()
            })
        });
    }
    for (name, protection) in [
        ("aligned_ids_unkeyed", &Protection::Plain),
        ("aligned_ids_keyed", &encrypted),
    ] {
        let Ok(chunker) = Chunker::keyed(&config, protection.chunker_key()) else {
            continue;
        };
        g.bench_function(name, |b| {
            let mut out = Vec::new();
            b.iter(|| {
                let mut ids = 0u64;
                for seg in data.chunks(4 * MIB) {
                    out.clear();
                    chunker.split(seg, &mut out);
                    for piece in &out {
                        if let Piece::Data { start, len } = *piece {
                            ids ^= u64::from(protection.chunk_id(&seg[start..start + len]).0[0]);
                        }
                    }
                }
                ids
            })
        });
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = real(64 * MIB);
    let mut g = c.benchmark_group("blake3_ids");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("64KiB_chunks", |b| {
        b.iter(|| data.chunks(64 << 10).map(ChunkId::of).count())
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let data = real(32 * MIB);
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for level in [1, 3] {
        g.bench_with_input(BenchmarkId::new("compress", level), &level, |b, &level| {
            b.iter(|| {
                data.chunks(64 << 10)
                    .map(|ch| compress(ch, level).map(|(_, v)| v.len()).unwrap_or(0))
                    .sum::<usize>()
            })
        });
    }
    let compressed: Vec<Vec<u8>> = data
        .chunks(64 << 10)
        .map(|ch| zstd::bulk::compress(ch, 3).unwrap_or_default())
        .collect();
    g.bench_function("decompress/3", |b| {
        b.iter(|| {
            compressed
                .iter()
                .map(|ch| {
                    zstd::bulk::decompress(ch, 64 << 10)
                        .map(|v| v.len())
                        .unwrap_or(0)
                })
                .sum::<usize>()
        })
    });
    g.finish();
}

fn packing(c: &mut Criterion) {
    let data = noise(16 * MIB);
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("append_16MiB_of_256KiB_frames", |b| {
        b.iter(|| {
            let plain = Protection::Plain;
            let Ok(mut w) = PackWriter::new(17 * MIB, &plain) else {
                return 0;
            };
            for frame in data.chunks(256 << 10) {
                let list: Vec<(ChunkId, u32)> = frame
                    .chunks(16 << 10)
                    .map(|ch| (ChunkId::of(&ch[..32]), ch.len() as u32))
                    .collect();
                if w.add_frame(&plain, &list, frame, Compression::None)
                    .is_err()
                {
                    return 0;
                }
            }
            w.finish(&plain).map(|p| p.bytes.len()).unwrap_or(0)
        })
    });
    g.finish();
}

fn fake_entries(start: u64, n: u64) -> Vec<PackEntry> {
    (start..start + n)
        .map(|i| PackEntry {
            id: ChunkId::of(&i.to_le_bytes()),
            // Frames of 16 chunks of 16 KiB, 100 KiB stored.
            offset: 16 + (i % 1000) / 16 * 103_000,
            in_frame: (i % 16) as u32 * 16_384,
            raw_len: 16_384,
            stored_len: 102_400,
            frame_raw_len: 262_144,
            compression: Compression::Zstd,
            crc32: 0,
        })
        .collect()
}

fn index(c: &mut Criterion) {
    const CHUNKS: u64 = 1_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("index.sqlite");
    let mut idx = Index::open(&path).expect("index");
    for p in 0..CHUNKS / 10_000 {
        idx.add_pack(
            &format!("{p:032x}"),
            1 << 24,
            PACK_VERSION,
            &fake_entries(p * 10_000, 10_000),
        )
        .expect("add pack");
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "index: {CHUNKS} chunks in {size} bytes = {:.1} bytes per chunk",
        size as f64 / CHUNKS as f64
    );
    let readers = IndexReaders::new(&path);
    let mut g = c.benchmark_group("index_1M");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("lookup_hits_x1000", |b| {
        let mut i = 0u64;
        b.iter(|| {
            let mut found = 0;
            for _ in 0..1000 {
                i = (i + 7919) % CHUNKS;
                found += usize::from(
                    readers
                        .contains(&ChunkId::of(&i.to_le_bytes()))
                        .unwrap_or(false),
                );
            }
            found
        })
    });
    g.bench_function("lookup_misses_x1000", |b| {
        let mut i = CHUNKS;
        b.iter(|| {
            let mut found = 0;
            for _ in 0..1000 {
                i += 1;
                found += usize::from(
                    readers
                        .contains(&ChunkId::of(&i.to_le_bytes()))
                        .unwrap_or(false),
                );
            }
            found
        })
    });
    let mut next = CHUNKS;
    g.bench_function("insert_pack_of_1000", |b| {
        b.iter(|| {
            next += 1000;
            idx.add_pack(
                &format!("{next:032x}"),
                1 << 24,
                PACK_VERSION,
                &fake_entries(next, 1000),
            )
        })
    });
    g.finish();
}

struct Discard;
impl DiskTarget for Discard {
    fn write_at(&self, _: u64, data: &[u8]) -> stackvault::Result<()> {
        std::hint::black_box(data);
        Ok(())
    }
}

fn end_to_end(c: &mut Criterion) {
    let disk = MemDisk {
        bytes: real(64 * MIB),
    };
    let options = BackupOptions {
        disk: "bench".into(),
        ..BackupOptions::default()
    };
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Bytes(disk.bytes.len() as u64));
    g.bench_function("backup_new_64MiB", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let repo =
                    Repo::init(&dir.path().join("r"), &InitOptions::default()).expect("init");
                (dir, repo)
            },
            |(dir, repo)| {
                backup(&repo, &disk, &options, &NoProgress).expect("backup");
                drop(repo);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::init(&dir.path().join("r"), &InitOptions::default()).expect("init");
    let first = backup(&repo, &disk, &options, &NoProgress).expect("backup");
    g.bench_function("backup_unchanged_64MiB", |b| {
        b.iter(|| backup(&repo, &disk, &options, &NoProgress).expect("backup"))
    });
    let manifest = repo.load_manifest(&first.snapshot_id).expect("manifest");
    g.bench_function("restore_64MiB", |b| {
        b.iter(|| {
            restore_into(&repo, &first.snapshot_id, &manifest, &Discard, &NoProgress)
                .expect("restore")
        })
    });
    g.finish();
}

/// Index deltas of a 16 MiB pack as backups write them (2688 chunks in frames of 16, the
/// bench disk's average), sealed: what a backup pays per pack to write one (open the table,
/// compress it, seal) and a syncing host per pack to read one (open, decompress, seal the
/// table again, open and decode it).
fn deltas(c: &mut Criterion) {
    use stackvault::index::delta::{delta_key, open_delta, seal_delta};
    let keys = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [5; 32],
    ))));
    let data = noise(2688 * 4096);
    let Ok(mut w) = PackWriter::new(12 * MIB, &keys) else {
        return;
    };
    for frame in data.chunks(16 * 4096) {
        let list: Vec<(ChunkId, u32)> = frame
            .chunks(4096)
            .map(|ch| (keys.chunk_id(ch), ch.len() as u32))
            .collect();
        if w.add_frame(&keys, &list, frame, Compression::None).is_err() {
            return;
        }
    }
    let Ok(pack) = w.finish(&keys) else {
        return;
    };
    let Ok(stored) = seal_delta(&keys, &pack.name, &pack.bytes) else {
        return;
    };
    let key = delta_key(&pack.name);
    let mut g = c.benchmark_group("delta");
    g.bench_function("write_2688_chunks", |b| {
        b.iter(|| seal_delta(&keys, &pack.name, &pack.bytes).map(|d| d.len()))
    });
    g.bench_function("read_2688_chunks", |b| {
        b.iter(|| open_delta(&keys, &stored, &key).map(|d| d.entries.len()))
    });
    g.finish();
}

criterion_group! {
    name = stages;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = segmenting, chunking, keyed_chunking, hashing, compression, packing, deltas, index, end_to_end
}
criterion_main!(stages);
