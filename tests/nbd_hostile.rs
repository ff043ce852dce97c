//! Hostile and unlucky NBD clients that `nbd.rs` does not cover: clients past the connection
//! cap and past the memory budget get the protocol's error (`NBD_REP_ERR_POLICY` with a
//! message saying what to do) instead of a silent close; clients that stop reading their
//! replies are disconnected after `--stall-timeout`, giving their slots back; and Ctrl-C
//! stops a server whose writes are blocked on such clients.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use stackvault_tests::{make_disk, p, sv_json_ok, Fixture};

use crate::nbd_support::{skip_without_clients, Raw, Served, NBD_REP_ERR_POLICY};

const DISK_SIZE: u64 = 24 << 20;

fn backed_up(f: &Fixture) -> anyhow::Result<String> {
    let disk = f.path("disk.img");
    make_disk(&disk, DISK_SIZE, 5)?;
    let v = sv_json_ok(&["-r", p(&f.repo()), "backup", p(&disk), "--disk", "web01"])?;
    Ok(v["snapshot_id"]
        .as_str()
        .context("snapshot id")?
        .to_string())
}

/// The final reply to `NBD_OPT_GO` of a fresh client: (type, message).
fn go_answer(socket: &std::path::Path) -> anyhow::Result<(u32, String)> {
    let mut c = Raw::connect(socket)?;
    let (kind, data) = c.try_go("")?;
    Ok((kind, String::from_utf8_lossy(&data).into_owned()))
}

/// A client admitted within `patience` (slots are freed by other threads).
fn admitted(socket: &std::path::Path, patience: Duration) -> anyhow::Result<Raw> {
    let deadline = Instant::now() + patience;
    loop {
        let mut c = Raw::connect(socket)?;
        if c.try_go("")?.0 == 1 {
            return Ok(c);
        }
        ensure!(
            Instant::now() < deadline,
            "no slot came free in {patience:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn clients_past_the_cap_or_the_budget_get_the_protocols_error() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let id = backed_up(&f)?;
    let served = Served::start(
        &f.repo(),
        &f.path("a.sock"),
        &[&id, "--max-connections", "2"],
    )?;
    let (mut a, mut b) = (Raw::go(&served.socket)?, Raw::go(&served.socket)?);
    let (kind, message) = go_answer(&served.socket)?;
    assert_eq!(kind, NBD_REP_ERR_POLICY, "third client: {message}");
    assert!(message.contains("too many connections"), "{message}");
    // A real client shows the server's reason ("server reported: …").
    let out = std::process::Command::new("qemu-img")
        .args(["info", &served.uri("web01")?])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too many connections"), "qemu-img: {err}");
    // The two admitted clients still read, and a slot freed is a slot taken.
    a.read(0, 4096)?.map_err(|e| anyhow::anyhow!("read: {e}"))?;
    drop(a);
    let mut c = admitted(&served.socket, Duration::from_secs(10))?;
    c.read(4096, 4096)?
        .map_err(|e| anyhow::anyhow!("read: {e}"))?;
    b.read(0, 4096)?.map_err(|e| anyhow::anyhow!("read: {e}"))?;
    let (code, stopped, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stopped["refused_connections"].as_u64() >= Some(2),
        "{stopped}"
    );

    // With a 1 MiB budget, connections may take half of it: the second is turned away,
    // naming the flag that gives more room.
    let served = Served::start(
        &f.repo(),
        &f.path("b.sock"),
        &[&id, "--cache-mib", "1", "--max-connections", "8"],
    )?;
    let mut a = Raw::go(&served.socket)?;
    let (kind, message) = go_answer(&served.socket)?;
    assert_eq!(kind, NBD_REP_ERR_POLICY, "{message}");
    assert!(message.contains("--cache-mib"), "{message}");
    // The one admitted client reads the whole disk within the 1 MiB budget.
    let mut at = 0;
    while at < DISK_SIZE {
        a.read(at, 1 << 20)?
            .map_err(|e| anyhow::anyhow!("read at {at}: {e}"))?;
        at += 1 << 20;
    }
    let (code, stopped, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "{stderr}");
    let peak = stopped["memory"]["peak_bytes"].as_u64().context("peak")?;
    assert!(peak <= 1 << 20, "budget peak {peak} over 1 MiB: {stopped}");
    Ok(())
}

#[test]
fn stalled_readers_are_dropped_and_ctrl_c_still_stops_the_server() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let id = backed_up(&f)?;
    let served = Served::start(
        &f.repo(),
        &f.path("s.sock"),
        &[&id, "--max-connections", "2", "--stall-timeout", "2"],
    )?;
    // Two clients ask for 16 MiB each and never read: far more than the socket buffers.
    let mut stalled = Vec::new();
    for handle in 0..2 {
        let mut c = Raw::go(&served.socket)?;
        c.request(0, handle, 0, 16 << 20)?;
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (kind, _) = go_answer(&served.socket)?;
    assert_eq!(kind, NBD_REP_ERR_POLICY, "both slots are taken");
    // Within the stall timeout (and some slack for a loaded machine) both slots come back:
    // only then are both stalled clients known to be dropped (one whose reply had not started
    // when the other was dropped is not stalled yet, and would be served in full below).
    let mut c = admitted(&served.socket, Duration::from_secs(20))?;
    c.read(0, 4096)?.map_err(|e| anyhow::anyhow!("read: {e}"))?;
    let second = admitted(&served.socket, Duration::from_secs(20))?;
    // The stalled clients find their connections closed once they drain what was sent.
    for s in &mut stalled {
        s.0.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut sink = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match std::io::Read::read(&mut s.0, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
            ensure!(total <= 17 << 20, "more data than was asked for");
        }
        assert!(total < 16 << 20, "a stalled reply must be cut short");
    }
    drop(second);

    // A new stalled client, then Ctrl-C: the blocked writes do not keep the server up.
    let mut again = Raw::go(&served.socket)?;
    again.request(0, 9, 0, 16 << 20)?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (code, stopped, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stopped["event"], "stopped");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        started.elapsed()
    );
    drop(c);
    Ok(())
}
