#!/usr/bin/env python3
"""Object storage benchmark: stackvault against restic on the same moto S3 server, and
stackvault into Azurite.

For each injected round trip (default 0 and 20 ms), each store and each repetition, each tool
(in alternating order) backs up gen0, gen1 and gen2 of one disk into a fresh bucket (or
container), then restores gen2. Every request goes through a latency proxy in this script,
which counts requests (by method) and the bytes each way, so every tool is measured by the
same instrument. The proxy passes requests on at once and holds back each piece (up to
64 KiB) of an answer by the round trip before reading the next, so a connection carries at
most 64 KiB of answer per round trip (3.2 MiB/s at 20 ms): a link whose TCP window does not
grow, where a tool's download speed is its requests in flight. Wall time and peak RSS come
from /usr/bin/time; the repository's size after gen2 from the store (a listing of the bucket;
Azurite's blob files on disk). Figures are medians over repetitions, each with its ratio to
restic on moto measured in the same run (restic 0.14 cannot be pointed at Azurite). restic is
Debian's (`apt-get install restic`, installed here when missing and allowed); moto comes
from `.ci/moto.sh`, Azurite from `.ci/azurite.sh`.

Disks: `--data DIR` (gen0.raw, gen1.raw, gen2.raw, e.g. the 4 GiB dataset), else
../shared/datasets/make-disks.sh --small (256 MiB, real files, a week of changes per
generation) when present, else generated here (256 MiB, 55 % real files of /usr, 5 % of the
blocks rewritten per generation).

Only some steps: `--steps restore` measures the gen2 restore alone. Each tool then fills one
repository per store and repetition with gen0..gen2 at 0 ms (not measured), and restores it at
every round trip of `--rtt`; `--base-bin OLD` restores the same repository with a second
stackvault binary too, alternating with `--bin` (rows `restore [base]`), so a before/after
comparison shares the repository, the server and the load. `--sweep-in-flight N,N` and
`--sweep-gap-kib K,K` add restores with `STACKVAULT_RESTORE_GETS_IN_FLIGHT=N` (rows
`restore@N`) and `STACKVAULT_RESTORE_GAP_BYTES=K*1024` (rows `restore gap=K`).

Usage: python3 benches/remote.py [--bin target/release/stackvault] [--size-mib 256]
                                 [--data DIR] [--reps 3] [--rtt 0,20] [--stores moto,azurite]
                                 [--steps gen0,gen1,gen2,restore] [--base-bin OLD]
                                 [--results benches/RESULTS.md]
                                 [--variant LABEL=BIN[:VAR=VALUE…] …] [--gen0-only]

A/B of binaries or settings: each `--variant` is one more stackvault run (binary, and
environment variables separated by `:`), taking turns with the others and restic in every
repetition (the order reversed every other one), and reported in a table of its own with each
variant's ratio to restic. `--gen0-only` stops each run after the gen0 backup.

The lead's restore-only run of the 4 GiB dataset (restore rows only, before/after):
  python3 benches/remote.py --bin NEW --base-bin OLD --data /var/tmp/bench4/data --reps 1 \
      --rtt 20,0 --stores moto,azurite --steps restore
"""

