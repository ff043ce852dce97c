//! The repository config: a fixed 96-byte record written once by `init` and never changed.
//!
//! Since config version 2 it also names the format features the repository uses, git-style:
//! *incompatible* features (pack format 2, manifest format 2, the block-aligned chunker, …)
//! must all be known to a reader, which otherwise refuses the repository at open with
//! [`Error::UnsupportedFeatures`] and the oldest stackvault that reads them, instead of
//! failing on an unknown code mid-restore; *compatible* features may be ignored by readers
//! that do not know them. A version 1 config (written before features were recorded) names
//! none; such repositories hold only formats every current reader knows.
//!
//! It pins everything that decides how bytes become chunks (chunker variant and parameters,
//! segment size, zero-run threshold), because changing any of it silently would break dedup
//! against earlier snapshots. A new cut-point algorithm is a new [`ChunkerParams`] variant with
//! a new code, never a change to an existing one.

use super::Reader;
use crate::error::{Error, Result};

/// Magic at offset 0 of the config file.
pub const CONFIG_MAGIC: [u8; 8] = *b"SVCONFIG";
/// The config format version this build writes and the newest it reads.
pub const CONFIG_VERSION: u32 = 2;
/// The first config version with feature lists.
pub const CONFIG_VERSION_FEATURES: u32 = 2;
/// Size of the encoded config.
pub const CONFIG_LEN: usize = 96;
/// Offset of the crc32 that covers bytes `0..CONFIG_CRC_OFFSET`.
pub const CONFIG_CRC_OFFSET: usize = CONFIG_LEN - 4;

/// Chunker variant code for FastCDC 2020 (the `fastcdc` crate's `v2020` cut points).
pub const CHUNKER_FASTCDC2020: u8 = 1;
/// Chunker variant code for fixed-size chunks.
pub const CHUNKER_FIXED: u8 = 2;
/// Chunker variant code for block-aligned content-defined chunks.
pub const CHUNKER_ALIGNED: u8 = 3;

/// A format feature a repository may use (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Its bit in the config's incompat or compat set.
    pub bit: u32,
    /// Its name in messages and `format-spec/README.md`.
    pub name: &'static str,
    /// The oldest stackvault that reads repositories using it.
    pub since: &'static str,
}

/// Packs in format 2 (chunks compressed together in frames).
pub const FEATURE_PACK_V2: Feature = Feature {
    bit: 1 << 0,
    name: "pack-v2",
    since: "0.1.0",
};
/// Manifests in format 2 (streamed: extents before the metadata).
pub const FEATURE_MANIFEST_V2: Feature = Feature {
    bit: 1 << 1,
    name: "manifest-v2",
    since: "0.1.0",
};
/// The block-aligned content-defined chunker (chunker variant 3).
pub const FEATURE_ALIGNED_CHUNKER: Feature = Feature {
    bit: 1 << 2,
    name: "aligned-chunker",
    since: "0.1.0",
};

/// Every pack has an index delta (`index/xx/<pack>`, `format-spec/index-deltas.md`) written
/// before any manifest needs the pack, and deleted before the pack: hosts sharing the
/// repository on an object store learn each other's packs from them. Set on repositories
/// created on an object store; a build without it would write packs no other host learns of.
pub const FEATURE_INDEX_DELTAS: Feature = Feature {
    bit: 1 << 3,
    name: "index-deltas",
    since: "0.1.0",
};

/// Encryption at rest (`format-spec/encryption.md`): keyed chunk ids, a keyed chunker, every
/// object but the config and the key objects (`keys/…`) sealed. The config's byte 42 names the
/// object cipher ([`CIPHER_XCHACHA20POLY1305`]) and byte 43 the subkey derivation
/// ([`SUBKEYS_BLAKE3_V1`]); both are zero (reserved) without the feature.
pub const FEATURE_ENCRYPTION: Feature = Feature {
    bit: 1 << 4,
    name: "encryption",
    since: "0.1.0",
};

/// Object cipher code (config byte 42): XChaCha20-Poly1305, random 24-byte nonces.
pub const CIPHER_XCHACHA20POLY1305: u8 = 1;
/// Subkey derivation code (config byte 43): BLAKE3 `derive_key` with the contexts of
/// `format-spec/encryption.md`.
pub const SUBKEYS_BLAKE3_V1: u8 = 1;

