#!/usr/bin/env bash
# Usage: tests/lab/compare-control-planes.sh STAND_IN_LAB KUBERNETES_LAB [OUT_DIR]
#
# Runs the same kubectl commands (what operators, ./scripts/demo.sh and the test suite use) against
# two running labs, one on each control plane:
#   veilnet lab up --name sd1 --control-plane stand-in   --nodes 2
#   veilnet lab up --name sd2 --control-plane kubernetes --nodes 2
# and prints a unified diff of the normalised outputs, case by case (`-` stand-in, `+` real).
# Normalising strips what differs legitimately: ages, uids, resourceVersions, timestamps, generated
# names, pod IPs, the server URL and the lab name. Raw and normalised outputs stay in OUT_DIR
# (default: a fresh temporary directory, printed at the end).
#
# The script creates and deletes a namespace `cmp` in both labs; it leaves the labs up (tear them
# down with `veilnet lab down --name …`). Needs root (like every `veilnet lab` command).
# tests/lab/STAND-IN.md lists what the diff showed and what was done about each difference.
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 2 ]; then
	sed -n 2p "$0" >&2
	exit 2
fi
A=$1 # the stand-in lab
B=$2 # the real control plane's lab
OUT=${3:-$(mktemp -d /tmp/compare-control-planes.XXXXXX)}
mkdir -p "$OUT/$A" "$OUT/$B" "$OUT/manifests"
VEILNET=${VEILNET:-./target/debug/veilnet}
# One kubectl against both labs, so that only the servers differ: `veilnet lab kubectl` runs the
# installed kubectl against the stand-in and the release's own (v1.34.4) against the real server;
# with the release's first in PATH both get that one. KUBECTL_DIR picks another.
KUBECTL_DIR=${KUBECTL_DIR:-$PWD/target/kubernetes/v1.34.4/bin}
if [ -x "$KUBECTL_DIR/kubectl" ]; then export PATH="$KUBECTL_DIR:$PATH"; fi

# The manifests the cases apply. The lab runs no images: a container is its `command`.
M=$OUT/manifests
cat >"$M/pinned.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: pinned, namespace: cmp, labels: {app: pinned}}
spec:
  nodeName: node-1
  automountServiceAccountToken: false # the real server would mount a token volume, which the lab kubelet refuses
  containers:
    - name: agnhost
      image: veilnet/agnhost
      command: ["veilnet", "lab", "agnhost", "serve", "--tcp", "80", "--name", "pinned"]
EOF
cat >"$M/unpinned.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: unpinned, namespace: cmp, labels: {app: unpinned}}
spec:
  automountServiceAccountToken: false
  containers:
    - name: agnhost
      image: veilnet/agnhost
      command: ["veilnet", "lab", "agnhost", "serve", "--tcp", "80", "--name", "unpinned"]
EOF
cat >"$M/token.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: token, namespace: cmp}
spec:
  containers: [{name: c, image: veilnet/agnhost, command: ["true"]}]
EOF
cat >"$M/cm.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: cmp, labels: {tier: a}}
data: {k: v}
EOF
cat >"$M/cm2.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: cmp, labels: {tier: b}}
data: {k: v2, extra: x}
EOF
cat >"$M/policy.yaml" <<'EOF'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-client, namespace: cmp}
spec:
  podSelector: {matchLabels: {app: pinned}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{protocol: TCP, port: 80}]
EOF
cat >"$M/svc.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: cmp}
spec:
  selector: {app: pinned}
  ports: [{port: 80, targetPort: 80}]
EOF
cat >"$M/bad-name.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: Bad_Name, namespace: cmp}
EOF
cat >"$M/no-containers.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: empty, namespace: cmp}
spec: {}
EOF
cat >"$M/no-image.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: noimage, namespace: cmp}
spec:
  containers: [{name: c, command: ["true"]}]
EOF

