//! The VM snapshot record: one immutable object `vms/<id>` that binds the disk snapshots of
//! one VM backup into a unit (`format-spec/vm.md` is its specification).
//!
//! The object is UTF-8 JSON; its name `<id>` is the hex BLAKE3 hash of its bytes, so the name
//! is the checksum: a record whose bytes do not hash to its name is damage, reported as
//! [`Error::Corrupt`]. A record is written only after every disk manifest it names is
//! durable, so a record never names a snapshot that was not stored. This module does no I/O.
//!
//! In an encrypted repository the name is the BLAKE3 of the JSON keyed with the object-id
//! subkey ([`Protection::object_id_hasher`], so no fingerprint of the record), and the stored
//! object is the JSON sealed under `ObjectAd {VmSnapshot, name: <id>, part: 0}`: bytes stored
//! under another record's name fail authentication before they are parsed.

use serde::{Deserialize, Serialize};

use crate::crypto::{ObjectKind, Protection};
use crate::error::{Error, Result};
use crate::format::{SnapshotId, VmSnapshotId};

/// Folder of VM snapshot records in the repository.
pub const VMS_PREFIX: &str = "vms/";
/// Version of the record encoding this build writes and reads.
pub const VM_RECORD_VERSION: u32 = 1;

/// What consistency across disks a VM snapshot can honestly claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Every disk was read from a blob snapshot, and the snapshots were taken together (one
    /// point in time for all disks, as a crash would leave them).
    CrashConsistent,
    /// Each disk is consistent on its own only: the disks were read over a window of time
    /// (`read_window_ms`) while the VM may have been writing.
    PerDisk,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::PerDisk => "per-disk",
        }
    }
}

/// One disk of a VM snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// The disk's name within the VM (`os`, `data1`).
    pub name: String,
    /// The repository disk its snapshots belong to (`<vm>:<name>`).
    pub disk: String,
    pub snapshot_id: SnapshotId,
    /// Root digest of the disk snapshot's manifest.
    pub root_digest: String,
    pub virtual_size: u64,
    /// Path or redacted URL of the source.
    pub source: String,
    /// The blob snapshot read, for a page blob source read from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_snapshot: Option<String>,
    /// When reading this disk started and ended (RFC 3339 UTC, six fractional digits).
    pub read_started: String,
    pub read_finished: String,
}

/// A VM snapshot record, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub format_version: u32,
    pub vm: String,
    /// When the VM backup started (RFC 3339 UTC); retention orders VM snapshots by it.
    pub time: String,
    /// When the last disk manifest was stored.
    pub finished: String,
    pub hostname: String,
    pub consistency: Consistency,
    /// From the first disk's read start to the last disk's read end, in milliseconds: how far
    /// apart in time the disks' contents may be when the consistency is per disk.
    pub read_window_ms: u64,
    /// The disks, in name order.
    pub disks: Vec<VmDisk>,
    pub tool_version: String,
}

/// Encodes a record for a repository with `protection`; returns its stored bytes (the JSON,
/// sealed when encrypted) and its id (the hex BLAKE3 of the JSON, keyed when encrypted).
pub fn encode(record: &VmRecord, protection: &Protection) -> Result<(Vec<u8>, VmSnapshotId)> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| Error::Internal(format!("encode VM snapshot record: {e}")))?;
    let (stored, id) = protection.seal_named(ObjectKind::VmSnapshot, bytes)?;
    Ok((stored, VmSnapshotId::from_computed(id)?))
}

/// Object key of record `id`.
pub fn key(id: &str) -> String {
    format!("{VMS_PREFIX}{id}")
}

/// The id in a key under [`VMS_PREFIX`], if the key is a record's.
pub fn id_of_key(key: &str) -> Option<VmSnapshotId> {
    VmSnapshotId::from_key(key, VMS_PREFIX)
}

