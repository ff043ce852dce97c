//! Bad input and read-only credentials on remote repositories, through the command line
//! against real servers (Azurite, moto): an unknown scheme, missing credentials, a container
//! or bucket that does not exist, a wrong key, an empty location, objects deleted behind the
//! repository's back, and a read+list SAS with which every reading command works and every
//! writing one refuses. Each failure must be one clear error saying what to do, with the
//! right exit code, and never show the key, secret or SAS signature.

use std::path::Path;
use std::process::Output;

use anyhow::{bail, ensure, Context, Result};
use stackvault::azure::sign::SharedKey;
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};
use stackvault_tests::{azurite_bin, make_disk, p, same_bytes, Azurite};

use crate::moto::Moto;

pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// A well-formed key that is not the account's.
const WRONG_KEY: &str =
    "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk0MDQ=";

/// Every variable that could lend the CLI a credential or a repository: removed from each
/// child, so that a test sees only what it passes.
const CLEANED: &[&str] = &[
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "STACKVAULT_REPOSITORY",
    "STACKVAULT_ENDPOINT",
];

/// A CLI run's exit code, stdout and stderr.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Fails unless the run exited 0.
    pub fn ok(self, what: &str) -> Result<Ran> {
        if self.code != Some(0) {
            bail!(
                "{what} failed ({:?}):\n{}{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Fails unless the run exited `code` with an error whose text holds every one of `says`,
    /// and never any of `secrets`.
    pub fn fails(&self, code: i32, says: &[&str], secrets: &[&str]) -> Result<()> {
        ensure!(
            self.code == Some(code),
            "expected exit {code}, got {:?}:\n{}{}",
            self.code,
            self.stdout,
            self.stderr
        );
        for s in says {
            ensure!(
                self.stderr.contains(s),
                "error lacks {s:?}: {}",
                self.stderr
            );
        }
        self.no_secret(secrets)
    }

    /// Fails if any of `secrets` (or a SAS signature) shows in stdout or stderr.
    pub fn no_secret(&self, secrets: &[&str]) -> Result<()> {
        let all = format!("{}{}", self.stdout, self.stderr);
        for s in secrets {
            ensure!(!all.contains(s), "a secret leaked into the output: {all}");
        }
        ensure!(!all.contains("sig="), "a SAS signature leaked: {all}");
        Ok(())
    }
}

/// Runs the CLI in a cleaned environment (see [`CLEANED`]) with the per-user cache in
/// `cache` and the variables `env`.
pub fn run(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Ran> {
    let mut cmd = stackvault_tests::sv_command();
    cmd.arg("--quiet").args(args).env("XDG_CACHE_HOME", cache);
    for v in CLEANED {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Ran::from(
        cmd.output()
            .with_context(|| format!("run stackvault {args:?}"))?,
    ))
}

/// Starts Azurite; `None` (after saying why) when it is not installed and this is not CI.
pub fn azurite() -> Result<Option<Azurite>> {
    if !azurite_bin().exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!(
                "{} missing under CI=true: run .ci/azurite.sh",
                azurite_bin().display()
            );
        }
        eprintln!("SKIP: Azurite not installed; run .ci/azurite.sh to enable these tests");
        return Ok(None);
    }
    Azurite::start().map(Some)
}

/// Azurite's blob endpoint for the account, on `port`.
pub fn azure_endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}/{ACCOUNT}")
}

/// A Shared Key backend on `location` of the Azurite on `port` (test setup and damage).
pub fn azure_backend(port: u16, location: &str) -> Result<AzureBlobBackend> {
    let options = AzureStoreOptions {
        endpoint: Some(azure_endpoint(port)),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(KEY.into()))
    };
    Ok(AzureBlobBackend::open(location, &options)?)
}

/// The first object under `prefix` of `b`.
fn first_object(b: &dyn Backend, prefix: &str) -> Result<String> {
    b.list(prefix)?
        .into_iter()
        .next()
        .with_context(|| format!("no object under {prefix}"))
}

