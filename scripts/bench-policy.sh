#!/usr/bin/env bash
# NetworkPolicy benchmark, side by side:
#  1. full sync time for 1,000 policies x 5,000 pods (API objects, no pod namespaces): cluster state
#     -> compile -> render -> one nft transaction, in a throwaway netns (goal <= 1 s);
#  2. the time to apply one pod label change, same path (goal <= 50 ms);
#  3. cross-node iperf3 throughput in a lab with 1,000 policies selecting the server vs none, in the
#     same run (goal >= 90 % of none).
# Usage: scripts/bench-policy.sh [--seconds N]   (iperf3 duration per run, default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

SECONDS_PER_RUN=8
[ "${1:-}" = "--seconds" ] && SECONDS_PER_RUN="$2"

cargo build --release --locked --workspace -q
VEILNET="$PWD/target/release/veilnet"
export PATH="$PWD/target/release:$PATH"

echo "==> 1+2: sync and label change (veilnet bench policy)"
SYNC_JSON=$("$VEILNET" bench policy --policies 1000 --pods 5000 --json)
"$VEILNET" bench policy --policies 1000 --pods 5000 | sed 's/^/    /'

LAB="veilbenchpol$$"
cleanup() { "$VEILNET" lab down --name "$LAB" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "==> 3: cross-node iperf3 in lab $LAB"
"$VEILNET" lab up --name "$LAB" --nodes 2 >/dev/null 2>&1
kc() { "$VEILNET" lab kubectl --name "$LAB" -- "$@"; }
pod() { # name node label command...
	local name=$1 node=$2 label=$3
	shift 3
	local cmd
	cmd=$(printf '"%s",' "$@")
	echo "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$name\",\"namespace\":\"default\",\"labels\":{\"app\":\"$label\"}},\"spec\":{\"nodeName\":\"$node\",\"containers\":[{\"name\":\"c\",\"image\":\"iperf3\",\"command\":[${cmd%,}]}]}}" | kc apply -f - >/dev/null
}
pod iperf-server node-1 iperf iperf3 -s
pod iperf-client node-2 client sleep 100000
wait_ip() {
	for _ in $(seq 1 120); do
		ip=$(kc get pod "$1" -o jsonpath='{.status.podIP}' 2>/dev/null || true)
		[ -n "$ip" ] && { echo "$ip"; return; }
		sleep 0.5
	done
	die "pod $1 has no IP"
}
SERVER_IP=$(wait_ip iperf-server)
wait_ip iperf-client >/dev/null
sleep 1

throughput() { # Mbit/s received, over SECONDS_PER_RUN
	"$VEILNET" lab exec --name "$LAB" default/iperf-client -- \
		iperf3 -c "$SERVER_IP" -t "$SECONDS_PER_RUN" -f m 2>&1 |
		awk '/receiver/ {print $(NF-2)}' | tail -1
}

NONE=$(throughput)
echo "    no policies:     $NONE Mbit/s"

# 1,000 policies that all select the server (its ingress chain holds every rule: the worst case for
# a new connection; established packets take the conntrack fast path). The last one lets the
# client in, so the measured connection is allowed by rule 1,000.
POLFILE=$(mktemp)
{
	echo '{"apiVersion":"v1","kind":"List","items":['
	for i in $(seq 1 999); do
		echo "{\"apiVersion\":\"networking.k8s.io/v1\",\"kind\":\"NetworkPolicy\",\"metadata\":{\"name\":\"p$i\",\"namespace\":\"default\"},\"spec\":{\"podSelector\":{\"matchLabels\":{\"app\":\"iperf\"}},\"ingress\":[{\"from\":[{\"podSelector\":{\"matchLabels\":{\"app\":\"other-$i\"}}}],\"ports\":[{\"port\":$((1000 + i)),\"protocol\":\"TCP\"}]}]}},"
	done
	echo '{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p1000","namespace":"default"},"spec":{"podSelector":{"matchLabels":{"app":"iperf"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":5201,"protocol":"TCP"}]}]}}'
	echo ']}'
} >"$POLFILE"
kc apply --validate=false -f "$POLFILE" >/dev/null
rm -f "$POLFILE"
STATUS="/var/lib/veilnet-lab/$LAB/nodes/node-1/run/policy-status.json"
for _ in $(seq 1 120); do
	grep -q '"policiesTotal": 1000' "$STATUS" 2>/dev/null && break
	sleep 0.5
done
grep -q '"policiesTotal": 1000' "$STATUS" || die "node-1 did not sync 1,000 policies"
WITH=$(throughput)
echo "    1,000 policies:  $WITH Mbit/s"

FULL=$(echo "$SYNC_JSON" | sed -n 's/.*"fullSync":{[^}]*"totalMs":\([0-9.]*\).*/\1/p')
LABEL=$(echo "$SYNC_JSON" | sed -n 's/.*"labelChangeMedianMs":\([0-9.]*\).*/\1/p')
RATIO=$(awk -v a="$WITH" -v b="$NONE" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print "n/a" }')
echo
printf '%-42s %14s %14s\n' "metric" "measured" "goal"
printf '%-42s %11.1f ms %14s\n' "full sync, 1,000 policies x 5,000 pods" "$FULL" "<= 1000 ms"
printf '%-42s %11.1f ms %14s\n' "one pod label change (median)" "$LABEL" "<= 50 ms"
printf '%-42s %9s Mbit/s %14s\n' "cross-node iperf3, no policies" "$NONE" ""
printf '%-42s %9s Mbit/s %14s\n' "cross-node iperf3, 1,000 policies" "$WITH" ""
printf '%-42s %12s %% %14s\n' "throughput with policies / without" "$RATIO" ">= 90 %"
