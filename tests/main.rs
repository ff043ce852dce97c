//! The integration suite: one binary, one module per area. Every test makes its own
//! temporary repository and sample disks (built from real files of this machine).

mod azure;
mod azure_store;
mod cli;
mod compat;
mod copy;
mod crash;
mod device;
mod faultproxy;
mod foundation;
mod frames;
mod incremental;
mod interrupt;
mod locks;
mod moto;
mod nbd;
mod read;
mod readonly;
mod remote_economy;
mod remote_errors;
mod remote_faults;
mod remote_maintain;
mod remote_repo;
mod retention;
mod s3_faults;
mod s3_store;
mod shared_prune;
mod shared_repo;
mod standby;
mod vectors;
mod verify;
mod vhd;
mod vm;
