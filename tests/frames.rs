//! Pack format version 2: chunks compressed together in frames. Round trips through frames of
//! many chunks, packs of the legacy version 1 (and an index of schema 2) still read, damage
//! inside a frame, prune of frames that are only partly referenced, and index rebuilds.

use std::fs;
use std::path::Path;

use anyhow::{ensure, Context as _};
use stackvault::crypto::Protection;
use stackvault::format::pack::{encode_pack_v1, PACK_VERSION_V1};
use stackvault::read::verified::read_chunk;
use stackvault::store::pack::read_pack_table;
use stackvault::store::{Backend, LocalDir};
use stackvault_tests::{machine_bytes, p, scribble, sv, sv_json, sv_ok, Disk, Fixture, Scribble};

const MIB: u64 = 1 << 20;

fn write_at(path: &Path, offset: u64, data: &[u8]) -> anyhow::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(path)?;
    std::os::unix::fs::FileExt::write_all_at(&f, data, offset)?;
    Ok(())
}

fn query_u64(repo: &Path, sql: &str) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    Ok(conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
}

/// Index rows: chunk, pack, frame offset, offset in frame, lengths, frame size.
fn index_rows(repo: &Path) -> anyhow::Result<Vec<String>> {
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    let mut stmt = conn.prepare(
        "SELECT hex(c.id) || ' ' || p.name || ' ' || p.version || ' ' || c.offset || ' ' || \
         c.in_frame || ' ' || c.raw_len || ' ' || c.stored_len || ' ' || c.frame_raw_len || \
         ' ' || c.frame_chunks FROM chunks c JOIN packs p ON p.id = c.pack ORDER BY 1",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn check_clean(repo: &Path) -> anyhow::Result<()> {
    let (code, v, stderr) = sv_json(&["check", p(repo), "--read-data"])?;
    ensure!(code == Some(0) && v["ok"] == true, "check: {v} {stderr}");
    Ok(())
}

#[test]
fn frames_hold_many_chunks_and_round_trip_through_rebuild() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    Disk::filled(24 * MIB, 60, 1).write(&disk)?;
    let id = f.backup(&disk, "d")?;
    let chunks = query_u64(&repo, "SELECT count(*) FROM chunks")?;
    let frames = query_u64(
        &repo,
        "SELECT count(*) FROM (SELECT 1 FROM chunks GROUP BY pack, offset)",
    )?;
    let widest = query_u64(&repo, "SELECT max(frame_chunks) FROM chunks")?;
    ensure!(
        widest > 4 && frames * 4 < chunks,
        "{chunks} chunks in {frames} frames, widest {widest}"
    );
    ensure!(query_u64(&repo, "SELECT min(version) FROM packs")? == 2);
    // No frame exceeds the target unless it is one chunk.
    ensure!(
        query_u64(
            &repo,
            "SELECT count(*) FROM chunks WHERE frame_raw_len > 262144 AND frame_chunks > 1"
        )? == 0
    );
    f.assert_restores(&id, &disk)?;
    let (code, v, _) = sv_json(&["verify", p(&repo), &id])?;
    ensure!(code == Some(0) && v["outcome"] == "ok", "{v}");
    check_clean(&repo)?;

    // The index rebuilt from version 2 packs is the same index.
    let before = index_rows(&repo)?;
    sv_ok(&["index", "rebuild", p(&repo)])?;
    assert_eq!(index_rows(&repo)?, before);
    f.assert_restores(&id, &disk)
}

/// Rewrites every pack of `repo` as a version 1 pack of the same name (one uncompressed
/// record per chunk), as a version 1 writer could have left it.
fn downgrade_packs(repo: &Path) -> anyhow::Result<()> {
    let backend = LocalDir::new(repo);
    for key in backend.list("packs/")? {
        let name = key.rsplit('/').next().context("pack name")?.to_string();
        let table = read_pack_table(&backend, &Protection::Plain, &name)?;
        let mut chunks = Vec::new();
        for e in &table.entries {
            chunks.push(read_chunk(
                &backend,
                &Protection::Plain,
                &name,
                &e.location(table.version),
            )?);
        }
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        // Packs are immutable to the engine; the test rewrites one in place on purpose.
        let version = backend.version(&key)?;
        backend.replace(&key, &encode_pack_v1(&slices), &version)?;
        // Builds that wrote version 1 packs wrote no index deltas either.
        fs::remove_file(repo.join("index").join(&name[..2]).join(&name))?;
    }
    Ok(())
}

/// Replaces the index by one of schema 2 (what version 1 builds wrote) listing the packs.
fn schema_2_index(repo: &Path) -> anyhow::Result<()> {
    for name in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = fs::remove_file(repo.join(name));
    }
    let backend = LocalDir::new(repo);
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    conn.execute_batch(
        "CREATE TABLE packs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
             size INTEGER NOT NULL, chunk_count INTEGER NOT NULL);
         CREATE TABLE chunks (id BLOB PRIMARY KEY, pack INTEGER NOT NULL,
             offset INTEGER NOT NULL, raw_len INTEGER NOT NULL, stored_len INTEGER NOT NULL)
             WITHOUT ROWID;
         CREATE TABLE snapshots (id TEXT PRIMARY KEY, disk TEXT NOT NULL, time TEXT NOT NULL,
             kind TEXT NOT NULL, parent TEXT, virtual_size INTEGER NOT NULL,
             bytes_added INTEGER NOT NULL, meta TEXT NOT NULL) WITHOUT ROWID;
         CREATE INDEX snapshots_by_disk ON snapshots (disk, time);
         CREATE TABLE verifications (key TEXT PRIMARY KEY, snapshot TEXT NOT NULL,
             time TEXT NOT NULL, outcome TEXT NOT NULL, duration_ms INTEGER NOT NULL,
             record TEXT NOT NULL) WITHOUT ROWID;
         CREATE INDEX verifications_by_snapshot ON verifications (snapshot, time);
         PRAGMA user_version = 2;",
    )?;
    for key in backend.list("packs/")? {
        let name = key.rsplit('/').next().context("pack name")?.to_string();
        let table = read_pack_table(&backend, &Protection::Plain, &name)?;
        ensure!(table.version == PACK_VERSION_V1);
        conn.execute(
            "INSERT INTO packs (name, size, chunk_count) VALUES (?1, ?2, ?3)",
            rusqlite::params![name, backend.size(&key)? as i64, table.entries.len() as i64],
        )?;
        let pack = conn.last_insert_rowid();
        for e in &table.entries {
            conn.execute(
                "INSERT OR IGNORE INTO chunks (id, pack, offset, raw_len, stored_len) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![&e.id.0[..], pack, e.offset as i64, e.raw_len, e.stored_len],
            )?;
        }
    }
    Ok(())
}

