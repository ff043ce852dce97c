//! Prune on a shared store: two-phase deletion with a grace period (`format-spec/locks.md`,
//! "Prune on a shared store"). Hosts are `Repo` handles with their own caches on one
//! in-memory store; a backup is held right before its manifest by a gate in its handle's
//! backend while another host prunes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use stackvault::prune::PruneOptions;
use stackvault::store::{Backend, MemoryBackend, ObjectInfo, ObjectWriter, Version};
use stackvault::{backup, BackupOptions, BackupReport, InitOptions, NoProgress, Repo};
use stackvault_tests::{make_disk, restores_to};

const LOCATION: &str = "memory://shared-prune";

/// A handle on the shared objects that, once armed, stops the second listing of
/// `condemned/` it sees (a backup's re-check before its manifest): it reports on `reached`
/// and waits for `resume`.
struct Gated {
    objects: Arc<MemoryBackend>,
    gate: Mutex<Option<Gate>>,
}

struct Gate {
    listings: u32,
    reached: Sender<()>,
    resume: Receiver<()>,
}

impl Gated {
    fn stop_before_manifest(&self) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached) = channel();
        let (resume, resume_rx) = channel();
        if let Ok(mut g) = self.gate.lock() {
            *g = Some(Gate {
                listings: 0,
                reached: reached_tx,
                resume: resume_rx,
            });
        }
        (reached, resume)
    }
}

impl Backend for Gated {
    fn put(&self, key: &str, data: &[u8]) -> stackvault::Result<()> {
        self.objects.put(key, data)
    }
    fn get(&self, key: &str) -> stackvault::Result<Vec<u8>> {
        self.objects.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> stackvault::Result<Vec<u8>> {
        self.objects.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> stackvault::Result<u64> {
        self.objects.size(key)
    }
    fn exists(&self, key: &str) -> stackvault::Result<bool> {
        self.objects.exists(key)
    }
    fn list_with_sizes(&self, prefix: &str) -> stackvault::Result<Vec<ObjectInfo>> {
        if prefix == "condemned/" {
            let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(g) = gate.as_mut() {
                g.listings += 1;
                if g.listings == 2 {
                    let _ = g.reached.send(());
                    let _ = g.resume.recv();
                    *gate = None;
                }
            }
        }
        self.objects.list_with_sizes(prefix)
    }
    fn remove(&self, key: &str) -> stackvault::Result<()> {
        self.objects.remove(key)
    }
    fn version(&self, key: &str) -> stackvault::Result<Version> {
        self.objects.version(key)
    }
    fn replace(&self, key: &str, data: &[u8], expected: &Version) -> stackvault::Result<Version> {
        self.objects.replace(key, data, expected)
    }
    fn delete_if(&self, key: &str, expected: &Version) -> stackvault::Result<()> {
        self.objects.delete_if(key, expected)
    }
    fn writer<'a>(&'a self, dir: &str) -> stackvault::Result<Box<dyn ObjectWriter + 'a>> {
        self.objects.writer(dir)
    }
}

fn backup_disk(repo: &Repo, path: &Path, name: &str) -> Result<BackupReport> {
    let source = stackvault::open_source(path, &Default::default())?;
    let options = BackupOptions {
        disk: name.into(),
        ..BackupOptions::default()
    };
    Ok(backup(repo, source.as_ref(), &options, &NoProgress)?)
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
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let objects = Arc::new(MemoryBackend::new());
    Repo::init_on(
        objects.clone(),
        &d.join("cache-init"),
        LOCATION,
        &InitOptions::default(),
    )?;
    let gated = Arc::new(Gated {
        objects: objects.clone(),
        gate: Mutex::new(None),
    });
    let pruner = Repo::open_on(objects.clone(), &d.join("cache-a"), LOCATION)?;
    let backer = Repo::open_on(gated.clone(), &d.join("cache-b"), LOCATION)?;
    let disk: PathBuf = d.join("web01.img");
    make_disk(&disk, 12 << 20, 5)?;

    // A snapshot, then forgotten: its packs are unreferenced.
    let first = backup_disk(&pruner, &disk, "web01")?;
    let first_packs = pack_names(&objects)?;
    assert!(!first_packs.is_empty());
    stackvault::maintain::forget::forget(&pruner, std::slice::from_ref(&first.snapshot_id), false)?;

    // Another host backs up the same disk: it deduplicates against those packs, and is held
    // right before its manifest while a prune condemns them.
    let (reached, resume) = gated.stop_before_manifest();
    let (second, pruned) = std::thread::scope(|s| {
        let b = s.spawn(|| backup_disk(&backer, &disk, "web01"));
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
    assert!(pack_names(&objects)?.is_superset(&first_packs));
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
    assert!(pack_names(&objects)?.is_superset(&first_packs));

    // After it, the condemned packs go (the snapshot's chunks were copied out of them by
    // the backup), their deltas first, and so does the record.
    let grace = PruneOptions::default().grace.as_secs();
    age_records(&objects, grace + 31)?;
    let late = stackvault::prune(&pruner, &PruneOptions::default(), &NoProgress)?;
    assert_eq!(late.packs_deleted, first_packs.len() as u64, "{late:?}");
    assert_eq!(late.condemnation_records_removed, 1, "{late:?}");
    let left = pack_names(&objects)?;
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
    let third = Repo::open_on(objects.clone(), &d.join("cache-c"), LOCATION)?;
    assert!(restores_to(
        &third,
        &second.snapshot_id,
        &disk,
        &d.join("c.img")
    )?);
    Ok(())
}
