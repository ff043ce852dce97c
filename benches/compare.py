#!/usr/bin/env python3
"""End-to-end benchmark: stackvault against restic and borg on the same disk images.

Builds (or reuses) gen0..gen2 of a VM disk with ../shared/datasets/make-disks.sh, then for each
repetition runs every tool on the same files, alternating the order of tools between
repetitions: backups of gen0, gen1, gen2 into a fresh repository, then a restore of gen2. Each
run is measured with /usr/bin/time (wall, CPU, peak RSS); repository growth with du. Figures are
medians over repetitions, each also as a ratio to restic measured in the same run.

stackvault extras: incremental of gen1/gen2 with a change list derived by comparing the images,
change-list incrementals of 10 / 30 / 100 % of gen1's changed ranges (cost against size),
the fixed and dynamic VHD exports (when the binary reads VHDs), a sparse 64 GiB disk with 1 %
data, and a 64 GiB disk holding 16 copies of gen0 (full backup, unchanged incremental, verify:
does memory stay flat when the disk map is 16 times larger?; skipped when the work directory's
file system lacks the room). Floors: `zstd -T0 -3` over gen0.raw, and the zstd -3 size of the
4 KiB blocks that changed.

Encryption: stackvault runs twice, encrypted (its default) and `--encryption none`, in the
same repetitions. Every command on an encrypted repository first unlocks its key (Argon2id, a
fixed cost per command, not per byte): it is measured on its own, as the median of
`snapshots` on the encrypted repository minus the same on the plain one, and the encryption
cost is given with and without it.

Usage: benches/compare.sh [--size 4G] [--fs ext4] [--reps 3] [--data DIR] [--work DIR]
                          [--results benches/RESULTS.md] [--skip-sparse] [--skip-dense]
                          [--skip-borg] [--bin target/release/stackvault]
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_DISKS = os.path.join(ROOT, "..", "shared", "datasets", "make-disks.sh")
BLOCK = 4096
PASSWORD_ENV = {"RESTIC_PASSWORD": "bench", "STACKVAULT_PASSWORD": "bench", "BORG_PASSPHRASE": "",
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, cwd=None, env=None, quiet=True):
    """Runs cmd under /usr/bin/time; returns dict(wall, cpu, rss_mb, out)."""
    fd, tfile = tempfile.mkstemp(prefix="time-")
    os.close(fd)
    full_env = dict(os.environ, **PASSWORD_ENV, **(env or {}))
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tfile] + cmd, cwd=cwd,
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(tfile) as f:
        last = f.read().strip().splitlines()[-1].split()
    os.unlink(tfile)
    wall, user, sys_, rss = float(last[0]), float(last[1]), float(last[2]), int(last[3])
    return {"wall": wall, "cpu": user + sys_, "rss_mb": rss / 1024, "out": proc.stdout}


def du(path):
    out = subprocess.run(["du", "-sb", path], stdout=subprocess.PIPE, text=True, check=True)
    return int(out.stdout.split()[0])


def drop_caches_hint():
    # Not dropping caches (needs root and disturbs other users); every tool reads warm files.
    pass


def tool_version(cmd):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True).stdout.strip().splitlines()[0]
    except OSError:
        return "absent"


def changed_blocks(old, new):
    """4 KiB blocks that differ between two images: list of (offset, length) runs, and the
    concatenated changed blocks of the new image (for the zstd floor)."""
    runs, changed = [], bytearray()
    step = 4 << 20
    with open(old, "rb") as a, open(new, "rb") as b:
        off = 0
        while True:
            x, y = a.read(step), b.read(step)
            if not y:
                break
            if x != y:
                for i in range(0, len(y), BLOCK):
                    if x[i:i + BLOCK] != y[i:i + BLOCK]:
                        o = off + i
                        if runs and runs[-1][0] + runs[-1][1] == o:
                            runs[-1][1] += len(y[i:i + BLOCK])
                        else:
                            runs.append([o, len(y[i:i + BLOCK])])
                        changed += y[i:i + BLOCK]
            off += len(y)
    return runs, bytes(changed)


def zstd_size(data):
    """zstd -T0 -3 of data: (compressed size, wall seconds of the compression)."""
    t = time.monotonic()
    p = subprocess.run(["zstd", "-T0", "-3", "-c", "-q"], input=data, stdout=subprocess.PIPE, check=True)
    return len(p.stdout), time.monotonic() - t


class Tool:
    name = "?"

    def __init__(self, work, binary=None):
        self.work = work
        self.repo = os.path.join(work, f"repo-{self.name}")
        self.binary = binary

    def fresh(self):
        shutil.rmtree(self.repo, ignore_errors=True)
        self.init()


class Stackvault(Tool):
    """stackvault with its default, encryption (the password from STACKVAULT_PASSWORD)."""
    name = "stackvault"
    chunker = "aligned"
    encryption = []

    def init(self):
        run([self.binary, "init", self.repo, "--chunker", self.chunker, *self.encryption])

    def backup(self, path, extra=()):
        r = run([self.binary, "backup", self.repo, path, "--disk", "bench", "--json", *extra])
        report = json.loads(r["out"])
        # The counters sit under "stats" in the backup report (docs/json.md).
        report.update(report.get("stats", {}))
        r["report"] = report
        return r

    def restore(self, target_dir):
        out = os.path.join(target_dir, "disk.raw")
        return run([self.binary, "restore", self.repo, "latest", out, "--force"]), out


class StackvaultPlain(Stackvault):
    """stackvault with `--encryption none`: what encryption costs is the difference."""
    name = "stackvault-plain"
    encryption = ["--encryption", "none"]


class Restic(Tool):
    name = "restic"

    def init(self):
        run(["restic", "init", "--repo", self.repo, "--repository-version", "2"])

    def backup(self, path, extra=()):
        d, f = os.path.split(path)
        return run(["restic", "backup", "--repo", self.repo, "--quiet", f], cwd=d)

    def restore(self, target_dir):
        r = run(["restic", "restore", "latest", "--repo", self.repo, "--target", target_dir])
        return r, os.path.join(target_dir, "disk.raw")


class Borg(Tool):
    name = "borg"
    count = 0

    def init(self):
        run(["borg", "init", "-e", "none", self.repo])

    def backup(self, path, extra=()):
        d, f = os.path.split(path)
        Borg.count += 1
        return run(["borg", "create", "--compression", "zstd,3", f"{self.repo}::a{Borg.count}", f],
                   cwd=d)

    def restore(self, target_dir):
        r = run(["borg", "extract", f"{self.repo}::a{Borg.count}"], cwd=target_dir)
        return r, os.path.join(target_dir, "disk.raw")


def dense_runs(sv, sv_bin, gen0, virtual, work, copies=16):
    """A 64 GiB disk holding `copies` copies of gen0 (a disk map `copies` times gen0's):
    full backup, unchanged incremental, verify. Returns (label, run, virtual size) rows."""
    size = 64 << 30
    if copies * virtual > size:
        log("skipping the dense 64 GiB disk: gen0 is too large for 16 copies")
        return []
    dense = os.path.join(work, "dense64g.raw")
    need = os.stat(gen0).st_blocks * 512 * copies + (4 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        log(f"skipping the dense 64 GiB disk: it needs {need / 2**30:.0f} GiB free in {work}, "
            f"{free / 2**30:.0f} GiB are")
        return []
    log(f"building a 64 GiB disk of {copies} copies of gen0 ...")
    with open(dense, "wb") as f:
        f.truncate(size)
    for i in range(copies):
        subprocess.run(["dd", f"if={gen0}", f"of={dense}", "bs=4M", f"seek={i * virtual}", "oflag=seek_bytes",
                        "conv=sparse,notrunc", "status=none"], check=True)
    try:
        sv.fresh()
        rows = [(f"64 GiB, {copies} copies of gen0: full backup", sv.backup(dense), size),
                (f"64 GiB, {copies} copies of gen0: unchanged incremental", sv.backup(dense), size),
                (f"64 GiB, {copies} copies of gen0: verify", run([sv_bin, "verify", sv.repo, "latest",
                                                                   "--no-record"]), size)]
    finally:
        os.unlink(dense)
    return rows


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--fs", default="ext4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", help="existing make-disks.sh output to reuse")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--results", help="add the table to this markdown file (newest first: "
                    "before its first section)")
    ap.add_argument("--skip-extras", action="store_true",
                    help="only the comparison rows: no floors, no change-list incrementals, no "
                    "scaling rows (for a large disk on a loaded machine)")
    ap.add_argument("--bin", help="a stackvault binary to use instead of building "
                    "target/release/stackvault")
    ap.add_argument("--skip-sparse", action="store_true")
    ap.add_argument("--skip-borg", action="store_true")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--chunkers", default="aligned,aligned:8K:32K:128K,fastcdc,"
                    "fastcdc:8K:32K:128K,fastcdc:16K:64K:256K,fastcdc:32K:128K:512K,fixed:1M",
                    help="stackvault chunker variants to compare (comma separated; '' to skip)")
    args = ap.parse_args()

    for t in ["restic"] + ([] if args.skip_borg else ["borg"]):
        if shutil.which(t) is None:
            sys.exit(f"{t} is missing: apt-get install restic borgbackup")
    work = args.work or tempfile.mkdtemp(prefix="sv-bench-")
    os.makedirs(work, exist_ok=True)
    data = args.data
    if not data:
        if not os.path.exists(MAKE_DISKS):
            log(f"skipping: {MAKE_DISKS} not found (shared dataset script absent)")
            return 0
        data = os.path.join(work, "disks")
        if not os.path.exists(os.path.join(data, "gen2.raw")):
            log(f"building {args.size} {args.fs} dataset in {data} ...")
            subprocess.run(["bash", MAKE_DISKS, "-s", args.size, "-f", args.fs, "-o", data],
                           check=True, stdout=subprocess.DEVNULL)
    if args.bin:
        sv_bin = os.path.abspath(args.bin)
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "stackvault-cli"], cwd=ROOT,
                       check=True)
        sv_bin = os.path.join(ROOT, "target", "release", "stackvault")
    load_before = os.getloadavg()
    gens = [os.path.join(data, f"gen{g}.raw") for g in range(3)]
    virtual = os.path.getsize(gens[0])
    # One stable path that every tool backs up, hard-linked to each generation in turn.
    src_dir = os.path.join(work, "src")
    os.makedirs(src_dir, exist_ok=True)
    src = os.path.join(src_dir, "disk.raw")

    def stage(gen_path):
        if os.path.exists(src):
            os.unlink(src)
        os.link(gen_path, src)

    floors, lists = {}, {}
    if not args.skip_extras:
        log("computing change lists and floors ...")
    for g in ((1, 2) if not args.skip_extras else ()):
        runs, blocks = changed_blocks(gens[g - 1], gens[g])
        lists[g] = os.path.join(work, f"gen{g}.changes.json")
        with open(lists[g], "w") as f:
            json.dump({"disk_size": virtual, "ranges": [{"offset": o, "length": n} for o, n in runs]}, f)
        size, secs = zstd_size(blocks)
        floors[g] = {"changed_raw": len(blocks), "changed_zstd": size, "changed_zstd_wall": secs}
    if not args.skip_extras:
        zstd_gen0 = run(["zstd", "-T0", "-3", "-q", "-f", gens[0], "-o", os.path.join(work, "gen0.zst")])
        floors[0] = {"zstd_wall": zstd_gen0["wall"],
                     "zstd_size": os.path.getsize(os.path.join(work, "gen0.zst"))}
        os.unlink(os.path.join(work, "gen0.zst"))

    tools = [Stackvault(work, sv_bin), StackvaultPlain(work, sv_bin), Restic(work)] + \
        ([] if args.skip_borg else [Borg(work)])
    results = {t.name: {k: [] for k in ["gen0", "gen1", "gen2", "restore", "open"]} for t in tools}
    extra = {k: [] for k in ["gen1_changes", "gen2_changes", "gen0_again"]}
    for rep in range(args.reps):
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        for tool in order:
            log(f"rep {rep + 1}/{args.reps}: {tool.name}")
            tool.fresh()
            for g in range(3):
                stage(gens[g])
                before = du(tool.repo)
                r = tool.backup(src)
                r["added"] = du(tool.repo) - before
                results[tool.name][f"gen{g}"].append(r)
            restore_dir = os.path.join(work, "restore")
            shutil.rmtree(restore_dir, ignore_errors=True)
            os.makedirs(restore_dir)
            r, out = tool.restore(restore_dir)
            if subprocess.run(["cmp", "-s", out, gens[2]]).returncode != 0:
                raise RuntimeError(f"{tool.name} restore of gen2 differs from the source")
            r["allocated"] = os.stat(out).st_blocks * 512
            results[tool.name]["restore"].append(r)
            shutil.rmtree(restore_dir, ignore_errors=True)
            if isinstance(tool, Stackvault):
                # Opening the repository and listing its three snapshots: almost all of it is
                # the unlock when encrypted (see the module doc).
                for _ in range(3):
                    results[tool.name]["open"].append(run([sv_bin, "snapshots", tool.repo, "--json"]))
            if type(tool) is Stackvault and not args.skip_extras:
                # Re-backup of an unchanged disk, then incrementals with change lists.
                stage(gens[2])
                extra["gen0_again"].append(tool.backup(src))
                tool.fresh()
                stage(gens[0])
                tool.backup(src)
                for g in (1, 2):
                    stage(gens[g])
                    before = du(tool.repo)
                    r = tool.backup(src, ["--changed-ranges", lists[g]])
                    r["added"] = du(tool.repo) - before
                    extra[f"gen{g}_changes"].append(r)

    sv = Stackvault(work, sv_bin)
    vhd_rows = []
    help_text = subprocess.run([sv_bin, "backup", "--help"], stdout=subprocess.PIPE, text=True).stdout
    if "--format" in help_text:
        for kind in ("fixed", "dynamic"):
            sv.fresh()
            for g in range(3):
                p = os.path.join(data, f"gen{g}.{kind}.vhd")
                if os.path.exists(p):
                    r = sv.backup(p)
                    vhd_rows.append((f"{kind} VHD gen{g}", r))
    chunker_rows = []
    # Plain, so that every variant runs: an encrypted repository refuses FastCDC (its gear
    # table would be the secret the chunking attacks recover).
    sv = StackvaultPlain(work, sv_bin)
    for spec in [c for c in args.chunkers.split(",") if c]:
        sv.chunker = spec
        sv.fresh()
        runs_, chunks = [], 0
        for g in range(3):
            stage(gens[g])
            before = du(sv.repo)
            r = sv.backup(src)
            r["added"] = du(sv.repo) - before
            chunks += r["report"]["new_chunks"]
            runs_.append(r)
        index_bytes = sum(os.path.getsize(os.path.join(sv.repo, f)) for f in os.listdir(sv.repo)
                          if f.startswith("index.sqlite"))
        chunker_rows.append((spec, runs_, chunks, index_bytes))
    sv = Stackvault(work, sv_bin)
    sparse_rows = []
    if not args.skip_sparse:
        sparse = os.path.join(work, "sparse64g.raw")
        with open(sparse, "wb") as f:
            f.truncate(64 << 30)
        # 1 % data: 64 pieces of ~10 MiB from gen0 spread over the disk.
        with open(gens[0], "rb") as src_f, open(sparse, "r+b") as dst:
            piece = (64 << 30) // 100 // 64
            for i in range(64):
                src_f.seek((i * 7919 * piece) % max(1, virtual - piece))
                dst.seek(i * (1 << 30))
                dst.write(src_f.read(piece))
        sv.fresh()
        sparse_rows.append(("sparse 64 GiB, 1 % data", sv.backup(sparse), 64 << 30))
        os.unlink(sparse)
    if not args.skip_dense:
        sparse_rows += dense_runs(sv, sv_bin, gens[0], virtual, work)

    # Change-list incrementals of growing size: gen0 with a random share of gen1's changed
    # ranges applied, backed up with the matching list (does the cost follow the change?).
    scaling_rows = []
    if not args.skip_extras:
        with open(lists[1]) as f:
            gen1_ranges = json.load(f)["ranges"]
        sv.fresh()
        sv.backup(gens[0])
        base_repo = sv.repo + "-base"
        shutil.rmtree(base_repo, ignore_errors=True)
        shutil.copytree(sv.repo, base_repo)
        rng = random.Random(7)
        scaled = os.path.join(work, "scaled.raw")
        for share in (0.1, 0.3, 1.0):
            subset = [r for r in gen1_ranges if share >= 1.0 or rng.random() < share]
            subprocess.run(["cp", "--sparse=always", gens[0], scaled], check=True)
            with open(gens[1], "rb") as g1, open(scaled, "r+b") as out:
                for r in subset:
                    g1.seek(r["offset"])
                    out.seek(r["offset"])
                    out.write(g1.read(r["length"]))
            listed = os.path.join(work, "scaled.changes.json")
            with open(listed, "w") as f:
                json.dump({"disk_size": virtual, "ranges": subset}, f)
            best = None
            for _ in range(max(1, args.reps)):
                shutil.rmtree(sv.repo, ignore_errors=True)
                shutil.copytree(base_repo, sv.repo)
                r = sv.backup(scaled, ["--changed-ranges", listed])
                if best is None or r["wall"] < best["wall"]:
                    best = r
            scaling_rows.append((share, len(subset), sum(r["length"] for r in subset), best))
        shutil.rmtree(base_repo, ignore_errors=True)
        os.unlink(scaled)

    # The raw measurements, should the report need redoing.
    with open(os.path.join(work, "raw-results.json"), "w") as f:
        json.dump({"results": results, "extra": extra, "floors": floors, "load_before": load_before,
                   "load_after": os.getloadavg()}, f, default=str)

    # ---- report ----
    load_after = os.getloadavg()
    mb = virtual / 1e6
    rs = results["restic"]
    lines = []
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    size_label = f"{virtual / 2**30:.2f} GiB" if virtual >= 2**30 else f"{virtual / 2**20:.0f} MiB"
    lines.append(f"## {now}: {size_label} {args.fs} disk, {args.reps} repetitions\n")
    lines.append(f"Machine: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}. "
                 f"Tools: {tool_version([sv_bin, '--version'])}, {tool_version(['restic', 'version'])}, "
                 f"{tool_version(['borg', '--version'])}, {tool_version(['zstd', '--version'])}. "
                 f"Load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
                 f"on {os.cpu_count()} cores: compare ratios within this run only.\n")
    lines.append(f"Command: `benches/compare.sh {' '.join(sys.argv[1:])}`. "
                 "Medians; (×N) = ratio to restic in the same run (time: restic/tool, so >1 is faster; "
                 "bytes and RSS: tool/restic, so <1 is smaller). restic 0.14 with repository v2 "
                 "(compression auto, encryption always on); borg with `-e none --compression zstd,3`; "
                 "stackvault encrypted (its default: XChaCha20-Poly1305, keyed ids and cuts) and "
                 "`stackvault-plain` (`--encryption none`); the extra rows are the encrypted one.\n")
    lines.append("| run | tool | wall s | MB/s | CPU s | CPU/wall | peak RSS MiB | added MiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")

    def row(label, name, rr, ref, mb=mb):
        w, c, m = median([x["wall"] for x in rr]), median([x["cpu"] for x in rr]), median([x["rss_mb"] for x in rr])
        a = median([x.get("added", 0) for x in rr]) / 2**20
        if ref:
            rw, rm = median([x["wall"] for x in ref]), median([x["rss_mb"] for x in ref])
            ra = median([x.get("added", 0) for x in ref]) / 2**20
            ratio = lambda v, r, inv: f" (×{(r / v if inv else v / r):.2f})" if v and r else ""
            lines.append(f"| {label} | {name} | {w:.2f}{ratio(w, rw, True)} | {mb / w:.0f} | {c:.2f} | {c / w:.2f} | "
                         f"{m:.0f}{ratio(m, rm, False)} | {a:.1f}{ratio(a, ra, False) if ra else ''} |")
        else:
            lines.append(f"| {label} | {name} | {w:.2f} | {mb / w:.0f} | {c:.2f} | {c / w:.2f} | {m:.0f} | {a:.1f} |")

    for key, label in [("gen0", "backup gen0"), ("gen1", "backup gen1"), ("gen2", "backup gen2"),
                       ("restore", "restore gen2")]:
        for t in tools:
            row(label, t.name, results[t.name][key], None if t.name == "restic" else rs[key])
    if not args.skip_extras:
        row("re-backup unchanged gen2", "stackvault", extra["gen0_again"], rs["gen2"])
        row("gen1 with change list", "stackvault", extra["gen1_changes"], rs["gen1"])
        row("gen2 with change list", "stackvault", extra["gen2_changes"], rs["gen2"])
    for label, r in vhd_rows:
        row(label, "stackvault", [r], None)
    for label, r, size in sparse_rows:
        row(label, "stackvault", [r], None, size / 1e6)
    if chunker_rows:
        lines.append("")
        lines.append("Chunker variants (stackvault, gen0 → gen1 → gen2, one run each):")
        lines.append("")
        lines.append("| chunker | gen0 MB/s | added gen0 MiB | added gen1 MiB | added gen2 MiB | "
                     "chunks | index bytes/chunk | chunks per TiB stored |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for spec, rr, chunks, ib in chunker_rows:
            stored = sum(r["report"]["new_bytes"] for r in rr)
            per_tib = chunks / max(1, stored) * 2**40
            lines.append(f"| {spec} | {mb / rr[0]['wall']:.0f} | {rr[0]['added'] / 2**20:.1f} | "
                         f"{rr[1]['added'] / 2**20:.1f} | {rr[2]['added'] / 2**20:.1f} | {chunks} | "
                         f"{ib / max(1, chunks):.0f} | {per_tib / 1e6:.1f} M |")
    total = {t.name: sum(median([x["added"] for x in results[t.name][f"gen{g}"]]) for g in range(3)) for t in tools}
    lines.append("")
    lines.append(f"- Repository after gen0+gen1+gen2: " + ", ".join(
        f"{n} {v / 2**20:.1f} MiB" + (f" (×{v / total['restic']:.2f})" if n != "restic" else "")
        for n, v in total.items()))
    plain = results["stackvault-plain"]
    costs = []
    for key in ("gen0", "gen1", "gen2", "restore"):
        enc_w = median([x["wall"] for x in results["stackvault"][key]])
        plain_w = median([x["wall"] for x in plain[key]])
        costs.append(f"{key} {100 * (enc_w / plain_w - 1):+.1f} %")
    lines.append("- Encryption's cost (encrypted wall / plain wall - 1, same run): " + ", ".join(costs))
    opens = {n: median([x["wall"] for x in results[n]["open"]]) for n in ("stackvault", "stackvault-plain")}
    unlock = max(0.0, opens["stackvault"] - opens["stackvault-plain"])
    open_cpu = {n: median([x["cpu"] for x in results[n]["open"]]) for n in opens}
    lines.append(f"- Unlock, once per command (`snapshots` on the encrypted repository minus the plain "
                 f"one, medians of {len(results['stackvault']['open'])}): {unlock:.2f} s wall "
                 f"({opens['stackvault']:.2f} s against {opens['stackvault-plain']:.2f} s), "
                 f"{max(0.0, open_cpu['stackvault'] - open_cpu['stackvault-plain']):.2f} s CPU")
    data_costs = []
    for key in ("gen0", "gen1", "gen2", "restore"):
        enc_w = median([x["wall"] for x in results["stackvault"][key]])
        plain_w = median([x["wall"] for x in plain[key]])
        data_costs.append(f"{key} {100 * ((enc_w - unlock) / plain_w - 1):+.1f} %")
    lines.append("- Encryption's cost on the data path (encrypted wall minus the unlock, / plain wall "
                 "- 1): " + ", ".join(data_costs))
    for g in [g for g in (1, 2) if g in floors]:
        fl = floors[g]
        added = median([x["added"] for x in results["stackvault"][f"gen{g}"]])
        lines.append(f"- gen{g}: {fl['changed_raw'] / 2**20:.1f} MiB of 4 KiB blocks changed, "
                     f"{fl['changed_zstd'] / 2**20:.1f} MiB after zstd -3 (floor); stackvault added "
                     f"{added / 2**20:.1f} MiB = ×{added / max(1, fl['changed_zstd']):.2f} the floor")
    for g in [g for g in (1, 2) if extra[f"gen{g}_changes"]]:
        with_list = extra[f"gen{g}_changes"]
        wl = median([x["wall"] for x in with_list])
        full_read = median([x["wall"] for x in results["stackvault"][f"gen{g}"]])
        read = median([x["report"]["bytes_read"] for x in with_list])
        read_all = median([x["report"]["bytes_read"] for x in results["stackvault"][f"gen{g}"]])
        lines.append(f"- gen{g} with its change list: {wl:.2f} s = {100 * wl / full_read:.0f} % of the "
                     f"incremental that reads everything ({full_read:.2f} s); read {read / 1e6:.0f} MB "
                     f"instead of {read_all / 1e6:.0f} MB; `zstd -T0 -3` of just the changed blocks "
                     f"takes {floors[g]['changed_zstd_wall']:.2f} s")
    if scaling_rows:
        lines.append("")
        lines.append("Change-list incrementals of growing size (gen0 with a random share of gen1's "
                     "changed ranges applied, best of the repetitions):")
        lines.append("")
        lines.append("| ranges of gen1 | changed MiB | read MiB | new chunk MiB | wall s |")
        lines.append("|---:|---:|---:|---:|---:|")
        for share, n, changed, r in scaling_rows:
            lines.append(f"| {n} ({share:.0%}) | {changed / 2**20:.1f} | "
                         f"{r['report']['bytes_read'] / 2**20:.1f} | "
                         f"{r['report']['new_bytes'] / 2**20:.1f} | {r['wall']:.2f} |")
        lines.append("")
    sv0 = median([x["wall"] for x in results["stackvault"]["gen0"]])
    if 0 in floors:
        lines.append(f"- `zstd -T0 -3` over gen0.raw: {floors[0]['zstd_wall']:.2f} s "
                     f"({floors[0]['zstd_size'] / 2**20:.1f} MiB); stackvault gen0 takes "
                     f"×{sv0 / floors[0]['zstd_wall']:.2f} of that time")
    restore_alloc = median([x["allocated"] for x in results["stackvault"]["restore"]])
    lines.append(f"- stackvault's restored gen2 allocates {restore_alloc / 2**20:.0f} MiB of "
                 f"{virtual / 2**20:.0f} MiB (sparse)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        # Newest first: before the file's first section (appended when it has none).
        with open(args.results) as f:
            old = f.read()
        at = old.find("\n## ")
        new = old + "\n" + text if at < 0 else old[:at + 1] + text + "\n" + old[at + 1:]
        with open(args.results, "w") as f:
            f.write(new)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
