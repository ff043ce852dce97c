//! Encryption at rest, the key side (issue 15): passwords, key objects, unlock, `key …`
//! commands, `--encryption none`, on local, S3 (moto) and Azure (Azurite) repositories; and the
//! known-answer vectors of `format-spec/encryption.md`.
//!
//! Every command runs the real binary. The runners give it `STACKVAULT_PASSWORD` (the suite's
//! [`TEST_PASSWORD`]) and the cheap test KDF; tests that need another password pass it in the
//! environment or a file, which wins.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use stackvault::crypto::keyfile::{KdfParams, KeyObject};
use stackvault::crypto::{MasterSecret, ObjectAd, ObjectKind, Protection, RepoKeys, RepoSecrets};
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};
use stackvault_tests::{
    azurite_bin, in_ci, make_disk, p, sv, sv_as_typed, sv_command, sv_env, sv_json_ok, sv_ok,
    Azurite, Fixture, TEST_PASSWORD,
};

use crate::moto::Moto;

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn key_files(repo: &Path) -> Result<Vec<PathBuf>> {
    files(&repo.join("keys"))
}

/// An encrypted repository (the default) with one backup of a small disk.
fn repo_with_backup(f: &Fixture) -> Result<(String, String)> {
    let repo = f.path("r");
    sv_ok(&["init", "-r", p(&repo)])?;
    let disk = f.path("d.img");
    make_disk(&disk, 2 << 20, 5)?;
    let report = sv_json_ok(&["backup", "-r", p(&repo), p(&disk), "--disk", "d"])?;
    let id = report["snapshot_id"]
        .as_str()
        .context("backup report has a snapshot_id")?
        .to_string();
    Ok((p(&repo).to_string(), id))
}

#[test]
fn init_encrypts_by_default_and_records_the_feature_and_one_key() -> Result<()> {
    let f = Fixture::new()?;
    let v = sv_json_ok(&["init", "-r", p(&f.path("r"))])?;
    ensure!(v["encrypted"] == true, "{v:#}");
    let keys = key_files(&f.path("r"))?;
    ensure!(keys.len() == 1, "{keys:?}");
    let key_id = v["key_id"].as_str().context("key_id")?;
    ensure!(keys[0].ends_with(key_id), "{keys:?} vs {key_id}");
    let config = stackvault::RepoConfig::decode(&std::fs::read(f.path("r").join("config"))?, "c")?;
    ensure!(config.is_encrypted());
    ensure!(config.features.names().contains(&"encryption".to_string()));
    Ok(())
}

#[test]
fn a_wrong_password_exits_7_before_any_work() -> Result<()> {
    let f = Fixture::new()?;
    let (repo, _) = repo_with_backup(&f)?;
    // Without its index, opening would rebuild it: a wrong password must stop before that.
    std::fs::remove_file(f.path("r").join("index.sqlite"))?;
    let before = files(&f.path("r"))?;
    for args in [
        vec!["snapshots", "-r", &repo],
        vec!["check", "-r", &repo],
        vec!["key", "list", "-r", &repo],
    ] {
        let out = sv_env(&args, &[("STACKVAULT_PASSWORD", "not the password")])?;
        ensure!(code(&out) == Some(7), "{args:?}: {out:?}");
        let err = stderr(&out);
        ensure!(
            err.contains("wrong password") && err.matches("error:").count() == 1,
            "{err}"
        );
        ensure!(
            !err.contains("not the password"),
            "the password is echoed: {err}"
        );
    }
    let disk = f.path("d.img");
    let out = sv_env(
        &["backup", "-r", &repo, p(&disk), "--disk", "d"],
        &[("STACKVAULT_PASSWORD", "nope")],
    )?;
    ensure!(code(&out) == Some(7), "{out:?}");
    ensure!(
        files(&f.path("r"))? == before,
        "a wrong password changed the repository"
    );
    // The right one still works (and rebuilds the index).
    sv_ok(&["snapshots", "-r", &repo])?;
    Ok(())
}

