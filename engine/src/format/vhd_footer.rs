//! The 512-byte VHD footer ("hard disk footer"): decoding, encoding, checksum and the spec's
//! CHS geometry algorithm.
//!
//! All VHD integers are big-endian. The checksum is the one's complement of the byte sum of
//! the footer with the checksum field taken as zero. Decoding checks the cookie and the disk
//! type; a checksum mismatch is returned as a warning (qemu-img refuses such files, libvhdi
//! reads them), and the caller decides whether the sizes are sane enough to go on: a damaged
//! trailing footer gives way to the copy at offset 0 where there is one (`image.rs`).

use crate::error::{Error, Result};
use crate::format::manifest::VhdGeometry;

/// Length of a footer.
pub const FOOTER_LEN: usize = 512;
/// Pre-2004 Virtual PC wrote footers one byte short (the last reserved byte missing).
pub const SHORT_FOOTER_LEN: usize = 511;
/// Footer cookie.
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";
/// Sector size of the VHD format.
pub const SECTOR: u64 = 512;
/// `data offset` of a fixed disk: no dynamic header.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// The only file format version there is (1.0).
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD epoch.
pub const VHD_EPOCH_UNIX: i64 = 946_684_800;

/// Field offsets inside the footer.
pub mod off {
    pub const COOKIE: usize = 0;
    pub const FEATURES: usize = 8;
    pub const VERSION: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const CREATOR_APP: usize = 28;
    pub const CREATOR_VERSION: usize = 32;
    pub const CREATOR_HOST_OS: usize = 36;
    pub const ORIGINAL_SIZE: usize = 40;
    pub const CURRENT_SIZE: usize = 48;
    pub const GEOMETRY: usize = 56;
    pub const DISK_TYPE: usize = 60;
    pub const CHECKSUM: usize = 64;
    pub const UNIQUE_ID: usize = 68;
    pub const SAVED_STATE: usize = 84;
}

/// Kind of a VHD; stored in manifests by its [`DiskType::as_str`] name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A decoded footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: VhdGeometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// One's complement of the byte sum of `bytes`, skipping the 4-byte checksum field at
/// `checksum_at` (the same rule for the footer and the dynamic header).
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    !sum
}

