//! The [`Backend`] contract as one test suite, run against every implementation: the local
//! directory and the memory backend here, the object-store backends by the integration
//! suite against real servers (Azurite, moto).

use std::io::Write;

use super::{Backend, ObjectInfo};
#[cfg(test)]
use super::{LocalDir, MemoryBackend};
use crate::error::Error;
use crate::error::Result;

fn is_not_found(r: &Result<impl std::fmt::Debug>, key: &str) -> bool {
    matches!(r, Err(Error::NotFound { object }) if object == key)
}

/// Checks every promise of the [`Backend`] contract that a single caller can observe, on
/// a backend that starts empty (a fresh directory, container or prefix). Panics on the
/// first broken promise, naming it; store errors are returned.
pub fn honours_the_contract(b: &dyn Backend) -> Result<()> {
    let key = "packs/ab/abcd";
    // A typed absence.
    assert!(is_not_found(&b.get(key), key));
    assert!(is_not_found(&b.get_range(key, 0, 1), key));
    assert!(is_not_found(&b.size(key), key));
    assert!(is_not_found(&b.version(key), key));
    assert!(!b.exists(key)?);
    assert!(b.list_with_sizes("packs/")?.is_empty());

    b.put(key, b"hello")?;
    assert_eq!(b.get(key)?, b"hello");
    assert_eq!(b.get_range(key, 1, 3)?, b"ell");
    assert!(matches!(
        b.get_range(key, 3, 3),
        Err(Error::Corrupt { offset: 3, .. })
    ));
    assert_eq!(b.size(key)?, 5);
    assert!(b.exists(key)?);

    // Immutable: a second put is refused and changes nothing, streamed or not.
    assert!(matches!(
        b.put(key, b"other"),
        Err(Error::AlreadyExists { object }) if object == key
    ));
    assert_eq!(b.get(key)?, b"hello");
    b.put("snapshots/s1", b"manifest")?;
    let mut w = b.writer("snapshots/")?;
    w.write_all(b"another")
        .map_err(|e| Error::io("write", "snapshots/", e))?;
    assert!(matches!(
        w.commit("snapshots/s1"),
        Err(Error::AlreadyExists { object }) if object == "snapshots/s1"
    ));
    assert_eq!(b.get("snapshots/s1")?, b"manifest");

    // Listing with sizes, by prefix.
    b.put("packs/cd/cdef", b"")?;
    let mut listed = b.list_with_sizes("packs/")?;
    listed.sort_by(|x, y| x.key.cmp(&y.key));
    // The modification time is whatever the store says; the contract is key and size.
    for o in &mut listed {
        o.modified = None;
    }
    let info = |key: &str, size| ObjectInfo {
        key: key.to_string(),
        size,
        modified: None,
    };
    assert_eq!(listed, vec![info(key, 5), info("packs/cd/cdef", 0)]);
    assert_eq!(b.list("snapshots/")?, vec!["snapshots/s1".to_string()]);

    // Conditional replace and delete by version.
    let mutable = "verifications/record";
    b.put(mutable, b"v1")?;
    let v1 = b.version(mutable)?;
    let v2 = b.replace(mutable, b"v2", &v1)?;
    assert_ne!(v1, v2);
    assert_eq!(b.version(mutable)?, v2);
    assert_eq!(b.get(mutable)?, b"v2");
    assert!(matches!(
        b.replace(mutable, b"v3", &v1),
        Err(Error::VersionMismatch { object }) if object == mutable
    ));
    assert!(matches!(
        b.delete_if(mutable, &v1),
        Err(Error::VersionMismatch { .. })
    ));
    assert_eq!(b.get(mutable)?, b"v2");
    assert!(is_not_found(
        &b.replace("verifications/none", b"x", &v1),
        "verifications/none"
    ));
    b.delete_if(mutable, &v2)?;
    assert!(!b.exists(mutable)?);

    // Removing is idempotent.
    b.remove(key)?;
    b.remove(key)?;
    assert!(is_not_found(&b.get(key), key));
    Ok(())
}

#[cfg(test)]
#[test]
fn local_dir_honours_the_contract() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "/tmp", e))?;
    honours_the_contract(&LocalDir::new(dir.path()))
}

#[cfg(test)]
#[test]
fn memory_backend_honours_the_contract() -> Result<()> {
    honours_the_contract(&MemoryBackend::new())
}

#[cfg(feature = "testing")]
#[cfg(test)]
#[test]
fn fault_injecting_backend_honours_the_contract() -> Result<()> {
    honours_the_contract(&super::testing::DiskFullAfter::new(
        MemoryBackend::new(),
        u64::MAX,
    ))
}
