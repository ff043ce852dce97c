#!/usr/bin/env python3
"""Benchmark of `stackvault serve --nbd` against `stackvault restore` of the same snapshot.

Sequential: `qemu-img convert -O raw` from the NBD export to a file, against `restore` to a
file, alternating, each repeated; the ratio of their throughputs is the figure to read (the
machine is shared). Random: 4 KiB reads at random offsets through a small NBD client in this
file (simple replies, one request in flight), first on a fresh server (cold: every read
decompresses its frame), then the same offsets again (warm: from the frame cache); latency
percentiles per read. Memory: for each `--mem-caches` size, a fresh server and one `convert`;
the server's peak RSS (VmHWM of /proc/PID/status) above its idle peak, against the cache
size, and the peak its memory budget charged (from its `--json` stopped line).

Usage: python3 benches/nbd.py [--bin target/debug/stackvault] [--size-mib 512 | --disk PATH]
                              [--reps 3] [--reads 2000] [--cache-mib 512] [--mem-caches 8,64]
                              [--repo KEPT_REPO] [--parts seq,mem,random] [--warm-passes 1]
                              [--bins BEFORE,AFTER --rounds 2] [--inproc READ_LATENCY_BIN]
                              [--seq-cache-mib 64]
An encrypted --repo needs its password in STACKVAULT_PASSWORD.
--bins runs the NBD side of every part with each binary in turn (fresh server each; random:
the same offsets), so that a change is measured against its parent in one run; --inproc adds the same reads in
process (benches/read_latency.rs), without socket or client. The load average is printed
with each part: the machine is shared.
Needs qemu-img. Without --disk, the disk is real files of this machine with zero gaps (as
tests/lib.rs's make_disk), so it deduplicates and compresses like a root disk; --disk takes
an existing raw image (the 4 GiB gen2 of ../shared/datasets/make-disks.sh).
"""

import argparse
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time


def make_disk(path, size):
    zeros = bytes(256 * 1024)
    files = []
    for root in ("/usr/bin", "/usr/lib"):
        for d, _, names in sorted(os.walk(root)):
            for n in sorted(names):
                p = os.path.join(d, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    files.append(p)
    written = 0
    with open(path, "wb") as out:
        for p in files:
            if written >= size:
                break
            try:
                with open(p, "rb") as f:
                    data = f.read(size - written)
            except OSError:
                continue
            for part in (data, zeros):
                part = part[: size - written]
                out.write(part)
                written += len(part)
        out.truncate(size)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def start_server(bin_, repo, snap, sock, cache_mib):
    p = subprocess.Popen(
        [bin_, "--quiet", "-r", repo, "serve", snap, "--json", "--nbd", "unix:" + sock,
         "--cache-mib", str(cache_mib)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = json.loads(p.stdout.readline())
    return p, ready["exports"][0]["uri"]


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid):
    """User + system CPU seconds of a running process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(p):
    """SIGINT; returns the server's stopped line (a dict, empty if it printed none)."""
    p.send_signal(2)
    out, _ = p.communicate(timeout=60)
    for line in out.splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("event") == "stopped":
            return v
    return {}


class Client:
    """Fixed newstyle handshake with NBD_OPT_GO on the default export, simple replies."""

    def __init__(self, sock):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(sock)
        self.recv(18)
        self.s.sendall(struct.pack(">I", 3))
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
        while True:
            _, _, kind, n = struct.unpack(">QIII", self.recv(20))
            self.recv(n)
            if kind == 1:
                break
            if kind != 3:
                raise RuntimeError(f"GO answered {kind:#x}")

    def recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("server closed")
            buf += chunk
        return bytes(buf)

    def read(self, offset, length):
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))
        _, err, _ = struct.unpack(">IIQ", self.recv(16))
        if err:
            raise RuntimeError(f"read error {err}")
        return self.recv(length)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load():
    return "%.1f" % os.getloadavg()[0]


