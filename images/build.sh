#!/usr/bin/env bash
# Builds the enilab guest image from Debian packages:
#   images/out/vmlinuz         the linux-image-*-cloud-amd64 kernel
#   images/out/initramfs.img   busybox, iproute2, iperf3, ethtool, the
#                              virtio modules, /init and the agent
#   images/out/manifest.json   versions, sha256s and the cache key
# Nothing runs inside a guest: the .debs are fetched with `apt-get download`
# into images/out/cache, unpacked with `dpkg-deb -x`, and the archive is
# packed with `cpio -H newc | gzip`. Re-running with nothing changed prints
# "image up to date" and leaves the outputs alone.
#
# Usage: images/build.sh [--force]
# Environment:
#   CARGO_TARGET_DIR       cargo target dir (default <workspace>/target)
#   ENILAB_IMAGE_OUT       output dir (default images/out)
#   ENILAB_AGENT_BIN       use this agent binary instead of building one
#   ENILAB_KERNEL_PKG      versioned kernel package (default: what the
#                          linux-image-cloud-amd64 candidate depends on)
#   ENILAB_EXTRA_MODULES   more kernel modules to load at boot (space separated)
#   ENILAB_EXTRA_PROGRAMS  more programs from the packages, e.g. "sbin/tc bin/ss"
set -euo pipefail

FORMAT=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE="$(cd "$HERE/.." && pwd)"
OUT="${ENILAB_IMAGE_OUT:-$HERE/out}"
CACHE="$OUT/cache"
WORK="$OUT/work"
TARGET_DIR="${CARGO_TARGET_DIR:-$WORKSPACE/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$WORKSPACE/$TARGET_DIR" ;; esac
MULTIARCH=x86_64-linux-gnu
KERNEL_META=linux-image-cloud-amd64
# Load order matters: each module after the ones it needs. Dependencies
# found in modules.dep are added in front automatically; built-ins skipped.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net virtio_console)
# shellcheck disable=SC2206
MODULES+=(${ENILAB_EXTRA_MODULES:-})
# Programs copied from the unpacked packages (path inside the package root).
# (busybox provides tc and netstat; iproute2's tc and ss would pull in ~4 MB
# of libraries: add them with ENILAB_EXTRA_PROGRAMS="sbin/tc bin/ss".)
PROGRAMS=(bin/dash bin/ip sbin/ethtool usr/bin/iperf3)
# shellcheck disable=SC2206
PROGRAMS+=(${ENILAB_EXTRA_PROGRAMS:-})
STEPS=9
FORCE=0

for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

step() { local n=$1; shift; printf '[%d/%d] %s\n' "$n" "$STEPS" "$*"; }
note() { printf '      %s\n' "$*"; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb depmod cpio gzip sha256sum ldd flock; do
    command -v "$tool" >/dev/null || die "'$tool' is missing (apt-get install cpio gzip kmod util-linux dpkg apt)"
done

mkdir -p "$OUT" "$CACHE"
exec 9>"$OUT/.lock"
flock 9 || die "cannot lock $OUT/.lock"

APT_OPTS=(-q)
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)

