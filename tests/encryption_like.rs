//! Shared naming keys between encrypted repositories (`init --like`, issue 15): the copy
//! shares the source's naming secret and seals with its own, so `copy` keeps snapshot and
//! chunk ids, sends only what is missing (a second copy sends nothing), restores byte for
//! byte, and the next backup into the copy deduplicates against it, locally and onto S3; a
//! damaged source frame fails its snapshot only; `plan run`'s off-site copy keeps VM snapshot
//! ids; a key object of the source opens nothing of the copy; between a plain and an
//! encrypted repository `--like` says that ids cannot be shared; key objects of version 1
//! keep opening to the keys they always gave, and version 2 ones (naming and sealing secret)
//! have a known-answer vector.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use stackvault::crypto::keyfile::{KdfParams, KeyObject, KeyParts, KEY_VERSION};
use stackvault::crypto::{ObjectAd, ObjectKind, Protection, RepoKeys, RepoSecrets};
use stackvault_tests::{
    assert_restores, backup_disk, make_disk, outcome, p, scribble_disk, snapshot_ids, sv_as_typed,
    sv_json, sv_json_ok, sv_ok, Disk,
};

const MIB: u64 = 1 << 20;

/// Runs `copy --from src --to dst [extra]` with `--json`; fails unless it exits 0.
fn copy(src: &Path, dst: &Path, extra: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["copy", "--from", p(src), "--to", p(dst)];
    args.extend_from_slice(extra);
    sv_json_ok(&args)
}

fn ids(v: &serde_json::Value, field: &str) -> Vec<String> {
    v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s[field].as_str().map(str::to_owned))
        .collect()
}

/// Every file under `dir/keys`.
fn key_files(repo: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(repo.join("keys"))? {
        out.push(e?.path());
    }
    Ok(out)
}

#[test]
fn a_copy_into_an_encrypted_like_repository_keeps_ids_and_sends_only_what_is_missing() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    sv_ok(&["init", p(&src)])?;
    let like = sv_json_ok(&["init", p(&dst), "--like", p(&src)])?;
    ensure!(like["encrypted"] == true, "{like:#}");
    ensure!(like["shares_naming_with"] == p(&src), "{like:#}");
    let src_keys = sv_json_ok(&["key", "list", "-r", p(&src)])?;
    let dst_keys = sv_json_ok(&["key", "list", "-r", p(&dst)])?;
    ensure!(src_keys != dst_keys, "{src_keys:#} {dst_keys:#}");
    ensure!(
        dst_keys["keys"][0]["key_object_version"] == 2,
        "{dst_keys:#}"
    );

    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_disk(&a, 12 * MIB, 3)?;
    make_disk(&b, 9 * MIB + 4096, 40)?;
    let a0 = dir.path().join("a0.img");
    fs::copy(&a, &a0)?;
    let a0_id = backup_disk(&src, &a, "a")?;
    let b_id = backup_disk(&src, &b, "b")?;
    scribble_disk(&a, 10, 5)?;
    let a1_id = backup_disk(&src, &a, "a")?;

    let v = copy(&src, &dst, &[])?;
    ensure!(v["rechunked"] == false, "{v:#}");
    ensure!(v["snapshots_copied"] == 3, "{v:#}");
    ensure!(snapshot_ids(&dst)? == snapshot_ids(&src)?);
    ensure!(ids(&v, "destination_snapshot_id") == ids(&v, "snapshot_id"));
    let (code, src_check, stderr) = sv_json(&["check", p(&src), "--read-data"])?;
    ensure!(code == Some(0), "{stderr}");
    ensure!(
        v["chunks_sent"] == src_check["chunks"],
        "{v:#} {src_check:#}"
    );
    let (code, dst_check, stderr) = sv_json(&["check", p(&dst), "--read-data"])?;
    ensure!(
        code == Some(0) && dst_check["ok"] == true,
        "{stderr} {dst_check:#}"
    );
    ensure!(dst_check["chunks"] == src_check["chunks"]);
    for (id, disk) in [(&a0_id, &a0), (&b_id, &b), (&a1_id, &a)] {
        assert_restores(&dst, id, disk)?;
    }

    // Again: nothing new to send.
    let again = copy(&src, &dst, &[])?;
    ensure!(again["snapshots_skipped"] == 3, "{again:#}");
    ensure!(again["chunks_sent"] == 0, "{again:#}");
    ensure!(again["packs_written"] == 0, "{again:#}");
    ensure!(again["written_bytes"] == 0, "{again:#}");

    // A new snapshot at the source: only its new chunks travel.
    scribble_disk(&a, 4, 6)?;
    let a2_id = backup_disk(&src, &a, "a")?;
    let (_, shown, _) = sv_json(&["show", p(&src), &a2_id])?;
    let one = copy(&src, &dst, &["--disk", "a", "latest"])?;
    ensure!(one["snapshots_copied"] == 1, "{one:#}");
    ensure!(ids(&one, "destination_snapshot_id") == vec![a2_id.clone()]);
    ensure!(
        one["chunks_sent"] == shown["stats"]["new_chunks"],
        "{one:#} {shown:#}"
    );
    assert_restores(&dst, &a2_id, &a)?;

    // The copy cuts and names chunks as the source does: backing the same disk up into it
    // stores nothing new.
    let direct = sv_json_ok(&["backup", p(&dst), p(&a), "--disk", "a2"])?;
    ensure!(direct["stats"]["new_chunks"] == 0, "{direct:#}");
    Ok(())
}

