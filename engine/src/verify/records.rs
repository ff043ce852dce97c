//! The small metadata objects `check` reads besides manifests and packs: every index delta,
//! verification record and VM snapshot record must authenticate (in an encrypted repository)
//! and decode. Each damaged one is reported with its key and offset; none stops the check.
//!
//! A delta that fails authentication or decoding is damage, even though readers fall back on
//! the pack's own table: it says that something altered the store. A delta whose pack is gone
//! is not read here: it is an orphan, listed (and aged) by the delta comparison
//! (`deltas.rs`), and removed by `prune`, whatever its bytes.

use crate::error::{Error, Result};
use crate::format::verification::{VerificationRecord, VERIFICATIONS_PREFIX};
use crate::index::delta::{open_delta, pack_of_delta_key, pack_of_pack_key, DELTAS_PREFIX};
use crate::repo::Repo;
use crate::vm::record;

use super::DamageKind;

/// Every damaged delta, verification record and VM snapshot record, with its kind.
pub(super) fn damaged_records(repo: &Repo) -> Result<Vec<(DamageKind, Error)>> {
    let backend = repo.backend();
    let protection = repo.protection();
    let mut damaged = Vec::new();
    let mut note = |kind: DamageKind, read: Result<()>| match read {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) if e.is_corruption() => {
            damaged.push((kind, e));
            Ok(())
        }
        Err(e) => Err(e),
    };
    let packs: std::collections::HashSet<String> = backend
        .list("packs/")?
        .iter()
        .filter_map(|k| pack_of_pack_key(k).map(str::to_string))
        .collect();
    for key in backend.list(DELTAS_PREFIX)? {
        if !pack_of_delta_key(&key).is_some_and(|pack| packs.contains(pack)) {
            continue;
        }
        let read = backend
            .get(&key)
            .and_then(|b| open_delta(protection, &b, &key))
            .map(drop);
        note(DamageKind::IndexDelta, read)?;
    }
    for key in backend.list(VERIFICATIONS_PREFIX)? {
        let read = backend
            .get(&key)
            .and_then(|b| VerificationRecord::open(protection, &b, &key))
            .map(drop);
        note(DamageKind::VerificationRecord, read)?;
    }
    for key in backend.list(record::VMS_PREFIX)? {
        let Some(id) = record::id_of_key(&key) else {
            continue;
        };
        let read = backend
            .get(&key)
            .and_then(|b| record::decode(&id, &b, protection))
            .map(drop);
        note(DamageKind::VmRecord, read)?;
    }
    Ok(damaged)
}
