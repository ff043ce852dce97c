#!/usr/bin/env bash
# Installs Azurite (the Azure Storage emulator) for the page blob tests, idempotently and
# quietly, into .ci/azurite/node_modules/.bin/azurite-blob. Needs node and npm (Debian: nodejs
# npm); installs them with apt-get when run as root without them.
set -euo pipefail
cd "$(dirname "$0")"
version=3.35.0
bin=azurite/node_modules/.bin/azurite-blob
pkg=azurite/node_modules/azurite/package.json
if [ -x "$bin" ] && grep -q "\"version\": \"$version\"" "$pkg" 2>/dev/null; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing nodejs npm" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "missing npm: install it (Debian: apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
mkdir -p azurite
npm install --prefix azurite --no-audit --no-fund --silent "azurite@$version" >/dev/null
test -x "$bin"
