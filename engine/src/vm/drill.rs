//! Recovery drills: restore every disk of a VM snapshot to scratch, verify each restored disk
//! against its snapshot, and keep the measured time as an immutable **drill record**
//! (`drills/<id>`, specified in `format-spec/vm.md`, "Drill records").
//!
//! The time to recover is measured, never typed in: from the moment the drill starts resolving
//! the VM snapshot to the moment the last disk is restored and verified (disks restore in
//! parallel, as `restore-vm` does, and then verify in parallel). `plan status` computes the
//! MTTR as the mean of the recorded times of the drills that passed.
//!
//! The record is encoded like the VM snapshot record: UTF-8 JSON whose name is the hex BLAKE3
//! of its bytes, so the name is the checksum; it is written with one `put` after every disk
//! was tried, so a kill mid-drill leaves no record. A drill that fails (a restore error, a
//! verified disk that differs) is recorded too, with its outcome and the error, so a failing
//! recovery cannot go unnoticed. Scratch files are removed after a directory drill unless the
//! caller keeps them; page blobs written by a container drill are left for the operator
//! (named in the report).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::plan::{blob_access, Plan};
use super::{restore_path, VmSnapshot};
use crate::crypto::{ObjectKind, Protection};
use crate::error::{Error, Result};
use crate::format::{DrillId, SnapshotId, VmSnapshotId};
use crate::host::{hostname, now_rfc3339};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{restore_to_file, OutputFormat, RestoreOptions};
use crate::verify::{verify_target, VerifyOptions};

/// Folder of drill records in the repository.
pub const DRILLS_PREFIX: &str = "drills/";
/// Version of the drill record encoding this build writes and reads.
pub const DRILL_RECORD_VERSION: u32 = 1;

/// How a drill (or one disk of it) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrillOutcome {
    /// Restored, and the restored disk reads back exactly as its snapshot.
    Passed,
    /// Restored, but the restored disk differs from its snapshot.
    Differs,
    /// The restore or the verification could not be completed (`error` says why).
    Failed,
}

impl DrillOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillOutcome::Passed => "passed",
            DrillOutcome::Differs => "differs",
            DrillOutcome::Failed => "failed",
        }
    }
}

/// One disk of a drill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillDisk {
    pub name: String,
    pub snapshot_id: SnapshotId,
    pub virtual_size: u64,
    /// Chunk bytes written by the restore.
    pub restored_bytes: u64,
    /// Virtual disk bytes verified.
    pub verified_bytes: u64,
    pub restore_ms: u64,
    pub verify_ms: u64,
    pub outcome: DrillOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

crate::stored_name_enum! {
    /// Where a drill restored to, as its record names it.
    pub enum DrillTargetKind {
        /// Files in a scratch directory.
        Directory => "directory",
        /// Page blobs in a scratch container.
        PageBlob => "page-blob",
    }
}

/// A drill record, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub format_version: u32,
    pub vm: String,
    pub vm_snapshot_id: VmSnapshotId,
    /// When the drill started and ended (RFC 3339 UTC, six fractional digits).
    pub started: String,
    pub finished: String,
    pub hostname: String,
    pub target_kind: DrillTargetKind,
    /// The scratch directory or container, without any SAS.
    pub target: String,
    /// Milliseconds from the start until every disk was restored and verified: the measured
    /// time to recover.
    pub recovery_ms: u64,
    pub outcome: DrillOutcome,
    /// The disks, in name order.
    pub disks: Vec<DrillDisk>,
    pub tool_version: String,
}

/// Encodes a record for a repository with `protection`; returns its stored bytes (the JSON,
/// sealed when encrypted) and its id (the hex BLAKE3 of the JSON, keyed when encrypted), as
/// for VM snapshot records.
pub fn encode(record: &DrillRecord, protection: &Protection) -> Result<(Vec<u8>, DrillId)> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| Error::Internal(format!("encode drill record: {e}")))?;
    let (stored, id) = protection.seal_named(ObjectKind::Drill, bytes)?;
    Ok((stored, DrillId::from_computed(id)?))
}

/// Object key of drill record `id`.
pub fn key(id: &str) -> String {
    format!("{DRILLS_PREFIX}{id}")
}

