#!/usr/bin/env bash
# Coverage-guided fuzzing of veilnet's input surfaces: the targets in fuzz/ (cargo-fuzz and
# libFuzzer, which need a nightly Rust toolchain), each a thin wrapper around veilnet::fuzzing.
# Usage: ./scripts/fuzz.sh [--seconds N] [--dev] [TARGET...]   (default: every target, 600 s each)
#   --dev  an unoptimised instrumented build (a shorter build, slower runs): for the
#          short run in ./scripts/test.sh, where building is most of the cost.
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/, read only) and a work corpus
# of its own under target/fuzz-corpus/<target>/ that grows across runs. A crash, a panic, an input
# that runs over 10 s or over 2 GiB fails the run; libFuzzer's reproducer is written to
# target/fuzz-artifacts/<target>/. Fix the bug, then commit the reproducer to fuzz/corpus/<target>/:
# tests/fuzz_corpus.rs replays every seed on stable in ./scripts/test.sh.
#
# Pinned: cargo-fuzz 0.13.2, installed into target/tools/ (a cache, like the build in target/fuzz/).
# First run on 2 cores: about 3 min for cargo-fuzz and 10 min for the instrumented build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ensure_rust

CARGO_FUZZ_VERSION=0.13.2
seconds=600
profile=-O
targets=()
while [ $# -gt 0 ]; do
	case "$1" in
	--seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
	--dev) profile=--dev; shift ;;
	-h | --help) sed -n '2,16p' "$0"; exit 0 ;;
	-*) die "unknown option $1 (see --help)" ;;
	*) targets+=("$1"); shift ;;
	esac
done
[[ $seconds =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || die "--seconds wants a positive number, got $seconds"
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^veilnet-fuzz$')
[ ${#targets[@]} -gt 0 ] || mapfile -t targets <<<"$all"
for t in "${targets[@]}"; do
	grep -qx "$t" <<<"$all" || die "no fuzz target $t (targets: $(echo $all))"
done

cargo +nightly --version >/dev/null 2>&1 ||
	die "fuzzing needs a nightly toolchain (rustup toolchain install nightly); tests/fuzz_corpus.rs replays the corpus on stable meanwhile"
# The instrumented build is a second full build of veilnet and its dependencies.
free_gb=$(df -Pk target 2>/dev/null | awk 'NR==2 {print int($4/1048576)}')
[ "${free_gb:-0}" -ge 8 ] || die "fuzzing needs 8 GiB free under target/, has ${free_gb:-0}"

tools="$PWD/target/tools"
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
	echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION into target/tools"
	cargo install --quiet --locked --root "$tools" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export PATH="$tools/bin:$PATH" CARGO_TARGET_DIR="$PWD/target/fuzz"

echo "==> building the fuzz targets (nightly, instrumented, $([ "$profile" = -O ] && echo optimised || echo unoptimised))"
(cd fuzz && cargo +nightly fuzz build "$profile")

failed=()
for t in "${targets[@]}"; do
	work="target/fuzz-corpus/$t" artifacts="target/fuzz-artifacts/$t"
	mkdir -p "$work" "$artifacts"
	log="target/fuzz-corpus/$t.log"
	echo "==> $t: ${seconds} s"
	set +e
	(cd fuzz && cargo +nightly fuzz run "$profile" "$t" "../$work" "corpus/$t" -- \
		-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="../$artifacts/") >"$log" 2>&1
	rc=$?
	set -e
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	size=$(find "$work" -type f | wc -l)
	if [ $rc -eq 0 ]; then
		echo "    $t: ${runs:-?} runs, 0 crashes, corpus $size inputs"
	else
		echo "    $t: FAILED (rc $rc) after ${runs:-?} runs; log $log, reproducer in $artifacts/:"
		grep -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | head -5 | sed 's/^/      /'
		failed+=("$t")
	fi
done
[ ${#failed[@]} -eq 0 ] || die "fuzz targets failed: ${failed[*]}"
echo "==> fuzzing: ${#targets[@]} targets, ${seconds} s each, no crash"
