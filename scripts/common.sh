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

# ---- Benchmarks (scripts/bench-*.sh) ----

# Builds the workspace in PROFILE (release or debug) and points $VEILNET and PATH at it.
build_veilnet() { # profile
	if [ "$1" = release ]; then
		cargo build --release --locked --workspace -q
	else
		cargo build --locked --workspace -q
	fi
	VEILNET="$PWD/target/$1/veilnet"
	export PATH="$PWD/target/$1:$PATH"
}

# CPU ticks (user + system, its reaped children such as nft included) of both agents of a
# 2-node lab.
lab_agent_cpu() { # lab
	local total=0 pid ticks node
	for node in node-1 node-2; do
		pid=$(head -1 "/var/lib/veilnet-lab/$1/pids/agent-$node.pid")
		ticks=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13 + $14 + $15}')
		total=$((total + ticks))
	done
	echo "$total"
}

# Seconds between two tick counts.
cpu_s() { awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }'; }

# The median of column COLUMN over the rows of FILE whose first field is LABEL ("n/a" without any).
median_of() { # file label column [decimals]
	awk -v l="$2" -v c="$3" '$1 == l {print $c}' "$1" | sort -n |
		awk -v d="${4:-1}" '{v[NR] = $1} END { if (NR == 0) print "n/a"; else if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; if (NR) printf "%.*f\n", d, m }'
}
