#!/usr/bin/env bash
# Builds the real Kubernetes control plane for `veilnet lab up --control-plane kubernetes`:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd, from the Go module
# proxy through the module in tests/kubernetes/ (its go.mod pins the release), into
# target/kubernetes/<version>/bin. Does nothing when those binaries are already built.
# Usage: ./scripts/build-kubernetes.sh [--force]
# Needs Go (the version in tests/kubernetes/go.mod or newer). The first build takes ~6 minutes
# on 2 cores; later ones reuse Go's module and build caches.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

force=0
[ "${1:-}" = --force ] && force=1

MODULE_DIR=tests/kubernetes
# Commit of the kubernetes/kubernetes tag that go.mod pins, as Kubernetes' release build stamps it.
KUBE_GIT_COMMIT=${KUBE_GIT_COMMIT:-}
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

mod_version() { awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$MODULE_DIR/go.mod"; }
kube_version=$(mod_version k8s.io/kubernetes)
etcd_version=$(mod_version go.etcd.io/etcd/server/v3)
[ -n "$kube_version" ] && [ -n "$etcd_version" ] || die "cannot read the pinned versions from $MODULE_DIR/go.mod"

out=target/kubernetes/$kube_version
bin=$out/bin
stamp=$out/stamp

command -v go >/dev/null 2>&1 || die "go not found: the real-Kubernetes lab tier needs Go >= 1.24 (see README)"
go_version=$(go env GOVERSION)
gosum_hash=$(sha256sum "$MODULE_DIR/go.sum" | cut -d' ' -f1)
want_stamp="kubernetes=$kube_version etcd=$etcd_version go=$go_version commit=${KUBE_GIT_COMMIT:-none} go.sum=$gosum_hash"

all_built() {
	local b
	for b in "${BINARIES[@]}"; do [ -x "$bin/$b" ] || return 1; done
}
if [ $force = 0 ] && all_built && [ "$(cat "$stamp" 2>/dev/null)" = "$want_stamp" ]; then
	echo "==> Kubernetes $kube_version and etcd $etcd_version already built in $bin"
	exit 0
fi

# The version stamps Kubernetes' own build sets (hack/lib/version.sh), so /version and
# `kubectl version` report the release, not v0.0.0-master. The build date is the tag's date
# (from the module proxy), which keeps rebuilds byte-identical.
minor=${kube_version#v1.}
minor=${minor%%.*}
tag_time=$(cd "$MODULE_DIR" && go list -m -f '{{.Time}}' k8s.io/kubernetes)
build_date=$(date -u -d "${tag_time% UTC}" +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
	[ -n "$KUBE_GIT_COMMIT" ] && ldflags+=" -X $pkg.gitCommit=$KUBE_GIT_COMMIT"
done

echo "==> building Kubernetes $kube_version (${BINARIES[*]}) and etcd $etcd_version into $bin"
mkdir -p "$bin"
rm -f "$stamp"
cd "$MODULE_DIR"
# CGO_ENABLED=0 and the tags are those of Kubernetes' release build. GOMODCACHE and GOCACHE are
# Go's defaults, shared with every other build on the machine. Two packages at a time (-p 2)
# keeps the peak near 3 GiB on a 2-core machine.
CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -p "${KUBE_BUILD_JOBS:-2}" -trimpath -tags selinux,notest \
	-ldflags "$ldflags" -o "../../$bin/" \
	k8s.io/kubernetes/cmd/kube-apiserver \
	k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler \
	k8s.io/kubernetes/cmd/kubectl
# etcd's main package is its server module's root; its binary is named after the module
# directory (v3), so it gets its own -o.
CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -p "${KUBE_BUILD_JOBS:-2}" -trimpath \
	-ldflags "-s -w" -o "../../$bin/etcd" go.etcd.io/etcd/server/v3
cd - >/dev/null
all_built || die "the build finished but $bin lacks a binary"
echo "$want_stamp" >"$stamp"
echo "==> built: $("$bin/kubectl" version --client 2>/dev/null | head -1); $("$bin/etcd" --version | head -1)"
