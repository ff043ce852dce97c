//! A read-only principal on S3 (issue 14, "Read-only access"): moto with IAM enforced, a user
//! whose policy allows only `s3:GetObject` and `s3:ListBucket`. With its key every reading
//! command works on a fresh host (`snapshots`, `restore`, `copy --from` into another
//! repository, `serve`), and `backup` fails once, with one error naming the permissions a
//! writer needs, leaving the store as it was. The Azure counterpart (a read+list SAS on
//! Azurite) is in `remote_economy.rs` and `remote_errors.rs`.

use std::io::BufRead;
use std::process::Stdio;

use anyhow::{ensure, Context, Result};
use stackvault_tests::{p, same_bytes, Disk};

use crate::moto::Moto;
use crate::remote_maintain::Remote;

const MIB: u64 = 1 << 20;

#[test]
fn a_read_only_s3_key_reads_copies_serves_and_backup_names_the_missing_permissions() -> Result<()> {
    let Some(moto) = Moto::start_with_users(&[("reader", &["s3:GetObject", "s3:ListBucket"])])
    else {
        return Ok(());
    };
    let writer = Remote::s3(&moto, "readonly")?;
    writer.json(&["init"])?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(6 * MIB, 61).write(&disk)?;
    writer.json(&["backup", p(&disk), "--disk", "d"])?;

    let (id, secret) = moto.user("reader")?;
    // A fresh host (its own cache) holding only the read-only key.
    let reader = Remote {
        location: writer.location.clone(),
        endpoint: writer.endpoint.clone(),
        env: vec![
            ("AWS_ACCESS_KEY_ID", id),
            ("AWS_SECRET_ACCESS_KEY", secret.clone()),
            ("AWS_REGION", "us-east-1".into()),
        ],
        objects: Box::new(moto.backend(&writer.location)?),
        cache: tempfile::tempdir()?,
    };
    let before = reader.keys("")?;
    let run = |args: &[&str]| -> Result<std::process::Output> {
        let out = reader.command(args).output().context("run stackvault")?;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!all.contains(&secret), "the secret is shown: {all}");
        Ok(out)
    };
    let ok = |args: &[&str]| -> Result<()> {
        let out = run(args)?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };

    // snapshots
    let listed = reader.json(&["snapshots"])?;
    ensure!(
        listed["snapshots"].as_array().map(Vec::len) == Some(1),
        "{listed:#}"
    );
    // restore
    let restored = dir.path().join("r.img");
    ok(&[
        "restore",
        &reader.location,
        "latest",
        p(&restored),
        "--force",
    ])?;
    ensure!(same_bytes(&restored, &disk)?, "the restore differs");
    // copy --from the read-only location into a local repository, which restores the same.
    let local = dir.path().join("local");
    ok(&["init", p(&local)])?;
    ok(&["copy", "--from", &reader.location, "--to", p(&local)])?;
    let copied = dir.path().join("c.img");
    ok(&["restore", p(&local), "latest", p(&copied), "--force"])?;
    ensure!(same_bytes(&copied, &disk)?, "the copy restores differently");
    // serve opens the snapshot and listens.
    let socket = dir.path().join("nbd.sock");
    let nbd = format!("unix:{}", p(&socket));
    let mut serve = reader
        .command(&["serve", &reader.location, "latest", "--nbd", &nbd, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    let stdout = serve.stdout.take().context("stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut first)?;
    let _ = serve.kill();
    let status = serve.wait()?;
    ensure!(
        first.contains("unix:") || socket.exists(),
        "serve did not get ready ({status}): {first}"
    );

    // backup: one error (exit 1), naming the permissions a writer needs; nothing written.
    let out = run(&["backup", &reader.location, p(&disk), "--disk", "d"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{:?}: {err}", out.status);
    ensure!(
        err.contains("403") && err.contains("s3:PutObject") && err.contains("s3:DeleteObject"),
        "{err}"
    );
    ensure!(
        err.trim().lines().count() <= 2,
        "more than one error: {err}"
    );
    ensure!(
        reader.keys("")? == before,
        "a read-only run changed the store"
    );
    Ok(())
}