/// The id in a key under [`DRILLS_PREFIX`], if the key is a record's.
pub fn id_of_key(key: &str) -> Option<DrillId> {
    DrillId::from_key(key, DRILLS_PREFIX)
}

/// Decodes record `id` from its stored bytes in a repository with `protection`: authenticates
/// them first when encrypted, then checks that the JSON hashes to the id.
pub fn decode(id: &DrillId, stored: &[u8], protection: &Protection) -> Result<DrillRecord> {
    let location = key(id);
    let plain = protection.open_named(ObjectKind::Drill, id, stored, &location, "drill record")?;
    let bytes = plain.as_slice();
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(&location, 0, format!("drill record: {e}")))?;
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(DRILL_RECORD_VERSION)) {
        return Err(Error::Unsupported {
            what: format!(
                "drill record {location} has format version {}; this build reads version \
                 {DRILL_RECORD_VERSION}: use a newer stackvault",
                version.map_or_else(|| "(none)".to_string(), |v| v.to_string())
            ),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| Error::corrupt(&location, 0, format!("drill record: {e}")))
}

/// A stored drill record with its id.
#[derive(Clone, Debug, Serialize)]
pub struct StoredDrill {
    pub id: DrillId,
    #[serde(flatten)]
    pub record: DrillRecord,
}

/// The drill records of the repository (of `vm`, or all), oldest first.
pub fn drills(repo: &Repo, vm: Option<&str>) -> Result<Vec<StoredDrill>> {
    let mut out = Vec::new();
    for k in repo.backend().list(DRILLS_PREFIX)? {
        let Some(id) = id_of_key(&k) else {
            continue;
        };
        let bytes = match repo.backend().get(&k) {
            Ok(b) => b,
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let record = decode(&id, &bytes, repo.protection())?;
        if vm.is_some_and(|v| v != record.vm) {
            continue;
        }
        out.push(StoredDrill { id, record });
    }
    out.sort_by(|a, b| (&a.record.started, &a.id).cmp(&(&b.record.started, &b.id)));
    Ok(out)
}

/// Where a drill restores to.
#[derive(Clone, Debug)]
pub enum DrillTarget {
    /// A scratch directory: the drill restores into a new subdirectory of it.
    Directory(PathBuf),
    /// A page blob container URL (`azure://ACCOUNT/CONTAINER` or `https://…/CONTAINER`),
    /// with the SAS (if any) already added as the query, and the options to reach it.
    Container {
        url: String,
        blob: crate::azure::BlobOptions,
    },
}

/// Options of [`drill`].
#[derive(Clone, Debug, Default)]
pub struct DrillOptions {
    /// `--to`: a directory or a container URL (without SAS); else the plan's `[drill] to`, else
    /// the system's temporary directory.
    pub to: Option<String>,
    /// Keep the restored files of a directory drill.
    pub keep: bool,
}

/// The outcome of [`drill`] (`drill --json` serialises it).
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub drill_id: DrillId,
    #[serde(flatten)]
    pub record: DrillRecord,
    /// The restored disks left in place (page blobs, or files with `--keep`).
    pub left_in_place: Vec<String>,
}

/// Chooses the drill's target from the options and the plan.
fn target_of(plan: &Plan, options: &DrillOptions) -> Result<DrillTarget> {
    let to = options.to.clone().or_else(|| plan.drill.to.clone());
    match to {
        None => Ok(DrillTarget::Directory(std::env::temp_dir())),
        Some(t) if crate::azure::is_blob_url(&t) => {
            if t.contains('?') {
                return Err(Error::Usage(
                    "a drill container URL carries no SAS: name the variable holding it with \
                     sas_env under [drill] in the plan"
                        .into(),
                ));
            }
            let d = &plan.drill;
            let (url, blob) = blob_access(
                t.trim_end_matches('/'),
                d.endpoint.as_deref(),
                d.account_key_env.as_deref(),
                d.sas_env.as_deref(),
                d.profile,
                "[drill]",
            )?;
            Ok(DrillTarget::Container { url, blob })
        }
        Some(t) => Ok(DrillTarget::Directory(PathBuf::from(t))),
    }
}

/// Where one drill's disks go.
struct Scratch<'a> {
    target: &'a DrillTarget,
    /// The drill's own directory (restored files, or page blob journals).
    dir: &'a Path,
    /// Part of the names of restored page blobs, unique per drill.
    stamp: &'a str,
    vm: &'a str,
}

