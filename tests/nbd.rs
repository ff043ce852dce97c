//! `stackvault serve --nbd`, end to end with real NBD clients: qemu-img (convert, compare, a
//! qcow2 overlay on the export) and libnbd's nbdinfo (size, allocation map), plus a raw
//! socket client in this file for what real clients never send (writes to a read-only
//! export, malformed options, reads past the end, hundreds of connections, hanging up
//! mid-reply). Under `CI=true` a missing qemu-img or nbdinfo is a failure (.ci/setup.sh
//! installs qemu-utils and libnbd-bin), never a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use stackvault_tests::{
    have_qemu_img, p, qemu_img, same_bytes, skip_for, sv_json_ok, sv_ok, Fixture,
};

const DISK_SIZE: u64 = 20 << 20;

/// True (after saying why) when qemu-img or nbdinfo is missing outside CI; a failure under CI.
fn skip_without_clients() -> bool {
    let nbdinfo = Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    skip_for((!(nbdinfo && have_qemu_img())).then(|| {
        "needs nbdinfo and qemu-img (apt-get install libnbd-bin qemu-utils; .ci/setup.sh installs them)"
            .into()
    }))
}

/// A running `stackvault serve`, killed if still running when dropped.
struct Served {
    child: Child,
    socket: PathBuf,
    uri: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Served {
    /// Serves `snapshot` of the fixture's repository on a unix socket and waits until ready.
    fn start(f: &Fixture, snapshot: &str, extra: &[&str]) -> anyhow::Result<Served> {
        let socket = f.path("sv.sock");
        let mut child = stackvault_tests::sv_command()
            .args(["-r", p(&f.repo()), "serve", snapshot, "--json", "--nbd"])
            .arg(format!("unix:{}", p(&socket)))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().context("serve stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "serve did not get ready: {line}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        ensure!(ready["event"] == "ready", "first line: {line}");
        let uri = ready["exports"][0]["uri"]
            .as_str()
            .context("export uri")?
            .to_string();
        Ok(Served {
            child,
            socket,
            uri,
            stdout,
        })
    }

    /// Sends SIGINT and waits (at most 10 s) for the process; returns (exit code, the
    /// remaining stdout, stderr).
    fn interrupt(mut self) -> anyhow::Result<(Option<i32>, String, String)> {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -INT failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            if let Some(s) = self.child.try_wait()? {
                break s.code();
            }
            if Instant::now() > deadline {
                bail!("serve did not stop within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest)?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        Ok((code, rest, err))
    }

    /// What the server wrote on stderr so far (it is stopped first).
    fn stop_and_stderr(mut self) -> anyhow::Result<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        Ok(err)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbdinfo(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nbdinfo").args(args).output()?;
    ensure!(
        out.status.success(),
        "nbdinfo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A disk of real files with zero gaps, backed up; returns (disk, snapshot id, zero bytes
/// the backup recorded).
fn backed_up_disk(f: &Fixture) -> anyhow::Result<(PathBuf, String, u64)> {
    let disk = f.path("web01.img");
    stackvault_tests::make_disk(&disk, DISK_SIZE, 3)?;
    let v = sv_json_ok(&["-r", p(&f.repo()), "backup", p(&disk), "--disk", "web01"])?;
    let id = v["snapshot_id"]
        .as_str()
        .context("snapshot id")?
        .to_string();
    let zero = v["stats"]["zero_bytes"]
        .as_u64()
        .context("stats.zero_bytes")?;
    Ok((disk, id, zero))
}

#[test]
fn clients_read_the_served_snapshot_byte_for_byte_and_see_its_holes() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id, zero_bytes) = backed_up_disk(&f)?;
    ensure!(zero_bytes > 0, "the sample disk must have zero runs");
    let served = Served::start(&f, &id, &[])?;

    let info: serde_json::Value = serde_json::from_str(&nbdinfo(&["--json", &served.uri])?)?;
    assert_eq!(info["exports"][0]["export-size"], DISK_SIZE);
    assert_eq!(info["exports"][0]["is_read_only"], true);

    // Two clients at once, each a full sequential read.
    let copies = [f.path("copy1.img"), f.path("copy2.img")];
    std::thread::scope(|s| -> anyhow::Result<()> {
        let jobs: Vec<_> = copies
            .iter()
            .map(|c| s.spawn(|| qemu_img(&["convert", "-O", "raw", &served.uri, p(c)])))
            .collect();
        for j in jobs {
            j.join().map_err(|_| anyhow::anyhow!("qemu-img thread"))??;
        }
        Ok(())
    })?;
    let restored = f.path("restored.img");
    sv_ok(&["-r", p(&f.repo()), "restore", &id, p(&restored)])?;
    for c in &copies {
        assert!(same_bytes(c, &disk)?, "NBD copy differs from the disk");
        assert!(same_bytes(c, &restored)?, "NBD copy differs from restore");
    }
    // The copy is sparse where the manifest has zero runs: qemu-img skipped the holes.
    let allocated = std::fs::metadata(&copies[0]).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    })?;
    assert!(
        allocated <= DISK_SIZE - zero_bytes + (1 << 20),
        "copy has {allocated} bytes allocated; the disk has {zero_bytes} zero bytes"
    );

    // nbdinfo --map: the holes are exactly the manifest's zero runs, and they read as zeros.
    let map: serde_json::Value =
        serde_json::from_str(&nbdinfo(&["--map", "--json", &served.uri])?)?;
    let disk_bytes = std::fs::read(&disk)?;
    let mut holes = 0u64;
    let mut covered = 0u64;
    for e in map.as_array().context("map array")? {
        let (offset, len, ty) = (
            e["offset"].as_u64().context("offset")?,
            e["length"].as_u64().context("length")?,
            e["type"].as_u64().context("type")?,
        );
        assert_eq!(offset, covered, "map runs are contiguous");
        covered += len;
        if ty == 3 {
            holes += len;
            let run = &disk_bytes[offset as usize..(offset + len) as usize];
            assert!(run.iter().all(|&b| b == 0), "hole at {offset} is not zeros");
        } else {
            assert_eq!(ty, 0, "data runs are allocated, not zero");
        }
    }
    assert_eq!(covered, DISK_SIZE);
    assert_eq!(
        holes, zero_bytes,
        "holes in the map = the backup's zero bytes"
    );
    Ok(())
}

#[test]
fn a_qcow2_overlay_on_the_export_reads_as_the_disk() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id, _) = backed_up_disk(&f)?;
    let served = Served::start(&f, &id, &[])?;
    let overlay = f.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &served.uri,
        "-F",
        "raw",
        p(&overlay),
    ])?;
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(&overlay), p(&disk)])?;
    assert!(out.contains("identical"), "qemu-img compare: {out}");
    // Writes go to the overlay; the export is untouched.
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k", p(&overlay)])
        .output()?;
    ensure!(io.status.success(), "qemu-io write to the overlay failed");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &served.uri, p(&disk)])
        .output()?;
    assert!(
        out.status.success(),
        "the export changed after an overlay write"
    );
    Ok(())
}

