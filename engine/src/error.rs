//! The engine's one error type.
//!
//! Every failure names where it happened: the file, pack or snapshot and, for decoders, the
//! byte offset. Damage to stored data is [`Error::Corrupt`], kept apart from I/O failures so a
//! caller can tell "the repository is damaged" from "the machine could not do the work".
//! Decoders never panic on hostile input; they return `Corrupt` instead.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Stored or input data is damaged or malformed: a checksum mismatch, a truncated
    /// structure, a field out of range. `location` names the file, pack or snapshot.
    #[error("corrupt data in {location} at offset {offset}: {what}")]
    Corrupt {
        location: String,
        offset: u64,
        what: String,
    },

    /// The path holds no stackvault repository.
    #[error("{path} is not a stackvault repository ({why})")]
    NotARepository { path: PathBuf, why: String },

    /// `init` was pointed at something that is already in use.
    #[error("{path} already exists and is not empty; refusing to create a repository there")]
    DirectoryNotEmpty { path: PathBuf },

    /// A structure carries a version this build does not understand.
    #[error("{what} has format version {found}, this build supports up to {supported}; upgrade stackvault")]
    UnsupportedVersion {
        what: String,
        found: u32,
        supported: u32,
    },

    /// No snapshot matches an id, prefix or `latest` query.
    #[error("no snapshot matches {query:?}")]
    SnapshotNotFound { query: String },

    /// A short id prefix matches more than one snapshot.
    #[error("snapshot prefix {prefix:?} is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousSnapshot {
        prefix: String,
        candidates: Vec<String>,
    },

    /// An output file is in the way.
    #[error("{path} already exists; pass --force to overwrite it")]
    OutputExists { path: PathBuf },

    /// A chunk a snapshot needs is not in the index (and so not in any known pack).
    #[error("chunk {id} needed by snapshot {snapshot} is missing from the repository")]
    MissingChunk { id: String, snapshot: String },

    /// The SQLite index failed.
    #[error("index {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The caller asked for something that cannot be done as asked.
    #[error("{0}")]
    InvalidArgument(String),

    /// Another process holds a lock that this operation needs.
    #[error("repository is locked: {0}")]
    Locked(String),

    /// A storage service answered with an error. `url` is redacted (no SAS, no key).
    #[error("{url}: HTTP {status} {code}: {message}")]
    Http {
        url: String,
        status: u16,
        code: String,
        message: String,
    },

    /// A storage service could not be reached (connection failed, reset, timed out) after
    /// `tries` attempts. `url` is redacted.
    #[error("{url}: no answer after {tries} tries: {message}")]
    Network {
        url: String,
        tries: u32,
        message: String,
    },
}

impl Error {
    /// Wraps an I/O error with the operation and path it came from.
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Builds a [`Error::Corrupt`].
    pub fn corrupt(location: impl std::fmt::Display, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            location: location.to_string(),
            offset,
            what: what.into(),
        }
    }

    /// True when the error says stored data is damaged (as opposed to an operational failure).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::MissingChunk { .. })
    }

    /// True when the underlying cause is a full disk (ENOSPC or a quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}
