#!/usr/bin/env bash
# Egress benchmark, side by side in one lab (2 nodes, --encryption off, --external-host):
# iperf3 TCP from a pod on node-1 to the external host (masqueraded to node-1's underlay address)
# against the same pod to a pod on node-2 (plaintext VXLAN, no NAT), alternated round by round so
# that drift on a shared machine hits both sides. Both paths are the kernel's (VXLAN, nftables
# NAT), so a debug build measures the same thing as a release one.
# On a shared machine, run it under the benchmark lock: flock /work/bench.lock scripts/bench-egress.sh
# Usage: scripts/bench-egress.sh [--seconds N] [--rounds N] [--debug]   (defaults 5 s, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root

SECONDS_PER_RUN=5
ROUNDS=3
PROFILE=release
while [ $# -gt 0 ]; do
	case "$1" in
	--seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
	--rounds) ROUNDS="$2"; shift 2 ;;
	--debug) PROFILE=debug; shift ;;
	*) die "unknown argument $1" ;;
	esac
done

build_veilnet "$PROFILE"

LAB="veilbenchegr$$"
cleanup() { "$VEILNET" lab down --name "$LAB" >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$VEILNET" lab up --name "$LAB" --nodes 2 --encryption off --external-host >/dev/null 2>&1
kc() { "$VEILNET" lab kubectl --name "$LAB" -- "$@"; }
pod() { # name node command...
	local name=$1 node=$2
	shift 2
	local cmd
	cmd=$(printf '"%s",' "$@")
	echo "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$name\",\"namespace\":\"default\"},\"spec\":{\"nodeName\":\"$node\",\"containers\":[{\"name\":\"c\",\"image\":\"iperf3\",\"command\":[${cmd%,}]}]}}" | kc apply -f - >/dev/null
}
pod iperf-server node-2 iperf3 -s
pod iperf-client node-1 sleep 100000
ip_of() {
	for _ in $(seq 1 120); do
		ip=$(kc get pod "$1" -o jsonpath='{.status.podIP}' 2>/dev/null || true)
		[ -n "$ip" ] && { echo "$ip"; return; }
		sleep 0.5
	done
	die "pod $1 got no IP"
}
SERVER_IP=$(ip_of iperf-server)
ip_of iperf-client >/dev/null
EXT_IP=$("$VEILNET" lab status --name "$LAB" --json | sed -n 's/.*"ip": "\(172[^"]*\)".*/\1/p' | head -1)
ip netns exec "$LAB.ext" iperf3 -s -D
sleep 1

throughput() { # Mbit/s received
	"$VEILNET" lab exec --name "$LAB" default/iperf-client -- \
		iperf3 -c "$1" -t "$SECONDS_PER_RUN" -f m 2>&1 |
		awk '/receiver/ {print $(NF-2)}' | tail -1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
POD=() EXT=()
for r in $(seq 1 "$ROUNDS"); do
	p=$(throughput "$SERVER_IP"); e=$(throughput "$EXT_IP")
	[ -n "$p" ] && [ -n "$e" ] || die "iperf3 gave no result"
	echo "round $r: pod -> pod (plaintext) $p Mbit/s, pod -> external (masquerade) $e Mbit/s"
	POD+=("$p") EXT+=("$e")
done
P=$(printf '%s\n' "${POD[@]}" | median)
E=$(printf '%s\n' "${EXT[@]}" | median)
MASQ=$(ip netns exec "$LAB.n1" nft list counter inet veilnet_wire masqueraded | awk '/packets/ {print $2}')
printf '%-44s %9s Mbit/s\n' "pod -> pod, plaintext VXLAN (median)" "$P"
printf '%-44s %9s Mbit/s\n' "pod -> external host, masqueraded (median)" "$E"
awk -v e="$E" -v p="$P" 'BEGIN { printf "ratio masquerade / pod-to-pod: %.2f\n", e / p }'
echo "masqueraded connections counted on node-1: $MASQ"