/// Incompatible features this build knows: a reader must understand each one in use.
pub const INCOMPAT_FEATURES: &[Feature] = &[
    FEATURE_PACK_V2,
    FEATURE_MANIFEST_V2,
    FEATURE_ALIGNED_CHUNKER,
    FEATURE_INDEX_DELTAS,
    FEATURE_ENCRYPTION,
];
/// Compatible features this build knows (none yet): readers may ignore unknown ones.
pub const COMPAT_FEATURES: &[Feature] = &[];

/// The features of a repository, as its config records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Features a reader must know (bit set).
    pub incompat: u32,
    /// Features a reader may ignore (bit set).
    pub compat: u32,
    /// The oldest stackvault (major, minor, patch) that reads this repository.
    pub min_reader: [u8; 3],
}

impl Features {
    /// A version 1 config: no recorded features, readable by every release.
    pub const LEGACY: Features = Features {
        incompat: 0,
        compat: 0,
        min_reader: [0, 1, 0],
    };

    /// What this build writes into a repository with `chunker`.
    pub fn written_with(chunker: ChunkerParams) -> Features {
        let mut used = vec![FEATURE_PACK_V2, FEATURE_MANIFEST_V2];
        if matches!(chunker, ChunkerParams::Aligned { .. }) {
            used.push(FEATURE_ALIGNED_CHUNKER);
        }
        let min_reader = used
            .iter()
            .filter_map(|f| parse_version(f.since))
            .max()
            .unwrap_or(Features::LEGACY.min_reader);
        Features {
            incompat: used.iter().fold(0, |set, f| set | f.bit),
            compat: 0,
            min_reader,
        }
    }

    /// `min_reader` as `X.Y.Z`.
    pub fn min_reader_version(&self) -> String {
        let [a, b, c] = self.min_reader;
        format!("{a}.{b}.{c}")
    }

    /// Names of the features in use, known ones by name, others as `incompat-bit-N` /
    /// `compat-bit-N`.
    pub fn names(&self) -> Vec<String> {
        let mut out = names_of(self.incompat, INCOMPAT_FEATURES, "incompat");
        out.extend(names_of(self.compat, COMPAT_FEATURES, "compat"));
        out
    }

    /// Incompatible features in use that this build does not know.
    pub fn unknown_incompat(&self) -> Vec<String> {
        let known = INCOMPAT_FEATURES.iter().fold(0, |set, f| set | f.bit);
        names_of(self.incompat & !known, INCOMPAT_FEATURES, "incompat")
    }
}

fn names_of(set: u32, known: &[Feature], kind: &str) -> Vec<String> {
    (0..32)
        .map(|i| 1u32 << i)
        .filter(|bit| set & bit != 0)
        .map(|bit| match known.iter().find(|f| f.bit == bit) {
            Some(f) => f.name.to_string(),
            None => format!("{kind}-bit-{}", bit.trailing_zeros()),
        })
        .collect()
}

/// Parses `X.Y.Z` (each part 0..=255).
fn parse_version(s: &str) -> Option<[u8; 3]> {
    let mut parts = s.split('.').map(|p| p.parse::<u8>().ok());
    let v = [parts.next()??, parts.next()??, parts.next()??];
    parts.next().is_none().then_some(v)
}

/// Granularity of the zero filter: zero runs are made of whole, aligned 4 KiB blocks.
pub const ZERO_BLOCK: u32 = 4096;

/// How a repository cuts data into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkerParams {
    /// FastCDC, 2020 paper variant, normalized.
    FastCdc2020 {
        min: u32,
        avg: u32,
        max: u32,
        /// Normalization level 0..=3.
        level: u8,
        /// XORed into the gear table so cut points differ between repositories that want it.
        seed: u64,
    },
    /// Fixed-size chunks aligned to the segment start; for comparison.
    Fixed { size: u32 },
    /// Content-defined cuts placed only at 4 KiB block boundaries of the disk, decided by a
    /// hash of each whole block (see `chunker.rs`). Sizes are multiples of 4 KiB.
    Aligned {
        min: u32,
        avg: u32,
        max: u32,
        seed: u64,
    },
}

