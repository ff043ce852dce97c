//! `check` and `prune` on remote repositories (moto, Azurite), through the command line:
//! check compares the index deltas with the packs (a delta missing for a pack a snapshot needs,
//! a delta that disagrees with its pack: damage, exit 3; a delta without a pack: listed, a
//! warning once older than the grace period); prune condemns and later deletes deltas without
//! a pack like packs, and `prune --dry-run` prints the two-phase plan. And a backup SIGKILLed
//! midway: it leaves only unreferenced objects, the next backup works beside them, `check`
//! passes (the orphans within the grace period are normal), and two prunes a grace period
//! apart remove them.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};
use stackvault_tests::{azurite_bin, in_ci, p, same_bytes, sv_command, Azurite, Disk};

use crate::moto::Moto;

const MIB: u64 = 1 << 20;
const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret).
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A repository on a running server: its location, endpoint, the credentials for the CLI's
/// environment, and a backend on the same location for inspecting and tampering.
pub(crate) struct Remote {
    pub location: String,
    pub endpoint: String,
    pub env: Vec<(&'static str, String)>,
    pub objects: Box<dyn Backend>,
    pub cache: tempfile::TempDir,
}

impl Remote {
    pub(crate) fn s3(moto: &Moto, bucket: &str) -> Result<Remote> {
        let objects = moto.backend(&format!("s3://{bucket}/repo"))?;
        Ok(Remote {
            location: format!("s3://{bucket}/repo"),
            endpoint: moto.endpoint(),
            env: vec![
                ("AWS_ACCESS_KEY_ID", moto.access_key_id.clone()),
                ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key.clone()),
                ("AWS_REGION", "us-east-1".into()),
            ],
            objects: Box::new(objects),
            cache: tempfile::tempdir()?,
        })
    }

