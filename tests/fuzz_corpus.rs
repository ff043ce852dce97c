//! The fuzz targets' checks on every `cargo test`: each input of `fuzz/corpus/<target>/` and
//! deterministic mutations of it (every prefix length at a stride, single-byte flips, length
//! fields blown up) go through the same function the cargo-fuzz target calls
//! (`fuzz/checks.rs`). A decoder that panics, or accepts something its target says it must
//! not, fails here without cargo-fuzz; `.ci/fuzz.sh` runs the real fuzzer for longer.

use std::path::{Path, PathBuf};

#[path = "../fuzz/checks.rs"]
mod checks;

/// Mutations per corpus input, at most: each is a full decode, and the VHD check walks up to
/// 16 MiB of the image.
const PREFIXES: usize = 48;
const FLIPS: usize = 192;

fn check_for(target: &str) -> Option<fn(&[u8])> {
    Some(match target {
        "changes" => checks::changes,
        "delta" => checks::delta,
        "key_object" => checks::key_object,
        "manifest" => checks::manifest,
        "pack" => checks::pack,
        "sealed" => checks::sealed,
        "vhd" => checks::vhd,
        _ => return None,
    })
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The targets cargo-fuzz knows (`fuzz_targets/*.rs`), so a new target without a check here
/// fails instead of going unreplayed.
fn targets() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Evenly spread positions in `0..len`, at most `n` of them.
fn spread(len: usize, n: usize) -> impl Iterator<Item = usize> {
    let step = len.div_ceil(n).max(1);
    (0..len).step_by(step)
}

/// The input and its mutations, in a fixed order so a failure names a reproducible case.
fn mutations(input: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("as stored".to_string(), input.to_vec())];
    for cut in spread(input.len(), PREFIXES) {
        out.push((format!("first {cut} bytes"), input[..cut].to_vec()));
    }
    for at in spread(input.len(), FLIPS) {
        for (what, byte) in [("flipped", input[at] ^ 0xff), ("0x80 at", 0x80)] {
            let mut m = input.to_vec();
            m[at] = byte;
            out.push((format!("{what} byte {at}"), m));
        }
    }
    // Length and count fields set to their largest value: four 0xff bytes at each spot.
    for at in spread(input.len().saturating_sub(3), FLIPS / 4) {
        let mut m = input.to_vec();
        m[at..at + 4].fill(0xff);
        out.push((format!("0xffffffff at {at}"), m));
    }
    out
}

#[test]
fn every_fuzz_target_has_a_check_and_a_corpus() {
    let targets = targets();
    assert_eq!(targets.len(), 7, "fuzz targets found: {targets:?}");
    for t in &targets {
        assert!(
            check_for(t).is_some(),
            "fuzz target {t} has no check in fuzz/checks.rs"
        );
        let inputs = std::fs::read_dir(fuzz_dir().join("corpus").join(t))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{t}: {e}"))
            .count();
        assert!(inputs > 0, "fuzz/corpus/{t} is empty: add a seed input");
    }
}

#[test]
fn the_corpus_and_its_mutations_pass_every_check() {
    let mut cases = 0usize;
    for t in targets() {
        let check = check_for(&t).expect("checked above");
        let dir = fuzz_dir().join("corpus").join(&t);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("corpus dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for file in files {
            let input = std::fs::read(&file).expect("corpus input");
            for (what, bytes) in mutations(&input) {
                let run = std::panic::catch_unwind(|| check(&bytes));
                assert!(
                    run.is_ok(),
                    "fuzz check {t} panicked on {} ({what})",
                    file.display()
                );
                cases += 1;
            }
        }
    }
    // 19 corpus inputs today, each with up to ~350 mutations.
    assert!(cases > 1000, "only {cases} cases replayed");
}
