//! The cipher choice of encryption at rest (issue 15), measured on this machine: sealing
//! (encrypt + tag) 1 MiB frames and 64 KiB objects with XChaCha20-Poly1305 (what the engine
//! uses) and AES-256-GCM (RustCrypto `aes-gcm`, AES-NI and CLMUL detected at run time), both
//! against zstd level 3 of the same realistic bytes in the same run: the data path compresses
//! every frame, so the cipher's cost only matters relative to that. Also the unlock time of one
//! key object at the default Argon2id parameters (RFC 9106's second recommended option).
//!
//! The `frame_*` groups put the two implementations of XChaCha20-Poly1305 side by side on the
//! work of a backup and a restore, in place on 256 KiB frames: RustCrypto's
//! `chacha20poly1305`, and ring's assembly ChaCha20-Poly1305 under an HChaCha20 subkey
//! (`stackvault::crypto::xchacha`, what the engine seals with). Same key, nonce and bytes.
//!
//! Run: `cargo bench --bench cipher --profile dev` (dependencies are optimised in dev builds;
//! the work measured here is all inside them). Results in `benches/RESULTS.md`.

use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stackvault::crypto::keyfile::KdfParams;
use stackvault_tests::machine_bytes;

const AD: &[u8] = b"stackvault sealed object v1\x01\0\0\0\0\0\0\0\0packname";

fn sealing(c: &mut Criterion) {
    let key = [7u8; 32];
    let xchacha = XChaCha20Poly1305::new((&key).into());
    let aes = Aes256Gcm::new((&key).into());
    for (name, len) in [("1MiB", 1usize << 20), ("64KiB", 64 << 10)] {
        let data = machine_bytes(len, 11);
        let mut g = c.benchmark_group(format!("seal_{name}"));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function("xchacha20poly1305", |b| {
            b.iter(|| {
                let payload = Payload {
                    msg: &data,
                    aad: AD,
                };
                xchacha
                    .encrypt(XNonce::from_slice(&[1; 24]), payload)
                    .map(|v| v.len())
            })
        });
        g.bench_function("aes256gcm", |b| {
            b.iter(|| {
                let payload = Payload {
                    msg: &data,
                    aad: AD,
                };
                aes.encrypt(Nonce::from_slice(&[1; 12]), payload)
                    .map(|v| v.len())
            })
        });
        g.bench_function("zstd3", |b| {
            b.iter(|| zstd::bulk::compress(&data, 3).map(|v| v.len()))
        });
        g.finish();
    }
}

fn frames(c: &mut Criterion) {
    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::Tag;
    use stackvault::crypto::xchacha;

    let key = [7u8; 32];
    let nonce = [1u8; 24];
    let rustcrypto = XChaCha20Poly1305::new((&key).into());
    let ring = xchacha::XChaCha20Poly1305::new(&key);
    let len = 256 << 10;
    // What a frame holds when it is sealed: compressed bytes.
    let frame = zstd::bulk::compress(&machine_bytes(4 * len, 11), 3)
        .map(|mut z| {
            z.resize(len, 0);
            z
        })
        .unwrap_or_else(|_| vec![0x5a; len]);
    let mut buf = frame.clone();
    let mut g = c.benchmark_group("frame_seal_256KiB");
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("rustcrypto_xchacha20poly1305", |b| {
        b.iter(|| {
            rustcrypto
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), AD, &mut buf)
                .map(|t| t[0])
        })
    });
    g.bench_function("ring_xchacha20poly1305", |b| {
        b.iter(|| {
            ring.encrypt_in_place_detached(&nonce, AD, &mut buf)
                .map(|t| t[0])
        })
    });
    g.finish();

    // Opening: each iteration opens a fresh copy of the same sealed frame (the copy is the
    // same for both, so the difference is the cipher's).
    let mut sealed = frame.clone();
    let tag = ring
        .encrypt_in_place_detached(&nonce, AD, &mut sealed)
        .unwrap_or([0; 16]);
    let mut g = c.benchmark_group("frame_open_256KiB");
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("rustcrypto_xchacha20poly1305", |b| {
        b.iter(|| {
            buf.copy_from_slice(&sealed);
            rustcrypto
                .decrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    AD,
                    &mut buf,
                    Tag::from_slice(&tag),
                )
                .is_ok()
        })
    });
    g.bench_function("ring_xchacha20poly1305", |b| {
        b.iter(|| {
            buf.copy_from_slice(&sealed);
            ring.decrypt_in_place_detached(&nonce, AD, &mut buf, &tag)
                .is_ok()
        })
    });
    g.bench_function("copy_only", |b| {
        b.iter(|| {
            buf.copy_from_slice(&sealed);
            buf[0]
        })
    });
    g.finish();
}

fn unlock(c: &mut Criterion) {
    let mut g = c.benchmark_group("argon2id_unlock");
    g.sample_size(10);
    let params = KdfParams::DEFAULT;
    g.bench_function(
        format!("m{}KiB_t{}_p{}", params.m_kib, params.t, params.p),
        |b| b.iter(|| params.derive(b"correct horse battery staple", &[3; 16])),
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = sealing, frames, unlock
}
criterion_main!(benches);
