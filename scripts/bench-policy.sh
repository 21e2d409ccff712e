#!/usr/bin/env bash
# NetworkPolicy benchmark, side by side:
#  1. full sync time for 1,000 policies x 5,000 pods (API objects, no pod namespaces): cluster state
#     -> compile -> render -> one nft transaction (full replace), in a throwaway netns (goal <= 1 s);
#  2. the time to apply one pod label change, same path, sent as an incremental update (set/map
#     elements and the pod's chain; goal <= 50 ms);
#  3. cross-node iperf3 throughput in a lab with 1,000 policies selecting the server vs none, in the
#     same run, alternated (none, 1000, none, 1000, ...) so that drift on this shared machine hits
#     both sides, with the agents' CPU seconds during each run and during an idle window before it
#     (goal: median with policies >= 90 % of median without).
# On a shared machine, run it under the benchmark lock: flock /work/bench.lock scripts/bench-policy.sh
# Usage: scripts/bench-policy.sh [--seconds N] [--rounds N]   (defaults 8 s per iperf3 run, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

SECONDS_PER_RUN=8
ROUNDS=3
IDLE_SECONDS=5
while [ $# -gt 0 ]; do
	case "$1" in
	--seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
	--rounds) ROUNDS="$2"; shift 2 ;;
	*) die "unknown argument $1" ;;
	esac
done

build_veilnet release

echo "==> 1+2: sync and label change (veilnet bench policy)"
SYNC_JSON=$("$VEILNET" bench policy --policies 1000 --pods 5000 --json)
"$VEILNET" bench policy --policies 1000 --pods 5000 | sed 's/^/    /'

LAB="veilbenchpol$$"
WORK=$(mktemp -d)
cleanup() {
	"$VEILNET" lab down --name "$LAB" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT

echo "==> 3: cross-node iperf3 in lab $LAB, $ROUNDS rounds of (none, 1000 policies)"
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

# Both agents' CPU (scripts/common.sh). With encryption on, the agents also carry the WireGuard
# datapath, so the idle window shows what the policy enforcer alone costs.
agent_cpu() { lab_agent_cpu "$LAB"; }

throughput() { # Mbit/s received, over SECONDS_PER_RUN
	"$VEILNET" lab exec --name "$LAB" default/iperf-client -- \
		iperf3 -c "$SERVER_IP" -t "$SECONDS_PER_RUN" -f m 2>&1 |
		awk '/receiver/ {print $(NF-2)}' | tail -1
}

# 1,000 policies that all select the server (its ingress chain holds every rule that has peers:
# the worst case for a new connection; established packets take the conntrack fast path). The
# last one lets the client in, so the measured connection is allowed by rule 1,000.
POLFILE="$WORK/policies.json"
{
	echo '{"apiVersion":"v1","kind":"List","items":['
	for i in $(seq 1 999); do
		echo "{\"apiVersion\":\"networking.k8s.io/v1\",\"kind\":\"NetworkPolicy\",\"metadata\":{\"name\":\"p$i\",\"namespace\":\"default\"},\"spec\":{\"podSelector\":{\"matchLabels\":{\"app\":\"iperf\"}},\"ingress\":[{\"from\":[{\"podSelector\":{\"matchLabels\":{\"app\":\"other-$i\"}}}],\"ports\":[{\"port\":$((1000 + i)),\"protocol\":\"TCP\"}]}]}},"
	done
	echo '{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p1000","namespace":"default"},"spec":{"podSelector":{"matchLabels":{"app":"iperf"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":5201,"protocol":"TCP"}]}]}}'
	echo ']}'
} >"$POLFILE"
STATUS="/var/lib/veilnet-lab/$LAB/nodes/node-1/run/policy-status.json"
wait_policies() { # count
	for _ in $(seq 1 240); do
		grep -q "\"policiesTotal\": $1," "$STATUS" 2>/dev/null && return
		sleep 0.5
	done
	die "node-1 did not sync $1 policies"
}

RESULTS="$WORK/results"
measure() { # label
	local a b c t
	a=$(agent_cpu)
	sleep "$IDLE_SECONDS"
	b=$(agent_cpu)
	t=$(throughput)
	c=$(agent_cpu)
	[ -n "$t" ] || die "iperf3 gave no result"
	echo "$1 $t $(cpu_s "$b" "$c") $(cpu_s "$a" "$b")" >>"$RESULTS"
	printf '    %-14s %9s Mbit/s   agents %5s CPU-s during the run, %5s CPU-s idle %ss before\n' \
		"$1" "$t" "$(cpu_s "$b" "$c")" "$(cpu_s "$a" "$b")" "$IDLE_SECONDS"
}
for round in $(seq 1 "$ROUNDS"); do
	measure none
	kc apply --validate=false -f "$POLFILE" >/dev/null
	wait_policies 1000
	if [ "$round" = 1 ]; then
		NS1="$LAB.n1"
		echo "    per-packet path on node-1 with 1,000 policies (forward hook, then one vmap lookup per direction):"
		ip netns exec "$NS1" nft list chain inet veilnet forward | grep -E 'ct state|vmap|@node' | sed 's/^\s*/      /'
		CHAIN_RULES=$(ip netns exec "$NS1" nft list table inet veilnet |
			awk '/chain ing_/ {c=1; n=0; next} c && /^\t}/ {print n; c=0} c && /counter name "pol_/ {n++}' | sort -n | tail -1)
		echo "      largest pod chain: ${CHAIN_RULES:-0} allow rule(s) (rules with no peers are not rendered)"
	fi
	measure 1000
	kc delete --wait=false -f "$POLFILE" >/dev/null
	wait_policies 0
done

FULL=$(echo "$SYNC_JSON" | sed -n 's/.*"fullSync":{[^}]*"totalMs":\([0-9.]*\).*/\1/p')
LABEL=$(echo "$SYNC_JSON" | sed -n 's/.*"labelChangeMedianMs":\([0-9.]*\).*/\1/p')
median() { median_of "$RESULTS" "$@"; }
NONE=$(median none 2)
WITH=$(median 1000 2)
RATIO=$(awk -v a="$WITH" -v b="$NONE" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print "n/a" }')
echo
printf '%-46s %16s %14s\n' "metric" "measured" "goal"
printf '%-46s %13.1f ms %14s\n' "full sync, 1,000 policies x 5,000 pods" "$FULL" "<= 1000 ms"
printf '%-46s %13.1f ms %14s\n' "one pod label change (median, incremental)" "$LABEL" "<= 50 ms"
range() { awk -v l="$1" '$1 == l {print $2}' "$RESULTS" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {print lo "-" hi}'; }
printf '%-46s %9s Mbit/s %14s   (runs %s)\n' "cross-node iperf3, no policies (median)" "$NONE" "" "$(range none)"
printf '%-46s %9s Mbit/s %14s   (runs %s)\n' "cross-node iperf3, 1,000 policies (median)" "$WITH" "" "$(range 1000)"
printf '%-46s %14s %% %14s\n' "throughput with policies / without" "$RATIO" ">= 90 %"
printf '%-46s %9s / %s s %14s\n' "agents' CPU during a run, none / 1,000" "$(median none 3 2)" "$(median 1000 3 2)" ""
printf '%-46s %9s / %s s %14s\n' "agents' CPU idle ${IDLE_SECONDS}s, none / 1,000" "$(median none 4 2)" "$(median 1000 4 2)" ""
