//! The snapshot id: the BLAKE3-256 of a stored manifest's bytes, written as 64 lower-case hex
//! digits (`format-spec/README.md`, "Manifests").
//!
//! Invariant: a [`SnapshotId`] always holds exactly [`SnapshotId::HEX_LEN`] lower-case hex
//! digits, so [`SnapshotId::short`] and every other view of it are plain, panic-free slices.
//! Ids from outside (the command line, JSON, the index, a standby record) become one only
//! through [`SnapshotId::parse`] or serde, which validate; prefixes and `latest` are queries,
//! not ids, and are resolved by `Repo::resolve_snapshot`.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

use super::SHORT_SNAPSHOT_ID_CHARS;

/// A full snapshot id: 64 lower-case hex digits. `Display` and serde give the full hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    /// Hex digits in a full id (BLAKE3-256).
    pub const HEX_LEN: usize = 64;

    /// The id of the manifest whose BLAKE3 hash is `digest`.
    pub fn from_digest(digest: &blake3::Hash) -> Self {
        SnapshotId(super::hex(digest.as_bytes()))
    }

    /// Validates a full id (upper-case digits are accepted and stored lower-case). A prefix
    /// is refused: resolve it with `Repo::resolve_snapshot` instead.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() == Self::HEX_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(SnapshotId(s.to_ascii_lowercase()))
        } else {
            Err(Error::Usage(format!(
                "snapshot id {:?}: expected {} hex digits",
                super::short_id(s),
                Self::HEX_LEN
            )))
        }
    }

    /// The full id in hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first [`SHORT_SNAPSHOT_ID_CHARS`] digits, as people see them in lists and
    /// messages. Never panics: the id always has [`Self::HEX_LEN`] ASCII digits.
    pub fn short(&self) -> &str {
        self.0.get(..SHORT_SNAPSHOT_ID_CHARS).unwrap_or(&self.0)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

impl FromStr for SnapshotId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> String {
        id.0
    }
}

// An id is read as its hex wherever a `&str` is expected (keys, SQL parameters, prefix
// tests); the validation happened when it was made, and nothing can mutate it through `&str`.
impl std::ops::Deref for SnapshotId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SnapshotId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// Same hash and order as the `String` inside, so maps keyed by id can be looked up by `&str`.
impl Borrow<str> for SnapshotId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SnapshotId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SnapshotId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for SnapshotId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<SnapshotId> for String {
    fn eq(&self, other: &SnapshotId) -> bool {
        *self == other.0
    }
}

impl PartialEq<SnapshotId> for &str {
    fn eq(&self, other: &SnapshotId) -> bool {
        *self == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parse_validates_and_short_is_a_prefix() -> Result<()> {
        let id = SnapshotId::parse(&ID.to_ascii_uppercase())?;
        assert_eq!(id.as_str(), ID);
        assert_eq!(id.to_string(), ID);
        assert_eq!(id.short(), "0123456789ab");
        for bad in [
            "",
            "abc",
            &ID[..63],
            "z".repeat(64).as_str(),
            "\u{e9}".repeat(32).as_str(),
        ] {
            assert!(
                matches!(SnapshotId::parse(bad), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn serde_is_the_hex_string_and_validates() -> Result<()> {
        let id = SnapshotId::parse(ID)?;
        let json = serde_json::to_string(&id).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(json, format!("\"{ID}\""));
        let back: SnapshotId =
            serde_json::from_str(&json).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SnapshotId>("\"0123\"").is_err());
        Ok(())
    }
}
