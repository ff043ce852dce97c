//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) built from ring's ChaCha20-Poly1305.
//!
//! XChaCha20-Poly1305 under key `k` and 24-byte nonce `n` is, by definition, the IETF
//! ChaCha20-Poly1305 (RFC 8439) under the subkey `HChaCha20(k, n[0..16])` and the 12-byte
//! nonce `0x00000000 ‖ n[16..24]`. The subkey comes from RustCrypto's `chacha20::hchacha`
//! (the same function RustCrypto's `XChaCha20Poly1305` uses), the AEAD from ring, whose
//! assembly seals and opens several times faster than RustCrypto's portable-SIMD backends on
//! the frames of a backup or restore (`benches/cipher.rs`). The bytes are the same:
//! `format-spec/encryption.md`'s vectors and the test below pin that.
//!
//! Invariants: the long-lived key is zeroized on drop; each object's subkey is derived per
//! call, lives in a zeroizing buffer and in ring's key schedule on this call's stack only (ring
//! offers no zeroization of its keys; its ChaCha20 key schedule is the subkey's words, dropped
//! with the call, as RustCrypto leaves its keystream blocks on the stack); a failed open hands
//! back no plaintext (ring zeroes the buffer).

use chacha20::hchacha;
use chacha20poly1305::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

use super::{KEY_LEN, NONCE_LEN, TAG_LEN};

/// Bytes of the extended nonce that go into HChaCha20.
const HCHACHA_INPUT_LEN: usize = 16;

/// An XChaCha20-Poly1305 key.
#[derive(Clone)]
pub struct XChaCha20Poly1305 {
    key: Zeroizing<[u8; KEY_LEN]>,
}

/// Sealing or opening failed: a wrong tag (or, when sealing, a plaintext longer than
/// ChaCha20's 256 GiB). Says nothing more, like every AEAD error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

impl XChaCha20Poly1305 {
    pub fn new(key: &[u8; KEY_LEN]) -> XChaCha20Poly1305 {
        XChaCha20Poly1305 {
            key: Zeroizing::new(*key),
        }
    }

    /// ring's ChaCha20-Poly1305 under this object's subkey, and its 12-byte nonce.
    fn inner(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce), AeadError> {
        let (head, tail) = nonce.split_at(HCHACHA_INPUT_LEN);
        let mut derived = hchacha::<U10>(self.key.as_ref().into(), head.into());
        let mut subkey = Zeroizing::new([0u8; KEY_LEN]);
        subkey.copy_from_slice(derived.as_slice());
        derived.as_mut_slice().zeroize();
        let key = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_ref()).map_err(|_| AeadError)?;
        let mut short = [0u8; 12];
        short[4..].copy_from_slice(tail);
        Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(short)))
    }

    /// Encrypts `buffer` in place; returns the tag.
    pub fn encrypt_in_place_detached(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        let (key, nonce) = self.inner(nonce)?;
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), buffer)
            .map_err(|_| AeadError)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `buffer` in place if `tag` authenticates it and `aad`; on an error `buffer`
    /// holds zeros, never unauthenticated plaintext.
    pub fn decrypt_in_place_detached(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        let (key, nonce) = self.inner(nonce)?;
        key.open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(*tag), buffer, 0..)
            .map(|_| ())
            .map_err(|_| AeadError)
    }

    /// `ciphertext ‖ tag` of `plaintext` (owned form, for small objects).
    pub fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let mut out = Vec::with_capacity(plaintext.len().saturating_add(TAG_LEN));
        out.extend_from_slice(plaintext);
        let tag = self.encrypt_in_place_detached(nonce, aad, &mut out)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The plaintext of `ciphertext ‖ tag` (owned form, for small objects).
    pub fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, AeadError> {
        let (ciphertext, tag) = sealed.split_last_chunk::<TAG_LEN>().ok_or(AeadError)?;
        let mut out = ciphertext.to_vec();
        self.decrypt_in_place_detached(nonce, aad, &mut out, tag)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};

    use super::*;

    /// Byte for byte RustCrypto's XChaCha20-Poly1305, over lengths around ChaCha20's 64-byte
    /// block and Poly1305's 16-byte block, with and without associated data.
    #[test]
    fn same_bytes_as_rustcrypto() -> Result<(), AeadError> {
        let key = [0x42u8; KEY_LEN];
        let ours = XChaCha20Poly1305::new(&key);
        let theirs = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for (i, len) in [0usize, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1000, 4097]
            .into_iter()
            .enumerate()
        {
            let mut nonce = [0u8; NONCE_LEN];
            for (j, b) in nonce.iter_mut().enumerate() {
                *b = (i * 31 + j * 5) as u8;
            }
            let aad: &[u8] = if i % 2 == 0 { b"" } else { b"stackvault ad" };
            let msg = &data[..len];
            let expected = theirs
                .encrypt(nonce.as_ref().into(), Payload { msg, aad })
                .map_err(|_| AeadError)?;
            let sealed = ours.encrypt(&nonce, aad, msg)?;
            assert_eq!(sealed, expected, "length {len}");
            assert_eq!(ours.decrypt(&nonce, aad, &sealed)?, msg);
            let mut bad = sealed.clone();
            if let Some(b) = bad.last_mut() {
                *b ^= 1;
            }
            assert_eq!(ours.decrypt(&nonce, aad, &bad), Err(AeadError));
        }
        Ok(())
    }

    /// A failed open leaves no plaintext behind.
    #[test]
    fn failed_open_zeroes_the_buffer() -> Result<(), AeadError> {
        let c = XChaCha20Poly1305::new(&[1; KEY_LEN]);
        let nonce = [2; NONCE_LEN];
        let mut buf = b"secret plaintext".to_vec();
        let tag = c.encrypt_in_place_detached(&nonce, b"", &mut buf)?;
        let mut wrong = tag;
        wrong[0] ^= 1;
        assert!(c
            .decrypt_in_place_detached(&nonce, b"", &mut buf, &wrong)
            .is_err());
        assert!(buf.iter().all(|&b| b == 0));
        Ok(())
    }
}
