//! Helpers shared by the `nbd_*` modules: a running `stackvault serve` (started with any
//! arguments, stopped with SIGINT or killed on drop), nbdinfo, and a raw NBD client for what
//! real clients never send. Under `CI=true` a missing qemu-img or nbdinfo is a failure
//! (.ci/setup.sh installs qemu-utils and libnbd-bin), never a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use stackvault_tests::{have_qemu_img, p, skip_for};

/// True (after saying why) when qemu-img or nbdinfo is missing outside CI; a failure under CI.
pub fn skip_without_clients() -> bool {
    let nbdinfo = Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    skip_for((!(nbdinfo && have_qemu_img())).then(|| {
        "needs nbdinfo and qemu-img (apt-get install libnbd-bin qemu-utils; .ci/setup.sh installs them)"
            .into()
    }))
}

/// A running `stackvault serve --json`, killed if still running when dropped.
pub struct Served {
    pub child: Child,
    pub socket: PathBuf,
    /// The "ready" line.
    pub ready: serde_json::Value,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Served {
    /// Runs `stackvault -r REPO serve ARGS… --json --nbd unix:SOCKET` and waits until ready.
    pub fn start(repo: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<Served> {
        let mut child = stackvault_tests::sv_command()
            .args(["-r", p(repo), "serve"])
            .args(args)
            .args(["--json", "--nbd"])
            .arg(format!("unix:{}", p(socket)))
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
        Ok(Served {
            child,
            socket: socket.to_path_buf(),
            ready,
            stdout,
        })
    }

    /// The URI of export `name`, from the ready line.
    pub fn uri(&self, name: &str) -> anyhow::Result<String> {
        self.ready["exports"]
            .as_array()
            .context("exports")?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["uri"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no export {name} in {}", self.ready))
    }

    /// Peak resident memory of the server process so far (VmHWM of /proc/PID/status).
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .context("VmHWM in /proc/PID/status")?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    }

    /// Sends SIGINT and waits (at most 10 s); returns (exit code, the "stopped" line, stderr).
    pub fn interrupt(mut self) -> anyhow::Result<(Option<i32>, serde_json::Value, String)> {
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
        let stopped = serde_json::from_str(rest.trim()).unwrap_or(serde_json::Value::Null);
        Ok((code, stopped, err))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn nbdinfo(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nbdinfo").args(args).output()?;
    ensure!(
        out.status.success(),
        "nbdinfo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) | 2;

/// A raw NBD client: handshake by hand, then requests.
pub struct Raw(pub UnixStream);

impl Raw {
    /// Connects and reads the greeting; sends the client flags (fixed newstyle, no zeroes).
    pub fn connect(socket: &Path) -> anyhow::Result<Raw> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = Raw(s);
        let mut greet = [0u8; 18];
        r.0.read_exact(&mut greet)?;
        ensure!(&greet[..8] == b"NBDMAGIC" && &greet[8..16] == b"IHAVEOPT");
        r.0.write_all(&3u32.to_be_bytes())?;
        Ok(r)
    }

    pub fn option(&mut self, option: u32, data: &[u8]) -> anyhow::Result<()> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m)?;
        Ok(())
    }

    /// One option reply: (type, data).
    pub fn option_reply(&mut self) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h)?;
        ensure!(u64::from_be_bytes(h[..8].try_into()?) == REPLY_MAGIC);
        let kind = u32::from_be_bytes(h[12..16].try_into()?);
        let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
        let mut d = vec![0; len];
        self.0.read_exact(&mut d)?;
        Ok((kind, d))
    }

    /// Sends `NBD_OPT_GO` for export `name`; returns the final reply's (type, data).
    pub fn try_go(&mut self, name: &str) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d)?;
        loop {
            let (kind, data) = self.option_reply()?;
            if kind != 3 {
                return Ok((kind, data));
            }
        }
    }

    /// `NBD_OPT_GO` for the default export; simple replies from then on.
    pub fn go(socket: &Path) -> anyhow::Result<Raw> {
        let mut r = Raw::connect(socket)?;
        match r.try_go("")? {
            (1, _) => Ok(r),
            (other, _) => bail!("GO answered {other:#x}"),
        }
    }

    pub fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32) -> anyhow::Result<()> {
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
    pub fn simple_reply(&mut self) -> anyhow::Result<(u32, u64)> {
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
    pub fn read(&mut self, offset: u64, len: u32) -> anyhow::Result<Result<Vec<u8>, u32>> {
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
}
