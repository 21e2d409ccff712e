#!/usr/bin/env bash
# Runs every veilnet test: unit tests and the netns integration tests (needs root).
# Usage: ./scripts/test.sh [extra cargo test args, passed to both passes]
# 1. builds the real Kubernetes control plane (scripts/build-kubernetes.sh: ~6 min the first
#    time on 2 cores, seconds after; needs Go);
# 2. runs `cargo test --workspace`: every test, with the lab on its default control plane, the
#    stand-in (tests/lab_kubernetes.rs brings up the real one itself);
# 3. runs the lab test files tagged `//! Control planes: both` again on the real control plane
#    (VEILNET_LAB_CONTROL_PLANE=kubernetes). tests/control_plane_tags.rs checks every lab file
#    has that tag or says why it runs on one control plane only;
#    Step 2 includes the soak (tests/lab_soak.rs) for $VEILNET_SOAK_MINUTES minutes, 5 by default
#    (scripts/soak.sh runs it for longer);
# 4. fuzzes every target in fuzz/ for 10 s, from an unoptimised instrumented build
#    (scripts/fuzz.sh --dev; needs nightly Rust, else skipped: tests/fuzz_corpus.rs replays the
#    corpus on stable in step 2 either way).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need_root
ensure_packages
ensure_rust

phase_start=$SECONDS
took() { echo "==> $1 took $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

echo "==> the real Kubernetes control plane (scripts/build-kubernetes.sh)"
./scripts/build-kubernetes.sh
took "the Kubernetes build"
echo "==> cargo build (debug, all targets)"
cargo build --workspace --all-targets --locked
took "the cargo build"
echo "==> cargo test (the lab on the stand-in)"
cargo test --workspace --locked --no-fail-fast "$@"
took "cargo test"

both=()
for f in tests/*.rs; do
	grep -q '^//! Control planes: both' "$f" && both+=(--test "$(basename "$f" .rs)")
done
[ ${#both[@]} -gt 0 ] || die "no test file is tagged '//! Control planes: both'"
echo "==> the lab tests again, on the real control plane: ${both[*]}"
VEILNET_LAB_CONTROL_PLANE=kubernetes cargo test --locked --no-fail-fast "${both[@]}" "$@"
took "the real-control-plane pass"
# Coverage-guided fuzzing, short (every target 10 s, unoptimised: the build is most of the cost
# here; scripts/fuzz.sh alone runs 600 s each from an optimised build).
# It needs nightly Rust; without it, tests/fuzz_corpus.rs (in cargo test above) replayed the
# corpus and its mutations on stable.
if cargo +nightly --version >/dev/null 2>&1; then
	echo "==> fuzzing, short (scripts/fuzz.sh --dev --seconds ${VEILNET_FUZZ_SECONDS:-10})"
	./scripts/fuzz.sh --dev --seconds "${VEILNET_FUZZ_SECONDS:-10}"
	took "fuzzing"
else
	echo "==> fuzzing skipped: no nightly Rust toolchain (the corpus replay ran on stable)"
fi
echo "==> all tests passed in $SECONDS s"
