//! Prune on a shared store: two-phase deletion with a grace period (`format-spec/locks.md`,
//! "Prune on a shared store"). Hosts are `Repo` handles with their own caches on one
//! in-memory store; a backup is held right before its manifest by a gate in its handle's
//! backend while another host prunes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use stackvault::prune::PruneOptions;
use stackvault::store::{Backend, MemoryBackend};
use stackvault::NoProgress;
use stackvault_tests::{backup_with_engine, make_disk, restores_to, SharedStore, Watched, Watcher};

const LOCATION: &str = "memory://shared-prune";

/// Watches a handle on the shared objects: once armed, it stops the second listing of
/// `condemned/` it sees (a backup's re-check before its manifest), reports on `reached` and
/// waits for `resume`.
#[derive(Default)]
struct GateWatch(Mutex<Option<Gate>>);

/// The backing-up host's handle, with its gate.
type Gated = Watched<GateWatch>;

struct Gate {
    listings: u32,
    reached: Sender<()>,
    resume: Receiver<()>,
}

impl GateWatch {
    fn stop_before_manifest(&self) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached) = channel();
        let (resume, resume_rx) = channel();
        if let Ok(mut g) = self.0.lock() {
            *g = Some(Gate {
                listings: 0,
                reached: reached_tx,
                resume: resume_rx,
            });
        }
        (reached, resume)
    }
}

impl Watcher for GateWatch {
    fn listing(&self, prefix: &str) {
        if prefix == "condemned/" {
            let mut gate = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(g) = gate.as_mut() {
                g.listings += 1;
                if g.listings == 2 {
                    let _ = g.reached.send(());
                    let _ = g.resume.recv();
                    *gate = None;
                }
            }
        }
    }
}

fn pack_names(store: &MemoryBackend) -> Result<HashSet<String>> {
    Ok(store
        .list("packs/")?
        .iter()
        .filter_map(|k| k.rsplit('/').next().map(str::to_string))
        .collect())
}

/// Makes every condemnation record look written `secs` seconds ago, as the passing of time
/// would (the records are immutable to stackvault; the test stands in for the clock).
fn age_records(store: &MemoryBackend, secs: u64) -> Result<()> {
    for key in store.list("condemned/")? {
        let mut body: serde_json::Value = serde_json::from_slice(&store.get(&key)?)?;
        let then = stackvault::maintain::forget::now_utc() - std::time::Duration::from_secs(secs);
        body["time"] = stackvault::host::rfc3339(then).into();
        store.remove(&key)?;
        store.put(&key, &serde_json::to_vec(&body)?)?;
    }
    Ok(())
}

#[test]
fn a_backup_during_a_prune_keeps_its_data_and_a_prune_after_the_grace_period_frees_it() -> Result<()>
{
    let shared = SharedStore::init(MemoryBackend::new(), LOCATION)?;
    let (d, objects) = (shared.path(), &shared.store);
    let gated: Arc<Gated> = Arc::new(Watched {
        objects: objects.clone(),
        watcher: GateWatch::default(),
    });
    let pruner = shared.host("a")?;
    let backer = shared.host_via(gated.clone(), "b")?;
    let disk: PathBuf = d.join("web01.img");
    make_disk(&disk, 12 << 20, 5)?;

    // A snapshot, then forgotten: its packs are unreferenced.
    let first = backup_with_engine(&pruner, &disk, "web01")?;
    let first_packs = pack_names(objects)?;
    assert!(!first_packs.is_empty());
    stackvault::maintain::forget::forget(&pruner, std::slice::from_ref(&first.snapshot_id), false)?;

    // Another host backs up the same disk: it deduplicates against those packs, and is held
    // right before its manifest while a prune condemns them.
    let (reached, resume) = gated.watcher.stop_before_manifest();
    let (second, pruned) = std::thread::scope(|s| {
        let b = s.spawn(|| backup_with_engine(&backer, &disk, "web01"));
        let pruned = reached.recv().map_err(anyhow::Error::from).and_then(|()| {
            Ok(stackvault::prune(
                &pruner,
                &PruneOptions::default(),
                &NoProgress,
            )?)
        });
        let _ = resume.send(());
        (b.join(), pruned)
    });
    let Ok(second) = second else {
        anyhow::bail!("the backup thread panicked");
    };
    let pruned = pruned?;
    assert!(pruned.two_phase);
    assert_eq!(pruned.packs_deleted, 0, "{pruned:?}");
    assert_eq!(
        pruned.packs_condemned,
        first_packs.len() as u64,
        "{pruned:?}"
    );
    let second = second?;
    assert_eq!(
        second.stats.new_chunks, 0,
        "it deduplicated: {:?}",
        second.stats
    );
    // Every pack condemned is still there, and the new snapshot restores.
    assert!(pack_names(objects)?.is_superset(&first_packs));
    assert!(restores_to(
        &backer,
        &second.snapshot_id,
        &disk,
        &d.join("b1.img")
    )?);

    // Within the grace period, nothing goes.
    let early = stackvault::prune(&pruner, &PruneOptions::default(), &NoProgress)?;
    assert_eq!(early.packs_deleted, 0, "{early:?}");
    assert_eq!(
        early.condemned_waiting,
        first_packs.len() as u64,
        "{early:?}"
    );
    assert!(pack_names(objects)?.is_superset(&first_packs));

    // After it, the condemned packs go (the snapshot's chunks were copied out of them by
    // the backup), their deltas first, and so does the record.
    let grace = PruneOptions::default().grace.as_secs();
    age_records(objects, grace + 31)?;
    let late = stackvault::prune(&pruner, &PruneOptions::default(), &NoProgress)?;
    assert_eq!(late.packs_deleted, first_packs.len() as u64, "{late:?}");
    assert_eq!(late.condemnation_records_removed, 1, "{late:?}");
    let left = pack_names(objects)?;
    assert!(left.is_disjoint(&first_packs), "{left:?}");
    for name in &first_packs {
        assert!(!objects.exists(&format!("index/{}/{name}", &name[..2]))?);
    }
    assert!(objects.list("condemned/")?.is_empty());

    // The snapshot restores byte for byte, on both hosts and on a new one.
    assert!(restores_to(
        &pruner,
        &second.snapshot_id,
        &disk,
        &d.join("a.img")
    )?);
    assert!(restores_to(
        &backer,
        &second.snapshot_id,
        &disk,
        &d.join("b2.img")
    )?);
    let third = shared.host("c")?;
    assert!(restores_to(
        &third,
        &second.snapshot_id,
        &disk,
        &d.join("c.img")
    )?);
    Ok(())
}
