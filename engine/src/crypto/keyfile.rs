//! Key objects (`keys/<id>`): the repository's secrets wrapped under one password.
//!
//! A key object holds the Argon2id parameters and salt it was made with, the repository's
//! secrets sealed (XChaCha20-Poly1305) under the key Argon2id derives from the password, and,
//! in the clear, its id, creation time, the host that made it and a label the user chose.
//! Nothing in it is secret; without the password it tells nothing about the secrets. The
//! layout is `format-spec/encryption.md`, "Key objects" (little-endian, crc32 at the end).
//! Version 1 wraps one master secret (both naming and sealing secret); version 2 wraps the
//! naming and the sealing secret and names the repository it belongs to, so a key object
//! copied into another repository is recognised as foreign instead of failing later on
//! every object. A repository's key objects all have one version: the one its secrets need
//! ([`RepoSecrets::is_single`]), so `key add` on an old repository writes an old key.
//!
//! Invariants: everything before the nonce is the wrapping's associated data, so a changed
//! parameter, salt, id or label makes the password fail as a wrong one would, instead of
//! unwrapping under altered metadata; decoding checks magic, version, lengths and the crc32
//! before anything else and never panics; Argon2id parameters read from a key object are
//! bounded, so a hostile object cannot make unlock allocate without limit. Opening a key
//! always uses the parameters the object records; only new keys take [`KdfParams::for_new_keys`].

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use super::{MasterSecret, RepoSecrets, KEY_LEN, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};

/// Magic at offset 0 of a key object.
pub const KEY_MAGIC: [u8; 8] = *b"SVKEYOBJ";
/// The newest key object version this build writes and reads (it reads 1 and 2).
pub const KEY_VERSION: u32 = 2;
/// Version 1: one master secret, both naming and sealing secret.
pub const KEY_VERSION_SINGLE: u32 = 1;
/// Length of a repository id (the config's), as a version 2 key object records it.
pub const REPOSITORY_ID_LEN: usize = 16;
/// KDF code: Argon2id, version 0x13 (RFC 9106).
pub const KDF_ARGON2ID: u8 = 1;
/// Wrapping AEAD code: XChaCha20-Poly1305.
pub const WRAP_XCHACHA20POLY1305: u8 = 1;
/// Length of the Argon2id salt (RFC 9106: 128 bits suffice for all applications).
pub const SALT_LEN: usize = 16;
/// Length of a key object's id (shown as 32 hex digits, its name under `keys/`).
pub const KEY_ID_LEN: usize = 16;
/// Longest host name or label a key object holds, in bytes.
pub const MAX_TEXT_LEN: usize = 255;
/// Offset of the host name in a version 1 key object: everything before it is fixed.
const FIXED_LEN_V1: usize = 76;
/// Offset of the host name in a version 2 key object (the repository id comes first).
const FIXED_LEN_V2: usize = FIXED_LEN_V1 + REPOSITORY_ID_LEN;
/// Offset of the repository id in a version 2 key object.
pub const REPOSITORY_ID_OFFSET: u64 = FIXED_LEN_V1 as u64;

/// Bytes of the fixed fields of a key object of `version` (before the host name).
fn fixed_len(version: u32) -> usize {
    if version == KEY_VERSION_SINGLE {
        FIXED_LEN_V1
    } else {
        FIXED_LEN_V2
    }
}

/// Bytes of the wrapped secrets of a key object of `version`, tag included.
fn wrapped_len(version: u32) -> usize {
    if version == KEY_VERSION_SINGLE {
        KEY_LEN + TAG_LEN
    } else {
        2 * KEY_LEN + TAG_LEN
    }
}

/// Bytes after the label: nonce, wrapped secrets with their tag, crc32.
fn tail_len(version: u32) -> usize {
    NONCE_LEN + wrapped_len(version) + 4
}
/// Prefix of every key object's name.
pub const KEYS_PREFIX: &str = "keys/";

/// Environment variable that makes new keys use [`KdfParams::INSECURE_TEST`]: for test
/// suites only (a repository whose keys use it falls to a password guesser at once).
pub const INSECURE_TEST_KDF_ENV: &str = "STACKVAULT_INSECURE_TEST_KDF";

/// Argon2id cost parameters of one key object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes (parallelism).
    pub p: u32,
}

