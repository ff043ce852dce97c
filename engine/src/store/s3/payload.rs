//! How a single-request object upload vouches for its body: `UNSIGNED-PAYLOAD` in the
//! signature, and the body's CRC-32 in `x-amz-checksum-crc32`, which the signature covers.
//!
//! SigV4 can sign the body's SHA-256 instead, but hashing every uploaded byte with SHA-256 is
//! CPU that a backup shares with reading, chunking and compressing (1.5 % of a remote gen1's
//! samples, the upload of every new pack; profiled). What the payload hash buys is that the
//! service refuses a body changed in transit; the CRC-32 (hardware-assisted, `crc32fast`)
//! gives the same refusal for damage, and the service checks it before it stores anything.
//! Against a party able to rewrite traffic, a body hash in the signature of a PUT is no
//! defence anyway on plain HTTP (the answers of GETs are signed by nobody) and not needed on
//! HTTPS; the repository's own checks (sealed objects, chunk ids) are what a reader trusts.
//!
//! Invariant: the checksum header is added before signing, so it is one of the signed headers.

/// The `x-amz-content-sha256` value that leaves the body out of the signature.
pub(super) const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The header carrying the body's CRC-32: base64 of its four big-endian bytes.
pub(super) fn crc32_header(body: &[u8]) -> (&'static str, String) {
    use base64::Engine as _;
    let crc = crc32fast::hash(body);
    (
        "x-amz-checksum-crc32",
        base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32 of "Hello, World!" is 0xEC4AC3D0 (zlib's `crc32` agrees): sent as `7ErD0A==`.
    #[test]
    fn crc32_header_is_base64_of_the_big_endian_crc() {
        assert_eq!(crc32_header(b"Hello, World!").1, "7ErD0A==");
        assert_eq!(crc32_header(b"").1, "AAAAAA==");
    }
}
