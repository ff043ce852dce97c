//! A small read-only NBD server: snapshots as block devices for qemu, qemu-img, libnbd's
//! tools and the Linux kernel, read through a [`SnapshotReader`].
//!
//! The subset of the protocol served, with the upstream document's section for each piece, is
//! `docs/nbd.md`: fixed newstyle handshake; `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` with
//! `base:allocation`; `NBD_CMD_READ`, `FLUSH`, `DISC`, `BLOCK_STATUS`. Writes, trims and
//! write-zeroes are refused with `EPERM`, requests past the end with `EINVAL`.
//!
//! Each connection has a thread; at most [`ServeOptions::max_connections`] run at once, and a
//! connection beyond that is closed at once. A client has [`ServeOptions::handshake_timeout`]
//! to finish its handshake, so idle sockets cannot hold every slot. A client that breaks the
//! protocol loses its connection and nothing else: every length it sends is bounded before
//! anything is allocated for it (see [`session`]).
//!
//! [`Server::serve`] returns when `cancel` is set (SIGINT/SIGTERM in the CLI): it stops
//! accepting, shuts every open connection down, waits for their threads and removes its unix
//! socket. Listening on TCP needs an address; the CLI's default host is loopback.

pub mod proto;
mod session;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::read::SnapshotReader;

pub use session::{MAX_OPTION_LEN, MAX_REQUEST_LEN};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// Parses `unix:PATH`, `tcp:HOST:PORT` or `tcp:PORT` (loopback, 127.0.0.1).
    pub fn parse(spec: &str) -> Result<Listen> {
        let usage = || {
            Error::Usage(format!(
                "--nbd {spec:?}: use unix:PATH, tcp:PORT (loopback) or tcp:HOST:PORT"
            ))
        };
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(usage());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let rest = spec.strip_prefix("tcp:").ok_or_else(usage)?;
        let with_host = if rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() {
            format!("127.0.0.1:{rest}")
        } else {
            rest.to_string()
        };
        let addr = with_host
            .to_socket_addrs()
            .map_err(|_| usage())?
            .next()
            .ok_or_else(usage)?;
        Ok(Listen::Tcp(addr))
    }
}

/// One disk offered to clients under `name`.
pub struct Export<'r> {
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub reader: &'r SnapshotReader<'r>,
}

/// Limits of a server.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 32,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What a server did, once stopped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServeReport {
    pub connections: u64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: u64,
    pub requests: u64,
    pub read_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// A connected client.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self) {
        // Already closed by the peer is as good as shut down.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound, not yet serving, NBD server. Dropping it removes its unix socket.
pub struct Server {
    listener: Listener,
}

impl Server {
    /// Binds `listen`. A unix socket path that exists is replaced only when it is a socket
    /// nobody listens on (left by a server that was killed); anything else is refused.
    pub fn bind(listen: &Listen) -> Result<Server> {
        let listener = match listen {
            Listen::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
                        return Err(Error::AlreadyExists {
                            object: format!(
                                "{} (in use; choose another socket path or stop the server \
                                 that listens there)",
                                path.display()
                            ),
                        });
                    }
                    std::fs::remove_file(path)
                        .map_err(|e| Error::io("remove stale socket", path, e))?;
                }
                let l = UnixListener::bind(path).map_err(|e| Error::io("listen on", path, e))?;
                Listener::Unix(l, path.clone())
            }
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .map_err(|e| Error::io("listen on", addr.to_string(), e))?;
                Listener::Tcp(l)
            }
        };
        Ok(Server { listener })
    }

    /// What the server listens on, as `--nbd` would name it (the port resolved).
    pub fn listen(&self) -> Listen {
        match &self.listener {
            Listener::Unix(_, p) => Listen::Unix(p.clone()),
            Listener::Tcp(l) => Listen::Tcp(
                l.local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
            ),
        }
    }

    /// The NBD URI of export `name` (as qemu and libnbd take it).
    pub fn uri(&self, name: &str) -> String {
        match self.listen() {
            Listen::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Listen::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match &self.listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are written whole; Nagle would only delay the last segment.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match &self.listener {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    /// Serves `exports` until `cancel` is set, then closes every connection and returns
    /// what was done. Each export's reader gets a read-ahead thread.
    pub fn serve(
        &self,
        exports: &[Export<'_>],
        options: &ServeOptions,
        cancel: &Cancel,
    ) -> Result<ServeReport> {
        self.set_nonblocking(true)
            .map_err(|e| Error::io("configure listener", "nbd", e))?;
        let stopping = AtomicBool::new(false);
        let active = AtomicUsize::new(0);
        let open: Mutex<Vec<(u64, Stream)>> = Mutex::new(Vec::new());
        let totals = Totals::default();
        let mut refused = 0u64;
        let mut connections = 0u64;
        std::thread::scope(|scope| {
            for e in exports {
                let stopping = &stopping;
                scope.spawn(move || e.reader.read_ahead_worker(stopping));
            }
            while !cancel.is_cancelled() {
                let stream = match self.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    // A connection that failed while being accepted (reset), or no file
                    // descriptor left: wait a little and go on.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                if active.load(Ordering::SeqCst) >= options.max_connections {
                    refused += 1;
                    stream.shutdown();
                    continue;
                }
                let (Ok(()), Ok(kept)) = (set_blocking(&stream), stream.try_clone()) else {
                    continue;
                };
                connections += 1;
                let id = connections;
                if let Ok(mut o) = open.lock() {
                    o.push((id, kept));
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (active, open, totals, stopping) = (&active, &open, &totals, &stopping);
                scope.spawn(move || {
                    if let Ok(mut session) = session::Session::new(stream, exports, stopping) {
                        // A session's error is its client's: the connection ends, the server
                        // goes on.
                        let _ = session.run(options.handshake_timeout);
                        totals.add(&session.counts);
                    }
                    if let Ok(mut o) = open.lock() {
                        if let Some(i) = o.iter().position(|(k, _)| *k == id) {
                            o.swap_remove(i).1.shutdown();
                        }
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            stopping.store(true, Ordering::SeqCst);
            if let Ok(o) = open.lock() {
                for (_, s) in o.iter() {
                    s.shutdown();
                }
            }
        });
        Ok(ServeReport {
            connections,
            refused_connections: refused,
            requests: totals.requests.load(Ordering::Relaxed),
            read_bytes: totals.bytes.load(Ordering::Relaxed),
            errors: totals.errors.load(Ordering::Relaxed),
        })
    }
}

fn set_blocking(s: &Stream) -> io::Result<()> {
    match s {
        Stream::Unix(s) => s.set_nonblocking(false),
        Stream::Tcp(s) => s.set_nonblocking(false),
    }
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl Totals {
    fn add(&self, c: &session::SessionCounts) {
        self.requests.fetch_add(c.requests, Ordering::Relaxed);
        self.bytes.fetch_add(c.bytes_read, Ordering::Relaxed);
        self.errors.fetch_add(c.errors, Ordering::Relaxed);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            remove_socket(path);
        }
    }
}

fn remove_socket(path: &Path) {
    // Gone already is fine: the socket is only ours to tidy.
    let _ = std::fs::remove_file(path);
}
