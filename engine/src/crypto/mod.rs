//! Encryption at rest: the keys of one repository and the sealing of every object it stores.
//!
//! A repository is either plain or encrypted ([`Protection`]); every place that names a chunk
//! or stores an object goes through it, so a plain repository is the same code path with the
//! identity transform. An encrypted repository has two random secrets ([`RepoSecrets`]),
//! wrapped by one or more password-derived key objects (`keys/…`, see
//! `format-spec/encryption.md`): the **naming secret**, from which the keys that name things
//! derive (chunk ids, the chunker's cut decision, object ids), and the **sealing secret**,
//! from which the keys that seal objects derive (object data, metadata). So no key serves two
//! purposes, and two repositories can share their naming (`init --like`: a copy keeps chunk
//! and snapshot ids) while each seals with its own keys. Key objects of version 1 hold one
//! [`MasterSecret`] that is both secrets: they derive exactly the keys they always did.
//!
//! Invariants: an object is sealed with a fresh random nonce and associated data that binds it
//! to its kind and name ([`ObjectAd`]), so a stored object cannot be swapped for another one or
//! replayed under another name; opening checks the tag before any byte is returned; key bytes
//! live in [`Zeroizing`] buffers and never reach `Debug`, errors, logs or caches.

pub use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::format::ChunkId;
use xchacha::XChaCha20Poly1305;

mod in_place;
pub mod keyfile;
pub mod unlock;
pub mod xchacha;

/// Length of each secret and of every derived subkey.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce at the start of a sealed object.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag at the end of a sealed object.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed object has beyond its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Domain separator at the start of every object's associated data.
const AD_DOMAIN: &[u8] = b"stackvault sealed object v1";

/// BLAKE3 `derive_key` contexts, one per subkey (`format-spec/encryption.md`, "Secrets").
const CONTEXT_CHUNK_ID: &str = "stackvault 2026-11-30 chunk id key";
const CONTEXT_CHUNKER: &str = "stackvault 2026-11-30 chunker key";
const CONTEXT_OBJECT_ID: &str = "stackvault 2026-11-30 object id key";
const CONTEXT_DATA: &str = "stackvault 2026-11-30 object data key";
const CONTEXT_METADATA: &str = "stackvault 2026-11-30 metadata key";
/// Context of the naming fingerprint: compared between two unlocked repositories, never stored
/// or shown.
const CONTEXT_NAMING_FINGERPRINT: &str = "stackvault 2026-12-01 naming fingerprint";

/// The one random secret of a repository whose key objects are version 1: it is both the
/// naming and the sealing secret ([`RepoSecrets::from_master`]). Never stored unwrapped.
pub struct MasterSecret(Zeroizing<[u8; KEY_LEN]>);

impl MasterSecret {
    /// A fresh random secret (for `init`).
    pub fn generate() -> Result<MasterSecret> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut())
            .map_err(|e| Error::Internal(format!("draw a random master secret: {e}")))?;
        Ok(MasterSecret(bytes))
    }

    /// A secret from its bytes (unwrapped from a key object, or a test vector).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterSecret {
        MasterSecret(Zeroizing::new(bytes))
    }

    /// The secret's bytes, for wrapping it into a key object.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(…)")
    }
}

/// The secrets of one encrypted repository, as its key objects wrap them: the naming secret
/// (chunk ids, the chunker, object ids) and the sealing secret (the AEAD keys). Never stored
/// unwrapped, never shown.
pub struct RepoSecrets {
    naming: Zeroizing<[u8; KEY_LEN]>,
    sealing: Zeroizing<[u8; KEY_LEN]>,
    /// One master secret serves as both (key object version 1).
    single: bool,
}

impl RepoSecrets {
    /// Two fresh random secrets (for `init`).
    pub fn generate() -> Result<RepoSecrets> {
        Ok(RepoSecrets {
            naming: random_secret("naming")?,
            sealing: random_secret("sealing")?,
            single: false,
        })
    }

    /// `other`'s naming secret with a fresh sealing secret (for `init --like`). A version 1
    /// secret cannot be shared: it is also `other`'s sealing secret, which would give the
    /// holders of the new repository's passwords the keys of every object of `other`.
    pub fn sharing_naming_of(other: &RepoSecrets) -> Result<RepoSecrets> {
        if other.single {
            return Err(Error::unsupported(
                "its key objects are version 1 (one secret for both naming and sealing), so \
                 its naming keys cannot be shared without handing over its data keys",
            ));
        }
        Ok(RepoSecrets {
            naming: Zeroizing::new(*other.naming),
            sealing: random_secret("sealing")?,
            single: false,
        })
    }

