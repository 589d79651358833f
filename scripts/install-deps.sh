#!/usr/bin/env bash
# Installs what building and testing rdzv needs on a Debian/Ubuntu machine, if missing:
# protoc (etcd-client's build) and etcd (tests and standalone runs).
set -euo pipefail
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ -z "${RDZV_ETCD_BINARY:-}" ] && ! command -v etcd >/dev/null 2>&1; then
  missing+=(etcd-server)
fi
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
fi
