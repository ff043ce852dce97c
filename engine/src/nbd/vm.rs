//! The disks of a VM snapshot as a server's exports (`serve --vm NAME SNAPSHOT`).
//!
//! Every disk of the VM snapshot becomes one export named by the disk's name within the VM
//! (`os`, `data1`), the name its record gives it; `NBD_OPT_LIST` then lists them all. Only a
//! complete VM snapshot is served, and each disk snapshot must still carry the root digest
//! the VM record names (as `restore-vm` checks), so a client never mixes disks of two points
//! in time under one VM snapshot's name.

use crate::error::{Error, Result};
use crate::format::short_id;
use crate::index::SnapshotSummary;
use crate::repo::Repo;
use crate::vm::{self, VmSnapshot};

/// One disk of a served VM snapshot.
#[derive(Clone, Debug)]
pub struct VmExportDisk {
    /// The disk's name within the VM: the export's name.
    pub name: String,
    pub snapshot: SnapshotSummary,
}

/// Resolves VM snapshot `query` (id, unique prefix or `latest`, the newest complete one) of
/// `vm` and the disk snapshots it names, in the record's order.
pub fn vm_export_disks(
    repo: &Repo,
    vm_name: &str,
    query: &str,
) -> Result<(VmSnapshot, Vec<VmExportDisk>)> {
    let chosen = vm::resolve_vm_snapshot(repo, vm_name, query)?;
    if !chosen.complete {
        return Err(Error::InvalidArgument(format!(
            "VM snapshot {} of {vm_name} is incomplete (a disk snapshot of it was forgotten); \
             serve its remaining disks one by one with `serve --disk`, or pick another VM \
             snapshot (`vm-snapshots --vm {vm_name}` lists them)",
            short_id(&chosen.id)
        )));
    }
    let mut disks = Vec::with_capacity(chosen.record.disks.len());
    for d in &chosen.record.disks {
        let snapshot = repo.resolve_snapshot(&d.snapshot_id, None)?;
        if snapshot.meta.root_digest != d.root_digest {
            return Err(Error::corrupt(
                vm::record::key(&chosen.id),
                0,
                format!(
                    "disk {} names snapshot {} with root digest {}, but the snapshot has {}",
                    d.name, d.snapshot_id, d.root_digest, snapshot.meta.root_digest
                ),
            ));
        }
        disks.push(VmExportDisk {
            name: d.name.clone(),
            snapshot,
        });
    }
    Ok((chosen, disks))
}
