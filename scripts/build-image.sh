#!/usr/bin/env bash
# Builds veilnet's container image offline, as an OCI image layout plus an archive for
# `ctr images import` / `docker load` / `podman load`. No base image is pulled: the single layer is
# the two release binaries plus what they need, taken from this machine's Debian packages:
#   /usr/local/bin/veilnet, /usr/local/bin/veilnet-cni   (cargo build; glibc, libgcc_s, libm)
#   /usr/sbin/nft and its shared libraries                (nftables: the agent loads libnftables.so.1,
#                                                          one of them, with dlopen; nft is its fallback)
#   /bin/busybox (+ sh, cp, mv, cat, echo links)          (busybox-static: the init containers)
# The layout is written by this script (index.json, manifest, config, gzip layer, sha256 blobs);
# `umoci` (Debian) then unpacks it as an independent check, and `runc` (Debian) runs
# `veilnet --version`, `nft --version`, `veilnet-cni` and `sh` from it. (Debian 12's crun 1.8 is
# not used: it refuses hosts with hybrid cgroups v1/v2, which runc accepts.)
#
# Usage: scripts/build-image.sh [--no-verify]
# Environment: OUT (default target/image), TAG (default the crate version), PROFILE (release).
# Output: $OUT/oci (OCI layout, ref $TAG), $OUT/veilnet-$TAG.oci.tar (the same, archived).
# Load it on a node: ctr -n k8s.io images import $OUT/veilnet-$TAG.oci.tar
#   (the image is named docker.io/library/veilnet:$TAG, which is what `veilnet:$TAG` means).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERIFY=1
[ "${1:-}" = "--no-verify" ] && VERIFY=0

VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
TAG=${TAG:-$VERSION}
OUT=${OUT:-$ROOT/target/image}
PROFILE=${PROFILE:-release}
NAME=veilnet
# Reproducible: every timestamp in the image is the last commit's.
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)

