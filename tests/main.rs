//! The integration suite: one binary, one module per area. Every test makes its own
//! temporary repository and sample disks (built from real files of this machine).

mod azure;
mod cli;
mod compat;
mod crash;
mod device;
mod foundation;
mod frames;
mod incremental;
mod interrupt;
mod locks;
mod readonly;
mod retention;
mod standby;
mod vectors;
mod verify;
mod vhd;