impl KdfParams {
    /// RFC 9106 section 4, the second recommended option (for memory-constrained
    /// environments): 64 MiB, 3 passes, 4 lanes. The first option (2 GiB) would not fit the
    /// hosts that back up VMs next to running ones.
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 4,
    };
    /// Cheap parameters for test suites ([`INSECURE_TEST_KDF_ENV`]): 64 KiB, 1 pass, 1 lane.
    pub const INSECURE_TEST: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    /// Largest memory cost a key object may ask for (4 GiB).
    pub const MAX_M_KIB: u32 = 4 * 1024 * 1024;
    /// Most passes a key object may ask for.
    pub const MAX_T: u32 = 64;
    /// Most lanes a key object may ask for.
    pub const MAX_P: u32 = 64;

    /// The parameters of keys made now: [`KdfParams::DEFAULT`], or
    /// [`KdfParams::INSECURE_TEST`] when `STACKVAULT_INSECURE_TEST_KDF=1`.
    pub fn for_new_keys() -> KdfParams {
        match std::env::var(INSECURE_TEST_KDF_ENV) {
            Ok(v) if v == "1" => KdfParams::INSECURE_TEST,
            _ => KdfParams::DEFAULT,
        }
    }

    fn argon2(&self) -> std::result::Result<Argon2<'static>, String> {
        if self.m_kib > Self::MAX_M_KIB || self.t > Self::MAX_T || self.p > Self::MAX_P {
            return Err(format!(
                "Argon2id parameters m={} KiB t={} p={} exceed this build's limits \
                 (m <= {} KiB, t <= {}, p <= {})",
                self.m_kib,
                self.t,
                self.p,
                Self::MAX_M_KIB,
                Self::MAX_T,
                Self::MAX_P
            ));
        }
        let params = Params::new(self.m_kib, self.t, self.p, Some(KEY_LEN)).map_err(|e| {
            format!(
                "Argon2id parameters m={} t={} p={}: {e}",
                self.m_kib, self.t, self.p
            )
        })?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// The wrapping key Argon2id derives from `password` and `salt` under these parameters.
    pub fn derive(
        &self,
        password: &[u8],
        salt: &[u8; SALT_LEN],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        let argon = self.argon2().map_err(Error::InvalidArgument)?;
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(password, salt, out.as_mut())
            .map_err(|e| Error::Internal(format!("Argon2id: {e}")))?;
        Ok(out)
    }
}

/// One decoded key object; its fields are public metadata, the wrapped secrets opaque.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyObject {
    /// Format version: 1 (one master secret) or 2 (naming and sealing secret).
    pub version: u32,
    /// The repository (config id) the key belongs to; version 1 keys do not say.
    pub repository: Option<[u8; REPOSITORY_ID_LEN]>,
    /// Its id, also its name under `keys/` in hex.
    pub id: [u8; KEY_ID_LEN],
    pub kdf: KdfParams,
    pub salt: [u8; SALT_LEN],
    /// When it was made (Unix seconds).
    pub created_unix: i64,
    /// The host that made it.
    pub host: String,
    /// What the user called it (`--label`), possibly empty.
    pub label: String,
    nonce: [u8; NONCE_LEN],
    /// The secrets' ciphertext and tag: [`wrapped_len`] bytes.
    wrapped: Vec<u8>,
}

/// What a key object records besides the secrets it wraps: its KDF parameters, its random
/// id, salt and nonce, and when, where and for whom it was made.
#[derive(Clone, Copy, Debug)]
pub struct KeyParts<'a> {
    pub kdf: KdfParams,
    pub id: [u8; KEY_ID_LEN],
    pub salt: [u8; SALT_LEN],
    pub nonce: [u8; NONCE_LEN],
    pub created_unix: i64,
    pub host: &'a str,
    pub label: &'a str,
}

impl KeyObject {
    /// The object's key in the repository: `keys/<id in hex>`.
    pub fn object_key(&self) -> String {
        format!("{KEYS_PREFIX}{}", self.id_hex())
    }

    /// The id as shown by `key list` and taken by `key remove`.
    pub fn id_hex(&self) -> String {
        crate::format::hex(&self.id)
    }

    /// Wraps the secrets of repository `repository` under `password` with fresh random id,
    /// salt and nonce: version 1 for a single master secret, else version 2.
    pub fn wrap(
        secrets: &RepoSecrets,
        repository: [u8; REPOSITORY_ID_LEN],
        password: &[u8],
        kdf: KdfParams,
        created_unix: i64,
        host: &str,
        label: &str,
    ) -> Result<KeyObject> {
        let mut id = [0u8; KEY_ID_LEN];
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        for buf in [&mut id[..], &mut salt[..], &mut nonce[..]] {
            getrandom::fill(buf).map_err(|e| Error::Internal(format!("draw random bytes: {e}")))?;
        }
        Self::wrap_parts(
            secrets,
            repository,
            password,
            &KeyParts {
                kdf,
                id,
                salt,
                nonce,
                created_unix,
                host,
                label,
            },
        )
    }

