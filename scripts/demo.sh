#!/usr/bin/env bash
# The main job: build veilnet, bring up a 3-node lab in network namespaces and show it working.
#   ./scripts/demo.sh        build + lab up + demo (leaves the lab up to play with)
#   ./scripts/demo.sh down   remove the lab (idempotent)
# Environment: LAB (lab name, default veilnet).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root

LAB=${LAB:-veilnet}
VEILNET=./target/release/veilnet

if [ "${1:-}" = down ]; then
	if [ ! -x "$VEILNET" ]; then ensure_rust; cargo build --release --locked -q; fi
	exec "$VEILNET" lab down --name "$LAB"
fi

ensure_packages
ensure_rust
echo "==> building (release)"
cargo build --release --locked --workspace

say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
kc() { "$VEILNET" lab kubectl --name "$LAB" -- "$@"; }

say "Bringing up lab '$LAB' (3 nodes)"
run "$VEILNET" lab up --name "$LAB" --nodes 3

say "Nodes, as kubectl sees them"
printf '$ veilnet lab kubectl -- get nodes -o wide\n'
kc get nodes -o wide

say "Two pods on node-1 (reference CNI: Debian's bridge + host-local)"
printf '$ veilnet lab kubectl -- apply -f scripts/demo/pods.yaml\n'
kc apply -f scripts/demo/pods.yaml
kc wait --for=condition=Ready pod/web pod/client --timeout=60s
kc get pods -o wide

WEB_IP=$(kc get pod web -o jsonpath='{.status.podIP}')
say "client -> web ($WEB_IP) over TCP and UDP"
run "$VEILNET" lab exec --name "$LAB" default/client -- veilnet lab agnhost connect "$WEB_IP:80" --protocol tcp --timeout 2s
run "$VEILNET" lab exec --name "$LAB" default/client -- veilnet lab agnhost connect "$WEB_IP:81" --protocol udp --timeout 2s
say "client -> web on a closed port: refused"
if "$VEILNET" lab exec --name "$LAB" default/client -- veilnet lab agnhost connect "$WEB_IP:9999" --timeout 2s; then
	die "a closed port answered"
fi

say "Lab status"
run "$VEILNET" lab status --name "$LAB"

cat <<EOT

The lab is still up. Try:
  $VEILNET lab kubectl -- get pods -A
  $VEILNET lab exec default/client -- ip addr
  ./scripts/demo.sh down
EOT
