//! Verification records: the evidence that a snapshot was read back whole, and how long it
//! took.
//!
//! Each verification run leaves one small immutable UTF-8 JSON object at
//! `verifications/<snapshot-id>/<time>-<random>.json`. The index caches them, but they are
//! the authority: `index rebuild` reads them back. Readers ignore fields they do not know.
//!
//! In an encrypted repository the stored object is the JSON sealed under
//! `ObjectAd {Verification, name: <the object's key>, part: 0}` ([`VerificationRecord::seal`],
//! [`VerificationRecord::open`]): a record moved under another key fails authentication.

use serde::{Deserialize, Serialize};

use crate::crypto::{ObjectAd, ObjectKind, Protection};
use crate::error::{Error, Result};
use crate::format::SnapshotId;

crate::stored_name_enum! {
    /// What a verification run compared, as stored in its record.
    pub enum RecordMode {
        /// Every chunk read back from the packs.
        Repository => "repository",
        /// A restored disk compared with the snapshot.
        Target => "target",
    }
}

crate::stored_name_enum! {
    /// How a verification run ended, as stored in its record.
    pub enum RecordOutcome {
        Ok => "ok",
        /// The repository could not deliver the data.
        Damaged => "damaged",
        /// The target is not the snapshot's disk.
        Differs => "differs",
    }
}

/// Version of the record document this build writes.
pub const VERIFICATION_VERSION: u32 = 1;
/// Largest record accepted when reading.
pub const MAX_RECORD_LEN: usize = 64 * 1024;
/// Key prefix of verification records.
pub const VERIFICATIONS_PREFIX: &str = "verifications/";

/// One verification run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerificationRecord {
    pub version: u32,
    pub snapshot_id: SnapshotId,
    /// When the run started, RFC 3339 UTC.
    pub time: String,
    /// `repository` (every chunk read back from the packs) or `target` (a restored disk
    /// compared with the snapshot); a name this build does not know is kept as read.
    pub mode: RecordMode,
    /// The target that was compared (mode `target`).
    #[serde(default)]
    pub target: Option<String>,
    /// `ok`, `damaged` (the repository could not deliver the data) or `differs` (the target
    /// is not the snapshot's disk); a name this build does not know is kept as read.
    pub outcome: RecordOutcome,
    /// Bytes of the virtual disk checked (chunk and zero bytes).
    pub bytes_checked: u64,
    pub chunks_checked: u64,
    pub duration_ms: u64,
    /// Virtual disk bytes per second, MB/s (10^6).
    pub throughput_mb_s: f64,
    /// Number of damaged or differing ranges found.
    #[serde(default)]
    pub problems: u64,
    pub hostname: String,
    pub tool_version: String,
}

impl VerificationRecord {
    /// Key of this record in the repository; `suffix` makes it unique.
    pub fn key(&self, suffix: &str) -> String {
        let compact: String = self
            .time
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        format!(
            "{VERIFICATIONS_PREFIX}{}/{compact}-{suffix}.json",
            self.snapshot_id
        )
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode verification record: {e}")))
    }

    /// The stored form of this record under `key`: its JSON, sealed when `protection` is
    /// encrypted.
    pub fn seal(&self, protection: &Protection, key: &str) -> Result<Vec<u8>> {
        protection.seal(&ad(key), self.encode()?)
    }

    /// Authenticates (when `protection` is encrypted) and decodes the record stored under
    /// `key`; see [`VerificationRecord::decode`].
    pub fn open(protection: &Protection, stored: &[u8], key: &str) -> Result<Self> {
        // Bounded before anything else is done with it.
        if stored.len() > MAX_RECORD_LEN + protection.overhead() {
            return Err(Error::corrupt(key, 0, "verification record over 64 KiB"));
        }
        let plain = protection.open(&ad(key), stored, key, 0)?;
        Self::decode(&plain, key)
    }

    /// Decodes a record read from `location`; refuses oversized or malformed documents and
    /// records whose snapshot id does not match the key.
    pub fn decode(data: &[u8], location: &str) -> Result<Self> {
        if data.len() > MAX_RECORD_LEN {
            return Err(Error::corrupt(
                location,
                0,
                "verification record over 64 KiB",
            ));
        }
        let record: VerificationRecord = serde_json::from_slice(data)
            .map_err(|e| Error::corrupt(location, 0, format!("verification record: {e}")))?;
        if record.version == 0 || record.version > VERIFICATION_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("verification record {location}"),
                found: record.version,
                supported: VERIFICATION_VERSION,
            });
        }
        let expected_dir = format!("{VERIFICATIONS_PREFIX}{}/", record.snapshot_id);
        if !location.starts_with(&expected_dir) {
            return Err(Error::corrupt(
                location,
                0,
                format!(
                    "record names snapshot {}, not the one of its key",
                    record.snapshot_id
                ),
            ));
        }
        Ok(record)
    }
}