say() { printf '==> %s\n' "$*"; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

# --- packages ------------------------------------------------------------------------------------
need=(busybox-static nftables binutils jq gzip tar coreutils)
[ "$VERIFY" = 1 ] && need+=(umoci runc)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- binaries ------------------------------------------------------------------------------------
say "cargo build --profile $PROFILE (veilnet, veilnet-cni)"
cargo build --locked --profile "$PROFILE" -p veilnet -p veilnet-cni --bins
BIN=$ROOT/target/$PROFILE

# --- root filesystem -----------------------------------------------------------------------------
WORK=$OUT/work
ROOTFS=$WORK/rootfs
rm -rf "$WORK" "$OUT/oci"
mkdir -p "$ROOTFS" "$OUT"

install_file() { # src dest-in-rootfs [mode]
    mkdir -p "$ROOTFS$(dirname "$2")"
    cp -L "$1" "$ROOTFS$2"
    chmod "${3:-0755}" "$ROOTFS$2"
}

# Every shared library an executable needs, at the path the dynamic loader resolves it to.
copy_libs() {
    local lib
    # "libx.so => /lib/…/libx.so (0x…)" lines, and the loader's own "/lib64/ld-linux….so (0x…)".
    for lib in $(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        [ -e "$ROOTFS$lib" ] || install_file "$lib" "$lib" 0755
    done
}

for b in veilnet veilnet-cni; do
    # Debug info is for the build tree; the image carries stripped binaries.
    objcopy --strip-debug "$BIN/$b" "$WORK/$b"
    install_file "$WORK/$b" "/usr/local/bin/$b"
    copy_libs "$BIN/$b"
done
NFT=$(command -v nft || echo /usr/sbin/nft)
install_file "$NFT" /usr/sbin/nft
copy_libs "$NFT"
install_file /bin/busybox /bin/busybox
for applet in sh cp mv cat echo mkdir rm ls test; do
    ln -sf busybox "$ROOTFS/bin/$applet"
done
# nft and glibc look these up; the agent needs no users beyond root.
mkdir -p "$ROOTFS/etc"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\n' >"$ROOTFS/etc/group"
# Mount points the DaemonSet uses (runtimes create missing ones, read-only roots cannot).
for d in dev proc sys tmp run/veilnet var/lib/veilnet etc/veilnet etc/cni/net.d opt/cni/bin \
    host/opt/cni/bin host/proc/sys/net root; do
    mkdir -p "$ROOTFS/$d"
done
chmod 1777 "$ROOTFS/tmp"
# Provenance: the Debian package of every file copied from the system.
mkdir -p "$ROOTFS/usr/share/doc/veilnet"
{
    echo "veilnet $VERSION image, built by scripts/build-image.sh"
    echo "Debian packages the other files come from:"
    find "$ROOTFS" -type f ! -path '*/usr/local/*' ! -path '*/usr/share/doc/*' ! -path '*/etc/*' \
        -printf '/%P\n' | while read -r f; do
        real=$(readlink -f "$f")
        dpkg-query -S "$f" 2>/dev/null || dpkg-query -S "$real" 2>/dev/null ||
            dpkg-query -S "/usr$f" 2>/dev/null || echo "?: $f"
    done | cut -d: -f1 | sort -u | while read -r pkg; do
        dpkg-query -W -f='  ${Package} ${Version}\n' "$pkg" 2>/dev/null || echo "  $pkg"
    done
} >"$ROOTFS/usr/share/doc/veilnet/packages.txt"

# The image must not depend on anything outside it: every executable's libraries resolve inside.
for exe in /usr/local/bin/veilnet /usr/local/bin/veilnet-cni /usr/sbin/nft; do
    for lib in $(ldd "$ROOTFS$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        [ -e "$ROOTFS$lib" ] || die "$exe needs $lib, which is not in the image"
    done
done
# The agent dlopens libnftables.so.1 (ldd of veilnet does not show it): it comes with nft's
# libraries, at the path nft's own loader resolves it to.
nftlib=$(ldd "$ROOTFS/usr/sbin/nft" | awk '$1 == "libnftables.so.1" {print $3}')
[ -n "$nftlib" ] && [ -e "$ROOTFS$nftlib" ] || die "libnftables.so.1 is not in the image"

# --- OCI image layout ----------------------------------------------------------------------------
say "writing the OCI layout to $OUT/oci"
LAYOUT=$OUT/oci
BLOBS=$LAYOUT/blobs/sha256
mkdir -p "$BLOBS"
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$ROOTFS" -cf "$WORK/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"

# Moves a file into the blob store; prints "<digest> <size>".
add_blob() {
    local digest size
    digest=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv "$1" "$BLOBS/$digest"
    echo "$digest $size"
}
read -r LAYER_DIGEST LAYER_SIZE < <(add_blob "$WORK/layer.tar.gz")

jq -n --arg created "$CREATED" --arg diff "sha256:$DIFF_ID" --arg version "$VERSION" '{
  architecture: "amd64", os: "linux", created: $created,
  config: {
    Entrypoint: ["/usr/local/bin/veilnet"], Cmd: ["agent"],
    Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    WorkingDir: "/",
    Labels: { "org.opencontainers.image.title": "veilnet",
              "org.opencontainers.image.version": $version,
              "org.opencontainers.image.description": "veilnet agent and CNI plugin" }
  },
  rootfs: { type: "layers", diff_ids: [$diff] },
  history: [{ created: $created, created_by: "scripts/build-image.sh" }]
}' >"$WORK/config.json"
read -r CONFIG_DIGEST CONFIG_SIZE < <(add_blob "$WORK/config.json")

jq -n --arg cd "sha256:$CONFIG_DIGEST" --argjson cs "$CONFIG_SIZE" \
    --arg ld "sha256:$LAYER_DIGEST" --argjson ls "$LAYER_SIZE" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs },
  layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls }]
}' >"$WORK/manifest.json"
read -r MANIFEST_DIGEST MANIFEST_SIZE < <(add_blob "$WORK/manifest.json")

jq -n --arg md "sha256:$MANIFEST_DIGEST" --argjson ms "$MANIFEST_SIZE" --arg tag "$TAG" \
    --arg full "docker.io/library/$NAME:$TAG" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{
    mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
    platform: { architecture: "amd64", os: "linux" },
    annotations: { "org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $full }
  }]
}' >"$LAYOUT/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"

ARCHIVE=$OUT/$NAME-$TAG.oci.tar
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -C "$LAYOUT" -cf "$ARCHIVE" .
say "image $NAME:$TAG: manifest sha256:$MANIFEST_DIGEST, layer $((LAYER_SIZE / 1024)) KiB"
say "archive: $ARCHIVE"

