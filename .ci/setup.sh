#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, idempotently: qemu-img and libvhdi's
# vhdiinfo (VHD peers), setpriv (read-only repository tests run as another user), losetup
# (device restore tests) and the tools ../shared/datasets/make-disks.sh uses. Safe to run
# again; does nothing when all is there.
set -euo pipefail
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)   # nbdinfo, nbdcopy: NBD clients for the serve tests
command -v vhdiinfo >/dev/null || need+=(libvhdi-utils)
command -v setpriv >/dev/null || need+=(util-linux)
command -v losetup >/dev/null || need+=(mount)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
