#!/usr/bin/env bash
# CNI ADD latency benchmark: veilnet-cni vs Debian's bridge + host-local, same run, side by side.
# p50/p99 over 50 sequential and 50 parallel ADDs (and the DELs). Runs in throwaway namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust
cargo build --release --locked --workspace -q
./target/release/veilnet bench cni "$@"
