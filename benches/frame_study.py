#!/usr/bin/env python3
"""What the zstd level and the frame target size give on a real disk image: bytes and CPU.

    python3 benches/frame_study.py DISK.raw [--levels 3,4,5] [--frames 256,512,1024]

Needs the `zstandard` module (pip install zstandard==0.25.0, libzstd 1.5.7; the engine's
zstd-sys bundles 1.5.x). Models a gen0 backup's compress step (`backup/frames.rs`): the disk is
read in 4 MiB segments; runs of zero 4 KiB blocks of at least 64 KiB (the default
`zero_run_min`) are holes, not data; repeated 16 KiB pieces are stored once (a stand-in for
chunk dedup: the aligned chunker's average chunk); the remaining data of a segment, in disk
order, is cut into frames of at most the frame target and each frame is compressed alone.
Frames never span segments, as in the engine. Prints per (level, frame target) the compressed
bytes, the ratio to level 3 at 256 KiB (the engine's defaults), and the CPU seconds to
compress and to decompress everything once (a restore decompresses whole frames).

The model differs from the engine in where frames end (here at 4 KiB multiples, there at
chunk boundaries) and in dedup (16 KiB pieces, not keyed chunks), so read the ratios between
rows, not the absolute bytes. Single-threaded; the engine compresses on every core.
"""
import argparse
import hashlib
import os
import sys
import time

try:
    import zstandard
except ImportError:
    sys.exit("frame_study: needs the zstandard module (pip install zstandard==0.25.0)")

SEGMENT = 4 << 20
BLOCK = 4096
ZERO_RUN_MIN = 64 << 10
DEDUP_PIECE = 16 << 10


def segment_data(f, seen):
    """Yields each segment's stored data (holes and repeats removed), in disk order."""
    zero_block = bytes(BLOCK)
    while True:
        seg = f.read(SEGMENT)
        if not seg:
            return
        keep = bytearray()
        run = []  # pending zero blocks: data if the run stays short
        for at in range(0, len(seg), BLOCK):
            block = seg[at:at + BLOCK]
            if block == zero_block[:len(block)]:
                run.append(block)
                continue
            if len(run) * BLOCK < ZERO_RUN_MIN:
                for b in run:
                    keep += b
            run = []
            keep += block
        if len(run) * BLOCK < ZERO_RUN_MIN:
            for b in run:
                keep += b
        out = bytearray()
        for at in range(0, len(keep), DEDUP_PIECE):
            piece = bytes(keep[at:at + DEDUP_PIECE])
            digest = hashlib.blake2b(piece, digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            out += piece
        yield bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("disk")
    ap.add_argument("--levels", default="3,4,5")
    ap.add_argument("--frames", default="256,512,1024",
                    help="frame targets in KiB; a trailing s (1024s) keeps the tables zstd "
                         "picks for a 256 KiB input (hash log 16, min match 4) and only "
                         "widens the window to the frame")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    frames = [(int(x.rstrip("s")) << 10, x.endswith("s")) for x in args.frames.split(",")]
    # The stored data of the whole disk, segment by segment (about what gen0 adds).
    with open(args.disk, "rb") as f:
        segments = list(segment_data(f, set()))
    raw = sum(len(s) for s in segments)
    print(f"# {args.disk}: {os.path.getsize(args.disk) / 2**20:.0f} MiB, "
          f"{raw / 2**20:.1f} MiB of stored data after holes and repeats; "
          f"zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| zstd level | frame target KiB | frames | compressed MiB | × level 3, 256 KiB "
          "| compress CPU s | decompress CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for level in levels:
        dctx = zstandard.ZstdDecompressor()
        for target, small_tables in frames:
            if small_tables:
                p = zstandard.ZstdCompressionParameters.from_level(level, source_size=256 << 10)
                params = zstandard.ZstdCompressionParameters(
                    window_log=max(p.window_log, (target - 1).bit_length()),
                    chain_log=p.chain_log, hash_log=p.hash_log, search_log=p.search_log,
                    min_match=p.min_match, target_length=p.target_length,
                    strategy=p.strategy)
                cctx = zstandard.ZstdCompressor(compression_params=params)
            else:
                cctx = zstandard.ZstdCompressor(level=level)
            pieces = [s[at:at + target] for s in segments for at in range(0, len(s), target)]
            t = time.process_time()
            packed = [cctx.compress(p) for p in pieces]
            c_cpu = time.process_time() - t
            t = time.process_time()
            for p in packed:
                dctx.decompress(p)
            d_cpu = time.process_time() - t
            # A frame that does not shrink is stored raw, as the engine does.
            size = sum(min(len(c), len(p)) for c, p in zip(packed, pieces))
            if base is None:
                base = size
            label = f"{target >> 10}{' (256 KiB tables)' if small_tables else ''}"
            print(f"| {level} | {label} | {len(pieces)} | {size / 2**20:.1f} | "
                  f"{size / base:.3f} | {c_cpu:.2f} | {d_cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