#[test]
fn passwd_changes_the_password_without_touching_data() -> Result<()> {
    let f = Fixture::new()?;
    let (repo, snapshot) = repo_with_backup(&f)?;
    let data_before: Vec<_> = files(&f.path("r").join("packs"))?
        .into_iter()
        .chain(files(&f.path("r").join("snapshots"))?)
        .map(|p| std::fs::read(&p).map(|b| (p, b)))
        .collect::<std::io::Result<_>>()?;
    let old_keys = key_files(&f.path("r"))?;
    let out = sv_env(
        &["key", "passwd", "-r", &repo, "--json"],
        &[("STACKVAULT_NEW_PASSWORD", "the new one")],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["removed_key_id"] != v["new_key_id"], "{v:#}");
    let new_keys = key_files(&f.path("r"))?;
    ensure!(new_keys.len() == 1 && new_keys != old_keys, "{new_keys:?}");
    let old = sv(&["snapshots", "-r", &repo])?;
    ensure!(
        code(&old) == Some(7),
        "the old password still opens: {old:?}"
    );
    let new = sv_env(
        &["snapshots", "-r", &repo],
        &[("STACKVAULT_PASSWORD", "the new one")],
    )?;
    ensure!(new.status.success(), "{new:?}");
    ensure!(String::from_utf8_lossy(&new.stdout).contains(&snapshot[..12]));
    for (path, bytes) in data_before {
        ensure!(
            std::fs::read(&path)? == bytes,
            "{} was rewritten",
            path.display()
        );
    }
    Ok(())
}

#[test]
fn keys_are_added_listed_and_removed_but_never_the_last() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.path("r");
    let repo = p(&repo);
    sv_ok(&["init", "-r", repo])?;
    let second = f.path("second.pw");
    std::fs::write(&second, "second password\n")?;
    let added = sv_json_ok(&[
        "key",
        "add",
        "-r",
        repo,
        "--label",
        "backup admin",
        "--new-password-file",
        p(&second),
    ])?;
    let list = sv_json_ok(&["key", "list", "-r", repo])?;
    let keys = list["keys"].as_array().context("keys")?;
    ensure!(keys.len() == 2, "{list:#}");
    let first_id = keys
        .iter()
        .find(|k| k["id"] != added["id"])
        .and_then(|k| k["id"].as_str())
        .context("the first key")?
        .to_string();
    ensure!(
        keys.iter().any(|k| k["id"] == added["id"]
            && k["label"] == "backup admin"
            && k["in_use"] == false),
        "{list:#}"
    );
    ensure!(!list.to_string().contains(TEST_PASSWORD), "{list:#}");
    // The second password opens the repository on its own.
    let out = sv(&["--password-file", p(&second), "snapshots", "-r", repo])?;
    ensure!(out.status.success(), "{out:?}");
    // An id that is not one, and a prefix, are refused: remove takes the id list shows.
    for bad in ["0123", &first_id[..8]] {
        let out = sv(&["key", "remove", "-r", repo, bad])?;
        ensure!(code(&out) == Some(2), "{bad}: {out:?}");
    }
    // Removing the key in use is fine while another remains; then that one is the last.
    sv_ok(&["key", "remove", "-r", repo, &first_id])?;
    let out = sv(&["snapshots", "-r", repo])?;
    ensure!(
        code(&out) == Some(7),
        "the removed key still opens: {out:?}"
    );
    let added_id = added["id"].as_str().context("id")?;
    let out = sv(&[
        "--password-file",
        p(&second),
        "key",
        "remove",
        "-r",
        repo,
        added_id,
    ])?;
    ensure!(code(&out) == Some(2), "{out:?}");
    ensure!(stderr(&out).contains("last key"), "{}", stderr(&out));
    ensure!(key_files(&f.path("r"))?.len() == 1);
    Ok(())
}

#[test]
fn encryption_none_is_said_once_on_stderr_and_never_in_json() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.path("r");
    let v = sv_json_ok(&["init", "-r", p(&repo), "--encryption", "none"])?;
    ensure!(v["encrypted"] == false && v["key_id"].is_null(), "{v:#}");
    ensure!(!repo.join("keys").exists());
    let config = std::fs::read(repo.join("config"))?;
    ensure!(config[42..44] == [0, 0] && config[80] & 1 << 4 == 0);
    let out = sv_as_typed(&["snapshots", "-r", p(&repo), "--json"], &[])?;
    let err = stderr(&out);
    ensure!(out.status.success(), "{out:?}");
    ensure!(err.matches("is not encrypted").count() == 1, "{err}");
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(!doc.to_string().contains("not encrypted"));
    // An encrypted repository says nothing of the kind.
    let enc = f.path("enc");
    sv_ok(&["init", "-r", p(&enc)])?;
    let out = sv_as_typed(&["snapshots", "-r", p(&enc)], &[])?;
    ensure!(
        out.status.success() && !stderr(&out).contains("not encrypted"),
        "{out:?}"
    );
    // Plain repositories have no keys to manage.
    let out = sv(&["key", "list", "-r", p(&repo)])?;
    ensure!(code(&out) == Some(2), "{out:?}");
    Ok(())
}