impl ChunkerParams {
    /// The default: block-aligned CDC, 4 KiB / 16 KiB / 64 KiB, seed 0. Chosen by the chunker
    /// sweep of `benches/compare.sh` (see `benches/RESULTS.md`): file systems change whole
    /// 4 KiB blocks, and cutting only between blocks keeps a changed block from spilling into
    /// a second chunk, so each generation stores about 12% less than FastCDC at the same
    /// average size (the first backup about 4% more), and cut points cost a cheap hash per
    /// block instead of a rolling hash per byte.
    pub const DEFAULT: ChunkerParams = ChunkerParams::Aligned {
        min: 4 * 1024,
        avg: 16 * 1024,
        max: 64 * 1024,
        seed: 0,
    };

    /// FastCDC 4 KiB / 16 KiB / 64 KiB, level 1, seed 0 (`fastcdc`): cuts anywhere, so it
    /// also dedups data that moved by less than a block, such as files inside archives.
    pub const FASTCDC: ChunkerParams = ChunkerParams::FastCdc2020 {
        min: 4 * 1024,
        avg: 16 * 1024,
        max: 64 * 1024,
        level: 1,
        seed: 0,
    };

    /// Parses `aligned`, `aligned:MIN:AVG:MAX`, `fastcdc`, `fastcdc:MIN:AVG:MAX`, `fixed:SIZE`
    /// (sizes accept K/M suffixes).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Usage(format!("chunker {s:?}: {why}"));
        let mut parts = s.split(':');
        let params = match parts.next() {
            Some("fastcdc") => {
                let rest: Vec<&str> = parts.collect();
                match rest.as_slice() {
                    [] => Self::FASTCDC,
                    [min, avg, max] => ChunkerParams::FastCdc2020 {
                        min: parse_size(min).ok_or_else(|| bad("bad MIN"))?,
                        avg: parse_size(avg).ok_or_else(|| bad("bad AVG"))?,
                        max: parse_size(max).ok_or_else(|| bad("bad MAX"))?,
                        level: 1,
                        seed: 0,
                    },
                    _ => return Err(bad("expected fastcdc or fastcdc:MIN:AVG:MAX")),
                }
            }
            Some("aligned") => {
                let rest: Vec<&str> = parts.collect();
                match rest.as_slice() {
                    [] => Self::DEFAULT,
                    [min, avg, max] => ChunkerParams::Aligned {
                        min: parse_size(min).ok_or_else(|| bad("bad MIN"))?,
                        avg: parse_size(avg).ok_or_else(|| bad("bad AVG"))?,
                        max: parse_size(max).ok_or_else(|| bad("bad MAX"))?,
                        seed: 0,
                    },
                    _ => return Err(bad("expected aligned or aligned:MIN:AVG:MAX")),
                }
            }
            Some("fixed") => {
                let size = parts.next().ok_or_else(|| bad("expected fixed:SIZE"))?;
                if parts.next().is_some() {
                    return Err(bad("expected fixed:SIZE"));
                }
                ChunkerParams::Fixed {
                    size: parse_size(size).ok_or_else(|| bad("bad SIZE"))?,
                }
            }
            _ => {
                return Err(bad(
                    "expected aligned[:MIN:AVG:MAX], fastcdc[:MIN:AVG:MAX] or fixed:SIZE",
                ))
            }
        };
        Ok(params)
    }

    /// Largest chunk this chunker can produce.
    pub fn max_chunk(&self) -> u32 {
        match *self {
            ChunkerParams::FastCdc2020 { max, .. } | ChunkerParams::Aligned { max, .. } => max,
            ChunkerParams::Fixed { size } => size,
        }
    }

    /// A short human description, e.g. `fastcdc2020 4K/16K/64K`.
    pub fn describe(&self) -> String {
        match *self {
            ChunkerParams::FastCdc2020 {
                min,
                avg,
                max,
                level,
                seed,
            } => format!(
                "fastcdc2020 {}K/{}K/{}K level {level} seed {seed}",
                min / 1024,
                avg / 1024,
                max / 1024
            ),
            ChunkerParams::Fixed { size } => format!("fixed {}K", size / 1024),
            ChunkerParams::Aligned {
                min,
                avg,
                max,
                seed,
            } => format!(
                "aligned {}K/{}K/{}K seed {seed}",
                min / 1024,
                avg / 1024,
                max / 1024
            ),
        }
    }
}

