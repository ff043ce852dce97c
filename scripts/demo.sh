#!/usr/bin/env bash
# Demo: build stackvault, make a sample VM disk from real files of this machine, back it up,
# change it, back it up again (only the changes are stored), restore both and compare.
# Usage: bash scripts/demo.sh [WORKDIR]   (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p stackvault-cli
SV=$PWD/target/release/stackvault
WORK=${1:-$(mktemp -d -t stackvault-demo.XXXXXX)}
mkdir -p "$WORK"
DISK=$WORK/disk.img REPO=$WORK/repo
echo "== work directory: $WORK"
# Repositories are encrypted: every command reads the password from STACKVAULT_PASSWORD (or
# --password-file / --password-command, or asks on a terminal). The demo uses a fixed one.
export STACKVAULT_PASSWORD=${STACKVAULT_PASSWORD:-stackvault demo password}

# A 256 MiB sparse disk with real binaries and text laid out like files on a file system,
# and free (zero) space in between.
rm -rf "$DISK" "$REPO"
truncate -s 256M "$DISK"
offset=1   # MiB; leave the first MiB as a partition gap
find /usr/bin /usr/share/doc -type f -size +16k -size -4M 2>/dev/null | sort | head -n 400 |
while read -r f; do
  [ "$offset" -ge 160 ] && break
  dd if="$f" of="$DISK" bs=1M seek="$offset" conv=notrunc status=none iflag=fullblock 2>/dev/null || true
  size=$(stat -c %s "$f")
  offset=$(( offset + (size >> 20) + 1 ))
done
echo "== sample disk: $(du -h --apparent-size "$DISK" | cut -f1) virtual, $(du -h "$DISK" | cut -f1) allocated"

"$SV" init "$REPO"
"$SV" backup "$REPO" "$DISK" --disk demo-os
cp --sparse=always "$DISK" "$WORK/gen0.img"

# A week of changes: overwrite 8 MiB in the middle with other real data.
dd if=/usr/bin/"$(ls /usr/bin | head -n 1)" of="$DISK" bs=1M seek=64 conv=notrunc status=none 2>/dev/null || true
head -c 8M /dev/urandom | dd of="$DISK" bs=1M seek=100 conv=notrunc status=none
"$SV" backup "$REPO" "$DISK" --disk demo-os
"$SV" snapshots "$REPO"

FIRST=$("$SV" snapshots "$REPO" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshots"][0]["snapshot_id"])')
"$SV" restore "$REPO" "$FIRST" "$WORK/restored-gen0.img" --force
"$SV" restore "$REPO" latest "$WORK/restored-gen1.img" --disk demo-os --force
cmp "$WORK/gen0.img" "$WORK/restored-gen0.img"
cmp "$DISK" "$WORK/restored-gen1.img"

# Prove the latest snapshot restores (every chunk read back), and restore it as an
# Azure-ready fixed VHD that qemu-img reads as the same disk.
"$SV" verify "$REPO" latest --disk demo-os
"$SV" restore "$REPO" latest "$WORK/restored-gen1.vhd" --output-format vhd-fixed --force
if command -v qemu-img >/dev/null; then
  qemu-img compare -f raw -F vpc "$DISK" "$WORK/restored-gen1.vhd"
fi
echo "== both restores are byte-identical; repository: $(du -sh "$REPO" | cut -f1) for two 256 MiB snapshots"
