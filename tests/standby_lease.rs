//! The lease of a page blob standby over time, against Azurite: a sync that lasts longer
//! than its lease keeps the blob leased (its renewals, not luck, keep other writers out) and
//! still completes; `standby status` shows the lease as the service reports it and says whose
//! it is: the running sync's, a dead sync's (the record names host and pid), or another
//! writer's.
//!
//! The lease is shortened to the service's least, 15 s (renewed every 5 s), by the `testing`
//! build's `STACKVAULT_TEST_LEASE_SECONDS`; the sync waits at the pause hook for
//! `STACKVAULT_PAUSE_SECONDS` and then goes on by itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use stackvault_tests::{p, pause_at, sv};

use crate::standby_pageblob::{gen0_synced, status, sync, verify_target, Standby};

const MIB: u64 = 1 << 20;

#[test]
fn a_sync_longer_than_its_lease_renews_it_and_completes() -> anyhow::Result<()> {
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let (f, _gen0, gen1) = gen0_synced(&az, 16 * MIB, 31)?;
    let repo = f.repo();
    let repo = p(&repo);
    let url = az.url("vm.vhd");

    let args = [
        "standby", "sync", "-r", repo, "--disk", "vm", &url, "--verify", "100%",
    ];
    let lease_seconds = 15;
    let mut running = pause_at(
        &args,
        &[
            ("RAYON_NUM_THREADS", "1"),
            ("STACKVAULT_TEST_LEASE_SECONDS", "15"),
            // Longer than the lease: without a renewal it would lapse during the pause.
            ("STACKVAULT_PAUSE_SECONDS", "24"),
        ],
        "standby-segment:1",
    )?;
    // The lease was taken before the pause began, so this is past its first term.
    let paused = Instant::now();
    let st = status(&url)?;
    assert_eq!(
        (
            st["lease"]["state"].as_str(),
            st["lease"]["duration"].as_str(),
            st["lease"]["holder"].as_str()
        ),
        (Some("leased"), Some("fixed"), Some("running-sync")),
        "{st:#}"
    );
    std::thread::sleep(Duration::from_secs(lease_seconds + 4).saturating_sub(paused.elapsed()));
    anyhow::ensure!(
        running.child.try_wait()?.is_none(),
        "the sync ended before the lease's first term was over"
    );
    let other = az.client("vm.vhd")?;
    match other.put_pages(0, &[0u8; 512]) {
        Err(stackvault::Error::Http { status: 412, .. }) => {}
        other => bail!(
            "{} s into a sync with a {lease_seconds} s lease, a write without the lease was not \
             refused (the lease was not renewed): {other:?}",
            paused.elapsed().as_secs()
        ),
    }
    let st = status(&url)?;
    assert_eq!(st["lease"]["state"], "leased", "{st:#}");

    let exit = running.child.wait()?;
    assert!(exit.success(), "the sync failed after its pause: {exit}");
    let st = status(&url)?;
    assert_eq!(
        (
            st["state"].as_str(),
            st["snapshot_id"].as_str(),
            st["lease"]["state"].as_str(),
            &st["lease"]["holder"]
        ),
        (
            Some("clean"),
            Some(gen1.as_str()),
            Some("available"),
            &serde_json::Value::Null
        ),
        "{st:#}"
    );
    verify_target(repo, &gen1, &url)?;
    Ok(())
}

#[test]
fn standby_status_says_whose_lease_the_blob_holds() -> anyhow::Result<()> {
    let Some(az) = Standby::start()? else {
        return Ok(());
    };
    let (f, _gen0, gen1) = gen0_synced(&az, 8 * MIB, 32)?;
    let repo = f.repo();
    let repo = p(&repo);
    let url = az.url("vm.vhd");
    let st = status(&url)?;
    assert_eq!(
        (
            st["lease"]["state"].as_str(),
            st["lease"]["status"].as_str(),
            &st["lease"]["holder"]
        ),
        (
            Some("available"),
            Some("unlocked"),
            &serde_json::Value::Null
        ),
        "{st:#}"
    );

    // A sync that dies holding the lease: status names it, from the record's host and pid.
    let args = ["standby", "sync", "-r", repo, "--disk", "vm", &url];
    let running = pause_at(&args, &[("RAYON_NUM_THREADS", "1")], "standby-segment:1")?;
    let pid = running.child.id();
    running.kill()?;
    let st = status(&url)?;
    assert_eq!(
        (
            st["lease"]["state"].as_str(),
            st["lease"]["status"].as_str(),
            st["lease"]["duration"].as_str(),
            st["lease"]["holder"].as_str(),
            st["lease"]["pid"].as_u64(),
            st["lease"]["host"].as_str(),
        ),
        (
            Some("leased"),
            Some("locked"),
            Some("fixed"),
            Some("dead-sync"),
            Some(u64::from(pid)),
            Some(stackvault::host::hostname().as_str()),
        ),
        "{st:#}"
    );
    let out = sv(&["standby", "status", &url])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lease leased (locked, fixed)")
            && text.contains(&format!("no longer running (pid {pid} on host")),
        "{text}"
    );

    // The next sync breaks that lease and releases its own at the end.
    sync(repo, &url)?;
    verify_target(repo, &gen1, &url)?;
    let st = status(&url)?;
    assert_eq!(st["lease"]["state"], "available", "{st:#}");

    // A lease that no sync of ours holds (the record is clean) is someone else's.
    let other = az.client("vm.vhd")?;
    anyhow::ensure!(other.acquire_lease()?, "the test could not lease the blob");
    let st = status(&url)?;
    assert_eq!(
        (st["lease"]["holder"].as_str(), &st["lease"]["pid"]),
        (Some("other"), &serde_json::Value::Null),
        "{st:#}"
    );
    let text = String::from_utf8_lossy(&sv(&["standby", "status", &url])?.stdout).into_owned();
    assert!(text.contains("not a standby sync"), "{text}");
    other.release_lease()?;
    Ok(())
}
