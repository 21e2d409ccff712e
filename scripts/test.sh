#!/usr/bin/env bash
# Runs every veilnet test: unit tests and the netns integration tests (needs root).
# Usage: ./scripts/test.sh [extra cargo test args]
# Builds the real Kubernetes control plane first (scripts/build-kubernetes.sh: ~11 min the first
# time on 2 cores, seconds after), so tests/lab_kubernetes.rs runs on it; needs Go.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

echo "==> the real Kubernetes control plane (scripts/build-kubernetes.sh)"
./scripts/build-kubernetes.sh
echo "==> cargo build (debug, all targets)"
cargo build --workspace --all-targets --locked
echo "==> cargo test"
cargo test --workspace --locked "$@"
