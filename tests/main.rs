use stackvault_tests::stackvault_bin;
#[test]
fn bin_builds() {
    let out = std::process::Command::new(stackvault_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
}