    pub(crate) fn azure(azurite: &Azurite, container: &str) -> Result<Remote> {
        let endpoint = format!("http://127.0.0.1:{}/{ACCOUNT}", azurite.port);
        let options = AzureStoreOptions {
            endpoint: Some(endpoint.clone()),
            ..AzureStoreOptions::new(AzureCredential::SharedKey(KEY.into()))
        };
        AzureBlobBackend::open(&format!("azure://{ACCOUNT}/{container}"), &options)?
            .create_container()?;
        let location = format!("azure://{ACCOUNT}/{container}/repo");
        Ok(Remote {
            objects: Box::new(AzureBlobBackend::open(&location, &options)?),
            location,
            endpoint,
            env: vec![("AZURE_STORAGE_KEY", KEY.into())],
            cache: tempfile::tempdir()?,
        })
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        // The suite's password and cheap test KDF: repositories are encrypted by default.
        let mut cmd = sv_command();
        cmd.arg("--quiet")
            .arg("--endpoint")
            .arg(&self.endpoint)
            .args(args)
            .env("XDG_CACHE_HOME", self.cache.path())
            .env_remove("STACKVAULT_REPOSITORY")
            .env_remove("STACKVAULT_ENDPOINT");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `args` (the location is inserted after the subcommand) with `--json`.
    pub(crate) fn run_json(&self, args: &[&str]) -> Result<(Option<i32>, Value, String)> {
        let mut all = vec![args[0], self.location.as_str()];
        all.extend_from_slice(&args[1..]);
        all.push("--json");
        let out: Output = self
            .command(&all)
            .output()
            .with_context(|| format!("run {all:?}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let doc = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        Ok((out.status.code(), doc, format!("{stdout}{stderr}")))
    }

    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        let (code, doc, out) = self.run_json(args)?;
        ensure!(code == Some(0), "{args:?} exited {code:?}: {out}");
        Ok(doc)
    }

    /// Backs up `disk` as disk `d`; returns the snapshot id.
    pub(crate) fn backup(&self, disk: &std::path::Path) -> Result<String> {
        let report = self.json(&["backup", stackvault_tests::p(disk), "--disk", "d"])?;
        Ok(report["snapshot_id"]
            .as_str()
            .context("no snapshot id")?
            .to_string())
    }

    /// Restores snapshot `id` into `dir` and checks the restore is `disk` byte for byte.
    pub(crate) fn assert_restores(
        &self,
        id: &str,
        dir: &std::path::Path,
        disk: &std::path::Path,
    ) -> Result<()> {
        let out = dir.join("r.img");
        self.json(&["restore", id, stackvault_tests::p(&out), "--force"])?;
        ensure!(
            stackvault_tests::same_bytes(&out, disk)?,
            "the restore differs from the disk"
        );
        Ok(())
    }

    pub(crate) fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = self.objects.list(prefix)?;
        keys.sort();
        Ok(keys)
    }

    /// Rewrites every condemnation record as if written long ago (a test cannot wait out the
    /// grace period and the clock skew allowed).
    fn age_records(&self) -> Result<()> {
        for key in self.keys("condemned/")? {
            let mut body: Value = serde_json::from_slice(&self.objects.get(&key)?)?;
            body["time"] = Value::String("2020-01-01T00:00:00Z".into());
            self.objects.remove(&key)?;
            self.objects.put(&key, &serde_json::to_vec(&body)?)?;
        }
        Ok(())
    }
}

pub(crate) fn moto() -> Option<Moto> {
    Moto::start_unchecked()
}

pub(crate) fn azurite() -> Result<Option<Azurite>> {
    if !azurite_bin().exists() {
        ensure!(
            !in_ci(),
            "{} missing under CI=true: run .ci/azurite.sh",
            azurite_bin().display()
        );
        eprintln!("SKIP: Azurite not installed; run .ci/azurite.sh to enable this test");
        return Ok(None);
    }
    Azurite::start().map(Some)
}

fn kinds(check: &Value) -> Vec<String> {
    check["damage"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn check_compares_deltas_with_packs_and_prune_removes_orphan_deltas() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let r = Remote::s3(&moto, "deltas")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("a.img");
    Disk::random(24 * MIB, 5).write(&disk)?;
    // The delta is edited in place below: a plain repository, so its bytes are the format's.
    r.json(&["init", "--encryption", "none"])?;
    r.json(&["backup", p(&disk), "--disk", "a"])?;
    let clean = r.json(&["check"])?;
    ensure!(
        clean["ok"] == true && clean["deltas"].as_u64() >= Some(2),
        "{clean}"
    );
    let deltas = r.keys("index/")?;
    let first = deltas.first().context("no delta")?.clone();

    // A delta whose table disagrees with its pack: one chunk id byte changed, every
    // checksum made right again, so it decodes. (Version 2: the table, zstd-compressed,
    // follows the 56 bytes of fields and the 24 of the nonce.)
    let good = r.objects.get(&first)?;
    let table_end = good.len() - 4;
    let count = u32::from_le_bytes(good[48..52].try_into()?) as usize;
    let mut table = zstd::bulk::decompress(&good[80..table_end], count * 64)?;
    table[0] ^= 0xff;
    let mut bad = good[..80].to_vec();
    bad[52..56].copy_from_slice(&crc32fast::hash(&table).to_le_bytes());
    bad.extend_from_slice(&zstd::bulk::compress(&table, 3)?);
    let crc = crc32fast::hash(&bad);
    bad.extend_from_slice(&crc.to_le_bytes());
    r.objects.remove(&first)?;
    r.objects.put(&first, &bad)?;
    let (code, doc, out) = r.run_json(&["check"])?;
    ensure!(
        code == Some(3),
        "a wrong delta must be damage (exit 3): {out}"
    );
    ensure!(kinds(&doc) == ["delta-mismatch"], "{out}");
    ensure!(
        out.contains(&first) && out.contains("delete the object"),
        "{out}"
    );

    // A snapshot's pack without its delta, seen with read-only access (a writable open
    // writes the missing delta back from the pack).
    r.objects.remove(&first)?;
    let mut args = vec!["--read-only", "check"];
    args.insert(2, &r.location);
    args.push("--json");
    let out = r.command(&args).output()?;
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    ensure!(
        out.status.code() == Some(3),
        "{doc} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(kinds(&doc) == ["delta-missing"], "{doc}");
    // A writable open puts it back, equal to the original.
    let healed = r.json(&["check"])?;
    ensure!(healed["ok"] == true, "{healed}");
    ensure!(
        r.objects.get(&first)? == good,
        "the rewritten delta differs"
    );

    // A (damaged) delta without a pack: listed, not damage; a warning once older than the
    // grace period.
    let orphan = "index/ab/ab0123456789abcdef0123456789abcd".to_string();
    r.objects.put(&orphan, b"a delta whose pack is gone")?;
    let young = r.json(&["check"])?;
    ensure!(young["ok"] == true, "{young}");
    ensure!(
        young["orphan_deltas"][0]["key"] == orphan.as_str(),
        "{young}"
    );
    ensure!(young["orphan_deltas"][0]["overdue"] == false, "{young}");
    ensure!(
        young["warnings"].as_array().is_some_and(Vec::is_empty),
        "{young}"
    );
    let old = r.json(&["check", "--grace", "0"])?;
    ensure!(
        old["ok"] == true && old["orphan_deltas"][0]["overdue"] == true,
        "{old}"
    );
    ensure!(
        old["warnings"].to_string().contains("prune` removes it"),
        "{old}"
    );

    // Prune: the dry run plans its condemnation, the first prune condemns it, the dry run
    // then says when it becomes deletable, and a prune after the grace period deletes it.
    let plan = r.json(&["prune", "--dry-run", "--grace", "0"])?;
    ensure!(
        plan["plan"]["condemn"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["why"] == "orphan-delta")),
        "{plan}"
    );
    ensure!(r.keys("condemned/")?.is_empty(), "a dry run wrote a record");
    let (code, first_prune, said) = r.run_json(&["prune", "--grace", "0"])?;
    ensure!(code == Some(0), "{said}");
    ensure!(first_prune["orphan_deltas_condemned"] == 1, "{first_prune}");
    ensure!(
        said.contains("warning: --grace 0 s is shorter than the lock lease (300 s)"),
        "a grace period shorter than the lease went without a warning: {said}"
    );
    ensure!(r.objects.exists(&orphan)?, "condemned is not deleted");
    let waiting = r.json(&["prune", "--dry-run"])?;
    let w = &waiting["plan"]["waiting"];
    ensure!(
        w.as_array().is_some_and(|w| w.len() == 1) && w[0]["deletable_after"].is_string(),
        "{waiting}"
    );
    r.age_records()?;
    let ripe = r.json(&["prune", "--dry-run", "--grace", "0"])?;
    ensure!(ripe["plan"]["delete_now"][0]["object"] == "delta", "{ripe}");
    ensure!(r.objects.exists(&orphan)?, "a dry run deleted");
    let second_prune = r.json(&["prune", "--grace", "0"])?;
    ensure!(second_prune["orphan_deltas_deleted"] == 1, "{second_prune}");
    ensure!(
        !r.objects.exists(&orphan)?,
        "the orphan delta is still there"
    );
    ensure!(
        r.keys("condemned/")?.is_empty(),
        "the record was not removed"
    );
    let after = r.json(&["check", "--grace", "0"])?;
    ensure!(
        after["ok"] == true && after["orphan_deltas"] == serde_json::json!([]),
        "{after}"
    );
    Ok(())
}

/// A backup of a 48 MiB disk SIGKILLed after at least one of its packs is stored.
fn kill_backup_midway(r: &Remote, disk: &Path) -> Result<()> {
    let packs_before = r.keys("packs/")?.len();
    let mut args = vec!["--quiet", "--endpoint", &r.endpoint, "backup", &r.location];
    args.extend([p(disk), "--disk", "big"]);
    let mut env: Vec<(&str, &str)> = r.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cache = r.cache.path().to_string_lossy().into_owned();
    env.push(("XDG_CACHE_HOME", &cache));
    // `pause_at` adds `--quiet` itself.
    let paused = stackvault_tests::pause_at(&args[1..], &env, "backup-segment:10")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while r.keys("packs/")?.len() <= packs_before {
        if std::time::Instant::now() > deadline {
            bail!("the paused backup stored no pack within a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    paused.kill()
}

fn killed_backup_leaves_only_orphans(r: &Remote) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let small = dir.path().join("small.img");
    let big = dir.path().join("big.img");
    let other = dir.path().join("other.img");
    Disk::random(8 * MIB, 11).write(&small)?;
    Disk::random(48 * MIB, 12).write(&big)?;
    Disk::random(8 * MIB, 13).write(&other)?;
    // Plain: the test stands in for the clock by rewriting the condemnation records' JSON
    // (`age_records`), which sealed records do not allow.
    r.json(&["init", "--encryption", "none"])?;
    let s0 = r.json(&["backup", p(&small), "--disk", "small"])?;
    let snapshots_before = r.keys("snapshots/")?;
    let packs_before = r.keys("packs/")?;

    kill_backup_midway(r, &big)?;
    // Only unreferenced objects: no manifest, packs with their deltas.
    ensure!(
        r.keys("snapshots/")? == snapshots_before,
        "a manifest appeared"
    );
    let left: Vec<String> = r
        .keys("packs/")?
        .into_iter()
        .filter(|k| !packs_before.contains(k))
        .collect();
    ensure!(!left.is_empty(), "the killed backup stored no pack");

    // Check passes: the orphans are within the grace period (a backup may be in flight).
    let check = r.json(&["check"])?;
    ensure!(check["ok"] == true, "{check}");
    ensure!(
        check["orphans"].as_array().map(Vec::len) >= Some(1),
        "the killed backup's packs are orphans: {check}"
    );
    ensure!(
        check["warnings"].as_array().is_some_and(Vec::is_empty),
        "{check}"
    );

    // The next backup works beside them and restores.
    let s1 = r.json(&["backup", p(&other), "--disk", "other"])?;
    let restored = dir.path().join("restored.img");
    let id = s1["snapshot_id"].as_str().context("no snapshot id")?;
    r.json(&["restore", id, p(&restored), "--force"])?;
    ensure!(same_bytes(&restored, &other)?, "restore differs");

    // Prune condemns them (the dry run says so first), and after the grace period deletes.
    let plan = r.json(&["prune", "--dry-run", "--grace", "0"])?;
    let planned = plan["plan"]["condemn"].to_string();
    for key in &left {
        let name = key.rsplit('/').next().unwrap_or_default();
        ensure!(planned.contains(name), "{name} not in the plan: {plan}");
    }
    r.json(&["prune", "--grace", "0"])?;
    r.age_records()?;
    let pruned = r.json(&["prune", "--grace", "0"])?;
    ensure!(
        pruned["packs_deleted"].as_u64() >= Some(left.len() as u64),
        "{pruned}"
    );
    let now = r.keys("packs/")?;
    ensure!(left.iter().all(|k| !now.contains(k)), "orphan packs remain");
    let deltas = r.keys("index/")?;
    ensure!(
        left.iter().all(|k| !deltas
            .iter()
            .any(|d| d.ends_with(k.rsplit('/').next().unwrap_or("-")))),
        "their deltas remain"
    );
    let check = r.json(&["check", "--grace", "0"])?;
    ensure!(check["ok"] == true, "{check}");
    ensure!(check["orphans"] == serde_json::json!([]), "{check}");
    ensure!(
        check["warnings"].as_array().is_some_and(Vec::is_empty),
        "{check}"
    );
    let id0 = s0["snapshot_id"].as_str().context("no snapshot id")?;
    r.json(&["restore", id0, p(&restored), "--force"])?;
    ensure!(
        same_bytes(&restored, &small)?,
        "restore of the first snapshot differs"
    );
    Ok(())
}

#[test]
fn a_backup_killed_midway_on_s3_leaves_only_orphans_that_prune_removes() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    killed_backup_leaves_only_orphans(&Remote::s3(&moto, "killed")?)
}

#[test]
fn a_backup_killed_midway_on_azure_leaves_only_orphans_that_prune_removes() -> Result<()> {
    let Some(azurite) = azurite()? else {
        return Ok(());
    };
    killed_backup_leaves_only_orphans(&Remote::azure(&azurite, "killed")?)
}
