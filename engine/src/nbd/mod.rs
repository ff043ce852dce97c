//! A small read-only NBD server: snapshots as block devices for qemu, qemu-img, libnbd's
//! tools and the Linux kernel, read through a [`SnapshotReader`].
//!
//! The subset of the protocol served, with the upstream document's section for each piece, is
//! `docs/nbd.md`: fixed newstyle handshake; `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` with
//! `base:allocation`; `NBD_CMD_READ`, `FLUSH`, `DISC`, `BLOCK_STATUS`. Writes, trims and
//! write-zeroes are refused with `EPERM`, requests past the end with `EINVAL`.
//!
//! Each connection has a thread; at most [`ServeOptions::max_connections`] run at once. A
//! connection beyond that, or one the memory budget has no room for, is turned away with the
//! protocol's error (`NBD_REP_ERR_POLICY` and a message, see [`session::refuse`]) by one of
//! at most [`MAX_REFUSING`] short-lived threads; past those it is closed at once. A client
//! has [`ServeOptions::handshake_timeout`] to finish its handshake and
//! [`ServeOptions::stall_timeout`] to take each reply, so idle or stalled sockets cannot hold
//! every slot. A client that breaks the protocol loses its connection and nothing else: every
//! length it sends is bounded before anything is allocated for it (see [`session`]).
//!
//! Memory: the exports' readers share one [`MemoryBudget`] (the `--cache-mib`), which every
//! decoded frame is charged to (cached, in flight, or being copied from), and every open
//! connection is charged [`CONNECTION_BYTES`] (its buffers) against it; connections may take
//! at most half of it. The index's connections (a few, [`IndexReaders::max_open`]) are opened
//! before the server serves, and what SQLite's page caches may grow by afterwards
//! ([`sqlite_allowance`]) is charged to the budget too. So the server's decoded data, buffers
//! and index lookups together stay within the budget, whatever the number or the speed of its
//! clients.
//!
//! [`IndexReaders::max_open`]: crate::index::IndexReaders::max_open
//!
//! [`Server::serve`] returns when `cancel` is set (SIGINT/SIGTERM in the CLI): it stops
//! accepting, shuts every open connection down, waits for their threads and removes its unix
//! socket. Listening on TCP needs an address; the CLI's default host is loopback.

pub mod proto;
mod session;
pub mod vm;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::Cancel;
use crate::read::{BudgetStats, MemoryBudget, ReaderStats, SnapshotReader};

/// Most connections being turned away with an error reply at once; beyond, they are closed.
pub const MAX_REFUSING: usize = 8;
/// How long a refused client has to read its error and send its next option.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

