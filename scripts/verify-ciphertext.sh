#!/usr/bin/env bash
# Proves what crosses a lab's wire: captures on the underlay bridge with tcpdump while one pod sends
# a payload carrying a unique plaintext marker to a pod on another node (TCP and UDP), then checks
# the capture against what is expected. Either end may instead be a node's host network, spelled
# node:NODE (e.g. node:node-1): the probe then runs in that node's namespace, or a temporary server
# listens there (TCP 18080, UDP 18081) and the target is the node's InternalIP.
#   encrypted  the marker never appears; no VXLAN and no raw pod packets; WireGuard data messages
#              (UDP, message type 4) carry the traffic; both probes are answered
#   plaintext  the marker appears inside VXLAN frames (UDP 8472); both probes are answered
#   blocked    nothing crosses in plaintext (no marker, no VXLAN, no raw pod packet) and both probes
#              fail
# Usage: scripts/verify-ciphertext.sh [--lab NAME] FROM TO encrypted|plaintext|blocked
#        (FROM, TO: NS/POD or node:NODE)
# Environment: VEILNET (the veilnet binary; default ./target/release/veilnet, else ./target/debug).
# Ports probed on the target: TCP 80 and UDP 81 (the agnhost servers of the demo and the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
	cat >&2 <<-'USAGE'
		usage: scripts/verify-ciphertext.sh [--lab NAME] FROM TO encrypted|plaintext|blocked
		  FROM, TO   NS/POD, or node:NODE for a node's host network
		  encrypted  the marker never crosses; WireGuard carries both probes, which are answered
		  plaintext  the marker appears inside VXLAN frames (UDP 8472); both probes are answered
		  blocked    nothing crosses in plaintext and both probes fail
		  --lab NAME the lab (default veilnet)
		Environment: VEILNET (the veilnet binary; default ./target/release/veilnet, else ./target/debug)
	USAGE
	exit 2
}
LAB=veilnet
if [ "${1:-}" = --lab ]; then
	[ $# -ge 2 ] || usage
	LAB=$2
	shift 2
fi
case "${1:-}" in -h | --help) usage ;; esac
[ $# -eq 3 ] || usage
FROM=$1 TO=$2 EXPECT=$3
case "$EXPECT" in encrypted | plaintext | blocked) ;; *) echo "unknown expectation: $EXPECT" >&2; exit 2 ;; esac

if [ -z "${VEILNET:-}" ]; then
	VEILNET=./target/release/veilnet
	[ -x "$VEILNET" ] || VEILNET=./target/debug/veilnet
fi
command -v tcpdump >/dev/null || { echo "tcpdump is not installed (apt install tcpdump)" >&2; exit 2; }