def random_reads(bin_, repo, sock, cache_mib, offsets, warm_passes, want):
    """Cold pass then `warm_passes` passes over `offsets` on a fresh server; latencies in ms."""
    p, _ = start_server(bin_, repo, "latest", sock, cache_mib)
    c = Client(sock)
    lat = {"cold": [], "warm": []}
    for i in range(1 + warm_passes):
        xs = lat["cold" if i == 0 else "warm"]
        for o in offsets:
            t0 = time.perf_counter()
            data = c.read(o, 4096)
            xs.append((time.perf_counter() - t0) * 1000)
            if o in want and data != want[o]:
                sys.exit(f"wrong data at {o}")
    r = peak_rss_mib(p.pid)
    stop(p)
    return lat, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/stackvault",
                    help="binary of every part; --bins adds others to the random part")
    ap.add_argument("--bins", default="",
                    help="comma-separated binaries compared (e.g. before,after), each in turn "
                    "on a fresh server; restore always runs --bin")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--warm-passes", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the random part per binary")
    ap.add_argument("--cache-mib", type=int, default=512)
    ap.add_argument("--disk", help="an existing raw disk image to back up and serve")
    ap.add_argument("--repo", help="a repository to keep between runs: backed up into once, "
                    "its latest snapshot served")
    ap.add_argument("--parts", default="seq,mem,random")
    ap.add_argument("--inproc", help="the read_latency bench binary: the same random reads "
                    "in process, without NBD")
    ap.add_argument("--mem-caches", default="8,64", help="cache sizes (MiB) of the memory runs")
    ap.add_argument("--seq-cache-mib", type=int, default=64,
                    help="the server's cache in the sequential part")
    a = ap.parse_args()
    bin_ = os.path.abspath(a.bin)
    parts = set(a.parts.split(","))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as t:
        disk, repo, sock = f"{t}/disk.img", f"{t}/repo", f"{t}/sv.sock"
        if a.disk:
            disk = a.disk
            a.size_mib = os.path.getsize(disk) >> 20
        else:
            make_disk(disk, a.size_mib << 20)
        if a.repo:
            repo = os.path.abspath(a.repo)
        if not (a.repo and os.path.exists(repo)):
            run([bin_, "--quiet", "init", repo])
            run([bin_, "--quiet", "-r", repo, "backup", disk, "--disk", "bench", "--json"])
        snap = "latest"
        size = os.path.getsize(disk)
        print(f"load average at start: {load()}")
        if "seq" in parts:
            sequential(a, bin_, repo, snap, sock, t)
        if "mem" in parts:
            memory(a, bin_, repo, snap, sock, t)
        if "random" in parts:
            random_part(a, bin_, repo, sock, t, disk, size)


def bins_of(a, bin_):
    """The binaries compared: --bins (e.g. before,after), else --bin."""
    return [os.path.abspath(b) for b in a.bins.split(",") if b] or [bin_]


