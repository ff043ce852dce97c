//! Test vectors of `format-spec/vectors/`: regenerated from the code and compared with the
//! committed files, so that any change to an encoding or to chunk boundaries is caught.
//! To refresh after an intended format change (which also needs a version bump and a spec
//! update): `STACKVAULT_UPDATE_VECTORS=1 cargo test --test main vectors`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use stackvault::chunker::{Chunker, Piece};
use stackvault::crypto::Protection;
use stackvault::format::config::{ChunkerParams, Features, RepoConfig};
use stackvault::format::hex;
use stackvault::format::manifest::{
    encode, BackupStats, Extent, Manifest, SnapshotKind, SnapshotMeta, SourceInfo,
};
use stackvault::format::pack::{
    decode_footer, decode_header, decode_record, decode_table, encode_footer, encode_pack_v1,
    Compression, PACK_FOOTER_LEN,
};
use stackvault::store::pack::PackWriter;
use stackvault::ChunkId;

/// The vector input: 2 MiB of BLAKE3 XOF output of a fixed key, with a 256 KiB zero hole at
/// 512 KiB and a 4 KiB zero block (too short to be a hole) at 1 MiB.
fn chunker_input() -> Vec<u8> {
    let mut data = vec![0u8; 2 << 20];
    blake3::Hasher::new()
        .update(b"stackvault chunker vector v1")
        .finalize_xof()
        .fill(&mut data);
    data[512 << 10..768 << 10].fill(0);
    data[1 << 20..(1 << 20) + 4096].fill(0);
    data
}

fn chunk_lines(params: ChunkerParams) -> String {
    let config = RepoConfig::new([0; 16], 0, params);
    let data = chunker_input();
    let mut pieces = Vec::new();
    Chunker::new(&config).split(&data, &mut pieces);
    let mut s = format!(
        "# chunker: {}\n# offset length kind id\n",
        params.describe()
    );
    for p in pieces {
        match p {
            Piece::Zero { start, len } => writeln!(s, "{start} {len} zero -").ok(),
            Piece::Data { start, len } => writeln!(
                s,
                "{start} {len} data {}",
                ChunkId::of(&data[start..start + len])
            )
            .ok(),
        };
    }
    s
}

/// Block hashes of the aligned chunker: prefixes of the chunker input, two seeds.
fn block_hash_lines() -> String {
    let data = chunker_input();
    let mut s = String::from(
        "# length seed hash (u64, hex): block = first LENGTH bytes of the chunker input\n",
    );
    for len in [4096usize, 4095, 100, 32, 7, 0] {
        for seed in [0u64, 0x0123_4567_89ab_cdef] {
            let h = stackvault::chunker::block_hash(&data[..len], seed);
            writeln!(s, "{len} {seed:#018x} {h:#018x}").ok();
        }
    }
    s
}

/// The chunks of the pack vectors.
const PACK_CHUNKS: [&[u8]; 3] = [
    b"first chunk",
    b"second chunk, a little longer",
    b"third chunk, alone in its frame",
];

/// A version 2 pack: a frame of the first two chunks, a frame of the third, uncompressed
/// (zstd's output may change between zstd versions; the frame layout is what is pinned).
fn sample_pack() -> Result<Vec<u8>> {
    let mut w = PackWriter::new(1 << 16, &Protection::Plain)?;
    let list = |cs: &[&[u8]]| -> Vec<(ChunkId, u32)> {
        cs.iter()
            .map(|c| (ChunkId::of(c), c.len() as u32))
            .collect()
    };
    w.add_frame(
        &Protection::Plain,
        &list(&PACK_CHUNKS[..2]),
        &PACK_CHUNKS[..2].concat(),
        Compression::None,
    )?;
    w.add_frame(
        &Protection::Plain,
        &list(&PACK_CHUNKS[2..]),
        PACK_CHUNKS[2],
        Compression::None,
    )?;
    Ok(w.finish(&Protection::Plain)?.bytes)
}

/// Decodes a vector file back to bytes.
fn unwrap_hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .concat();
    stackvault::format::unhex(&digits).unwrap_or_default()
}

/// Reads every chunk of a whole pack through its table; returns them in table order.
fn read_all(pack: &[u8]) -> Result<(u32, Vec<Vec<u8>>)> {
    let version = decode_header(&pack[..16], "vector")?;
    let at = pack.len() - PACK_FOOTER_LEN;
    let footer = decode_footer(&pack[at..], pack.len() as u64, "vector")?;
    let table = decode_table(
        &pack[footer.table_offset as usize..at],
        &footer,
        &Protection::Plain,
        "vector",
        "vector",
    )?;
    let mut out = Vec::new();
    for e in &table {
        let loc = e.location(version);
        let start = loc.offset as usize;
        out.push(decode_record(
            &pack[start..start + loc.read_len() as usize],
            &loc,
            &Protection::Plain,
            "vector",
            "vector",
        )?);
    }
    Ok((version, out))
}

fn sample_manifest() -> Result<(String, Vec<u8>)> {
    let a = ChunkId::of(b"first chunk");
    let mut meta = SnapshotMeta {
        disk: "web01-os".into(),
        time: "2026-11-25T00:00:00.000000Z".into(),
        kind: SnapshotKind::Full,
        parent: None,
        hostname: "vector-host".into(),
        source: SourceInfo {
            path: "disk.img".into(),
            format: stackvault::format::manifest::ContainerFormat::Raw,
            vhd: None,
            blob: None,
        },
        change_source: stackvault::format::manifest::ChangeSource::full_read(),
        chunker: ChunkerParams::DEFAULT.describe(),
        stats: BackupStats::default(),
        root_digest: String::new(),
        tool_version: "0.1.0".into(),
    };
    let segments = sample_segments(a);
    let f = encode(&mut meta, (64 << 10) + 11, 65536, &segments)?;
    Ok((f.id, f.out))
}

