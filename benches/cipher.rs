//! The cipher choice of encryption at rest (issue 15), measured on this machine: sealing
//! (encrypt + tag) 1 MiB frames and 64 KiB objects with XChaCha20-Poly1305 (what the engine
//! uses) and AES-256-GCM (RustCrypto `aes-gcm`, AES-NI and CLMUL detected at run time), both
//! against zstd level 3 of the same realistic bytes in the same run: the data path compresses
//! every frame, so the cipher's cost only matters relative to that. Also the unlock time of one
//! key object at the default Argon2id parameters (RFC 9106's second recommended option).
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
    targets = sealing, unlock
}
criterion_main!(benches);
