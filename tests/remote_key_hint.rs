//! The key hint of a remote repository (`crypto::unlock::KeyHint`): once a host has opened a
//! repository, its next open asks for the password and derives the wrapping key while it reads
//! the config and the key objects, not after them. The hint holds no secret, and a stale or
//! edited one only costs a derivation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use stackvault_tests::TEST_PASSWORD;

use crate::faultproxy::FaultProxy;
use crate::remote_maintain::{azurite, Remote};

/// The hint files under a host's cache.
fn hint_files(cache: &Path) -> Result<Vec<PathBuf>> {
    let dir = cache.join("stackvault").join("locations");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".key.json") {
            files.push(path);
        }
    }
    Ok(files)
}

/// What the proxy saw when the key object's GET arrived, while armed.
const UNARMED: u8 = 0;
const ARMED: u8 = 1;
const ASKED_BEFORE: u8 = 2;
const NOT_ASKED: u8 = 3;

#[test]
fn a_second_open_asks_and_derives_while_the_key_object_is_read() -> Result<()> {
    let Some(az) = azurite()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let asked = dir.path().join("asked");
    let state = Arc::new(AtomicU8::new(UNARMED));
    // While armed, the key object's GET (not its listing) waits until the password has been
    // asked for (the password command leaves `asked`), 10 s at most, and records which.
    let proxy = {
        let (asked, state) = (asked.clone(), state.clone());
        FaultProxy::start(az.port, move |r| {
            let key_get = r.method == "GET"
                && r.target.contains("/repo/keys/")
                && !r.target.contains("comp=list");
            if key_get && state.load(Ordering::SeqCst) == ARMED {
                let until = Instant::now() + Duration::from_secs(10);
                while !asked.exists() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let seen = if asked.exists() {
                    ASKED_BEFORE
                } else {
                    NOT_ASKED
                };
                state.store(seen, Ordering::SeqCst);
            }
            None
        })?
    };
    let mut remote = Remote::azure(&az, "hint")?;
    remote.endpoint = format!("{}/devstoreaccount1", proxy.endpoint());
    remote.json(&["init"])?;
    // The first open after init unlocks as without a hint, and remembers one.
    remote.json(&["snapshots"])?;
    let hints = hint_files(remote.cache.path())?;
    ensure!(hints.len() == 1, "{hints:?}");
    let hint: serde_json::Value = serde_json::from_slice(&std::fs::read(&hints[0])?)?;
    let mut fields: Vec<&str> = hint
        .as_object()
        .context("hint is not an object")?
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    ensure!(fields == ["key", "m_kib", "p", "salt", "t"], "{hint}");
    let text = std::fs::read_to_string(&hints[0])?;
    ensure!(!text.contains(TEST_PASSWORD), "the password is in the hint");
    let key = hint["key"].as_str().context("key id")?;
    ensure!(
        remote.keys("keys/")? == [format!("keys/{key}")],
        "the hint names another key: {hint}"
    );

    state.store(ARMED, Ordering::SeqCst);
    let script = format!(
        "touch '{}'; printf '%s\\n' '{TEST_PASSWORD}'",
        asked.display()
    );
    let out = remote
        .command(&["--password-command", &script, "snapshots", &remote.location])
        .env_remove("STACKVAULT_PASSWORD")
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        state.load(Ordering::SeqCst) == ASKED_BEFORE,
        "the password was not asked for (nor the key derived) before the key object's GET \
         was answered"
    );

    // An edited hint (another salt) derives a key that fits no key object: the open derives
    // again from the key object, and the hint is written again as it should be.
    let mut edited = hint.clone();
    edited["salt"] = serde_json::Value::String("00".repeat(16));
    std::fs::write(&hints[0], serde_json::to_vec(&edited)?)?;
    remote.json(&["snapshots"])?;
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&hints[0])?)?;
    ensure!(again == hint, "{again} after an edited hint, was {hint}");
    // A wrong password is still refused with the hint in place.
    let wrong = remote
        .command(&["snapshots", &remote.location])
        .env("STACKVAULT_PASSWORD", "not the password")
        .output()?;
    ensure!(
        !wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("password"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    Ok(())
}
