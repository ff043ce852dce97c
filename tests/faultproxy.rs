//! `FaultProxy`: an HTTP proxy between stackvault and a real storage server (Azurite, moto)
//! that injects faults at chosen requests: an error status with `Retry-After`, a connection
//! reset while the request body is still on the wire, an answer whose body is cut short, or
//! a pause. Every request gets a number (1, 2, … in arrival order); a rule decides from the
//! number, method and target whether that request is faulted. Requests not faulted are
//! forwarded unchanged and their answers passed back unchanged.
//!
//! Faults are picked by a rule ([`FaultProxy::start`], [`FaultProxy::at`]) or scripted one at a
//! time ([`FaultProxy::inject`]: the next request with that method gets the fault, each
//! scripted fault fires once, in order). The Azure tests, the S3 backend tests
//! (`s3_faults.rs`) and the remote repository tests share this one proxy.
//!
//! One request per client connection (the proxy answers with `Connection: close`), so a
//! fault never leaks into the next request. Plain HTTP with `Content-Length` bodies, which
//! is what the clients under test send.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

/// What to do to one request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer `status` without forwarding, with `x-ms-error-code` `code` and, if given, a
    /// `Retry-After` of that many seconds.
    Status {
        status: u16,
        code: &'static str,
        retry_after: Option<u64>,
    },
    /// Read only the request head and close the connection with the body unread (the kernel
    /// answers the rest of the upload with a reset). Nothing is forwarded.
    ResetMidUpload,
    /// Forward, then pass back the answer's head and only half its body, and close.
    TruncateBody,
    /// Forward, then pass back half the answer's body with a `Content-Length` that matches
    /// it: a consistent-looking but short answer.
    ShortBody,
    /// Forward, then close the connection without answering: the request took effect but
    /// the client never hears so.
    DropAnswer,
    /// Forward after a pause.
    Delay(Duration),
    /// Forward, then pass the answer back with its `Content-Range` moved one byte on (the
    /// body unchanged): bytes from another place of the object than the one asked for.
    ShiftedRange,
}

/// A request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub number: u64,
    pub method: String,
    pub target: String,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
}

/// A request as a rule sees it.
pub struct Incoming<'a> {
    pub number: u64,
    pub method: &'a str,
    pub target: &'a str,
    /// The request head, request line and headers.
    pub head: &'a str,
}

impl Incoming<'_> {
    /// The value of header `name`, if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
}

type Rule = dyn Fn(&Incoming<'_>) -> Option<Fault> + Send + Sync;

/// A running proxy on a free loopback port; stops on drop.
pub struct FaultProxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Scripted faults still to fire: (HTTP method, fault).
    script: Arc<Mutex<Vec<(String, Fault)>>>,
    stop: Arc<AtomicBool>,
}