pub use session::{CONNECTION_BYTES, MAX_OPTION_LEN, MAX_REQUEST_LEN};
pub use vm::{vm_export_disks, VmExportDisk};

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
    /// How long a write of a reply may block (the client not reading) before the connection
    /// is dropped.
    pub stall_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 32,
            handshake_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// What a server did, once stopped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServeReport {
    pub connections: u64,
    /// Connections turned away: `max_connections` were open, or the memory budget had no
    /// room for their buffers.
    pub refused_connections: u64,
    pub requests: u64,
    pub read_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// The memory budget shared by the exports: capacity, peak of what was charged.
    pub memory: BudgetStats,
    /// Peak resident memory of this process (VmHWM of /proc/self/status), when known.
    pub peak_rss_bytes: Option<u64>,
    /// The exports' readers' counters, summed: frames decoded, cache hits, index lookups,
    /// read-ahead work.
    pub reader: ReaderStats,
    /// Most heap SQLite held at once while serving (every index connection's page cache and
    /// statements; the index lookups of frames not cached).
    pub sqlite_peak_bytes: u64,
    /// SQLite's heap when the server started serving.
    pub sqlite_start_bytes: u64,
    /// What SQLite's heap could grow by while serving ([`sqlite_allowance`]), charged to the
    /// budget for the whole run (so part of `memory.peak_bytes`).
    pub sqlite_allowance_bytes: u64,
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

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
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

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
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
    /// what was done. Each export's reader gets a read-ahead thread. The exports' readers
    /// should share one [`MemoryBudget`] (`SnapshotReader::open_with_budget`): connections
    /// are charged to the first export's.
    ///
    /// `ready` is called once everything the server keeps while it serves is in place (index
    /// connections open, SQLite's allowance charged), before the first connection is taken:
    /// what the process holds then is its size at rest, and what it gains later is bounded
    /// by the budget. An error from `ready` ends the server before it serves.
    pub fn serve(
        &self,
        exports: &[Export<'_>],
        options: &ServeOptions,
        cancel: &Cancel,
        ready: impl FnOnce() -> Result<()>,
    ) -> Result<ServeReport> {
        let budget: &MemoryBudget = exports
            .first()
            .map(|e| e.reader.budget().as_ref())
            .ok_or_else(|| Error::Usage("nothing to serve: no export".into()))?;
        self.set_nonblocking(true)
            .map_err(|e| Error::io("configure listener", "nbd", e))?;
        for e in exports {
            e.reader.open_index_connections()?;
        }
        return_freed_frames_to_the_system();
        // What SQLite's page caches may grow by while serving is memory the server uses as
        // much as its frames': it is charged to the budget (the budget is empty here, so the
        // reservation does not wait) and held until the server stops.
        let sqlite_allowance = sqlite_allowance(budget.capacity());
        // A fixed charge, not a frame's: a loader that holds its read buffer may go past a
        // full budget once no other frame is live, which a frame-kind allowance never allows.
        let _sqlite_charge = (sqlite_allowance > 0)
            .then(|| budget.try_reserve_fixed(sqlite_allowance))
            .flatten();
        let sqlite_start = sqlite_start_serving();
        let sqlite_limit_before = hold_sqlite_page_caches(
            sqlite_start.saturating_add(i64::try_from(sqlite_allowance).unwrap_or(i64::MAX)),
        );
        if let Err(e) = ready() {
            hold_sqlite_page_caches(sqlite_limit_before);
            return Err(e);
        }
        // The size at rest, against which the budget takes the server's measure while it
        // serves (`MemoryBudget::measured_growth`).
        let at_rest = resident_bytes();
        let mut trimmed = Instant::now();
        let mut take_measure = || {
            let growth = || {
                let (rest, now) = (at_rest?, resident_bytes()?);
                usize::try_from(now.saturating_sub(rest)).ok()
            };
            let Some(mut grown) = growth() else {
                return;
            };
            // Freed heap memory stays resident (malloc gives back only the top of its heap):
            // segments and small frames freed while mapped frames took their place. It is
            // given back, at most once a second, before the rest is counted.
            if grown.saturating_sub(budget.stats().used_bytes) > TRIM_BEYOND
                && trimmed.elapsed() >= TRIM_EVERY
            {
                give_freed_heap_back();
                trimmed = Instant::now();
                grown = growth().unwrap_or(grown);
            }
            budget.measured_growth(grown);
        };
        let stopping = AtomicBool::new(false);
        let active = AtomicUsize::new(0);
        let refusing = AtomicUsize::new(0);
        let open: Mutex<Vec<(u64, Stream)>> = Mutex::new(Vec::new());
        let totals = Totals::default();
        let mut connections = 0u64;
        std::thread::scope(|scope| {
            for e in exports {
                let stopping = &stopping;
                scope.spawn(move || e.reader.read_ahead_worker(stopping));
            }
            while !cancel.is_cancelled() {
                // Every 20 ms while no client connects, and at each connection.
                take_measure();
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
                    refuse(
                        scope,
                        &refusing,
                        &totals,
                        stream,
                        format!(
                            "too many connections: this server takes {} at once; try again \
                             later",
                            options.max_connections
                        ),
                    );
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
                    // The connection's buffers, charged for as long as it is open.
                    match budget.try_reserve_fixed(CONNECTION_BYTES) {
                        Some(_charge) => {
                            if let Ok(mut session) =
                                session::Session::new(stream, exports, stopping)
                            {
                                // A session's error is its client's: the connection ends, the
                                // server goes on.
                                let _ =
                                    session.run(options.handshake_timeout, options.stall_timeout);
                                totals.add(&session.counts);
                            }
                        }
                        None => {
                            // On this connection's own thread (its slot is taken until the
                            // refusal ends), before its socket is shut down below.
                            totals.refused.fetch_add(1, Ordering::Relaxed);
                            let reason = format!(
                                "the server's memory budget ({} MiB) has no room for another \
                                 connection; try again later, or restart it with a larger \
                                 --cache-mib",
                                budget.capacity() >> 20
                            );
                            // The client may hang up or misbehave; it is turned away anyway.
                            let _ = session::refuse(stream, &reason, REFUSAL_TIMEOUT);
                        }
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
        hold_sqlite_page_caches(sqlite_limit_before);
        Ok(ServeReport {
            connections,
            refused_connections: totals.refused.load(Ordering::Relaxed),
            requests: totals.requests.load(Ordering::Relaxed),
            read_bytes: totals.bytes.load(Ordering::Relaxed),
            errors: totals.errors.load(Ordering::Relaxed),
            memory: budget.stats(),
            reader: exports
                .iter()
                .fold(ReaderStats::default(), |sum, e| sum.plus(&e.reader.stats())),
            peak_rss_bytes: peak_rss(),
            sqlite_peak_bytes: sqlite_peak_bytes(),
            sqlite_start_bytes: u64::try_from(sqlite_start).unwrap_or(0),
            sqlite_allowance_bytes: sqlite_allowance as u64,
        })
    }
}

/// Turns `stream` away with `reason` on a thread of `scope`, or closes it at once when
/// [`MAX_REFUSING`] refusals are under way.
fn refuse<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    refusing: &'scope AtomicUsize,
    totals: &Totals,
    stream: Stream,
    reason: String,
) {
    totals.refused.fetch_add(1, Ordering::Relaxed);
    if refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::SeqCst);
        stream.shutdown();
        return;
    }
    scope.spawn(move || {
        if set_blocking(&stream).is_ok() {
            // The client may hang up or misbehave; it is being turned away anyway.
            let _ = session::refuse(stream, &reason, REFUSAL_TIMEOUT);
        }
        refusing.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Makes the allocator give every large block (a frame, a pack read, a connection's buffer)
/// back to the system when it is freed, so that the process's resident memory follows what
/// the budget charges.
///
/// glibc serves blocks over its mmap threshold with their own mappings, unmapped when freed,
/// but raises the threshold as such blocks are freed, after which frames come from its
/// per-thread arenas and their freed space stays resident, fragmented across arenas: with
/// six readers and a 4 MiB budget that slack was 10 MiB and more. Setting the threshold turns
/// the raising off. Measured by `tests/nbd_memory.rs` and `benches/nbd.py`.
///
/// What is left under the threshold (compressed reads of small frames, index rows, reply
/// buffers) glibc serves from one arena per thread that allocates at once (each connection's
/// thread, the read-ahead, rayon's): each arena keeps its freed space resident, once per
/// thread. One arena keeps it once: with `serve --cache-mib 8` and one `qemu-img convert` of
/// the 4 GiB set, peak resident memory above idle less the cache fell from 4.2 MiB to
/// 0.9 MiB (`benches/RESULTS.md`). Large blocks do not take the arena's lock (they are
/// mapped), so threads contend on it only for small allocations. Only threads that have not
/// allocated yet are bound by the arena limit: call this first thing in a serving process
/// ([`Server::serve`] calls it again, for library users).
#[allow(unsafe_code)]
pub fn return_freed_frames_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        /// `M_MMAP_THRESHOLD` of glibc's malloc.h.
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        /// glibc's default threshold; blocks at or over it are mapped on their own.
        const THRESHOLD: std::ffi::c_int = 128 * 1024;
        /// `M_ARENA_MAX` of glibc's malloc.h.
        const M_ARENA_MAX: std::ffi::c_int = -8;
        // SAFETY: mallopt only changes an allocator setting; glibc takes its own lock, and it
        // may be called at any time from any thread. A failure (0) leaves the default.
        let _ = unsafe { mallopt(M_MMAP_THRESHOLD, THRESHOLD) };
        // SAFETY: as above. Arenas that exist already stay in use by their threads; the
        // threads the server starts next (connections, read-ahead, rayon's pool when it is
        // first used) share the main arena instead of creating their own.
        let _ = unsafe { mallopt(M_ARENA_MAX, 1) };
    }
}

/// Growth beyond the budget's charges past which a server gives malloc's free heap pages back.
const TRIM_BEYOND: usize = 1 << 20;
/// Least time between two such give-backs (each walks malloc's free lists).
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Gives the free pages inside malloc's heap back to the system (glibc's `malloc_trim`), not
/// only those at its top as `free` does.
#[allow(unsafe_code)]
fn give_freed_heap_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes malloc's own locks and may be called at any time from
        // any thread; it only releases pages no allocation uses.
        let _ = unsafe { malloc_trim(0) };
    }
}

