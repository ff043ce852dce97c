#!/usr/bin/env python3
"""Object storage benchmark: stackvault against restic on the same moto S3 server.

For each injected round trip (default 0 and 20 ms) and each repetition, both tools (in
alternating order) back up gen0, gen1 and gen2 of one disk into a fresh bucket, then restore
gen2. Every request goes through a latency proxy in this script, which delays each answer by
the round trip and counts requests and the bytes sent to the server (request lines, headers
and bodies), so both tools are measured by the same instrument. Wall time and peak RSS come
from /usr/bin/time. Figures are medians over repetitions, each with its ratio to restic
measured in the same run. restic is Debian's (`apt-get install restic`, installed here when
missing and allowed); moto comes from `.ci/moto.sh`.

Disks: ../shared/datasets/make-disks.sh --small (256 MiB, real files, a week of changes per
generation) when present, else generated here (256 MiB, 55 % real files of /usr, 5 % of the
blocks rewritten per generation).

Usage: python3 benches/remote.py [--bin target/debug/stackvault] [--size-mib 256]
                                 [--reps 3] [--rtt 0,20] [--results benches/RESULTS.md]
"""

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_DISKS = os.path.join(ROOT, "..", "shared", "datasets", "make-disks.sh")
MOTO = os.path.join(ROOT, ".ci", "moto", "bin", "moto_server")
KEY_ID, SECRET = "benchkey", "benchsecret"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP proxy to 127.0.0.1:upstream that delays every piece of an answer by `rtt` and
    counts the HTTP requests and the bytes clients send (parsing request heads for their
    Content-Length, so keep-alive connections count right)."""

    def __init__(self, upstream, rtt):
        self.upstream, self.rtt = upstream, rtt
        self.lock = threading.Lock()
        self.requests = 0
        self.sent = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def reset(self):
        with self.lock:
            counts = (self.requests, self.sent)
            self.requests = self.sent = 0
        return counts

    def accept(self):
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.upload, args=(client, server), daemon=True).start()
            threading.Thread(target=self.download, args=(server, client), daemon=True).start()

    def upload(self, src, dst):
        head, body_left = b"", 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    self.sent += len(data)
                rest = data
                while rest:
                    if body_left:
                        take = min(body_left, len(rest))
                        body_left -= take
                        rest = rest[take:]
                        continue
                    head += rest
                    rest = b""
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    length = 0
                    for line in head[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip() or 0)
                    with self.lock:
                        self.requests += 1
                    rest, head, body_left = head[end + 4:], b"", length
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def download(self, src, dst):
        # Pieces leave no earlier than rtt after they arrived, in order.
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if self.rtt:
                    time.sleep(self.rtt)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def start_moto():
    port = free_port()
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def timed(cmd, env):
    """Runs cmd under /usr/bin/time; returns (wall s, peak RSS MiB, stdout)."""
    fd, tfile = tempfile.mkstemp(prefix="time-")
    os.close(fd)
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tfile] + cmd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(tfile) as f:
        wall, rss = f.read().strip().splitlines()[-1].split()
    os.unlink(tfile)
    return float(wall), int(rss) / 1024, proc.stdout


def make_disks(work, size_mib):
    out = os.path.join(work, "disks")
    gens = [os.path.join(out, f"gen{g}.raw") for g in range(3)]
    if all(os.path.exists(g) for g in gens):
        return gens, "reused"
    if os.path.exists(MAKE_DISKS) and size_mib == 256:
        made = subprocess.run(["bash", MAKE_DISKS, "--small", "--no-vhd", "-o", out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if made.returncode != 0:
            log(f"make-disks.sh failed, generating the disks here: {made.stderr[-500:]}")
        elif all(os.path.exists(g) for g in gens):
            return gens, "make-disks.sh --small"
    os.makedirs(out, exist_ok=True)
    rng = random.Random(7)
    size = size_mib << 20
    files = []
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for d, _, names in os.walk(top):
            files.extend(os.path.join(d, n) for n in names)
    rng.shuffle(files)
    with open(gens[0], "wb") as disk:
        filled = 0
        for path in files:
            if filled > size * 55 // 100:
                break
            try:
                with open(path, "rb") as f:
                    data = f.read(4 << 20)
            except OSError:
                continue
            disk.write(data)
            filled += len(data)
        disk.truncate(size)
    for g in (1, 2):
        shutil.copyfile(gens[g - 1], gens[g])
        with open(gens[g], "r+b") as disk:
            for _ in range(size // 4096 // 20):
                disk.seek(rng.randrange(size // 4096) * 4096)
                disk.write(rng.randbytes(4096))
    return gens, "generated (55 % of /usr files, 5 % of 4 KiB blocks rewritten per generation)"


def run_tool(tool, binary, gens, proxy, rtt, work):
    """One repetition of one tool: gen0..gen2 backups and a gen2 restore, in a fresh bucket."""
    bucket = f"b{random.randrange(1 << 40):x}"
    endpoint = f"http://127.0.0.1:{proxy.port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_REGION="us-east-1", RESTIC_PASSWORD="bench",
               # Both repositories encrypted (stackvault's default since issue 15), each
               # tool's key derivation at its own default strength.
               STACKVAULT_PASSWORD="bench",
               XDG_CACHE_HOME=os.path.join(work, f"cache-{bucket}"))
    # The bucket, made directly on moto (not counted).
    subprocess.run(["curl", "-sf", "-X", "PUT", f"http://127.0.0.1:{proxy.upstream}/{bucket}"],
                   check=True, stdout=subprocess.DEVNULL)
    out = {}
    restored = os.path.join(work, "restored")
    if tool == "stackvault":
        repo = f"s3://{bucket}/repo"
        subprocess.run([binary, "--quiet", "--endpoint", endpoint, "init", repo], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        steps = [(f"gen{g}", [binary, "--quiet", "backup", repo, gens[g], "--disk", "d"])
                 for g in range(3)]
        steps.append(("restore", [binary, "--quiet", "restore", repo, "latest",
                                  os.path.join(restored, "gen2.raw"), "--force"]))
    else:
        repo = f"s3:{endpoint}/{bucket}/repo"
        subprocess.run(["restic", "-q", "-r", repo, "init"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        steps = [(f"gen{g}", ["restic", "-q", "-r", repo, "backup", "--stdin",
                              "--stdin-filename", "d.raw"]) for g in range(3)]
        steps.append(("restore", ["restic", "-q", "-r", repo, "restore", "latest",
                                  "--target", restored]))
    os.makedirs(restored, exist_ok=True)
    for g, (name, cmd) in enumerate(steps):
        proxy.reset()
        if tool == "restic" and name != "restore":
            # restic reads a single disk file from stdin (it would otherwise back up a tree).
            cmd = ["sh", "-c", " ".join(cmd) + f" < {gens[g]}"]
        wall, rss, _ = timed(cmd, env)
        requests, sent = proxy.reset()
        out[name] = {"wall": wall, "rss": rss, "requests": requests, "sent": sent}
    shutil.rmtree(restored, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "stackvault"))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rtt", default="0,20")
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=os.path.join(ROOT, "benches", "RESULTS.md"))
    args = ap.parse_args()
    if shutil.which("restic") is None:
        log("restic missing: installing Debian's (apt-get install restic)")
        subprocess.run(["apt-get", "install", "-y", "restic"], check=True,
                       stdout=subprocess.DEVNULL)
    if not os.path.exists(MOTO):
        sys.exit(f"{MOTO} missing: run bash .ci/moto.sh")
    work = args.work or tempfile.mkdtemp(prefix="sv-remote-bench-")
    gens, origin = make_disks(work, args.size_mib)
    gib = os.path.getsize(gens[0]) / (1 << 30)
    load_before = os.getloadavg()
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout
    results = {}
    for rtt_ms in [int(x) for x in args.rtt.split(",")]:
        for rep in range(args.reps):
            order = ["stackvault", "restic"] if rep % 2 == 0 else ["restic", "stackvault"]
            for tool in order:
                moto, port = start_moto()
                try:
                    proxy = Proxy(port, rtt_ms / 1000)
                    log(f"rtt {rtt_ms} ms, rep {rep + 1}: {tool}")
                    r = run_tool(tool, args.bin, gens, proxy, rtt_ms, work)
                finally:
                    moto.kill()
                    moto.wait()
                for step, m in r.items():
                    results.setdefault((rtt_ms, tool, step), []).append(m)
    load_after = os.getloadavg()

    def med(rtt, tool, step, key):
        return statistics.median(m[key] for m in results[(rtt, tool, step)])

    lines = [f"## Object storage: stackvault vs restic on moto S3 ({datetime.date.today()})", "",
             f"`benches/remote.py --size-mib {args.size_mib} --reps {args.reps} --rtt {args.rtt}`"
             f"; disks: {origin}, {args.size_mib} MiB; binary {args.bin} (debug profile: deps at "
             f"-O3, stackvault's crates at -O1);"
             f" {version.strip()}. Load average before/after: "
             f"{load_before[0]:.1f} / {load_after[0]:.1f} (2 cores shared with other builds: "
             "ratios only, absolute times are not the tools' speed). Medians of "
             f"{args.reps}; requests and bytes sent counted by the proxy; ratio = restic's "
             "wall time / stackvault's (above 1: stackvault faster).", "",
             "| rtt | step | sv wall s | restic wall s | speed ratio | sv req/GiB | restic req/GiB"
             " | sv MiB sent | restic MiB sent | sv RSS MiB | restic RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rtt in [int(x) for x in args.rtt.split(",")]:
        for step in ("gen0", "gen1", "gen2", "restore"):
            sv = {k: med(rtt, "stackvault", step, k) for k in ("wall", "rss", "requests", "sent")}
            rs = {k: med(rtt, "restic", step, k) for k in ("wall", "rss", "requests", "sent")}
            lines.append(
                f"| {rtt} ms | {step} | {sv['wall']:.2f} | {rs['wall']:.2f} | "
                f"{rs['wall'] / max(sv['wall'], 1e-3):.2f}× | {sv['requests'] / gib:.0f} | "
                f"{rs['requests'] / gib:.0f} | {sv['sent'] / 2**20:.1f} | {rs['sent'] / 2**20:.1f}"
                f" | {sv['rss']:.0f} | {rs['rss']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)
    with open(os.path.join(work, "raw.json"), "w") as f:
        json.dump({"|".join(map(str, k)): v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