/// Restores and verifies one disk; returns its drill entry and where it went.
// Without `azure`, a container target is refused and its naming parts go unused.
#[cfg_attr(not(feature = "azure"), allow(unused_variables))]
fn drill_disk(
    repo: &Repo,
    name: &str,
    summary: &crate::index::SnapshotSummary,
    place: &Scratch<'_>,
    progress: &dyn Progress,
) -> (DrillDisk, String) {
    let (target, scratch, stamp, vm) = (place.target, place.dir, place.stamp, place.vm);
    let mut entry = DrillDisk {
        name: name.to_string(),
        snapshot_id: summary.id.clone(),
        virtual_size: summary.virtual_size,
        restored_bytes: 0,
        verified_bytes: 0,
        restore_ms: 0,
        verify_ms: 0,
        outcome: DrillOutcome::Failed,
        error: None,
    };
    let no_record = VerifyOptions { record: false };
    let started = Instant::now();
    let result = (|| -> Result<(u64, crate::verify::VerifyReport, String)> {
        match target {
            DrillTarget::Directory(_) => {
                let out = restore_path(scratch, name, OutputFormat::VhdFixed);
                let options = RestoreOptions {
                    force: false,
                    output_format: Some(OutputFormat::VhdFixed),
                    exact_size: false,
                    new_id: false,
                };
                let r = restore_to_file(repo, summary, &out, &options, progress)?;
                let restore_ms = super::millis(started);
                let shown = out.display().to_string();
                let source = crate::verify::open_target(&out)?;
                let v =
                    verify_target(repo, summary, source.as_ref(), &shown, &no_record, progress)?;
                Ok((restore_ms, v, shown)).map(|(ms, v, s)| {
                    entry.restored_bytes = r.bytes_written;
                    (ms, v, s)
                })
            }
            #[cfg(feature = "azure")]
            DrillTarget::Container { url, blob } => {
                let blob_url = super::blob_in(url, &format!("drill-{vm}-{name}-{stamp}.vhd"));
                let shown = crate::azure::redact(&blob_url);
                let options = crate::restore::pageblob::PageBlobRestoreOptions {
                    blob: blob.clone(),
                    journal_dir: Some(scratch.join("journals")),
                    ..Default::default()
                };
                let r = crate::restore::pageblob::restore_to_page_blob(
                    repo, summary, &blob_url, &options, progress,
                )?;
                let restore_ms = super::millis(started);
                let source = crate::source::PageBlobSource::open(&blob_url, blob)?;
                let v = verify_target(repo, summary, &source, &shown, &no_record, progress)?;
                entry.restored_bytes = r.restore.bytes_written;
                Ok((restore_ms, v, shown))
            }
            #[cfg(not(feature = "azure"))]
            DrillTarget::Container { .. } => Err(crate::features::Feature::Azure.missing()),
        }
    })();
    let shown = match result {
        Ok((restore_ms, v, shown)) => {
            entry.restore_ms = restore_ms;
            entry.verify_ms = super::millis(started).saturating_sub(restore_ms);
            entry.verified_bytes = v.bytes_checked;
            entry.outcome = if v.ok {
                DrillOutcome::Passed
            } else {
                DrillOutcome::Differs
            };
            shown
        }
        Err(e) => {
            entry.restore_ms = super::millis(started);
            entry.error = Some(e.to_string());
            String::new()
        }
    };
    (entry, shown)
}

