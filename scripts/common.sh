# Shared by scripts/*.sh: package installation and toolchain checks. Source it, don't run it.

# System packages veilnet's lab, tests and demo need, from Debian's archive.
# openssl makes the certificates of a lab on the real Kubernetes control plane.
# prometheus gives promtool (rule unit tests) and the Prometheus that tests/lab_prometheus.rs runs.
VEILNET_APT_PACKAGES=(iproute2 iputils-ping nftables tcpdump iperf3 containernetworking-plugins procps psmisc kmod openssl prometheus)

die() { echo "error: $*" >&2; exit 1; }

need_root() {
	[ "$(id -u)" = 0 ] || die "run this as root: the lab creates network namespaces"
}

# Installs whatever of VEILNET_APT_PACKAGES is missing (apt, as root). Quiet when nothing is missing.
ensure_packages() {
	local missing=()
	for p in "${VEILNET_APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	echo "==> installing system packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Rust comes from rustup (Debian 12's rustc is too old for the crates veilnet uses).
ensure_rust() {
	if ! command -v cargo >/dev/null 2>&1; then
		[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
	fi
	command -v cargo >/dev/null 2>&1 ||
		die "cargo not found: install a Rust toolchain >= 1.85 (rustup) and retry"
	local v
	v=$(rustc --version | awk '{print $2}')
	case "$v" in
	1.[0-7][0-9].* | 1.8[0-4].*) die "rustc $v is too old: veilnet needs >= 1.85" ;;
	esac
}
