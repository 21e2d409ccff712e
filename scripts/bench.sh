#!/usr/bin/env bash
# Encrypted datapath benchmark (issues 6 and 16): plaintext VXLAN vs veilnet's userspace WireGuard
# vs wireguard-go (the newest, with its TUN TSO/GRO and UDP GSO/GRO offloads) vs stock
# boringtun-cli 0.7.1, side by side in one run, on the same underlay.
#
#   veil-bench-<pid>-ul   the underlay: a bridge br0, one veth port per node (MTU 1500)
#   veil-bench-<pid>-a/b  two "nodes": eth0 192.168.90.1/.2, and per path one overlay device:
#       vx0      kernel VXLAN (VNI 42)          10.90.0.1/.2   MTU 1450
#       veilwg0  veilnet WgDevice (bench wg-node) 10.91.0.1/.2 MTU 1440
#       veilbt?  boringtun-cli 0.7.1 + wg(8)    10.92.0.1/.2   MTU 1440
#       veilgo?  wireguard-go (pinned below) + wg(8) 10.94.0.1/.2 MTU 1440
#       veilrl0  bench tun-relay: no crypto     10.93.0.1/.2   MTU 1440 (ping RTT only: the floor
#                of any userspace datapath on this machine)
#
# Per path: ping RTT (idle, 50 probes), iperf3 TCP single stream and 4 streams (-t $SECONDS each),
# the datapath processes' CPU (utime+stime from /proc/<pid>/stat) and the whole machine's busy CPU
# (/proc/stat) per GB moved. Prints Gbit/s and the ratios encrypted/VXLAN, veilnet/wireguard-go,
# veilnet/boringtun.
#
# Usage: scripts/bench.sh [--runs N] [--seconds S] [--skip-boringtun] [--skip-wireguard-go]
# Everything lives in namespaces named veil-bench-*; a trap removes them and every process started
# here, also on failure. The baselines are built once under target/bench-tools and are never part
# of veilnet: boringtun-cli with cargo install, wireguard-go with go install at a pinned
# pseudo-version (Go's checksum database verifies the module; the stamp file names the version).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

RUNS=1
SECONDS_PER_TEST=8
SKIP_BT=0
SKIP_WGO=0
# golang.zx2c4.com/wireguard at its 2025-05-21 commit: every offload of the 2023 work (TUN
# TSO/GRO through IFF_VNET_HDR, UDP GSO/GRO, batched crypto hand-off).
WGO_VERSION=v0.0.0-20250521234502-f333402bd9cb
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) RUNS=$2; shift 2 ;;
	--seconds) SECONDS_PER_TEST=$2; shift 2 ;;
	--skip-boringtun) SKIP_BT=1; shift ;;
	--skip-wireguard-go) SKIP_WGO=1; shift ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done

need_root
VEILNET_APT_PACKAGES+=(jq wireguard-tools)
ensure_packages
ensure_rust

echo "==> building veilnet and veilnet-lab (release; veilnet bench hands off to veilnet-lab)" >&2
cargo build --release --locked -q -p veilnet -p veilnet-lab --bins
VEILNET=$PWD/target/release/veilnet

BT_ROOT=$PWD/target/bench-tools
BT=$BT_ROOT/bin/boringtun-cli
if [ "$SKIP_BT" = 0 ] && [ ! -x "$BT" ]; then
	echo "==> installing boringtun-cli 0.7.1 (baseline only) into $BT_ROOT" >&2
	cargo install -q boringtun-cli --version 0.7.1 --locked --root "$BT_ROOT"
fi
WGO_ROOT=$BT_ROOT/wireguard-go
WGO=$WGO_ROOT/wireguard
if [ "$SKIP_WGO" = 0 ] && { [ ! -x "$WGO" ] || [ "$(cat "$WGO_ROOT/stamp" 2>/dev/null)" != "$WGO_VERSION" ]; }; then
	command -v go >/dev/null 2>&1 || die "go not found: the wireguard-go baseline needs Go (or pass --skip-wireguard-go)"
	echo "==> installing wireguard-go $WGO_VERSION (baseline only) into $WGO_ROOT" >&2
	mkdir -p "$WGO_ROOT"
	GOBIN=$WGO_ROOT CGO_ENABLED=0 go install -trimpath "golang.zx2c4.com/wireguard@$WGO_VERSION"
	echo "$WGO_VERSION" >"$WGO_ROOT/stamp"