/// Most SQLite may hold above its use when the server starts.
pub const SQLITE_HEAP_ALLOWANCE: usize = 1 << 20;

/// Smallest budget SQLite's page caches get an allowance from: below it every byte goes to
/// the frames a read needs (a loader holds a compressed read buffer and a decoded frame, about
/// 520 KiB, and a 1 MiB budget with a connection's buffers has little more than one loader's
/// worth left: taking an eighth of it there stalled reads past a client's timeout under load).
pub const SQLITE_ALLOWANCE_MIN_BUDGET: usize = 8 << 20;

/// What SQLite's page caches may grow by while serving, charged to a budget of `capacity`
/// bytes: a sixty-fourth of it, at most [`SQLITE_HEAP_ALLOWANCE`] (reached at 64 MiB), and
/// nothing below [`SQLITE_ALLOWANCE_MIN_BUDGET`] (SQLite then stays at its use at start).
pub fn sqlite_allowance(capacity: usize) -> usize {
    if capacity < SQLITE_ALLOWANCE_MIN_BUDGET {
        0
    } else {
        (capacity / 64).min(SQLITE_HEAP_ALLOWANCE)
    }
}

/// Sets SQLite's soft heap limit to `limit` bytes and returns the limit it replaces: the
/// server holds SQLite's heap to its use at start plus its allowance (charged to the budget
/// by the caller), and puts the previous limit back when it stops.
///
/// A lookup of a chunk not yet cached runs on one of the index's few pooled connections, and
/// each connection's page cache would grow to SQLite's default 2 MiB: on the 4 GiB dataset
/// that was 4.3 MiB of the server's heap with one client (`benches/RESULTS.md`). Past the
/// soft heap limit SQLite's page cache recycles its least recently used pages instead of
/// allocating more; lookups stay correct and read the pages again from the file (the OS's
/// page cache). The limit is the whole process's, and the server makes no other use of
/// SQLite while it runs.
#[allow(unsafe_code)]
fn hold_sqlite_page_caches(limit: i64) -> i64 {
    // SAFETY: takes SQLite's own memory mutex and may be called at any time from any thread
    // (sqlite3_soft_heap_limit64 is documented as such); no pointer is passed.
    unsafe { rusqlite::ffi::sqlite3_soft_heap_limit64(limit) }
}

