//! Unlocking a repository with a password, and managing its key objects (`key list|add|remove|passwd`).
//!
//! The engine never asks for a password itself: the front end registers a
//! [`PasswordProvider`] ([`set_password_provider`]: environment, file, command, terminal
//! prompt), which is called only when an encrypted repository is opened or created, so plain
//! repositories never prompt. Without one, `STACKVAULT_PASSWORD` is read.
//!
//! Invariants: a wrong password is one [`Error::WrongPassword`] before any other work; the
//! password and the secrets stay in zeroizing buffers and appear in no message; a key object
//! that names another repository (copied from it) never unlocks this one; a
//! repository keeps at least one key object: removal is refused for the last one and
//! happens under the maintenance lock, so two hosts cannot each remove "the other" key.

use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use super::keyfile::{
    KdfParams, KeyObject, KEYS_PREFIX, REPOSITORY_ID_LEN, REPOSITORY_ID_OFFSET, SALT_LEN,
};
use super::{Protection, RepoKeys, RepoSecrets, KEY_LEN};
use crate::error::{Error, Result};
use crate::store::Backend;

/// Environment variable holding the repository password.
pub const PASSWORD_ENV: &str = "STACKVAULT_PASSWORD";

/// What a password is asked for; a prompt says so, and asks twice for a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordUse {
    /// To open an existing repository.
    Unlock,
    /// For a new key object (`init`, `key add`, `key passwd`).
    NewKey,
}

/// Where passwords come from: called with what the password is for and the repository's
/// name (for a prompt). Returns [`Error::Usage`] when none can be had.
pub type PasswordProvider =
    dyn Fn(PasswordUse, &str) -> Result<Zeroizing<String>> + Send + Sync + 'static;

static PROVIDER: RwLock<Option<Arc<PasswordProvider>>> = RwLock::new(None);

/// Sets where this process's passwords come from (the CLI: its password options).
pub fn set_password_provider(provider: Arc<PasswordProvider>) {
    let mut slot = PROVIDER.write().unwrap_or_else(|p| p.into_inner());
    *slot = Some(provider);
}

/// A password for `purpose` from the registered provider, else from `STACKVAULT_PASSWORD`.
pub fn password(purpose: PasswordUse, repository: &str) -> Result<Zeroizing<String>> {
    let provider = PROVIDER.read().unwrap_or_else(|p| p.into_inner()).clone();
    match provider {
        Some(p) => p(purpose, repository),
        None => std::env::var(PASSWORD_ENV)
            .map(Zeroizing::new)
            .map_err(|_| {
                Error::Usage(format!(
                    "{repository} is encrypted and no password was given: set {PASSWORD_ENV}"
                ))
            }),
    }
}

/// An unlocked repository's keys: the protection to use, and which key object opened it.
#[derive(Debug)]
pub struct Unlocked {
    pub protection: Protection,
    /// The key object the password opened (its id, and the public inputs of its derivation
    /// for the next open: [`KeyHint`]); `None` for a plain repository.
    pub hint: Option<KeyHint>,
}

/// What a host remembers of the key object that last opened a remote repository: its id and
/// the public inputs of its key derivation (Argon2id parameters and salt, which the key object
/// stores in the clear). With them the next open derives the wrapping key while it reads the
/// config and the key objects, instead of after them: the derivation (about 0.1 s) then hides
/// those round trips. Holds no secret. It is used only for the key object it names, and only
/// when that object's parameters and salt are the ones it holds: a stale or edited hint costs a
/// derivation, never a wrong key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyHint {
    /// The key object's id (hex).
    pub key: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    /// The key object's salt (hex).
    pub salt: String,
}

impl KeyHint {
    pub(crate) fn of(key: &KeyObject) -> KeyHint {
        KeyHint {
            key: key.id_hex(),
            m_kib: key.kdf.m_kib,
            t: key.kdf.t,
            p: key.kdf.p,
            salt: crate::format::hex(&key.salt),
        }
    }

    fn kdf(&self) -> KdfParams {
        KdfParams {
            m_kib: self.m_kib,
            t: self.t,
            p: self.p,
        }
    }

    /// Whether `key` derives its wrapping key from exactly these inputs.
    fn matches(&self, key: &KeyObject) -> bool {
        KeyHint::of(key) == *self
    }
}

/// A wrapping key derived from a [`KeyHint`] before the key objects were read, with the
/// password it was derived from (asked for once, used for every key object).
pub struct EarlyDerivation {
    hint: KeyHint,
    password: Zeroizing<String>,
    wrapping: Option<Zeroizing<[u8; KEY_LEN]>>,
}