candidate() {
    local v
    v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        die "apt knows no installable version of '$1'; run 'apt-get update' (the package lists may be missing)"
    fi
    printf '%s' "$v"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- 1. versions --------------------------------------------------------------
step 1 "resolving package versions"
if [ -n "${ENILAB_KERNEL_PKG:-}" ]; then
    KPKG=$ENILAB_KERNEL_PKG
else
    META_VER=$(candidate "$KERNEL_META")
    KPKG=$(apt-cache show "$KERNEL_META=$META_VER" | awk -F': ' '/^Depends:/ {print $2; exit}' \
           | tr ',|' '\n\n' | grep -oE 'linux-image-[0-9][^ ]*-cloud-amd64' | head -n1 || true)
    [ -n "$KPKG" ] || die "cannot find the versioned kernel package that $KERNEL_META $META_VER depends on"
fi
# dash is /bin/sh: busybox's sh runs its own applets before PATH, so with it
# `sh -c "ip ..."` would get busybox's ip instead of iproute2's.
PACKAGES=("$KPKG" busybox-static dash iproute2 iperf3 libiperf0 libsctp1 ethtool)
declare -A VER
for p in "${PACKAGES[@]}"; do
    VER[$p]=$(candidate "$p")
    note "$p ${VER[$p]}"
done

# --- 2-6. fetch ---------------------------------------------------------------
deb_of() { # the cached .deb of package $1 at its resolved version, if present
    local f ver=${VER[$1]}
    for f in "$CACHE/${1}_${ver//:/%3a}_"*.deb; do
        [ -f "$f" ] && { printf '%s' "$f"; return 0; }
    done
    return 1
}
fetch() {
    local p f
    for p in "$@"; do
        if f=$(deb_of "$p"); then
            note "$(basename "$f") (cached)"
            continue
        fi
        if ! log=$(cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$p=${VER[$p]}" 2>&1); then
            printf '%s\n' "$log" >&2
            die "apt-get download $p=${VER[$p]} failed (is the package mirror reachable?)"
        fi
        f=$(deb_of "$p") || die "apt-get download $p=${VER[$p]} left no .deb in $CACHE"
        dpkg-deb -f "$f" Package >/dev/null || { rm -f "$f"; die "downloaded $f is not a valid .deb"; }
        note "$(basename "$f") ($(du -h "$f" | cut -f1))"
    done
}
step 2 "fetching $KPKG"; fetch "$KPKG"
step 3 "fetching busybox-static and dash"; fetch busybox-static dash
step 4 "fetching iproute2"; fetch iproute2
step 5 "fetching iperf3 (with libiperf0, libsctp1)"; fetch iperf3 libiperf0 libsctp1
step 6 "fetching ethtool"; fetch ethtool

# --- 7. agent -----------------------------------------------------------------
mkdir -p "$WORK"
if [ -n "${ENILAB_AGENT_BIN:-}" ]; then
    step 7 "using the agent binary $ENILAB_AGENT_BIN"
    AGENT_SRC=$ENILAB_AGENT_BIN
else
    step 7 "building enilab-agent (cargo build --release -p enilab-agent, target dir $TARGET_DIR)"
    command -v cargo >/dev/null || die "cargo is missing"
    (cd "$WORKSPACE" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -q -p enilab-agent) \
        || die "cargo build of enilab-agent failed"
    AGENT_SRC=$TARGET_DIR/release/enilab-agent
fi
[ -x "$AGENT_SRC" ] || die "agent binary $AGENT_SRC missing"
cp -f "$AGENT_SRC" "$WORK/enilab-agent.new"
if command -v strip >/dev/null; then strip --strip-all "$WORK/enilab-agent.new"; fi
mv -f "$WORK/enilab-agent.new" "$WORK/enilab-agent"
AGENT_SHA=$(sha "$WORK/enilab-agent")
note "agent sha256 $AGENT_SHA"

# --- cache key ------------------------------------------------------------------
KEY_INPUT=$(
    echo "format=$FORMAT"
    for p in "${PACKAGES[@]}"; do echo "pkg $p=${VER[$p]}"; done
    echo "modules ${MODULES[*]}"
    echo "programs ${PROGRAMS[*]}"
    echo "agent $AGENT_SHA"
    echo "build.sh $(sha "$HERE/build.sh")"
    (cd "$HERE/rootfs" && find . -type f -o -type l | LC_ALL=C sort | while read -r f; do
        echo "rootfs $f $(stat -c %a "$f") $(sha "$f")"; done)
)
KEY=$(printf '%s\n' "$KEY_INPUT" | sha256sum | cut -d' ' -f1)
if [ "$FORCE" -eq 0 ] && [ -f "$OUT/manifest.json" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ] \
   && grep -q "\"cache_key\": \"$KEY\"" "$OUT/manifest.json" \
   && [ -f "$OUT/host-libs.sha256" ] && sha256sum --quiet -c "$OUT/host-libs.sha256" >/dev/null 2>&1; then
    echo "image up to date (cache key ${KEY:0:16}): $OUT/vmlinuz $OUT/initramfs.img"
    exit 0
fi

# --- 8. assemble ----------------------------------------------------------------
step 8 "assembling the root file system"
DEBROOT=$WORK/debroot
ROOT=$WORK/root
rm -rf "$DEBROOT" "$ROOT"
mkdir -p "$DEBROOT" "$ROOT"
for p in "${PACKAGES[@]}"; do dpkg-deb -x "$(deb_of "$p")" "$DEBROOT"; done

MODBASE=$DEBROOT/lib/modules
[ -d "$MODBASE" ] || MODBASE=$DEBROOT/usr/lib/modules   # merged-/usr kernels
KVERS=("$MODBASE"/*)
[ ${#KVERS[@]} -eq 1 ] && [ -d "${KVERS[0]}" ] || die "expected exactly one kernel in $KPKG"
KVER=$(basename "${KVERS[0]}")
VMLINUZ="$DEBROOT/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "$KPKG has no /boot/vmlinuz-$KVER"
note "kernel $KVER"

mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/$MULTIARCH,lib64,etc/enilab,proc,sys,dev,tmp,run,root,mnt,var/log}
ln -s ../run "$ROOT/var/run"
ln -s /proc/mounts "$ROOT/etc/mtab"
[ -d "$DEBROOT/etc/iproute2" ] && cp -a "$DEBROOT/etc/iproute2" "$ROOT/etc/"

install -m 0755 "$DEBROOT/bin/busybox" "$ROOT/bin/busybox"
for prog in "${PROGRAMS[@]}"; do
    src=$DEBROOT/$prog
    [ -f "$src" ] || die "$prog not found in the unpacked packages"
    install -D -m 0755 "$src" "$ROOT/$prog"
done
ln -s ../bin/ip "$ROOT/sbin/ip"
ln -s dash "$ROOT/bin/sh"
install -m 0755 "$WORK/enilab-agent" "$ROOT/sbin/enilab-agent"
# busybox applets for everything the real packages did not provide
while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] && continue
    [ -e "$ROOT/bin/$(basename "$applet")" ] || [ -e "$ROOT/sbin/$(basename "$applet")" ] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -s /bin/busybox "$ROOT/$applet"
done < <("$ROOT/bin/busybox" --list-full)

# Shared libraries: from the unpacked packages first, the host otherwise
# (libc, libcrypto...). ldd follows the whole dependency tree.
: > "$WORK/host-libs.txt"
declare -A COPIED
copy_lib() { # $1 resolved path, $2 destination inside ROOT
    local src=$1 dst=$2
    [ -n "${COPIED[$dst]:-}" ] && return 0
    COPIED[$dst]=1
    mkdir -p "$ROOT/$(dirname "$dst")"
    cp -L "$src" "$ROOT/$dst"
    case "$src" in "$DEBROOT"/*) ;; *) echo "$(readlink -f "$src")" >> "$WORK/host-libs.txt" ;; esac
}
LDPATH="$DEBROOT/usr/lib/$MULTIARCH:$DEBROOT/lib/$MULTIARCH"
while read -r elf; do
    out=$(LD_LIBRARY_PATH=$LDPATH ldd "$elf" 2>&1) || true
    case "$out" in *"not a dynamic executable"*|*"statically linked"*) continue ;; esac
    if grep -q "not found" <<<"$out"; then
        die "missing shared library for ${elf#"$ROOT"/}: $(grep 'not found' <<<"$out" | tr -s '\t ' ' ')"
    fi
    while read -r line; do
        case "$line" in
            *"=> /"*)
                lib=$(sed -E 's/.*=> ([^ ]+) .*/\1/' <<<"$line")
                copy_lib "$lib" "lib/$MULTIARCH/$(basename "$lib")" ;;
            /*)
                interp=$(cut -d' ' -f1 <<<"$line")
                copy_lib "$interp" "${interp#/}" ;;
        esac
    done <<<"$out"
done < <(find "$ROOT/bin" "$ROOT/sbin" "$ROOT/usr/bin" "$ROOT/usr/sbin" -type f)
sort -u -o "$WORK/host-libs.txt" "$WORK/host-libs.txt"
note "$(find "$ROOT/lib" "$ROOT/lib64" -name '*.so*' | wc -l) shared libraries ($(wc -l < "$WORK/host-libs.txt") from the host)"

# Kernel modules, in load order.
MODDIR=$MODBASE/$KVER
depmod -b "${MODBASE%/lib/modules}" "$KVER"
declare -A SEEN
ORDER=()
mod_path() { # module name -> path relative to MODDIR (dash and underscore alike)
    local pat=${1//[-_]/[-_]}
    grep -oE "^([^:]*/)?${pat}\.ko(\.(xz|gz|zst))?:" "$MODDIR/modules.dep" | head -n1 | tr -d ':'
}
visit() { # $1 path relative to MODDIR
    local deps d i
    [ -n "${SEEN[$1]:-}" ] && return 0
    SEEN[$1]=1
    read -r -a deps <<<"$(grep -E "^$1:" "$MODDIR/modules.dep" | cut -d: -f2)"
    # modules.dep lists dependencies so that the last one loads first
    for ((i=${#deps[@]}-1; i>=0; i--)); do d=${deps[$i]}; visit "$d"; done
    ORDER+=("$1")
}
for m in "${MODULES[@]}"; do
    if p=$(mod_path "$m") && [ -n "$p" ]; then
        visit "$p"
    elif grep -qE "/${m//[-_]/[-_]}\.ko" "$MODDIR/modules.builtin"; then
        note "module $m is built into the kernel"
    else
        die "kernel module $m not found in $KPKG"
    fi
done
: > "$ROOT/etc/enilab/modules"
for p in "${ORDER[@]}"; do
    dst=$ROOT/lib/modules/$KVER/$p
    mkdir -p "$(dirname "$dst")"
    case "$p" in
        *.ko.xz)  xz -dc "$MODDIR/$p" > "${dst%.xz}"; p=${p%.xz} ;;
        *.ko.gz)  gzip -dc "$MODDIR/$p" > "${dst%.gz}"; p=${p%.gz} ;;
        *.ko.zst) zstd -qdc "$MODDIR/$p" > "${dst%.zst}"; p=${p%.zst} ;;
        *)        cp "$MODDIR/$p" "$dst" ;;
    esac
    echo "$p" >> "$ROOT/etc/enilab/modules"
