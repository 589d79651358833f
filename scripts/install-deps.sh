#!/usr/bin/env bash
# Installs what building and testing rdzv needs on a Debian/Ubuntu machine, if missing:
# protoc (etcd-client's build), etcd (tests and standalone runs) and openssl (TLS tests).
set -euo pipefail
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# The TLS tests make their certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
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