#[test]
fn passwords_come_from_a_file_a_command_or_nowhere_with_a_usage_error() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.path("r");
    let pw = f.path("pw");
    std::fs::write(&pw, "from a file\n")?;
    sv_ok(&["--password-file", p(&pw), "init", "-r", p(&repo)])?;
    // The environment's password (the suite's) is not this repository's.
    let out = sv(&["snapshots", "-r", p(&repo)])?;
    ensure!(code(&out) == Some(7), "{out:?}");
    let command = format!("cat {}", p(&pw));
    let out = sv(&["snapshots", "-r", p(&repo), "--password-command", &command])?;
    ensure!(out.status.success(), "{out:?}");
    let out = sv(&["snapshots", "-r", p(&repo), "--password-command", "exit 3"])?;
    ensure!(code(&out) == Some(2), "{out:?}");
    // No password at all, and no terminal: a usage error saying how to give one.
    let out = sv_command()
        .args(["--quiet", "snapshots", "-r", p(&repo)])
        .env_remove("STACKVAULT_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output()?;
    let err = stderr(&out);
    ensure!(code(&out) == Some(2), "{out:?}");
    ensure!(
        err.contains("STACKVAULT_PASSWORD") && err.contains("--password-file"),
        "{err}"
    );
    // ...and `init` without one creates nothing.
    let empty = f.path("never");
    let out = sv_command()
        .args(["--quiet", "init", "-r", p(&empty)])
        .env_remove("STACKVAULT_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(code(&out) == Some(2) && !empty.exists(), "{out:?}");
    Ok(())
}

#[test]
fn key_objects_hold_neither_the_password_nor_the_master_secret() -> Result<()> {
    let f = Fixture::new()?;
    let (repo, _) = repo_with_backup(&f)?;
    let keys = key_files(&f.path("r"))?;
    let bytes = std::fs::read(&keys[0])?;
    let key = KeyObject::decode(&bytes, "key")?;
    let secrets = key
        .unwrap(TEST_PASSWORD.as_bytes(), "key")?
        .context("the suite's password opens the key")?;
    let (naming, sealing) = (secrets.naming(), secrets.sealing());
    for file in files(&f.path("r"))? {
        let data = std::fs::read(&file)?;
        for needle in [
            TEST_PASSWORD.as_bytes(),
            &naming[..],
            &naming[..16],
            &naming[16..],
            &sealing[..],
            &sealing[..16],
            &sealing[16..],
        ] {
            ensure!(
                !data.windows(needle.len()).any(|w| w == needle),
                "{} holds a secret",
                file.display()
            );
        }
    }
    ensure!(key.kdf == KdfParams::INSECURE_TEST, "{:?}", key.kdf);
    ensure!(key.host == stackvault::host::hostname());
    // Nor does any output.
    let out = sv(&["key", "list", "-r", &repo])?;
    ensure!(!String::from_utf8_lossy(&out.stdout).contains(TEST_PASSWORD));
    Ok(())
}

/// Unlock through a remote store: init, list keys, wrong password, right one.
fn remote_round_trip(location: &str, endpoint: &str, env: &[(&str, &str)]) -> Result<()> {
    let cache = tempfile::tempdir()?;
    let cache = p(cache.path()).to_string();
    let mut all = env.to_vec();
    all.push(("XDG_CACHE_HOME", &cache));
    let run = |args: &[&str], extra: &[(&str, &str)]| -> Result<Output> {
        let mut e = all.clone();
        e.extend_from_slice(extra);
        sv_env(args, &e)
    };
    let out = run(
        &["--endpoint", endpoint, "-r", location, "init", "--json"],
        &[],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["encrypted"] == true, "{v:#}");
    let out = run(&["-r", location, "key", "list", "--json"], &[])?;
    ensure!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(list["keys"][0]["id"] == v["key_id"], "{list:#}");
    let out = run(
        &["-r", location, "snapshots"],
        &[("STACKVAULT_PASSWORD", "wrong")],
    )?;
    ensure!(code(&out) == Some(7), "{out:?}");
    let out = run(
        &["-r", location, "key", "add"],
        &[("STACKVAULT_NEW_PASSWORD", "another")],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let out = run(
        &["-r", location, "snapshots"],
        &[("STACKVAULT_PASSWORD", "another")],
    )?;
    ensure!(out.status.success(), "{out:?}");
    Ok(())
}

#[test]
fn init_and_unlock_on_s3() -> Result<()> {
    let Some(moto) = Moto::start_unchecked() else {
        return Ok(());
    };
    moto.backend("s3://keys-bucket")?;
    let env = [
        ("AWS_ACCESS_KEY_ID", moto.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key.as_str()),
        ("AWS_REGION", "us-east-1"),
    ];
    remote_round_trip("s3://keys-bucket/repo", &moto.endpoint(), &env)?;
    let listed = moto.backend("s3://keys-bucket/repo")?.list("keys/")?;
    ensure!(listed.len() == 2, "{listed:?}");
    Ok(())
}

const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret).
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn init_and_unlock_on_azure() -> Result<()> {
    if !azurite_bin().exists() {
        ensure!(
            !in_ci(),
            "Azurite missing under CI=true: run .ci/azurite.sh"
        );
        eprintln!("SKIP: Azurite not installed; run .ci/azurite.sh to enable this test");
        return Ok(());
    }
    let azurite = Azurite::start()?;
    let endpoint = format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", azurite.port);
    let options = AzureStoreOptions {
        endpoint: Some(endpoint.clone()),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(AZURITE_KEY.into()))
    };
    let container = format!("azure://{AZURITE_ACCOUNT}/keys");
    AzureBlobBackend::open(&container, &options)?.create_container()?;
    let location = format!("{container}/repo");
    remote_round_trip(&location, &endpoint, &[("AZURE_STORAGE_KEY", AZURITE_KEY)])?;
    let listed = AzureBlobBackend::open(&location, &options)?.list("keys/")?;
    ensure!(listed.len() == 2, "{listed:?}");
    Ok(())
}

