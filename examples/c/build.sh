#!/bin/sh
# Build the C programs against coca-edge's static library and write a pkg-config file for it.
#
#   examples/c/build.sh              cargo build --release --lib, then build into target/release
#   examples/c/build.sh DIR          use the libcoca_edge.a already in DIR (what tests/c_abi.rs does)
#
# Writes DIR/coca_edge.pc (native libraries from `rustc --print native-static-libs`), then
# DIR/coca_classify_c (examples/c/classify.c) and DIR/coca_abi_misuse_c (tests/c/abi_misuse.c).
# Link line for your own program:
#   PKG_CONFIG_PATH=DIR cc app.c $(pkg-config --cflags --libs coca_edge) -Wl,-z,noexecstack
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ $# -eq 0 ]; then
    (cd "$root" && cargo build --release --lib)
    out=$root/target/release
else
    out=$(cd "$1" && pwd)
fi
[ -f "$out/libcoca_edge.a" ] || { echo "build.sh: $out/libcoca_edge.a not found" >&2; exit 2; }
CC=${CC:-cc}
RUSTC=${RUSTC:-rustc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo 'fn main() {}' > "$tmp/probe.rs"
native=$("$RUSTC" ${RUST_TARGET:+--target "$RUST_TARGET"} --crate-type staticlib --print native-static-libs \
    -o "$tmp/probe.a" "$tmp/probe.rs" 2>&1 | sed -n 's/.*native-static-libs: //p')
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
cat > "$out/coca_edge.pc" <<PC
libdir=$out
includedir=$root/include

Name: coca_edge
Description: CoCa on robots: zero-shot labels and embeddings through tract (static library)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lcoca_edge $native
PC
flags=$(PKG_CONFIG_PATH=$out pkg-config --cflags coca_edge)
libs=$(PKG_CONFIG_PATH=$out pkg-config --libs coca_edge)
for pair in "examples/c/classify.c coca_classify_c" "tests/c/abi_misuse.c coca_abi_misuse_c"; do
    set -- $pair
    $CC -std=c11 -O1 -g -Wall -Wextra -Werror $flags "$root/$1" $libs -Wl,-z,noexecstack -o "$out/$2"
done
echo "built $out/coca_classify_c and $out/coca_abi_misuse_c (pkg-config: $out/coca_edge.pc)"
