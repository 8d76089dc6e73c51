#!/usr/bin/env bash
# Cross-builds coca-edge for aarch64 and runs its tests under qemu-user, once per CPU model:
# cortex-a72 (Raspberry Pi 4: NEON, no fp16 arithmetic, no dot product) and cortex-a76
# (Raspberry Pi 5: fp16 and dot product). QEMU_CPU is always set: qemu's default CPU has SVE2,
# and tract would then pick SVE kernels no Pi has. Emulated timings mean nothing; correctness does.
#
#   boards/cross/setup.sh            # once: Debian's rustc-web + aarch64 std, cross gcc, qemu 10
#   boards/cross/test.sh             # build + tests (target dir: target/aarch64)
#   CPUS="cortex-a76" boards/cross/test.sh -- --test parity    # a subset
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=aarch64-unknown-linux-gnu
CPUS=${CPUS:-"cortex-a72 cortex-a76"}
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_AARCH64:-target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# -L / : the machine's own arm64 glibc (multiarch); -L /usr/aarch64-linux-gnu hangs thread spawns
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /"
export COCA_TEST_RUNNER="qemu-aarch64-static -L /"
# the checkout's path out of the binary (panic locations, line tables): the exact ARM measure
# (boards/cross/armcount.sh) then counts the same instructions from any clone
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="--remap-path-prefix=$PWD=/coca-edge ${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS:-}"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# v4l's bindgen (feature camera): the arm64 kernel and libc headers of the cross packages
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="-isystem /usr/aarch64-linux-gnu/include"
for tool in /usr/bin/rustc aarch64-linux-gnu-gcc qemu-aarch64-static; do
    command -v "$tool" >/dev/null || { echo "cross: $tool missing: run boards/cross/setup.sh" >&2; exit 2; }
done
# every test but the C ABI one (it compiles C for the host and runs valgrind)
TESTS=(--lib --test parity --test tokenizer --test preprocess --test caption --test cli --test stream --test camera --test frames --test heads --test default_model --test precision --test layout)
# the CPUs after the first run the suites whose results depend on the CPU's features (kernel
# tables, tract's kernels, f16 and dot-product paths); the rest (CLI, stream, camera, frames,
# heads, tokenizer, preprocessing, layout) are the same code on every aarch64 CPU and run once,
# which keeps CI under its hour. FULL=1 runs everything on every CPU.
FEATURE_TESTS=(--lib --test parity --test caption --test default_model --test precision)
if [ "${1:-}" = "--" ]; then shift; TESTS=("$@"); FEATURE_TESTS=("$@"); fi
[ "${FULL:-0}" = 1 ] && FEATURE_TESTS=("${TESTS[@]}")
echo "== cross-build for $TARGET with $($RUSTC --version)"
start=$(date +%s)
cargo build --release --target $TARGET --bins --tests
echo "   built in $(( $(date +%s) - start ))s"
file "$CARGO_TARGET_DIR/$TARGET/release/coca" | sed 's/^/   /'
first=1
for cpu in $CPUS; do
    echo "== tests under qemu-aarch64, QEMU_CPU=$cpu"
    start=$(date +%s)
    if [ $first = 1 ]; then run=("${TESTS[@]}"); else run=("${FEATURE_TESTS[@]}"); fi
    first=0
    echo "   ${run[*]}"
    QEMU_CPU=$cpu cargo test --release --target $TARGET "${run[@]}"
    QEMU_CPU=$cpu qemu-aarch64-static -L / "$CARGO_TARGET_DIR/$TARGET/release/coca" --model models/coca-scenes info | grep -iE "cpu|kernel|feature" | sed 's/^/   /' || true
    echo "   $cpu: passed in $(( $(date +%s) - start ))s"
done
