#!/usr/bin/env bash
# Soak test: pods created and deleted continuously across 3 lab nodes (50 parallel ADDs and DELs
# at the peaks), a NetworkPolicy and pod labels changing, node-3's encryption toggled and the
# nodes' keys rotated in turn, for M minutes; then 0 leaked IPs, veths, pod netns, nft elements,
# routes or FDB entries, 0 duplicate IPs, no daemon restarted, agent and datapath RSS flat, and no
# panic or ERROR in veilnet's logs. The test is tests/lab_soak.rs; ./scripts/test.sh runs it for
# 5 minutes.
# Usage: ./scripts/soak.sh [--minutes M] [--control-plane kubernetes|stand-in]   (default: 60, kubernetes)
# Needs root. Prints one line per round, then the figures (batch times, RSS at start and end).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

minutes=60 plane=kubernetes
while [ $# -gt 0 ]; do
	case "$1" in
	--minutes) minutes=${2:?--minutes needs a value}; shift 2 ;;
	--control-plane) plane=${2:?--control-plane needs a value}; shift 2 ;;
	-h | --help) sed -n '2,9p' "$0"; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done
[[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--minutes wants a number, got $minutes"
case "$plane" in kubernetes | stand-in) ;; *) die "--control-plane is kubernetes or stand-in, not $plane" ;; esac

need_root
ensure_packages
ensure_rust
[ "$plane" = kubernetes ] && ./scripts/build-kubernetes.sh
echo "==> soak: $minutes min on the $plane control plane (tests/lab_soak.rs)"
VEILNET_SOAK_MINUTES=$minutes VEILNET_SOAK_CONTROL_PLANE=$plane \
	cargo test --locked --test lab_soak -- --nocapture
