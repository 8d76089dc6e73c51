#!/usr/bin/env bash
# The exact ARM measure: executed aarch64 instructions of coca's graphs under qemu-user with the
# armcount plugin (boards/cross/armcount/: the plugin, count.sh, analyze.py; the tool's README
# is ../shared/tools/armcount/README.md). Counts, not cycles: they compare code paths and catch
# regressions, byte-identically from run to run.
#
#   boards/cross/armcount.sh build                        # qemu 10.0.2 with plugins + the plugin (cached)
#   boards/cross/armcount.sh matrix MODEL OUT.tsv         # the counting matrix -> a table
#   boards/cross/armcount.sh check MODEL BASELINE.tsv     # CI: the matrix, compared with a baseline
#
# Matrix: per board CPU (cortex-a72 = Raspberry Pi 4, cortex-a76 = Raspberry Pi 5), per
# precision (f32, int8; f16 on the A76, which has FP16 arithmetic: the image encoder only, the
# decoder has no f16 graphs), per graph (image_encoder per image, cross_kv per image,
# decoder_step per token at batch 1 and 6 with PAST tokens cached). Each row is
# (count of --runs 3) - (count of --runs 1), / 2: load, set-up and exit cancel out.
# Pinned (each changes counts when it varies): --threads 1, the checkout path (symbols), a fresh
# cache dir, ASLR off, qemu's seed, and the cache geometry tract sizes its tiles from: a small
# sysroot with the board's /sys/devices/system/cpu/cpu0/cache (Pi 4: 32K L1d, 1M L2 shared by 4;
# Pi 5: 64K L1d, 512K L2, 2M L3), so the counts are the board's, not this machine's.
# Regenerate baselines when tract, rustc, glibc, qemu or capstone change (and say so in the commit).
#
# Environment: ARMCOUNT_CACHE (default ~/.cache/coca-edge/armcount), COCA_BIN (default the
# cross-built release binary), CPUS, PRECISIONS, GRAPHS (subsets, e.g. "image_encoder decoder_step:1"),
# PAST (default 8), TOLERANCE (check: relative, default 0.02).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tool=$here/armcount
QEMU_VERSION=10.0.2
QEMU_TARBALL=qemu_${QEMU_VERSION}+ds.orig.tar.xz
QEMU_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
cache_root=${ARMCOUNT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coca-edge/armcount}
# the build is keyed by what goes into it: a changed patch or plugin rebuilds
key=$( (echo "$QEMU_VERSION $QEMU_SHA256"; cat "$tool/qemu-10.0.2-getrandom-seed.patch" "$tool/armcount.c") | sha256sum | cut -c1-12)
bdir=$cache_root/build-$key
export QEMU=$bdir/qemu-aarch64 PLUGIN=$bdir/libarmcount.so
COCA_BIN=${COCA_BIN:-$root/target/aarch64/aarch64-unknown-linux-gnu/release/coca}
CPUS=${CPUS:-"cortex-a72 cortex-a76"}
PAST=${PAST:-8}
GRAPHS=${GRAPHS:-"image_encoder cross_kv decoder_step:1 decoder_step:6"}
TOLERANCE=${TOLERANCE:-0.02}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "armcount: $*" >&2; }
die() { echo "armcount: error: $*" >&2; exit 2; }

# the Debian mirror this machine's apt already uses (never a host name written here)
mirror() {
    local m
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '/^deb .* bookworm/{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$m" ] || die "no Debian mirror in /etc/apt: cannot fetch $QEMU_TARBALL"
    echo "${m%/}"
}

build() {
    if [ -x "$QEMU" ] && [ -f "$PLUGIN" ]; then log "qemu + plugin cached in $bdir"; return; fi
    local need=()
    for p in libglib2.0-dev ninja-build flex bison libcapstone-dev pkg-config; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
    # qemu 10 needs meson >= 1.5: bookworm-backports (boards/cross/setup.sh adds that suite)
    if ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson 2>/dev/null || echo 0)" ge 1.5; then need+=(meson/bookworm-backports python3-pycotap/bookworm-backports); fi
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    mkdir -p "$cache_root"
    local tarball=$cache_root/$QEMU_TARBALL
    if ! echo "$QEMU_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
        log "fetching $QEMU_TARBALL from Debian's archive"
        curl -sSf -o "$tarball.part" "$(mirror)/pool/main/q/qemu/$QEMU_TARBALL" || die "download of $QEMU_TARBALL failed"
        echo "$QEMU_SHA256  $tarball.part" | sha256sum -c --status || die "$QEMU_TARBALL: sha256 mismatch"
        mv "$tarball.part" "$tarball"
    fi
    local work; work=$(mktemp -d "$cache_root/work.XXXX")
    log "building qemu-aarch64 $QEMU_VERSION with plugins (about 4 minutes on 2 cores) in $work"
    tar -xJf "$tarball" -C "$work"
    local src; src=$(ls -d "$work"/qemu-*/ | head -1)
    (cd "$src" && patch -p1 -s < "$tool/qemu-10.0.2-getrandom-seed.patch")
    mkdir -p "$src/build"
    (cd "$src/build" && ../configure --python=/usr/bin/python3 --target-list=aarch64-linux-user --enable-plugins \
        --enable-capstone --disable-system --disable-tools --disable-docs --disable-werror \
        --disable-guest-agent --disable-rust --disable-install-blobs >"$work/configure.log" 2>&1) \
        || { tail -20 "$work/configure.log" >&2; die "qemu configure failed (log: $work/configure.log)"; }
    (cd "$src/build" && ninja -j"$(nproc)" qemu-aarch64 >"$work/ninja.log" 2>&1) \
        || { tail -20 "$work/ninja.log" >&2; die "qemu build failed (log: $work/ninja.log)"; }
    mkdir -p "$work/inc" "$bdir.part"
    # qemu-plugin.h alone: qemu's own include dir has a ctype.h that must not shadow libc's
    cp "$src/include/qemu/qemu-plugin.h" "$work/inc/"
    # shellcheck disable=SC2046
    gcc -O2 -fPIC -shared -I"$work/inc" $(pkg-config --cflags glib-2.0) "$tool/armcount.c" -o "$bdir.part/libarmcount.so" $(pkg-config --libs glib-2.0)
    cp "$src/build/qemu-aarch64" "$bdir.part/"
    rm -rf "$bdir"; mv "$bdir.part" "$bdir"; rm -rf "$work"
    log "built $QEMU and $PLUGIN"
}