/// A raw NBD client: handshake by hand, then requests, for what real clients never send.
struct Raw(UnixStream);

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

impl Raw {
    /// Connects and reads the greeting; sends the client flags (fixed newstyle, no zeroes).
    fn connect(socket: &Path) -> anyhow::Result<Raw> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = Raw(s);
        let mut greet = [0u8; 18];
        r.0.read_exact(&mut greet)?;
        ensure!(&greet[..8] == b"NBDMAGIC" && &greet[8..16] == b"IHAVEOPT");
        r.0.write_all(&3u32.to_be_bytes())?;
        Ok(r)
    }

    fn option(&mut self, option: u32, data: &[u8]) -> anyhow::Result<()> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m)?;
        Ok(())
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h)?;
        ensure!(u64::from_be_bytes(h[..8].try_into()?) == REPLY_MAGIC);
        let kind = u32::from_be_bytes(h[12..16].try_into()?);
        let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
        let mut d = vec![0; len];
        self.0.read_exact(&mut d)?;
        Ok((kind, d))
    }

    /// `NBD_OPT_GO` for the default export; simple replies from then on.
    fn go(socket: &Path) -> anyhow::Result<Raw> {
        let mut r = Raw::connect(socket)?;
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        r.option(7, &d)?;
        loop {
            let (kind, _) = r.option_reply()?;
            match kind {
                1 => return Ok(r),
                3 => continue,
                other => bail!("GO answered {other:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32) -> anyhow::Result<()> {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&m)?;
        Ok(())
    }

    /// A simple reply's (error, handle).
    fn simple_reply(&mut self) -> anyhow::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        ensure!(
            u32::from_be_bytes(h[..4].try_into()?) == 0x6744_6698,
            "reply magic"
        );
        Ok((
            u32::from_be_bytes(h[4..8].try_into()?),
            u64::from_be_bytes(h[8..16].try_into()?),
        ))
    }

    /// `NBD_CMD_READ`: Ok(bytes) or Err(protocol error number).
    fn read(&mut self, offset: u64, len: u32) -> anyhow::Result<Result<Vec<u8>, u32>> {
        self.request(0, 7, offset, len)?;
        let (error, handle) = self.simple_reply()?;
        ensure!(handle == 7);
        if error != 0 {
            return Ok(Err(error));
        }
        let mut d = vec![0; len as usize];
        self.0.read_exact(&mut d)?;
        Ok(Ok(d))
    }

    /// True when the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn writes_are_refused_with_eperm_and_the_export_is_unchanged() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id, _) = backed_up_disk(&f)?;
    let served = Served::start(&f, &id, &[])?;
    let mut c = Raw::go(&served.socket)?;
    // NBD_CMD_WRITE with its payload, then TRIM and WRITE_ZEROES.
    c.request(1, 1, 0, 4096)?;
    c.0.write_all(&[0x5a; 4096])?;
    assert_eq!(c.simple_reply()?, (1, 1), "write: EPERM");
    c.request(4, 2, 0, 4096)?;
    assert_eq!(c.simple_reply()?, (1, 2), "trim: EPERM");
    c.request(6, 3, 0, 4096)?;
    assert_eq!(c.simple_reply()?, (1, 3), "write zeroes: EPERM");
    // The connection goes on, and the bytes are the disk's.
    let first = c.read(0, 4096)?.map_err(|e| anyhow::anyhow!("read: {e}"))?;
    assert_eq!(first, std::fs::read(&disk)?[..4096]);
    // A real client's write is refused too.
    let src = f.path("junk.img");
    std::fs::write(&src, vec![1u8; DISK_SIZE as usize])?;
    let copy = Command::new("nbdcopy")
        .args([p(&src), &served.uri])
        .output()?;
    assert!(
        !copy.status.success(),
        "nbdcopy wrote to a read-only export"
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &served.uri, p(&disk)])
        .output()?;
    assert!(out.status.success(), "the export changed");
    Ok(())
}

