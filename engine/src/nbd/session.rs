//! One client connection: the fixed newstyle handshake, then requests until the client
//! disconnects, breaks the protocol, or the server stops.
//!
//! Requests are answered in order. Nothing a client sends decides an allocation beyond fixed
//! bounds: options longer than [`MAX_OPTION_LEN`] and requests longer than
//! [`MAX_REQUEST_LEN`] are refused (the former with a hard disconnect, since skipping gigabytes
//! of option data is what a denial of service looks like), and a read is served in pieces of
//! at most [`PIECE_LEN`].

use std::io::{self, BufReader, BufWriter, Read, Write};

use super::proto::*;
use super::{Export, Stream};
use crate::error::Error;
use crate::read::{HeldSlice, MapRun, SequentialReads};

/// Longest option data read; longer options end the connection after `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest read or block status request, also announced as the maximum block size.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Bytes read from the snapshot and sent at a time: a connection's data buffer. A structured
/// piece whose chunks are all checked in cached frames is written from the frames (held, and
/// charged to the budget, only for that write; a write blocked by a slow client ends at the
/// stall timeout); any other piece is copied out of its frames into this buffer, the frames
/// dropped before it is written.
const PIECE_LEN: u64 = 256 << 10;
/// What a connection is charged against the server's memory budget for as long as it is
/// open: its data buffer, the socket buffers of its reader and writer, option data (at most
/// [`MAX_OPTION_LEN`]) and the part of its thread's stack it touches.
pub const CONNECTION_BYTES: usize = PIECE_LEN as usize + HEADER_ROOM + 2 * BUFFER_LEN + 64 * 1024;
/// Room before a piece's data in the connection's buffer for the longest header that
/// precedes data (a structured chunk header and the piece's offset), so that a reply piece
/// goes out in one write, not a header write and a data write.
const HEADER_ROOM: usize = STRUCTURED_HEADER_LEN + 8;
/// Length of a structured reply chunk header.
const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of a simple reply header.
const SIMPLE_HEADER_LEN: usize = 16;
/// Capacity of a connection's buffered reader and writer (the standard library's default).
const BUFFER_LEN: usize = 8 * 1024;
/// Options a refused client may send before it is disconnected.
const REFUSED_OPTIONS: usize = 8;
/// Most extents in one block status reply.
const MAX_DESCRIPTORS: usize = 4096;
/// Reads at least this long have their frames decompressed in parallel first.
const PREFETCH_MIN: u32 = 256 << 10;
/// Most slices of cached frames sent in one structured data chunk (a `writev`'s vector).
const MAX_HELD_SLICES: usize = 64;
/// Id of the `base:allocation` context on every connection.
const ALLOCATION_CONTEXT_ID: u32 = 1;

/// How a session ended, for the server's counters.
#[derive(Debug, Default)]
pub struct SessionCounts {
    pub requests: u64,
    pub bytes_read: u64,
    pub errors: u64,
}

pub struct Session<'s, 'r> {
    input: BufReader<Stream>,
    output: BufWriter<Stream>,
    exports: &'s [Export<'r>],
    structured: bool,
    no_zeroes: bool,
    /// The export `base:allocation` was selected for.
    allocation_for: Option<usize>,
    shutting_down: &'s std::sync::atomic::AtomicBool,
    /// The data buffer of reads ([`HEADER_ROOM`] and at most [`PIECE_LEN`]), kept from one
    /// request to the next.
    data: Vec<u8>,
    /// The runs of a structured read's current span, kept likewise.
    runs: Vec<MapRun>,
    /// Slices of cached frames being sent (empty between pieces: frames are held only for
    /// the write), kept likewise.
    held: Vec<HeldSlice>,
    pub counts: SessionCounts,
}

/// What ends option haggling.
enum Negotiated {
    Transmit(usize),
    Close,
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A string of an option's data: a 32-bit length, then the bytes, starting at `*at`.
fn take_string<'b>(data: &'b [u8], at: &mut usize) -> Option<&'b str> {
    let len = be_u32(data, *at)? as usize;
    if len > MAX_STRING {
        return None;
    }
    let start = at.checked_add(4)?;
    let s = data.get(start..start.checked_add(len)?)?;
    *at = start + len;
    std::str::from_utf8(s).ok()
}

