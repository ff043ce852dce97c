#!/usr/bin/env python3
"""Benchmark of `stackvault standby sync` against a full `restore` of the same snapshot.

Three generations of a disk (gen0, gen1, gen2: raw images, the 4 GiB dataset of
../shared/datasets/make-disks.sh) are backed up into a fresh (encrypted) repository. Then, for
a file target and for an Azurite page blob: the first sync (gen0, a full restore), and for
gen0 -> gen1 and gen1 -> gen2 the incremental sync against a full restore of the same
snapshot to a fresh target, in the same run, each a child process under /usr/bin/time (wall,
peak RSS). Bytes written are the sync's report (`written_bytes`, `zeroed_bytes`,
`uploaded_bytes`); the changed extents are `stackvault diff`'s `changed_bytes` between the two
snapshots (chunk granularity, what a sync must write) and, as ground truth, the 4 KiB blocks
that differ between the two raw images. At the end the file standby is compared with gen2 byte
for byte, and the blob standby checked with `verify --target`.

Usage: python3 benches/standby.py --bin target/release/stackvault --data DIR --work DIR
           [--azurite .ci/azurite/node_modules/.bin/azurite-blob] [--python VENV_PYTHON]
           [--no-blob] [--no-file] [--variant 'LABEL|BIN|EXTRA SYNC ARGS' ...]
       python3 benches/standby.py --put-cost --work DIR [--python VENV_PYTHON]
Each row also gives the client's CPU seconds (user + system of the sync process), the server's
(Azurite's node process, from /proc) during the sync, and the load average after it. With
--variant, every incremental step is measured once more per variant (another binary, or
`--parallel 32`, ...), the target synced back to the step's start (unmeasured) in between, so
before/after binaries alternate in one run. Numbers to read: sync / full (target <= 0.2),
uploaded / diff and written / diff (target <= 1.1), sync peak RSS at 1 GiB against 4 GiB.
The page blob part needs Azurite (.ci/azurite.sh) and a Python with azure-storage-blob (the
virtualenv `cargo bench --bench pageblob` makes in target/bench-venv) to create the container
and the SAS. Azurite keeps its blobs on disk under --work (4 GiB blobs do not belong in the
memory of a shared machine).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MIB = 1 << 20

SAS_SCRIPT = r"""
import sys, datetime
from azure.storage.blob import (BlobServiceClient, generate_account_sas, ResourceTypes,
                                AccountSasPermissions)
endpoint, key, action = sys.argv[1], sys.argv[2], sys.argv[3]
conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;"
        "BlobEndpoint=%s;" % (key, endpoint))
service = BlobServiceClient.from_connection_string(conn)
if action == "setup":
    service.create_container("standby")
    print(generate_account_sas("devstoreaccount1", key,
          ResourceTypes(service=True, container=True, object=True),
          AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True,
                                create=True),
          datetime.datetime.utcnow() + datetime.timedelta(days=1)))
else:
    service.get_blob_client("standby", action).delete_blob(delete_snapshots="include")
"""

# Put Page cost: COUNT requests of SIZE bytes each into a fresh page blob, THREADS at a time.
PUT_SCRIPT = r"""
import sys, os, concurrent.futures
from azure.storage.blob import BlobServiceClient
endpoint, key, name, count, size, threads = sys.argv[1:7]
count, size, threads = int(count), int(size), int(threads)
conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;"
        "BlobEndpoint=%s;" % (key, endpoint))
