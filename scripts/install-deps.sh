#!/usr/bin/env bash
# Installs every Debian package that building, running and testing rdzv needs, if missing.
# Each package is checked with `dpkg -s` (a command on PATH is not proof: protoc without
# libprotobuf-dev's .proto files cannot build etcd-client). Idempotent; quick when all is there.
#
#   protobuf-compiler  protoc, for etcd-client's build
#   libprotobuf-dev    the well-known .proto files protoc needs (only a Recommends of the above)
#   etcd-server        etcd for the tests and `rdzv run --standalone` (skipped if RDZV_ETCD_BINARY)
#   openssl            certificates for the TLS tests
#   iproute2           `ip netns` for the chaos tests' network partitions
#   procps             `ps`, for the secrets-in-process-list checks
#
# With --python it also prepares the Python tests: a virtual environment in .venv (made with the
# machine's python3, 3.9 or later, which must have the venv module) with the packages of
# python/requirements-test.txt (maturin, pytest, torch from PyPI), and the rdzv wheel built by
# maturin (dev profile, in $CARGO_TARGET_DIR/python-wheel) and installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."
with_python=false
[ "${1:-}" = "--python" ] && with_python=true
packages=(protobuf-compiler libprotobuf-dev openssl iproute2 procps)
[ -n "${RDZV_ETCD_BINARY:-}" ] || packages+=(etcd-server)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system etcd on 2379 where it can; rdzv never needs it.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
fi
for p in "${missing[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || { echo "install-deps: $p did not install" >&2; exit 1; }
done
fi

if $with_python; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # Quick when everything is there already.
  .venv/bin/python -m pip install -q --disable-pip-version-check -r python/requirements-test.txt
  wheels="${CARGO_TARGET_DIR:-target}/python-wheel"
  rm -rf "$wheels"
  .venv/bin/maturin build --profile dev --locked -q -i .venv/bin/python -o "$wheels"
  .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheels"/rdzv-*.whl
fi
