#!/usr/bin/env bash
# Installs what the aarch64 cross-build and its emulated tests need, from Debian's own packages
# (no Docker, no rustup target): Debian's rustc-web with its aarch64 standard library, the GNU
# cross linker and libc, libclang (bindgen of the v4l crate), and qemu-user-static 10 from
# bookworm-backports (qemu 7.2 shows tract the host's /proc/cpuinfo). Idempotent; needs root.
set -euo pipefail
need=()
[ -x /usr/bin/rustc ] && dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1 || need+=(rustc-web cargo-web libstd-rust-web-dev:arm64)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
# the package, not a file glob: libclang-cpp14 (present on some machines) matches libclang*.so* but is not libclang
dpkg -s libclang1-14 >/dev/null 2>&1 || need+=(libclang1-14)
qemu_ok() { command -v qemu-aarch64-static >/dev/null && qemu-aarch64-static --version | grep -qE 'version ([89]|[1-9][0-9])\.'; }
qemu_ok || need+=(qemu-user-static)
if [ ${#need[@]} -eq 0 ]; then echo "cross tools: all present"; exit 0; fi
echo "cross tools: installing ${need[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO dpkg --add-architecture arm64
# bookworm-backports for qemu 10: added to the machine's existing apt source (whatever mirror it uses)
src=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 || true)
if [ -n "$src" ] && ! grep -q "bookworm-backports" "$src"; then
    $SUDO sed -i '0,/^Suites: bookworm bookworm-updates$/s//Suites: bookworm bookworm-updates bookworm-backports/' "$src"
elif [ -z "$src" ] && [ -f /etc/apt/sources.list ] && ! grep -q "bookworm-backports" /etc/apt/sources.list; then
    mirror=$(awk '/^deb .* bookworm main/{print $2; exit}' /etc/apt/sources.list)
    echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
fi
$SUDO apt-get update -qq
pkgs=()
for p in "${need[@]}"; do
    if [ "$p" = qemu-user-static ]; then pkgs+=(qemu-user-static/bookworm-backports); else pkgs+=("$p"); fi
done
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
qemu_ok || { echo "cross tools: qemu-aarch64-static is older than 8 (needs bookworm-backports)" >&2; exit 1; }
echo "cross tools: ready ($(/usr/bin/rustc --version), $(qemu-aarch64-static --version | head -1))"