/// The associated data of the record stored under `key`.
fn ad(key: &str) -> ObjectAd<'_> {
    ObjectAd {
        kind: ObjectKind::Verification,
        name: key,
        part: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_key() -> Result<()> {
        let r = VerificationRecord {
            version: 1,
            snapshot_id: SnapshotId::parse(&"ab".repeat(32))?,
            time: "2026-11-25T01:02:03.000004Z".into(),
            mode: RecordMode::Repository,
            target: None,
            outcome: RecordOutcome::Ok,
            bytes_checked: 10,
            chunks_checked: 1,
            duration_ms: 5,
            throughput_mb_s: 0.002,
            problems: 0,
            hostname: "h".into(),
            tool_version: "t".into(),
        };
        let key = r.key("00ff");
        assert!(key.ends_with("/20261125T010203.000004Z-00ff.json"), "{key}");
        assert_eq!(VerificationRecord::decode(&r.encode()?, &key)?, r);
        assert!(VerificationRecord::decode(&r.encode()?, "verifications/other/x.json").is_err());
        assert!(VerificationRecord::decode(b"{", &key).is_err());
        Ok(())
    }

    /// Mode and outcome are typed; a newer writer's names are kept as read and written back
    /// unchanged, and the stored document stays byte for byte what the strings made.
    #[test]
    fn unknown_mode_and_outcome_are_kept_as_read() -> Result<()> {
        let id = "ef".repeat(32);
        let stored = format!(
            r#"{{"version":1,"snapshot_id":"{id}","time":"t","mode":"sampled","target":null,"outcome":"partial","bytes_checked":1,"chunks_checked":1,"duration_ms":1,"throughput_mb_s":0.5,"problems":0,"hostname":"h","tool_version":"t"}}"#
        );
        let key = format!("{VERIFICATIONS_PREFIX}{id}/x.json");
        let r = VerificationRecord::decode(stored.as_bytes(), &key)?;
        assert_eq!(r.mode, RecordMode::Other("sampled".into()));
        assert_eq!(r.outcome, RecordOutcome::Other("partial".into()));
        let again = serde_json::to_string(&r).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(again, stored);
        let known = stored
            .replace("sampled", "target")
            .replace("partial", "differs");
        let r = VerificationRecord::decode(known.as_bytes(), &key)?;
        assert_eq!(
            (r.mode, r.outcome),
            (RecordMode::Target, RecordOutcome::Differs)
        );
        // A record naming no snapshot id is damage, whatever its key.
        let bad_key = format!("{VERIFICATIONS_PREFIX}abc/x.json");
        let bad = stored.replace(&id, "abc");
        assert!(matches!(
            VerificationRecord::decode(bad.as_bytes(), &bad_key),
            Err(Error::Corrupt { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_sealed_record_opens_only_under_its_key_and_undamaged() -> Result<()> {
        use crate::crypto::{MasterSecret, RepoKeys};
        let p = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [3; 32],
        ))));
        let r = VerificationRecord {
            version: 1,
            snapshot_id: SnapshotId::parse(&"cd".repeat(32))?,
            time: "2026-11-25T01:02:03.000004Z".into(),
            mode: RecordMode::Repository,
            target: None,
            outcome: RecordOutcome::Ok,
            bytes_checked: 10,
            chunks_checked: 1,
            duration_ms: 5,
            throughput_mb_s: 0.002,
            problems: 0,
            hostname: "backup-host-7".into(),
            tool_version: "t".into(),
        };
        let key = r.key("00ff");
        let sealed = r.seal(&p, &key)?;
        assert!(!sealed.windows(13).any(|w| w == b"backup-host-7"));
        assert_eq!(VerificationRecord::open(&p, &sealed, &key)?, r);
        // Another record's key of the same snapshot: authentication fails.
        let other = r.key("0100");
        assert!(matches!(
            VerificationRecord::open(&p, &sealed, &other),
            Err(Error::Corrupt { .. })
        ));
        for at in [0, 30, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x10;
            assert!(matches!(
                VerificationRecord::open(&p, &bad, &key),
                Err(Error::Corrupt { .. })
            ));
        }
        // A plain record in an encrypted repository is refused too.
        assert!(VerificationRecord::open(&p, &r.encode()?, &key).is_err());
        // Plain repositories store the JSON as before.
        assert_eq!(r.seal(&Protection::Plain, &key)?, r.encode()?);
        Ok(())
    }
}
