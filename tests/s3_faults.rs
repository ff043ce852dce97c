//! The S3 backend against moto through the shared fault proxy (`faultproxy.rs`): a `503
//! SlowDown` with `Retry-After`, a connection closed halfway through the body or before any
//! answer, or a body cut short with a matching `Content-Length` (a consistent-looking but short
//! answer). Each scripted fault fires once, in order.

use std::time::Duration;

use stackvault::store::s3::S3Options;
use stackvault::store::{Backend, S3Backend};
use stackvault::Error;

use crate::faultproxy::{slow_down, Fault, FaultProxy};
use crate::moto::Moto;

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
    let proxy = FaultProxy::scripted(moto.port)?;
    let b = through(&moto, &proxy, 6)?;
    let bytes = data(300_000);
    proxy.inject("PUT", slow_down(1));
    let started = std::time::Instant::now();
    b.put("packs/aa/aa01", &bytes)?;
    // The backoff is at most 10 ms here: only Retry-After explains a second's wait.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
    proxy.inject("GET", Fault::TruncateBody);
    assert!(b.get("packs/aa/aa01")? == bytes, "whole read differs");
    proxy.inject("GET", Fault::ShortBody);
    proxy.inject("GET", Fault::TruncateBody);
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
    let proxy = FaultProxy::scripted(moto.port)?;
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
    let proxy = FaultProxy::scripted(moto.port)?;
    let b = through(&moto, &proxy, 3)?;
    let bytes = data(10_000);
    b.put("packs/bb/bb01", &bytes)?;
    // Short answers are resumed from the byte reached (5000, 7500): two in a row, then a
    // whole one, give every byte.
    for _ in 0..2 {
        proxy.inject("GET", Fault::ShortBody);
    }
    assert!(b.get_range("packs/bb/bb01", 0, 10_000)? == bytes);
    // A resume counts as a new try only after real progress (1 MiB, or the rest of the
    // range): three short answers in a row on this small range are damage, named at the byte
    // reached, as a link that only trickles must end rather than resume for ever.
    for _ in 0..3 {
        proxy.inject("GET", Fault::ShortBody);
    }
    let e = b.get_range("packs/bb/bb01", 0, 10_000);
    assert!(
        matches!(&e, Err(Error::Corrupt { offset: 8_750, what, .. }) if what.contains("3 tries")),
        "{e:?}"
    );
    // Answers that end before any byte, in every try, are damage named at that byte.
    for _ in 0..3 {
        proxy.inject("GET", Fault::ShortBody);
    }
    let e = b.get_range("packs/bb/bb01", 9_999, 1);
    assert!(
        matches!(&e, Err(Error::Corrupt { offset: 9_999, what, .. }) if what.contains("3 tries")),
        "{e:?}"
    );
    assert_eq!(proxy.pending(), 0);
    Ok(())
}
