//! The shape shared by the ids stackvault derives from content: 64 lower-case hex digits of a
//! BLAKE3-256 hash. [`hex_id_type!`](crate::hex_id_type) declares one newtype per kind of id
//! (snapshot, VM snapshot record, drill record), each validated where it enters the engine and
//! shown exactly as the hex it holds.
//!
//! Invariant of every such type: it holds exactly [`HEX_ID_LEN`] lower-case ASCII hex digits,
//! so its short form and every other view are panic-free. An id from outside (a command line,
//! JSON, an object key, blob metadata) becomes one only through `parse`, `from_key` or serde,
//! which validate; a malformed one is refused there, never sliced later.
//!
//! The kinds are distinct types although they share the shape: a VM snapshot id names a
//! `vms/` record and a snapshot id a manifest, and handing one where the other is meant would
//! load the wrong object (or none) without any error at compile time. Each type still reads as
//! `&str` (`Deref`) for keys, SQL parameters and prefix tests.

/// Hex digits in a full content id (BLAKE3-256).
pub const HEX_ID_LEN: usize = 64;

/// Whether `s` is a full id as stored: [`HEX_ID_LEN`] lower-case hex digits.
pub fn is_stored_hex_id(s: &str) -> bool {
    s.len() == HEX_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Declares a content id newtype (see the module documentation): `parse` (a usage error
/// naming `$noun` when malformed), `from_key` (the id after a key prefix, stored form only),
/// `from_computed` (a hash this build just made), `short`, `as_str`, `Display` and serde as
/// the full hex, and comparisons with `str`.
#[macro_export]
macro_rules! hex_id_type {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, noun = $noun:literal;
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Hex digits in a full id (BLAKE3-256).
            pub const HEX_LEN: usize = $crate::format::hex_id::HEX_ID_LEN;

            /// Validates a full id (upper-case digits are accepted and stored lower-case). A
            /// prefix is refused: prefixes are queries, resolved against what is stored.
            pub fn parse(s: &str) -> $crate::error::Result<Self> {
                if s.len() == Self::HEX_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    Ok($name(s.to_ascii_lowercase()))
                } else {
                    Err($crate::error::Error::Usage(format!(
                        "{} {:?}: expected {} hex digits",
                        $noun,
                        $crate::format::short_id(s),
                        Self::HEX_LEN
                    )))
                }
            }

            /// The id in object key `key` under `prefix`, if the key is one of these ids in
            /// its stored (lower-case) form; any other key is not one of these objects.
            pub fn from_key(key: &str, prefix: &str) -> Option<Self> {
                let id = key.strip_prefix(prefix)?;
                $crate::format::hex_id::is_stored_hex_id(id).then(|| $name(id.to_string()))
            }

            /// An id this build has just computed as hex; a malformed one is a bug here.
            pub fn from_computed(hex: String) -> $crate::error::Result<Self> {
                if $crate::format::hex_id::is_stored_hex_id(&hex) {
                    Ok($name(hex))
                } else {
                    Err($crate::error::Error::Internal(format!(
                        "computed {} {:?} is not {} lower-case hex digits",
                        $noun,
                        $crate::format::short_id(&hex),
                        Self::HEX_LEN
                    )))
                }
            }

            /// The full id in hex.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The first [`SHORT_SNAPSHOT_ID_CHARS`]($crate::format::SHORT_SNAPSHOT_ID_CHARS)
            /// digits, as people see them in lists and messages. Never panics: the id always
            /// has [`Self::HEX_LEN`] ASCII digits.
            pub fn short(&self) -> &str {
                self.0
                    .get(..$crate::format::SHORT_SNAPSHOT_ID_CHARS)
                    .unwrap_or(&self.0)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::error::Error;
            fn from_str(s: &str) -> $crate::error::Result<Self> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::error::Error;
            fn try_from(s: String) -> $crate::error::Result<Self> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        // Read as its hex wherever a `&str` is expected (keys, SQL parameters, prefix
        // tests); the validation happened when it was made, and `&str` cannot mutate it.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Same hash and order as the `String` inside, so maps keyed by id can be looked up by
        // `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::format::{DrillId, SnapshotId, VmSnapshotId};

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn every_kind_validates_at_the_boundary() -> crate::error::Result<()> {
        let vm = VmSnapshotId::parse(&ID.to_ascii_uppercase())?;
        assert_eq!(vm.as_str(), ID);
        assert_eq!(vm.short(), "0123456789ab");
        assert_eq!(format!("{vm:?}"), "VmSnapshotId(0123456789ab)");
        let drill = DrillId::from_key(&format!("drills/{ID}"), "drills/");
        assert_eq!(drill.as_ref().map(|d| d.as_str()), Some(ID));
        // Stored keys are lower-case only; anything else under the prefix is not a record.
        for bad in [
            format!("drills/{}", ID.to_ascii_uppercase()),
            "drills/abc".to_string(),
            format!("drills/{}\u{e9}", &ID[..62]),
            format!("vms/{ID}"),
        ] {
            assert_eq!(DrillId::from_key(&bad, "drills/"), None, "{bad:?}");
        }
        for bad in ["", "abc", &ID[..63], "\u{e9}".repeat(32).as_str()] {
            assert!(matches!(VmSnapshotId::parse(bad), Err(Error::Usage(_))));
            assert!(matches!(DrillId::parse(bad), Err(Error::Usage(_))));
        }
        assert!(matches!(
            SnapshotId::from_computed("xyz".into()),
            Err(Error::Internal(_))
        ));
        assert!(is_stored_hex_id(ID) && !is_stored_hex_id(&ID.to_ascii_uppercase()));
        let json = serde_json::to_string(&vm).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(json, format!("\"{ID}\""));
        assert!(serde_json::from_str::<DrillId>("\"0123\"").is_err());
        Ok(())
    }
}