#[test]
fn unknown_schemes_and_urls_are_usage_errors_naming_the_accepted_forms() -> Result<()> {
    let cache = tempfile::tempdir()?;
    for repo in [
        "foo://x",
        "https://acct.blob.core.windows.net/vault",
        "s3:bucket",
    ] {
        for command in ["snapshots", "init"] {
            let r = run(cache.path(), &["-r", repo, command], &[])?;
            r.fails(2, &["s3://BUCKET"], &[])?;
            // `init` adds what it was doing as a second line.
            let lines = if command == "init" { 2 } else { 1 };
            ensure!(
                r.stderr.trim().lines().count() == lines,
                "not one line: {}",
                r.stderr
            );
        }
    }
    // Nothing was created under those names.
    ensure!(!Path::new("foo:").exists() && !Path::new("s3:bucket").exists());
    Ok(())
}

#[test]
fn missing_credentials_are_usage_errors_naming_the_variables() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let r = run(
        cache.path(),
        &[
            "-r",
            "azure://acct/vault",
            "--endpoint",
            "http://127.0.0.1:9/acct",
            "snapshots",
        ],
        &[],
    )?;
    r.fails(2, &["no credential", "AZURE_STORAGE_KEY"], &[])?;
    let r = run(
        cache.path(),
        &[
            "-r",
            "s3://bucket/p",
            "--endpoint",
            "http://127.0.0.1:9",
            "snapshots",
        ],
        &[],
    )?;
    r.fails(2, &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], &[])?;
    Ok(())
}

#[test]
fn azure_bad_input_and_objects_deleted_behind_the_repository() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let ep = azure_endpoint(az.port);
    let key = [("AZURE_STORAGE_KEY", KEY)];
    let wrong = [("AZURE_STORAGE_KEY", WRONG_KEY)];
    let repo = "azure://devstoreaccount1/vault/erp";
    azure_backend(az.port, repo)?.create_container()?;

    // A container that does not exist.
    let r = run(
        &cache,
        &[
            "-r",
            "azure://devstoreaccount1/nosuch/x",
            "--endpoint",
            &ep,
            "init",
        ],
        &key,
    )?;
    r.fails(1, &["container does not exist"], &[KEY])?;
    let r = run(
        &cache,
        &["-r", "azure://devstoreaccount1/nosuch/x", "snapshots"],
        &key,
    )?;
    r.fails(1, &["container does not exist"], &[KEY])?;

    // An empty location is not a repository.
    let r = run(&cache, &["-r", repo, "--endpoint", &ep, "snapshots"], &key)?;
    r.fails(1, &["is not a stackvault repository"], &[KEY])?;

    run(&cache, &["-r", repo, "init"], &key)?.ok("init")?;
    // A wrong key: 403, what to check, and neither key shown.
    let r = run(&cache, &["-r", repo, "snapshots"], &wrong)?;
    r.fails(1, &["403", "AZURE_STORAGE_KEY"], &[KEY, WRONG_KEY])?;

    let disk = dir.path().join("d.img");
    make_disk(&disk, 6 << 20, 3)?;
    run(
        &cache,
        &["-r", repo, "backup", p(&disk), "--disk", "d"],
        &key,
    )?
    .ok("backup")?;

    // A pack deleted: check names it (exit 3), restore fails naming it (exit 3).
    let b = azure_backend(az.port, repo)?;
    let pack = first_object(&b, "packs/")?;
    let pack_name = pack.rsplit('/').next().unwrap_or(&pack).to_string();
    b.remove(&pack)?;
    let r = run(&cache, &["-r", repo, "check"], &key)?;
    r.fails(3, &[&pack_name[..16]], &[KEY])?;
    let out = dir.path().join("out.img");
    let r = run(
        &cache,
        &["-r", repo, "restore", "latest", p(&out), "--force"],
        &key,
    )?;
    r.fails(3, &[&pack_name[..16]], &[KEY])?;

    // The config deleted: not a repository (any more), whatever the cache remembers.
    b.remove("config")?;
    let r = run(&cache, &["-r", repo, "snapshots"], &key)?;
    r.fails(1, &["is not a stackvault repository"], &[KEY])?;
    Ok(())
}