impl<'s, 'r> Session<'s, 'r> {
    pub fn new(
        stream: Stream,
        exports: &'s [Export<'r>],
        shutting_down: &'s std::sync::atomic::AtomicBool,
    ) -> io::Result<Self> {
        let out = stream.try_clone()?;
        Ok(Session {
            input: BufReader::with_capacity(BUFFER_LEN, stream),
            output: BufWriter::with_capacity(BUFFER_LEN, out),
            exports,
            structured: false,
            no_zeroes: false,
            allocation_for: None,
            shutting_down,
            data: Vec::new(),
            runs: Vec::new(),
            held: Vec::new(),
            counts: SessionCounts::default(),
        })
    }

    /// Runs the connection to its end. Errors are the connection's (closed, timed out,
    /// protocol broken, a reply left unread for `stall_timeout`); they end only this
    /// session.
    pub fn run(
        &mut self,
        handshake_timeout: std::time::Duration,
        stall_timeout: std::time::Duration,
    ) -> io::Result<()> {
        self.input
            .get_ref()
            .set_read_timeout(Some(handshake_timeout))?;
        // A client that leaves a reply unread this long is gone or hostile: the blocked
        // write fails and the connection (its slot, its buffer) is given back.
        self.output
            .get_ref()
            .set_write_timeout(Some(stall_timeout))?;
        match self.handshake()? {
            Negotiated::Close => Ok(()),
            Negotiated::Transmit(export) => {
                self.input.get_ref().set_read_timeout(None)?;
                self.transmit(export)
            }
        }
    }

    fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.input.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn export_named(&self, name: &str) -> Option<usize> {
        // The empty name is the default export when there is only one.
        if name.is_empty() && self.exports.len() == 1 {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("reply too long"))?;
        self.output.write_all(&OPTION_REPLY_MAGIC.to_be_bytes())?;
        self.output.write_all(&option.to_be_bytes())?;
        self.output.write_all(&kind.to_be_bytes())?;
        self.output.write_all(&len.to_be_bytes())?;
        self.output.write_all(data)
    }

    fn option_error(&mut self, option: u32, kind: u32, message: &str) -> io::Result<()> {
        self.option_reply(option, kind, message.as_bytes())?;
        self.output.flush()
    }

    fn handshake(&mut self) -> io::Result<Negotiated> {
        self.output.write_all(&NBDMAGIC.to_be_bytes())?;
        self.output.write_all(&IHAVEOPT.to_be_bytes())?;
        self.output
            .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        self.output.flush()?;
        let client = self.read_exact(4)?;
        let client_flags = be_u32(&client, 0).unwrap_or(u32::MAX);
        // The protocol: a server MUST close the connection on client flags it does not know.
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Ok(Negotiated::Close);
        }
        self.no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            let head = self.read_exact(16)?;
            let (Some(magic), Some(option), Some(len)) =
                (be_u64(&head, 0), be_u32(&head, 8), be_u32(&head, 12))
            else {
                return Ok(Negotiated::Close);
            };
            if magic != IHAVEOPT {
                return Ok(Negotiated::Close);
            }
            if len > MAX_OPTION_LEN {
                self.option_error(option, REP_ERR_TOO_BIG, "option data too long")?;
                return Ok(Negotiated::Close);
            }
            let data = self.read_exact(len as usize)?;
            if self
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed)
                && option != OPT_ABORT
            {
                self.option_error(option, REP_ERR_SHUTDOWN, "the server is stopping")?;
                continue;
            }
            match option {
                OPT_EXPORT_NAME => {
                    let name = std::str::from_utf8(&data).unwrap_or("\u{0}");
                    // Unwilling to allow the export: the protocol has no error reply here.
                    let Some(i) = self.export_named(name) else {
                        return Ok(Negotiated::Close);
                    };
                    let e = &self.exports[i];
                    self.output.write_all(&e.reader.size().to_be_bytes())?;
                    self.output.write_all(&transmission_flags().to_be_bytes())?;
                    if !self.no_zeroes {
                        self.output.write_all(&[0; 124])?;
                    }
                    self.output.flush()?;
                    return Ok(Negotiated::Transmit(i));
                }
                OPT_ABORT => {
                    // The client may already have gone; either way the session ends.
                    let _ = self.option_reply(option, REP_ACK, &[]);
                    let _ = self.output.flush();
                    return Ok(Negotiated::Close);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.option_error(option, REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    for e in self.exports {
                        let mut d = Vec::new();
                        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        d.extend_from_slice(e.name.as_bytes());
                        d.extend_from_slice(e.description.as_bytes());
                        self.option_reply(option, REP_SERVER, &d)?;
                    }
                    self.option_reply(option, REP_ACK, &[])?;
                    self.output.flush()?;
                }
                OPT_INFO | OPT_GO => {
                    if let Some(i) = self.info(option, &data)? {
                        if option == OPT_GO {
                            if self.allocation_for.is_some_and(|a| a != i) {
                                self.allocation_for = None;
                            }
                            return Ok(Negotiated::Transmit(i));
                        }
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.option_error(option, REP_ERR_INVALID, "takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.option_reply(option, REP_ACK, &[])?;
                    self.output.flush()?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data)?,
                _ => self.option_error(option, REP_ERR_UNSUP, "option not supported")?,
            }
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's size, flags and what else was asked for.
    /// Returns the export when the answer was a success.
    fn info(&mut self, option: u32, data: &[u8]) -> io::Result<Option<usize>> {
        let mut at = 0;
        let parsed = take_string(data, &mut at).and_then(|name| {
            let count = be_u16(data, at)? as usize;
            let requests: Option<Vec<u16>> =
                (0..count).map(|k| be_u16(data, at + 2 + 2 * k)).collect();
            (at + 2 + 2 * count == data.len()).then_some((name.to_string(), requests?))
        });
        let Some((name, requests)) = parsed else {
            self.option_error(option, REP_ERR_INVALID, "malformed INFO/GO request")?;
            return Ok(None);
        };
        let Some(i) = self.export_named(&name) else {
            self.option_error(option, REP_ERR_UNKNOWN, "no export of that name")?;
            return Ok(None);
        };
        let e = &self.exports[i];
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&e.reader.size().to_be_bytes());
        d.extend_from_slice(&transmission_flags().to_be_bytes());
        let mut replies = vec![d];
        for r in requests {
            let mut d = r.to_be_bytes().to_vec();
            match r {
                INFO_NAME => d.extend_from_slice(e.name.as_bytes()),
                INFO_DESCRIPTION => d.extend_from_slice(e.description.as_bytes()),
                INFO_BLOCK_SIZE => {
                    for v in [1u32, 4096, MAX_REQUEST_LEN] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                }
                _ => continue,
            }
            replies.push(d);
        }
        for d in replies {
            self.option_reply(option, REP_INFO, &d)?;
        }
        self.option_reply(option, REP_ACK, &[])?;
        self.output.flush()?;
        Ok(Some(i))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: only `base:allocation`.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self.option_error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        let mut at = 0;
        let parsed = take_string(data, &mut at).and_then(|name| {
            let count = be_u32(data, at)?;
            at += 4;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.push(take_string(data, &mut at)?.to_string());
            }
            (at == data.len()).then_some((name.to_string(), queries))
        });
        let Some((name, queries)) = parsed else {
            return self.option_error(option, REP_ERR_INVALID, "malformed meta context request");
        };
        let Some(export) = self.export_named(&name) else {
            return self.option_error(option, REP_ERR_UNKNOWN, "no export of that name");
        };
        let matches = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        if matches {
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option_reply(option, REP_META_CONTEXT, &d)?;
        }
        if set {
            self.allocation_for = matches.then_some(export);
        }
        self.option_reply(option, REP_ACK, &[])?;
        self.output.flush()
    }

    fn simple_reply(&mut self, handle: u64, error: u32) -> io::Result<()> {
        self.output.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        self.output.write_all(&error.to_be_bytes())?;
        self.output.write_all(&handle.to_be_bytes())
    }

    fn chunk_header(&mut self, flags: u16, kind: u16, handle: u64, len: usize) -> io::Result<()> {
        let header = structured_header(flags, kind, handle, len)?;
        self.output.write_all(&header)
    }

    /// An error reply: a simple reply, or a structured error chunk that ends the request.
    fn error_reply(&mut self, handle: u64, error: u32, message: &str) -> io::Result<()> {
        self.counts.errors += 1;
        if self.structured {
            let msg = message.as_bytes();
            let msg = msg.get(..msg.len().min(MAX_STRING)).unwrap_or_default();
            self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len())?;
            self.output.write_all(&error.to_be_bytes())?;
            self.output.write_all(&(msg.len() as u16).to_be_bytes())?;
            self.output.write_all(msg)?;
        } else {
            self.simple_reply(handle, error)?;
        }
        self.output.flush()
    }

    fn transmit(&mut self, export: usize) -> io::Result<()> {
        let reader = self.exports[export].reader;
        let size = reader.size();
        let mut stream = SequentialReads::default();
        loop {
            let mut head = [0u8; REQUEST_LEN];
            match self.input.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let (Some(magic), Some(flags), Some(kind), Some(handle), Some(offset), Some(len)) = (
                be_u32(&head, 0),
                be_u16(&head, 4),
                be_u16(&head, 6),
                be_u64(&head, 8),
                be_u64(&head, 16),
                be_u32(&head, 24),
            ) else {
                return Ok(());
            };
            if magic != REQUEST_MAGIC {
                // The stream can no longer be framed: hard disconnect.
                return Ok(());
            }
            self.counts.requests += 1;
            let in_range = offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= size);
            match kind {
                CMD_DISC => return Ok(()),
                CMD_FLUSH => {
                    self.simple_reply(handle, 0)?;
                    self.output.flush()?;
                }
                CMD_WRITE => {
                    if len > MAX_REQUEST_LEN {
                        return Ok(());
                    }
                    // The payload is read and dropped to keep the stream framed.
                    io::copy(&mut (&mut self.input).take(u64::from(len)), &mut io::sink())?;
                    self.error_reply(handle, EPERM, "the export is read-only")?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    self.error_reply(handle, EPERM, "the export is read-only")?
                }
                CMD_READ if !in_range || len > MAX_REQUEST_LEN => {
                    self.error_reply(handle, EINVAL, "read past the end of the export")?
                }
                CMD_READ => {
                    // Read-ahead once this client reads a stream, not on one random read
                    // that happens to land after the last.
                    if stream.note(offset, u64::from(len)) {
                        reader.hint_sequential(offset + u64::from(len));
                    }
                    if len >= PREFETCH_MIN {
                        // Errors are the read's to report, below.
                        let _ = reader.prefetch(offset, u64::from(len));
                    }
                    self.read(export, handle, offset, u64::from(len))?;
                }
                CMD_BLOCK_STATUS => {
                    if self.allocation_for != Some(export) || !self.structured {
                        self.error_reply(handle, EINVAL, "no metadata context negotiated")?;
                    } else if !in_range || len == 0 {
                        self.error_reply(handle, EINVAL, "range past the end of the export")?;
                    } else {
                        let max = if flags & CMD_FLAG_REQ_ONE != 0 {
                            1
                        } else {
                            MAX_DESCRIPTORS
                        };
                        match reader.map(offset, u64::from(len), max) {
                            Ok(runs) => self.block_status(handle, &runs)?,
                            Err(e) => self.error_reply(handle, EIO, &e.to_string())?,
                        }
                    }
                }
                _ => self.error_reply(handle, EINVAL, "command not supported")?,
            }
        }
    }

    fn block_status(&mut self, handle: u64, runs: &[MapRun]) -> io::Result<()> {
        self.chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            4 + 8 * runs.len(),
        )?;
        self.output
            .write_all(&ALLOCATION_CONTEXT_ID.to_be_bytes())?;
        for r in runs {
            // Runs lie inside a request of at most u32::MAX bytes.
            let len = u32::try_from(r.len).unwrap_or(u32::MAX);
            let state = if r.zero { STATE_HOLE | STATE_ZERO } else { 0 };
            self.output.write_all(&len.to_be_bytes())?;
            self.output.write_all(&state.to_be_bytes())?;
        }
        self.output.flush()
    }

    /// Answers a read: with structured replies, zero runs as holes and data in pieces, an
    /// error as an error chunk at its offset; with simple replies, the first piece is read
    /// before the reply header so that an early error is an error reply, and a later one
    /// (after data was promised) ends the connection, as the protocol requires.
    fn read(&mut self, export: usize, handle: u64, offset: u64, len: u64) -> io::Result<()> {
        // The connection's buffer, taken for the request (and put back) so that `self`'s
        // writers can be used while it is filled.
        let mut buf = std::mem::take(&mut self.data);
        let mut runs = std::mem::take(&mut self.runs);
        let answered = self.read_into(&mut buf, &mut runs, export, handle, offset, len);
        self.data = buf;
        self.runs = runs;
        answered
    }

    /// [`Session::read`] with the connection's buffer. Each data piece is read into `buf`
    /// after [`HEADER_ROOM`] bytes, its header put just before it, and both written at once.
    fn read_into(
        &mut self,
        buf: &mut Vec<u8>,
        runs: &mut Vec<MapRun>,
        export: usize,
        handle: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let reader = self.exports[export].reader;
        let end = offset + len;
        let mut at = offset;
        if !self.structured {
            let mut header_sent = false;
            while at < end || !header_sent {
                let piece = (end - at).min(PIECE_LEN) as usize;
                buf.resize(HEADER_ROOM + piece, 0);
                let (head, data) = buf.split_at_mut(HEADER_ROOM);
                if let Err(e) = reader.read_at(at, data) {
                    log_read_error(&self.exports[export].name, at, &e);
                    if header_sent {
                        return Err(io::Error::other("read failed after its reply began"));
                    }
                    return self.error_reply(handle, EIO, "");
                }
                let mut start = HEADER_ROOM;
                if !header_sent {
                    start -= SIMPLE_HEADER_LEN;
                    let header = head
                        .get_mut(start..)
                        .ok_or_else(|| io::Error::other("header room"))?;
                    header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                    header[4..8].copy_from_slice(&0u32.to_be_bytes());
                    header[8..16].copy_from_slice(&handle.to_be_bytes());
                    header_sent = true;
                }
                self.output
                    .write_all(buf.get(start..).unwrap_or_default())?;
                self.counts.bytes_read += piece as u64;
                at += piece as u64;
            }
            return self.output.flush();
        }
        while at < end {
            if let Err(e) = reader.map_into(at, (end - at).min(PIECE_LEN * 4), 64, runs) {
                return self.read_error(export, handle, at, &e);
            }
            for run in runs.iter() {
                let mut pos = run.offset;
                let run_end = run.offset + run.len;
                if run.zero {
                    let hole = u32::try_from(run.len).unwrap_or(u32::MAX);
                    self.chunk_header(0, REPLY_TYPE_OFFSET_HOLE, handle, 12)?;
                    self.output.write_all(&pos.to_be_bytes())?;
                    self.output.write_all(&hole.to_be_bytes())?;
                    pos = run_end;
                }
                while pos < run_end {
                    // Chunks checked in cached frames (all of a prefetched read, mostly) go
                    // from the frames to the socket, without a copy into `buf`.
                    let sent =
                        self.send_held(export, handle, pos, (run_end - pos).min(PIECE_LEN))?;
                    if sent > 0 {
                        pos += sent;
                        continue;
                    }
                    let piece = (run_end - pos).min(PIECE_LEN) as usize;
                    buf.resize(HEADER_ROOM + piece, 0);
                    let (head, data) = buf.split_at_mut(HEADER_ROOM);
                    if let Err(e) = reader.read_at(pos, data) {
                        return self.read_error(export, handle, pos, &e);
                    }
                    let header = structured_header(0, REPLY_TYPE_OFFSET_DATA, handle, 8 + piece)?;
                    head[..STRUCTURED_HEADER_LEN].copy_from_slice(&header);
                    head[STRUCTURED_HEADER_LEN..].copy_from_slice(&pos.to_be_bytes());
                    self.output.write_all(buf)?;
                    self.counts.bytes_read += piece as u64;
                    pos += piece as u64;
                }
                at = run_end;
            }
        }
        self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)?;
        self.output.flush()
    }

    /// Sends as much of `pos..pos + len` as lies in chunks checked in cached frames (see
    /// [`crate::read::SnapshotReader::hold_checked`]) as one structured data chunk: its header
    /// and the frames' slices in one vectored write, the frames held only for that write.
    /// Returns the bytes sent; 0 when the first byte is not in such a chunk (the caller reads
    /// it through the reader, which reports any error with its place).
    fn send_held(&mut self, export: usize, handle: u64, pos: u64, len: u64) -> io::Result<u64> {
        let reader = self.exports[export].reader;
        let mut held = std::mem::take(&mut self.held);
        let covered = reader
            .hold_checked(pos, len, MAX_HELD_SLICES, &mut held)
            .unwrap_or(0);
        let sent = if covered == 0 {
            Ok(0)
        } else {
            self.write_held(handle, pos, covered, &held)
                .map(|()| covered)
        };
        held.clear();
        self.held = held;
        let sent = sent?;
        self.counts.bytes_read += sent;
        Ok(sent)
    }

    fn write_held(
        &mut self,
        handle: u64,
        pos: u64,
        covered: u64,
        held: &[HeldSlice],
    ) -> io::Result<()> {
        let len = usize::try_from(covered).map_err(|_| io::Error::other("piece too long"))?;
        let mut head = [0u8; HEADER_ROOM];
        head[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
            0,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            8 + len,
        )?);
        head[STRUCTURED_HEADER_LEN..].copy_from_slice(&pos.to_be_bytes());
        let mut slices = [io::IoSlice::new(&[]); MAX_HELD_SLICES + 1];
        slices[0] = io::IoSlice::new(&head);
        let mut count = 1;
        for (slot, h) in slices.iter_mut().skip(1).zip(held) {
            *slot = io::IoSlice::new(h);
            count += 1;
        }
        write_all_vectored(&mut self.output, &mut slices[..count])
    }

    /// Ends a structured read with `EIO` at `at`, the chunk's damage logged.
    fn read_error(&mut self, export: usize, handle: u64, at: u64, e: &Error) -> io::Result<()> {
        log_read_error(&self.exports[export].name, at, e);
        self.counts.errors += 1;
        let msg = format!("cannot read at offset {at}: the backup data is damaged or unreadable");
        let msg = msg.as_bytes();
        self.chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR_OFFSET,
            handle,
            14 + msg.len(),
        )?;
        self.output.write_all(&EIO.to_be_bytes())?;
        self.output.write_all(&(msg.len() as u16).to_be_bytes())?;
        self.output.write_all(msg)?;
        self.output.write_all(&at.to_be_bytes())?;
        self.output.flush()
    }
}