// Known-answer vectors (format-spec/encryption.md, "Test vectors").

const VECTOR_MASTER: [u8; 32] = [0x42; 32];
const VECTOR_PLAINTEXT: &[u8] = b"hello, sealed world";

fn wrap_hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|c| stackvault::format::hex(c) + "\n")
        .collect()
}

fn unwrap_hex(text: &str) -> Vec<u8> {
    let digits: String = text.lines().filter(|l| !l.starts_with('#')).collect();
    stackvault::format::unhex(&digits).unwrap_or_default()
}

fn vector_keys() -> Protection {
    Protection::Encrypted(Box::new(RepoKeys::derive(&MasterSecret::from_bytes(
        VECTOR_MASTER,
    ))))
}

const VECTOR_AD: ObjectAd<'static> = ObjectAd {
    kind: ObjectKind::Manifest,
    name: "00ff",
    part: 0,
};

fn vector_nonce() -> [u8; 24] {
    std::array::from_fn(|i| i as u8)
}

fn generate() -> Result<Vec<(&'static str, String)>> {
    let keys = vector_keys();
    let sealed = keys.seal_with_nonce(&VECTOR_AD, VECTOR_PLAINTEXT.to_vec(), vector_nonce())?;
    let id = keys.chunk_id(VECTOR_PLAINTEXT);
    // A version 1 key object (one master secret), as `init` wrote them before the naming and
    // sealing secrets were split: it must keep opening.
    let key = KeyObject::wrap_with(
        &RepoSecrets::from_master(&MasterSecret::from_bytes(VECTOR_MASTER)),
        [0; 16],
        b"correct horse battery staple",
        &crate::encryption_like::VECTOR_KEY_PARTS,
    )?;
    Ok(vec![
        (
            "encryption-sealed.hex",
            format!(
                "# nonce ‖ ciphertext ‖ tag of {:?} (kind 3, name 00ff, part 0)\n{}\
                 # keyed chunk id of the same bytes\n{}",
                String::from_utf8_lossy(VECTOR_PLAINTEXT),
                wrap_hex(&sealed),
                wrap_hex(&id.0)
            ),
        ),
        ("encryption-key-object.hex", wrap_hex(&key.encode())),
    ])
}