#[test]
fn s3_bad_input_missing_bucket_and_wrong_secret() -> Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    let cache = tempfile::tempdir()?;
    let ep = moto.endpoint();
    let good = [
        ("AWS_ACCESS_KEY_ID", moto.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key.as_str()),
        ("AWS_REGION", "us-east-1"),
    ];
    let r = run(
        cache.path(),
        &["-r", "s3://nosuch/p", "--endpoint", &ep, "init"],
        &good,
    )?;
    r.fails(1, &["bucket"], &[&moto.secret_access_key])?;
    ensure!(
        r.stderr.contains("does not exist") || r.stderr.contains("NoSuchBucket"),
        "{}",
        r.stderr
    );
    moto.backend("s3://vault/erp")?;
    let wrong_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let wrong = [
        ("AWS_ACCESS_KEY_ID", moto.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", wrong_secret),
        ("AWS_REGION", "us-east-1"),
    ];
    let r = run(
        cache.path(),
        &["-r", "s3://vault/erp", "--endpoint", &ep, "init"],
        &wrong,
    )?;
    r.fails(1, &["403"], &[wrong_secret, &moto.secret_access_key])?;
    Ok(())
}

#[test]
fn a_read_and_list_sas_reads_everything_and_refuses_to_write() -> Result<()> {
    let Some(az) = azurite()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let writer_cache = dir.path().join("writer");
    let reader_cache = dir.path().join("reader");
    let ep = azure_endpoint(az.port);
    let key = [("AZURE_STORAGE_KEY", KEY)];
    let repo = "azure://devstoreaccount1/rovault/erp";
    azure_backend(az.port, repo)?.create_container()?;
    run(
        &writer_cache,
        &["-r", repo, "--endpoint", &ep, "init"],
        &key,
    )?
    .ok("init")?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 6 << 20, 5)?;
    run(
        &writer_cache,
        &["-r", repo, "backup", p(&disk), "--disk", "d"],
        &key,
    )?
    .ok("backup 1")?;
    stackvault_tests::scribble_disk(&disk, 40, 6)?;
    run(
        &writer_cache,
        &["-r", repo, "backup", p(&disk), "--disk", "d"],
        &key,
    )?
    .ok("backup 2")?;

    let sas = SharedKey::new(ACCOUNT, KEY)?.account_sas("rl", "2099-01-01T00:00:00Z");
    let sig = sas
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .context("SAS without sig")?
        .to_string();
    let ro = [("AZURE_STORAGE_SAS_TOKEN", sas.as_str())];
    let secrets = [KEY, sig.as_str()];
    // A fresh host (its own cache): reads work, with and without --read-only.
    for flag in [&["--read-only"][..], &[][..]] {
        let cmd = |args: &[&str]| -> Result<Ran> {
            let mut all = vec!["-r", repo, "--endpoint", &ep];
            all.extend_from_slice(flag);
            all.extend_from_slice(args);
            let r = run(&reader_cache, &all, &ro)?;
            r.no_secret(&secrets)?;
            Ok(r)
        };
        let list = cmd(&["snapshots", "--json"])?.ok("snapshots")?;
        let v: serde_json::Value = serde_json::from_str(&list.stdout)?;
        let ids: Vec<String> = v["snapshots"]
            .as_array()
            .context("snapshot list")?
            .iter()
            .filter_map(|s| s["snapshot_id"].as_str().map(str::to_owned))
            .collect();
        ensure!(ids.len() == 2, "{ids:?}");
        let out = dir.path().join("out.img");
        cmd(&["restore", "latest", p(&out), "--force"])?.ok("restore")?;
        ensure!(same_bytes(&out, &disk)?, "the restore differs");
        cmd(&["verify", "latest", "--no-record"])?.ok("verify")?;
        cmd(&["check"])?.ok("check")?;
        cmd(&["diff", &ids[0], &ids[1]])?.ok("diff")?;
        cmd(&["stats"])?.ok("stats")?;
        // Writing commands refuse, saying why, and leave the store as it was.
        let r = cmd(&["backup", p(&disk), "--disk", "d"])?;
        ensure!(r.code != Some(0), "backup with a read-only SAS succeeded");
        ensure!(
            r.stderr.contains("read-only") || r.stderr.contains("403"),
            "{}",
            r.stderr
        );
        ensure!(r.stderr.trim().lines().count() <= 2, "{}", r.stderr);
        let r = cmd(&["prune"])?;
        ensure!(r.code != Some(0), "prune with a read-only SAS succeeded");
    }
    Ok(())
}
