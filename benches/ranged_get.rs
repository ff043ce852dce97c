//! How fast Azurite serves a pack, by the shape of the GETs: the ceiling a remote restore
//! meets on it, measured before optimising for it.
//!
//! A fresh Azurite (in memory, from `.ci/azurite.sh`) holds `--packs` random objects of
//! `--pack-mib` MiB (a pack). With `--in-flight` threads reading at once, each pass reads every
//! pack once in one of three ways, alternated pass by pass: the whole object in one buffered GET
//! (`get`), in ranged GETs of 4 MiB (`get_range`, the restore's old span), and in one
//! streamed ranged GET read in 256 KiB pieces (`open_range`, the restore's span now). Prints
//! MiB/s and GETs/s of each (medians of `--reps` passes) and the load average: the ratios
//! between the rows say what the request shape costs the server, the absolute figures what
//! one Node process can serve on this machine.
//!
//! `cargo bench --bench ranged_get [-- --packs 16 --pack-mib 16 --in-flight 8 --reps 3]`

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use stackvault::store::{AzureBlobBackend, AzureCredential, AzureStoreOptions, Backend};

const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret).
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const MIB: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Shape {
    Whole,
    Ranges4Mib,
    Streamed,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Whole => "get (whole object)",
            Shape::Ranges4Mib => "get_range (4 MiB ranges)",
            Shape::Streamed => "open_range (one streamed GET)",
        }
    }
}

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("a value after the flag")?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// Reads every pack once in `shape` with `in_flight` threads; returns (seconds, GETs).
fn pass(
    b: &AzureBlobBackend,
    keys: &[String],
    size: usize,
    shape: Shape,
    in_flight: usize,
) -> Result<(f64, usize)> {
    let next = AtomicUsize::new(0);
    let gets = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..in_flight)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = Vec::new();
                    let mut piece = vec![0u8; 256 << 10];
                    while let Some(key) = keys.get(next.fetch_add(1, Ordering::SeqCst)) {
                        match shape {
                            Shape::Whole => {
                                buf = b.get(key)?;
                                gets.fetch_add(1, Ordering::SeqCst);
                            }
                            Shape::Ranges4Mib => {
                                for at in (0..size).step_by(4 * MIB) {
                                    b.get_range_into(
                                        key,
                                        at as u64,
                                        (4 * MIB).min(size - at),
                                        &mut buf,
                                    )?;
                                    gets.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Shape::Streamed => {
                                let mut stream = b.open_range(key, 0, size as u64)?;
                                let mut got = 0;
                                loop {
                                    let n = stream.read(&mut piece)?;
                                    if n == 0 {
                                        break;
                                    }
                                    got += n;
                                }
                                if got != size {
                                    bail!("{key}: read {got} of {size} bytes");
                                }
                                gets.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    drop(buf);
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(())
    })?;
    Ok((started.elapsed().as_secs_f64(), gets.load(Ordering::SeqCst)))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let packs = arg("--packs", 16)?;
    let pack_mib = arg("--pack-mib", 16)?;
    let in_flight = arg("--in-flight", 8)?.max(1);
    let reps = arg("--reps", 3)?.max(1);
    if !stackvault_tests::azurite_bin().exists() {
        eprintln!("skipped: Azurite is not installed (run .ci/azurite.sh)");
        return Ok(());
    }
    let azurite = stackvault_tests::Azurite::start()?;
    let options = AzureStoreOptions {
        endpoint: Some(format!("http://127.0.0.1:{}/{ACCOUNT}", azurite.port)),
        ..AzureStoreOptions::new(AzureCredential::SharedKey(KEY.into()))
    };
    AzureBlobBackend::open(&format!("azure://{ACCOUNT}/bench"), &options)?.create_container()?;
    let b = AzureBlobBackend::open(&format!("azure://{ACCOUNT}/bench/r"), &options)?;
    let size = pack_mib * MIB;
    let mut data = vec![0u8; size];
    let mut keys = Vec::new();
    for i in 0..packs {
        // Different bytes per object (xorshift): nothing for the server to share.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
        for word in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        let key = format!("packs/{i:02x}/{i:064x}");
        b.put(&key, &data)?;
        keys.push(key);
    }
    drop(data);
    println!(
        "Azurite, {packs} objects of {pack_mib} MiB, {in_flight} in flight, {reps} passes each; load before {}",
        load()
    );
    let shapes = [Shape::Whole, Shape::Ranges4Mib, Shape::Streamed];
    let mut times: Vec<Vec<(f64, usize)>> = vec![Vec::new(); shapes.len()];
    for _ in 0..reps {
        for (i, shape) in shapes.iter().enumerate() {
            times[i].push(pass(&b, &keys, size, *shape, in_flight)?);
        }
    }
    let total_mib = (packs * pack_mib) as f64;
    for (shape, runs) in shapes.iter().zip(&mut times) {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (secs, gets) = runs[runs.len() / 2];
        println!(
            "{:32} {:8.1} MiB/s {:8.1} GETs/s ({secs:.2} s, {gets} GETs)",
            shape.name(),
            total_mib / secs,
            gets as f64 / secs
        );
    }
    println!("load after {}", load());
    Ok(())
}