kc() { "$VEILNET" lab kubectl --name "$LAB" -- "$@"; }
# node:node-N → the node's namespace in the lab (LAB.nN).
node_netns() { echo "$LAB.n${1#node-}"; }
TCP_PORT=80 UDP_PORT=81
case "$TO" in
node:*)
	TO_NODE=${TO#node:}
	TO_IP=$(kc get node "$TO_NODE" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
	[ -n "$TO_IP" ] || { echo "node $TO_NODE has no InternalIP" >&2; exit 2; }
	TCP_PORT=18080 UDP_PORT=18081
	ip netns exec "$(node_netns "$TO_NODE")" "$VEILNET" lab agnhost serve --tcp $TCP_PORT --udp $UDP_PORT \
		--name "$TO_NODE" >/dev/null 2>&1 &
	SERVER_PID=$!
	;;
*)
	TO_NS=${TO%%/*} TO_POD=${TO#*/}
	TO_IP=$(kc get pod -n "$TO_NS" "$TO_POD" -o jsonpath='{.status.podIP}')
	[ -n "$TO_IP" ] || { echo "pod $TO has no IP" >&2; exit 2; }
	;;
esac
# lab.json is written by veilnet (pretty JSON, one key per line): no JSON tool needed.
CLUSTER_CIDR=$(sed -n 's/^ *"cluster_cidr": *"\([^"]*\)".*/\1/p' "/var/lib/veilnet-lab/$LAB/lab.json")
[ -n "$CLUSTER_CIDR" ] || { echo "lab $LAB is not up (no cluster CIDR in its lab.json)" >&2; exit 2; }
UNDERLAY_NS="$LAB.ul"
WG_PORT=51820 VXLAN_PORT=8472

MARKER="VEILNET-MARKER-$(date +%s%N)-$$"
PCAP=$(mktemp /tmp/veilnet-capture.XXXXXX.pcap)
TCPDUMP_LOG=$(mktemp /tmp/veilnet-capture.XXXXXX.log)
cleanup() {
	[ -n "${TCPDUMP_PID:-}" ] && kill "$TCPDUMP_PID" 2>/dev/null || true
	[ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
	rm -f "$PCAP" "$TCPDUMP_LOG"
}
trap cleanup EXIT

# --immediate-mode: without it libpcap hands packets over a block at a time (TPACKET_V3, a block
# retires after 1 s), and the packets of a block still open when tcpdump is stopped are lost: a
# short capture would look empty. tcpdump says "listening on" once its capture is open; a fixed
# sleep races it on a busy machine.
ip netns exec "$UNDERLAY_NS" tcpdump --immediate-mode -i br0 -nn -U -s 0 -w "$PCAP" udp or "net $CLUSTER_CIDR" 2>"$TCPDUMP_LOG" &
TCPDUMP_PID=$!
for _ in $(seq 200); do
	grep -q 'listening on' "$TCPDUMP_LOG" && break
	kill -0 "$TCPDUMP_PID" 2>/dev/null || { echo "tcpdump failed: $(cat "$TCPDUMP_LOG")" >&2; exit 2; }
	sleep 0.05
done
grep -q 'listening on' "$TCPDUMP_LOG" || { echo "tcpdump did not start capturing within 10 s" >&2; exit 2; }

probe() { # proto port → exit code of agnhost connect
	local rc=0
	case "$FROM" in
	node:*)
		ip netns exec "$(node_netns "${FROM#node:}")" "$VEILNET" lab agnhost connect "$TO_IP:$2" \
			--protocol "$1" --timeout 2s --message "$MARKER $MARKER" >/dev/null 2>&1 || rc=$?
		;;
	*)
		"$VEILNET" lab exec --name "$LAB" "$FROM" -- veilnet lab agnhost connect "$TO_IP:$2" \
			--protocol "$1" --timeout 2s --message "$MARKER $MARKER" >/dev/null 2>&1 || rc=$?
		;;
	esac
	echo "$rc"
}
TCP_RC=$(probe tcp $TCP_PORT)
UDP_RC=$(probe udp $UDP_PORT)
sleep 0.5
kill "$TCPDUMP_PID" 2>/dev/null || true
wait "$TCPDUMP_PID" 2>/dev/null || true
TCPDUMP_PID=

count() { tcpdump -nn -r "$PCAP" "$@" 2>/dev/null | grep -c . || true; }
ALL=$(count)
WG=$(count "udp port $WG_PORT")
WG_DATA=$(count "udp port $WG_PORT and udp[8] = 4")
VXLAN=$(count "udp port $VXLAN_PORT")
# Pod addresses in the *outer* header: unencapsulated pod traffic on the wire.
RAW=$(count "net $CLUSTER_CIDR")
MARKERS=$(grep -a -o "$MARKER" "$PCAP" | grep -c . || true)
VXLAN_MARKERS=$(tcpdump -nn -A -r "$PCAP" "udp port $VXLAN_PORT" 2>/dev/null | grep -a -o "$MARKER" | grep -c . || true)

printf 'capture on %s br0, %s -> %s (%s), expecting %s\n' "$UNDERLAY_NS" "$FROM" "$TO" "$TO_IP" "$EXPECT"
printf '  probes: tcp/%s exit %s, udp/%s exit %s (0 = answered)\n' "$TCP_PORT" "$TCP_RC" "$UDP_PORT" "$UDP_RC"
printf '  packets: %s total, %s WireGuard (%s data messages), %s VXLAN, %s raw pod packets\n' \
	"$ALL" "$WG" "$WG_DATA" "$VXLAN" "$RAW"
printf '  plaintext marker seen: %s times (%s inside VXLAN)\n' "$MARKERS" "$VXLAN_MARKERS"

fail() { echo "FAIL: $*"; exit 1; }
case "$EXPECT" in
encrypted)
	[ "$TCP_RC" = 0 ] && [ "$UDP_RC" = 0 ] || fail "the probes were not answered"
	[ "$MARKERS" = 0 ] || fail "the plaintext marker crossed the wire"
	[ "$VXLAN" = 0 ] || fail "VXLAN frames crossed the wire"
	[ "$RAW" = 0 ] || fail "unencapsulated pod packets crossed the wire"
	[ "$WG_DATA" -gt 0 ] || fail "no WireGuard data messages carried the traffic"
	[ "$WG" = "$ALL" ] || fail "$((ALL - WG)) packets on the wire were not WireGuard"
	;;
plaintext)
	[ "$TCP_RC" = 0 ] && [ "$UDP_RC" = 0 ] || fail "the probes were not answered"
	[ "$VXLAN_MARKERS" -gt 0 ] || fail "the marker was not seen inside VXLAN frames"
	;;
blocked)
	[ "$TCP_RC" != 0 ] && [ "$UDP_RC" != 0 ] || fail "a probe was answered on a blocked path"
	[ "$MARKERS" = 0 ] || fail "the plaintext marker crossed the wire"
	[ "$VXLAN" = 0 ] || fail "VXLAN frames crossed the wire"
	[ "$RAW" = 0 ] || fail "unencapsulated pod packets crossed the wire"
	;;
esac
echo "OK: $EXPECT"