# the board's cache description, seen by the guest through qemu's -L (other paths fall back to /)
sysroot() {
    local cpu=$1 dir=$cache_root/sysroot-$1
    if [ ! -f "$dir/.done" ]; then
        local c=$dir/sys/devices/system/cpu/cpu0
        rm -rf "$dir"; mkdir -p "$c/topology"
        echo 0 > "$c/topology/thread_siblings_list"
        idx() { mkdir -p "$c/cache/index$1"; echo "$2" > "$c/cache/index$1/level"; echo "$3" > "$c/cache/index$1/type"; echo "$4" > "$c/cache/index$1/size"; echo "$5" > "$c/cache/index$1/shared_cpu_list"; }
        case $cpu in
            cortex-a72) idx 0 1 Data 32K 0; idx 1 1 Instruction 48K 0; idx 2 2 Unified 1024K 0-3 ;;
            cortex-a76) idx 0 1 Data 64K 0; idx 1 1 Instruction 64K 0; idx 2 2 Unified 512K 0; idx 3 3 Unified 2048K 0-3 ;;
            *) die "no cache description for $cpu (cortex-a72 or cortex-a76)" ;;
        esac
        touch "$dir/.done"
    fi
    echo "$dir"
}

# precisions measured per CPU: f16 arithmetic only where the CPU has it
# (PRECISIONS: a subset, e.g. "int8")
precisions() {
    local all; case $1 in cortex-a76) all="f32 int8 f16" ;; *) all="f32 int8" ;; esac
    local p; for p in $all; do [[ " ${PRECISIONS:-$all} " == *" $p "* ]] && echo "$p"; done
}

matrix() {
    local model=$1 out=$2
    [ -f "$model/coca.json" ] || die "$model: not a model bundle (no coca.json)"
    [ -x "$COCA_BIN" ] || die "$COCA_BIN: no aarch64 binary (build it: boards/cross/test.sh, or set COCA_BIN)"
    build
    local reports; reports=$(mktemp -d)
    local model_abs; model_abs=$(cd "$model" && pwd)
    local t0; t0=$(date +%s)
    local n=0
    for cpu in $CPUS; do
        local sr; sr=$(sysroot "$cpu")
        for prec in $(precisions "$cpu"); do
            local graphs=$GRAPHS
            [ "$prec" = f16 ] && graphs=$(tr ' ' '\n' <<<"$GRAPHS" | grep '^image_encoder$' || true)
            for g in $graphs; do
                local name=${g%%:*} batch=1
                [ "$g" != "$name" ] && batch=${g#*:}
                for runs in 1 3; do
                    local rep=$reports/$cpu.$prec.$name.$batch.$runs.txt
                    SYSROOT=$sr "$tool/count.sh" "$cpu" "$rep" "$COCA_BIN" --model "$model_abs" --threads 1 --precision "$prec" \
                        graph-runs --graph "$name" --runs $runs --batch "$batch" --past "$PAST" >"$rep.stdout" 2>"$rep.stderr" \
                        || { cat "$rep.stderr" >&2; die "count failed: $cpu $prec $g runs=$runs"; }
                    n=$((n + 1))
                done
            done
        done
    done
    log "$n counted runs in $(( $(date +%s) - t0 ))s"
    python3 "$tool/table.py" --model "$model_abs/coca.json" --past "$PAST" "$reports" > "$out"
    rm -rf "$reports"
}

case ${1:-} in
    build) build ;;
    matrix) [ $# -eq 3 ] || die "usage: $0 matrix MODEL OUT.tsv"; matrix "$2" "$3"; python3 "$tool/table.py" --markdown "$3" ;;
    check)
        [ $# -eq 3 ] || die "usage: $0 check MODEL BASELINE.tsv"
        [ -f "$3" ] || die "$3: no baseline (make one: $0 matrix $2 $3)"
        now=$(mktemp --suffix .tsv)
        matrix "$2" "$now"
        python3 "$tool/table.py" --markdown "$now"
        python3 "$tool/table.py" --compare "$3" "$now" --tolerance "$TOLERANCE"
        ;;
    *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