#[test]
fn version_1_packs_and_a_schema_2_index_still_work() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    Disk::filled(16 * MIB, 60, 2).write(&disk)?;
    let id0 = f.backup(&disk, "d")?;
    downgrade_packs(&repo)?;
    schema_2_index(&repo)?;

    // Opening migrates the index in place; every v1 record reads as a frame of one chunk.
    f.assert_restores(&id0, &disk)?;
    ensure!(query_u64(&repo, "PRAGMA user_version")? == 3);
    ensure!(query_u64(&repo, "SELECT max(version) FROM packs")? == 1);
    ensure!(query_u64(&repo, "SELECT max(frame_chunks) FROM chunks")? == 1);
    let migrated = index_rows(&repo)?;
    check_clean(&repo)?;
    // A rebuild from the version 1 packs gives the same rows as the migration.
    sv_ok(&["index", "rebuild", p(&repo)])?;
    assert_eq!(index_rows(&repo)?, migrated);

    // New data goes to version 2 packs next to the old ones.
    let disk1 = f.path("d1.img");
    fs::copy(&disk, &disk1)?;
    scribble(&disk1, Scribble::Week, 300, 7)?;
    let id1 = f.backup(&disk1, "d")?;
    ensure!(query_u64(&repo, "SELECT count(DISTINCT version) FROM packs")? == 2);
    f.assert_restores(&id0, &disk)?;
    f.assert_restores(&id1, &disk1)?;

    // Prune rewrites the version 1 packs into version 2 frames, verbatim.
    sv_ok(&["forget", p(&repo), &id0])?;
    let (code, r, stderr) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
    ensure!(code == Some(0), "prune: {stderr}");
    ensure!(r["packs_rewritten"].as_u64() > Some(0), "{r}");
    f.assert_restores(&id1, &disk1)?;
    check_clean(&repo)
}