#[test]
fn encryption_vectors_match_the_code() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors");
    let update = std::env::var_os("STACKVAULT_UPDATE_VECTORS").is_some();
    for (name, content) in generate()? {
        let path = dir.join(name);
        if update {
            std::fs::write(&path, &content)?;
        }
        let stored = std::fs::read_to_string(&path).with_context(|| format!("read {name}"))?;
        ensure!(
            stored == content,
            "{name} differs from the code: the format changed (set STACKVAULT_UPDATE_VECTORS=1 \
             only if that is intended, and say so in format-spec)"
        );
    }
    // The committed bytes, not the code's output: they open with the fixed key and password.
    let sealed_text = std::fs::read_to_string(dir.join("encryption-sealed.hex"))?;
    let (sealed_part, id_part) = sealed_text
        .split_once("# keyed chunk id")
        .context("two parts")?;
    let sealed = unwrap_hex(sealed_part);
    ensure!(sealed[..24] == vector_nonce());
    ensure!(vector_keys().open(&VECTOR_AD, &sealed, "vector", 0)? == VECTOR_PLAINTEXT);
    let id_hex: String = id_part.lines().skip(1).collect();
    ensure!(id_hex == vector_keys().chunk_id(VECTOR_PLAINTEXT).to_hex());
    ensure!(id_hex != stackvault::ChunkId::of(VECTOR_PLAINTEXT).to_hex());
    let key_bytes = unwrap_hex(&std::fs::read_to_string(
        dir.join("encryption-key-object.hex"),
    )?);
    let key = KeyObject::decode(&key_bytes, "vector")?;
    let master = key
        .unwrap(b"correct horse battery staple", "vector")?
        .context("the vector password opens the vector key")?;
    ensure!(master.is_single() && *master.naming() == VECTOR_MASTER);
    ensure!(*master.sealing() == VECTOR_MASTER);
    ensure!(key
        .unwrap(b"Correct horse battery staple", "vector")?
        .is_none());
    Ok(())
}

#[test]
fn a_damaged_key_object_does_not_lock_out_the_other_passwords() -> Result<()> {
    let f = Fixture::new()?;
    let repo_dir = f.path("r");
    let repo = p(&repo_dir);
    sv_ok(&["init", "-r", repo])?;
    let second = f.path("second.pw");
    std::fs::write(&second, "second password\n")?;
    let added = sv_json_ok(&["key", "add", "-r", repo, "--new-password-file", p(&second)])?;
    let added_id = added["id"].as_str().context("id")?;
    let damaged = key_files(&repo_dir)?
        .into_iter()
        .find(|k| {
            k.file_name()
                .is_some_and(|n| n.to_string_lossy() == added_id)
        })
        .context("the added key's object")?;
    let mut bytes = std::fs::read(&damaged)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&damaged, &bytes)?;

    // The suite's password still opens the repository, and the damage is said.
    let out = sv_as_typed(&["snapshots", "-r", repo], &[])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(stderr(&out).contains(added_id), "{}", stderr(&out));
    // The damaged key's own password: the damage is the error (exit 3), not "wrong password".
    let out = sv(&["--password-file", p(&second), "snapshots", "-r", repo])?;
    ensure!(code(&out) == Some(3), "{}", stderr(&out));
    Ok(())
}

#[test]
fn an_encrypted_repository_refuses_fastcdc_at_init_before_asking_anything() -> Result<()> {
    let f = Fixture::new()?;
    let repo = f.path("r");
    let out = sv(&["init", "-r", p(&repo), "--chunker", "fastcdc"])?;
    ensure!(code(&out) == Some(2), "{}", stderr(&out));
    ensure!(
        stderr(&out).contains("--encryption none"),
        "{}",
        stderr(&out)
    );
    ensure!(
        !repo.join("config").exists(),
        "init left a repository behind"
    );
    sv_ok(&[
        "init",
        "-r",
        p(&repo),
        "--chunker",
        "fastcdc",
        "--encryption",
        "none",
    ])?;
    Ok(())
}