#[test]
fn a_key_object_of_the_source_opens_nothing_of_the_copy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    sv_ok(&["init", p(&src)])?;
    sv_ok(&["init", p(&dst), "--like", p(&src)])?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 4 * MIB, 9)?;
    backup_disk(&src, &disk, "d")?;
    copy(&src, &dst, &[])?;
    // The same password opens both; replace the copy's key object by the source's.
    for k in key_files(&dst)? {
        fs::remove_file(k)?;
    }
    for k in key_files(&src)? {
        let name = k.file_name().context("key name")?;
        fs::copy(&k, dst.join("keys").join(name))?;
    }
    let out = sv_as_typed(&["snapshots", p(&dst)], &[])?;
    let (code, stdout, stderr) = outcome(&out);
    ensure!(code == Some(3), "{code:?} {stdout} {stderr}");
    ensure!(
        stderr.contains("belongs to repository") && stderr.contains("copied from another"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn like_between_plain_and_encrypted_says_ids_cannot_be_shared() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (plain, sealed) = (dir.path().join("plain"), dir.path().join("sealed"));
    sv_ok(&["init", p(&plain), "--encryption", "none"])?;
    sv_ok(&["init", p(&sealed)])?;
    for (from, to, extra) in [
        (&plain, dir.path().join("a"), None),
        (&sealed, dir.path().join("b"), Some("none")),
    ] {
        let mut args = vec!["init", p(&to), "--like", p(from), "--json"];
        if let Some(mode) = extra {
            args.extend(["--encryption", mode]);
        }
        let out = sv_as_typed(&args, &[])?;
        let (code, stdout, stderr) = outcome(&out);
        ensure!(code == Some(0), "{stdout} {stderr}");
        ensure!(
            stderr.contains("cannot share") && stderr.contains("re-chunks"),
            "{stderr}"
        );
        let v: serde_json::Value = serde_json::from_str(&stdout)?;
        ensure!(v["shares_naming_with"].is_null(), "{v:#}");
        // And a copy still works, re-chunking.
        let disk = dir.path().join(format!("{}.img", v["repository_id"]));
        make_disk(&disk, 2 * MIB, 4)?;
        let id = backup_disk(from, &disk, "d")?;
        let c = copy(from, &to, &[&id])?;
        ensure!(c["rechunked"] == true, "{c:#}");
    }
    Ok(())
}

/// `init --like` onto an object store (S3, Moto): the new remote repository shares the local
/// one's naming keys, a copy into it keeps the snapshot id and restores byte for byte.
#[test]
fn a_like_repository_on_s3_shares_naming_and_keeps_ids() -> Result<()> {
    let Some(moto) = crate::remote_maintain::moto() else {
        return Ok(());
    };
    let s3 = crate::remote_maintain::Remote::s3(&moto, "like")?;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src");
    sv_ok(&["init", p(&src)])?;
    let disk = dir.path().join("d.img");
    make_disk(&disk, 6 * MIB, 12)?;
    let id = backup_disk(&src, &disk, "d")?;
    let like = s3.json(&["init", "--like", p(&src)])?;
    ensure!(like["shares_naming_with"] == p(&src), "{like:#}");
    let out = s3
        .command(&["copy", "--from", p(&src), "--to", &s3.location, "--json"])
        .output()?;
    let (code, stdout, stderr) = outcome(&out);
    ensure!(code == Some(0), "{stdout} {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        v["rechunked"] == false && v["snapshots_copied"] == 1,
        "{v:#}"
    );
    ensure!(
        ids(&v, "destination_snapshot_id") == vec![id.clone()],
        "{v:#}"
    );
    let restored = dir.path().join("restored.img");
    s3.json(&["restore", &id, p(&restored), "--force"])?;
    ensure!(stackvault_tests::same_bytes(&restored, &disk)?);
    Ok(())
}

/// A frame of the source that fails authentication fails the copy of its snapshot only (exit
/// 3): the copy opens every frame it seals again, it does not pass sealed bytes along blindly.
#[test]
fn a_damaged_frame_of_the_source_fails_only_its_snapshot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    sv_ok(&["init", p(&src)])?;
    sv_ok(&["init", p(&dst), "--like", p(&src)])?;
    let packs = |repo: &Path| -> Result<BTreeSet<PathBuf>> {
        let mut out = BTreeSet::new();
        for sub in fs::read_dir(repo.join("packs"))? {
            for f in fs::read_dir(sub?.path())? {
                out.insert(f?.path());
            }
        }
        Ok(out)
    };
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    Disk::random(4 * MIB, 1).write(&a)?;
    Disk::random(4 * MIB, 2).write(&b)?;
    let a_id = backup_disk(&src, &a, "a")?;
    let a_packs = packs(&src)?;
    let b_id = backup_disk(&src, &b, "b")?;
    // Flip a byte inside the first sealed frame of a's only pack.
    let damaged = a_packs.iter().next().context("a pack of disk a")?;
    let mut bytes = fs::read(damaged)?;
    bytes[1000] ^= 0x55;
    fs::write(damaged, bytes)?;

    let (code, v, stderr) = sv_json(&["copy", "--from", p(&src), "--to", p(&dst)])?;
    ensure!(code == Some(3), "damage is exit 3: {stderr} {v:#}");
    ensure!(stderr.contains("authentication failed"), "{stderr}");
    ensure!(v["rechunked"] == false, "{v:#}");
    ensure!(
        v["snapshots_failed"] == 1 && v["snapshots_copied"] == 1,
        "{v:#}"
    );
    ensure!(snapshot_ids(&dst)? == vec![b_id.clone()]);
    ensure!(!snapshot_ids(&dst)?.contains(&a_id));
    assert_restores(&dst, &b_id, &b)?;
    Ok(())
}

