#!/usr/bin/env bash
# One command for a board: cross-builds the `coca` binary and the static library for aarch64
# and packs what a Raspberry Pi 4/5 or a Jetson needs into dist/coca-edge-aarch64.tar.gz:
#   bin/coca, lib/libcoca_edge.a, lib/pkgconfig/coca_edge.pc, include/coca_edge.h,
#   models/coca-scenes (the default model), boards/*.toml
# Then: scp dist/coca-edge-aarch64.tar.gz pi@raspberrypi.local: ; on the board:
#   tar xzf coca-edge-aarch64.tar.gz && cd coca-edge-aarch64 && bin/coca --board auto info
# Needs boards/cross/setup.sh once. RUSTFLAGS may add e.g. -C target-cpu=cortex-a76 (Pi 5 only).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=aarch64-unknown-linux-gnu
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_AARCH64:-target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
command -v aarch64-linux-gnu-gcc >/dev/null && [ -x "$RUSTC" ] || { echo "dist: run boards/cross/setup.sh first" >&2; exit 2; }
cargo build --release --target $TARGET --bin coca --lib
out=dist/coca-edge-aarch64
rm -rf "$out" && mkdir -p "$out"/{bin,lib/pkgconfig,include,models,boards}
rel="$CARGO_TARGET_DIR/$TARGET/release"
cp "$rel/coca" "$out/bin/" && aarch64-linux-gnu-strip "$out/bin/coca"
cp "$rel/libcoca_edge.a" "$out/lib/" && aarch64-linux-gnu-strip --strip-debug "$out/lib/libcoca_edge.a"
cp include/coca_edge.h "$out/include/"
cp -r models/coca-scenes "$out/models/"
cp boards/*.toml boards/README.md "$out/boards/"
cat > "$out/lib/pkgconfig/coca_edge.pc" <<PC
prefix=\${pcfiledir}/../..
Name: coca_edge
Description: CoCa on robots (static library)
Version: $(awk -F'"' '/^version/{print $2; exit}' Cargo.toml)
Cflags: -I\${prefix}/include
Libs: \${prefix}/lib/libcoca_edge.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
PC
tar -C dist -czf dist/coca-edge-aarch64.tar.gz coca-edge-aarch64
echo "dist: dist/coca-edge-aarch64.tar.gz ($(du -h dist/coca-edge-aarch64.tar.gz | cut -f1)): $(file -b "$out/bin/coca" | cut -d, -f1-2)"
