//! Where a snapshot's bytes came from, as the manifest's metadata names it: the container the
//! source was read as ([`ContainerFormat`], `source.format`) and how an incremental learned
//! what changed ([`ChangeSource`], `change_source`).
//!
//! Both are stored as the strings earlier versions wrote (`vhd-dynamic`, `changed-ranges`,
//! `full-read (why)`, `copy-of:ID`...), so manifests and JSON output are byte-identical to
//! theirs. A string this build does not know (a newer writer's) is kept as it was read
//! (`Other`), never refused: readers ignore what they do not understand, and a copy of the
//! snapshot writes it back unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::format::vhd_footer::DiskType;
use crate::format::SnapshotId;

/// The container format a source was detected as and read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ContainerFormat {
    /// A raw image, a block device, a page blob without a VHD footer.
    Raw,
    /// A VHD of the given kind (`vhd-fixed`, `vhd-dynamic`, `vhd-differencing`).
    Vhd(DiskType),
    /// A name this build does not know, kept as read.
    Other(String),
}

impl ContainerFormat {
    /// The stored name: `raw`, `vhd-fixed`, `vhd-dynamic`, `vhd-differencing`.
    pub fn as_str(&self) -> &str {
        match self {
            ContainerFormat::Raw => "raw",
            ContainerFormat::Vhd(DiskType::Fixed) => "vhd-fixed",
            ContainerFormat::Vhd(DiskType::Dynamic) => "vhd-dynamic",
            ContainerFormat::Vhd(DiskType::Differencing) => "vhd-differencing",
            ContainerFormat::Other(s) => s,
        }
    }
}

impl From<String> for ContainerFormat {
    fn from(s: String) -> Self {
        match s.as_str() {
            "raw" => ContainerFormat::Raw,
            "vhd-fixed" => ContainerFormat::Vhd(DiskType::Fixed),
            "vhd-dynamic" => ContainerFormat::Vhd(DiskType::Dynamic),
            "vhd-differencing" => ContainerFormat::Vhd(DiskType::Differencing),
            _ => ContainerFormat::Other(s),
        }
    }
}