/// Asks for the password of repository `location` and derives the wrapping key `hint`
/// describes (see [`KeyHint`]). A hint that cannot be used (a bad salt, parameters costlier
/// than the defaults keys are made with: a file in the cache must not make every open run
/// minutes of Argon2 or exhaust memory) derives nothing, and the key objects are tried as
/// without one.
pub fn derive_early(hint: KeyHint, location: &str) -> Result<EarlyDerivation> {
    let password = password(PasswordUse::Unlock, location)?;
    let (kdf, most) = (hint.kdf(), KdfParams::DEFAULT);
    let affordable = kdf.m_kib <= most.m_kib && kdf.t <= most.t && kdf.p <= most.p;
    let salt = crate::format::unhex(&hint.salt).and_then(|s| <[u8; SALT_LEN]>::try_from(s).ok());
    let wrapping = salt
        .filter(|_| affordable)
        .and_then(|salt| kdf.derive(password.as_bytes(), &salt).ok());
    Ok(EarlyDerivation {
        hint,
        password,
        wrapping,
    })
}

/// Every key object of the repository on `backend`, decoded, oldest first.
pub fn list_keys(backend: &dyn Backend, location: &str) -> Result<Vec<KeyObject>> {
    let (keys, mut damaged) = read_keys(backend, location)?;
    match damaged.is_empty() {
        true => Ok(keys),
        false => Err(damaged.swap_remove(0)),
    }
}

/// The key objects that decode, oldest first, and the damage of those that do not.
fn read_keys(backend: &dyn Backend, location: &str) -> Result<(Vec<KeyObject>, Vec<Error>)> {
    let (mut keys, mut damaged) = (Vec::new(), Vec::new());
    for name in backend.list(KEYS_PREFIX)? {
        let bytes = backend.get(&name)?;
        match KeyObject::decode(&bytes, &format!("{location}/{name}")) {
            Ok(key) => keys.push(key),
            Err(e) if e.is_corruption() => damaged.push(e),
            Err(e) => return Err(e),
        }
    }
    keys.sort_by_key(|k| (k.created_unix, k.id));
    Ok((keys, damaged))
}

