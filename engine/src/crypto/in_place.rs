//! Sealing and opening objects where they lie, without copying them.
//!
//! [`Protection::seal`] and [`Protection::open`] take and return owned buffers: fine for a
//! table or a manifest block, but a backup seals every pack frame and a restore opens every
//! one, and each copy of a 256 KiB frame (a fresh allocation, so fresh pages) showed in their
//! profiles. These variants work on a slice laid out as the stored object,
//! `nonce ‖ plaintext-or-ciphertext ‖ tag`, and produce exactly the bytes the owned variants
//! produce: same cipher, same associated data, same layout (`format-spec/encryption.md`).
//! In a plain repository the nonce and tag take no room and both are the identity.

use super::{ObjectAd, Protection, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};

impl Protection {
    /// Seals in place the object in `stored`, laid out as `[room for the nonce][plaintext]
    /// [room for the tag]` (the room is [`Protection::overhead`] bytes in all, none when
    /// plain): draws a fresh nonce, encrypts the plaintext where it is and writes nonce and tag
    /// around it. The result is what [`Protection::seal`] returns for the same plaintext.
    pub fn seal_in_place(&self, ad: &ObjectAd<'_>, stored: &mut [u8]) -> Result<()> {
        let Protection::Encrypted(keys) = self else {
            return Ok(());
        };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::Internal(format!("draw a random nonce: {e}")))?;
        let plain_end = stored
            .len()
            .checked_sub(TAG_LEN)
            .filter(|&end| end >= NONCE_LEN)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "seal {:?} {}: {} bytes leave no room for nonce and tag",
                    ad.kind,
                    ad.name,
                    stored.len()
                ))
            })?;
        let (head, tail) = stored.split_at_mut(plain_end);
        let (nonce_room, plaintext) = head.split_at_mut(NONCE_LEN);
        let tag = keys
            .cipher_for(ad.kind)
            .encrypt_in_place_detached(&nonce, &ad.encode(), plaintext)
            .map_err(|_| Error::Internal(format!("seal {:?} {}", ad.kind, ad.name)))?;
        nonce_room.copy_from_slice(&nonce);
        tail.copy_from_slice(&tag);
        Ok(())
    }

    /// Opens in place a stored object (`nonce ‖ ciphertext ‖ tag`, as read): decrypts and
    /// authenticates it where it lies and returns the plaintext, a part of `stored`, only if
    /// the tag verifies. Errors
    /// as [`Protection::open`] (a wrong tag is [`Error::Corrupt`] at `location`, `offset`); on
    /// an error the ciphertext in `stored` is zeroed, so no unauthenticated plaintext is ever
    /// left there. Plain: `stored` itself.
    pub fn open_in_place<'s>(
        &self,
        ad: &ObjectAd<'_>,
        stored: &'s mut [u8],
        location: &str,
        offset: u64,
    ) -> Result<&'s mut [u8]> {
        let Protection::Encrypted(keys) = self else {
            return Ok(stored);
        };
        let len = stored.len();
        let Some((nonce, (ciphertext, tag))) = stored
            .split_first_chunk_mut::<NONCE_LEN>()
            .and_then(|(nonce, rest)| Some((nonce, rest.split_last_chunk_mut::<TAG_LEN>()?)))
        else {
            return Err(Error::corrupt(
                location,
                offset,
                format!(
                    "sealed {:?} object of {len} bytes is shorter than its nonce and tag",
                    ad.kind
                ),
            ));
        };
        keys.cipher_for(ad.kind)
            .decrypt_in_place_detached(nonce, &ad.encode(), ciphertext, tag)
            .map_err(|_| {
                Error::corrupt(
                    location,
                    offset,
                    format!(
                        "authentication failed for {:?} {} (damaged, or not this object)",
                        ad.kind, ad.name
                    ),
                )
            })?;
        Ok(ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MasterSecret, ObjectKind, RepoKeys, KEY_LEN, SEAL_OVERHEAD};
    use super::*;

    fn keys() -> Protection {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [7; KEY_LEN],
        ))))
    }

    const AD: ObjectAd<'static> = ObjectAd {
        kind: ObjectKind::PackFrame,
        name: "0123",
        part: 16,
    };

    fn laid_out(plaintext: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; NONCE_LEN];
        buf.extend_from_slice(plaintext);
        buf.extend_from_slice(&[0u8; TAG_LEN]);
        buf
    }

    #[test]
    fn in_place_and_owned_forms_are_interchangeable() -> Result<()> {
        let p = keys();
        let plaintext = b"a frame record".repeat(100);
        // Sealed in place, opened by the owned form: the same layout and cipher.
        let mut buf = laid_out(&plaintext);
        p.seal_in_place(&AD, &mut buf)?;
        assert_eq!(buf.len(), plaintext.len() + SEAL_OVERHEAD);
        assert!(!buf.windows(14).any(|w| w == b"a frame record"));
        assert_eq!(p.open(&AD, &buf, "x", 0)?, plaintext);
        // Byte for byte what the owned form gives under the same nonce.
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&buf[..NONCE_LEN]);
        assert_eq!(p.seal_with_nonce(&AD, plaintext.clone(), nonce)?, buf);
        // Sealed by the owned form, opened in place.
        let mut sealed = p.seal(&AD, plaintext.clone())?;
        assert_eq!(p.open_in_place(&AD, &mut sealed, "x", 0)?, &plaintext[..]);
        Ok(())
    }

    #[test]
    fn open_in_place_refuses_damage_and_leaves_no_plaintext() -> Result<()> {
        let p = keys();
        let sealed = p.seal(&AD, b"hello".to_vec())?;
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(matches!(
                p.open_in_place(&AD, &mut bad, "x", 9),
                Err(Error::Corrupt { offset: 9, .. })
            ));
            assert!(!bad.windows(5).any(|w| w == b"hello"));
        }
        let other = ObjectAd { part: 17, ..AD };
        assert!(p
            .open_in_place(&other, &mut sealed.clone(), "x", 0)
            .is_err());
        assert!(p
            .open_in_place(&AD, &mut sealed[..SEAL_OVERHEAD - 1].to_vec(), "x", 0)
            .is_err());
        assert!(p.seal_in_place(&AD, &mut [0u8; SEAL_OVERHEAD - 1]).is_err());
        Ok(())
    }

    #[test]
    fn plain_in_place_is_the_identity() -> Result<()> {
        let mut buf = b"plain".to_vec();
        Protection::Plain.seal_in_place(&AD, &mut buf)?;
        assert_eq!(buf, b"plain");
        assert_eq!(
            Protection::Plain.open_in_place(&AD, &mut buf, "x", 0)?,
            b"plain"
        );
        Ok(())
    }
}