def sequential(a, bin_, repo, snap, sock, t):
    """restore (with --bin) and `qemu-img convert` from each of --bins, alternated per rep."""
    bins = bins_of(a, bin_)
    seq = {"restore": []}
    seq.update({b: [] for b in bins})
    rss = {b: [] for b in bins}
    cpu = {"restore": []}
    cpu.update({b: [] for b in bins})
    lookups = {b: [] for b in bins}
    loads = [load()]
    out = f"{t}/out.img"
    for _ in range(a.reps):
        if os.path.exists(out):
            os.remove(out)
        t0 = time.monotonic()
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run([bin_, "--quiet", "-r", repo, "restore", snap, out])
        seq["restore"].append(time.monotonic() - t0)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["restore"].append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
        os.remove(out)
        for b in bins:
            p, uri = start_server(b, repo, snap, sock, a.seq_cache_mib)
            t0 = time.monotonic()
            run(["qemu-img", "convert", "-O", "raw", uri, out])
            seq[b].append(time.monotonic() - t0)
            rss[b].append(peak_rss_mib(p.pid))
            cpu[b].append(cpu_s(p.pid))
            lookups[b].append(stop(p).get("reader", {}).get("index_lookups", -1))
            os.remove(out)
        loads.append(load())
    med = {k: sorted(v)[len(v) // 2] for k, v in seq.items()}
    mcpu = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    print(f"| sequential, {a.size_mib} MiB disk | binary | wall s (median of {a.reps}) | all "
          f"| MiB/s | NBD / restore | CPU s (restore; server) | index lookups "
          f"| server peak RSS MiB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    runs = " ".join(f"{x:.2f}" for x in seq["restore"])
    print(f"| stackvault restore to a file | {os.path.basename(bin_)} | {med['restore']:.2f} "
          f"| {runs} | {a.size_mib / med['restore']:.0f} | | {mcpu['restore']:.2f} | | |")
    for b in bins:
        runs = " ".join(f"{x:.2f}" for x in seq[b])
        print(f"| qemu-img convert from serve --nbd (cache {a.seq_cache_mib} MiB) "
              f"| {b} | {med[b]:.2f} | {runs} | {a.size_mib / med[b]:.0f} "
              f"| {med['restore'] / med[b]:.2f} | {mcpu[b]:.2f} | {max(lookups[b])} "
              f"| {max(rss[b]):.0f} |")
    for b in bins:
        print(f"NBD / restore throughput ({b}): "
              f"{med['restore'] / med[b]:.2f}")
    print(f"load average {' '.join(loads)}")


def memory(a, bin_, repo, snap, sock, t):
    print()
    print("| cache MiB | binary | idle peak RSS MiB | peak RSS MiB | growth over idle MiB "
          "| growth - cache MiB | budget peak MiB | SQLite peak MiB | convert s | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cache in [int(c) for c in a.mem_caches.split(",") if c]:
        for b in bins_of(a, bin_):
            out = f"{t}/out.img"
            p, uri = start_server(b, repo, snap, sock, cache)
            idle = peak_rss_mib(p.pid)
            t0 = time.monotonic()
            run(["qemu-img", "convert", "-O", "raw", uri, out])
            took = time.monotonic() - t0
            peak = peak_rss_mib(p.pid)
            stopped = stop(p)
            os.remove(out)
            mem = stopped.get("memory", {})
            budget = mem.get("peak_bytes", float("nan")) / 2**20
            sqlite = stopped.get("sqlite_peak_bytes", float("nan")) / 2**20
            print(f"| {cache} | {b} | {idle:.1f} | {peak:.1f} "
                  f"| {peak - idle:.1f} | {peak - idle - cache:.1f} | {budget:.1f} "
                  f"| {sqlite:.1f} | {took:.2f} | {load()} |")


def random_part(a, bin_, repo, sock, t, disk, size):
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.reads)]
    with open(disk, "rb") as f:
        want = {o: (f.seek(o), f.read(4096))[1] for o in offsets[:50]}
    bins = bins_of(a, bin_)
    rows = []
    for r in range(a.rounds):
        for b in bins:
            before = load()
            lat, rss = random_reads(b, repo, sock, a.cache_mib, offsets, a.warm_passes, want)
            rows.append((os.path.basename(b), r, lat, rss, f"{before}-{load()}"))
    print()
    print(f"| random 4 KiB reads ({a.reads} offsets, cache {a.cache_mib} MiB, "
          f"{a.warm_passes} warm passes) | binary | reads | p50 ms | p90 ms | p99 ms "
          f"| p99.9 ms | max ms | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r, lat, rss, loads in rows:
        for phase, xs in lat.items():
            print(f"| NBD {phase}, round {r + 1} | {name} | {len(xs)} | {pct(xs, .5):.3f} "
                  f"| {pct(xs, .9):.3f} | {pct(xs, .99):.3f} | {pct(xs, .999):.3f} "
                  f"| {max(xs):.3f} | {loads} |")
    if a.inproc:
        path = f"{t}/offsets.txt"
        with open(path, "w") as f:
            f.write("\n".join(map(str, offsets)))
        before = load()
        v = json.loads(run([os.path.abspath(a.inproc), repo, "latest", path, "4096",
                            str(a.cache_mib), str(a.warm_passes)]).stdout)
        loads = f"{before}-{load()}"
        for phase in ("cold", "warm"):
            s = v[phase]
            print(f"| in process {phase} | read_latency | {s['reads']} | {s['p50_ms']:.3f} "
                  f"| {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | {s['p999_ms']:.3f} "
                  f"| {s['max_ms']:.3f} | {loads} |")
        print(f"in process, warm passes: {v['warm_index_lookups']} index lookups, "
              f"{v['warm_frames_decoded']} frames decoded")


if __name__ == "__main__":
    main()
