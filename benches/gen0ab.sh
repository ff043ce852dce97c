#!/bin/bash
# A/B of gen0 and gen1 backups, two stackvault binaries alternated, encrypted and plain.
#
#   benches/gen0ab.sh PREV_BIN NEW_BIN [DATA_DIR] [REPS] [WORK_DIR]
#
# DATA_DIR holds gen0.raw and gen1.raw (benches/compare.sh's data sets: /var/tmp/bench/data is
# 1 GiB, /var/tmp/bench4/data 4 GiB; default the 1 GiB set), REPS repetitions (default 3).
# Each run gets a fresh repository: gen0 is a full backup, gen1 an incremental on top (read
# whole, as compare.sh does). The order of the binaries alternates between repetitions, so a
# machine getting busier favours neither. Measured with /usr/bin/time: wall, user+sys CPU.
# Prints one line per backup, then per (mode, step, binary) the medians and new/prev ratios.
# Decide on CPU seconds: wall times of one binary spread by ±15 % on a shared machine.
#
# STEPS (environment, default "gen0 gen1") names the backups of each run, in order, each an
# incremental on the one before: STEPS="gen0 gen1 gen2" also times gen2 (DATA_DIR needs
# gen2.raw). The incrementals of issue 14 (gen1 and gen2, encrypted and plain, 4 GiB):
#
#   STEPS="gen0 gen1 gen2" benches/gen0ab.sh /var/tmp/lead/sv-main NEW /var/tmp/bench4/data 3
set -euo pipefail
prev=${1:?usage: gen0ab.sh PREV_BIN NEW_BIN [DATA_DIR] [REPS] [WORK_DIR]}
new=${2:?usage: gen0ab.sh PREV_BIN NEW_BIN [DATA_DIR] [REPS] [WORK_DIR]}
data=${3:-/var/tmp/bench/data}
reps=${4:-3}
work=${5:-/var/tmp/gen0ab.$$}
steps=${STEPS:-gen0 gen1}
# shellcheck disable=SC2046,SC2086 # $steps is a list of words
for f in "$prev" "$new" /usr/bin/time $(for s in $steps; do echo "$data/$s.raw"; done); do
  [ -e "$f" ] || { echo "gen0ab: missing $f" >&2; exit 2; }
done
export STACKVAULT_PASSWORD=bench
out=$(mktemp)
trap 'rm -rf "$work" "$out" "$out.t"' EXIT
echo "# $(date -u '+%F %T UTC') data=$data reps=$reps steps=$steps load=$(cut -d' ' -f1-3 /proc/loadavg)"
echo "# prev=$prev new=$new"
echo "# rep mode step bin wall_s cpu_s"
for rep in $(seq 1 "$reps"); do
  for mode in encrypted plain; do
    order="prev new"; [ $((rep % 2)) = 0 ] && order="new prev"
    for b in $order; do
      bin=$prev; [ "$b" = new ] && bin=$new
      rm -rf "$work"; mkdir -p "$work"
      enc=""; [ "$mode" = plain ] && enc="--encryption none"
      # shellcheck disable=SC2086
      "$bin" --quiet init "$work/repo" $enc >/dev/null
      for step in $steps; do
        /usr/bin/time -f "%e %U %S" -o "$out.t" \
          "$bin" --quiet backup "$work/repo" "$data/$step.raw" --disk d >/dev/null
        read -r wall user sys < "$out.t"
        line="$rep $mode $step $b $wall $(echo "$user + $sys" | bc)"
        echo "$line"; echo "$line" >> "$out"
      done
    done
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# mode step: median wall prev/new (new/prev), median CPU prev/new (new/prev)"
# shellcheck disable=SC2086
python3 - "$out" $steps <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
steps = sys.argv[2:]
for mode in ("encrypted", "plain"):
    for step in steps:
        m = {}
        for b in ("prev", "new"):
            sel = [r for r in rows if r[1] == mode and r[2] == step and r[3] == b]
            m[b] = (statistics.median(float(r[4]) for r in sel),
                    statistics.median(float(r[5]) for r in sel))
        (pw, pc), (nw, nc) = m["prev"], m["new"]
        print(f"{mode:9} {step}: wall {pw:.2f} / {nw:.2f} s ({nw / pw:.3f}), "
              f"CPU {pc:.2f} / {nc:.2f} s ({nc / pc:.3f})")
for b in ("prev", "new"):
    for step in steps:
        c = {mode: statistics.median(float(r[5]) for r in rows
                                     if r[1] == mode and r[2] == step and r[3] == b)
             for mode in ("encrypted", "plain")}
        print(f"{b:4} {step}: encrypted CPU / plain CPU = {c['encrypted'] / c['plain']:.3f}")
PY