#[test]
fn damage_inside_a_frame_is_reported_for_each_of_its_chunks() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let disk = f.path("d.img");
    Disk::filled(16 * MIB, 60, 3).write(&disk)?;
    let id = f.backup(&disk, "d")?;
    let conn = rusqlite::Connection::open(repo.join("index.sqlite"))?;
    let (pack, offset, n, stored): (String, i64, i64, i64) = conn.query_row(
        "SELECT p.name, c.offset, c.frame_chunks, c.stored_len FROM chunks c \
         JOIN packs p ON p.id = c.pack WHERE c.frame_chunks > 2 ORDER BY c.offset LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    drop(conn);
    // One flipped bit in the middle of the frame's stored bytes.
    let path = repo.join("packs").join(&pack[..2]).join(&pack);
    let mut bytes = fs::read(&path)?;
    let at = (offset + 24 + stored / 2) as usize;
    bytes[at] ^= 0x04;
    fs::write(&path, &bytes)?;

    let (code, v, _) = sv_json(&["verify", p(&repo), &id])?;
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["outcome"], "damaged", "{v}");
    let (code, c, _) = sv_json(&["check", p(&repo), "--read-data"])?;
    assert_eq!(code, Some(3), "{c}");
    let damage = c["damage"].as_array().context("damage")?;
    let in_frame: Vec<&serde_json::Value> = damage
        .iter()
        .filter(|d| d["pack"] == pack.as_str() && d["kind"] == "chunk-data")
        .collect();
    assert_eq!(in_frame.len() as i64, n, "every chunk of the frame: {c}");
    for d in &in_frame {
        assert_eq!(d["offset"].as_i64(), Some(offset + 24), "{d}");
        ensure!(d["chunk"].is_string(), "{d}");
    }
    assert_eq!(c["affected"][0]["snapshot_id"], id.as_str(), "{c}");
    // Restore refuses with the damage exit code.
    let out = f.path("out.img");
    let o = sv(&["restore", p(&repo), &id, p(&out)])?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    ensure!(stderr.contains(&pack), "{stderr}");
    Ok(())
}

#[test]
fn prune_keeps_partly_referenced_frames_and_frees_what_it_predicted() -> anyhow::Result<()> {
    let f = Fixture::plain()?;
    let repo = f.repo();
    let disk0 = f.path("d0.img");
    Disk::filled(16 * MIB, 60, 4).write(&disk0)?;
    // 1 MiB that gen1 replaces: several whole frames of gen0 lose every chunk, while the
    // scattered block changes leave frames partly referenced.
    let region = 4 * MIB + 512 * 1024;
    write_at(&disk0, region, &machine_bytes(MIB as usize, 41))?;
    let id0 = f.backup(&disk0, "d")?;
    let disk1 = f.path("d1.img");
    fs::copy(&disk0, &disk1)?;
    scribble(&disk1, Scribble::Week, 200, 9)?;
    write_at(&disk1, region, &machine_bytes(MIB as usize, 42))?;
    let id1 = f.backup(&disk1, "d")?;
    sv_ok(&["forget", p(&repo), &id0])?;

    let (_, stats, _) = sv_json(&["stats", p(&repo)])?;
    let unreferenced = stats["repository"]["unreferenced_bytes"]
        .as_u64()
        .context("unreferenced_bytes")?;
    let (code, dry, _) = sv_json(&["prune", p(&repo), "--dry-run", "--max-unused", "0%"])?;
    ensure!(code == Some(0), "{dry}");
    let (code, real, stderr) = sv_json(&["prune", p(&repo), "--max-unused", "0%"])?;
    ensure!(code == Some(0), "prune: {stderr}");
    for k in [
        "packs_deleted",
        "packs_rewritten",
        "packs_written",
        "frames_moved",
        "frames_removed",
        "chunks_moved",
        "chunks_removed",
        "removed_chunk_bytes",
        "packs_after_bytes",
        "freed_bytes",
    ] {
        assert_eq!(dry[k], real[k], "{k}: dry {dry} real {real}");
    }
    // What stats called unreferenced is what prune removed: whole frames only.
    assert_eq!(real["removed_chunk_bytes"].as_u64(), Some(unreferenced));
    ensure!(real["frames_removed"].as_u64() > Some(0), "{real}");
    // Frames that gen1 still uses kept their gen0-only chunks: more chunks stay indexed than
    // gen1 references.
    let referenced = real["referenced_chunks"].as_u64().context("referenced")?;
    let indexed = query_u64(&repo, "SELECT count(*) FROM chunks")?;
    ensure!(
        indexed > referenced,
        "no partly referenced frame kept: {indexed} indexed, {referenced} referenced"
    );
    let (_, stats, _) = sv_json(&["stats", p(&repo)])?;
    assert_eq!(stats["repository"]["unreferenced_bytes"], 0, "{stats}");
    f.assert_restores(&id1, &disk1)?;
    check_clean(&repo)
}
