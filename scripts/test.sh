#!/usr/bin/env bash
# Runs every veilnet test: unit tests and the netns integration tests (needs root).
# Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

echo "==> cargo build (debug, all targets)"
cargo build --workspace --all-targets --locked
echo "==> cargo test"
cargo test --workspace --locked "$@"
