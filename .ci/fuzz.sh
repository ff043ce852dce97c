#!/usr/bin/env bash
# Short, bounded fuzz run of every decoder target (fuzz/fuzz_targets/*), seeded from
# fuzz/corpus/<target>/. New inputs go to a scratch directory, never into the repository.
# Installs cargo-fuzz when missing; skips (exit 0, with a message) when it cannot.
# Usage: .ci/fuzz.sh [SECONDS_PER_TARGET]   (default 20)
set -euo pipefail

cd "$(dirname "$0")/.."
secs="${1:-20}"

if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)"
    if ! cargo install cargo-fuzz --locked; then
        echo "fuzz: SKIPPED: cargo-fuzz could not be installed"
        exit 0
    fi
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cd fuzz
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${secs}s"
    # --sanitizer none runs on the stable toolchain; crashes fail the script.
    cargo fuzz run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 15
done
echo "fuzz: all targets ran without a crash"