/// Decodes record `id` from its stored bytes in a repository with `protection`: authenticates
/// them first when encrypted, then checks that the JSON hashes to the id.
pub fn decode(id: &VmSnapshotId, stored: &[u8], protection: &Protection) -> Result<VmRecord> {
    let location = key(id);
    let bytes = protection.open_named(
        ObjectKind::VmSnapshot,
        id,
        stored,
        &location,
        "VM snapshot record",
    )?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(&location, 0, format!("VM snapshot record: {e}")))?;
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(VM_RECORD_VERSION)) {
        return Err(Error::Unsupported {
            what: format!(
                "VM snapshot record {location} has format version {}; this build reads \
                 version {VM_RECORD_VERSION}: use a newer stackvault",
                version.map_or_else(|| "(none)".to_string(), |v| v.to_string())
            ),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| Error::corrupt(&location, 0, format!("VM snapshot record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of `format-spec/vm.md`, kept in `format-spec/vectors/`.
    const VECTOR: &str = include_str!("../../../format-spec/vectors/vm-record-v1.json");

    fn vector_record() -> VmRecord {
        VmRecord {
            format_version: 1,
            vm: "erp-db01".into(),
            time: "2026-01-02T03:04:05.000006Z".into(),
            finished: "2026-01-02T03:09:00.500000Z".into(),
            hostname: "backup01".into(),
            consistency: Consistency::PerDisk,
            read_window_ms: 294_500,
            disks: vec![VmDisk {
                name: "os".into(),
                disk: "erp-db01:os".into(),
                snapshot_id: SnapshotId::parse(&"a".repeat(64)).expect("a valid id"),
                root_digest: "b".repeat(64),
                virtual_size: 1_073_741_824,
                source: "/exports/erp-db01-os.vhd".into(),
                blob_snapshot: None,
                read_started: "2026-01-02T03:04:06.000000Z".into(),
                read_finished: "2026-01-02T03:09:00.500000Z".into(),
            }],
            tool_version: "0.1.0".into(),
        }
    }

    #[test]
    fn test_vector_encodes_and_decodes() {
        let vector: serde_json::Value = serde_json::from_str(VECTOR).expect("vector is JSON");
        let bytes = vector["bytes"].as_str().expect("bytes").as_bytes();
        let id = VmSnapshotId::parse(vector["id"].as_str().expect("id")).expect("a valid id");
        let (encoded, encoded_id) = encode(&vector_record(), &Protection::Plain).expect("encode");
        assert_eq!(
            String::from_utf8_lossy(&encoded),
            String::from_utf8_lossy(bytes),
            "format-spec/vectors/vm-record-v1.json is stale or the encoding changed"
        );
        assert_eq!(encoded_id, id);
        assert_eq!(
            decode(&id, bytes, &Protection::Plain).expect("decode"),
            vector_record()
        );
        assert_eq!(id_of_key(&key(&id)), Some(id));
    }

    #[test]
    fn damage_and_new_versions_are_refused() {
        let plain = &Protection::Plain;
        let (bytes, id) = encode(&vector_record(), plain).expect("encode");
        let mut flipped = bytes.clone();
        flipped[10] ^= 1;
        assert!(decode(&id, &flipped, plain).is_err_and(|e| e.is_corruption()));
        let newer = String::from_utf8(bytes)
            .expect("utf-8")
            .replace("\"format_version\":1", "\"format_version\":2");
        let newer_id =
            VmSnapshotId::from_computed(blake3::hash(newer.as_bytes()).to_hex().to_string())
                .expect("a hash");
        assert!(matches!(
            decode(&newer_id, newer.as_bytes(), plain),
            Err(Error::Unsupported { .. })
        ));
        assert_eq!(id_of_key("vms/abc"), None);
    }

    #[test]
    fn a_sealed_record_is_keyed_authenticated_and_bound_to_its_name() {
        use crate::crypto::{MasterSecret, RepoKeys};
        let keys = |b| {
            Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
                [b; 32],
            ))))
        };
        let p = keys(5);
        let (stored, id) = encode(&vector_record(), &p).expect("encode");
        let (plain_bytes, plain_id) = encode(&vector_record(), &Protection::Plain).expect("plain");
        // The id is no fingerprint: not the plain hash, and another repository's differs.
        assert_ne!(id, plain_id);
        assert_ne!(id, encode(&vector_record(), &keys(6)).expect("other").1);
        assert_eq!(id_of_key(&key(&id)), Some(id.clone()));
        // Nothing of the JSON is readable.
        assert!(!stored.windows(8).any(|w| w == b"erp-db01"));
        assert!(!stored
            .windows(plain_bytes.len().min(16))
            .any(|w| w == &plain_bytes[..16]));
        assert_eq!(decode(&id, &stored, &p).expect("decode"), vector_record());
        for at in [0, 24, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 0x80;
            let err = decode(&id, &bad, &p).err();
            assert!(
                matches!(&err, Some(Error::Corrupt { location, .. }) if location.contains(id.as_str())),
                "{err:?}"
            );
        }
        // Another record's bytes under this name (a swap) fail authentication.
        let mut other = vector_record();
        other.vm = "erp-db02".into();
        let (other_stored, other_id) = encode(&other, &p).expect("encode other");
        assert_ne!(other_id, id);
        assert!(decode(&id, &other_stored, &p).is_err_and(|e| e.is_corruption()));
        // The plain record is refused in an encrypted repository.
        assert!(decode(&plain_id, &plain_bytes, &p).is_err_and(|e| e.is_corruption()));
    }
}