/// Runs a drill of the newest complete VM snapshot of `vm` (see the module doc) and stores
/// its record. A drill that ran but did not pass is still `Ok`, with its outcome.
pub fn drill(
    repo: &Repo,
    plan: &Plan,
    vm: &str,
    options: &DrillOptions,
    progress: &dyn Progress,
) -> Result<DrillReport> {
    plan.vm(vm)?;
    let target = target_of(plan, options)?;
    let started = Instant::now();
    let started_at = now_rfc3339();
    let chosen: VmSnapshot = super::resolve_vm_snapshot(repo, vm, "latest")?;
    let mut summaries = Vec::with_capacity(chosen.record.disks.len());
    for d in &chosen.record.disks {
        let s = repo.resolve_snapshot(&d.snapshot_id, None)?;
        summaries.push((d.name.clone(), s));
    }
    let stamp: String = started_at
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    let (scratch, shown_target, kind) = match &target {
        DrillTarget::Directory(base) => {
            let dir = base.join(format!("stackvault-drill-{vm}-{stamp}"));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
            let shown = base.display().to_string();
            (dir, shown, DrillTargetKind::Directory)
        }
        DrillTarget::Container { url, .. } => {
            let dir = std::env::temp_dir().join(format!("stackvault-drill-{vm}-{stamp}"));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
            (dir, crate::azure::redact(url), DrillTargetKind::PageBlob)
        }
    };
    let quiet = super::CancelOnly(progress);
    let place = Scratch {
        target: &target,
        dir: &scratch,
        stamp: &stamp,
        vm,
    };
    let results: Vec<(DrillDisk, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = summaries
            .iter()
            .map(|(name, s)| {
                let (quiet, place) = (&quiet, &place);
                let handle = scope.spawn(move || drill_disk(repo, name, s, place, quiet));
                (name, s, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, s, h)| {
                h.join().unwrap_or_else(|_| {
                    (
                        DrillDisk {
                            name: name.clone(),
                            snapshot_id: s.id.clone(),
                            virtual_size: s.virtual_size,
                            restored_bytes: 0,
                            verified_bytes: 0,
                            restore_ms: 0,
                            verify_ms: 0,
                            outcome: DrillOutcome::Failed,
                            error: Some("the disk's drill panicked".into()),
                        },
                        String::new(),
                    )
                })
            })
            .collect()
    });
    let recovery_ms = super::millis(started);
    if progress.is_cancelled() {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(Error::Cancelled(
            "drill interrupted; no drill record was stored".into(),
        ));
    }
    let outcome = if results
        .iter()
        .all(|(d, _)| d.outcome == DrillOutcome::Passed)
    {
        DrillOutcome::Passed
    } else if results
        .iter()
        .any(|(d, _)| d.outcome == DrillOutcome::Failed)
    {
        DrillOutcome::Failed
    } else {
        DrillOutcome::Differs
    };
    let record = DrillRecord {
        format_version: DRILL_RECORD_VERSION,
        vm: vm.to_string(),
        vm_snapshot_id: chosen.id.clone(),
        started: started_at,
        finished: now_rfc3339(),
        hostname: hostname(),
        target_kind: kind,
        target: shown_target,
        recovery_ms,
        outcome,
        disks: results.iter().map(|(d, _)| d.clone()).collect(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (bytes, id) = encode(&record, repo.protection())?;
    crate::crash::point("drill-restored");
    repo.backend().put(&key(&id), &bytes)?;
    let mut left_in_place = Vec::new();
    match &target {
        DrillTarget::Directory(_) if options.keep => {
            left_in_place.extend(
                results
                    .iter()
                    .map(|(_, s)| s.clone())
                    .filter(|s| !s.is_empty()),
            );
        }
        DrillTarget::Directory(_) => {
            if let Err(e) = std::fs::remove_dir_all(&scratch) {
                crate::progress::notice(&format!(
                    "drill {}: cannot remove the scratch directory {}: {e}",
                    id.short(),
                    scratch.display()
                ));
            }
        }
        DrillTarget::Container { .. } => {
            let _ = std::fs::remove_dir_all(&scratch);
            left_in_place.extend(
                results
                    .iter()
                    .map(|(_, s)| s.clone())
                    .filter(|s| !s.is_empty()),
            );
        }
    }
    Ok(DrillReport {
        drill_id: id,
        record,
        left_in_place,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of `format-spec/vm.md` ("Drill records"), in `format-spec/vectors/`.
    const VECTOR: &str = include_str!("../../../format-spec/vectors/drill-record-v1.json");

    fn vector_record() -> DrillRecord {
        DrillRecord {
            format_version: 1,
            vm: "erp-db01".into(),
            vm_snapshot_id: VmSnapshotId::parse(&"c".repeat(64)).expect("a valid id"),
            started: "2026-01-03T04:00:00.000000Z".into(),
            finished: "2026-01-03T04:02:30.250000Z".into(),
            hostname: "drill01".into(),
            target_kind: DrillTargetKind::Directory,
            target: "/var/tmp/drills".into(),
            recovery_ms: 150_250,
            outcome: DrillOutcome::Passed,
            disks: vec![DrillDisk {
                name: "os".into(),
                snapshot_id: SnapshotId::parse(&"a".repeat(64)).expect("a valid id"),
                virtual_size: 1_073_741_824,
                restored_bytes: 536_870_912,
                verified_bytes: 1_073_741_824,
                restore_ms: 120_000,
                verify_ms: 30_000,
                outcome: DrillOutcome::Passed,
                error: None,
            }],
            tool_version: "0.1.0".into(),
        }
    }

    #[test]
    fn test_vector_encodes_and_decodes() {
        let vector: serde_json::Value = serde_json::from_str(VECTOR).expect("vector is JSON");
        let bytes = vector["bytes"].as_str().expect("bytes").as_bytes();
        let id = DrillId::parse(vector["id"].as_str().expect("id")).expect("a valid id");
        let (encoded, encoded_id) = encode(&vector_record(), &Protection::Plain).expect("encode");
        assert_eq!(
            String::from_utf8_lossy(&encoded),
            String::from_utf8_lossy(bytes),
            "format-spec/vectors/drill-record-v1.json is stale or the encoding changed"
        );
        assert_eq!(encoded_id, id);
        assert_eq!(
            decode(&id, bytes, &Protection::Plain).expect("decode"),
            vector_record()
        );
        assert_eq!(id_of_key(&key(&id)), Some(id));
    }

    #[test]
    fn sealed_records_hide_their_contents_and_open_only_under_their_own_id() {
        use crate::crypto::{MasterSecret, RepoKeys};
        let p = Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
            [5; 32],
        ))));
        let (plain, plain_id) = encode(&vector_record(), &Protection::Plain).expect("plain");
        let (sealed, id) = encode(&vector_record(), &p).expect("sealed");
        assert_ne!(id, plain_id, "an encrypted repository's ids are keyed");
        let vm = vector_record().vm;
        assert!(!sealed.windows(vm.len()).any(|w| w == vm.as_bytes()));
        assert_eq!(decode(&id, &sealed, &p).expect("open"), vector_record());
        for at in [0, 30, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 4;
            assert!(decode(&id, &bad, &p).is_err_and(|e| e.is_corruption()));
        }
        assert!(decode(&plain_id, &sealed, &p).is_err_and(|e| e.is_corruption()));
        assert!(decode(&plain_id, &plain, &p).is_err_and(|e| e.is_corruption()));
    }

    #[test]
    fn damage_and_new_versions_are_refused() {
        let (bytes, id) = encode(&vector_record(), &Protection::Plain).expect("encode");
        let mut flipped = bytes.clone();
        flipped[10] ^= 1;
        assert!(decode(&id, &flipped, &Protection::Plain).is_err_and(|e| e.is_corruption()));
        let newer = String::from_utf8(bytes)
            .expect("utf-8")
            .replace("\"format_version\":1", "\"format_version\":2");
        let newer_id = DrillId::from_computed(blake3::hash(newer.as_bytes()).to_hex().to_string())
            .expect("a hash");
        assert!(matches!(
            decode(&newer_id, newer.as_bytes(), &Protection::Plain),
            Err(Error::Unsupported { .. })
        ));
        assert_eq!(id_of_key("drills/abc"), None);
        assert_eq!(
            crate::vm::blob_in("https://a/c?sv=1", "b.vhd"),
            "https://a/c/b.vhd?sv=1"
        );
    }

    /// A record that names a malformed VM snapshot or disk snapshot id is damage when it is
    /// read, even when its bytes hash to its name: the id is never carried on to be sliced.
    #[test]
    fn a_record_naming_a_malformed_id_is_damage() {
        let (bytes, _) = encode(&vector_record(), &Protection::Plain).expect("encode");
        let json = String::from_utf8(bytes).expect("utf-8");
        for (good, bad) in [("c".repeat(64), "ccc"), ("a".repeat(64), "a\\u00e9")] {
            let damaged = json.replace(&good, bad);
            assert_ne!(damaged, json);
            let id = DrillId::from_computed(blake3::hash(damaged.as_bytes()).to_hex().to_string())
                .expect("a hash");
            let err = decode(&id, damaged.as_bytes(), &Protection::Plain).err();
            assert!(
                err.as_ref().is_some_and(|e| e.is_corruption()),
                "{bad}: {err:?}"
            );
        }
    }
}