blob = BlobServiceClient.from_connection_string(conn).get_blob_client("standby", name)
blob.create_page_blob(count * size)
body = os.urandom(size)
with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(lambda i: blob.upload_page(body, offset=i * size, length=size), range(count)))
"""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


CPU = {}


def timed(cmd, env, rss_file):
    """Runs cmd under /usr/bin/time; returns (wall s, stdout, peak RSS MiB). The child's CPU
    seconds (user + system) are left in CPU["last"]."""
    started = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file] + cmd, env=env,
                       capture_output=True, text=True)
    wall = time.monotonic() - started
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr}{p.stdout}")
    with open(rss_file) as f:
        rss_kib, user, system = f.read().split()[-3:]
    CPU["last"] = float(user) + float(system)
    return wall, p.stdout, int(rss_kib) / 1024


def process_cpu(pid):
    """CPU seconds (user + system) process pid has used so far, or None without it."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def load():
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def changed_4k(a, b):
    """Bytes in 4 KiB blocks that differ between the files a and b (same size)."""
    changed = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MIB), fb.read(MIB)
            if not x and not y:
                return changed
            if x != y:
                for i in range(0, max(len(x), len(y)), 4096):
                    if x[i:i + 4096] != y[i:i + 4096]:
                        changed += 4096
    return changed


