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
set -euo pipefail
packages=(protobuf-compiler libprotobuf-dev openssl iproute2 procps)
[ -n "${RDZV_ETCD_BINARY:-}" ] || packages+=(etcd-server)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

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