done
cp "$MODDIR/modules.builtin" "$MODDIR/modules.order" "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
[ -f "$MODDIR/modules.builtin.modinfo" ] && cp "$MODDIR/modules.builtin.modinfo" "$ROOT/lib/modules/$KVER/"
depmod -b "$ROOT" "$KVER" 2>/dev/null || true
note "modules: $(sed 's#.*/##; s#\.ko$##' "$ROOT/etc/enilab/modules" | tr '\n' ' ')"

# /init and the rest of the hand-written files
cp -a "$HERE/rootfs/." "$ROOT/"
chmod 0755 "$ROOT/init"
cat > "$ROOT/etc/enilab/image" <<EOF
cache_key=$KEY
kernel=$KVER
agent_sha256=$AGENT_SHA
EOF
# The kernel opens /dev/console before /init runs; needs root to create.
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || note "no /dev/console node (not root); /init reopens it"

# --- 9. pack ------------------------------------------------------------------
step 9 "packing initramfs.img"
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -n -6 > "$OUT/initramfs.img.new"
cp -f "$VMLINUZ" "$OUT/vmlinuz.new"
mv -f "$OUT/initramfs.img.new" "$OUT/initramfs.img"
mv -f "$OUT/vmlinuz.new" "$OUT/vmlinuz"