fn sample_segments(a: ChunkId) -> Vec<Vec<Extent>> {
    vec![
        vec![
            Extent::Chunk { id: a, len: 11 },
            Extent::Zero { len: 65525 },
        ],
        vec![Extent::Chunk { id: a, len: 11 }],
    ]
}

fn wrap_hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|c| hex(c) + "\n")
        .collect::<Vec<_>>()
        .concat()
}

fn generate() -> Result<Vec<(&'static str, String)>> {
    let config = RepoConfig::new([0x11; 16], 1_764_028_800, ChunkerParams::DEFAULT);
    let (manifest_id, manifest) = sample_manifest()?;
    Ok(vec![
        ("block-hash.txt", block_hash_lines()),
        (
            "chunks-aligned-default.txt",
            chunk_lines(ChunkerParams::DEFAULT),
        ),
        (
            "chunks-fastcdc2020-default.txt",
            chunk_lines(ChunkerParams::FASTCDC),
        ),
        (
            "chunks-fixed-64k.txt",
            chunk_lines(ChunkerParams::Fixed { size: 65536 }),
        ),
        ("config.hex", wrap_hex(&config.encode())),
        (
            "pack-footer.hex",
            wrap_hex(&encode_footer(3, 4096, 0xdead_beef)),
        ),
        ("pack.hex", wrap_hex(&sample_pack()?)),
        // The legacy format, still read: these are the bytes version 1 writers produced.
        ("pack-v1.hex", wrap_hex(&encode_pack_v1(&PACK_CHUNKS[..2]))),
        (
            "manifest.hex",
            format!("# snapshot id {manifest_id}\n{}", wrap_hex(&manifest)),
        ),
    ])
}

#[test]
fn vectors_match_the_code() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors");
    let update = std::env::var_os("STACKVAULT_UPDATE_VECTORS").is_some();
    let mut stale = Vec::new();
    for (name, content) in generate()? {
        let path = dir.join(name);
        if update {
            std::fs::write(&path, &content)?;
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "format-spec/vectors out of date: {stale:?}. If the format change is intended, bump the \
         version, update format-spec/README.md and run \
         `STACKVAULT_UPDATE_VECTORS=1 cargo test --test main vectors`"
    );
    Ok(())
}

#[test]
fn decoders_accept_the_vectors() -> Result<()> {
    let (id, bytes) = sample_manifest()?;
    let m = Manifest::from_bytes(&bytes, "vector")?;
    let segments = sample_segments(ChunkId::of(b"first chunk"));
    assert_eq!(m.segments().collect::<Result<Vec<_>, _>>()?, segments);
    assert_eq!(hex(&m.object_hash()), id);
    let config = RepoConfig::new([0x11; 16], 1_764_028_800, ChunkerParams::DEFAULT);
    assert_eq!(RepoConfig::decode(&config.encode(), "vector")?, config);
    // The committed configs: version 2 names its features; version 1 (written before
    // features were recorded) still opens, with none.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors");
    let v2 = RepoConfig::decode(
        &unwrap_hex(&std::fs::read_to_string(dir.join("config.hex"))?),
        "config.hex",
    )?;
    assert_eq!(v2.version, 2);
    assert_eq!(
        v2.features.names(),
        ["pack-v2", "manifest-v2", "aligned-chunker"]
    );
    assert_eq!(v2.features.min_reader_version(), "0.1.0");
    let v1 = RepoConfig::decode(
        &unwrap_hex(&std::fs::read_to_string(dir.join("config-v1.hex"))?),
        "config-v1.hex",
    )?;
    assert_eq!(v1.version, 1);
    assert_eq!(v1.features, Features::LEGACY);
    assert_eq!(
        RepoConfig {
            version: 2,
            features: config.features,
            ..v1
        },
        config
    );
    // The committed pack files, not the code's output: old packs must stay readable.
    let v2 = unwrap_hex(&std::fs::read_to_string(dir.join("pack.hex"))?);
    assert_eq!(
        read_all(&v2)?,
        (2, PACK_CHUNKS.map(<[u8]>::to_vec).to_vec())
    );
    // Version 1 manifests (metadata before the extents) stay readable, with the same root
    // digest as version 2 gives the same disk map.
    let text = std::fs::read_to_string(dir.join("manifest-v1.hex"))?;
    let v1_id = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# snapshot id "))
        .unwrap_or_default();
    let v1 = unwrap_hex(&text);
    let old = Manifest::from_bytes(&v1, "vector v1")?;
    assert_eq!(old.version(), 1);
    assert_eq!(hex(&old.object_hash()), v1_id);
    assert_eq!(old.segments().collect::<Result<Vec<_>, _>>()?, segments);
    assert_eq!(old.meta.root_digest, m.meta.root_digest);
    let v1 = unwrap_hex(&std::fs::read_to_string(dir.join("pack-v1.hex"))?);
    assert_eq!(
        read_all(&v1)?,
        (1, PACK_CHUNKS[..2].iter().map(|c| c.to_vec()).collect())
    );
    Ok(())
}