[ "$VERIFY" = 1 ] || exit 0

# --- verification --------------------------------------------------------------------------------
say "verifying: blob digests"
for blob in "$BLOBS"/*; do
    [ "$(sha256sum "$blob" | cut -d' ' -f1)" = "$(basename "$blob")" ] || die "bad digest: $blob"
done

say "verifying: umoci unpacks the layout"
BUNDLE=$WORK/bundle
rm -rf "$BUNDLE"
umoci unpack --image "$LAYOUT:$TAG" "$BUNDLE" >/dev/null

# A minimal runtime spec for each check: the unpacked root, read-only, no terminal, a fresh
# network namespace (runc's default), plus an optional jq edit of the spec.
run_in_image() { # name jq-filter args...
    local id="veilnet-image-check-$$-$1" edit=$2
    shift 2
    (cd "$BUNDLE" && rm -f config.json && runc spec)
    jq --argjson args "$(printf '%s\n' "$@" | jq -R . | jq -s .)" \
        ".process.args = \$args | .process.terminal = false | .root.readonly = true | $edit" \
        "$BUNDLE/config.json" >"$BUNDLE/config.json.new"
    mv "$BUNDLE/config.json.new" "$BUNDLE/config.json"
    runc run --bundle "$BUNDLE" "$id" </dev/null
}

say "verifying: runc runs the image"
out=$(run_in_image version . /usr/local/bin/veilnet --version 2>&1) ||
    die "runc could not run the image: $out"
echo "    $out"
[ "$out" = "veilnet $VERSION" ] || die "unexpected version output: $out"
out=$(run_in_image nft . /usr/sbin/nft --version 2>&1) || die "nft does not run in the image: $out"
echo "    $out"
out=$(run_in_image cni . sh -c 'CNI_COMMAND=VERSION /usr/local/bin/veilnet-cni </dev/null' 2>&1) ||
    die "veilnet-cni does not run in the image: $out"
echo "    veilnet-cni VERSION: $out"
# The root is read-only and /tmp is not a mount here, so the copy must fail: proves readonly.
out=$(run_in_image sh . sh -c 'cp /usr/local/bin/veilnet-cni /tmp/x && mv /tmp/x /tmp/y' 2>&1) || true
case "$out" in
*"Read-only file system"*) echo "    sh, cp, mv present; root filesystem read-only" ;;
*) die "expected a read-only root, got: $out" ;;
esac

# What the DaemonSet's `sysctls` init container relies on, in the container's own network
# namespace (so the host is untouched): /proc/sys is read-only in an unprivileged container, the
# host's /proc/sys/net mounted elsewhere is writable with NET_ADMIN, and not without it.
say "verifying: net sysctls through a /proc/sys/net mount need NET_ADMIN, and only that"
mount_net='.mounts += [{destination: "/host/proc/sys/net", type: "bind", source: "/proc/sys/net", options: ["rbind", "rw"]}]'
caps() { echo ".process.capabilities = {bounding: $1, effective: $1, permitted: $1}"; }
out=$(run_in_image proc "$(caps '["CAP_NET_ADMIN"]')" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward' 2>&1) &&
    die "/proc/sys was writable in an unprivileged container"
echo "    /proc/sys/net/ipv4/ip_forward: ${out##*: }"
out=$(run_in_image hostsys "$mount_net | $(caps '["CAP_NET_ADMIN"]')" \
    sh -c 'echo 1 > /host/proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward' 2>&1) ||
    die "writing through /host/proc/sys/net with NET_ADMIN failed: $out"
[ "$out" = 1 ] || die "the write did not take: $out"
echo "    /host/proc/sys/net/ipv4/ip_forward with NET_ADMIN: written"
out=$(run_in_image nocaps "$mount_net | $(caps '[]')" \
    sh -c 'echo 1 > /host/proc/sys/net/ipv4/ip_forward' 2>&1) &&
    die "writing a net sysctl without NET_ADMIN succeeded; the manifest over-grants"
echo "    without NET_ADMIN: ${out##*: }"
rm -rf "$BUNDLE"
say "verified: the image runs veilnet --version with runc"
