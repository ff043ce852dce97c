//! The standby record: which snapshot a target holds and whether it is clean, kept where it
//! cannot drift from the data (`format-spec/standby.md`): a JSON state file beside a file
//! target, a JSON record named by the device's identity for a block device, the blob's own
//! metadata for a page blob.
//!
//! Invariants: a record is written whole (temporary file, fsync, rename, fsync of the
//! directory; or one Set Blob Metadata), so a reader sees the old or the new record, never a
//! mix. Before any byte of a sync reaches the target, the record says `applying` and lists
//! every snapshot whose data may be on the target besides the held one; only after the data is
//! durable does it say `clean` again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::SnapshotId;

/// Version of the record this build writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Most snapshots an interrupted sync chain may leave partly applied before `--full` is asked.
pub const MAX_APPLYING: usize = 8;
/// Name suffix of a file target's state file.
pub const STATE_SUFFIX: &str = ".stackvault-standby";

/// Whether the target holds exactly its snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The target holds `snapshot_id` byte for byte (as far as stackvault wrote it).
    Clean,
    /// A sync started and did not finish: the target holds a mix of `snapshot_id` and the
    /// `applying` snapshots.
    Applying,
    /// `--verify` found the target differing from `snapshot_id`: changed behind our back.
    Diverged,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Clean => "clean",
            State::Applying => "applying",
            State::Diverged => "diverged",
        }
    }

    fn parse(s: &str) -> Option<State> {
        match s {
            "clean" => Some(State::Clean),
            "applying" => Some(State::Applying),
            "diverged" => Some(State::Diverged),
            _ => None,
        }
    }
}

/// One standby record (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Hex of the repository id the snapshots belong to.
    pub repository_id: String,
    pub disk: String,
    /// The snapshot the target holds (clean) or held before the sync started; `None` while a
    /// first (full) sync is applying.
    pub snapshot_id: Option<SnapshotId>,
    pub state: State,
    /// While applying: snapshots whose data may be partly on the target, oldest first.
    pub applying: Vec<SnapshotId>,
    /// When the state last changed (RFC 3339, UTC).
    pub since: String,
    /// `raw` or `vhd-fixed`.
    pub target_format: String,
    /// Virtual size of the disk on the target (of the newest snapshot applied).
    pub virtual_size: u64,
    /// Who set `applying`: a second sync on the same host refuses while that process lives.
    pub host: String,
    pub pid: u32,
    /// What the record is bound to: `inode:DEV:INO` for a file, the device's identity for a
    /// device, empty for a page blob (the record lives on the blob itself).
    pub identity: String,
    /// Devices: the device's size in bytes ([`DeviceSignature`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_size: Option<u64>,
    /// Devices, once a sync finished: `blake3:<hex>` of the device's first MiB as that sync
    /// left it ([`DeviceSignature`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Record {
    /// The record as page blob metadata (names and values of `format-spec/standby.md`).
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("stackvault_standby".into(), self.version.to_string());
        m.insert("stackvault_repository".into(), self.repository_id.clone());
        m.insert("stackvault_disk".into(), self.disk.clone());
        m.insert(
            "stackvault_snapshot".into(),
            self.snapshot_id
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        );
        m.insert("stackvault_state".into(), self.state.as_str().into());
        let applying: Vec<&str> = self.applying.iter().map(|id| id.as_str()).collect();
        m.insert("stackvault_applying".into(), applying.join(","));
        m.insert("stackvault_since".into(), self.since.clone());
        m.insert("stackvault_format".into(), self.target_format.clone());
        m.insert("stackvault_size".into(), self.virtual_size.to_string());
        m.insert("stackvault_host".into(), self.host.clone());
        m.insert("stackvault_pid".into(), self.pid.to_string());
        m
    }

    /// Reads a record from blob metadata; `Ok(None)` when the blob carries none.
    pub fn from_metadata(m: &BTreeMap<String, String>, location: &str) -> Result<Option<Record>> {
        let Some(version) = m.get("stackvault_standby") else {
            return Ok(None);
        };
        let bad = |what: &str| Error::Unsupported {
            what: format!(
                "{location}: standby metadata {what}; run `standby sync --full` to rewrite it"
            ),
        };
        let version: u32 = version
            .parse()
            .map_err(|_| bad("version is not a number"))?;
        if version != RECORD_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("standby record of {location}"),
                found: version,
                supported: RECORD_VERSION,
            });
        }
        let get = |k: &str| m.get(k).cloned().unwrap_or_default();
        let id = |s: &str| SnapshotId::parse(s).map_err(|_| bad("names no snapshot id"));
        let applying = get("stackvault_applying")
            .split(',')
            .filter(|x| !x.is_empty())
            .map(id)
            .collect::<Result<Vec<_>>>()?;
        let snapshot = get("stackvault_snapshot");
        Ok(Some(Record {
            version,
            repository_id: get("stackvault_repository"),
            disk: get("stackvault_disk"),
            snapshot_id: (!snapshot.is_empty()).then(|| id(&snapshot)).transpose()?,
            state: State::parse(&get("stackvault_state")).ok_or_else(|| bad("state unknown"))?,
            applying,
            since: get("stackvault_since"),
            target_format: get("stackvault_format"),
            virtual_size: get("stackvault_size")
                .parse()
                .map_err(|_| bad("size is not a number"))?,
            host: get("stackvault_host"),
            pid: get("stackvault_pid").parse().unwrap_or(0),
            identity: String::new(),
            device_size: None,
            signature: None,
        }))
    }

    /// Reads a JSON record file; `Ok(None)` when there is none.
    pub fn read_file(path: &Path) -> Result<Option<Record>> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read standby record", path, e)),
        };
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(&bytes).map_err(|e| Error::Unsupported {
            what: format!(
                "{}: not a standby record ({e}); remove it or run `standby sync --full`",
                path.display()
            ),
        })?;
        if v.version != RECORD_VERSION {
            return Err(Error::UnsupportedVersion {
                what: format!("standby record {}", path.display()),
                found: v.version,
                supported: RECORD_VERSION,
            });
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Unsupported {
                what: format!(
                    "{}: damaged standby record ({e}); run `standby sync --full`",
                    path.display()
                ),
            })
    }

    /// Writes the record to `path` atomically and durably.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let mut tmp_name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(format!("encode standby record: {e}")))?;
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&text)
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::sync_dir(dir)?;
        }
        Ok(())
    }
}