    /// The secrets of a version 1 key object: its master secret is both.
    pub fn from_master(master: &MasterSecret) -> RepoSecrets {
        RepoSecrets {
            naming: Zeroizing::new(*master.expose()),
            sealing: Zeroizing::new(*master.expose()),
            single: true,
        }
    }

    /// Two separate secrets from their bytes (unwrapped from a version 2 key object, or a
    /// test vector).
    pub fn from_parts(naming: [u8; KEY_LEN], sealing: [u8; KEY_LEN]) -> RepoSecrets {
        RepoSecrets {
            naming: Zeroizing::new(naming),
            sealing: Zeroizing::new(sealing),
            single: false,
        }
    }

    /// Whether one master secret is both secrets (wrapped in key objects of version 1).
    pub fn is_single(&self) -> bool {
        self.single
    }

    /// The naming secret's bytes, for wrapping it into a key object.
    pub fn naming(&self) -> &[u8; KEY_LEN] {
        &self.naming
    }

    /// The sealing secret's bytes, for wrapping it into a key object.
    pub fn sealing(&self) -> &[u8; KEY_LEN] {
        &self.sealing
    }
}

impl std::fmt::Debug for RepoSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoSecrets(…)")
    }
}

fn random_secret(what: &str) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(bytes.as_mut())
        .map_err(|e| Error::Internal(format!("draw a random {what} secret: {e}")))?;
    Ok(bytes)
}

/// What a sealed object is; part of its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// One frame of a pack (`name` is the pack's name, `part` the frame's offset in the pack).
    PackFrame = 1,
    /// A pack's chunk table (`name` is the pack's name).
    PackTable = 2,
    /// A snapshot manifest.
    Manifest = 3,
    /// An index delta (`index/xx/<pack>`).
    IndexDelta = 4,
    /// A verification record.
    Verification = 5,
    /// A VM snapshot record.
    VmSnapshot = 6,
    /// A drill record (`drills/<id>`).
    Drill = 7,
    /// A prune's condemnation record (`condemned/<time>-<hex>`; `name` is its whole key).
    Condemned = 8,
}

/// The associated data of one sealed object: what it is and where it belongs.
#[derive(Clone, Copy, Debug)]
pub struct ObjectAd<'a> {
    pub kind: ObjectKind,
    /// The object's name or id as stored (pack name, snapshot id, …).
    pub name: &'a str,
    /// A position within the named object (a frame's offset in its pack), 0 otherwise.
    pub part: u64,
}

impl ObjectAd<'_> {
    /// The bytes authenticated with the object: domain, kind, part (u64 LE), name.
    pub fn encode(&self) -> Vec<u8> {
        let mut ad = Vec::with_capacity(AD_DOMAIN.len() + 9 + self.name.len());
        ad.extend_from_slice(AD_DOMAIN);
        ad.push(self.kind as u8);
        ad.extend_from_slice(&self.part.to_le_bytes());
        ad.extend_from_slice(self.name.as_bytes());
        ad
    }
}

/// The subkeys of one encrypted repository, derived from its secrets. A clone holds its own
/// zeroized copies (a streaming writer that outlives a borrow of the repository).
#[derive(Clone)]
pub struct RepoKeys {
    chunk_id: Zeroizing<[u8; KEY_LEN]>,
    chunker: Zeroizing<[u8; KEY_LEN]>,
    /// Keys the names of objects named after their contents (manifests, VM records).
    object_id: Zeroizing<[u8; KEY_LEN]>,
    /// A one-way function of the naming secret: equal in two repositories exactly when they
    /// name alike. Compared, never stored or shown.
    naming_fingerprint: Zeroizing<[u8; KEY_LEN]>,
    data: XChaCha20Poly1305,
    metadata: XChaCha20Poly1305,
}

impl std::fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKeys(…)")
    }
}

