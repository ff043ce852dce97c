//! `serve` of a snapshot whose pack was deleted behind the repository's back (issue 14): the
//! NBD read of the lost data fails with EIO, and the server's log names the pack and the
//! offset, as `restore` and `check` do (tests/gone_pack.rs), so that an operator reading the
//! log knows which object is gone without running `check`.

use std::io::Read;
use std::process::Stdio;

use anyhow::{ensure, Result};
use stackvault_tests::{have_qemu_img, in_ci, p, served_uri, sv_command};

use crate::gone_pack::backed_up_then_a_pack_deleted;
use crate::remote_maintain::{moto, Remote};

#[test]
fn serve_logs_the_gone_pack_and_offset_of_a_failed_read() -> Result<()> {
    if !have_qemu_img() {
        ensure!(!in_ci(), "qemu-img missing under CI=true");
        eprintln!("SKIP: qemu-img not installed");
        return Ok(());
    }
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "servegone")?;
    let dir = tempfile::tempdir()?;
    let gone = backed_up_then_a_pack_deleted(&r, dir.path(), 73)?;
    let (id, pack) = (gone.id.as_str(), gone.pack.as_str());

    // Not --quiet (Remote::command's default): the log is what this test reads.
    let socket = dir.path().join("sv.sock");
    let nbd = format!("unix:{}", p(&socket));
    let mut cmd = sv_command();
    cmd.args(["--endpoint", &r.endpoint, "-r", &r.location, "serve", id])
        .args(["--json", "--nbd", &nbd])
        .env("XDG_CACHE_HOME", r.cache.path())
        .env_remove("STACKVAULT_REPOSITORY")
        .env_remove("STACKVAULT_ENDPOINT");
    for (k, v) in &r.env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let result = (|| -> Result<String> {
        let uri = served_uri(&mut child)?;
        let out = dir.path().join("served.img");
        let copy = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri, p(&out)])
            .output()?;
        ensure!(
            !copy.status.success(),
            "reading a snapshot whose pack is gone succeeded"
        );
        Ok(String::from_utf8_lossy(&copy.stderr).into_owned())
    })();
    let _ = child.kill();
    let mut log = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut log)?;
    }
    let _ = child.wait();
    let client = result?;
    let named = log
        .lines()
        .any(|l| l.contains(pack) && l.contains("offset") && l.to_lowercase().contains("read"));
    ensure!(
        named,
        "the serve log does not name the gone pack {pack} and the offset:\n{log}\n\
         (client: {client})"
    );
    Ok(())
}