/// `plan run`'s off-site copy into a `--like` repository: disk snapshots and VM snapshot
/// records keep their ids there (the records are sealed again, not re-encoded or renamed).
#[test]
fn an_offsite_copy_keeps_vm_snapshot_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (repo, offsite) = (dir.path().join("repo"), dir.path().join("offsite"));
    let disk = dir.path().join("vm1-os.raw");
    make_disk(&disk, 3 * MIB, 7)?;
    sv_ok(&["init", p(&repo)])?;
    sv_ok(&["init", p(&offsite), "--like", p(&repo)])?;
    let plan = dir.path().join("plans.toml");
    fs::write(
        &plan,
        format!(
            "[repository]\nlocation = \"{}\"\n\n[copy]\nlocation = \"{}\"\n\n\
             [[application]]\nname = \"app\"\nrpo = \"24h\"\nrto = \"1h\"\n\n  \
             [[application.vm]]\n  name = \"vm1\"\n    [[application.vm.disk]]\n    \
             name = \"os\"\n    path = \"{}\"\n",
            p(&repo),
            p(&offsite),
            p(&disk)
        ),
    )?;
    let run = sv_json_ok(&["plan", "run", p(&plan)])?;
    ensure!(run["failures"] == 0, "{run:#}");
    let listed = |r: &Path| -> Result<Vec<(String, String)>> {
        let v = sv_json_ok(&["vm-snapshots", p(r)])?;
        Ok(v["vm_snapshots"]
            .as_array()
            .context("vm_snapshots")?
            .iter()
            .map(|u| {
                (
                    u["id"].as_str().unwrap_or_default().to_string(),
                    u["disks"][0]["snapshot_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect())
    };
    let (here, there) = (listed(&repo)?, listed(&offsite)?);
    ensure!(here.len() == 1 && !here[0].0.is_empty(), "{here:?}");
    ensure!(here == there, "{here:?} {there:?}");
    Ok(())
}

// Key objects: version 1 (one master secret) still opens; version 2 has a vector.

const PASSWORD: &[u8] = b"correct horse battery staple";

fn unwrap_hex(text: &str) -> Vec<u8> {
    let digits: String = text.lines().filter(|l| !l.starts_with('#')).collect();
    stackvault::format::unhex(&digits).unwrap_or_default()
}

fn wrap_hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|c| stackvault::format::hex(c) + "\n")
        .collect()
}

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors")
}

/// The fixed random parts of the key objects in `format-spec/encryption.md`'s test vectors.
pub(crate) const VECTOR_KEY_PARTS: KeyParts<'static> = KeyParts {
    kdf: KdfParams::INSECURE_TEST,
    id: [0xa5; 16],
    salt: [0x5a; 16],
    nonce: [0x3c; 24],
    created_unix: 1_764_460_800,
    host: "vector-host",
    label: "vector",
};

