#!/usr/bin/env python3
"""Where a served disk's memory goes: starts `stackvault serve` on the latest snapshot of a
repository, copies the export with `qemu-img convert`, and breaks the server's resident memory
down by kind of mapping (heap, file-backed, anonymous maps) when it was ready, at the highest
resident size seen (polled every 10 ms), and at the end; then compares the growth since
'ready' with what the server's budget charged (its `--json` stopped line).

    STACKVAULT_PASSWORD=… python3 benches/nbd_memory_map.py --bin BIN --repo REPO [--cache-mib 64] [--passes 3]

Read off: "growth since ready" against "charged at end" and "outside": the difference is
memory no charge names (the server counts it against the budget, up to a sixteenth), and
"VmHWM growth - cache", the figure `benches/nbd.py --parts mem` reports.
"""
import argparse
import os
import subprocess
import tempfile
import threading
import time

from nbd import start_server, stop

MIB = 1024  # /proc figures are KiB


def smaps(pid):
    """Resident KiB of the process by kind of mapping."""
    kinds, kind = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                path = parts[5] if len(parts) > 5 else ""
                if path.startswith("/"):
                    kind = "file-backed (code, libraries)"
                elif path:
                    kind = path
                else:
                    # Adjacent anonymous maps are merged by the kernel: sizes say little.
                    kind = "anonymous maps (frames, buffers, stacks)"
            elif parts[0] == "Rss:" and kind:
                kinds[kind] = kinds.get(kind, 0) + int(parts[1])
    return kinds


def status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def one_pass(a, work):
    p, uri = start_server(a.bin, a.repo, "latest", os.path.join(work, "sv.sock"), a.cache_mib)
    at_ready, hwm_ready, rss_ready = smaps(p.pid), status(p.pid, "VmHWM:"), status(p.pid, "VmRSS:")
    highest = [rss_ready, at_ready]
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                rss = status(p.pid, "VmRSS:")
                if rss > highest[0] + 200:
                    highest[0], highest[1] = rss, smaps(p.pid)
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    out = os.path.join(work, "copy.img")
    subprocess.run(["qemu-img", "convert", "-O", "raw", uri, out], check=True)
    done.set()
    t.join()
    os.remove(out)
    at_end, hwm, rss_end = smaps(p.pid), status(p.pid, "VmHWM:"), status(p.pid, "VmRSS:")
    mem = stop(p).get("memory", {})
    mib = lambda b: b / 2**20
    print(f"VmHWM growth - cache {(hwm - hwm_ready) / MIB - a.cache_mib:+.2f} MiB; "
          f"growth since ready {(rss_end - rss_ready) / MIB:.2f} MiB; charged at end "
          f"{mib(mem.get('used_bytes', 0)):.2f} MiB (peak {mib(mem.get('peak_bytes', 0)):.2f}); "
          f"outside at end {mib(mem.get('outside_bytes', 0)):.2f} MiB "
          f"(peak {mib(mem.get('outside_peak_bytes', 0)):.2f})")
    for kind in sorted(set(at_ready) | set(at_end) | set(highest[1])):
        r, h, e = at_ready.get(kind, 0), highest[1].get(kind, 0), at_end.get(kind, 0)
        if max(r, h, e) >= 64:
            print(f"  {kind:42s} ready {r / MIB:7.2f}  highest {h / MIB:7.2f} ({(h - r) / MIB:+6.2f})"
                  f"  end {e / MIB:7.2f} ({(e - r) / MIB:+6.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--cache-mib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        for i in range(a.passes):
            print(f"pass {i + 1}, load {os.getloadavg()[0]:.1f}")
            one_pass(a, work)


if __name__ == "__main__":
    main()