    /// [`KeyObject::wrap`] with the random parts given: for the test vectors only (a real
    /// key always draws fresh ones).
    #[cfg(any(test, feature = "testing"))]
    pub fn wrap_with(
        secrets: &RepoSecrets,
        repository: [u8; REPOSITORY_ID_LEN],
        password: &[u8],
        parts: &KeyParts<'_>,
    ) -> Result<KeyObject> {
        Self::wrap_parts(secrets, repository, password, parts)
    }

    fn wrap_parts(
        secrets: &RepoSecrets,
        repository: [u8; REPOSITORY_ID_LEN],
        password: &[u8],
        parts: &KeyParts<'_>,
    ) -> Result<KeyObject> {
        let KeyParts {
            kdf,
            id,
            salt,
            nonce,
            created_unix,
            host,
            label,
        } = *parts;
        for (what, text) in [("host name", host), ("label", label)] {
            if text.len() > MAX_TEXT_LEN {
                return Err(Error::Usage(format!(
                    "the key's {what} is {} bytes; at most {MAX_TEXT_LEN} fit in a key object",
                    text.len()
                )));
            }
        }
        let single = secrets.is_single();
        let mut key = KeyObject {
            version: if single {
                KEY_VERSION_SINGLE
            } else {
                KEY_VERSION
            },
            repository: (!single).then_some(repository),
            id,
            kdf,
            salt,
            created_unix,
            host: host.to_string(),
            label: label.to_string(),
            nonce,
            wrapped: Vec::new(),
        };
        let mut plain = Zeroizing::new(Vec::with_capacity(2 * KEY_LEN));
        plain.extend_from_slice(secrets.naming());
        if !single {
            plain.extend_from_slice(secrets.sealing());
        }
        let wrapping = kdf.derive(password, &salt)?;
        let aad = key.encode_head();
        key.wrapped = XChaCha20Poly1305::new(wrapping.as_ref().into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Internal("wrap the repository secrets".into()))?;
        if key.wrapped.len() != wrapped_len(key.version) {
            return Err(Error::Internal("wrapped secrets have an odd length".into()));
        }
        Ok(key)
    }

    /// The repository's secrets, when `password` is this key's; `None` when it is not (or
    /// when the object's metadata was altered: the two cannot be told apart, by design).
    pub fn unwrap(&self, password: &[u8], location: &str) -> Result<Option<RepoSecrets>> {
        let wrapping = self.kdf.derive(password, &self.salt).map_err(|e| match e {
            Error::InvalidArgument(why) => Error::corrupt(location, 16, why),
            other => other,
        })?;
        self.unwrap_with(&wrapping, location)
    }

    /// [`KeyObject::unwrap`] with the wrapping key already derived from the password under
    /// this key's parameters and salt.
    pub fn unwrap_with(
        &self,
        wrapping: &Zeroizing<[u8; KEY_LEN]>,
        location: &str,
    ) -> Result<Option<RepoSecrets>> {
        let aad = self.encode_head();
        let opened = XChaCha20Poly1305::new(wrapping.as_ref().into()).decrypt(
            XNonce::from_slice(&self.nonce),
            Payload {
                msg: &self.wrapped,
                aad: &aad,
            },
        );
        let Ok(plain) = opened else {
            return Ok(None);
        };
        let plain = Zeroizing::new(plain);
        let wrong = || Error::corrupt(location, 0, "wrapped secrets have a wrong length");
        let secret = |at: usize| -> Result<[u8; KEY_LEN]> {
            plain
                .get(at..at + KEY_LEN)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(wrong)
        };
        if plain.len() != wrapped_len(self.version) - TAG_LEN {
            return Err(wrong());
        }
        if self.version == KEY_VERSION_SINGLE {
            let master = MasterSecret::from_bytes(secret(0)?);
            return Ok(Some(RepoSecrets::from_master(&master)));
        }
        Ok(Some(RepoSecrets::from_parts(secret(0)?, secret(KEY_LEN)?)))
    }