/// `503 SlowDown` with `Retry-After: secs` (S3's "reduce your request rate").
pub fn slow_down(secs: u64) -> Fault {
    Fault::Status {
        status: 503,
        code: "SlowDown",
        retry_after: Some(secs),
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl FaultProxy {
    /// Forwards to `127.0.0.1:upstream`, faulting the requests `rule` picks; a request the
    /// rule leaves alone gets the next scripted fault for its method ([`Self::inject`]).
    pub fn start(
        upstream: u16,
        rule: impl Fn(&Incoming<'_>) -> Option<Fault> + Send + Sync + 'static,
    ) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the fault proxy")?;
        let port = listener.local_addr()?.port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Mutex<Vec<(String, Fault)>>> = Arc::default();
        let scripted = script.clone();
        let rule: Arc<Rule> = Arc::new(move |r: &Incoming<'_>| {
            rule(r).or_else(|| {
                let mut script = scripted.lock().ok()?;
                let i = script.iter().position(|(m, _)| m == r.method)?;
                Some(script.remove(i).1)
            })
        });
        let counter = Arc::new(AtomicU64::new(0));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (rule, seen, counter) = (rule.clone(), s.clone(), counter.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream, &*rule, &seen, &counter);
                });
            }
        });
        Ok(FaultProxy {
            port,
            seen,
            script,
            stop,
        })
    }

    /// Forwards to `127.0.0.1:upstream`, faulting only what [`Self::inject`] scripts.
    pub fn scripted(upstream: u16) -> Result<FaultProxy> {
        Self::start(upstream, |_| None)
    }

    /// Scripts `fault` for the next request with `method` not yet faulted.
    pub fn inject(&self, method: &str, fault: Fault) {
        if let Ok(mut s) = self.script.lock() {
            s.push((method.to_string(), fault));
        }
    }

    /// Scripted faults that have not fired yet.
    pub fn pending(&self) -> usize {
        self.script.lock().map(|s| s.len()).unwrap_or(usize::MAX)
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give a client.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Faults exactly the listed request numbers.
    pub fn at(upstream: u16, faults: Vec<(u64, Fault)>) -> Result<FaultProxy> {
        Self::start(upstream, move |r| {
            faults
                .iter()
                .find(|(k, _)| *k == r.number)
                .map(|(_, f)| f.clone())
        })
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> u64 {
        self.seen().len() as u64
    }
}

/// Index just past the blank line ending an HTTP head, if `buf` holds one.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An answer head whose `Content-Length` says `length`.
fn with_length(head: &str, length: usize) -> String {
    let mut out = String::new();
    for line in head.trim_end().split("\r\n") {
        let name = line.split(':').next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("content-length") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    out
}

/// `head` with `Content-Range: bytes A-B/T` made `bytes A+1-B+1/T`.
fn shifted_range(head: &str) -> String {
    let mut out = String::new();
    for line in head.trim_end().split("\r\n") {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let shifted = value
            .trim()
            .strip_prefix("bytes ")
            .and_then(|v| v.split_once('/'))
            .and_then(|(range, total)| {
                let (a, b) = range.split_once('-')?;
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                Some(format!("bytes {}-{}/{total}", a + 1, b + 1))
            });
        match shifted {
            Some(v) if name.trim().eq_ignore_ascii_case("content-range") => {
                out.push_str(&format!("{name}: {v}\r\n"));
            }
            _ => {
                out.push_str(line);
                out.push_str("\r\n");
            }
        }
    }
    out.push_str("\r\n");
    out
}

fn handle(
    mut conn: TcpStream,
    upstream: u16,
    rule: &Rule,
    seen: &Mutex<Vec<Seen>>,
    counter: &AtomicU64,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    // The request head.
    let mut buf = Vec::new();
    let mut piece = [0u8; 64 * 1024];
    let end = loop {
        if let Some(e) = head_end(&buf) {
            break e;
        }
        let n = conn.read(&mut piece)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let target = words.next().unwrap_or("").to_string();
    let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let fault = rule(&Incoming {
        number,
        method: &method,
        target: &target,
        head: &head,
    });
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            number,
            method: method.clone(),
            target: target.clone(),
            fault: fault.clone(),
        });
    }
    if let Some(Fault::ResetMidUpload) = fault {
        // Closing with unread input makes the kernel send a reset.
        drop(conn);
        return Ok(());
    }
    // The rest of the request body.
    let want = end + content_length(&head);
    while buf.len() < want {
        let n = conn.read(&mut piece)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&piece[..n]);
    }
    match &fault {
        Some(Fault::Status {
            status,
            code,
            retry_after,
        }) => {
            let body = if method == "HEAD" {
                String::new()
            } else {
                format!(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code>\
                     <Message>injected by the fault proxy</Message></Error>"
                )
            };
            let mut answer = format!(
                "HTTP/1.1 {status} Injected\r\nx-ms-error-code: {code}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n",
                body.len()
            );
            if let Some(s) = retry_after {
                answer.push_str(&format!("Retry-After: {s}\r\n"));
            }
            answer.push_str("\r\n");
            answer.push_str(&body);
            conn.write_all(answer.as_bytes())?;
            return Ok(());
        }
        Some(Fault::Delay(d)) => std::thread::sleep(*d),
        _ => {}
    }
    // Forward with `Connection: close`, so the upstream answer ends at EOF.
    let mut request: Vec<u8> = Vec::with_capacity(buf.len());
    for line in head[..end - 4].split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            request.extend_from_slice(line.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    request.extend_from_slice(&buf[end..]);
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).context("connect upstream")?;
    up.write_all(&request)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    if let Some(Fault::DropAnswer) = fault {
        let _ = conn.shutdown(Shutdown::Both);
        return Ok(());
    }
    if let Some(Fault::TruncateBody) = fault {
        let cut = head_end(&answer).map_or(answer.len(), |e| e + (answer.len() - e) / 2);
        conn.write_all(&answer[..cut])?;
        conn.flush()?;
        let _ = conn.shutdown(Shutdown::Both);
        return Ok(());
    }
    if let (Some(Fault::ShiftedRange), Some(e)) = (&fault, head_end(&answer)) {
        let ahead = String::from_utf8_lossy(&answer[..e]);
        conn.write_all(shifted_range(&ahead).as_bytes())?;
        conn.write_all(&answer[e..])?;
        return Ok(());
    }
    if let (Some(Fault::ShortBody), Some(e)) = (&fault, head_end(&answer)) {
        let ahead = String::from_utf8_lossy(&answer[..e]);
        let half = &answer[e..e + (answer.len() - e) / 2];
        conn.write_all(with_length(&ahead, half.len()).as_bytes())?;
        conn.write_all(half)?;
        return Ok(());
    }
    conn.write_all(&answer)?;
    Ok(())
}