/// The secrets `password` unwraps from one of `keys` of repository `repository`, with that
/// key's id; key objects found damaged (or belonging to another repository) on the way are
/// added to `damaged`.
fn try_keys(
    keys: &[KeyObject],
    password: &[u8],
    early: Option<&EarlyDerivation>,
    location: &str,
    repository: &[u8; REPOSITORY_ID_LEN],
    damaged: &mut Vec<Error>,
) -> Result<Option<(RepoSecrets, KeyHint)>> {
    for key in keys {
        let name = format!("{location}/{}", key.object_key());
        let derived = early.and_then(|e| match &e.wrapping {
            Some(w) if e.hint.matches(key) => Some(w),
            _ => None,
        });
        let opened = match derived {
            Some(wrapping) => key.unwrap_with(wrapping, &name),
            None => key.unwrap(password, &name),
        };
        match opened {
            Ok(Some(_)) if key.repository.is_some_and(|r| r != *repository) => {
                damaged.push(Error::corrupt(
                    &name,
                    REPOSITORY_ID_OFFSET,
                    format!(
                        "key {} opens with this password but belongs to repository {}, not to \
                         this one ({}): it was copied from another repository and cannot open \
                         this one's data; remove it with `stackvault key remove {}`",
                        key.id_hex(),
                        crate::format::hex(&key.repository.unwrap_or_default()),
                        crate::format::hex(repository),
                        key.id_hex()
                    ),
                ));
            }
            Ok(Some(secrets)) => return Ok(Some((secrets, KeyHint::of(key)))),
            Ok(None) => {}
            Err(e) if e.is_corruption() => damaged.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Unlocks the encrypted repository on `backend` named `location` whose config id is
/// `repository`: asks for the password and tries it on every key object. No key object, or
/// none that opens, fails before any other work. A damaged key object does not stop another
/// from opening the repository (it is said once on stderr); when none opens and some are
/// damaged, the damage is the error, since the password may be the damaged key's.
pub fn unlock(
    backend: &dyn Backend,
    location: &str,
    repository: &[u8; REPOSITORY_ID_LEN],
) -> Result<Unlocked> {
    unlock_fetched(fetch_keys(backend, location), None, location, repository)
}

/// The key objects of the repository on `backend`, read (listed, then each one fetched) before
/// anyone knows whether they are needed: an open reads them on their own thread while it reads
/// the config, so that the key derivation can start as soon as the config says the repository
/// is encrypted, instead of after every listing of the open (`format-spec/remote.md`, "Requests
/// of a backup"). Reading them asks for no password.
pub struct FetchedKeys(Result<(Vec<KeyObject>, Vec<Error>)>);

/// Reads the key objects of the repository on `backend` named `location` (see [`FetchedKeys`]).
pub fn fetch_keys(backend: &dyn Backend, location: &str) -> FetchedKeys {
    FetchedKeys(read_keys(backend, location))
}

/// [`unlock`] with the key objects already read by [`fetch_keys`] (a failed read is reported
/// here, as [`unlock`] would have reported it), and with the password and a wrapping key
/// derived meanwhile when `early` is given ([`derive_early`]: its failure to get a password
/// is reported where [`unlock`] would have asked for one).
pub fn unlock_fetched(
    fetched: FetchedKeys,
    early: Option<Result<EarlyDerivation>>,
    location: &str,
    repository: &[u8; REPOSITORY_ID_LEN],
) -> Result<Unlocked> {
    let (keys, mut damaged) = fetched.0?;
    if keys.is_empty() && damaged.is_empty() {
        return Err(Error::corrupt(
            format!("{location}/{KEYS_PREFIX}"),
            0,
            "the repository is encrypted but holds no key object: without one it cannot be \
             opened (restore keys/ from a copy of the repository)",
        ));
    }
    let early = early.transpose()?;
    let password = match &early {
        Some(e) => e.password.clone(),
        None => password(PasswordUse::Unlock, location)?,
    };
    let opened = try_keys(
        &keys,
        password.as_bytes(),
        early.as_ref(),
        location,
        repository,
        &mut damaged,
    )?;
    match opened {
        Some((secrets, hint)) => {
            for e in &damaged {
                crate::progress::notice(&format!(
                    "{e}; another key opened the repository: add a replacement for the \
                     password it held with `stackvault key add`"
                ));
            }
            Ok(Unlocked {
                protection: Protection::Encrypted(Box::new(RepoKeys::from_secrets(&secrets))),
                hint: Some(hint),
            })
        }
        None if !damaged.is_empty() => Err(damaged.swap_remove(0)),
        None => Err(Error::WrongPassword {
            repository: location.to_string(),
            keys: keys.len(),
        }),
    }
}

/// Writes a new key object wrapping `secrets` of repository `repository` under `password`
/// into `backend`; returns it.
pub fn add_key(
    backend: &dyn Backend,
    secrets: &RepoSecrets,
    repository: [u8; REPOSITORY_ID_LEN],
    password: &[u8],
    label: &str,
) -> Result<KeyObject> {
    if password.is_empty() {
        return Err(Error::Usage(
            "an empty password protects nothing: give a non-empty one".into(),
        ));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let key = KeyObject::wrap(
        secrets,
        repository,
        password,
        KdfParams::for_new_keys(),
        now,
        &crate::host::hostname(),
        label,
    )?;
    backend.put(&key.object_key(), &key.encode())?;
    Ok(key)
}

/// The secrets of the repository on `backend` (config id `repository`), unwrapped again with
/// the password this process unlocked it with (key management and `init --like` need the
/// secrets themselves, which `Repo` does not keep).
pub fn secrets(
    backend: &dyn Backend,
    location: &str,
    repository: &[u8; REPOSITORY_ID_LEN],
) -> Result<(RepoSecrets, String)> {
    // A damaged key object must not keep `key add` from making a replacement.
    let (keys, mut damaged) = read_keys(backend, location)?;
    let password = password(PasswordUse::Unlock, location)?;
    match try_keys(
        &keys,
        password.as_bytes(),
        None,
        location,
        repository,
        &mut damaged,
    )? {
        Some((secrets, hint)) => Ok((secrets, hint.key)),
        None if !damaged.is_empty() => Err(damaged.swap_remove(0)),
        None => Err(Error::WrongPassword {
            repository: location.to_string(),
            keys: keys.len(),
        }),
    }
}

/// Removes key object `id` (hex, as `key list` shows it) unless it is the last one. The
/// caller holds the maintenance lock.
pub fn remove_key(backend: &dyn Backend, location: &str, id: &str) -> Result<KeyObject> {
    let keys = list_keys(backend, location)?;
    let Some(key) = keys.iter().find(|k| k.id_hex() == id.to_ascii_lowercase()) else {
        return Err(Error::Usage(format!(
            "{location} has no key {id:?}: give the full id as `stackvault key list` shows it"
        )));
    };
    if keys.len() < 2 {
        return Err(Error::Usage(format!(
            "key {id} is the last key of {location}: removing it would lock everyone out of \
             the repository for good; add another with `stackvault key add` first"
        )));
    }
    backend.remove(&key.object_key())?;
    Ok(key.clone())
}