/// Writes all of `slices` (`Write::write_all_vectored` is not stable yet).
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A structured reply chunk header for a payload of `len` bytes.
fn structured_header(
    flags: u16,
    kind: u16,
    handle: u64,
    len: usize,
) -> io::Result<[u8; STRUCTURED_HEADER_LEN]> {
    let len = u32::try_from(len).map_err(|_| io::Error::other("chunk too long"))?;
    let mut h = [0u8; STRUCTURED_HEADER_LEN];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    Ok(h)
}

fn transmission_flags() -> u16 {
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
}

/// A failed read is logged with what the engine knows (pack and offset of damage).
fn log_read_error(export: &str, at: u64, e: &Error) {
    crate::progress::notice(&format!(
        "export {export:?}: read at disk offset {at} failed: {e}"
    ));
}

/// Turns a client away during the handshake with the protocol's error: the greeting, then
/// `NBD_REP_ERR_POLICY` and `reason` for each option it sends (an `NBD_OPT_ABORT` is
/// acknowledged), until it gives up, sends [`REFUSED_OPTIONS`] options, breaks the protocol
/// or is silent for `timeout`. `NBD_OPT_EXPORT_NAME` has no error reply: the connection is
/// closed. Nothing longer than a fixed buffer is read.
pub fn refuse(stream: Stream, reason: &str, timeout: std::time::Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let out = stream.try_clone()?;
    let mut input = BufReader::with_capacity(BUFFER_LEN, stream);
    let mut output = BufWriter::with_capacity(BUFFER_LEN, out);
    output.write_all(&NBDMAGIC.to_be_bytes())?;
    output.write_all(&IHAVEOPT.to_be_bytes())?;
    output.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    output.flush()?;
    let mut flags = [0u8; 4];
    input.read_exact(&mut flags)?;
    for _ in 0..REFUSED_OPTIONS {
        let mut head = [0u8; 16];
        input.read_exact(&mut head)?;
        let (Some(magic), Some(option), Some(len)) =
            (be_u64(&head, 0), be_u32(&head, 8), be_u32(&head, 12))
        else {
            return Ok(());
        };
        if magic != IHAVEOPT || len > MAX_OPTION_LEN || option == OPT_EXPORT_NAME {
            return Ok(());
        }
        io::copy(&mut (&mut input).take(u64::from(len)), &mut io::sink())?;
        let (kind, message) = if option == OPT_ABORT {
            (REP_ACK, "")
        } else {
            (REP_ERR_POLICY, reason)
        };
        let message = message.as_bytes();
        let message = message
            .get(..message.len().min(MAX_STRING))
            .unwrap_or_default();
        output.write_all(&OPTION_REPLY_MAGIC.to_be_bytes())?;
        output.write_all(&option.to_be_bytes())?;
        output.write_all(&kind.to_be_bytes())?;
        output.write_all(&(message.len() as u32).to_be_bytes())?;
        output.write_all(message)?;
        output.flush()?;
        if option == OPT_ABORT {
            return Ok(());
        }
    }
    Ok(())
}