def start_azurite(binary, location):
    shutil.rmtree(location, ignore_errors=True)
    os.makedirs(location)
    p = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--location",
                          location, "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        m = re.search(r"listens on http://127.0.0.1:(\d+)", line)
        if m:
            # Keep draining its output: Azurite dies of SIGPIPE when nobody reads it.
            import threading
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, int(m.group(1))
    raise SystemExit("Azurite did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/stackvault")
    ap.add_argument("--data", default="/var/tmp/bench4/data")
    ap.add_argument("--work", default="/var/tmp/standby-bench")
    ap.add_argument("--azurite", default=".ci/azurite/node_modules/.bin/azurite-blob")
    ap.add_argument("--python", default="target/bench-venv/bin/python")
    ap.add_argument("--no-blob", action="store_true")
    ap.add_argument("--no-file", action="store_true")
    ap.add_argument("--put-cost", action="store_true",
                    help="only measure Azurite's CPU per Put Page: 1,000 requests of 64 KiB "
                         "against 250 of 256 KiB (and 16 of 4 MiB), the same 64 MiB, "
                         "alternated 3 times")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL|BIN|ARGS",
                    help="measure each incremental step with this binary and these extra "
                         "`standby sync` arguments too (repeatable; the target is synced back "
                         "to the step's start, unmeasured, before each variant)")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    variants = [("sync", binary, [])]
    for v in a.variant:
        label, vbin, vargs = (v.split("|") + ["", ""])[:3]
        variants.append((label, os.path.abspath(vbin or a.bin), vargs.split()))
    env = dict(os.environ, STACKVAULT_PASSWORD="standby-bench-password")
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    if a.put_cost:
        return put_cost(a)
    repo = os.path.join(a.work, "repo")
    rss = os.path.join(a.work, "rss")
    gens = [os.path.join(a.data, f"gen{g}.raw") for g in range(3)]
    log(f"load average at the start: {load()}")

    def sv(*args, bin=binary):
        return timed([bin, "--quiet"] + list(args), env, rss)

    sv("init", repo)
    snaps = []
    for g, path in enumerate(gens):
        wall, out, peak = sv("backup", repo, path, "--disk", "vm", "--json")
        snaps.append(json.loads(out)["snapshot_id"])
        log(f"backup gen{g}: {wall:.1f} s, {peak:.0f} MiB")
    changes = []
    for i in (1, 2):
        _, out, _ = sv("diff", repo, snaps[i - 1], snaps[i], "--json")
        d = json.loads(out)
        raw = changed_4k(gens[i - 1], gens[i])
        changes.append((d["changed_bytes"], raw))
        log(f"gen{i - 1} -> gen{i}: diff {d['changed_bytes']} bytes, 4 KiB blocks {raw} bytes")
    fixed_wall, _, fixed_rss = sv("snapshots", repo, "--json")

    rows = []

    def run_target(kind, target_of, full_target_of, after_full, check, server_pid=None):
        def sync(snap, bin=binary, extra=()):
            before = process_cpu(server_pid)
            wall, out, peak = sv("standby", "sync", "-r", repo, "--disk", "vm", "--snapshot",
                                 snap, target_of(), "--json", *extra, bin=bin)
            after = process_cpu(server_pid)
            server = None if before is None or after is None else after - before
            return wall, json.loads(out), peak, CPU["last"], server

        wall, r, peak, cpu, server = sync(snaps[0])
        rows.append(("sync", kind, "gen0 first sync (full)", wall, r, None, peak, None, None,
                     cpu, server, load()))
        log(f"{kind}: first sync {wall:.1f} s")
        held = snaps[0]
        for i in (1, 2):
            for label, vbin, vargs in variants:
                if held != snaps[i - 1]:
                    sync(snaps[i - 1])
                wall, r, peak, cpu, server = sync(snaps[i], vbin, vargs)
                held = snaps[i]
                assert r["mode"] == "incremental", r
                rows.append([label, kind, f"gen{i - 1} -> gen{i}", wall, r, None, peak, None,
                             changes[i - 1], cpu, server, load()])
                log(f"{kind} {label}: gen{i - 1} -> gen{i}: sync {wall:.2f} s ({peak:.0f} MiB, "
                    f"client CPU {cpu:.2f} s, server CPU {server or 0:.2f} s)")
            fwall, fout, fpeak = sv("restore", repo, snaps[i], full_target_of(i), "--json")
            after_full(i)
            for row in rows[-len(variants):]:
                row[5], row[7] = fwall, fpeak
            log(f"{kind}: gen{i}: full restore {fwall:.1f} s ({fpeak:.0f} MiB)")
        check()

    standby_file = os.path.join(a.work, "standby.raw")
    full_file = os.path.join(a.work, "full.raw")

    def file_check():
        same = subprocess.run(["cmp", "-s", standby_file, gens[2]]).returncode == 0
        log(f"file standby equals gen2: {same}")
        if not same:
            raise SystemExit("the file standby differs from gen2")

    if not a.no_file:
        run_target("file", lambda: standby_file, lambda i: full_file,
                   lambda i: os.remove(full_file), file_check)
        os.remove(standby_file)

    if not a.no_blob:
        azurite, port = start_azurite(os.path.abspath(a.azurite),
                                      os.path.join(a.work, "azurite"))
        try:
            endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
            sas = subprocess.run([a.python, "-c", SAS_SCRIPT, endpoint, KEY, "setup"],
                                 check=True, capture_output=True, text=True).stdout.strip()
            url = lambda name: f"{endpoint}/standby/{name}?{sas}"

            def drop_blob(i):
                subprocess.run([a.python, "-c", SAS_SCRIPT, endpoint, KEY, f"full{i}.vhd"],
                               check=True, capture_output=True)

            def blob_check():
                wall, out, _ = sv("verify", repo, snaps[2], "--target", url("standby.vhd"),
                                  "--json")
                outcome = json.loads(out).get("outcome")
                log(f"blob standby verify --target gen2: {outcome} ({wall:.1f} s)")
                if outcome != "ok":
                    raise SystemExit("the blob standby differs from gen2")

            run_target("page blob", lambda: url("standby.vhd"), lambda i: url(f"full{i}.vhd"),
                       drop_blob, blob_check, azurite.pid)
        finally:
            azurite.kill()
            azurite.wait()
            shutil.rmtree(os.path.join(a.work, "azurite"), ignore_errors=True)

    size = os.path.getsize(gens[0])
    print(f"\n{size / MIB:.0f} MiB disk ({a.data}); per-command fixed cost (open the "
          f"repository, unlock its key: `snapshots`): {fixed_wall:.2f} s, {fixed_rss:.0f} MiB "
          f"peak; load average at the end {load()}")
    print("| variant | target | step | sync s | full restore s | **sync / full** | written MiB "
          "| zeroed MiB | uploaded MiB | gap MiB | requests | diff changed MiB "
          "| 4 KiB blocks changed MiB | **written / diff** | **uploaded / diff** "
          "| sync CPU s | server CPU s | **sync peak RSS MiB** | restore peak RSS MiB | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|---:|---|")
    mib = lambda b: (b or 0) / MIB
    opt = lambda x, f: "" if x is None else f(x)
    for label, kind, step, wall, r, fwall, peak, fpeak, ch, cpu, server, ld in rows:
        up = r.get("uploaded_bytes")
        diff = None if ch is None else max(ch[0], 1)
        print(f"| {label} | {kind} | {step} | {wall:.2f} | {opt(fwall, '{:.2f}'.format)} | "
              f"{'' if fwall is None else f'{wall / fwall:.2f}'} | "
              f"{mib(r['written_bytes']):.1f} | {mib(r['zeroed_bytes']):.1f} | "
              f"{opt(up, lambda u: f'{mib(u):.1f}')} | {mib(r.get('gap_bytes')):.1f} | "
              f"{r['requests']} | {opt(ch, lambda c: f'{mib(c[0]):.1f}')} | "
              f"{opt(ch, lambda c: f'{mib(c[1]):.1f}')} | "
              f"{opt(diff, lambda d: '%.2f' % (r['written_bytes'] / d))} | "
              f"{'' if diff is None or up is None else '%.2f' % (up / diff)} | "
              f"{cpu:.2f} | {opt(server, '{:.2f}'.format)} | "
              f"{peak:.0f} | {opt(fpeak, '{:.0f}'.format)} | {ld} |")
    shutil.rmtree(a.work, ignore_errors=True)


