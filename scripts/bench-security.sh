#!/usr/bin/env bash
# What the network security features cost (issue 15): two 2-node labs side by side, one with
# `dnsMode: off` and alerts disabled ("off"), one with `dnsMode: enforce`, a trusted DNS server
# and alerts on ("on"). Runs alternate between them (off, on, off, on, ...) so that drift on this
# shared machine hits both. Each run measures, in that lab:
#  - cross-node iperf3 throughput (pod on node-2 to pod on node-1);
#  - the machine's busy CPU seconds during the iperf3 run (the kernel's work is in no process);
#  - both agents' CPU seconds during the iperf3 run, and during an idle window before it;
#  - a DNS burst: 300 queries from a pod to the trusted server (host network on node-1), wall
#    time and the agents' CPU seconds during it.
# Both labs log flows (the default) and encrypt (the default), so the difference is the DNS chain,
# its counters and sample logging, and the alert detector.
# On a shared machine, run it under the benchmark lock: flock /work/bench.lock scripts/bench-security.sh
# Usage: scripts/bench-security.sh [--seconds N] [--rounds N] [--debug]
#   (defaults 8 s per iperf3 run, 3 rounds, release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

SECONDS_PER_RUN=8
ROUNDS=3
IDLE_SECONDS=5
QUERIES=1000
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

TRUSTED=172.30.0.11
OFF="veilsecoff$$"
ON="veilsecon$$"
WORK=$(mktemp -d)
cleanup() {
	"$VEILNET" lab down --name "$OFF" >/dev/null 2>&1 || true
	"$VEILNET" lab down --name "$ON" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT

echo '{"alerts": {"enabled": false}}' >"$WORK/alerts-off.json"
echo "==> two labs: $OFF (dnsMode off, alerts off) and $ON (dnsMode enforce, trusted $TRUSTED, alerts on)"
"$VEILNET" lab up --name "$OFF" --nodes 2 --dns-mode off --agent-config "$WORK/alerts-off.json" >/dev/null 2>&1 ||
	die "lab up $OFF failed"
"$VEILNET" lab up --name "$ON" --nodes 2 --dns-mode enforce --trusted-dns "$TRUSTED" >/dev/null 2>&1 ||
	die "lab up $ON failed"

kc() { local lab=$1; shift; "$VEILNET" lab kubectl --name "$lab" -- "$@"; }
pod() { # lab name node hostNetwork command...
	local lab=$1 name=$2 node=$3 host=$4
	shift 4
	local cmd
	cmd=$(printf '"%s",' "$@")
	echo "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$name\",\"namespace\":\"default\"},\"spec\":{\"nodeName\":\"$node\",\"hostNetwork\":$host,\"containers\":[{\"name\":\"c\",\"image\":\"lab\",\"command\":[${cmd%,}]}]}}" |
		kc "$lab" apply -f - >/dev/null
}
wait_ip() { # lab pod
	for _ in $(seq 1 120); do
		ip=$(kc "$1" get pod "$2" -o jsonpath='{.status.podIP}' 2>/dev/null || true)
		[ -n "$ip" ] && { echo "$ip"; return; }
		sleep 0.5
	done
	die "pod $2 in $1 has no IP"
}
declare -A SERVER_IP
for lab in "$OFF" "$ON"; do
	pod "$lab" iperf-server node-1 false iperf3 -s
	pod "$lab" client node-2 false sleep 100000
	pod "$lab" node-dns node-1 true veilnet lab agnhost dns-serve --listen "$TRUSTED"
	SERVER_IP[$lab]=$(wait_ip "$lab" iperf-server)
	wait_ip "$lab" client >/dev/null
	wait_ip "$lab" node-dns >/dev/null
done
sleep 2

# The whole machine's busy CPU ticks (user, nice, system, irq, softirq): the kernel's share of the
# datapath (nftables, conntrack, the DNS chain) runs in softirq, in no process. Only one lab is
# measured at a time, so the difference between labs is theirs.
machine_cpu() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
throughput() { # lab: Mbit/s received
	"$VEILNET" lab exec --name "$1" default/client -- \
		timeout $((SECONDS_PER_RUN + 30)) iperf3 -c "${SERVER_IP[$1]}" -t "$SECONDS_PER_RUN" -f m --connect-timeout 5000 2>&1 |
		awk '/receiver/ {print $(NF-2)}' | tail -1
}
dns_burst() { # lab: milliseconds for QUERIES queries, all answered
	local start end answered
	start=$(date +%s%N)
	answered=$("$VEILNET" lab exec --name "$1" default/client -- \
		veilnet lab agnhost dns-query "bench.example" --server "$TRUSTED" --count "$QUERIES" --timeout 1s 2>/dev/null |
		grep -c 'rcode=' || true)
	end=$(date +%s%N)
	[ "$answered" = "$QUERIES" ] || die "$1: $answered of $QUERIES DNS queries answered"
	echo $(((end - start) / 1000000))
}

RESULTS="$WORK/results"
measure() { # label lab
	local a b c d e t ms m0 m1
	a=$(lab_agent_cpu "$2")
	sleep "$IDLE_SECONDS"
	b=$(lab_agent_cpu "$2")
	m0=$(machine_cpu)
	t=$(throughput "$2")
	m1=$(machine_cpu)
	c=$(lab_agent_cpu "$2")
	[ -n "$t" ] || die "$2: iperf3 gave no result"
	d=$(lab_agent_cpu "$2")
	ms=$(dns_burst "$2")
	e=$(lab_agent_cpu "$2")
	echo "$1 $t $(cpu_s "$b" "$c") $(cpu_s "$a" "$b") $ms $(cpu_s "$d" "$e") $(cpu_s "$m0" "$m1")" >>"$RESULTS"
	printf '    %-4s %9s Mbit/s (machine %5s CPU-s)   agents %5s CPU-s during iperf3, %5s idle %ss; %d DNS queries %6s ms, agents %5s CPU-s\n' \
		"$1" "$t" "$(cpu_s "$m0" "$m1")" "$(cpu_s "$b" "$c")" "$(cpu_s "$a" "$b")" "$IDLE_SECONDS" "$QUERIES" "$ms" "$(cpu_s "$d" "$e")"
}
echo "==> $ROUNDS rounds of (off, on), ${SECONDS_PER_RUN}s iperf3 each"
for _ in $(seq 1 "$ROUNDS"); do
	measure off "$OFF"
	measure on "$ON"
done
# What the "on" lab saw: its DNS counters and alerts (a sanity check that the features ran).
ON_ST="/var/lib/veilnet-lab/$ON/nodes/node-2/run/policy-status.json"
echo "    $ON node-2 policy status: $(tr -d '\n ' <"$ON_ST" | grep -o '"dns":\[[^]]*\]' | head -1)"

median() { median_of "$RESULTS" "$@"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f %%", 100 * a / b; else print "n/a" }'; }
echo
printf '%-44s %12s %12s %10s\n' "median of $ROUNDS" "off" "on" "on/off"
for row in "iperf3 Mbit/s:2:1" "machine CPU-s during iperf3:7:2" "agents' CPU-s during iperf3:3:2" "agents' CPU-s idle ${IDLE_SECONDS}s:4:2" "$QUERIES DNS queries, ms:5:0" "agents' CPU-s during the DNS burst:6:2"; do
	IFS=: read -r name col dec <<<"$row"
	o=$(median off "$col" "$dec")
	n=$(median on "$col" "$dec")
	printf '%-44s %12s %12s %10s\n' "$name" "$o" "$n" "$(ratio "$n" "$o")"
done
