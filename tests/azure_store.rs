//! The Azure Blob repository backend against a real Azurite: the `Backend` contract on a
//! fresh container and prefix, create-only puts racing from two threads, large objects as
//! blocks, streamed objects committed from their spool a few blocks at a time, credentials
//! (Shared Key, SAS, a wrong key, none), a missing container, the Azure Stack Hub service
//! version and its step-down, and retries through a fault proxy.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use stackvault::azure::sign::SharedKey;
use stackvault::azure::{Profile, RequestKind, RetryPolicy};
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};
use stackvault::Error;
use stackvault_tests::Azurite;

use crate::faultproxy::{Fault, FaultProxy};

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// A well-formed key that is not the account's.
const WRONG_KEY: &str =
    "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk0MDQ=";

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}/{ACCOUNT}")
}

fn options(port: u16, credential: AzureCredential) -> AzureStoreOptions {
    AzureStoreOptions {
        endpoint: Some(endpoint(port)),
        retry: RetryPolicy {
            tries: 4,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            timeout: Duration::from_secs(20),
        },
        ..AzureStoreOptions::new(credential)
    }
}

fn key() -> AzureCredential {
    AzureCredential::SharedKey(KEY.into())
}

/// A backend on `azure://devstoreaccount1/CONTAINER/PREFIX` through `port`, container created.
fn backend(port: u16, location: &str, credential: AzureCredential) -> Result<AzureBlobBackend> {
    let b = AzureBlobBackend::open(location, &options(port, credential))?;
    b.create_container()?;
    Ok(b)
}

/// `len` bytes that differ per `seed`.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[test]
fn the_contract_holds_on_a_fresh_container_and_prefix() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let b = backend(az.port, "azure://devstoreaccount1/vault/erp/site1", key())?;
    stackvault::store::contract::honours_the_contract(&b)?;
    // The same container without the prefix sees the objects under it, not beside it.
    let root = backend(az.port, "azure://devstoreaccount1/vault", key())?;
    b.put("packs/ef/efgh", b"x")?;
    ensure!(root.list("packs/")?.is_empty());
    ensure!(root.exists("erp/site1/packs/ef/efgh")? && !root.exists("packs/ef/efgh")?);

    // A pack larger than one Put Blob goes as blocks, several at once, then one commit.
    let big = data(stackvault::store::AZURE_PUT_BLOB_MAX + 12345, 7);
    let blocks = big.len().div_ceil(stackvault::store::AZURE_BLOCK_SIZE) as u64;
    let before = b.requests().get(RequestKind::PutBlock);
    b.put("packs/11/1111", &big)?;
    ensure!(b.requests().get(RequestKind::PutBlock) - before == blocks);
    ensure!(b.requests().get(RequestKind::PutBlockList) == 1);
    ensure!(
        b.get("packs/11/1111")? == big,
        "large object read back differs"
    );
    ensure!(b.size("packs/11/1111")? == big.len() as u64);
    let tail = b.get_range("packs/11/1111", big.len() as u64 - 10, 10)?;
    ensure!(tail == big[big.len() - 10..]);
    let again = b.put("packs/11/1111", &data(big.len(), 8));
    ensure!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    ensure!(
        b.get("packs/11/1111")? == big,
        "a refused commit changed the object"
    );
    let counts = b.request_counts();
    ensure!(counts.get("put_block_list") == Some(&2) && counts.get("retries") == Some(&0));
    Ok(())
}

#[test]
fn create_only_puts_from_two_threads_let_exactly_one_win() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let b = backend(az.port, "azure://devstoreaccount1/race", key())?;
    let big = stackvault::store::AZURE_PUT_BLOB_MAX + 1000;
    for (i, len) in [10usize, 1000, big].into_iter().enumerate() {
        let key = format!("snapshots/s{i}");
        let results: Vec<(u8, stackvault::Result<()>)> = std::thread::scope(|s| {
            let racers: Vec<_> = [1u8, 2]
                .into_iter()
                .map(|seed| {
                    let (b, key) = (&b, &key);
                    s.spawn(move || (seed, b.put(key, &data(len, seed))))
                })
                .collect();
            racers.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let winners: Vec<u8> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(seed, _)| *seed)
            .collect();
        let losers = results
            .iter()
            .filter(|(_, r)| matches!(r, Err(Error::AlreadyExists { object }) if *object == key))
            .count();
        ensure!(
            winners.len() == 1 && losers == 1,
            "{len} bytes: expected one winner and one AlreadyExists, got {results:?}"
        );
        ensure!(
            b.get(&key)? == data(len, winners[0]),
            "stored bytes are not the winner's"
        );
    }
    Ok(())
}

