//! Key management of an open repository (`key list|add|remove|passwd`): the key objects that
//! wrap its secrets under users' passwords (see [`crate::crypto::keyfile`]).
//!
//! Invariants: no data object is ever rewritten (a key wraps the secrets, which never
//! change; a new key has the version of the others, see [`crate::crypto::keyfile`]); a new
//! key is durable before an old one is removed; the last key is never
//! removed. Adding takes a writer lock; removing and changing a password take the maintenance
//! lock, so two hosts cannot each remove one of the last two keys.

use crate::crypto::keyfile::KeyObject;
use crate::crypto::unlock::{self, PasswordUse};
use crate::error::{Error, Result};

use super::Repo;

impl Repo {
    /// The key objects, oldest first; an error for a plain repository.
    pub fn keys(&self) -> Result<Vec<KeyObject>> {
        self.require_encrypted("list keys")?;
        unlock::list_keys(self.backend(), &self.location())
    }

    /// Id of the key object that unlocked this repository (`None` when plain).
    pub fn key_in_use(&self) -> Option<&str> {
        self.key_in_use.as_deref()
    }

    /// The secrets of this (encrypted) repository, unwrapped again with the password that
    /// opened it: for `init --like`, which shares the naming secret.
    pub(crate) fn secrets(&self) -> Result<crate::crypto::RepoSecrets> {
        self.require_encrypted("share its naming keys")?;
        let id = self.config().repository_id;
        Ok(unlock::secrets(self.backend(), &self.location(), &id)?.0)
    }

    fn require_encrypted(&self, what: &str) -> Result<()> {
        if self.config().is_encrypted() {
            return Ok(());
        }
        Err(Error::Usage(format!(
            "cannot {what}: {} is not encrypted and has no keys; `stackvault init` an \
             encrypted repository and `stackvault copy` the snapshots into it",
            self.location()
        )))
    }

    /// Adds a key object under the password for a new key, labelled `label`.
    pub fn add_key(&self, label: &str) -> Result<KeyObject> {
        self.require_encrypted("add a key")?;
        let _lock = self.lock("key add")?;
        let location = self.location();
        let id = self.config().repository_id;
        let (secrets, _) = unlock::secrets(self.backend(), &location, &id)?;
        let password = unlock::password(PasswordUse::NewKey, &location)?;
        unlock::add_key(self.backend(), &secrets, id, password.as_bytes(), label)
    }

    /// Removes the key object `id` (as [`Repo::keys`] shows it), unless it is the last one.
    pub fn remove_key(&self, id: &str) -> Result<KeyObject> {
        self.require_encrypted("remove a key")?;
        let _lock = self.lock_maintenance("key remove")?;
        unlock::remove_key(self.backend(), &self.location(), id)
    }

    /// Replaces the key in use by one under the password for a new key (same label, new id):
    /// the new key is written first, then the old one removed. Returns (old, new).
    pub fn change_password(&self) -> Result<(KeyObject, KeyObject)> {
        self.require_encrypted("change a password")?;
        let _lock = self.lock_maintenance("key passwd")?;
        let location = self.location();
        let id = self.config().repository_id;
        let (secrets, old_id) = unlock::secrets(self.backend(), &location, &id)?;
        let old = unlock::list_keys(self.backend(), &location)?
            .into_iter()
            .find(|k| k.id_hex() == old_id)
            .ok_or_else(|| Error::Internal(format!("key {old_id} vanished while in use")))?;
        let password = unlock::password(PasswordUse::NewKey, &location)?;
        let new = unlock::add_key(
            self.backend(),
            &secrets,
            id,
            password.as_bytes(),
            &old.label,
        )?;
        self.backend().remove(&old.object_key())?;
        Ok((old, new))
    }
}