    /// Everything before the nonce: the wrapping's associated data.
    fn encode_head(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            fixed_len(self.version) + self.host.len() + self.label.len() + tail_len(self.version),
        );
        b.extend_from_slice(&KEY_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.push(KDF_ARGON2ID);
        b.push(WRAP_XCHACHA20POLY1305);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.kdf.m_kib.to_le_bytes());
        b.extend_from_slice(&self.kdf.t.to_le_bytes());
        b.extend_from_slice(&self.kdf.p.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.salt);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.created_unix.to_le_bytes());
        // Lengths are checked at wrap and decode (<= 255), so the casts are exact.
        b.extend_from_slice(&(self.host.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.label.len() as u16).to_le_bytes());
        if let Some(repository) = &self.repository {
            b.extend_from_slice(repository);
        }
        b.extend_from_slice(self.host.as_bytes());
        b.extend_from_slice(self.label.as_bytes());
        b
    }

    /// The stored bytes (see `format-spec/encryption.md`).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.encode_head();
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.wrapped);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a stored key object; `location` names it in errors.
    pub fn decode(data: &[u8], location: &str) -> Result<KeyObject> {
        let bad = |offset: usize, what: String| Error::corrupt(location, offset as u64, what);
        if data.len() < FIXED_LEN_V1 + tail_len(KEY_VERSION_SINGLE) {
            return Err(bad(
                0,
                format!(
                    "key object of {} bytes is shorter than its fixed fields",
                    data.len()
                ),
            ));
        }
        let mut r = crate::format::Reader::new(data, 0, location);
        if r.array::<8>("key magic")? != KEY_MAGIC {
            return Err(bad(0, "bad magic: not a stackvault key object".into()));
        }
        let version = r.u32("key object version")?;
        if version != KEY_VERSION && version != KEY_VERSION_SINGLE {
            return Err(Error::UnsupportedVersion {
                what: format!("key object {location}"),
                found: version,
                supported: KEY_VERSION,
            });
        }
        let (body, crc) = data.split_at(data.len() - 4);
        let stored_crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != stored_crc {
            return Err(bad(body.len(), "key object checksum mismatch".into()));
        }
        let kdf_code = r.u8("kdf")?;
        let wrap_code = r.u8("wrapping cipher")?;
        if kdf_code != KDF_ARGON2ID || wrap_code != WRAP_XCHACHA20POLY1305 {
            return Err(Error::unsupported(format!(
                "{location}: key derivation {kdf_code} / wrapping cipher {wrap_code} are unknown \
                 to this stackvault {}; use a newer one",
                env!("CARGO_PKG_VERSION")
            )));
        }
        r.u16("reserved")?;
        let kdf = KdfParams {
            m_kib: r.u32("argon2 m")?,
            t: r.u32("argon2 t")?,
            p: r.u32("argon2 p")?,
        };
        r.u32("reserved")?;
        let salt = r.array::<SALT_LEN>("salt")?;
        let id = r.array::<KEY_ID_LEN>("key id")?;
        let created_unix = r.i64("created")?;
        let host_len = usize::from(r.u16("host length")?);
        let label_len = usize::from(r.u16("label length")?);
        if host_len > MAX_TEXT_LEN || label_len > MAX_TEXT_LEN {
            return Err(bad(
                72,
                format!("host/label lengths {host_len}/{label_len} exceed {MAX_TEXT_LEN}"),
            ));
        }
        let fixed = fixed_len(version);
        let expected = fixed + host_len + label_len + tail_len(version);
        if data.len() != expected {
            return Err(bad(
                0,
                format!(
                    "key object is {} bytes, its lengths say {expected}",
                    data.len()
                ),
            ));
        }
        let text = |from: usize, len: usize, what: &str| -> Result<String> {
            let bytes = data.get(from..from + len).unwrap_or_default();
            String::from_utf8(bytes.to_vec()).map_err(|_| bad(from, format!("{what} is not UTF-8")))
        };
        let repository = match version {
            KEY_VERSION_SINGLE => None,
            _ => Some(r.array::<REPOSITORY_ID_LEN>("repository id")?),
        };
        let host = text(fixed, host_len, "host name")?;
        let label = text(fixed + host_len, label_len, "label")?;
        let tail = fixed + host_len + label_len;
        let mut t =
            crate::format::Reader::new(data.get(tail..).unwrap_or_default(), tail as u64, location);
        let nonce = t.array::<NONCE_LEN>("nonce")?;
        let wrapped = data
            .get(tail + NONCE_LEN..tail + NONCE_LEN + wrapped_len(version))
            .ok_or_else(|| bad(tail + NONCE_LEN, "wrapped secrets truncated".into()))?
            .to_vec();
        Ok(KeyObject {
            version,
            repository,
            id,
            kdf,
            salt,
            created_unix,
            host,
            label,
            nonce,
            wrapped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_of(secrets: &RepoSecrets, password: &[u8]) -> Result<KeyObject> {
        KeyObject::wrap(
            secrets,
            [0x77; REPOSITORY_ID_LEN],
            password,
            KdfParams::INSECURE_TEST,
            1_700_000_000,
            "host-a",
            "laptop",
        )
    }

    /// Argon2id with several lanes gives the reference implementation's bytes (libargon2's
    /// `argon2id_hash_raw`, the values below), whether the lanes are computed one after the
    /// other or in parallel: the format's vectors use p = 1, and every default key p = 4.
    #[test]
    fn argon2id_with_four_lanes_matches_the_reference() -> Result<()> {
        let password = b"correct horse battery staple";
        let salt = [3u8; SALT_LEN];
        for (params, expected) in [
            (
                KdfParams {
                    m_kib: 1024,
                    t: 2,
                    p: 4,
                },
                "84ca6a53170658402bdef26c49d258b9f01cb7ec0263bd188dd3934bbb5dea49",
            ),
            (
                KdfParams::DEFAULT,
                "8c9d68f093cb3be59052be89c4a52ced026e20b85c4857b9c645df3e7eb842ac",
            ),
        ] {
            let key = params.derive(password, &salt)?;
            assert_eq!(crate::format::hex(key.as_ref()), expected, "{params:?}");
        }
        Ok(())
    }

    /// A version 2 key (naming and sealing secret).
    fn sample(password: &[u8]) -> Result<KeyObject> {
        sample_of(
            &RepoSecrets::from_parts([9; KEY_LEN], [5; KEY_LEN]),
            password,
        )
    }

    /// A version 1 key (one master secret).
    fn sample_v1(password: &[u8]) -> Result<KeyObject> {
        let master = MasterSecret::from_bytes([9; KEY_LEN]);
        sample_of(&RepoSecrets::from_master(&master), password)
    }

    #[test]
    fn wraps_and_unwraps_only_with_its_password() -> Result<()> {
        for (key, version, sealing) in [
            (sample(b"pw")?, KEY_VERSION, [5; KEY_LEN]),
            (sample_v1(b"pw")?, KEY_VERSION_SINGLE, [9; KEY_LEN]),
        ] {
            assert_eq!(key.version, version);
            let bytes = key.encode();
            assert_eq!(
                bytes.len(),
                fixed_len(version) + "host-a".len() + "laptop".len() + tail_len(version)
            );
            let back = KeyObject::decode(&bytes, "k")?;
            assert_eq!(back, key);
            let secrets = back.unwrap(b"pw", "k")?;
            let secrets = secrets.as_ref().map(|s| (*s.naming(), *s.sealing()));
            assert_eq!(secrets, Some(([9; KEY_LEN], sealing)));
            assert!(back.unwrap(b"pW", "k")?.is_none());
        }
        assert_eq!(sample(b"pw")?.repository, Some([0x77; REPOSITORY_ID_LEN]));
        assert_eq!(sample_v1(b"pw")?.repository, None);
        Ok(())
    }

    #[test]
    fn newer_versions_are_refused_as_unsupported() -> Result<()> {
        let mut bytes = sample(b"pw")?.encode();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            KeyObject::decode(&bytes, "k"),
            Err(Error::UnsupportedVersion {
                found: 3,
                supported: KEY_VERSION,
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn any_flipped_byte_is_refused_or_fails_to_unwrap() -> Result<()> {
        for key in [sample(b"pw")?, sample_v1(b"pw")?] {
            let bytes = key.encode();
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x10;
                match KeyObject::decode(&bad, "k") {
                    Err(_) => {}
                    Ok(k) => assert!(k.unwrap(b"pw", "k")?.is_none(), "byte {i}"),
                }
            }
            for len in 0..bytes.len() {
                assert!(KeyObject::decode(&bytes[..len], "k").is_err());
            }
        }
        Ok(())
    }

    #[test]
    fn altered_metadata_with_a_fixed_crc_does_not_unwrap() -> Result<()> {
        let mut key = sample(b"pw")?;
        key.label = "other".into();
        assert!(key.unwrap(b"pw", "k")?.is_none());
        let mut key = sample(b"pw")?;
        key.repository = Some([0x78; REPOSITORY_ID_LEN]);
        assert!(key.unwrap(b"pw", "k")?.is_none());
        Ok(())
    }

    #[test]
    fn hostile_costs_are_refused_before_any_allocation() -> Result<()> {
        let mut key = sample(b"pw")?;
        key.kdf.m_kib = u32::MAX;
        assert!(matches!(key.unwrap(b"pw", "k"), Err(Error::Corrupt { .. })));
        Ok(())
    }
}