/// The state file of a file target: `<target>.stackvault-standby` beside it.
pub fn state_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(STATE_SUFFIX);
    target.with_file_name(name)
}

/// The record of a device in `state_dir`, named by a hash of its identity.
pub fn device_record_path(state_dir: &Path, identity: &str) -> PathBuf {
    let key = blake3::hash(identity.as_bytes()).to_hex();
    state_dir.join(format!("device-{}{STATE_SUFFIX}", &key[..32]))
}

/// Where device records go by default: `$XDG_STATE_HOME/stackvault/standby`, else
/// `$HOME/.local/state/stackvault/standby`, else `/var/lib/stackvault/standby`.
pub fn default_state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_STATE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("stackvault/standby")
}

/// `inode:DEV:INO` of a file: a state file whose identity differs describes another file
/// (the target was replaced behind our back).
pub fn file_identity(path: &Path) -> Result<String> {
    let m = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    Ok(format!("inode:{}:{}", m.dev(), m.ino()))
}

/// The identity of a block or character device, stable across reboots where the system
/// offers a stable name (`format-spec/standby.md`, "Block device"): the device-mapper UUID,
/// WWID or serial the kernel reports in sysfs (for a partition: its disk's, with the
/// partition number), a udev `/dev/disk/by-id` name, or a loop device's backing file; else
/// the device number, which a reboot may give to another device: records bound to it are
/// guarded by [`DeviceSignature`].
pub fn device_identity(path: &Path) -> Result<String> {
    let m = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let rdev = m.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    if m.file_type().is_char_device() {
        return Ok(format!("chardev:{major}:{minor}"));
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if let Some(id) = sysfs_identity(&sys, &["dm/uuid", "wwid", "device/wwid", "serial"]) {
        return Ok(id);
    }
    if let Some(id) = by_id_name(Path::new("/dev/disk/by-id"), rdev) {
        return Ok(id);
    }
    if let Some(id) = sysfs_identity(&sys, &["loop/backing_file"]) {
        return Ok(id);
    }
    Ok(format!("devno:{major}:{minor}"))
}

/// The first of `files` (sysfs attributes, relative to a block device's directory) that is
/// set, as `KIND:VALUE`; for a partition (a `partition` attribute), the attribute of its disk
/// (the parent directory) with `:partN` appended.
pub fn sysfs_identity(dir: &Path, files: &[&str]) -> Option<String> {
    let read = |p: PathBuf| {
        fs::read_to_string(p)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    fn kind(file: &str) -> &str {
        match file {
            "dm/uuid" => "dm-uuid",
            "wwid" | "device/wwid" => "wwid",
            "serial" | "device/serial" => "serial",
            "loop/backing_file" => "loop-backing-file",
            other => other,
        }
    }
    let wanted = files.iter().flat_map(|f| {
        // `wwid` and `serial` may sit on the device or on its `device/` link.
        let alt = match *f {
            "wwid" => Some("device/wwid"),
            "serial" => Some("device/serial"),
            _ => None,
        };
        std::iter::once(*f).chain(alt)
    });
    let (base, suffix) = match read(dir.join("partition")) {
        Some(n) => {
            // /sys/dev/block/M:m links into .../block/sda/sda1: the disk is the parent.
            let real = fs::canonicalize(dir).ok()?;
            (real.parent()?.to_path_buf(), format!(":part{n}"))
        }
        None => (dir.to_path_buf(), String::new()),
    };
    wanted
        .into_iter()
        .find_map(|f| read(base.join(f)).map(|v| format!("{}:{v}{suffix}", kind(f))))
}

/// The udev name of the device `rdev` in `by_id` (`/dev/disk/by-id`): the first in name
/// order, as `by-id:NAME`; these names come from the hardware (model and serial, WWN, NVMe
/// EUI), not from the order devices were found.
pub fn by_id_name(by_id: &Path, rdev: u64) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(by_id)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            fs::metadata(e.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        })
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names.into_iter().next().map(|n| format!("by-id:{n}"))
}

