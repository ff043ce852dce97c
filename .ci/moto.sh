#!/usr/bin/env bash
# Installs moto's S3 server (moto_server) for the S3 backend tests, idempotently and quietly,
# into a project-local virtualenv: .ci/moto/bin/moto_server. Needs python3 with venv and pip
# (Debian: python3-venv); installs that with apt-get when run as root without it.
# 5.2.5, not older: with IAM enforced, 5.2.1 checked a listing's signature over the query string
# as werkzeug had decoded it (`prefix=a%2Fb` read as `prefix=a/b`), refusing every correctly
# signed ListObjectsV2 of a repository (moto issue 5948); 5.2.5 checks the query as sent, so the
# read-only principal test (tests/s3_readonly.rs) runs against enforced IAM policies.
set -euo pipefail
cd "$(dirname "$0")"
version=5.2.5
venv=moto
bin=$venv/bin/moto_server
if [ -x "$bin" ] && [ "$("$venv/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" = "$version" ]; then
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing python3-venv" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "missing python3 venv support: install it (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$version"
test -x "$bin"
