//! `verify --target` of a page blob, against Azurite through the fault proxy (used here only
//! to watch the requests): the blob is read through the shared page blob reader, which asks
//! Get Page Ranges one window at a time (never the whole disk at once, so memory does not
//! grow with the disk) and fetches only written pages; a page changed behind our back is
//! found (exit 5).

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use stackvault::azure::sign::SharedKey;
use stackvault::azure::{BlobClient, BlobOptions};
use stackvault_tests::{p, sv_env, sv_json, Azurite, Fixture};

use crate::faultproxy::FaultProxy;

const MIB: u64 = 1 << 20;
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Bytes that do not repeat (so they neither compress to nothing nor dedup).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn verify_target_reads_a_page_blob_window_by_window_and_catches_a_changed_page(
) -> anyhow::Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    // Every Get Page Ranges the verify sends, with the range it asks for.
    let asked: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let log = asked.clone();
    let proxy = FaultProxy::start(az.port, move |r| {
        if r.target.contains("comp=pagelist") {
            if let Ok(mut l) = log.lock() {
                l.push(r.header("x-ms-range").map(str::to_string));
            }
        }
        None
    })?;
    let direct = format!("http://127.0.0.1:{}/{ACCOUNT}", az.port);
    let key_options = BlobOptions {
        endpoint: Some(direct.clone()),
        account_key: Some(KEY.into()),
        ..Default::default()
    };
    let blob = BlobClient::new(&format!("azure://{ACCOUNT}/vhds/vm.vhd"), &key_options)?;
    blob.create_container()?;

    // A sparse 40 MiB disk: data at the start, one sector in the middle, the last page.
    let f = Fixture::new()?;
    let disk = f.path("vm.img");
    let file = fs::File::create(&disk)?;
    file.set_len(40 * MIB)?;
    file.write_all_at(&noise(MIB as usize + 4096, 1), 0)?;
    file.write_all_at(&noise(512, 2), 17 * MIB + 512)?;
    file.write_all_at(&noise(4096, 3), 40 * MIB - 4096)?;
    let snapshot = f.backup(&disk, "vm")?;
    let repo = f.repo();
    let sas = SharedKey::new(ACCOUNT, KEY)?.account_sas("racwdl", "2099-01-01T00:00:00Z");
    let (code, _, stderr) = sv_json(&[
        "restore",
        p(&repo),
        &snapshot,
        &format!("{direct}/vhds/vm.vhd?{sas}"),
    ])?;
    anyhow::ensure!(code == Some(0), "restore to the blob: {stderr}");

    let through_proxy = format!("http://127.0.0.1:{}/{ACCOUNT}", proxy.port);
    let verify = || {
        sv_env(
            &[
                "verify",
                p(&repo),
                &snapshot,
                "--target",
                &format!("azure://{ACCOUNT}/vhds/vm.vhd"),
                "--endpoint",
                &through_proxy,
                "--account-key-env",
                "VERIFY_TEST_KEY",
                "--json",
            ],
            &[("VERIFY_TEST_KEY", KEY)],
        )
    };
    let out = verify()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["outcome"], "ok", "{report:#}");

    // Page ranges were asked window by window: none covers more than one 4 MiB segment.
    let ranges = asked.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(ranges.len() >= 10, "{ranges:?}");
    for r in &ranges {
        let (first, last) = r
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("Get Page Ranges without a range: {r:?}"))?;
        assert!(last - first < 4 * MIB, "a page list of {r:?}");
    }

    // A page changed behind our back is found, at its offset.
    blob.put_pages(30 * MIB, &[0x77; 512])?;
    let out = verify()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(out.status.code(), Some(5), "{report:#}");
    assert_eq!(report["outcome"], "differs", "{report:#}");
    assert_eq!(report["problems"][0]["offset"], 30 * MIB, "{report:#}");
    Ok(())
}