/// Parses `65536`, `64K`, `64KiB`, `4M`, `4MiB`.
fn parse_size(s: &str) -> Option<u32> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("KiB").or_else(|| s.strip_suffix('K')) {
        (n, 1024)
    } else if let Some(n) = s.strip_suffix("MiB").or_else(|| s.strip_suffix('M')) {
        (n, 1024 * 1024)
    } else {
        (s, 1)
    };
    num.parse::<u32>().ok()?.checked_mul(mult)
}

/// The repository config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// Random identity of the repository.
    pub repository_id: [u8; 16],
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    pub chunker: ChunkerParams,
    /// The virtual disk is cut into aligned segments of this size (bytes, power of two).
    pub segment_size: u32,
    /// zstd level used for new chunks.
    pub zstd_level: i32,
    /// Packs are closed once they reach about this many bytes.
    pub pack_target_size: u32,
    /// Zero runs of at least this many bytes (whole 4 KiB blocks) become holes.
    pub zero_run_min: u32,
    /// The config format version it was read from (or will be written in).
    pub version: u32,
    /// The format features in use ([`Features::LEGACY`] for a version 1 config).
    pub features: Features,
}

impl RepoConfig {
    /// A config with the current defaults and the given identity.
    pub fn new(repository_id: [u8; 16], created_unix: i64, chunker: ChunkerParams) -> Self {
        RepoConfig {
            repository_id,
            created_unix,
            chunker,
            segment_size: 4 * 1024 * 1024,
            zstd_level: 3,
            // 18 MiB, not restic's 16: with its delta a pack costs two PUTs, and the few PUTs
            // every backup makes besides (lock, manifest) must fit in issue 14's one PUT per
            // 8 MiB of packed data (16 MiB packs made 98 PUTs for 777.9 MiB).
            pack_target_size: 18 * 1024 * 1024,
            zero_run_min: 64 * 1024,
            version: CONFIG_VERSION,
            features: Features::written_with(chunker),
        }
    }

    /// Whether the repository is encrypted (the [`FEATURE_ENCRYPTION`] feature).
    pub fn is_encrypted(&self) -> bool {
        self.features.incompat & FEATURE_ENCRYPTION.bit != 0
    }

