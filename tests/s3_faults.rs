//! A minimal HTTP fault proxy for the S3 backend tests (a stand-in until the shared
//! `tests/faultproxy.rs` lands): it sits between the backend and moto, forwards each request
//! on a fresh upstream connection, and spoils the answers to requests that match a scripted
//! fault: a `503 SlowDown` with `Retry-After`, a connection closed halfway through the body or
//! before any answer, or a body cut short with a matching `Content-Length` (a
//! consistent-looking but short answer). Each fault fires once, in order.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stackvault::store::s3::S3Options;
use stackvault::store::{Backend, S3Backend};
use stackvault::Error;

use crate::moto::Moto;

/// What to do to one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `503 SlowDown` with `Retry-After: N` seconds, without forwarding.
    SlowDown(u64),
    /// Forward, then send the headers and half of the body and close the connection.
    ResetMidBody,
    /// Forward, then send half of the body with a `Content-Length` that matches it.
    ShortBody,
    /// Forward, then close the connection without answering (the request was carried out).
    DropAnswer,
}

/// A proxy on a free loopback port; stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    /// Faults still to fire: (HTTP method, fault).
    faults: Arc<Mutex<Vec<(String, Fault)>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let faults: Arc<Mutex<Vec<(String, Fault)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&faults), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let f = Arc::clone(&f);
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream_port, &f);
                });
            }
        });
        Ok(FaultProxy { port, faults, stop })
    }

    /// Adds a fault for the next request with `method` not yet spoiled.
    pub fn inject(&self, method: &str, fault: Fault) {
        if let Ok(mut f) = self.faults.lock() {
            f.push((method.to_string(), fault));
        }
    }

    /// Faults that have not fired yet.
    pub fn pending(&self) -> usize {
        self.faults.lock().map(|f| f.len()).unwrap_or(usize::MAX)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Position just past the blank line ending the head of an HTTP message.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The head with `Connection: close` instead of any connection header (one request per
/// connection keeps the proxy simple) and, if given, a new `Content-Length`.
fn rewrite_head(head: &str, length: Option<usize>) -> String {
    let mut out = String::new();
    for line in head.trim_end().split("\r\n") {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection")
            || (length.is_some() && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if let Some(n) = length {
        out.push_str(&format!("Content-Length: {n}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn serve(
    mut client: TcpStream,
    upstream_port: u16,
    faults: &Mutex<Vec<(String, Fault)>>,
) -> anyhow::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let end = loop {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(e) = head_end(&buf) {
            break e;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let want = end + content_length(&head);
    while buf.len() < want {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let method = head.split_whitespace().next().unwrap_or("").to_string();
    let fault = faults.lock().ok().and_then(|mut f| {
        let i = f.iter().position(|(m, _)| *m == method)?;
        Some(f.remove(i).1)
    });
    if let Some(Fault::SlowDown(secs)) = fault {
        let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.\
                    </Message></Error>";
        write!(
            client,
            "HTTP/1.1 503 Slow Down\r\nRetry-After: {secs}\r\nContent-Type: application/xml\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.write_all(rewrite_head(&head, None).as_bytes())?;
    upstream.write_all(&buf[end..want])?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    let Some(aend) = head_end(&answer) else {
        client.write_all(&answer)?;
        return Ok(());
    };
    let ahead = String::from_utf8_lossy(&answer[..aend]).to_string();
    let body = &answer[aend..];
    match fault {
        Some(Fault::DropAnswer) => client.shutdown(Shutdown::Both)?,
        Some(Fault::ResetMidBody) => {
            client.write_all(rewrite_head(&ahead, None).as_bytes())?;
            client.write_all(&body[..body.len() / 2])?;
            client.flush()?;
            client.shutdown(Shutdown::Both)?;
        }
        Some(Fault::ShortBody) => {
            let half = &body[..body.len() / 2];
            client.write_all(rewrite_head(&ahead, Some(half.len())).as_bytes())?;
            client.write_all(half)?;
        }
        _ => {
            client.write_all(rewrite_head(&ahead, None).as_bytes())?;
            client.write_all(body)?;
        }
    }
    Ok(())
}

/// A backend on `s3://faults/p` reached through `proxy`, with the bucket made directly.
fn through(moto: &Moto, proxy: &FaultProxy, tries: u32) -> anyhow::Result<S3Backend> {
    moto.backend("s3://faults/p")?;
    let mut options: S3Options = moto.options();
    options.endpoint = Some(proxy.endpoint());
    options.retry.tries = tries;
    Ok(S3Backend::new(
        "s3://faults/p",
        options,
        moto.credentials(),
    )?)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn slowdown_reset_and_short_bodies_are_retried_and_the_data_is_right() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    let proxy = FaultProxy::start(moto.port)?;
    let b = through(&moto, &proxy, 6)?;
    let bytes = data(300_000);
    proxy.inject("PUT", Fault::SlowDown(1));
    let started = std::time::Instant::now();
    b.put("packs/aa/aa01", &bytes)?;
    // The backoff is at most 10 ms here: only Retry-After explains a second's wait.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
    proxy.inject("GET", Fault::ResetMidBody);
    assert!(b.get("packs/aa/aa01")? == bytes, "whole read differs");
    proxy.inject("GET", Fault::ShortBody);
    proxy.inject("GET", Fault::ResetMidBody);
    assert!(b.get_range("packs/aa/aa01", 1000, 200_000)? == bytes[1000..201_000]);
    assert_eq!(proxy.pending(), 0);
    let counts = b.request_counts();
    assert_eq!(counts.retries, 4, "{counts:?}");
    assert_eq!((counts.put, counts.get), (2, 5), "{counts:?}");
    Ok(())
}

#[test]
fn a_put_retried_after_its_answer_was_lost_is_not_a_conflict() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    let proxy = FaultProxy::start(moto.port)?;
    let b = through(&moto, &proxy, 4)?;
    // The object is stored, but its answer is cut: the retry meets our own object.
    proxy.inject("PUT", Fault::DropAnswer);
    b.put("snapshots/s1", b"manifest")?;
    assert_eq!(b.get("snapshots/s1")?, b"manifest");
    assert_eq!(proxy.pending(), 0);
    // Another writer's object is still a conflict.
    assert!(matches!(
        b.put("snapshots/s1", b"other"),
        Err(Error::AlreadyExists { .. })
    ));
    Ok(())
}

#[test]
fn a_body_short_in_every_try_is_corruption() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    let proxy = FaultProxy::start(moto.port)?;
    let b = through(&moto, &proxy, 3)?;
    b.put("packs/bb/bb01", &data(10_000))?;
    for _ in 0..3 {
        proxy.inject("GET", Fault::ShortBody);
    }
    let e = b.get_range("packs/bb/bb01", 0, 10_000);
    assert!(
        matches!(&e, Err(Error::Corrupt { offset: 0, what, .. }) if what.contains("3 tries")),
        "{e:?}"
    );
    Ok(())
}
