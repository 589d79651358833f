#!/usr/bin/env bash
# The main job, from a fresh machine: installs what is missing, builds rdzv, and runs a local
# elastic job on an auto-started etcd: 4 workers that check their torchrun environment and do
# a TCP all-reduce; rank 2 fails on the first attempt, rdzv restarts the group, and it succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p rdzv-cli --bins --examples
target="${CARGO_TARGET_DIR:-target}"
export WORKER_FAIL_RANK="${WORKER_FAIL_RANK:-2}" WORKER_FAIL_UNTIL_RESTART="${WORKER_FAIL_UNTIL_RESTART:-1}"
exec "$target/release/rdzv" run --standalone --nproc-per-node 4 --max-restarts 3 --tee 3 \
  -- "$target/release/examples/worker" "$@"
