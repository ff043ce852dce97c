//! The engine's one error type.
//!
//! Every failure names where it happened: the file, pack or snapshot and, for decoders, the
//! byte offset. Each variant belongs to one [`ErrorClass`], which says whose fault it is and so
//! who must act: damage to stored data ([`Error::Corrupt`]) pages the backup admin, a damaged
//! source ([`Error::SourceDamaged`]) the owner of the VM disk, an unsupported format
//! ([`Error::Unsupported`]) asks for a newer stackvault or a converted input, a usage error
//! ([`Error::Usage`]) the person who typed the command. The CLI turns the class into its exit
//! code. Decoders never panic on hostile input; they return `Corrupt` (stored data) or
//! `SourceDamaged` (an input disk) instead.

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

    /// An input disk (VHD, page blob, change list that describes it) is damaged or inconsistent
    /// with itself: the backup is refused rather than half done. `source` names the file or
    /// redacted URL.
    #[error("source {source_name} is damaged at offset {offset}: {what}")]
    SourceDamaged {
        source_name: String,
        offset: u64,
        what: String,
    },

    /// The input or the repository uses a format or feature this build does not handle
    /// (VHDX, an unknown code inside a pack or manifest). Not damage: another tool or a newer
    /// stackvault can read it.
    #[error("{what}")]
    Unsupported { what: String },

    /// The repository uses format features this build does not know; `min_version` is the
    /// oldest stackvault that reads them (from the repository's config).
    #[error("{path} needs stackvault >= {min_version} (features: {}); this is stackvault {this}", features.join(", "), this = env!("CARGO_PKG_VERSION"))]
    UnsupportedFeatures {
        path: String,
        features: Vec<String>,
        min_version: String,
    },

    /// The command was given an option value or combination that cannot work; nothing was
    /// done. The message says what to type instead.
    #[error("{0}")]
    Usage(String),

    /// A restored disk (file, device or page blob) does not match the snapshot it claims to
    /// hold: the target is wrong, not the repository.
    #[error("target {target} does not match snapshot {snapshot} at offset {offset}: {what}")]
    TargetMismatch {
        target: String,
        snapshot: String,
        offset: u64,
        what: String,
    },

    /// The operation was interrupted (SIGINT, SIGTERM) and stopped cleanly.
    #[error("interrupted: {0}")]
    Cancelled(String),

    /// A bug or a broken invariant inside stackvault (a worker thread panicked, a lock was
    /// poisoned). Never caused by input; please report it.
    #[error("internal error: {0}")]
    Internal(String),

    /// A structure carries a version this build does not understand.
    #[error("{what} has format version {found}, this build supports up to {supported}; upgrade stackvault")]
    UnsupportedVersion {
        what: String,
        found: u32,
        supported: u32,
    },

    /// A repository object the caller asked for is not in the store (`object` is its key).
    /// Backends return this, never an I/O error, for a missing object, so that callers can
    /// tell "absent" from "unreadable" on any store.
    #[error("object {object} is not in the repository")]
    NotFound { object: String },

    /// `put` refused to overwrite an object that already exists: stored objects are
    /// immutable (see [`crate::store::Backend`]).
    #[error("object {object} already exists in the repository and is never overwritten")]
    AlreadyExists { object: String },

    /// A conditional `replace` or `delete_if` found the object changed since the caller read
    /// its version: someone else wrote it meanwhile. Read it again and retry.
    #[error(
        "object {object} changed since it was read (another writer?); read it again and retry"
    )]
    VersionMismatch { object: String },

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

    /// No key object of an encrypted repository opens with the password given. Checked
    /// before any other work; the password itself appears nowhere.
    #[error(
        "wrong password for {repository}: none of its {keys} key(s) opens with it; check \
         STACKVAULT_PASSWORD, --password-file or --password-command (`stackvault key list` \
         shows the keys once unlocked)"
    )]
    WrongPassword { repository: String, keys: usize },

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
        self.class() == ErrorClass::RepositoryDamaged
    }

    /// Builds a [`Error::SourceDamaged`].
    pub fn source_damaged(
        source_name: impl std::fmt::Display,
        offset: u64,
        what: impl Into<String>,
    ) -> Self {
        Error::SourceDamaged {
            source_name: source_name.to_string(),
            offset,
            what: what.into(),
        }
    }

    /// Builds a [`Error::Unsupported`].
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }

    /// Whose fault the failure is, and so which exit code the CLI returns.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Corrupt { .. } | Error::MissingChunk { .. } => ErrorClass::RepositoryDamaged,
            Error::SourceDamaged { .. } => ErrorClass::SourceDamaged,
            Error::TargetMismatch { .. } => ErrorClass::TargetMismatch,
            Error::Unsupported { .. }
            | Error::UnsupportedFeatures { .. }
            | Error::UnsupportedVersion { .. } => ErrorClass::Unsupported,
            Error::Usage(_) => ErrorClass::Usage,
            Error::Cancelled(_) => ErrorClass::Cancelled,
            Error::WrongPassword { .. } => ErrorClass::WrongPassword,
            _ => ErrorClass::Failure,
        }
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

/// Who must act on a failure. Each class has its own process exit code, listed in the README
/// and `--help`; the codes are part of the CLI's contract and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The machine could not do the work: I/O, network, a missing file, a lock held. Exit 1.
    Failure,
    /// Bad option values or combinations. Exit 2 (as clap uses for bad syntax).
    Usage,
    /// The repository or its stored data is damaged. Exit 3.
    RepositoryDamaged,
    /// The input disk is damaged or inconsistent. Exit 4.
    SourceDamaged,
    /// A restored disk does not match its snapshot. Exit 5.
    TargetMismatch,
    /// A format or feature this build does not handle. Exit 6.
    Unsupported,
    /// No key of an encrypted repository opens with the password given. Exit 7.
    WrongPassword,
    /// Interrupted by SIGINT or SIGTERM and stopped cleanly. Exit 130 (128 + SIGINT).
    Cancelled,
}

impl ErrorClass {
    /// The process exit code for this class.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Failure => 1,
            ErrorClass::Usage => 2,
            ErrorClass::RepositoryDamaged => 3,
            ErrorClass::SourceDamaged => 4,
            ErrorClass::TargetMismatch => 5,
            ErrorClass::Unsupported => 6,
            ErrorClass::WrongPassword => 7,
            ErrorClass::Cancelled => 130,
        }
    }
}