# Rewrites what differs legitimately between two labs (or two runs) into placeholders.
normalise() {
	sed -E \
		-e "s/\b$A\b|\b$B\b/LAB/g" \
		-e 's#https?://172\.30\.0\.1:6443#SERVER#g' \
		-e 's/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/UID/g' \
		-e 's/"(resourceVersion|generateName)": "[^"]*"/"\1": "X"/g' \
		-e 's/(resourceVersion|wg-public-key|kube-api-access)( = |: |-)[^ ]+/\1\2X/g' \
		-e 's#/tmp/(LIVE|MERGED)-[0-9]+#/tmp/\1-X#g' \
		-e 's/(resourceVersion|Resource Version):( *)[0-9]+/\1:\2X/g' \
		-e 's/[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})/TIME/g' \
		-e 's/[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9:]{8} [+-][0-9]{4}/TIME/g' \
		-e 's/\b[0-9]+(ms|s|m|h|d)([0-9]+(s|m|h))?\b/AGE/g' \
		-e 's/<invalid>/AGE/g' \
		-e 's/\b(pinned|unpinned|cm)\.[0-9a-f]{10,}\b/\1.EVENT/g' \
		-e 's/\b10\.244\.[0-9]+\.[0-9]+\b/POD-IP/g' \
		-e 's/\b10\.96\.[0-9]+\.[0-9]+\b/SVC-IP/g' \
		-e 's#veilnet-lab://[0-9]+#veilnet-lab://PID#g' \
		-e 's/ +$//'
}

# One case: a name and a shell snippet run with `kc` (kubectl against the lab), `lab` (its name)
# and `M` (the manifests). Both outputs (stdout + stderr, then the exit code) are kept; the diff of
# the normalised pair is printed when they differ.
N=0
DIFFERING=()
case_() {
	local name=$1 snippet=$2 n lab
	N=$((N + 1))
	n=$(printf '%02d-%s' "$N" "$name")
	for lab in "$A" "$B"; do
		(
			kc() { "$VEILNET" lab kubectl --name "$lab" -- "$@"; }
			eval "$snippet"
		) >"$OUT/$lab/$n.raw" 2>&1
		echo "exit=$?" >>"$OUT/$lab/$n.raw"
		normalise <"$OUT/$lab/$n.raw" >"$OUT/$lab/$n.txt"
	done
	if ! diff -q -b "$OUT/$A/$n.txt" "$OUT/$B/$n.txt" >/dev/null; then
		DIFFERING+=("$n")
		printf '\n\033[1m### %s: %s\033[0m\n' "$n" "$snippet"
		diff -u -b --label "stand-in ($A)" --label "kubernetes ($B)" "$OUT/$A/$n.txt" "$OUT/$B/$n.txt"
	fi
}

# Sorts a JSON object's keys and prints one `path = value` line per leaf, so that the diff shows
# which fields one server sets and the other does not. Takes a jq filter for what to keep.
flat() { jq -r "${1:-.} | [paths(scalars) as \$p | {k: (\$p | map(tostring) | join(\".\")), v: getpath(\$p)}] | .[] | \"\(.k) = \(.v)\""; }

# --- the server itself
case_ version 'kc get --raw /version | jq -S "del(.buildDate, .gitCommit, .goVersion)"'
case_ healthz 'kc get --raw /healthz; echo'
case_ readyz 'kc get --raw /readyz; echo'
case_ livez 'kc get --raw /livez; echo'
case_ readyz-verbose 'kc get --raw "/readyz?verbose" | head -3'
case_ api-versions 'kc api-versions'
case_ api-resources 'kc api-resources --no-headers | sort'
case_ api-resources-wide 'kc api-resources -o wide --api-group=networking.k8s.io'
case_ cluster-info 'kc cluster-info'
case_ componentstatuses 'kc get cs'
case_ explain-pod-spec 'kc explain pod.spec | head -12'
case_ explain-np 'kc explain networkpolicy.spec.podSelector | head -8'
case_ openapi-v3-paths 'kc get --raw /openapi/v3 | jq -r ".paths | keys[]" | grep -E "^api/v1$|networking|apps/v1$"'
case_ top-node 'kc top node'
case_ top-pod 'kc top pod -A'

