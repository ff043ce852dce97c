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
    Ok((f.id.to_string(), f.out))
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

/// The keys of the sealed pack vector: the master secret of `encryption.md`'s vectors.
fn sealed_pack_keys() -> Protection {
    use stackvault::crypto::{MasterSecret, RepoKeys};
    Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        [0x42; 32],
    ))))
}

/// The sealed pack vector's name (every seal is bound to it).
const SEALED_PACK_NAME: &str = "00112233445566778899aabbccddeeff";

/// A version 3 pack built from the specification (`format-spec/README.md`, "Version 3"), not
/// by `PackWriter`: the frames of `sample_pack` with keyed ids, each frame record sealed under
/// {kind 1, pack name, its offset} with nonce 24 × 0x10 and 24 × 0x11, the table under
/// {kind 2, pack name, 0} with nonce 24 × 0x12, header and footer with version 3.
fn sealed_pack() -> Result<Vec<u8>> {
    use stackvault::crypto::{ObjectAd, ObjectKind};
    let keys = sealed_pack_keys();
    let mut pack = b"SVPACK\0\x01".to_vec();
    pack.extend_from_slice(&3u32.to_le_bytes());
    pack.extend_from_slice(&[0; 4]);
    let mut table = Vec::new();
    for (frame, nonce) in [(&PACK_CHUNKS[..2], 0x10u8), (&PACK_CHUNKS[2..], 0x11)] {
        let stored = frame.concat();
        let mut list = Vec::new();
        for c in frame {
            list.extend_from_slice(&keys.chunk_id(c).0);
            list.extend_from_slice(&(c.len() as u32).to_le_bytes());
        }
        let mut record = Vec::new();
        record.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        record.extend_from_slice(&(stored.len() as u32).to_le_bytes()); // raw length
        record.extend_from_slice(&(stored.len() as u32).to_le_bytes()); // stored length
        record.extend_from_slice(&[0, 0, 0, 0]); // no compression, reserved
        record.extend_from_slice(&crc32fast::hash(&stored).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&list).to_le_bytes());
        record.extend_from_slice(&stored);
        record.extend_from_slice(&list);
        let offset = pack.len() as u64;
        let ad = ObjectAd {
            kind: ObjectKind::PackFrame,
            name: SEALED_PACK_NAME,
            part: offset,
        };
        let sealed = keys.seal_with_nonce(&ad, record, [nonce; 24])?;
        let mut in_frame = 0u32;
        for c in frame {
            table.extend_from_slice(&keys.chunk_id(c).0);
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&in_frame.to_le_bytes());
            table.extend_from_slice(&(c.len() as u32).to_le_bytes());
            table.extend_from_slice(&(sealed.len() as u32).to_le_bytes()); // sealed length
            table.extend_from_slice(&(stored.len() as u32).to_le_bytes()); // frame raw length
            table.extend_from_slice(&[0, 0, 0, 0]); // no compression, reserved
            table.extend_from_slice(&crc32fast::hash(&stored).to_le_bytes());
            in_frame += c.len() as u32;
        }
        pack.extend_from_slice(&sealed);
    }
    let table_offset = pack.len() as u64;
    let ad = ObjectAd {
        kind: ObjectKind::PackTable,
        name: SEALED_PACK_NAME,
        part: 0,
    };
    let sealed_table = keys.seal_with_nonce(&ad, table, [0x12; 24])?;
    let mut footer = b"SVPKEND\x01".to_vec();
    footer.extend_from_slice(&3u32.to_le_bytes());
    footer.extend_from_slice(&(PACK_CHUNKS.len() as u32).to_le_bytes());
    footer.extend_from_slice(&table_offset.to_le_bytes());
    footer.extend_from_slice(&crc32fast::hash(&sealed_table).to_le_bytes());
    let footer_crc = crc32fast::hash(&footer);
    footer.extend_from_slice(&footer_crc.to_le_bytes());
    pack.extend_from_slice(&sealed_table);
    pack.extend_from_slice(&footer);
    Ok(pack)
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
        (
            "pack-sealed.hex",
            format!(
                "# version 3 pack {SEALED_PACK_NAME}: master secret 32 x 42, frame nonces 24 x 10 \
                 and 24 x 11, table nonce 24 x 12\n{}",
                wrap_hex(&sealed_pack()?)
            ),
        ),
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
    assert_eq!(v1.pack_target_size, 16 << 20);
    assert_eq!(
        RepoConfig {
            version: 2,
            features: config.features,
            // The v1 vector was written when the default pack target was 16 MiB.
            pack_target_size: config.pack_target_size,
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

/// The committed sealed pack opens with the vector keys through the engine's reader (table,
/// then each chunk by its keyed id), is as long as a pack `PackWriter` seals from the same
/// frames, and fails to open under any other key.
#[test]
fn the_sealed_pack_vector_reads_back() -> Result<()> {
    use stackvault::read::verified::read_chunk;
    use stackvault::store::pack::read_pack_table;
    use stackvault::store::{pack_key, Backend, MemoryBackend};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors");
    let bytes = unwrap_hex(&std::fs::read_to_string(dir.join("pack-sealed.hex"))?);
    let keys = sealed_pack_keys();
    let store = MemoryBackend::default();
    store.put(&pack_key(SEALED_PACK_NAME)?, &bytes)?;
    let table = read_pack_table(&store, &keys, SEALED_PACK_NAME)?;
    assert_eq!(table.version, 3);
    let ids: Vec<ChunkId> = PACK_CHUNKS.iter().map(|c| keys.chunk_id(c)).collect();
    assert_eq!(table.entries.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    for (e, want) in table.entries.iter().zip(PACK_CHUNKS) {
        let got = read_chunk(&store, &keys, SEALED_PACK_NAME, &e.location(3))?;
        assert_eq!(got, want);
    }
    // Neither chunk bytes nor ids in the clear.
    for needle in PACK_CHUNKS
        .iter()
        .map(|c| &c[..8])
        .chain(ids.iter().map(|i| &i.0[..8]))
    {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
    // PackWriter's sealed packs have this layout: same length for the same frames.
    let mut w = PackWriter::new(1 << 16, &keys)?;
    let list = |cs: &[&[u8]]| -> Vec<(ChunkId, u32)> {
        cs.iter()
            .map(|c| (keys.chunk_id(c), c.len() as u32))
            .collect()
    };
    let (a, b) = PACK_CHUNKS.split_at(2);
    w.add_frame(&keys, &list(a), &a.concat(), Compression::None)?;
    w.add_frame(&keys, &list(b), &b.concat(), Compression::None)?;
    assert_eq!(w.finish(&keys)?.bytes.len(), bytes.len());
    // Another repository's keys open nothing of it.
    let other = Protection::Encrypted(Box::new(stackvault::crypto::RepoKeys::derive(
        &stackvault::crypto::MasterSecret::from_bytes([0x43; 32]),
    )));
    assert!(read_pack_table(&store, &other, SEALED_PACK_NAME).is_err());
    Ok(())
}
