//! The S3 backend against a real S3 server (moto, checking signatures wherever it can; see
//! `moto.rs`): the backend
//! contract, listing in pages, create-only writes from two threads, multipart uploads (put
//! and the streamed writer), and the clear errors for a wrong secret and a missing bucket.
//! Skipped with a message when moto is not installed, except under `CI=true`, where its
//! absence is a failure. Faults injected between the two are in `s3_faults.rs`.

use std::io::Write;
use std::sync::{Arc, Barrier};

use stackvault::store::contract::honours_the_contract;
use stackvault::store::s3::{S3Credentials, S3Options, MIN_PART_SIZE};
use stackvault::store::{Backend, S3Backend};
use stackvault::Error;

use crate::moto::Moto;

#[test]
fn honours_the_backend_contract() -> anyhow::Result<()> {
    let Some(moto) = Moto::start_unchecked() else {
        return Ok(());
    };
    let b = moto.backend("s3://contract/repos/one")?;
    // A neighbour under another prefix of the same bucket must stay invisible.
    let other = moto.backend("s3://contract/repos/two")?;
    other.put("packs/ab/abcd", b"neighbour")?;
    honours_the_contract(&b)?;
    assert_eq!(other.get("packs/ab/abcd")?, b"neighbour");
    Ok(())
}

#[test]
fn listing_follows_continuation_tokens() -> anyhow::Result<()> {
    let Some(moto) = Moto::start_unchecked() else {
        return Ok(());
    };
    moto.backend("s3://paged")?;
    let options = S3Options {
        list_page_size: Some(2),
        ..moto.options()
    };
    let b = S3Backend::new("s3://paged/r", options, moto.credentials())?;
    for i in 0..5u8 {
        b.put(&format!("packs/0{i}/0{i}ff"), &vec![i; usize::from(i)])?;
    }
    b.put("snapshots/s", b"x")?;
    let mut listed = b.list_with_sizes("packs/")?;
    listed.sort_by(|x, y| x.key.cmp(&y.key));
    let got: Vec<(String, u64)> = listed.into_iter().map(|o| (o.key, o.size)).collect();
    let want: Vec<(String, u64)> = (0..5u64)
        .map(|i| (format!("packs/0{i}/0{i}ff"), i))
        .collect();
    assert_eq!(got, want);
    // Five keys in pages of two: three requests.
    assert_eq!(b.request_counts().list, 3);
    Ok(())
}

#[test]
fn two_threads_create_only_putting_one_key() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    let b = Arc::new(moto.backend("s3://race/r")?);
    let rounds = 20;
    let mut refused = 0;
    for round in 0..rounds {
        let key = format!("snapshots/{round:04}");
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2u8)
            .map(|t| {
                let (b, barrier, key) = (Arc::clone(&b), Arc::clone(&barrier), key.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (t, b.put(&key, &[t; 1000]))
                })
            })
            .collect();
        let mut winners = Vec::new();
        for th in threads {
            let (t, result) = th.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
            match result {
                Ok(()) => winners.push(t),
                Err(Error::AlreadyExists { object }) if object == key => refused += 1,
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(b.get(&key)?, vec![winners[0]; 1000]);
    }
    assert_eq!(refused, rounds);
    Ok(())
}

#[test]
fn a_multipart_object_round_trips() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    moto.backend("s3://multi")?;
    let options = S3Options {
        part_size: MIN_PART_SIZE,
        multipart_threshold: MIN_PART_SIZE,
        ..moto.options()
    };
    let b = S3Backend::new("s3://multi/r", options, moto.credentials())?;
    let data: Vec<u8> = (0..2 * MIN_PART_SIZE + 12345)
        .map(|i| (i % 253) as u8)
        .collect();
    b.put("packs/cc/cc01", &data)?;
    let counts = b.request_counts();
    assert_eq!(
        (
            counts.put,
            counts.create_multipart,
            counts.upload_part,
            counts.complete_multipart
        ),
        (0, 1, 3, 1),
        "{counts:?}"
    );
    assert!(b.get("packs/cc/cc01")? == data);
    let across = MIN_PART_SIZE - 10;
    assert!(b.get_range("packs/cc/cc01", across as u64, 20)? == data[across..across + 20]);
    assert_eq!(b.size("packs/cc/cc01")?, data.len() as u64);
    // The completion is create-only too, and the refused upload is aborted.
    assert!(matches!(
        b.put("packs/cc/cc01", &data[1..]),
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(b.request_counts().abort_multipart, 1);
    assert!(b.get("packs/cc/cc01")? == data);

    // The streamed writer spools past the threshold and commits in parts.
    let mut w = b.writer("snapshots/")?;
    for piece in data.chunks(1 << 20) {
        w.write_all(piece)?;
    }
    w.commit("snapshots/big")?;
    assert!(b.get("snapshots/big")? == data);
    let mut w = b.writer("snapshots/")?;
    w.write_all(&data)?;
    assert!(matches!(
        w.commit("snapshots/big"),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(b.get("snapshots/big")? == data);
    Ok(())
}

#[test]
fn a_wrong_secret_is_a_clear_403_without_the_secret() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    moto.backend("s3://locked")?;
    let wrong = "Wr0ngSecretWr0ngSecretWr0ngSecret0000000";
    let b = S3Backend::new(
        "s3://locked/r",
        moto.options(),
        S3Credentials::new(&moto.access_key_id, wrong, None),
    )?;
    for result in [
        b.put("config", b"x").map(|_| ()),
        b.get("config").map(|_| ()),
    ] {
        let e = result.expect_err("a wrong secret was accepted");
        let shown = format!("{e} {e:?}");
        assert!(
            matches!(&e, Error::Http { status: 403, .. }),
            "not a 403: {shown}"
        );
        assert!(
            shown.contains("AWS_SECRET_ACCESS_KEY"),
            "no advice: {shown}"
        );
        assert!(
            !shown.contains(wrong) && !shown.contains(&moto.secret_access_key),
            "secret shown: {shown}"
        );
    }
    // Refused at once: a wrong key does not get better by retrying.
    assert_eq!(b.request_counts().retries, 0);
    Ok(())
}

#[test]
fn a_missing_bucket_is_a_clear_error() -> anyhow::Result<()> {
    let Some(moto) = Moto::start_unchecked() else {
        return Ok(());
    };
    let b = S3Backend::new("s3://nowhere/r", moto.options(), moto.credentials())?;
    let errors = [
        b.exists("config").map(|_| ()).err(),
        b.get("config").map(|_| ()).err(),
        b.get_range("config", 0, 4).map(|_| ()).err(),
        b.put("config", b"x").err(),
        b.list("packs/").map(|_| ()).err(),
        b.check_bucket().err(),
    ];
    for e in errors {
        let e = e.ok_or_else(|| anyhow::anyhow!("a missing bucket went unnoticed"))?;
        let shown = e.to_string();
        assert!(
            matches!(&e, Error::Http { code, .. } if code == "NoSuchBucket")
                && shown.contains("bucket nowhere does not exist"),
            "{shown}"
        );
    }
    Ok(())
}