# --- nodes as the lab kubelet writes them
case_ nodes-wide 'kc get nodes -o wide'
case_ nodes-json 'kc get nodes -o json | flat ".items[0] | del(.status.images)"'
case_ node-conditions 'kc get node node-1 -o jsonpath="{range .status.conditions[*]}{.type}={.status} {.reason}{\"\\n\"}{end}"'
case_ describe-node 'kc describe node node-1'
case_ node-leases 'kc get leases -n kube-node-lease'

# --- namespaces and pods
case_ namespaces 'kc get namespaces'
case_ create-namespace 'kc create namespace cmp'
case_ create-namespace-again 'kc create namespace cmp'
case_ namespace-json 'kc get namespace cmp -o json | flat'
case_ default-serviceaccount 'sleep 2; kc get serviceaccounts -n cmp'
case_ apply-pinned 'kc apply -f "$M/pinned.yaml"'
case_ apply-unpinned 'kc apply -f "$M/unpinned.yaml"'
case_ wait-ready 'kc wait -n cmp --for=condition=Ready pod/pinned --timeout=30s'
case_ wait-unpinned 'kc wait -n cmp --for=condition=Ready pod/unpinned --timeout=10s'
case_ pods-wide 'kc get pods -A -o wide'
case_ pinned-spec 'kc get pod -n cmp pinned -o json | flat "{metadata: (.metadata | del(.managedFields)), spec}"'
case_ pinned-managed-fields 'kc get pod -n cmp pinned -o json --show-managed-fields | jq -c ".metadata.managedFields[] | {manager, operation, subresource}"'
case_ pinned-status 'kc get pod -n cmp pinned -o json | flat ".status"'
case_ unpinned-json 'kc get pod -n cmp unpinned -o json | flat "{spec: {nodeName: .spec.nodeName}, status: (.status | del(.containerStatuses))}"'
case_ token-volume 'kc create --dry-run=server -f "$M/token.yaml" -o json | flat "{volumes: .spec.volumes, mounts: .spec.containers[0].volumeMounts, sa: .spec.serviceAccountName}"'
case_ describe-pod 'kc describe pod -n cmp pinned'
case_ logs 'kc logs -n cmp pinned | head -3'
case_ logs-missing-container 'kc logs -n cmp pinned -c nope'
case_ kubectl-exec 'kc exec -n cmp pinned -- echo hello'
case_ lab-exec '"$VEILNET" lab exec --name "$lab" cmp/pinned -- echo hello'
case_ port-forward 'timeout 3 "$VEILNET" lab kubectl --name "$lab" -- port-forward -n cmp pod/pinned 18080:80; true'
case_ events 'sleep 1; kc get events -n cmp --sort-by=.metadata.creationTimestamp'
case_ kubectl-events 'kc events -n cmp'
case_ events-v1 'kc get events.events.k8s.io -n cmp -o json | jq -r ".items[] | [.reason, .regarding.name, .reportingController] | @tsv"'

# --- reading: output forms, selectors, errors
case_ jsonpath 'kc get pods -n cmp -o jsonpath="{.items[*].metadata.name}"; echo'
case_ custom-columns 'kc get pods -n cmp -o custom-columns=NAME:.metadata.name,NODE:.spec.nodeName,POLICY:.spec.restartPolicy'
case_ label-selector 'kc get pods -n cmp -l app=pinned'
case_ field-selector 'kc get pods -A --field-selector spec.nodeName=node-1'
case_ bad-field-selector 'kc get pods -A --field-selector spec.bogus=x'
case_ get-missing 'kc get pod -n cmp nope'
case_ get-missing-ns 'kc get pod -n nope nope'
case_ get-missing-kind 'kc get deployments'
case_ get-missing-ignore 'kc get pod -n cmp nope --ignore-not-found'
case_ watch 'timeout 5 "$VEILNET" lab kubectl --name "$lab" -- get pods -n cmp -w; echo "timeout exit=$?"'
case_ watch-only 'timeout 3 "$VEILNET" lab kubectl --name "$lab" -- get pods -n cmp -w --watch-only -o name & sleep 1; kc label pod -n cmp pinned w=1 >/dev/null; wait'

