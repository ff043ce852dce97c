//! The integration suite: one binary, one module per area.

mod crash;
mod verify;

use stackvault_tests::stackvault_bin;

#[test]
fn bin_builds() -> anyhow::Result<()> {
    let out = std::process::Command::new(stackvault_bin())
        .arg("--version")
        .output()?;
    assert!(out.status.success());
    Ok(())
}
