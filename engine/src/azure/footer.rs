//! A minimal fixed-VHD footer: what a page blob disk needs, read and written.
//!
//! Azure and Azure Stack Hub page blob disks are fixed VHDs: the disk's bytes, then a 512-byte
//! big-endian footer (cookie `conectix`). Reading checks the cookie, the checksum (ones'
//! complement of the byte sum with the checksum field taken as zero) and the disk type, and
//! takes the virtual size from the current size. Writing builds a fixed-disk footer with CHS
//! geometry computed by the VHD specification's algorithm.
//!
//! TODO(dedup): `source/vhd/` has the complete VHD footer parser; once both branches are
//! merged this module should use it and keep only what page blobs add.

use crate::error::{Error, Result};

/// Size of the footer.
pub const FOOTER_LEN: usize = 512;
/// Footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Disk type of a fixed disk.
pub const DISK_TYPE_FIXED: u32 = 2;
/// Disk type of a dynamic disk.
pub const DISK_TYPE_DYNAMIC: u32 = 3;
/// Disk type of a differencing disk.
pub const DISK_TYPE_DIFFERENCING: u32 = 4;

// Field offsets, as in the VHD specification's footer table.
const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_GEOMETRY: usize = 56;
const OFF_DISK_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;

/// The fields of a footer that stackvault uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub current_size: u64,
    pub original_size: u64,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub timestamp: u32,
    pub checksum: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Ones' complement of the byte sum, the checksum field counted as zero.
pub fn checksum(footer: &[u8; FOOTER_LEN]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(OFF_CHECKSUM..OFF_CHECKSUM + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    !sum
}

/// True when `bytes` starts with the footer cookie.
pub fn has_cookie(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..8] == COOKIE
}

/// Parses a footer; `location` names the blob in errors.
pub fn parse(bytes: &[u8; FOOTER_LEN], location: &str) -> Result<Footer> {
    if !has_cookie(bytes) {
        return Err(Error::corrupt(
            location,
            0,
            "no VHD footer cookie `conectix`",
        ));
    }
    let stored = be32(bytes, OFF_CHECKSUM);
    let computed = checksum(bytes);
    if stored != computed {
        return Err(Error::corrupt(
            location,
            OFF_CHECKSUM as u64,
            format!("VHD footer checksum {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&bytes[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
    Ok(Footer {
        current_size: be64(bytes, OFF_CURRENT_SIZE),
        original_size: be64(bytes, OFF_ORIGINAL_SIZE),
        disk_type: be32(bytes, OFF_DISK_TYPE),
        unique_id,
        timestamp: be32(bytes, OFF_TIMESTAMP),
        checksum: stored,
    })
}

/// CHS geometry of a disk of `size` bytes, by the VHD specification's algorithm:
/// (cylinders, heads, sectors per track).
pub fn chs(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    if total > 65535 * 16 * 255 {
        total = 65535 * 16 * 255;
    }
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
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// Builds the footer of a fixed disk of `size` bytes (a multiple of 512) created at
/// `unix_time`.
pub fn build_fixed(size: u64, unique_id: [u8; 16], unix_time: u64) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[..8].copy_from_slice(COOKIE);
    f[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&2u32.to_be_bytes());
    f[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    let ts = unix_time.saturating_sub(VHD_EPOCH).min(u64::from(u32::MAX)) as u32;
    f[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&ts.to_be_bytes());
    // "win " (Hyper-V): readers such as qemu then take the size from the footer, not CHS.
    f[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(b"win ");
    f[OFF_CREATOR_VERSION..OFF_CREATOR_VERSION + 4].copy_from_slice(&0x000A_0000u32.to_be_bytes());
    f[OFF_CREATOR_OS..OFF_CREATOR_OS + 4].copy_from_slice(b"Wi2k");
    f[OFF_ORIGINAL_SIZE..OFF_ORIGINAL_SIZE + 8].copy_from_slice(&size.to_be_bytes());
    f[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = chs(size);
    f[OFF_GEOMETRY..OFF_GEOMETRY + 2].copy_from_slice(&c.to_be_bytes());
    f[OFF_GEOMETRY + 2] = h;
    f[OFF_GEOMETRY + 3] = s;
    f[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&DISK_TYPE_FIXED.to_be_bytes());
    f[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&unique_id);
    f[OFF_SAVED_STATE] = 0;
    let sum = checksum(&f);
    f[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Formats a unique id as a hyphenated UUID of its bytes in file order.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Parses a hyphenated (or plain) 32-hex-digit UUID into its 16 bytes in text order.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse() -> Result<()> {
        let id = [7u8; 16];
        let f = build_fixed(24 << 20, id, VHD_EPOCH + 100);
        let p = parse(&f, "t")?;
        assert_eq!(p.current_size, 24 << 20);
        assert_eq!(p.disk_type, DISK_TYPE_FIXED);
        assert_eq!(p.unique_id, id);
        assert_eq!(p.timestamp, 100);
        let mut bad = f;
        bad[100] ^= 1;
        assert!(parse(&bad, "t").is_err_and(|e| e.is_corruption()));
        let mut nocookie = f;
        nocookie[0] = b'x';
        assert!(parse(&nocookie, "t").is_err());
        Ok(())
    }

    #[test]
    fn geometry_matches_the_specification() {
        // Values the VHD specification's algorithm yields (cross-checked with qemu-img).
        assert_eq!(chs(24 << 20), (722, 4, 17));
        assert_eq!(chs(127 << 30).1, 16);
        assert_eq!(chs(1 << 40), (65535, 16, 255));
    }

    #[test]
    fn uuid_text_round_trip() {
        let id: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let s = format_uuid(&id);
        assert_eq!(s.len(), 36);
        assert_eq!(parse_uuid(&s), Some(id));
        assert_eq!(parse_uuid("xyz"), None);
    }
}
