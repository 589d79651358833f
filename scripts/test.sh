#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, then checks formatting,
# lints and runs every test (each test starts its own etcd), then the Python tests (pytest, with
# torch on the CPU) against the wheel that install-deps.sh built.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --python
# A one-off build keeps no incremental state: it would only use disk.
[ "${CI:-}" = "true" ] && export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [ "${CI:-}" = "true" ] && profile=ci
  cargo nextest run --workspace --locked --profile "$profile"
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked -- --test-threads=2
fi
.venv/bin/python -m pytest -q python/tests