def put_cost(a):
    """Is Azurite's cost per request or per byte? The same 64 MiB as 1,000 Put Pages of
    64 KiB, 250 of 256 KiB and 16 of 4 MiB, 8 in flight, alternated; Azurite's CPU seconds
    (from /proc) and the wall time of each, and the CPU per request and per MiB a least-squares
    fit of cpu = a * requests + b * MiB gives."""
    azurite, port = start_azurite(os.path.abspath(a.azurite), os.path.join(a.work, "azurite"))
    shapes = [(1000, 64 << 10), (250, 256 << 10), (16, 4 << 20)]
    rows = []
    try:
        endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
        subprocess.run([a.python, "-c", SAS_SCRIPT, endpoint, KEY, "setup"], check=True,
                       capture_output=True)
        for rep in range(3):
            for count, size in shapes:
                name = f"put-{rep}-{count}.vhd"
                before, started = process_cpu(azurite.pid), time.monotonic()
                subprocess.run([a.python, "-c", PUT_SCRIPT, endpoint, KEY, name, str(count),
                                str(size), "8"], check=True)
                wall, cpu = time.monotonic() - started, process_cpu(azurite.pid) - before
                subprocess.run([a.python, "-c", SAS_SCRIPT, endpoint, KEY, name], check=True)
                rows.append((count, size, wall, cpu, load()))
                log(f"{count} x {size >> 10} KiB: Azurite CPU {cpu:.2f} s, wall {wall:.2f} s")
    finally:
        azurite.kill()
        azurite.wait()
        shutil.rmtree(os.path.join(a.work, "azurite"), ignore_errors=True)
    print("| requests | KiB each | MiB | wall s | Azurite CPU s | CPU ms / request | load |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for count, size, wall, cpu, ld in rows:
        print(f"| {count} | {size >> 10} | {count * size / MIB:.0f} | {wall:.2f} | {cpu:.2f} | "
              f"{1000 * cpu / count:.2f} | {ld} |")
    # Least squares of cpu = a * requests + b * MiB over the rows.
    xs = [(c, c * s / MIB, cpu) for c, s, _, cpu, _ in rows]
    srr = sum(r * r for r, _, _ in xs)
    srm = sum(r * m for r, m, _ in xs)
    smm = sum(m * m for _, m, _ in xs)
    src = sum(r * y for r, _, y in xs)
    smc = sum(m * y for _, m, y in xs)
    det = srr * smm - srm * srm
    if det:
        per_req = (src * smm - smc * srm) / det
        per_mib = (srr * smc - srm * src) / det
        print(f"\nfit: Azurite CPU = {1000 * per_req:.2f} ms per request + "
              f"{1000 * per_mib:.2f} ms per MiB")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
