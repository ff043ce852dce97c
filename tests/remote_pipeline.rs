//! A restore from object storage keeps its link busy across windows: the GETs of the disk's
//! later windows go out while an earlier window is still being fetched (and then written),
//! instead of each window waiting for its slowest span before the next one is asked for.
//!
//! Through a proxy that holds back the restore's first pack GET for a while, on a disk whose
//! first window holds a single span (a little data, then zeros) and whose later windows hold
//! many: a restore that fetches window by window sends no other pack GET until the held one
//! is answered and its window written; a pipelined one keeps fetching the later windows
//! meanwhile. The restore is still byte-identical.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use stackvault_tests::Disk;

use crate::faultproxy::{Fault, FaultProxy};
use crate::remote_maintain::{moto, Remote};

const MIB: u64 = 1 << 20;
/// How long the first pack GET is held back.
const HELD: Duration = Duration::from_secs(3);

/// 1 MiB of random data, zeros up to 32 MiB (past the first window of any window size up to
/// 32 MiB), then 40 MiB of random data (three 18 MiB packs in all): the first window needs one
/// span of one pack, the rest needs several spans per window.
fn first_window_small(path: &std::path::Path) -> Result<()> {
    let mut bytes = Disk::random(MIB, 31).bytes()?;
    bytes.resize(32 * MIB as usize, 0);
    bytes.extend_from_slice(&Disk::random(40 * MIB, 32).bytes()?);
    std::fs::write(path, &bytes).with_context(|| format!("write {}", path.display()))
}

#[test]
fn a_remote_restore_fetches_later_windows_while_an_earlier_span_is_slow() -> Result<()> {
    let Some(moto) = moto() else { return Ok(()) };
    let mut r = Remote::s3(&moto, "pipeline")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.img");
    first_window_small(&disk)?;
    r.json(&["init"])?;
    let id = r.backup(&disk)?;

    // Arrival time and target of every ranged GET of a pack; the first one is held back.
    let arrivals: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let held = Arc::new(AtomicBool::new(false));
    let (log, once) = (arrivals.clone(), held.clone());
    let proxy = FaultProxy::start(moto.port, move |req| {
        let pack_range =
            req.method == "GET" && req.target.contains("/packs/") && req.header("range").is_some();
        if !pack_range {
            return None;
        }
        if let Ok(mut log) = log.lock() {
            log.push((Instant::now(), req.target.to_string()));
        }
        (!once.swap(true, Ordering::SeqCst)).then_some(Fault::Delay(HELD))
    })?;
    r.endpoint = proxy.endpoint();

    r.assert_restores(&id, dir.path(), &disk)?;

    let arrivals = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("arrival log poisoned"))?
        .clone();
    let (first, first_target) = arrivals.first().context("the restore sent no pack GET")?;
    // GETs that arrived while the first was held (with a margin for a slow machine).
    let meanwhile: Vec<&String> = arrivals
        .iter()
        .skip(1)
        .filter(|(at, _)| at.duration_since(*first) < HELD - Duration::from_millis(500))
        .map(|(_, target)| target)
        .collect();
    eprintln!(
        "{} pack GETs in all, {} while {first_target} was held",
        arrivals.len(),
        meanwhile.len()
    );
    // A pack is one streamed GET now (three packs here): every other one must go out while
    // the first is held.
    ensure!(
        arrivals.len() >= 3 && meanwhile.len() + 1 == arrivals.len(),
        "only {} of {} pack GETs went out while the first was held for {HELD:?}: the restore \
         waits for a window's slowest span before fetching the next windows",
        meanwhile.len(),
        arrivals.len()
    );
    Ok(())
}