impl From<ContainerFormat> for String {
    fn from(f: ContainerFormat) -> Self {
        match f {
            ContainerFormat::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for ContainerFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a backup learned which parts of the disk to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ChangeSource {
    /// Everything was read (`full-read`); with the reason when change knowledge was set
    /// aside under `--fallback-full` (`full-read (REASON)`).
    FullRead { reason: Option<String> },
    /// A change list given on the command line (`changed-ranges`).
    ChangedRanges,
    /// The source container's own knowledge, e.g. the layers of a differencing VHD above the
    /// parent's disk (`vhd-differencing-chain`: the container format, then `-chain`).
    Chain(ContainerFormat),
    /// Azure's page ranges changed since the parent's blob snapshot (`blob-snapshot-diff`).
    BlobSnapshotDiff,
    /// Re-chunked by `copy` from the snapshot of that id in another repository
    /// (`copy-of:ID`); how a rerun of the copy knows the snapshot is there.
    CopyOf(String),
    /// A name this build does not know, kept as read.
    Other(String),
}

/// Stored prefix of [`ChangeSource::CopyOf`].
const COPY_OF: &str = "copy-of:";
/// Stored suffix of [`ChangeSource::Chain`].
const CHAIN: &str = "-chain";
const FULL_READ: &str = "full-read";

impl ChangeSource {
    /// Everything read, with no reason to give.
    pub const fn full_read() -> Self {
        ChangeSource::FullRead { reason: None }
    }

    /// Everything read because change knowledge was set aside for `reason`.
    pub fn full_read_because(reason: impl fmt::Display) -> Self {
        ChangeSource::FullRead {
            reason: Some(reason.to_string()),
        }
    }

    /// A snapshot re-chunked from `origin` in another repository.
    pub fn copy_of(origin: &SnapshotId) -> Self {
        ChangeSource::CopyOf(origin.as_str().to_owned())
    }

    /// The origin of a copied snapshot as stored (a full id, unless a damaged or foreign
    /// manifest says otherwise).
    pub fn copied_from(&self) -> Option<&str> {
        match self {
            ChangeSource::CopyOf(origin) => Some(origin),
            _ => None,
        }
    }
}

impl From<String> for ChangeSource {
    fn from(s: String) -> Self {
        if s == FULL_READ {
            return ChangeSource::full_read();
        }
        if let Some(reason) = s
            .strip_prefix(FULL_READ)
            .and_then(|r| r.strip_prefix(" ("))
            .and_then(|r| r.strip_suffix(')'))
        {
            return ChangeSource::full_read_because(reason);
        }
        if let Some(origin) = s.strip_prefix(COPY_OF) {
            return ChangeSource::CopyOf(origin.to_owned());
        }
        match s.as_str() {
            "changed-ranges" => return ChangeSource::ChangedRanges,
            "blob-snapshot-diff" => return ChangeSource::BlobSnapshotDiff,
            _ => {}
        }
        if let Some(container) = s.strip_suffix(CHAIN) {
            if let known @ (ContainerFormat::Raw | ContainerFormat::Vhd(_)) =
                ContainerFormat::from(container.to_owned())
            {
                return ChangeSource::Chain(known);
            }
        }
        ChangeSource::Other(s)
    }
}

impl From<ChangeSource> for String {
    fn from(c: ChangeSource) -> Self {
        match c {
            ChangeSource::Other(s) => s,
            known => known.to_string(),
        }
    }
}

impl fmt::Display for ChangeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeSource::FullRead { reason: None } => f.write_str(FULL_READ),
            ChangeSource::FullRead {
                reason: Some(reason),
            } => write!(f, "{FULL_READ} ({reason})"),
            ChangeSource::ChangedRanges => f.write_str("changed-ranges"),
            ChangeSource::Chain(container) => write!(f, "{container}{CHAIN}"),
            ChangeSource::BlobSnapshotDiff => f.write_str("blob-snapshot-diff"),
            ChangeSource::CopyOf(origin) => write!(f, "{COPY_OF}{origin}"),
            ChangeSource::Other(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string earlier versions wrote reads as its variant and writes back unchanged.
    #[test]
    fn stored_names_round_trip() -> serde_json::Result<()> {
        let id = "ab".repeat(32);
        let changes = [
            ("full-read", ChangeSource::full_read()),
            (
                "full-read (the parent is 2 GiB, the disk 1 GiB)",
                ChangeSource::full_read_because("the parent is 2 GiB, the disk 1 GiB"),
            ),
            ("changed-ranges", ChangeSource::ChangedRanges),
            (
                "vhd-differencing-chain",
                ChangeSource::Chain(ContainerFormat::Vhd(DiskType::Differencing)),
            ),
            ("blob-snapshot-diff", ChangeSource::BlobSnapshotDiff),
            (&format!("copy-of:{id}"), ChangeSource::CopyOf(id.clone())),
            (
                "from-the-future",
                ChangeSource::Other("from-the-future".into()),
            ),
            ("vhdx-chain", ChangeSource::Other("vhdx-chain".into())),
        ];
        for (stored, want) in changes {
            let json = serde_json::to_string(stored)?;
            let read: ChangeSource = serde_json::from_str(&json)?;
            assert_eq!(read, want, "{stored}");
            assert_eq!(serde_json::to_string(&read)?, json);
        }
        let formats = [
            ("raw", ContainerFormat::Raw),
            ("vhd-fixed", ContainerFormat::Vhd(DiskType::Fixed)),
            ("vhd-dynamic", ContainerFormat::Vhd(DiskType::Dynamic)),
            (
                "vhd-differencing",
                ContainerFormat::Vhd(DiskType::Differencing),
            ),
            ("vhdx", ContainerFormat::Other("vhdx".into())),
        ];
        for (stored, want) in formats {
            let json = serde_json::to_string(stored)?;
            let read: ContainerFormat = serde_json::from_str(&json)?;
            assert_eq!(read, want, "{stored}");
            assert_eq!(serde_json::to_string(&read)?, json);
        }
        Ok(())
    }

    #[test]
    fn copy_of_names_its_origin() {
        let origin = SnapshotId::from_digest(&blake3::hash(b"m"));
        let c = ChangeSource::copy_of(&origin);
        assert_eq!(c.copied_from(), Some(origin.as_str()));
        assert_eq!(ChangeSource::full_read().copied_from(), None);
    }
}
