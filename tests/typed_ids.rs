//! Ids from outside are checked where they are read, never carried on to be sliced: `check`
//! reports an object under `snapshots/` whose name is no snapshot id as manifest damage named
//! by its key, and lists no "affected snapshot" under that name (it names none); the real
//! snapshots stay intact and restorable.

use std::fs;

use stackvault_tests::{p, sv_json, Fixture};

#[test]
fn check_reports_a_manifest_name_that_is_no_snapshot_id_as_damage() -> anyhow::Result<()> {
    let f = Fixture::new()?;
    let repo = f.repo();
    let (disk, id) = f.backup_new_disk("a", 4 << 20, 17)?;
    fs::write(repo.join("snapshots").join("not-an-id"), b"junk")?;
    let (code, v, _) = sv_json(&["check", p(&repo)])?;
    assert_eq!(code, Some(3), "{v}");
    let damage = v["damage"].as_array().cloned().unwrap_or_default();
    assert!(
        damage.iter().any(|d| d["kind"] == "manifest"
            && d["location"] == "snapshots/not-an-id"
            && d["what"]
                .as_str()
                .is_some_and(|w| w.contains("not a snapshot id"))),
        "{v:#}"
    );
    let affected = v["affected"].as_array().cloned().unwrap_or_default();
    assert!(
        affected.iter().all(|a| a["snapshot_id"] != "not-an-id"),
        "{v:#}"
    );
    f.assert_restores(&id, &disk)?;
    Ok(())
}