impl RepoKeys {
    /// Derives every subkey from a version 1 master secret: [`RepoKeys::from_secrets`] with
    /// the master as both secrets, so the keys are the ones it has always given.
    pub fn derive(master: &MasterSecret) -> RepoKeys {
        RepoKeys::from_secrets(&RepoSecrets::from_master(master))
    }

    /// Derives every subkey (BLAKE3 `derive_key`, one context per purpose): the naming keys
    /// from the naming secret, the sealing keys from the sealing secret.
    pub fn from_secrets(secrets: &RepoSecrets) -> RepoKeys {
        let naming = |context: &str| Zeroizing::new(blake3::derive_key(context, secrets.naming()));
        let sealing =
            |context: &str| Zeroizing::new(blake3::derive_key(context, secrets.sealing()));
        let data = sealing(CONTEXT_DATA);
        let metadata = sealing(CONTEXT_METADATA);
        RepoKeys {
            chunk_id: naming(CONTEXT_CHUNK_ID),
            chunker: naming(CONTEXT_CHUNKER),
            object_id: naming(CONTEXT_OBJECT_ID),
            naming_fingerprint: naming(CONTEXT_NAMING_FINGERPRINT),
            data: XChaCha20Poly1305::new(&data),
            metadata: XChaCha20Poly1305::new(&metadata),
        }
    }

    fn cipher_for(&self, kind: ObjectKind) -> &XChaCha20Poly1305 {
        match kind {
            ObjectKind::PackFrame => &self.data,
            _ => &self.metadata,
        }
    }
}

/// How a repository names chunks and turns objects into stored bytes.
#[derive(Clone, Debug)]
pub enum Protection {
    /// Unencrypted: plain BLAKE3 ids, objects stored as they are.
    Plain,
    /// Encrypted: keyed ids, keyed chunker, every object sealed.
    Encrypted(Box<RepoKeys>),
}

