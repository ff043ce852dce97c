//! `restore-vm` into a blob container (issue 17): every disk of a VM snapshot becomes an
//! Azure-ready fixed VHD page blob `VM-DISK.vhd` in the container, against a real Azurite.

use anyhow::{ensure, Context, Result};
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault_tests::{make_disk, p, sv_env, sv_json_ok, sv_ok, Azurite};

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const KEY_VAR: &str = "SV_VM_BLOBS_TEST_AZURITE_KEY";
const MIB: u64 = 1 << 20;

fn client(port: u16, blob: &str) -> Result<BlobClient> {
    Ok(BlobClient::new(
        &format!("azure://{ACCOUNT}/restored/{blob}"),
        &BlobOptions {
            endpoint: Some(format!("http://127.0.0.1:{port}/{ACCOUNT}")),
            account_key: Some(KEY.into()),
            ..Default::default()
        },
    )?)
}

#[test]
fn restore_vm_into_a_container_writes_one_azure_ready_page_blob_per_disk() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    sv_ok(&["init", "-r", p(&repo)])?;
    let mut disks = Vec::new();
    for (i, name) in ["os", "data1"].iter().enumerate() {
        let path = dir.path().join(format!("{name}.img"));
        // Whole MiB, as a disk restored for Azure is: the blob is the disk plus its footer.
        make_disk(&path, (3 + i as u64) * MIB, 70 + i)?;
        disks.push((name.to_string(), path));
    }
    let specs: Vec<String> = disks
        .iter()
        .map(|(n, path)| format!("{n}={}", p(path)))
        .collect();
    let mut args = vec!["backup-vm", "-r", p(&repo), "--vm", "app01"];
    args.extend(specs.iter().map(String::as_str));
    sv_json_ok(&args)?;
    client(az.port, "x")?.create_container()?;

    let endpoint = format!("http://127.0.0.1:{}/{ACCOUNT}", az.port);
    let container = format!("azure://{ACCOUNT}/restored");
    let restore = [
        "restore-vm",
        "-r",
        p(&repo),
        "--vm",
        "app01",
        "latest",
        &container,
        "--endpoint",
        &endpoint,
        "--account-key-env",
        KEY_VAR,
        "--json",
    ];
    let out = sv_env(&restore, &[(KEY_VAR, KEY)])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!stdout.contains(KEY), "the key leaked: {stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        report["disks"].as_array().map(Vec::len) == Some(2),
        "{report:#}"
    );

    for (name, path) in &disks {
        let expected = std::fs::read(path)?;
        let blob = client(az.port, &format!("app01-{name}.vhd"))?;
        let size = blob
            .properties()?
            .with_context(|| format!("no page blob for disk {name}"))?
            .size;
        ensure!(
            size == expected.len() as u64 + 512,
            "blob of {name}: {size} bytes for a disk of {}",
            expected.len()
        );
        let mut bytes = vec![0u8; size as usize];
        blob.read_range(0, &mut bytes, None)?;
        ensure!(
            bytes[..expected.len()] == expected[..],
            "disk {name} differs"
        );
        ensure!(
            &bytes[expected.len()..][..8] == b"conectix",
            "no VHD footer on {name}"
        );
    }

    // A second restore into the same container needs --force; then it succeeds.
    let again = sv_env(&restore, &[(KEY_VAR, KEY)])?;
    ensure!(
        !again.status.success(),
        "the blobs were overwritten without --force"
    );
    let mut forced = restore.to_vec();
    forced.push("--force");
    let out = sv_env(&forced, &[(KEY_VAR, KEY)])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