#[test]
fn a_wrong_key_is_a_clear_403_without_the_key() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    backend(az.port, "azure://devstoreaccount1/locked", key())?;
    let wrong = AzureBlobBackend::open(
        "azure://devstoreaccount1/locked",
        &options(az.port, AzureCredential::SharedKey(WRONG_KEY.into())),
    )?;
    for e in [wrong.put("config", b"x").err(), wrong.list("packs/").err()] {
        let Some(e) = e else {
            bail!("a wrong key was accepted")
        };
        let text = e.to_string();
        ensure!(matches!(e, Error::Http { status: 403, .. }), "{e:?}");
        ensure!(text.contains("AZURE_STORAGE_KEY"), "no advice in: {text}");
        ensure!(
            !text.contains("no answer"),
            "a 403 reported as a network failure: {text}"
        );
        ensure!(!text.contains(WRONG_KEY) && !format!("{e:?}").contains(WRONG_KEY));
    }
    ensure!(wrong.requests().retries() == 0, "a 403 was retried");
    Ok(())
}

#[test]
fn a_missing_container_is_named_not_taken_for_a_missing_object() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/nosuch/p",
        &options(az.port, key()),
    )?;
    let results = [
        b.get("config").err(),
        b.exists("config").err(),
        b.put("config", b"x").err(),
        b.list("snapshots/").err(),
    ];
    for e in results {
        let Some(e) = e else {
            bail!("a missing container went unnoticed")
        };
        ensure!(
            matches!(&e, Error::Http { status: 404, code, .. } if code == "ContainerNotFound"),
            "{e:?}"
        );
        ensure!(e.to_string().contains("container does not exist"), "{e}");
    }
    Ok(())
}

#[test]
fn sas_credentials_work_and_a_read_only_sas_only_reads() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let signer = SharedKey::new(ACCOUNT, KEY)?;
    let sas = signer.account_sas("racwdl", "2099-01-01T00:00:00Z");
    let b = backend(
        az.port,
        "azure://devstoreaccount1/sas/repo",
        AzureCredential::Sas(sas),
    )?;
    stackvault::store::contract::honours_the_contract(&b)?;
    b.put("snapshots/kept", b"manifest")?;

    let read_only = signer.account_sas("rl", "2099-01-01T00:00:00Z");
    let ro = AzureBlobBackend::open(
        "azure://devstoreaccount1/sas/repo",
        &options(az.port, AzureCredential::Sas(format!("?{read_only}"))),
    )?;
    ensure!(ro.get("snapshots/kept")? == b"manifest");
    ensure!(ro
        .list("snapshots/")?
        .contains(&"snapshots/kept".to_string()));
    let e = ro.put("snapshots/new", b"x");
    ensure!(matches!(e, Err(Error::Http { status: 403, .. })), "{e:?}");
    ensure!(
        !format!("{e:?}").contains("sig="),
        "the SAS leaked into {e:?}"
    );
    Ok(())
}

/// Checks the error when neither variable is set: here when this process has neither, and
/// always in the child process that [`no_credential_is_a_usage_error_naming_both_variables`]
/// starts without them (changing the environment of this multi-threaded process would be
/// unsound).
#[test]
fn no_credential_child() -> Result<()> {
    let unset = ["AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"]
        .iter()
        .all(|v| std::env::var_os(v).is_none());
    // In the parent with a credential set, only the child can check.
    if !unset && std::env::var_os("SV_NO_CREDENTIAL_CHILD").is_none() {
        return Ok(());
    }
    let e = AzureBlobBackend::from_env("azure://acct/vault", None, Profile::Azure);
    match e {
        Err(Error::Usage(m))
            if m == "no credential: set AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN" =>
        {
            Ok(())
        }
        other => bail!("expected the no-credential usage error, got {other:?}"),
    }
}

#[test]
fn no_credential_is_a_usage_error_naming_both_variables() -> Result<()> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "azure_store::no_credential_child", "--nocapture"])
        .env_remove("AZURE_STORAGE_KEY")
        .env_remove("AZURE_STORAGE_SAS_TOKEN")
        .env("SV_NO_CREDENTIAL_CHILD", "1")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && text.contains("1 passed"), "{text}");
    Ok(())
}

