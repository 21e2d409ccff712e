#!/usr/bin/env bash
# The main job: build veilnet, bring up a 3-node lab in network namespaces and show pod traffic
# isolated by a NetworkPolicy and crossing the wire encrypted, toggled live per node, and blocked
# (never downgraded) in strict mode.
#   ./scripts/demo.sh        build + lab up + demo (leaves the lab up to play with)
#   ./scripts/demo.sh down   remove the lab (idempotent)
# Environment: LAB (lab name, default veilnet).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root

LAB=${LAB:-veilnet}
export VEILNET=./target/release/veilnet

if [ "${1:-}" = down ]; then
	if [ ! -x "$VEILNET" ]; then ensure_rust; cargo build --release --locked -q --workspace; fi
	exec "$VEILNET" lab down --name "$LAB"
fi

ensure_packages
ensure_rust
echo "==> building (release)"
cargo build --release --locked --workspace

say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
kc() { "$VEILNET" lab kubectl --name "$LAB" -- "$@"; }
label() {
	printf '$ veilnet lab kubectl -- label node %s veilnet.io/encryption=%s --overwrite\n' "$1" "$2"
	kc label node "$1" "veilnet.io/encryption=$2" --overwrite >/dev/null
	sleep 1 # the agents apply a label change within milliseconds; leave room for the watch
}
connect() { # from-pod ip:port proto
	printf '$ veilnet lab exec default/%s -- veilnet lab agnhost connect %s --protocol %s\n' "$1" "$2" "$3"
	"$VEILNET" lab exec --name "$LAB" "default/$1" -- veilnet lab agnhost connect "$2" --protocol "$3" --timeout 2s || true
}
verify() { run ./scripts/verify-ciphertext.sh --lab "$LAB" "$@"; }

say "Bringing up lab '$LAB': 3 nodes, veilnet agent + CNI on each, encryption on by default"
run "$VEILNET" lab up --name "$LAB" --nodes 3

say "Nodes, as kubectl sees them"
printf '$ veilnet lab kubectl -- get nodes -o wide\n'
kc get nodes -o wide

say "One pod per node"
printf '$ veilnet lab kubectl -- apply -f scripts/demo/pods.yaml\n'
kc apply -f scripts/demo/pods.yaml
kc wait --for=condition=Ready pod/web pod/client pod/other --timeout=60s >/dev/null
kc get pods -o wide
WEB=$(kc get pod web -o jsonpath='{.status.podIP}')
OTHER=$(kc get pod other -o jsonpath='{.status.podIP}')

say "Across nodes: client (node-2) -> web (node-1), other (node-3) -> web, over TCP and UDP"
connect client "$WEB:80" tcp
connect client "$WEB:81" udp
connect other "$WEB:80" tcp

say "The wire carries only WireGuard ciphertext (tcpdump on the underlay)"
verify default/client default/web encrypted

say "What node-1's agent sees"
run "$VEILNET" status --lab "$LAB" --node node-1

say "Isolation: a NetworkPolicy lets only app=client reach web, on TCP 80"
printf '$ veilnet lab kubectl -- apply -f scripts/demo/policy.yaml\n'
kc apply -f scripts/demo/policy.yaml
sleep 1
connect client "$WEB:80" tcp
printf '(other is not app=client: its connection times out, exit 1)\n'
connect other "$WEB:80" tcp
run "$VEILNET" policy explain --lab "$LAB" default/other default/web 80/tcp
kc delete -f scripts/demo/policy.yaml >/dev/null

say "Turn encryption off on node-2, live: that pair falls back to VXLAN, and the wire shows it"
label node-2 off
verify default/client default/web plaintext
verify default/other default/web encrypted

say "node-1 strict, node-2 off: the pair is blocked, never downgraded"
label node-1 strict
verify default/client default/web blocked

say "Back to on: encrypted again"
label node-2 on
label node-1 on
verify default/client default/web encrypted
run "$VEILNET" status --lab "$LAB" --node node-2

cat <<EOT

The lab is still up. Try:
  $VEILNET lab kubectl -- get pods -A -o wide
  $VEILNET status --lab $LAB --node node-1
  $VEILNET lab exec default/client -- ip route
  ./scripts/demo.sh down
EOT