fi

P=veil-bench-$$
UL=$P-ul
A=$P-a
B=$P-b
TMP=$(mktemp -d /tmp/veil-bench.XXXXXX)
PIDS=()

cleanup() {
	set +e
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
	for ns in "$A" "$B" "$UL"; do
		if ip netns list | grep -qw "$ns"; then
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
			ip netns delete "$ns" 2>/dev/null
		fi
	done
	rm -f /var/run/wireguard/veilbta.sock /var/run/wireguard/veilbtb.sock
	rm -f /var/run/wireguard/veilgoa.sock /var/run/wireguard/veilgob.sock
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---- underlay ----------------------------------------------------------------------------------
ip netns add "$UL"; ip netns add "$A"; ip netns add "$B"
for ns in "$UL" "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$UL" link add br0 type bridge
ip -n "$UL" link set br0 up
i=1
for ns in "$A" "$B"; do
	ip -n "$UL" link add "p$i" type veth peer name eth0 netns "$ns"
	ip -n "$UL" link set "p$i" master br0 up
	ip -n "$ns" addr add "192.168.90.$i/24" dev eth0
	ip -n "$ns" link set eth0 up
	i=$((i + 1))
done

# ---- the three overlays (all devices exist at once; only one carries traffic at a time) --------
setup_vxlan() {
	local i=1 ns other
	for ns in "$A" "$B"; do
		other=$((3 - i))
		ip -n "$ns" link add vx0 type vxlan id 42 dstport 4789 local "192.168.90.$i" dev eth0
		ip -n "$ns" link set vx0 mtu 1450 up
		inns "$ns" bridge fdb append 00:00:00:00:00:00 dev vx0 dst "192.168.90.$other"
		ip -n "$ns" addr add "10.90.0.$i/24" dev vx0
		i=$((i + 1))
	done
}

(umask 077; wg genkey >"$TMP/a.key"; wg genkey >"$TMP/b.key")
PUB_A=$(wg pubkey <"$TMP/a.key"); PUB_B=$(wg pubkey <"$TMP/b.key")

VEIL_PIDS=()
start_veilnet() {
	VEIL_PIDS=()
	ip netns exec "$A" "$VEILNET" bench wg-node --tun veilwg0 --port 51820 --private-key-file "$TMP/a.key" \
		--peer "$PUB_B@192.168.90.2:51820=10.91.0.2/32" >"$TMP/veil-a.log" 2>&1 &
	VEIL_PIDS+=($!); PIDS+=($!)
	ip netns exec "$B" "$VEILNET" bench wg-node --tun veilwg0 --port 51820 --private-key-file "$TMP/b.key" \
		--peer "$PUB_A@192.168.90.1:51820=10.91.0.1/32" >"$TMP/veil-b.log" 2>&1 &
	VEIL_PIDS+=($!); PIDS+=($!)
	local i=1 ns
	for ns in "$A" "$B"; do
		wait_for "veilwg0 in $ns" ip -n "$ns" link show veilwg0
		ip -n "$ns" addr add "10.91.0.$i/24" dev veilwg0
		i=$((i + 1))
	done
}
# The RTT floor: `veilnet bench tun-relay`, a TUN relayed over UDP with no crypto and no batching.
RELAY_PIDS=()
start_relay() {
	RELAY_PIDS=()
	local i=1 ns other
	for ns in "$A" "$B"; do
		other=$((3 - i))
		ip netns exec "$ns" "$VEILNET" bench tun-relay --tun veilrl0 --mtu 1440 --port 51830 \
			--peer "192.168.90.$other:51830" >"$TMP/relay-$i.log" 2>&1 &
		RELAY_PIDS+=($!); PIDS+=($!)
		wait_for "veilrl0 in $ns" ip -n "$ns" link show veilrl0
		ip -n "$ns" addr add "10.93.0.$i/24" dev veilrl0
		i=$((i + 1))
	done
}
stop_pids() { local pid; for pid in "$@"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; done; }

# A userspace WireGuard driven through its UAPI socket (boringtun-cli, wireguard-go) on both
# nodes: start_uapi_pair DEV_PREFIX PORT NET ENV=VALUE PROGRAM ARGS...; the pids land in UAPI_PIDS.
# wireguard-go enables its offloads by itself: virtio-net headers on the TUN (TSO/GRO) and UDP
# GSO/GRO on its socket, whenever the kernel offers them.
UAPI_PIDS=()
start_uapi_pair() {
	local prefix=$1 port=$2 net=$3 setting=$4
	shift 4
	UAPI_PIDS=()
	mkdir -p /var/run/wireguard
	local i=1 ns dev other key peer
	for ns in "$A" "$B"; do
		if [ $i = 1 ]; then dev=${prefix}a key=a.key peer=$PUB_B other=2; else dev=${prefix}b key=b.key peer=$PUB_A other=1; fi
		env "$setting" ip netns exec "$ns" "$@" "$dev" >"$TMP/$dev.log" 2>&1 &
		UAPI_PIDS+=($!); PIDS+=($!)
		wait_for "$dev socket" test -S "/var/run/wireguard/$dev.sock"
		inns "$ns" wg set "$dev" private-key "$TMP/$key" listen-port "$port" \
			peer "$peer" endpoint "192.168.90.$other:$port" allowed-ips "$net.$other/32"
		ip -n "$ns" link set "$dev" mtu 1440 up
		ip -n "$ns" addr add "$net.$i/24" dev "$dev"
		i=$((i + 1))
	done
}

wait_for() {
	local what=$1; shift
	for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
	die "timed out waiting for $what"
}

# ---- measurements ------------------------------------------------------------------------------
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
proc_jiffies() {
	local sum=0 pid
	for pid in "$@"; do
		[ -r "/proc/$pid/stat" ] || continue
		sum=$((sum + $(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12+$13}')))
	done
	echo "$sum"
}
HZ=$(getconf CLK_TCK)

# ping_rtt DST -> average RTT in ms (after a warm-up that completes any handshake)
ping_rtt() {
	inns "$A" ping -q -c 3 -i 0.2 -W 2 "$1" >/dev/null 2>&1 || true
	inns "$A" ping -q -n -c 50 -i 0.02 "$1" | awk -F'/' '/^rtt/{print $5}'
}

# iperf DST STREAMS DATAPATH_PIDS... -> "gbps datapath_cpu_s_per_gb machine_cpu_s_per_gb"
iperf() {
	local dst=$1 streams=$2; shift 2
	ip netns exec "$B" iperf3 -s -1 -B "$dst" >/dev/null 2>&1 &
	local srv=$!
	PIDS+=($srv)
	sleep 0.3
	local m0 p0 m1 p1 json
	m0=$(busy_jiffies); p0=$(proc_jiffies "$@")
	json=$(inns "$A" iperf3 -c "$dst" -t "$SECONDS_PER_TEST" -P "$streams" -J) || true
	m1=$(busy_jiffies); p1=$(proc_jiffies "$@")
	wait "$srv" 2>/dev/null || true
	local bytes bps
	bytes=$(jq -r '.end.sum_received.bytes // 0' <<<"$json")
	bps=$(jq -r '.end.sum_received.bits_per_second // 0' <<<"$json")
	awk -v bps="$bps" -v bytes="$bytes" -v dm=$((m1 - m0)) -v dp=$((p1 - p0)) -v hz="$HZ" -v np=$# 'BEGIN {
		gb = bytes / 1e9
		if (gb <= 0) { print "0 - -"; exit }
		dps = (np > 0) ? sprintf("%.2f", dp / hz / gb) : "-"
		printf "%.2f %s %.2f\n", bps / 1e9, dps, dm / hz / gb
	}'
}

declare -A R
measure() {
	local name=$1 dst=$2; shift 2
	local rtt one four
	rtt=$(ping_rtt "$dst")
	one=$(iperf "$dst" 1 "$@")
	four=$(iperf "$dst" 4 "$@")
	R[$name]="$rtt $one $four"
}

setup_vxlan
for run in $(seq "$RUNS"); do
	echo "==> run $run/$RUNS: VXLAN" >&2
	measure vxlan 10.90.0.2
	echo "==> run $run/$RUNS: veilnet" >&2
	start_veilnet
	measure veilnet 10.91.0.2 "${VEIL_PIDS[@]}"
	stop_pids "${VEIL_PIDS[@]}"
	if [ "$SKIP_BT" = 0 ]; then
		echo "==> run $run/$RUNS: boringtun-cli" >&2
		start_uapi_pair veilbt 51821 10.92.0 WG_SUDO=1 "$BT" --disable-drop-privileges --foreground
		measure boringtun 10.92.0.2 "${UAPI_PIDS[@]}"
		stop_pids "${UAPI_PIDS[@]}"
	else
		R[boringtun]="0 0 - - 0 - -"
	fi
	if [ "$SKIP_WGO" = 0 ]; then
		echo "==> run $run/$RUNS: wireguard-go" >&2
		start_uapi_pair veilgo 51822 10.94.0 LOG_LEVEL=error "$WGO" --foreground
		measure wireguard-go 10.94.0.2 "${UAPI_PIDS[@]}"
		stop_pids "${UAPI_PIDS[@]}"
	else
		R[wireguard-go]="0 0 - - 0 - -"
	fi
	echo "==> run $run/$RUNS: userspace relay without crypto (RTT floor)" >&2
	start_relay
	FLOOR=$(ping_rtt 10.93.0.2)
	stop_pids "${RELAY_PIDS[@]}"

	echo
	echo "run $run/$RUNS ($(uname -r), $(nproc) CPUs, iperf3 -t $SECONDS_PER_TEST)"
	printf '%-14s %9s %9s %11s %11s %9s %11s %11s\n' path "rtt ms" "1x Gb/s" "dp cpu s/GB" "all cpu s/GB" \
		"4x Gb/s" "dp cpu s/GB" "all cpu s/GB"
	for k in vxlan veilnet wireguard-go boringtun; do
		# shellcheck disable=SC2086
		printf '%-14s %9s %9s %11s %11s %9s %11s %11s\n' "$k" ${R[$k]}
	done
	read -r _ v1 _ _ v4 _ _ <<<"${R[vxlan]}"
	read -r _ e1 _ _ e4 _ _ <<<"${R[veilnet]}"
	read -r _ b1 _ _ b4 _ _ <<<"${R[boringtun]}"
	read -r gr g1 _ _ g4 _ _ <<<"${R[wireguard-go]}"
	read -r vr _ <<<"${R[vxlan]}"
	read -r er _ <<<"${R[veilnet]}"
	awk -v v1="$v1" -v v4="$v4" -v e1="$e1" -v e4="$e4" -v b1="$b1" -v b4="$b4" -v vr="$vr" -v er="$er" -v fr="$FLOOR" \
		-v g1="$g1" -v g4="$g4" -v gr="$gr" 'BEGIN {
		printf "encrypted/VXLAN:      1 stream %5.1f %%   4 streams %5.1f %%\n", (v1 > 0 ? 100 * e1 / v1 : 0), (v4 > 0 ? 100 * e4 / v4 : 0)
		if (g1 > 0) printf "veilnet/wireguard-go: 1 stream %5.2fx    4 streams %5.2fx   RTT %.2fx\n", e1 / g1, (g4 > 0 ? e4 / g4 : 0), (gr > 0 ? er / gr : 0)
		if (b1 > 0) printf "veilnet/boringtun:    1 stream %5.1fx    4 streams %5.1fx\n", e1 / b1, (b4 > 0 ? e4 / b4 : 0)
		if (vr > 0) printf "RTT encrypted/VXLAN:  %.2fx\n", er / vr
		if (vr > 0 && fr > 0) printf "RTT floor (no-crypto userspace relay): %.3f ms = %.2fx VXLAN; encrypted/floor %.2fx\n", fr, fr / vr, er / fr
	}'
done