# host libraries: recorded for the manifest and checked on the next run
: > "$OUT/host-libs.sha256.new"
HOSTLIBS_JSON=""
while read -r lib; do
    [ -n "$lib" ] || continue
    h=$(sha "$lib")
    echo "$h  $lib" >> "$OUT/host-libs.sha256.new"
    owner=$(dpkg -S "$lib" 2>/dev/null | head -n1 | cut -d: -f1 || true)
    [ -n "$owner" ] || owner=$(dpkg -S "${lib#/usr}" 2>/dev/null | head -n1 | cut -d: -f1 || true)
    over=""
    [ -n "$owner" ] && over=$(dpkg-query -W -f='${Version}' "$owner" 2>/dev/null || true)
    HOSTLIBS_JSON+="${HOSTLIBS_JSON:+,}
    {\"path\": \"$lib\", \"package\": \"$owner\", \"version\": \"$over\", \"sha256\": \"$h\"}"
done < "$WORK/host-libs.txt"
mv -f "$OUT/host-libs.sha256.new" "$OUT/host-libs.sha256"

PKG_JSON=""
for p in "${PACKAGES[@]}"; do PKG_JSON+="${PKG_JSON:+,}
    \"$p\": \"${VER[$p]}\""; done
MOD_JSON=""
while read -r m; do MOD_JSON+="${MOD_JSON:+, }\"$m\""; done < "$ROOT/etc/enilab/modules"
size() { stat -c %s "$1"; }
cat > "$OUT/manifest.json.new" <<EOF
{
  "format": $FORMAT,
  "cache_key": "$KEY",
  "kernel": {"package": "$KPKG", "version": "${VER[$KPKG]}", "release": "$KVER"},
  "packages": {$PKG_JSON
  },
  "modules": [$MOD_JSON],
  "host_libraries": [$HOSTLIBS_JSON
  ],
  "agent": {"sha256": "$AGENT_SHA", "path": "/sbin/enilab-agent"},
  "files": {
    "vmlinuz": {"sha256": "$(sha "$OUT/vmlinuz")", "size": $(size "$OUT/vmlinuz")},
    "initramfs.img": {"sha256": "$(sha "$OUT/initramfs.img")", "size": $(size "$OUT/initramfs.img")}
  },
  "cmdline": "console=ttyS0 panic=-1"
}
EOF
mv -f "$OUT/manifest.json.new" "$OUT/manifest.json"
rm -rf "$DEBROOT"
echo "image built: $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1)), $OUT/initramfs.img ($(du -h "$OUT/initramfs.img" | cut -f1)), cache key ${KEY:0:16}"
