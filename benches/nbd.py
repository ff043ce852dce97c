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
Needs qemu-img. Without --disk, the disk is real files of this machine with zero gaps (as
tests/lib.rs's make_disk), so it deduplicates and compresses like a root disk; --disk takes
an existing raw image (the 4 GiB gen2 of ../shared/datasets/make-disks.sh).
"""

import argparse
import json
import os
import random
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/stackvault")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--cache-mib", type=int, default=512)
    ap.add_argument("--disk", help="an existing raw disk image to back up and serve")
    ap.add_argument("--mem-caches", default="8,64", help="cache sizes (MiB) of the memory runs")
    a = ap.parse_args()
    bin_ = os.path.abspath(a.bin)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as t:
        disk, repo, sock = f"{t}/disk.img", f"{t}/repo", f"{t}/sv.sock"
        if a.disk:
            disk = a.disk
            a.size_mib = os.path.getsize(disk) >> 20
        else:
            make_disk(disk, a.size_mib << 20)
        run([bin_, "--quiet", "init", repo])
        snap = json.loads(run([bin_, "--quiet", "-r", repo, "backup", disk, "--disk", "bench",
                               "--json"]).stdout)["snapshot_id"]
        size = os.path.getsize(disk)
        seq = {"restore": [], "nbd": []}
        rss = []
        for _ in range(a.reps):
            out = f"{t}/out.img"
            if os.path.exists(out):
                os.remove(out)
            t0 = time.monotonic()
            run([bin_, "--quiet", "-r", repo, "restore", snap, out])
            seq["restore"].append(time.monotonic() - t0)
            os.remove(out)
            p, uri = start_server(bin_, repo, snap, sock, 64)
            t0 = time.monotonic()
            run(["qemu-img", "convert", "-O", "raw", uri, out])
            seq["nbd"].append(time.monotonic() - t0)
            rss.append(peak_rss_mib(p.pid))
            stop(p)
            os.remove(out)
        med = {k: sorted(v)[len(v) // 2] for k, v in seq.items()}
        print(f"| sequential, {a.size_mib} MiB disk | wall s (median of {a.reps}) | MiB/s |")
        print("|---|---:|---:|")
        for k, label in (("restore", "stackvault restore to a file"),
                         ("nbd", "qemu-img convert from serve --nbd (cache 64 MiB)")):
            print(f"| {label} | {med[k]:.2f} | {a.size_mib / med[k]:.0f} |")
        print(f"NBD / restore throughput: {med['restore'] / med['nbd']:.2f}; "
              f"server peak RSS {max(rss):.0f} MiB")

        print()
        print("| cache MiB | idle peak RSS MiB | peak RSS MiB | growth over idle MiB "
              "| growth / cache | budget peak MiB | convert s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for cache in [int(c) for c in a.mem_caches.split(",") if c]:
            out = f"{t}/out.img"
            p, uri = start_server(bin_, repo, snap, sock, cache)
            idle = peak_rss_mib(p.pid)
            t0 = time.monotonic()
            run(["qemu-img", "convert", "-O", "raw", uri, out])
            took = time.monotonic() - t0
            peak = peak_rss_mib(p.pid)
            stopped = stop(p)
            os.remove(out)
            budget = stopped.get("memory", {}).get("peak_bytes", float("nan")) / 2**20
            print(f"| {cache} | {idle:.1f} | {peak:.1f} | {peak - idle:.1f} "
                  f"| {(peak - idle) / cache:.2f} | {budget:.1f} | {took:.2f} |")

        rng = random.Random(7)
        offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.reads)]
        p, _ = start_server(bin_, repo, snap, sock, a.cache_mib)
        c = Client(sock)
        with open(disk, "rb") as f:
            want = {o: (f.seek(o), f.read(4096))[1] for o in offsets[:50]}
        lat = {}
        for phase in ("cold", "warm"):
            xs = []
            for o in offsets:
                t0 = time.perf_counter()
                data = c.read(o, 4096)
                xs.append((time.perf_counter() - t0) * 1000)
                if o in want and data != want[o]:
                    sys.exit(f"wrong data at {o}")
            lat[phase] = xs
        r = peak_rss_mib(p.pid)
        stop(p)
        print()
        print(f"| random 4 KiB reads ({a.reads}, cache {a.cache_mib} MiB) | p50 ms | p90 ms "
              f"| p99 ms | max ms |")
        print("|---|---:|---:|---:|---:|")
        for phase, xs in lat.items():
            print(f"| {phase} | {pct(xs, .5):.3f} | {pct(xs, .9):.3f} | {pct(xs, .99):.3f} "
                  f"| {max(xs):.3f} |")
        print(f"server peak RSS {r:.0f} MiB")


if __name__ == "__main__":
    main()