#[test]
fn stack_hub_sends_2019_07_07_and_steps_down_when_refused() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    backend(az.port, "azure://devstoreaccount1/stack", key())?;
    // A stamp that refuses 2019-07-07 the way old Stack Hub versions do.
    let proxy = FaultProxy::start(az.port, |r| {
        let versioned = r.header("x-ms-version") == Some("2019-07-07");
        (versioned && r.target.contains("/stack/") && r.method != "DELETE").then_some(
            Fault::Status {
                status: 400,
                code: "InvalidHeaderValue",
                retry_after: None,
            },
        )
    })?;
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/stack/p",
        &AzureStoreOptions {
            profile: Profile::AzureStack,
            ..options(proxy.port, key())
        },
    )?;
    b.put("config", b"c")?;
    ensure!(b.get("config")? == b"c");
    let refused: Vec<bool> = proxy.seen().iter().map(|s| s.fault.is_some()).collect();
    ensure!(refused == [true, false, false], "{refused:?}");
    ensure!(b.api_version() == "2017-11-09");
    ensure!(b
        .notes()
        .iter()
        .any(|n| n.contains("stepped down to 2017-11-09")));
    // Global Azure: a current version, never stepped down.
    let g = AzureBlobBackend::open("azure://devstoreaccount1/stack/p", &options(az.port, key()))?;
    ensure!(g.get("config")? == b"c" && g.api_version() == stackvault::azure::AZURE_API_VERSION);
    Ok(())
}

#[test]
fn a_partial_answer_from_another_byte_than_asked_is_damage() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    backend(az.port, "azure://devstoreaccount1/shifted", key())?;
    let proxy = FaultProxy::scripted(az.port)?;
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/shifted/r",
        &options(proxy.port, key()),
    )?;
    let payload = data(10_000, 5);
    b.put("packs/cc/cc01", &payload)?;
    ensure!(b.get_range("packs/cc/cc01", 100, 1000)? == payload[100..1100]);
    // The same length, but the answer says it starts a byte further on: refused, named at
    // the byte asked for, never handed out as these bytes (pack headers are read this way).
    proxy.inject("GET", Fault::ShiftedRange);
    let e = b.get_range("packs/cc/cc01", 100, 1000);
    ensure!(
        matches!(&e, Err(Error::Corrupt { offset: 100, what, .. }) if what.contains("from 101")),
        "{e:?}"
    );
    ensure!(proxy.pending() == 0);
    Ok(())
}

