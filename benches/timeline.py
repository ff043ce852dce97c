#!/usr/bin/env python3
"""The timeline of one remote incremental backup: when each request of a gen1 leaves, in
seconds from the start of the process, and the phases they mark.

Starts moto and the round-trip proxy of `remote.py`, backs up gen0 (untimed), then backs up
gen1 under `strace -f -ttt -e trace=sendto,openat,fsync,fdatasync` (the tracing slows the
process down, so read the gaps between phases, not the total) and prints:

  - every request (method and object, or the listed prefix) with its time and thread, and
    every fsync (the cache index's commits and checkpoints);
  - the phases: open (config GET and the listings), key GET, key derivation done (the cache
    index opens), writer lease and condemned listing, data (first to last pack PUT), re-check
    (its listings), manifest PUT, lease DELETE, exit.

Usage: python3 benches/timeline.py --bin target/release/stackvault --data /var/tmp/bench4/data
                                   [--rtt 20] [--work /var/tmp/timeline]
`--store azurite` runs the same against Azurite (`.ci/azurite.sh`).
Needs strace, moto (`.ci/moto.sh`) and the data directory of `remote.py` (gen0.raw, gen1.raw).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import remote as R  # noqa: E402

REQUEST = re.compile(r'^(\d+)\s+([\d.]+)\s+sendto\(\d+, "(GET|PUT|HEAD|DELETE|POST) ([^ ]+) HTTP')
OPEN = re.compile(r'^(\d+)\s+([\d.]+)\s+openat\(.*"([^"]+)"')
SYNC = re.compile(r'^(\d+)\s+([\d.]+)\s+(fsync|fdatasync)\(')


def what(method, target):
    """A request as a short label: `list PREFIX` or `METHOD KEY` (account, bucket or
    container and the repository prefix dropped; Azure's block calls keep their `comp`)."""
    m = re.search(r"prefix=[^&/]*?%2F([^&]*)", target)
    if ("list-type=2" in target or "comp=list" in target) and m:
        return "list " + m.group(1).replace("%2F", "/")
    path = target.split("?")[0]
    if path.startswith("/" + R.AZ_ACCOUNT + "/"):
        path = path[len(R.AZ_ACCOUNT) + 1:]
    key = path.split("/", 3)[-1]
    comp = re.search(r"comp=(\w+)", target)
    return f"{method} {key}" + (f" ({comp.group(1)})" if comp else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/stackvault")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rtt", type=float, default=20.0, help="round trip in ms")
    ap.add_argument("--work", default="/var/tmp/timeline")
    ap.add_argument("--store", choices=["moto", "azurite"], default="moto")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is needed")
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    store = (R.Moto if args.store == "moto" else R.Azurite)(args.work)
    try:
        proxy = R.Proxy(store.port, args.rtt / 1000)
        place = store.new_place()
        loc, endpoint, _ = store.locations(place, proxy)
        env = dict(os.environ, **store.env(), XDG_CACHE_HOME=os.path.join(args.work, "cache"))
        env.setdefault("STACKVAULT_PASSWORD", "timeline")
        trace = os.path.join(args.work, "gen1.strace")

        def run(sub, traced=False):
            cmd = [os.path.abspath(args.bin), "-r", loc, "--endpoint", endpoint] + sub
            if traced:
                cmd = ["strace", "--seccomp-bpf", "-f", "-ttt", "-s", "200",
                       "-e", "trace=sendto,openat,fsync,fdatasync,exit_group", "-o", trace] + cmd
            t = time.time()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            return time.time() - t

        run(["init"])
        run(["backup", os.path.join(args.data, "gen0.raw"), "--disk", "d"])
        wall = run(["backup", os.path.join(args.data, "gen1.raw"), "--disk", "d"], traced=True)
    finally:
        store.stop()

    events = []
    start = None
    with open(trace) as f:
        for line in f:
            m = REQUEST.match(line)
            o = OPEN.match(line)
            if start is None:
                parts = line.split()
                if len(parts) > 1:
                    start = float(parts[1])
            if m:
                events.append((float(m.group(2)), m.group(1), what(m.group(3), m.group(4))))
            elif SYNC.match(line):
                sm = SYNC.match(line)
                events.append((float(sm.group(2)), sm.group(1), sm.group(3)))
            elif o and "ENOENT" not in line and o.group(3).endswith("index.sqlite"):
                events.append((float(o.group(2)), o.group(1), "open the cache index"))
        end = float(line.split()[1]) if line.split() else start
    print(f"gen1 at {args.rtt:g} ms under strace: {wall:.2f} s wall")
    for t, tid, label in events:
        print(f"{t - start:8.3f}  {tid:>7}  {label}")

    def first(pred):
        return next((t - start for t, _, l in events if pred(l)), None)

    def last(pred):
        return next((t - start for t, _, l in reversed(events) if pred(l)), None)

    phases = [
        ("config GET", first(lambda l: l.endswith(" config"))),
        ("key GET", first(lambda l: l.startswith("GET ") and l.split(" ", 1)[1].startswith("keys/"))),
        ("cache index opened (derivation done)", first(lambda l: l == "open the cache index")),
        ("lease create", first(lambda l: l.startswith("PUT ") and l.split(" ", 1)[1].startswith("locks/"))),
        ("first pack PUT", first(lambda l: l.startswith("PUT ") and l.split(" ", 1)[1].startswith("packs/"))),
        ("last pack PUT", last(lambda l: l.startswith("PUT ") and l.split(" ", 1)[1].startswith("packs/"))),
        ("last delta PUT", last(lambda l: l.startswith("PUT ") and l.split(" ", 1)[1].startswith("index/"))),
        ("re-check (last condemned listing)", last(lambda l: l == "list condemned/")),
        ("manifest PUT", first(lambda l: l.startswith("PUT ") and l.split(" ", 1)[1].startswith("snapshots/"))),
        ("lease DELETE", first(lambda l: l.startswith("DELETE ") and l.split(" ", 1)[1].startswith("locks/"))),
        ("exit", end - start),
    ]
    print("\nphases (s from start):")
    for name, t in phases:
        print(f"  {name:40} {'-' if t is None else f'{t:.3f}'}")
    at = dict(phases)
    delta, lease = at["last delta PUT"], at["lease create"]
    if delta is not None and lease is not None:
        print(f"\nbefore the lease: {lease:.3f} s; after the last delta PUT: "
              f"{at['exit'] - delta:.3f} s (the round trips this timeline is for)")


if __name__ == "__main__":
    main()
