#!/usr/bin/env bash
# End-to-end benchmark of stackvault against restic and borg on the same VM disk images.
# Installs restic and borg (Debian packages) if missing; see benches/compare.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
command -v zstd >/dev/null || missing+=(zstd)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec python3 benches/compare.py "$@"