#[test]
fn transient_faults_are_retried_and_fatal_answers_are_not() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    backend(az.port, "azure://devstoreaccount1/faults", key())?;
    let busy = |retry_after| Fault::Status {
        status: 503,
        code: "ServerBusy",
        retry_after,
    };
    // Request numbers, one backend call at a time: 1 put (503 + Retry-After) 2 put;
    // 3 get (cut short) 4 get; 5 get (403) ; 6-9 get (500 each, all tries); 10 put (reset
    // mid-upload) 11 put; 12 get (429) 13 get.
    let proxy = FaultProxy::at(
        az.port,
        vec![
            (1, busy(Some(1))),
            (3, Fault::TruncateBody),
            (
                5,
                Fault::Status {
                    status: 403,
                    code: "AuthorizationFailure",
                    retry_after: None,
                },
            ),
            (
                6,
                Fault::Status {
                    status: 500,
                    code: "InternalError",
                    retry_after: None,
                },
            ),
            (
                7,
                Fault::Status {
                    status: 500,
                    code: "InternalError",
                    retry_after: None,
                },
            ),
            (
                8,
                Fault::Status {
                    status: 500,
                    code: "InternalError",
                    retry_after: None,
                },
            ),
            (
                9,
                Fault::Status {
                    status: 500,
                    code: "InternalError",
                    retry_after: None,
                },
            ),
            (10, Fault::ResetMidUpload),
            (
                12,
                Fault::Status {
                    status: 429,
                    code: "TooManyRequests",
                    retry_after: None,
                },
            ),
            (14, Fault::DropAnswer),
            (18, Fault::Delay(Duration::from_millis(1500))),
        ],
    )?;
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/faults/r",
        &options(proxy.port, key()),
    )?;
    let payload = data(300_000, 3);

    // 503 with Retry-After: 1 s: the client waits that long, not its 50 ms backoff cap.
    let t = Instant::now();
    b.put("packs/aa/aaaa", &payload)?;
    ensure!(
        t.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        t.elapsed()
    );
    ensure!(proxy.count() == 2);

    // A body cut short is retried, never returned.
    ensure!(
        b.get("packs/aa/aaaa")? == payload,
        "a truncated body was returned"
    );
    ensure!(proxy.count() == 4);

    // 403 is reported at once as what it is.
    let e = b.get("packs/aa/aaaa");
    ensure!(matches!(&e, Err(Error::Http { status: 403, .. })), "{e:?}");
    ensure!(proxy.count() == 5, "a 403 was retried");
    let fifth = &proxy.seen()[4];
    ensure!(
        fifth.number == 5 && fifth.method == "GET" && fifth.target.contains("/r/packs/aa/aaaa")
    );

    // A 500 on every try: reported as a 500 after the tries, not as "no answer".
    let e = b.get("packs/aa/aaaa");
    let text = e
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    ensure!(matches!(&e, Err(Error::Http { status: 500, .. })), "{e:?}");
    ensure!(
        text.contains("after 4 tries") && !text.contains("no answer"),
        "{text}"
    );
    ensure!(proxy.count() == 9);

    // A reset while uploading is retried; the object lands once.
    b.put("packs/bb/bbbb", &payload)?;
    ensure!(proxy.count() == 11);
    ensure!(b.get_range("packs/bb/bbbb", 1000, 5)? == payload[1000..1005]);
    ensure!(proxy.count() == 13);

    // A create that landed but whose answer was lost: the retry finds the key taken, sees its
    // own bytes there, and succeeds (14 put, answer dropped; 15 put: 409; 16 get compares).
    b.put("packs/cc/cccc", &payload)?;
    ensure!(proxy.count() == 16, "{:?}", proxy.seen());
    ensure!(b.get("packs/cc/cccc")? == payload); // 17
    ensure!(b.requests().retries() >= 6);

    // A slow answer past the attempt's time limit is abandoned and asked again (18, 19).
    let impatient = AzureBlobBackend::open(
        "azure://devstoreaccount1/faults/r",
        &AzureStoreOptions {
            retry: RetryPolicy {
                timeout: Duration::from_secs(1),
                ..options(proxy.port, key()).retry
            },
            ..options(proxy.port, key())
        },
    )?;
    ensure!(impatient.get("packs/cc/cccc")? == payload);
    ensure!(
        proxy.count() == 19 && impatient.requests().retries() == 1,
        "{} requests, {} retries",
        proxy.count(),
        impatient.requests().retries()
    );
    Ok(())
}

/// Streams `bytes` through `b`'s writer in pieces, as a manifest is written, and commits them
/// as `key`: the outer error is the test's, the inner one the commit's.
fn stream(b: &dyn Backend, key: &str, bytes: &[u8]) -> Result<stackvault::Result<()>> {
    let mut w = b.writer("snapshots/")?;
    for piece in bytes.chunks(100_000) {
        std::io::Write::write_all(&mut w, piece)?;
    }
    Ok(w.commit(key))
}

/// Blocks of a streamed object in the tests below, and how many go up at once: a commit may
/// hold `IN_FLIGHT * BLOCK` bytes, and an object up to that is one Put Blob.
const BLOCK: usize = 256 << 10;
const IN_FLIGHT: usize = 5;

fn streamed_options(port: u16) -> AzureStoreOptions {
    AzureStoreOptions {
        spooled_block_size: BLOCK,
        parallel_blocks: IN_FLIGHT,
        ..options(port, key())
    }
}