# --- writing
case_ ssa 'kc apply --server-side -f "$M/cm.yaml"'
case_ ssa-managed 'kc get cm -n cmp cm -o json --show-managed-fields | jq -c ".metadata.managedFields[] | {manager, operation, fieldsV1}"'
case_ ssa-conflict 'kc apply --server-side --field-manager=other -f "$M/cm2.yaml"'
case_ dry-run-server 'kc apply --dry-run=server -f "$M/cm2.yaml" --server-side --force-conflicts -o jsonpath="{.data}"; echo; kc get cm -n cmp cm -o jsonpath="{.data}"; echo'
case_ diff 'kc diff -f "$M/cm2.yaml"'
case_ client-apply 'kc apply -f "$M/cm2.yaml"'
case_ patch-strategic 'kc patch -n cmp pod pinned -p "{\"metadata\":{\"labels\":{\"p\":\"s\"}}}"'
case_ patch-merge 'kc patch -n cmp cm cm --type=merge -p "{\"data\":{\"m\":\"1\"}}" -o jsonpath="{.data}"; echo'
case_ patch-json 'kc patch -n cmp cm cm --type=json -p "[{\"op\":\"replace\",\"path\":\"/data/k\",\"value\":\"j\"}]" -o jsonpath="{.data}"; echo'
case_ patch-json-bad-path 'kc patch -n cmp cm cm --type=json -p "[{\"op\":\"replace\",\"path\":\"/data/nope\",\"value\":\"j\"}]"'
case_ patch-spec-immutable 'kc patch -n cmp pod pinned -p "{\"spec\":{\"nodeName\":\"node-2\"}}"'
case_ patch-no-change 'kc patch -n cmp cm cm --type=merge -p "{\"data\":{\"m\":\"1\"}}"'
case_ label 'kc label -n cmp pod pinned team=a'
case_ label-conflict 'kc label -n cmp pod pinned team=b'
case_ label-overwrite 'kc label -n cmp pod pinned team=b --overwrite'
case_ label-remove 'kc label -n cmp pod pinned team-'
case_ annotate 'kc annotate -n cmp pod pinned note=a'
case_ annotate-conflict 'kc annotate -n cmp pod pinned note=b'
case_ annotate-overwrite 'kc annotate -n cmp pod pinned note=b --overwrite'
case_ generation 'kc get pod -n cmp pinned -o jsonpath="{.metadata.generation}"; echo; kc get cm -n cmp cm -o jsonpath="{.metadata.generation}"; echo'
case_ invalid-name 'kc apply -f "$M/bad-name.yaml"'
case_ invalid-no-containers 'kc apply -f "$M/no-containers.yaml"'
case_ invalid-no-image 'kc apply -f "$M/no-image.yaml"'
case_ invalid-field 'kc create -n cmp configmap x --from-literal=a=b --dry-run=client -o json | jq ".bogus = 1" | kc create -f -'
case_ create-existing 'kc create -f "$M/cm.yaml"'
case_ create-in-missing-ns 'kc create configmap x -n nope'
case_ service 'kc apply -f "$M/svc.yaml" && kc get svc -n cmp web -o json | flat "{spec: (.spec | del(.clusterIP, .clusterIPs))}"'
case_ endpointslices 'sleep 2; kc get endpointslices -n cmp'
case_ endpoints 'kc get endpoints -n cmp'
case_ networkpolicy 'kc apply -f "$M/policy.yaml" && kc get networkpolicy -n cmp -o wide'
case_ describe-networkpolicy 'kc describe networkpolicy -n cmp only-client'
case_ get-all 'kc get all -n cmp'

# --- deleting
case_ delete-wait 'kc delete -n cmp pod pinned --wait --timeout=30s'
case_ delete-missing 'kc delete -n cmp pod pinned'
case_ delete-unpinned 'kc delete -n cmp pod unpinned --wait --timeout=30s'
case_ delete-namespace 'kc delete namespace cmp --wait --timeout=60s'
case_ namespace-gone 'kc get namespace cmp'

printf '\n%d of %d cases differ: %s\nOutputs in %s\n' "${#DIFFERING[@]}" "$N" "${DIFFERING[*]}" "$OUT"
