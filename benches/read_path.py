#!/usr/bin/env python3
"""No-regression check of the read path (issue 13's `read/` bullet): `restore` of gen2 and
`verify` of gen2 by two release binaries, alternated, on the same repositories.

The three generations of the dataset (gen0..gen2.raw, ../shared/datasets/make-disks.sh) are
backed up once by the first binary into an encrypted and a plain repository (the binaries
share the on-disk format, so both read the same packs, warm in the page cache alike). Then, for
each repetition and each repository, the binaries take turns (the order flips every
repetition): `restore R latest OUT --force` (the output compared with gen2 byte for byte) and
`verify R latest`, each timed as a child process. Prints the medians per binary and the ratio
BRANCH / BASE (below 1: the branch is faster), and the load average before and after.

Usage: python3 benches/read_path.py BASE_BIN BRANCH_BIN [REPS] [--data DIR] [--work DIR]
       (defaults: 3 repetitions, /var/tmp/bench/data, a temporary directory in /var/tmp)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("branch")
    ap.add_argument("reps", nargs="?", type=int, default=3)
    ap.add_argument("--data", default="/var/tmp/bench/data")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="read-path-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, STACKVAULT_PASSWORD="bench")
    gens = [os.path.join(a.data, f"gen{g}.raw") for g in range(3)]
    bins = {"base": a.base, "branch": a.branch}

    def run(cmd):
        t = time.monotonic()
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode()[-500:]}")
        return time.monotonic() - t

    load_before = os.getloadavg()
    repos = {}
    for kind, extra in (("encrypted", []), ("plain", ["--encryption", "none"])):
        repo = os.path.join(work, f"repo-{kind}")
        shutil.rmtree(repo, ignore_errors=True)
        run([a.base, "init", repo, *extra])
        src = os.path.join(work, "disk.raw")
        for g in gens:
            if os.path.exists(src):
                os.unlink(src)
            os.link(g, src)
            run([a.base, "backup", repo, src, "--disk", "bench"])
        os.unlink(src)
        repos[kind] = repo

    out = os.path.join(work, "out.raw")
    res = {k: {b: {"restore": [], "verify": []} for b in bins} for k in repos}
    for rep in range(a.reps):
        order = list(bins) if rep % 2 == 0 else list(bins)[::-1]
        for kind, repo in repos.items():
            for b in order:
                w = run([bins[b], "restore", repo, "latest", out, "--force"])
                if subprocess.run(["cmp", "-s", out, gens[2]]).returncode != 0:
                    sys.exit(f"{b}: the restore of gen2 ({kind}) differs")
                os.unlink(out)
                v = run([bins[b], "verify", repo, "latest"])
                res[kind][b]["restore"].append(w)
                res[kind][b]["verify"].append(v)
                print(f"rep {rep + 1} {kind} {b}: restore {w:.2f}s verify {v:.2f}s",
                      file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    med = lambda xs: sorted(xs)[len(xs) // 2]
    summary = {"load_before": load_before, "load_after": load_after}
    for kind, r in res.items():
        s = {b: {op: round(med(v), 3) for op, v in ops.items()} for b, ops in r.items()}
        for op in ("restore", "verify"):
            s[f"{op}_ratio_branch_to_base"] = round(s["branch"][op] / s["base"][op], 3)
        s["runs"] = r
        summary[kind] = s
    print(json.dumps(summary))
    if not a.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
