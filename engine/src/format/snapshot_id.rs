//! The snapshot id: the BLAKE3-256 of a stored manifest's bytes, written as 64 lower-case hex
//! digits (`format-spec/README.md`, "Manifests").
//!
//! Invariant: a [`SnapshotId`] always holds exactly [`SnapshotId::HEX_LEN`] lower-case hex
//! digits, so [`SnapshotId::short`] and every other view of it are plain, panic-free slices.
//! Ids from outside (the command line, JSON, the index, a standby record) become one only
//! through [`SnapshotId::parse`] or serde, which validate; prefixes and `latest` are queries,
//! not ids, and are resolved by `Repo::resolve_snapshot`.
//!
//! The VM snapshot and drill record ids share the shape and live here too, as distinct types
//! ([`super::hex_id`] says why).

use super::hex;

crate::hex_id_type! {
    /// A full snapshot id: 64 lower-case hex digits. `Display` and serde give the full hex.
    pub struct SnapshotId, noun = "snapshot id";
}

impl SnapshotId {
    /// The id of the manifest whose BLAKE3 hash is `digest`.
    pub fn from_digest(digest: &blake3::Hash) -> Self {
        SnapshotId(hex(digest.as_bytes()))
    }
}

crate::hex_id_type! {
    /// A VM snapshot record's id (`vms/<id>`, `format-spec/vm.md`): the hex (keyed) BLAKE3 of
    /// the record's JSON. Distinct from [`SnapshotId`], which names one disk's manifest.
    pub struct VmSnapshotId, noun = "VM snapshot id";
}

crate::hex_id_type! {
    /// A drill record's id (`drills/<id>`, `format-spec/vm.md`, "Drill records"): the hex
    /// (keyed) BLAKE3 of the record's JSON.
    pub struct DrillId, noun = "drill id";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Result};

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
