//! `init --like` between two object stores (issue 14, "init --like creates a repository with
//! the source's parameters"): the source on moto's S3 and the new repository on Azurite, from a
//! host that has reached neither before. Each location takes its own endpoint
//! (`--like-endpoint` for the source, `--endpoint` for the new one), a single `--endpoint` for
//! two remote locations is a usage error that creates nothing, and the new repository takes
//! the source's parameters; `copy` between them then restores byte-identical.

use anyhow::{ensure, Result};
use serde_json::Value;
use stackvault_tests::{p, same_bytes, Disk};

use crate::remote_maintain::{azurite, moto, Remote};

const MIB: u64 = 1 << 20;

#[test]
fn init_like_from_s3_into_azure_takes_an_endpoint_for_each_store() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let Some(az) = azurite()? else { return Ok(()) };
    let s3 = Remote::s3(&moto, "likefrom")?;
    let azure = Remote::azure(&az, "liketo")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    Disk::random(6 * MIB, 41).write(&disk)?;
    // Not the default zstd level, so that "like" is seen to be taken from the source.
    let source = s3.json(&["init", "--zstd-level", "9"])?;
    s3.json(&["backup", p(&disk), "--disk", "d"])?;

    // A host that has never reached either store: nothing remembered.
    let host = tempfile::tempdir()?;
    let cmd = |args: &[&str]| {
        let mut c = stackvault_tests::sv_command();
        c.arg("--quiet")
            .args(args)
            .env("XDG_CACHE_HOME", host.path())
            .env_remove("STACKVAULT_REPOSITORY")
            .env_remove("STACKVAULT_ENDPOINT");
        for (k, v) in s3.env.iter().chain(&azure.env) {
            c.env(k, v);
        }
        c.output()
    };

    // One --endpoint for two remote locations: refused, naming the option to use.
    for args in [
        &[
            "-r",
            &azure.location,
            "init",
            "--like",
            &s3.location,
            "--endpoint",
            &azure.endpoint,
        ][..],
        &[
            "--endpoint",
            &azure.endpoint,
            "-r",
            &azure.location,
            "init",
            "--like",
            &s3.location,
        ],
    ] {
        let out = cmd(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: {:?}: {err}",
            out.status
        );
        ensure!(err.contains("--like-endpoint"), "{err}");
    }
    ensure!(azure.keys("")?.is_empty(), "a refused init created objects");
    // --like-endpoint on a local source is refused too.
    let out = cmd(&[
        "init",
        p(&dir.path().join("new")),
        "--like",
        p(&dir.path().join("somewhere")),
        "--like-endpoint",
        &s3.endpoint,
    ])?;
    ensure!(out.status.code() == Some(2), "{out:?}");

    // Each store its own endpoint.
    let out = cmd(&[
        "-r",
        &azure.location,
        "init",
        "--like",
        &s3.location,
        "--like-endpoint",
        &s3.endpoint,
        "--endpoint",
        &azure.endpoint,
        "--json",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        created["chunker"] == source["chunker"] && created["zstd_level"] == source["zstd_level"],
        "not like the source: {created:#} against {source:#}"
    );
    ensure!(
        created["repository_id"] != source["repository_id"],
        "{created:#}"
    );

    // Both endpoints were remembered: copy needs none, and the copy restores byte-identical.
    let out = cmd(&[
        "copy",
        "--from",
        &s3.location,
        "--to",
        &azure.location,
        "--json",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = dir.path().join("r.img");
    let out = cmd(&[
        "restore",
        &azure.location,
        "latest",
        p(&restored),
        "--force",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        same_bytes(&restored, &disk)?,
        "the copy restores differently"
    );
    Ok(())
}