/// SQLite's heap now, in bytes; its peak ([`sqlite_peak_bytes`]) is reset to it, so that the
/// peak reported when the server stops is the serving's, not the start-up's.
#[allow(unsafe_code)]
fn sqlite_start_serving() -> i64 {
    // SAFETY: reads SQLite's memory counter and resets its high-water mark under SQLite's own
    // mutex; callable at any time from any thread. No pointer is passed.
    unsafe {
        rusqlite::ffi::sqlite3_memory_highwater(1);
        rusqlite::ffi::sqlite3_memory_used()
    }
}

/// The most heap SQLite has held at once in this process since the server started serving
/// (its own counter, kept by the bundled build's default `SQLITE_DEFAULT_MEMSTATUS=1`).
#[allow(unsafe_code)]
pub fn sqlite_peak_bytes() -> u64 {
    // SAFETY: reads SQLite's memory counter under its own mutex; callable at any time from
    // any thread, before or after any connection exists. 0 means: do not reset the mark.
    let peak = unsafe { rusqlite::ffi::sqlite3_memory_highwater(0) };
    u64::try_from(peak).unwrap_or(0)
}

/// VmHWM of /proc/self/status in bytes (None where there is no /proc).
pub fn peak_rss() -> Option<u64> {
    process_status_bytes("VmHWM:")
}

/// The process's resident memory now, in bytes (Linux: VmRSS of /proc/self/status).
fn resident_bytes() -> Option<u64> {
    process_status_bytes("VmRSS:")
}

/// A size field (`VmHWM:`, `VmRSS:`, …) of /proc/self/status, in bytes.
fn process_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn set_blocking(s: &Stream) -> io::Result<()> {
    match s {
        Stream::Unix(s) => s.set_nonblocking(false),
        Stream::Tcp(s) => s.set_nonblocking(false),
    }
}

#[derive(Default)]
struct Totals {
    refused: AtomicU64,
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
