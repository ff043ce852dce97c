//! Helpers shared by the integration suite and benches: sample disks built from real files on
//! this machine, the `stackvault` binary, temporary repositories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Path of the `stackvault` binary of this build, building it first if needed.
pub fn stackvault_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/main-xxxx -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "stackvault-cli",
            "--bin",
            "stackvault",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo build for the stackvault binary");
        assert!(status.success(), "building the stackvault binary failed");
        profile_dir.join("stackvault")
    })
}