/// Bytes of a device's start that its signature covers.
pub const SIGNATURE_BYTES: u64 = 1 << 20;

/// What a device record checks before trusting that the device is the one it describes:
/// the device's size, and the BLAKE3 of its first [`SIGNATURE_BYTES`] as the last sync left
/// them (a partition table, a boot sector, a file system's superblock: what tells disks
/// apart). A device number reused by another device after a reboot, or a device rewritten
/// behind our back, fails the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSignature {
    pub size: u64,
    pub signature: String,
}

impl DeviceSignature {
    /// Reads the signature of the device at `path`.
    pub fn of(path: &Path) -> Result<DeviceSignature> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(path).map_err(|e| Error::io("open device", path, e))?;
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("size device", path, e))?;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seek device", path, e))?;
        let mut head = Vec::new();
        f.take(SIGNATURE_BYTES.min(size))
            .read_to_end(&mut head)
            .map_err(|e| Error::io("read device", path, e))?;
        Ok(DeviceSignature {
            size,
            signature: format!("blake3:{}", blake3::hash(&head).to_hex()),
        })
    }

    /// Why `record` does not describe a device with this signature, if it does not. Only the
    /// size is checked while a sync is applying (its first MiB may be half written).
    pub fn mismatch(&self, record: &Record) -> Option<String> {
        if let Some(recorded) = record.device_size.filter(|&s| s != self.size) {
            return Some(format!(
                "the record describes a device of {recorded} bytes and this one has {} bytes",
                self.size
            ));
        }
        match &record.signature {
            Some(sig) if record.state != State::Applying && *sig != self.signature => Some(
                "the device's first MiB is not what the last sync left there: another device \
                 took this one's name (after a reboot), or it was written behind \
                 stackvault's back"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// An exclusive lock on `<record>.lock`, held for the whole sync: a second sync of the same
/// target refuses while it is held. The OS drops it when the process dies.
pub struct SyncLock {
    _file: File,
}

impl SyncLock {
    pub fn acquire(record: &Path, target_shown: &str) -> Result<SyncLock> {
        let mut name = record
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".lock");
        let path = record.with_file_name(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open standby lock", &path, e))?;
        use rustix::fs::{flock, FlockOperation};
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|_| {
            Error::Locked(format!(
                "another standby sync of {target_shown} is running (it holds {}); wait for it",
                path.display()
            ))
        })?;
        Ok(SyncLock { _file: file })
    }
}

/// True when `pid` is a live process of this host other than us.
pub fn other_process_alive(pid: u32) -> bool {
    if pid == 0 || pid == std::process::id() {
        return false;
    }
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    // Signal 0 checks existence only (EPERM also means it exists).
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pair: &str) -> SnapshotId {
        SnapshotId::parse(&pair.repeat(32)).expect("a valid id")
    }

    fn sample() -> Record {
        Record {
            version: RECORD_VERSION,
            repository_id: "00112233445566778899aabbccddeeff".into(),
            disk: "web01-os".into(),
            snapshot_id: Some(id("ab")),
            state: State::Applying,
            applying: vec![id("cd"), id("ef")],
            since: "2026-11-30T00:00:00Z".into(),
            target_format: "vhd-fixed".into(),
            virtual_size: 1 << 30,
            host: "dr1".into(),
            pid: 42,
            identity: String::new(),
            device_size: None,
            signature: None,
        }
    }

    #[test]
    fn metadata_round_trip() -> Result<()> {
        let r = sample();
        let back = Record::from_metadata(&r.to_metadata(), "blob")?;
        assert_eq!(back, Some(r));
        assert_eq!(Record::from_metadata(&BTreeMap::new(), "blob")?, None);
        let mut m = sample().to_metadata();
        m.insert("stackvault_standby".into(), "9".into());
        assert!(matches!(
            Record::from_metadata(&m, "blob"),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
        // A malformed id in the metadata is refused where it is read, never sliced later.
        for (name, value) in [
            ("stackvault_snapshot", "abc"),
            ("stackvault_applying", "\u{e9}\u{e9}"),
            ("stackvault_applying", &format!("{},xyz", "cd".repeat(32))),
        ] {
            let mut m = sample().to_metadata();
            m.insert(name.into(), value.to_string());
            assert!(
                matches!(
                    Record::from_metadata(&m, "blob"),
                    Err(Error::Unsupported { .. })
                ),
                "{name}={value}"
            );
        }
        Ok(())
    }

    #[test]
    fn file_round_trip() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let path = state_path(&dir.path().join("disk.vhd"));
        assert_eq!(Record::read_file(&path)?, None);
        let r = sample();
        r.write_file(&path)?;
        assert_eq!(Record::read_file(&path)?, Some(r));
        // A device record carries its signature; a record without one still reads.
        let dev = Record {
            device_size: Some(1 << 30),
            signature: Some("blake3:00".into()),
            ..sample()
        };
        dev.write_file(&path)?;
        assert_eq!(Record::read_file(&path)?, Some(dev));
        // A state file whose held snapshot is no snapshot id is damaged: refused on reading.
        let text = fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        let bad = text.replace(&"ab".repeat(32), "ab");
        fs::write(&path, bad).map_err(|e| Error::io("write", &path, e))?;
        assert!(matches!(
            Record::read_file(&path),
            Err(Error::Unsupported { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_partition_is_named_by_its_disk_and_number() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
        let disk = dir.path().join("block/sda");
        let part = disk.join("sda1");
        fs::create_dir_all(part.clone()).map_err(|e| Error::io("mkdir", &part, e))?;
        fs::create_dir_all(disk.join("device")).map_err(|e| Error::io("mkdir", &disk, e))?;
        let write = |p: PathBuf, v: &str| fs::write(&p, v).map_err(|e| Error::io("write", &p, e));
        write(disk.join("device/wwid"), "naa.5000c500a1b2c3d4\n")?;
        write(part.join("partition"), "1\n")?;
        let files = ["dm/uuid", "wwid", "serial"];
        assert_eq!(
            sysfs_identity(&disk, &files).as_deref(),
            Some("wwid:naa.5000c500a1b2c3d4")
        );
        assert_eq!(
            sysfs_identity(&part, &files).as_deref(),
            Some("wwid:naa.5000c500a1b2c3d4:part1")
        );
        assert_eq!(sysfs_identity(&part, &["loop/backing_file"]), None);
        Ok(())
    }
}
