#!/bin/bash
# A/B of two stackvault binaries that write different frames (frame target size or zstd
# level): repository size, backup CPU, restore CPU and a prune that rewrites packs.
#
#   benches/frame_ab.sh PREV_BIN NEW_BIN [DATA_DIR] [WORK_DIR] [REPS]
#
# DATA_DIR holds gen0.raw, gen1.raw and gen2.raw (default /var/tmp/bench4/data, the 4 GiB set
# of benches/compare.sh), REPS repetitions (default 3), WORK_DIR scratch (two repositories
# of about 1 GiB each and a restored disk; removed at the end unless KEEP_REPOS=1, which keeps
# each binary's last repository before the prune as WORK_DIR/keep-prev and keep-new, e.g. for
# `benches/nbd.py --repo`). PREV_INIT and NEW_INIT add arguments to each binary's `init`
# (e.g. NEW_INIT="--zstd-level 4" to compare a level with the same binary twice).
#
# Per repetition and binary, the order alternating between repetitions so that a machine
# getting busier favours neither: a fresh encrypted repository (the default), backups of
# gen0, gen1 and gen2 (each read whole, as compare.sh does), the repository's bytes (`du -sb`,
# compare.sh's measure: restic 0.14 stores the same three generations in 1230.9 MiB), a
# restore of gen2 (checked byte for byte against gen2.raw), then, on a copy, `forget` of gen0
# and `prune`: the bytes of the packs it wrote (what it rewrote) and what it freed. CPU is
# user+sys from /usr/bin/time. Decide on CPU seconds and bytes: wall times on a shared machine
# spread by ±15 %.
#
# Prints one line per measurement, then per quantity the medians and new/prev ratios.
set -euo pipefail
usage="usage: frame_ab.sh PREV_BIN NEW_BIN [DATA_DIR] [WORK_DIR] [REPS]"
prev=${1:?$usage}
new=${2:?$usage}
data=${3:-/var/tmp/bench4/data}
work=${4:-/var/tmp/frame_ab.$$}
reps=${5:-3}
for f in "$prev" "$new" /usr/bin/time "$data/gen0.raw" "$data/gen1.raw" "$data/gen2.raw"; do
  [ -e "$f" ] || { echo "frame_ab: missing $f" >&2; exit 2; }
done
export STACKVAULT_PASSWORD=bench
mkdir -p "$work"
out="$work/rows.txt"
: > "$out"
cleanup() {
  # The rows stay in WORK_DIR/rows.txt.
  rm -rf "$work/repo" "$work/pruned" "$work/out.raw" "$work/t" "$work/stdout" \
    "$work/packs.before" "$work/packs.after"
  [ "${KEEP_REPOS:-0}" = 1 ] || rm -rf "$work/keep-prev" "$work/keep-new"
}
trap cleanup EXIT

# timed LABEL CMD...: runs CMD, appends "rep bin LABEL wall cpu" to the rows.
timed() {
  local label=$1; shift
  /usr/bin/time -f "%e %U %S" -o "$work/t" "$@" > "$work/stdout"
  local wall user sys
  read -r wall user sys < "$work/t"
  row "$label" "$wall $(echo "$user + $sys" | bc)"
}
row() { local line="$rep $b $1 $2"; echo "$line"; echo "$line" >> "$out"; }
# Pack files (path and size) of a repository, sorted.
packs() { (cd "$1" && find packs -type f ! -name '.tmp-*' -printf '%p %s\n' | sort); }

echo "# $(date -u '+%F %T UTC') data=$data reps=$reps load=$(cut -d' ' -f1-3 /proc/loadavg)"
echo "# prev=$prev"
echo "# new=$new"
echo "# init: prev '${PREV_INIT:-}' new '${NEW_INIT:-}'"
echo "# rep bin quantity value(s)   (times: wall_s cpu_s; bytes)"
for rep in $(seq 1 "$reps"); do
  order="prev new"; [ $((rep % 2)) = 0 ] && order="new prev"
  for b in $order; do
    bin=$prev; [ "$b" = new ] && bin=$new
    repo="$work/repo"
    rm -rf "$repo" "$work/pruned" "$work/out.raw"
    init_args=${PREV_INIT:-}; [ "$b" = new ] && init_args=${NEW_INIT:-}
    # shellcheck disable=SC2086
    "$bin" --quiet init "$repo" $init_args >/dev/null
    for g in 0 1 2; do
      timed "gen$g" "$bin" --quiet backup "$repo" "$data/gen$g.raw" --disk d --json
      [ "$g" = 0 ] && gen0_id=$(jq -r .snapshot_id "$work/stdout")
    done
    row repo_bytes "$(du -sb "$repo" | cut -f1)"
    timed restore "$bin" --quiet restore "$repo" latest "$work/out.raw"
    cmp -s "$work/out.raw" "$data/gen2.raw" || { echo "frame_ab: $b's restore differs" >&2; exit 1; }
    rm -f "$work/out.raw"
    cp -a "$repo" "$work/pruned"
    "$bin" --quiet forget "$work/pruned" "$gen0_id" >/dev/null
    packs "$work/pruned" > "$work/packs.before"
    timed prune "$bin" --quiet prune "$work/pruned" --json
    packs "$work/pruned" > "$work/packs.after"
    row prune_written_bytes "$(comm -13 "$work/packs.before" "$work/packs.after" \
      | awk '{s += $2} END {print s + 0}')"
    row prune_freed_bytes "$(jq .freed_bytes "$work/stdout")"
    row repo_after_prune_bytes "$(du -sb "$work/pruned" | cut -f1)"
    rm -rf "$work/pruned" "$work/keep-$b"
    mv "$repo" "$work/keep-$b"
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# quantity: median prev / new (new/prev); CPU seconds for timed steps"
python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
quantities = list(dict.fromkeys(r[2] for r in rows))
for q in quantities:
    m = {}
    for b in ("prev", "new"):
        sel = [r for r in rows if r[1] == b and r[2] == q]
        # Timed rows carry wall and CPU: the CPU (last) is the figure.
        m[b] = statistics.median(float(r[-1]) for r in sel)
    p, n = m["prev"], m["new"]
    unit = "CPU s" if any(len(r) == 5 for r in rows if r[2] == q) else ""
    if q.endswith("bytes"):
        print(f"{q:24} {p / 2**20:10.1f} / {n / 2**20:10.1f} MiB ({n / p if p else float('nan'):.4f})"
              + (f"   × restic's 1230.9 MiB (4 GiB set): {p / 2**20 / 1230.9:.4f} / {n / 2**20 / 1230.9:.4f}"
                 if q == "repo_bytes" else ""))
    else:
        print(f"{q:24} {p:10.2f} / {n:10.2f} {unit} ({n / p if p else float('nan'):.4f})")
PY
