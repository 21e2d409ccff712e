#!/usr/bin/env bash
# The cost of a big cluster to one node (issue 16): a two-node lab on the API stand-in, joined by
# synthetic Nodes (Node objects with veilnet's annotations, a fresh WireGuard key, a pod CIDR and
# a kubelet-sized status, but no processes) until the cluster has --nodes Nodes. Prints, for
# node-1's agent and datapath: memory before and after, time to the complete dataplane and the
# longest stall of a flow that was already up, handshakes started (lazy: none to idle peers), one
# Node change end to end (new, key rotation, removed), a full pass at rest, the Node watch traffic
# at rest and an agent restart. See tests/lab/src/bench/scale.rs.
# Usage: scripts/bench-scale.sh [--nodes N] [--rest DURATION]   (defaults 1000, 65s)
# On a shared machine, run it under the benchmark lock: flock /work/bench.lock scripts/bench-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust
cargo build --release --locked --workspace -q
./target/release/veilnet bench scale "$@"