#[test]
fn a_large_streamed_object_is_committed_from_its_spool_a_few_blocks_at_a_time() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let location = "azure://devstoreaccount1/streamed/erp";
    let b = AzureBlobBackend::open(location, &streamed_options(az.port))?;
    b.create_container()?;
    let counts = |b: &AzureBlobBackend| {
        [
            RequestKind::PutBlob,
            RequestKind::PutBlock,
            RequestKind::PutBlockList,
        ]
        .map(|k| b.requests().get(k))
    };

    // Past the spool's 1 MiB in memory but within the blocks in flight: one Put Blob.
    let small = data(IN_FLIGHT * BLOCK - 1000, 4);
    stream(&b, "snapshots/small", &small)??;
    ensure!(counts(&b) == [1, 0, 0], "{:?}", b.request_counts());
    ensure!(b.get("snapshots/small")? == small);

    // 25 blocks: staged from the spool's file, then one create-only commit.
    let big = data(24 * BLOCK + 777, 5);
    stream(&b, "snapshots/big", &big)??;
    let blocks = big.len().div_ceil(BLOCK) as u64;
    ensure!(
        counts(&b) == [1, blocks, 1],
        "expected {blocks} Put Block and a Put Block List: {:?}",
        b.request_counts()
    );
    ensure!(
        b.get("snapshots/big")? == big,
        "the object read back differs"
    );
    // Memory: the blocks in flight, never the object (read back whole before: 6 MiB here).
    let peak = b.peak_spool_bytes_held();
    ensure!(
        peak <= IN_FLIGHT * BLOCK && peak >= small.len(),
        "a commit held {peak} bytes at once, more than {IN_FLIGHT} blocks of {BLOCK}"
    );

    // Create-only: a taken key is refused, whether the bytes differ or not (a same-content
    // manifest is then taken as stored by the repository), and the object stays as it was.
    for (seed, len) in [(6, big.len()), (5, big.len()), (6, small.len())] {
        let again = stream(&b, "snapshots/big", &data(len, seed))?;
        ensure!(
            matches!(again, Err(Error::AlreadyExists { .. })),
            "{len} bytes of seed {seed}: {again:?}"
        );
    }
    ensure!(
        b.get("snapshots/big")? == big,
        "a refused commit changed the object"
    );
    ensure!(b.request_counts().get("retries") == Some(&0));
    Ok(())
}

#[test]
fn a_streamed_commit_whose_answers_were_lost_resends_its_block_and_finds_itself_stored(
) -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    backend(az.port, "azure://devstoreaccount1/lost", key())?;
    // The answer to the third Put Block and to the Put Block List never arrive, though both
    // took effect: the block is sent again, and the commit, retried, finds the key taken by
    // its own first attempt (the stored bytes are compared with the spool's, block by block).
    let (blocks, lists) = (AtomicU64::new(0), AtomicU64::new(0));
    let proxy = FaultProxy::start(az.port, move |r| {
        let counter = match r.target {
            t if t.contains("comp=blocklist") => &lists,
            t if t.contains("comp=block&") => &blocks,
            _ => return None,
        };
        let n = counter.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        let first = if std::ptr::eq(counter, &lists) { 1 } else { 3 };
        (n == first).then_some(Fault::DropAnswer)
    })?;
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/lost/r",
        &streamed_options(proxy.port),
    )?;
    let big = data(12 * BLOCK + 5, 9);
    stream(&b, "snapshots/big", &big)??;
    ensure!(
        b.get("snapshots/big")? == big,
        "the object read back differs"
    );
    let counts = b.request_counts();
    ensure!(
        counts.get("put_block") == Some(&14)
            && counts.get("put_block_list") == Some(&2)
            && counts.get("retries") == Some(&2),
        "{counts:?}"
    );
    ensure!(b.peak_spool_bytes_held() <= IN_FLIGHT * BLOCK);
    Ok(())
}

#[test]
fn a_streamed_commit_whose_blocks_were_discarded_says_it_was_not_stored() -> Result<()> {
    let Some(az) = Azurite::start_or_skip()? else {
        return Ok(());
    };
    let direct = backend(az.port, "azure://devstoreaccount1/gone/r", key())?;
    // The service's answer to a Put Block List whose staged blocks were discarded meanwhile
    // (as a prune discards an upload left unfinished past its grace period, by a competing
    // commit). Azurite keeps a deleted name's uncommitted blocks, so it cannot give that
    // answer itself: the proxy does, for the one Put Block List.
    let proxy = FaultProxy::start(az.port, |r| {
        r.target
            .contains("comp=blocklist")
            .then_some(Fault::Status {
                status: 400,
                code: "InvalidBlockList",
                retry_after: None,
            })
    })?;
    let b = AzureBlobBackend::open(
        "azure://devstoreaccount1/gone/r",
        &streamed_options(proxy.port),
    )?;
    let big = data(12 * BLOCK + 5, 11);
    let err = stream(&b, "snapshots/big", &big)?
        .err()
        .context("a commit whose blocks were discarded succeeded")?;
    let msg = err.to_string();
    ensure!(
        matches!(err, Error::Locked(_)) && msg.contains("not stored"),
        "{msg}"
    );
    ensure!(!direct.exists("snapshots/big")?, "something was stored");
    Ok(())
}