impl Protection {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Protection::Encrypted(_))
    }

    /// Whether `self` and `other` name chunks and objects alike: both plain, or both
    /// encrypted with the same naming secret (compared through its keyed fingerprint, never
    /// the secret itself). Then a chunk, a manifest or a record has the same id in both.
    pub fn same_naming(&self, other: &Protection) -> bool {
        match (self, other) {
            (Protection::Plain, Protection::Plain) => true,
            (Protection::Encrypted(a), Protection::Encrypted(b)) => {
                // Not secret (a one-way function of the naming secret), but compared in
                // constant time anyway: nothing about it should leak through timing.
                let mut diff = 0u8;
                for (x, y) in a.naming_fingerprint.iter().zip(b.naming_fingerprint.iter()) {
                    diff |= x ^ y;
                }
                diff == 0
            }
            _ => false,
        }
    }

    /// The chunk id of `data`: BLAKE3, keyed with the chunk-id subkey when encrypted.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        match self {
            Protection::Plain => ChunkId(*blake3::hash(data).as_bytes()),
            Protection::Encrypted(keys) => {
                ChunkId(*blake3::keyed_hash(&keys.chunk_id, data).as_bytes())
            }
        }
    }

    /// A hasher whose output over a chunk's bytes is [`Protection::chunk_id`] of them, for
    /// chunks hashed piece by piece as they are read (`backup::streamed`).
    pub fn chunk_hasher(&self) -> blake3::Hasher {
        match self {
            Protection::Plain => blake3::Hasher::new(),
            Protection::Encrypted(keys) => blake3::Hasher::new_keyed(&keys.chunk_id),
        }
    }

    /// The hasher that names an object after its plaintext (a snapshot id, a VM record id):
    /// plain BLAKE3, keyed with the object-id subkey when encrypted, so that a name is no
    /// fingerprint of the plaintext.
    pub fn object_id_hasher(&self) -> blake3::Hasher {
        match self {
            Protection::Plain => blake3::Hasher::new(),
            Protection::Encrypted(keys) => blake3::Hasher::new_keyed(&keys.object_id),
        }
    }

    /// A small record named by its content (VM snapshot and drill records): its id is the
    /// hex [`Protection::object_id_hasher`] hash of `plaintext`, and its stored bytes are
    /// `plaintext` sealed as `kind` under that id.
    pub fn seal_named(&self, kind: ObjectKind, plaintext: Vec<u8>) -> Result<(Vec<u8>, String)> {
        let id = self
            .object_id_hasher()
            .update(&plaintext)
            .finalize()
            .to_hex()
            .to_string();
        let stored = self.seal(
            &ObjectAd {
                kind,
                name: &id,
                part: 0,
            },
            plaintext,
        )?;
        Ok((stored, id))
    }

    /// The plaintext of record `id` stored by [`Protection::seal_named`] at `location`:
    /// authenticated first, then checked to hash to its id; `what` names the record in errors.
    pub fn open_named(
        &self,
        kind: ObjectKind,
        id: &str,
        stored: &[u8],
        location: &str,
        what: &str,
    ) -> Result<Vec<u8>> {
        let plaintext = self.open(
            &ObjectAd {
                kind,
                name: id,
                part: 0,
            },
            stored,
            location,
            0,
        )?;
        let hash = self.object_id_hasher().update(&plaintext).finalize();
        if hash.to_hex().as_str() != id {
            return Err(Error::corrupt(
                location,
                0,
                format!("{what} does not match its checksum (the BLAKE3 hash in its name)"),
            ));
        }
        Ok(plaintext)
    }

    /// The key of the chunker's cut decision, when encrypted.
    pub fn chunker_key(&self) -> Option<&[u8; KEY_LEN]> {
        match self {
            Protection::Plain => None,
            Protection::Encrypted(keys) => Some(&keys.chunker),
        }
    }

    /// Bytes sealing adds to an object of this repository.
    pub fn overhead(&self) -> usize {
        match self {
            Protection::Plain => 0,
            Protection::Encrypted(_) => SEAL_OVERHEAD,
        }
    }

    /// The stored form of `plaintext`: `nonce ‖ ciphertext ‖ tag` when encrypted, itself when plain.
    pub fn seal(&self, ad: &ObjectAd<'_>, plaintext: Vec<u8>) -> Result<Vec<u8>> {
        let Protection::Encrypted(keys) = self else {
            return Ok(plaintext);
        };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::Internal(format!("draw a random nonce: {e}")))?;
        seal_under(keys, ad, &plaintext, nonce)
    }

    /// [`Protection::seal`] with a given nonce, for rebuilding bytes sealed before: a version 2
    /// index delta carries a sealed pack table as its plaintext and nonce, and the reader seals
    /// them again to get the table's stored bytes (`format-spec/index-deltas.md`). Never for
    /// new data, which always draws a fresh nonce: hence not public.
    pub(crate) fn reseal(
        &self,
        ad: &ObjectAd<'_>,
        plaintext: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>> {
        match self {
            Protection::Plain => Ok(plaintext.to_vec()),
            Protection::Encrypted(keys) => seal_under(keys, ad, plaintext, nonce),
        }
    }

    /// [`Protection::reseal`], for the test vectors only.
    #[cfg(any(test, feature = "testing"))]
    pub fn seal_with_nonce(
        &self,
        ad: &ObjectAd<'_>,
        plaintext: Vec<u8>,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>> {
        self.reseal(ad, &plaintext, nonce)
    }

    /// The plaintext of a stored object; a wrong tag (any flipped byte, another object's bytes,
    /// another kind or name) is [`Error::Corrupt`] naming `location` and `offset` (where the
    /// sealed object starts in it).
    pub fn open(
        &self,
        ad: &ObjectAd<'_>,
        stored: &[u8],
        location: &str,
        offset: u64,
    ) -> Result<Vec<u8>> {
        let Protection::Encrypted(keys) = self else {
            return Ok(stored.to_vec());
        };
        let (nonce, sealed) = match stored.split_first_chunk::<NONCE_LEN>() {
            Some(parts) if parts.1.len() >= TAG_LEN => parts,
            _ => {
                return Err(Error::corrupt(
                    location,
                    offset,
                    format!(
                        "sealed {:?} object of {} bytes is shorter than its nonce and tag",
                        ad.kind,
                        stored.len()
                    ),
                ))
            }
        };
        let aad = ad.encode();
        keys.cipher_for(ad.kind)
            .decrypt(nonce, &aad, sealed)
            .map_err(|_| {
                Error::corrupt(
                    location,
                    offset,
                    format!(
                        "authentication failed for {:?} {} (damaged, or not this object)",
                        ad.kind, ad.name
                    ),
                )
            })
    }
}

/// `nonce ‖ ciphertext ‖ tag` of `plaintext` under `keys`' subkey for `ad.kind`.
fn seal_under(
    keys: &RepoKeys,
    ad: &ObjectAd<'_>,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>> {
    let aad = ad.encode();
    let sealed = keys
        .cipher_for(ad.kind)
        .encrypt(&nonce, &aad, plaintext)
        .map_err(|_| Error::Internal(format!("seal {:?} {}", ad.kind, ad.name)))?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Protection {
        Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [7; KEY_LEN],
        ))))
    }

    const AD: ObjectAd<'static> = ObjectAd {
        kind: ObjectKind::Manifest,
        name: "abc",
        part: 0,
    };

    #[test]
    fn sealed_objects_open_only_under_their_own_associated_data() -> Result<()> {
        let p = keys();
        let sealed = p.seal(&AD, b"hello".to_vec())?;
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(p.open(&AD, &sealed, "x", 0)?, b"hello");
        let other = ObjectAd { name: "abd", ..AD };
        assert!(p.open(&other, &sealed, "x", 0).is_err());
        let kind = ObjectAd {
            kind: ObjectKind::IndexDelta,
            ..AD
        };
        assert!(p.open(&kind, &sealed, "x", 0).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(matches!(
                p.open(&AD, &bad, "x", 0),
                Err(Error::Corrupt { .. })
            ));
        }
        assert!(p.open(&AD, &sealed[..SEAL_OVERHEAD - 1], "x", 0).is_err());
        Ok(())
    }

    #[test]
    fn keyed_ids_differ_from_plain_ids_and_between_repositories() {
        let other = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [8; KEY_LEN],
        ))));
        let plain = Protection::Plain.chunk_id(b"data");
        assert_eq!(plain, ChunkId(*blake3::hash(b"data").as_bytes()));
        assert_ne!(keys().chunk_id(b"data"), plain);
        assert_ne!(keys().chunk_id(b"data"), other.chunk_id(b"data"));
        assert_eq!(keys().chunk_id(b"data"), keys().chunk_id(b"data"));
    }

    #[test]
    fn plain_is_the_identity() -> Result<()> {
        assert_eq!(Protection::Plain.seal(&AD, b"x".to_vec())?, b"x");
        assert_eq!(Protection::Plain.open(&AD, b"x", "x", 0)?, b"x");
        Ok(())
    }

    /// Version 1 secrets derive the keys they always did: the master is both secrets.
    #[test]
    fn a_master_secret_is_both_secrets() {
        let master = MasterSecret::from_bytes([7; KEY_LEN]);
        let split = Protection::Encrypted(Box::new(RepoKeys::from_secrets(
            &RepoSecrets::from_parts([7; KEY_LEN], [7; KEY_LEN]),
        )));
        assert_eq!(split.chunk_id(b"data"), keys().chunk_id(b"data"));
        assert_eq!(split.chunker_key(), keys().chunker_key());
        assert!(RepoSecrets::from_master(&master).is_single());
        assert!(RepoSecrets::sharing_naming_of(&RepoSecrets::from_master(&master)).is_err());
    }

    /// Shared naming: the same ids and cut decisions, but one's seals do not open with the
    /// other's keys.
    #[test]
    fn shared_naming_keeps_ids_but_not_seals() -> Result<()> {
        let src = RepoSecrets::generate()?;
        let dst = RepoSecrets::sharing_naming_of(&src)?;
        let (a, b) = (
            Protection::Encrypted(Box::new(RepoKeys::from_secrets(&src))),
            Protection::Encrypted(Box::new(RepoKeys::from_secrets(&dst))),
        );
        assert!(a.same_naming(&b) && b.same_naming(&a));
        assert_eq!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_eq!(a.chunker_key(), b.chunker_key());
        let id = |p: &Protection| p.object_id_hasher().update(b"m").finalize();
        assert_eq!(id(&a), id(&b));
        let sealed = a.seal(&AD, b"hello".to_vec())?;
        assert!(matches!(
            b.open(&AD, &sealed, "x", 0),
            Err(Error::Corrupt { .. })
        ));
        let other =
            Protection::Encrypted(Box::new(RepoKeys::from_secrets(&RepoSecrets::generate()?)));
        assert!(!a.same_naming(&other));
        assert!(!a.same_naming(&Protection::Plain));
        assert!(Protection::Plain.same_naming(&Protection::Plain));
        Ok(())
    }
}