    /// Checks that the parameters are usable; `init` and `decode` both call it.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use fastcdc::v2020 as f;
        if !self.segment_size.is_power_of_two()
            || !(64 * 1024..=256 * 1024 * 1024).contains(&self.segment_size)
        {
            return Err(format!(
                "segment size {} must be a power of two between 64 KiB and 256 MiB",
                self.segment_size
            ));
        }
        match self.chunker {
            ChunkerParams::FastCdc2020 {
                min,
                avg,
                max,
                level,
                ..
            } => {
                let (min, avg, max) = (min as usize, avg as usize, max as usize);
                let ok = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&min)
                    && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&avg)
                    && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&max)
                    && min < avg
                    && avg < max
                    && min.is_multiple_of(2)
                    && avg.is_multiple_of(2)
                    && max.is_multiple_of(2);
                if !ok {
                    return Err(format!(
                        "FastCDC sizes {min}/{avg}/{max} must be even, ordered min < avg < max, \
                         min in 64..=1MiB, avg in 256..=4MiB, max in 1KiB..=16MiB"
                    ));
                }
                if level > 3 {
                    return Err(format!("FastCDC normalization level {level} must be 0..=3"));
                }
                if max as u64 > u64::from(self.segment_size) {
                    return Err("maximum chunk size exceeds the segment size".into());
                }
            }
            ChunkerParams::Aligned { min, avg, max, .. } => {
                let ok = [min, avg, max].iter().all(|s| s.is_multiple_of(ZERO_BLOCK))
                    && min >= ZERO_BLOCK
                    && min <= avg
                    && avg < max
                    && max <= self.segment_size;
                if !ok {
                    return Err(format!(
                        "aligned chunk sizes {min}/{avg}/{max} must be multiples of 4 KiB, \
                         ordered min <= avg < max, no larger than the segment"
                    ));
                }
            }
            ChunkerParams::Fixed { size } => {
                if size < 512 || size > self.segment_size || !self.segment_size.is_multiple_of(size)
                {
                    return Err(format!(
                        "fixed chunk size {size} must be at least 512 and divide the segment size {}",
                        self.segment_size
                    ));
                }
            }
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(format!("zstd level {} must be 1..=22", self.zstd_level));
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.pack_target_size) {
            return Err("pack target size must be between 1 MiB and 1 GiB".into());
        }
        if self.zero_run_min < ZERO_BLOCK
            || !self.zero_run_min.is_multiple_of(ZERO_BLOCK)
            || self.zero_run_min > self.segment_size
        {
            return Err(format!(
                "zero run minimum {} must be a multiple of 4096 no larger than the segment",
                self.zero_run_min
            ));
        }
        Ok(())
    }

    /// Encodes the config (see `format-spec/README.md`, "Repository config") in its
    /// `version`: a version 1 config has no feature fields.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&CONFIG_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16 reserved
        b[16..32].copy_from_slice(&self.repository_id);
        b[32..40].copy_from_slice(&self.created_unix.to_le_bytes());
        let (variant, level, min, avg, max, seed) = match self.chunker {
            ChunkerParams::FastCdc2020 {
                min,
                avg,
                max,
                level,
                seed,
            } => (CHUNKER_FASTCDC2020, level, min, avg, max, seed),
            ChunkerParams::Fixed { size } => (CHUNKER_FIXED, 0, size, size, size, 0),
            ChunkerParams::Aligned {
                min,
                avg,
                max,
                seed,
            } => (CHUNKER_ALIGNED, 0, min, avg, max, seed),
        };
        b[40] = variant;
        b[41] = level;
        // 42..44: cipher and subkey derivation when encrypted, else reserved (zero)
        if self.is_encrypted() {
            b[42] = CIPHER_XCHACHA20POLY1305;
            b[43] = SUBKEYS_BLAKE3_V1;
        }
        b[44..48].copy_from_slice(&min.to_le_bytes());
        b[48..52].copy_from_slice(&avg.to_le_bytes());
        b[52..56].copy_from_slice(&max.to_le_bytes());
        b[56..64].copy_from_slice(&seed.to_le_bytes());
        b[64..68].copy_from_slice(&self.segment_size.to_le_bytes());
        b[68..72].copy_from_slice(&self.zstd_level.to_le_bytes());
        b[72..76].copy_from_slice(&self.pack_target_size.to_le_bytes());
        b[76..80].copy_from_slice(&self.zero_run_min.to_le_bytes());
        if self.version >= CONFIG_VERSION_FEATURES {
            b[80..84].copy_from_slice(&self.features.incompat.to_le_bytes());
            b[84..88].copy_from_slice(&self.features.compat.to_le_bytes());
            b[88..91].copy_from_slice(&self.features.min_reader);
        }
        // 91..92 reserved (80..92 in version 1)
        let crc = crc32fast::hash(&b[..CONFIG_CRC_OFFSET]);
        b[CONFIG_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a config file's bytes.
    pub fn decode(data: &[u8], location: &str) -> Result<Self> {
        let mut r = Reader::new(data, 0, location);
        if r.array::<8>("config magic")? != CONFIG_MAGIC {
            return Err(r.corrupt("bad magic: not a stackvault config"));
        }
        let version = r.u32("config version")?;
        if version > CONFIG_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("repository config {location}"),
                found: version,
                supported: CONFIG_VERSION,
            });
        }
        if data.len() != CONFIG_LEN {
            return Err(Error::corrupt(
                location,
                0,
                format!("config is {} bytes, expected {CONFIG_LEN}", data.len()),
            ));
        }
        let stored_crc = u32::from_le_bytes([data[92], data[93], data[94], data[95]]);
        if crc32fast::hash(&data[..CONFIG_CRC_OFFSET]) != stored_crc {
            return Err(Error::corrupt(
                location,
                CONFIG_CRC_OFFSET as u64,
                "config checksum mismatch",
            ));
        }
        // The features come first: a repository that uses one this build does not know is
        // refused as such, before any field that feature may have given a new meaning.
        let features = if version >= CONFIG_VERSION_FEATURES {
            let mut f = Reader::new(data.get(80..).unwrap_or_default(), 80, location);
            let features = Features {
                incompat: f.u32("incompat features")?,
                compat: f.u32("compat features")?,
                min_reader: f.array::<3>("oldest reader version")?,
            };
            let unknown = features.unknown_incompat();
            if !unknown.is_empty() {
                return Err(Error::UnsupportedFeatures {
                    path: location.to_string(),
                    features: unknown,
                    min_version: features.min_reader_version(),
                });
            }
            features
        } else {
            Features::LEGACY
        };
        r.u32("reserved")?;
        let repository_id = r.array::<16>("repository id")?;
        let created_unix = r.i64("created")?;
        let variant = r.u8("chunker variant")?;
        let level = r.u8("normalization level")?;
        let cipher = r.u8("object cipher")?;
        let subkeys = r.u8("subkey derivation")?;
        if features.incompat & FEATURE_ENCRYPTION.bit != 0
            && (cipher, subkeys) != (CIPHER_XCHACHA20POLY1305, SUBKEYS_BLAKE3_V1)
        {
            // The checksum matched, so the codes are what a writer meant: a newer scheme.
            return Err(Error::unsupported(format!(
                "{location}: object cipher {cipher} / subkey derivation {subkeys} are unknown \
                 to this stackvault {}; use the stackvault release that wrote this \
                 repository, or a newer one",
                env!("CARGO_PKG_VERSION")
            )));
        }
        let min = r.u32("chunk min")?;
        let avg = r.u32("chunk avg")?;
        let max = r.u32("chunk max")?;
        let seed = r.u64("gear seed")?;
        let chunker = match variant {
            CHUNKER_FASTCDC2020 => ChunkerParams::FastCdc2020 {
                min,
                avg,
                max,
                level,
                seed,
            },
            CHUNKER_FIXED => ChunkerParams::Fixed { size: avg },
            CHUNKER_ALIGNED => ChunkerParams::Aligned {
                min,
                avg,
                max,
                seed,
            },
            // The checksum matched, so the code is what a writer meant: a newer chunker.
            other => {
                return Err(Error::unsupported(format!(
                    "{location}: chunker variant {other} is unknown to this stackvault {}; \
                     use the stackvault release that wrote this repository, or a newer one",
                    env!("CARGO_PKG_VERSION")
                )))
            }
        };
        let config = RepoConfig {
            repository_id,
            created_unix,
            chunker,
            segment_size: r.u32("segment size")?,
            zstd_level: r.i32("zstd level")?,
            pack_target_size: r.u32("pack target size")?,
            zero_run_min: r.u32("zero run minimum")?,
            version,
            features,
        };
        config
            .validate()
            .map_err(|why| Error::corrupt(location, 40, why))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let c = RepoConfig::new([7; 16], 1_700_000_000, ChunkerParams::DEFAULT);
        let b = c.encode();
        assert_eq!(RepoConfig::decode(&b, "config").ok(), Some(c.clone()));
        let mut bad = b;
        bad[50] ^= 1;
        let err = RepoConfig::decode(&bad, "config").err();
        assert!(matches!(err, Some(Error::Corrupt { .. })), "{err:?}");
        let mut newer = b;
        newer[8..12].copy_from_slice(&3u32.to_le_bytes());
        let err = RepoConfig::decode(&newer, "config").err();
        assert!(
            matches!(err, Some(Error::UnsupportedVersion { found: 3, .. })),
            "{err:?}"
        );
        assert!(RepoConfig::decode(&b[..95], "config").is_err());
    }

    /// Re-seals a config after editing its bytes.
    fn with_crc(mut b: [u8; CONFIG_LEN]) -> [u8; CONFIG_LEN] {
        let crc = crc32fast::hash(&b[..CONFIG_CRC_OFFSET]);
        b[CONFIG_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn features_are_recorded_and_unknown_ones_refused() {
        let c = RepoConfig::new([7; 16], 1_700_000_000, ChunkerParams::DEFAULT);
        assert_eq!(
            c.features.names(),
            ["pack-v2", "manifest-v2", "aligned-chunker"]
        );
        let b = c.encode();
        assert_eq!(b[80..84], 0b111u32.to_le_bytes());
        // An incompatible feature from the future: refused, naming it and the reader needed.
        let mut future = b;
        future[80..84].copy_from_slice(&(0b111u32 | 1 << 9).to_le_bytes());
        future[88..91].copy_from_slice(&[0, 9, 2]);
        match RepoConfig::decode(&with_crc(future), "config") {
            Err(Error::UnsupportedFeatures {
                features,
                min_version,
                ..
            }) => {
                assert_eq!(features, ["incompat-bit-9"]);
                assert_eq!(min_version, "0.9.2");
            }
            other => panic!("{other:?}"),
        }
        // A compatible one is ignored.
        let mut compat = b;
        compat[84..88].copy_from_slice(&(1u32 << 3).to_le_bytes());
        let read = RepoConfig::decode(&with_crc(compat), "config");
        assert!(read.is_ok_and(|r| r.features.compat == 1 << 3));
        // A version 1 config (reserved bytes where the features are) has none.
        let mut v1 = c.clone();
        v1.version = 1;
        v1.features = Features::LEGACY;
        let b1 = v1.encode();
        assert_eq!(b1[80..92], [0; 12]);
        assert_eq!(RepoConfig::decode(&b1, "config").ok(), Some(v1));
        // An unknown chunker variant with a good checksum is a newer writer, not damage.
        let mut chunker = b;
        chunker[40] = 9;
        let err = RepoConfig::decode(&with_crc(chunker), "config").err();
        assert!(matches!(err, Some(Error::Unsupported { .. })), "{err:?}");
    }

    #[test]
    fn encryption_is_a_feature_with_its_codes_and_plain_configs_are_unchanged() {
        let plain = RepoConfig::new([7; 16], 1_700_000_000, ChunkerParams::DEFAULT);
        let b = plain.encode();
        assert_eq!(b[42..44], [0, 0]);
        assert!(!plain.is_encrypted());
        let mut enc = plain.clone();
        enc.features.incompat |= FEATURE_ENCRYPTION.bit;
        let e = enc.encode();
        assert_eq!(e[42..44], [1, 1]);
        assert_eq!(e[80..84], (0b111u32 | 1 << 4).to_le_bytes());
        let back = RepoConfig::decode(&e, "config");
        assert!(back.as_ref().is_ok_and(|c| c.is_encrypted()), "{back:?}");
        assert!(enc.features.names().contains(&"encryption".to_string()));
        // Only the feature bit and the two codes differ from the plain config.
        let differing: Vec<usize> = (0..CONFIG_CRC_OFFSET).filter(|&i| b[i] != e[i]).collect();
        assert_eq!(differing, [42, 43, 80]);
        // A cipher from the future is refused as such.
        let mut newer = e;
        newer[42] = 2;
        let err = RepoConfig::decode(&with_crc(newer), "config").err();
        assert!(matches!(err, Some(Error::Unsupported { .. })), "{err:?}");
    }

    #[test]
    fn parse_chunker() {
        assert_eq!(
            ChunkerParams::parse("fixed:1M").ok(),
            Some(ChunkerParams::Fixed { size: 1 << 20 })
        );
        assert_eq!(
            ChunkerParams::parse("fastcdc").ok(),
            Some(ChunkerParams::FASTCDC)
        );
        assert_eq!(
            ChunkerParams::parse("aligned").ok(),
            Some(ChunkerParams::DEFAULT)
        );
        assert_eq!(
            ChunkerParams::parse("aligned:8K:32K:128K").ok(),
            Some(ChunkerParams::Aligned {
                min: 8192,
                avg: 32768,
                max: 131072,
                seed: 0
            })
        );
        assert!(
            ChunkerParams::parse("aligned:6000:16K:64K").is_ok_and(|c| RepoConfig::new(
                [0; 16], 0, c
            )
            .validate()
            .is_err())
        );
        assert!(matches!(
            ChunkerParams::parse("fastcdc:8K:32K:128K"),
            Ok(ChunkerParams::FastCdc2020 {
                min: 8192,
                avg: 32768,
                max: 131072,
                ..
            })
        ));
        assert!(ChunkerParams::parse("rabin").is_err());
        assert!(ChunkerParams::parse("fixed:x").is_err());
    }

    #[test]
    fn validate_rejects_bad_params() {
        let mut c = RepoConfig::new([0; 16], 0, ChunkerParams::Fixed { size: 3000 });
        assert!(c.validate().is_err());
        c.chunker = ChunkerParams::Fixed { size: 1 << 20 };
        assert!(c.validate().is_ok());
        c.chunker = ChunkerParams::FastCdc2020 {
            min: 64 * 1024,
            avg: 16 * 1024,
            max: 256 * 1024,
            level: 1,
            seed: 0,
        };
        assert!(c.validate().is_err());
    }
}
