//! The repository config: a fixed 96-byte record written once by `init` and never changed.
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
pub const CONFIG_VERSION: u32 = 1;
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
        let bad = |why: &str| Error::InvalidArgument(format!("chunker {s:?}: {why}"));
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
            pack_target_size: 16 * 1024 * 1024,
            zero_run_min: 64 * 1024,
        }
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

    /// Encodes the config (see `format-spec/README.md`, "Repository config").
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&CONFIG_MAGIC);
        b[8..12].copy_from_slice(&CONFIG_VERSION.to_le_bytes());
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
        // 42..44 reserved
        b[44..48].copy_from_slice(&min.to_le_bytes());
        b[48..52].copy_from_slice(&avg.to_le_bytes());
        b[52..56].copy_from_slice(&max.to_le_bytes());
        b[56..64].copy_from_slice(&seed.to_le_bytes());
        b[64..68].copy_from_slice(&self.segment_size.to_le_bytes());
        b[68..72].copy_from_slice(&self.zstd_level.to_le_bytes());
        b[72..76].copy_from_slice(&self.pack_target_size.to_le_bytes());
        b[76..80].copy_from_slice(&self.zero_run_min.to_le_bytes());
        // 80..92 reserved
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
        r.u32("reserved")?;
        let repository_id = r.array::<16>("repository id")?;
        let created_unix = r.i64("created")?;
        let variant = r.u8("chunker variant")?;
        let level = r.u8("normalization level")?;
        r.u16("reserved")?;
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
            other => {
                return Err(Error::corrupt(
                    location,
                    40,
                    format!("unknown chunker variant {other}"),
                ))
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
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = RepoConfig::decode(&newer, "config").err();
        assert!(
            matches!(err, Some(Error::UnsupportedVersion { found: 2, .. })),
            "{err:?}"
        );
        assert!(RepoConfig::decode(&b[..95], "config").is_err());
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