#[test]
fn hostile_clients_get_protocol_errors_and_the_server_keeps_serving() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id, _) = backed_up_disk(&f)?;
    let served = Served::start(&f, &id, &["--max-connections", "16"])?;
    let sock = served.socket.clone();

    // Bad option magic: the connection is closed.
    let mut c = Raw::connect(&sock)?;
    c.0.write_all(&[0xde; 16])?;
    assert!(c.closed(), "bad magic must end the connection");

    // An option claiming 4 GiB of data: NBD_REP_ERR_TOO_BIG, then the connection ends
    // without the server reading (or allocating) that much.
    let mut c = Raw::connect(&sock)?;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&m)?;
    let (kind, _) = c.option_reply()?;
    assert_eq!(kind, (1 << 31) | 9, "NBD_REP_ERR_TOO_BIG");
    assert!(c.closed());

    // A malformed GO (name length past the data) and an unknown option: errors, not a close.
    let mut c = Raw::connect(&sock)?;
    c.option(7, &100u32.to_be_bytes())?;
    assert_eq!(c.option_reply()?.0, (1 << 31) | 3, "NBD_REP_ERR_INVALID");
    c.option(0x4242, &[])?;
    assert_eq!(c.option_reply()?.0, (1 << 31) | 1, "NBD_REP_ERR_UNSUP");
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nodsk");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(7, &d)?;
    assert_eq!(c.option_reply()?.0, (1 << 31) | 6, "NBD_REP_ERR_UNKNOWN");

    // Out-of-range and oversized reads: EINVAL, and the connection still serves.
    let mut c = Raw::go(&sock)?;
    assert_eq!(c.read(DISK_SIZE - 100, 4096)?, Err(22));
    assert_eq!(c.read(u64::MAX - 10, 4096)?, Err(22));
    assert_eq!(c.read(0, 64 << 20)?, Err(22));
    let tail = c
        .read(DISK_SIZE - 4096, 4096)?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(tail, std::fs::read(&disk)?[(DISK_SIZE - 4096) as usize..]);

    // A client that asks for the whole disk and hangs up mid-reply.
    let mut c = Raw::go(&sock)?;
    c.request(0, 9, 0, DISK_SIZE as u32)?;
    let mut some = [0u8; 1000];
    c.0.read_exact(&mut some)?;
    drop(c);

    // 200 connections at once: those past the cap are closed, none crashes the server.
    let mut many = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = UnixStream::connect(&sock) {
            many.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(many);
    std::thread::sleep(Duration::from_millis(300));

    // Real clients still read the right bytes.
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &served.uri, p(&disk)])
        .output()?;
    assert!(
        out.status.success(),
        "after hostile clients: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn a_damaged_pack_fails_only_its_reads_never_with_wrong_data() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (disk, id, _) = backed_up_disk(&f)?;
    // Flip a byte a third into the largest pack: inside some frame's compressed data.
    let mut packs: Vec<(u64, PathBuf)> = Vec::new();
    let mut dirs = vec![f.repo().join("packs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            } else {
                packs.push((e.metadata()?.len(), e.path()));
            }
        }
    }
    packs.sort();
    let (len, pack) = packs.last().context("no pack")?.clone();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)?;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, len / 3)?;
    file.write_all_at(&[b[0] ^ 0xff], len / 3)?;
    drop(file);

    let served = Served::start(&f, &id, &[])?;
    let want = std::fs::read(&disk)?;
    let mut c = Raw::go(&served.socket)?;
    let (mut good, mut failed) = (0, 0);
    const PIECE: u64 = 256 << 10;
    for k in 0..DISK_SIZE / PIECE {
        let at = k * PIECE;
        match c.read(at, PIECE as u32)? {
            Ok(data) => {
                good += 1;
                assert!(
                    data == want[at as usize..(at + PIECE) as usize],
                    "read at {at} returned wrong data"
                );
            }
            Err(e) => {
                assert_eq!(e, 5, "a damaged chunk is EIO");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "the damage was not noticed");
    assert!(good > failed, "reads away from the damage must work");
    let stderr = served.stop_and_stderr()?;
    let pack_name = pack
        .file_name()
        .and_then(|n| n.to_str())
        .context("pack name")?;
    let pack_name = pack_name.split('.').next().unwrap_or(pack_name);
    assert!(
        stderr.contains(pack_name),
        "the log names the damaged pack {pack_name}: {stderr}"
    );
    Ok(())
}

#[test]
fn sigint_stops_the_server_and_removes_its_socket() -> anyhow::Result<()> {
    if skip_without_clients() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let (_disk, id, _) = backed_up_disk(&f)?;
    let served = Served::start(&f, &id, &[])?;
    let sock = served.socket.clone();
    // A client in the middle of its session does not keep the server alive.
    let mut c = Raw::go(&sock)?;
    c.read(0, 4096)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (code, rest, stderr) = served.interrupt()?;
    assert_eq!(code, Some(0), "serve after SIGINT: {stderr}");
    assert!(!sock.exists(), "the unix socket is removed");
    let stopped: serde_json::Value = serde_json::from_str(rest.trim())?;
    assert_eq!(stopped["event"], "stopped");
    assert!(c.closed(), "open connections are closed");
    Ok(())
}