/// The version 2 vector: naming secret 32 × 0x42 (the version 1 vector's master secret),
/// sealing secret 32 × 0x24, repository id 16 × 0x11, and the version 1 vector's other
/// fields (`format-spec/encryption.md`, "Test vectors").
fn key_vector_v2() -> Result<KeyObject> {
    Ok(KeyObject::wrap_with(
        &RepoSecrets::from_parts([0x42; 32], [0x24; 32]),
        [0x11; 16],
        PASSWORD,
        &VECTOR_KEY_PARTS,
    )?)
}

#[test]
fn key_objects_of_both_versions_open_to_the_keys_they_wrap() -> Result<()> {
    let path = vectors().join("encryption-key-object-v2.hex");
    let made = wrap_hex(&key_vector_v2()?.encode());
    if std::env::var_os("STACKVAULT_UPDATE_VECTORS").is_some() {
        fs::write(&path, &made)?;
    }
    let text = fs::read_to_string(&path).context("read encryption-key-object-v2.hex")?;
    ensure!(
        text == made,
        "encryption-key-object-v2.hex differs from the code"
    );

    // The committed version 2 bytes open to both secrets.
    let v2 = KeyObject::decode(&unwrap_hex(&text), "v2")?;
    ensure!(v2.version == KEY_VERSION && v2.repository == Some([0x11; 16]));
    let s2 = v2.unwrap(PASSWORD, "v2")?.context("the vector password")?;
    ensure!(!s2.is_single() && *s2.naming() == [0x42; 32] && *s2.sealing() == [0x24; 32]);
    ensure!(v2.unwrap(b"Correct horse battery staple", "v2")?.is_none());

    // The committed version 1 bytes (written before the split) open to one secret whose keys
    // are the ones it always derived: they open the committed sealed vector.
    let v1 = KeyObject::decode(
        &unwrap_hex(&fs::read_to_string(
            vectors().join("encryption-key-object.hex"),
        )?),
        "v1",
    )?;
    ensure!(v1.version == 1 && v1.repository.is_none());
    let s1 = v1.unwrap(PASSWORD, "v1")?.context("the vector password")?;
    ensure!(s1.is_single());
    let k1 = Protection::Encrypted(Box::new(RepoKeys::from_secrets(&s1)));
    let k2 = Protection::Encrypted(Box::new(RepoKeys::from_secrets(&s2)));
    let sealed_text = fs::read_to_string(vectors().join("encryption-sealed.hex"))?;
    let (sealed, id) = sealed_text
        .split_once("# keyed chunk id")
        .context("two parts")?;
    let ad = ObjectAd {
        kind: ObjectKind::Manifest,
        name: "00ff",
        part: 0,
    };
    let plaintext = k1.open(&ad, &unwrap_hex(sealed), "vector", 0)?;
    ensure!(plaintext == b"hello, sealed world");
    let id: String = id.lines().skip(1).collect();
    ensure!(k1.chunk_id(&plaintext).to_hex() == id);
    // The version 2 key shares the version 1 key's naming secret, not its sealing secret.
    ensure!(k2.chunk_id(&plaintext).to_hex() == id);
    ensure!(k2.open(&ad, &unwrap_hex(sealed), "vector", 0).is_err());

    // A newer version is refused, saying what to do.
    let mut newer = unwrap_hex(&text);
    newer[8..12].copy_from_slice(&(KEY_VERSION + 1).to_le_bytes());
    let e = KeyObject::decode(&newer, "keys/x")
        .err()
        .context("refused")?;
    ensure!(e.to_string().contains("upgrade stackvault"), "{e}");
    ensure!(matches!(e, stackvault::Error::UnsupportedVersion { .. }));
    Ok(())
}