import argparse
import base64
import datetime
import hashlib
import hmac
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
MOTO_PYTHON = os.path.join(ROOT, ".ci", "moto", "bin", "python")
AZURITE = os.path.join(ROOT, ".ci", "azurite", "node_modules", ".bin", "azurite-blob")
KEY_ID, SECRET = "benchkey", "benchsecret"
# Azurite's published development account and key (not a secret).
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
          "KBHBeksoGMGw==")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A TCP proxy to 127.0.0.1:upstream that holds back every piece of an answer by `rtt`
    (see the module doc) and counts the HTTP requests by method and the bytes each way
    (parsing request heads for their Content-Length, so keep-alive connections count
    right)."""

    def __init__(self, upstream, rtt):
        self.upstream, self.rtt = upstream, rtt
        self.lock = threading.Lock()
        self.requests = 0
        self.methods = {}
        self.sent = 0
        self.received = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def reset(self):
        with self.lock:
            counts = {"requests": self.requests, "sent": self.sent,
                      "received": self.received, "puts": self.methods.get("PUT", 0)}
            self.requests = self.sent = self.received = 0
            self.methods = {}
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
                    method = head[:end].split(b" ", 1)[0].decode("latin-1")
                    for line in head[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip() or 0)
                    with self.lock:
                        self.requests += 1
                        self.methods[method] = self.methods.get(method, 0) + 1
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
        # Each piece is held for rtt before it is passed on and the next one is read.
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    self.received += len(data)
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


def wait_port(port, proc, what):
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


class Moto:
    """A moto S3 server of its own (in memory), one bucket per run."""
    name = "moto"

    def __init__(self, work):
        self.port = free_port()
        self.proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "moto_server")

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def new_place(self):
        bucket = f"b{random.randrange(1 << 40):x}"
        # Made directly on moto (not counted).
        subprocess.run(["curl", "-sf", "-X", "PUT", f"http://127.0.0.1:{self.port}/{bucket}"],
                       check=True, stdout=subprocess.DEVNULL)
        return bucket

    def env(self):
        return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": "us-east-1"}

    def locations(self, bucket, proxy):
        endpoint = f"http://127.0.0.1:{proxy.port}"
        return f"s3://{bucket}/repo", endpoint, f"s3:{endpoint}/{bucket}/repo"

    def stored_bytes(self, bucket):
        code = ("import boto3, sys\n"
                f"c = boto3.client('s3', endpoint_url='http://127.0.0.1:{self.port}',"
                f" aws_access_key_id='{KEY_ID}', aws_secret_access_key='{SECRET}',"
                " region_name='us-east-1')\n"
                "total = 0\n"
                "for page in c.get_paginator('list_objects_v2').paginate("
                f"Bucket='{bucket}'):\n"
                "    total += sum(o['Size'] for o in page.get('Contents', []))\n"
                "print(total)\n")
        out = subprocess.run([MOTO_PYTHON, "-c", code], capture_output=True, text=True)
        return int(out.stdout.strip()) if out.returncode == 0 else float("nan")


class Azurite:
    """An Azurite blob service of its own, keeping blobs in files under `work` (4 GiB of
    packs would not fit its in-memory store), one container per run."""
    name = "azurite"

    def __init__(self, work):
        self.dir = tempfile.mkdtemp(prefix="azurite-", dir=work)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
             self.dir, "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "azurite-blob")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_place(self):
        container = f"c{random.randrange(1 << 40):x}"
        # Put Container with Shared Key, made directly on Azurite (not counted).
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        version = "2019-07-07"
        to_sign = "\n".join(["PUT"] + [""] * 11 + [
            f"x-ms-date:{date}", f"x-ms-version:{version}",
            f"/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{container}\nrestype:container"])
        sig = base64.b64encode(hmac.new(base64.b64decode(AZ_KEY), to_sign.encode(),
                                        hashlib.sha256).digest()).decode()
        subprocess.run(["curl", "-sf", "-X", "PUT", "-H", f"x-ms-date: {date}", "-H",
                        f"x-ms-version: {version}", "-H", "Content-Length: 0", "-H",
                        f"Authorization: SharedKey {AZ_ACCOUNT}:{sig}",
                        f"http://127.0.0.1:{self.port}/{AZ_ACCOUNT}/{container}"
                        "?restype=container"], check=True, stdout=subprocess.DEVNULL)
        return container

    def env(self):
        return {"AZURE_STORAGE_KEY": AZ_KEY}

    def locations(self, container, proxy):
        return (f"azure://{AZ_ACCOUNT}/{container}/repo",
                f"http://127.0.0.1:{proxy.port}/{AZ_ACCOUNT}", None)

    def stored_bytes(self, container):
        # Blob bodies live in extent files; committed blocks are all this run wrote.
        total = 0
        for d, _, names in os.walk(self.dir):
            if "__blobstorage__" in d:
                total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
        return total


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


def sweep_steps(sweep, gaps):
    """Extra restore steps: (name, extra environment)."""
    return ([(f"restore@{n}", {"STACKVAULT_RESTORE_GETS_IN_FLIGHT": str(n)}) for n in sweep] +
            [(f"restore gap={k}", {"STACKVAULT_RESTORE_GAP_BYTES": str(k * 1024)})
             for k in gaps])


def restore_only(tool, bins, gens, store, proxy, work, rtts, rep, extra, on_step):
    """`--steps restore`: fills a fresh place of `store` with gen0..gen2 at 0 ms (not
    measured), then restores gen2 at each round trip of `rtts` (ms), with every binary of
    `bins` ((label, path), alternating their order by repetition) for stackvault. `on_step`
    gets (rtt, label, step, measurements)."""
    place = store.new_place()
    env = dict(os.environ, RESTIC_PASSWORD="bench", STACKVAULT_PASSWORD="bench",
               XDG_CACHE_HOME=os.path.join(work, f"cache-{place}"), **store.env())
    restored = os.path.join(work, "restored")
    os.makedirs(restored, exist_ok=True)
    sv_repo, endpoint, restic_repo = store.locations(place, proxy)
    proxy.rtt = 0
    if tool == "stackvault":
        binary = bins[0][1]
        subprocess.run([binary, "--quiet", "--endpoint", endpoint, "init", sv_repo], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        for g in range(3):
            timed([binary, "--quiet", "backup", sv_repo, gens[g], "--disk", "d"], env)
    else:
        subprocess.run(["restic", "-q", "-r", restic_repo, "init"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        for g in range(3):
            timed(["sh", "-c", f"restic -q -r {restic_repo} backup --stdin --stdin-filename "
                   f"d.raw < {gens[g]}"], env)
    for rtt_ms in rtts:
        proxy.rtt = rtt_ms / 1000
        if tool == "stackvault":
            order = bins if rep % 2 == 0 else list(reversed(bins))
            runs = [(label, binary, "restore", {}) for label, binary in order]
            runs += [(bins[0][0], bins[0][1], name, more) for name, more in extra]
            for label, binary, step, more in runs:
                proxy.reset()
                wall, rss, _ = timed([binary, "--quiet", "restore", sv_repo, "latest",
                                      os.path.join(restored, "gen2.raw"), "--force"],
                                     dict(env, **more))
                on_step(rtt_ms, label, step, dict(proxy.reset(), wall=wall, rss=rss))
        else:
            proxy.reset()
            wall, rss, _ = timed(["restic", "-q", "-r", restic_repo, "restore", "latest",
                                  "--target", restored], env)
            on_step(rtt_ms, "restic", "restore", dict(proxy.reset(), wall=wall, rss=rss))
        shutil.rmtree(restored, ignore_errors=True)
        os.makedirs(restored, exist_ok=True)
    shutil.rmtree(restored, ignore_errors=True)


def run_tool(tool, binary, gens, store, proxy, work, sweep=(), on_step=lambda name, m: None,
             measured=("gen0", "gen1", "gen2", "restore"), extra_env=None, gen0_only=False):
    """One repetition of one tool: gen0..gen2 backups and a gen2 restore, in a fresh bucket
    or container of `store`; for stackvault, then a gen2 restore with each number of GETs in
    flight of `sweep` (steps `restore@N`). `on_step` gets each step's measurements as soon as
    they are taken, so a run stopped midway keeps them."""
    place = store.new_place()
    env = dict(os.environ, RESTIC_PASSWORD="bench",
               # Both repositories encrypted (stackvault's default since issue 15), each
               # tool's key derivation at its own default strength.
               STACKVAULT_PASSWORD="bench",
               XDG_CACHE_HOME=os.path.join(work, f"cache-{place}"), **store.env())
    env.update(extra_env or {})
    out = {}
    restored = os.path.join(work, "restored")
    sv_repo, endpoint, restic_repo = store.locations(place, proxy)
    if tool == "stackvault" or tool.startswith("sv:"):
        subprocess.run([binary, "--quiet", "--endpoint", endpoint, "init", sv_repo], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        steps = [(f"gen{g}", [binary, "--quiet", "backup", sv_repo, gens[g], "--disk", "d"])
                 for g in range(3)]
        steps.append(("restore", [binary, "--quiet", "restore", sv_repo, "latest",
                                  os.path.join(restored, "gen2.raw"), "--force"]))
        steps += [(name, steps[-1][1]) for name, _ in sweep]
    else:
        subprocess.run(["restic", "-q", "-r", restic_repo, "init"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        steps = [(f"gen{g}", ["restic", "-q", "-r", restic_repo, "backup", "--stdin",
                              "--stdin-filename", "d.raw"]) for g in range(3)]
        steps.append(("restore", ["restic", "-q", "-r", restic_repo, "restore", "latest",
                                  "--target", restored]))
    if gen0_only:
        steps = steps[:1]
    os.makedirs(restored, exist_ok=True)
    rtt = proxy.rtt
    for g, (name, cmd) in enumerate(steps):
        # A step not measured (--steps) runs at 0 ms and is not recorded.
        proxy.rtt = rtt if name.split("@")[0].split(" ")[0] in measured else 0
        proxy.reset()
        if tool == "restic" and name != "restore":
            # restic reads a single disk file from stdin (it would otherwise back up a tree).
            cmd = ["sh", "-c", " ".join(cmd) + f" < {gens[g]}"]
        step_env = dict(env, **dict(sweep).get(name, {}))
        wall, rss, _ = timed(cmd, step_env)
        out[name] = dict(proxy.reset(), wall=wall, rss=rss)
        if name == "gen2":
            out[name]["stored"] = store.stored_bytes(place)
        if proxy.rtt == rtt:
            on_step(name, out[name])
    proxy.rtt = rtt
    shutil.rmtree(restored, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "stackvault"))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--data", default=None, help="directory with gen0.raw, gen1.raw, gen2.raw")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rtt", default="0,20")
    ap.add_argument("--stores", default="moto,azurite")
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=os.path.join(ROOT, "benches", "RESULTS.md"))
    ap.add_argument("--sweep-in-flight", default="",
                    help="also restore with each of these numbers of GETs in flight (N,N,…)")
    ap.add_argument("--sweep-gap-kib", default="",
                    help="also restore with each of these read-through gaps in KiB (K,K,…)")
    ap.add_argument("--steps", default="gen0,gen1,gen2,restore",
                    help="steps to measure; `restore` alone fills each repository at 0 ms "
                         "unmeasured and restores it at every --rtt")
    ap.add_argument("--base-bin", default=None,
                    help="with --steps restore: a second stackvault binary restoring the same "
                         "repository, alternated with --bin (rows `restore [base]`)")
    ap.add_argument("--tools", default="stackvault,restic")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=BIN[:VAR=VALUE…]: one more stackvault run (see the module doc)")
    ap.add_argument("--gen0-only", action="store_true", help="only the gen0 backup")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the table from --work's raw.json (a partial run)")
    args = ap.parse_args()
    if args.report_only:
        size = os.path.getsize(os.path.join(args.data, "gen0.raw")) if args.data else \
            args.size_mib << 20
        return report_only(args.work, args.stores.split(","),
                           [int(x) for x in args.rtt.split(",")], size / (1 << 30), args.reps)
    if shutil.which("restic") is None:
        log("restic missing: installing Debian's (apt-get install restic)")
        subprocess.run(["apt-get", "install", "-y", "restic"], check=True,
                       stdout=subprocess.DEVNULL)
    if not os.path.exists(MOTO):
        sys.exit(f"{MOTO} missing: run bash .ci/moto.sh")
    stores = args.stores.split(",")
    if "azurite" in stores and not os.path.exists(AZURITE):
        sys.exit(f"{AZURITE} missing: run bash .ci/azurite.sh")
    work = args.work or tempfile.mkdtemp(prefix="sv-remote-bench-")
    if args.data:
        gens = [os.path.join(args.data, f"gen{g}.raw") for g in range(3)]
        origin = f"{args.data}"
    else:
        gens, origin = make_disks(work, args.size_mib)
    size_mib = os.path.getsize(gens[0]) >> 20
    gib = os.path.getsize(gens[0]) / (1 << 30)
    load_before = os.getloadavg()
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout
    rtts = [int(x) for x in args.rtt.split(",")]
    # (tool, store) pairs: restic only on moto.
    tools = args.tools.split(",")
    variants = {}
    for v in args.variant:
        label, _, spec = v.partition("=")
        binary, *assignments = spec.split(":")
        variants["sv:" + label] = (binary, dict(a.split("=", 1) for a in assignments))
    runs = ([("stackvault", st) for st in stores] if "stackvault" in tools and not variants
            else []) + [(t, st) for t in variants for st in stores] + \
        ([("restic", "moto")] if "restic" in tools else [])
    sweep = sweep_steps([int(n) for n in args.sweep_in_flight.split(",") if n],
                        [int(k) for k in args.sweep_gap_kib.split(",") if k])
    steps = args.steps.split(",")
    results = {}
    started = time.time()

    def save():
        with open(os.path.join(work, "raw.json"), "w") as f:
            json.dump({"|".join(map(str, k)): v for k, v in results.items()}, f, indent=1)

    if steps == ["restore"]:
        bins = [("stackvault", args.bin)] + ([("stackvault-base", args.base_bin)]
                                             if args.base_bin else [])
        for rep in range(args.reps):
            order = runs if rep % 2 == 0 else list(reversed(runs))
            for tool, store_name in order:
                store = (Moto if store_name == "moto" else Azurite)(work)
                try:
                    proxy = Proxy(store.port, 0)
                    log(f"rep {rep + 1}: {tool} on {store_name}, restores at {rtts} ms")

                    def keep(rtt_ms, label, step, m, store_name=store_name):
                        results.setdefault((rtt_ms, label, store_name, step), []).append(m)
                        save()

                    restore_only(tool, bins, gens, store, proxy, work, rtts, rep, sweep, keep)
                finally:
                    store.stop()
    for rtt_ms in (rtts if steps != ["restore"] else []):
        for rep in range(args.reps):
            order = runs if rep % 2 == 0 else list(reversed(runs))
            for tool, store_name in order:
                store = (Moto if store_name == "moto" else Azurite)(work)
                try:
                    proxy = Proxy(store.port, rtt_ms / 1000)
                    log(f"rtt {rtt_ms} ms, rep {rep + 1}: {tool} on {store_name}")
                    def keep(step, m, key=(rtt_ms, tool, store_name)):
                        results.setdefault(key + (step,), []).append(m)
                        with open(os.path.join(work, "raw.json"), "w") as f:
                            json.dump({"|".join(map(str, k)): v for k, v in results.items()},
                                      f, indent=1)

                    binary, extra = variants.get(tool, (args.bin, {}))
                    run_tool(tool, binary, gens, store, proxy, work, sweep, keep, steps, extra,
                             args.gen0_only)
                finally:
                    store.stop()
    load_after = os.getloadavg()
    header = (f"`benches/remote.py --reps {args.reps} --rtt {args.rtt} --stores {args.stores}"
              f" --steps {args.steps}{' --base-bin ' + args.base_bin if args.base_bin else ''}"
              f"{' --data ' + args.data if args.data else ''}`; disks: {origin}, {size_mib} MiB;"
              f" binary {args.bin};"
              f" {version.strip()}. Load average before/after: {load_before[0]:.1f} / "
              f"{load_after[0]:.1f} (2 cores shared with other builds: ratios only); "
              f"{(time.time() - started) / 60:.0f} min.")
    if variants:
        header += " Variants: " + "; ".join(
            f"{t[3:]} = {b} {' '.join(f'{k}={v}' for k, v in e.items())}".strip()
            for t, (b, e) in variants.items()) + "."
        text = variant_table(results, stores, rtts, list(variants), args.reps, header)
    else:
        text = table(results, stores, rtts, gib, args.reps, header)
    print(text)
    with open(os.path.join(work, "table.md"), "w") as f:
        f.write(text)
    log(f"table and raw figures in {work}; add the table to {args.results} by hand "
        "(newest first)")


def table(results, stores, rtts, gib, reps, header):
    """The Markdown table of `results` ((rtt, tool, store, step) → measurements); a
    combination not measured (a run stopped early) shows as a dash."""

    def med(rtt, tool, store, step, key):
        runs = [m[key] for m in results.get((rtt, tool, store, step), []) if key in m]
        return statistics.median(runs) if runs else None

    def fmt(v, spec, scale=1.0):
        return "–" if v is None else format(v / scale, spec)

    lines = [f"## Object storage: stackvault vs restic, moto S3 and Azurite "
             f"({datetime.date.today()})", "",
             header + f" Medians of up to {reps}; requests, PUTs and bytes counted by the proxy"
             " (a connection carries at most 64 KiB of answer per round trip); ratio = restic's"
             " wall time on moto / stackvault's (above 1: stackvault faster).", "",
             "| store | rtt | step | sv wall s | restic wall s | speed ratio | sv req/GiB | "
             "restic req/GiB | sv PUTs | sv MiB sent | restic MiB sent | sv MiB recv | "
             "restic MiB recv | sv RSS MiB | restic RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("wall", "rss", "requests", "sent", "received", "puts")
    mib = 2 ** 20
    base_steps = ["gen0", "gen1", "gen2", "restore"]

    def sweep_order(step):
        # `restore@4` before `restore@16`, then `restore gap=0` … by number.
        return (step.rstrip("0123456789"), int("".join(c for c in step if c.isdigit()) or 0))

    sweeps = sorted({k[3] for k in results if k[3] not in base_steps}, key=sweep_order)
    rows = [(step, "stackvault", step) for step in base_steps[:3]]
    rows += [("restore", "stackvault", "restore"),
             ("restore", "stackvault-base", "restore [base]")]
    rows += [(step, "stackvault", step) for step in sweeps]
    for store in stores:
        for rtt in rtts:
            for step, tool, shown in rows:
                sv = {k: med(rtt, tool, store, step, k) for k in keys}
                rs = {k: med(rtt, "restic", "moto", step.split("@")[0].split(" ")[0], k)
                      for k in keys}
                if sv["wall"] is None and (rs["wall"] is None or tool != "stackvault"):
                    continue
                ratio = (None if sv["wall"] is None or rs["wall"] is None
                         else rs["wall"] / max(sv["wall"], 1e-3))
                lines.append(
                    f"| {store} | {rtt} ms | {shown} | {fmt(sv['wall'], '.2f')} | "
                    f"{fmt(rs['wall'], '.2f')} | {fmt(ratio, '.2f')}× | "
                    f"{fmt(sv['requests'], '.0f', gib)} | {fmt(rs['requests'], '.0f', gib)} | "
                    f"{fmt(sv['puts'], '.0f')} | {fmt(sv['sent'], '.1f', mib)} | "
                    f"{fmt(rs['sent'], '.1f', mib)} | {fmt(sv['received'], '.1f', mib)} | "
                    f"{fmt(rs['received'], '.1f', mib)} | {fmt(sv['rss'], '.0f')} | "
                    f"{fmt(rs['rss'], '.0f')} |")
    lines.append("")
    for store in stores:
        for rtt in rtts:
            sv = med(rtt, "stackvault", store, "gen2", "stored")
            rs = med(rtt, "restic", "moto", "gen2", "stored")
            sent = med(rtt, "stackvault", store, "gen0", "sent")
            puts = med(rtt, "stackvault", store, "gen0", "puts")
            if sv is None or sent is None:
                continue
            lines.append(
                f"- {store}, {rtt} ms: repository after gen2 {sv / mib:.1f} MiB, restic's "
                f"{fmt(rs, '.1f', mib)} MiB (×{fmt(None if rs is None else sv / rs, '.2f')}); "
                f"gen0: {puts:.0f} PUTs for {sent / mib:.1f} MiB sent = one PUT per "
                f"{sent / mib / max(puts, 1):.1f} MiB")
    return "\n".join(lines) + "\n"


def variant_table(results, stores, rtts, variants, reps, header):
    """The Markdown table of an A/B run: each variant's medians and ratio to restic on moto."""
    def med(rtt, tool, store, step, key):
        runs = [m[key] for m in results.get((rtt, tool, store, step), []) if key in m]
        return statistics.median(runs) if runs else None

    mib = 2 ** 20
    lines = [f"## Object storage A/B: stackvault variants vs restic ({datetime.date.today()})",
             "", header + f" Medians of up to {reps}; ratio = restic's wall time on moto / the"
             " variant's (above 1: faster than restic).", "",
             "| store | rtt | step | variant | wall s (runs) | restic wall s | ratio | PUTs |"
             " MiB sent | MiB per PUT | RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for store in stores:
        for rtt in rtts:
            for step in ["gen0", "gen1", "gen2", "restore"]:
                rs = med(rtt, "restic", "moto", step, "wall")
                for v in variants:
                    runs = [m["wall"] for m in results.get((rtt, v, store, step), [])]
                    if not runs:
                        continue
                    wall = statistics.median(runs)
                    puts, sent = med(rtt, v, store, step, "puts"), med(rtt, v, store, step, "sent")
                    lines.append(
                        f"| {store} | {rtt} ms | {step} | {v[3:]} | {wall:.2f} "
                        f"({', '.join(f'{w:.1f}' for w in runs)}) | "
                        f"{'–' if rs is None else format(rs, '.2f')} | "
                        f"{'–' if rs is None else format(rs / max(wall, 1e-3), '.2f')}× | "
                        f"{puts:.0f} | {sent / mib:.1f} | {sent / mib / max(puts, 1):.1f} | "
                        f"{med(rtt, v, store, step, 'rss'):.0f} |")
    return "\n".join(lines) + "\n"


def report_only(work, stores, rtts, gib, reps):
    """Re-renders the table from a (possibly partial) raw.json of an earlier run."""
    with open(os.path.join(work, "raw.json")) as f:
        raw = json.load(f)
    results = {}
    for k, v in raw.items():
        rtt, tool, store, step = k.split("|")
        results[(int(rtt), tool, store, step)] = v
    print(table(results, stores, rtts, gib, reps, f"(re-rendered from {work}/raw.json)"))


if __name__ == "__main__":
    main()