impl Footer {
    /// Decodes a footer read at `at` of `location`. Returns the footer and, when its checksum
    /// does not match, a warning.
    pub fn decode(
        bytes: &[u8; FOOTER_LEN],
        location: &str,
        at: u64,
    ) -> Result<(Footer, Option<String>)> {
        if bytes[off::COOKIE..off::COOKIE + 8] != FOOTER_COOKIE {
            return Err(Error::source_damaged(
                location,
                at,
                "bad VHD footer cookie (expected \"conectix\")",
            ));
        }
        let disk_type = match be_u32(bytes, off::DISK_TYPE) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            other => {
                return Err(Error::source_damaged(
                    location,
                    at + off::DISK_TYPE as u64,
                    format!("unknown VHD disk type {other} (expected 2, 3 or 4)"),
                ))
            }
        };
        let stored = be_u32(bytes, off::CHECKSUM);
        let computed = checksum(bytes, off::CHECKSUM);
        let warning = (stored != computed).then(|| {
            format!(
                "{location}: footer checksum at offset {} is {stored:#010x}, the footer sums to \
                 {computed:#010x}; qemu-img refuses such a file (\"Incorrect header checksum\"); \
                 stackvault reads it only because its sizes agree with the file: check the \
                 disk, or repair the footer with a tool that rewrites it",
                at + off::CHECKSUM as u64
            )
        });
        let mut app = [0u8; 4];
        app.copy_from_slice(&bytes[off::CREATOR_APP..off::CREATOR_APP + 4]);
        let mut host = [0u8; 4];
        host.copy_from_slice(&bytes[off::CREATOR_HOST_OS..off::CREATOR_HOST_OS + 4]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&bytes[off::UNIQUE_ID..off::UNIQUE_ID + 16]);
        Ok((
            Footer {
                features: be_u32(bytes, off::FEATURES),
                version: be_u32(bytes, off::VERSION),
                data_offset: be_u64(bytes, off::DATA_OFFSET),
                timestamp: be_u32(bytes, off::TIMESTAMP),
                creator_app: app,
                creator_version: be_u32(bytes, off::CREATOR_VERSION),
                creator_host_os: host,
                original_size: be_u64(bytes, off::ORIGINAL_SIZE),
                current_size: be_u64(bytes, off::CURRENT_SIZE),
                geometry: VhdGeometry {
                    cylinders: be_u16(bytes, off::GEOMETRY),
                    heads: bytes[off::GEOMETRY + 2],
                    sectors_per_track: bytes[off::GEOMETRY + 3],
                },
                disk_type,
                unique_id,
                saved_state: bytes[off::SAVED_STATE],
            },
            warning,
        ))
    }

    /// Encodes the footer with a correct checksum.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[off::COOKIE..off::COOKIE + 8].copy_from_slice(&FOOTER_COOKIE);
        b[off::FEATURES..off::FEATURES + 4].copy_from_slice(&self.features.to_be_bytes());
        b[off::VERSION..off::VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[off::DATA_OFFSET..off::DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        b[off::TIMESTAMP..off::TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        b[off::CREATOR_APP..off::CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        b[off::CREATOR_VERSION..off::CREATOR_VERSION + 4]
            .copy_from_slice(&self.creator_version.to_be_bytes());
        b[off::CREATOR_HOST_OS..off::CREATOR_HOST_OS + 4].copy_from_slice(&self.creator_host_os);
        b[off::ORIGINAL_SIZE..off::ORIGINAL_SIZE + 8]
            .copy_from_slice(&self.original_size.to_be_bytes());
        b[off::CURRENT_SIZE..off::CURRENT_SIZE + 8]
            .copy_from_slice(&self.current_size.to_be_bytes());
        b[off::GEOMETRY..off::GEOMETRY + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[off::GEOMETRY + 2] = self.geometry.heads;
        b[off::GEOMETRY + 3] = self.geometry.sectors_per_track;
        b[off::DISK_TYPE..off::DISK_TYPE + 4].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[off::UNIQUE_ID..off::UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[off::SAVED_STATE] = self.saved_state;
        let sum = checksum(&b, off::CHECKSUM);
        b[off::CHECKSUM..off::CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// CHS geometry of a disk of `size` bytes, by the algorithm in the VHD specification
/// (appendix "CHS calculation"); sizes beyond 65535×16×255 sectors get the maximum.
pub fn chs_geometry(size: u64) -> VhdGeometry {
    let mut total = size / SECTOR;
    total = total.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    VhdGeometry {
        cylinders: (cth / heads) as u16,
        heads: heads as u8,
        sectors_per_track: spt as u8,
    }
}

/// A 4-byte creator field as text: printable ASCII kept, anything else as `\xNN`.
pub fn fourcc(b: &[u8; 4]) -> String {
    b.iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                (c as char).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect()
}

/// The 16 bytes of a unique id as a hyphenated UUID, in file order.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let h = crate::format::hex(id);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses what [`format_uuid`] writes (hyphens optional).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    let bytes = crate::format::unhex(&hex)?;
    bytes.try_into().ok()
}

/// A VHD timestamp as RFC 3339 UTC.
pub fn vhd_time(timestamp: u32) -> String {
    time::OffsetDateTime::from_unix_timestamp(VHD_EPOCH_UNIX + i64::from(timestamp))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Now as a VHD timestamp (saturating: the field ends in 2136).
pub fn vhd_now() -> u32 {
    let unix = time::OffsetDateTime::now_utc().unix_timestamp();
    u32::try_from((unix - VHD_EPOCH_UNIX).max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_spec_and_qemu() {
        // Values qemu-img reports for these sizes (vpc_calculate_chs follows the same text).
        let g = chs_geometry(40 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (963, 5, 17));
        let g = chs_geometry(128 << 30);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (65535, 16, 255)
        );
        let g = chs_geometry(1 << 30);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (2080, 16, 63));
    }

    #[test]
    fn footer_round_trip_and_checksum() -> Result<()> {
        let f = Footer {
            features: 2,
            version: FILE_FORMAT_VERSION,
            data_offset: NO_DATA_OFFSET,
            timestamp: 12345,
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_host_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: chs_geometry(1 << 20),
            disk_type: DiskType::Fixed,
            unique_id: [7; 16],
            saved_state: 0,
        };
        let mut b = f.encode();
        let (g, warn) = Footer::decode(&b, "t", 0)?;
        assert_eq!(g, f);
        assert!(warn.is_none());
        b[100] ^= 1;
        let (_, warn) = Footer::decode(&b, "t", 0)?;
        assert!(warn.is_some_and(|w| w.contains("checksum")));
        b[0] = b'x';
        assert!(Footer::decode(&b, "t", 0).is_err());
        Ok(())
    }

    #[test]
    fn uuid_text_round_trip() {
        let id: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        let s = format_uuid(&id);
        assert_eq!(s.len(), 36);
        assert_eq!(parse_uuid(&s), Some(id));
    }
}
