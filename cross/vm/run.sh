#!/usr/bin/env bash
# A real V4L2 camera in a VM: boots Debian 12's own kernel under qemu-system (TCG) with a busybox
# initramfs that loads the `vivid` virtual camera, then runs our daemon on /dev/video0 with the
# test-size model and a subscriber, and injects faults (vivid's Disconnect button; driver unbind +
# rmmod + insmod). The VM's init (cross/vm/init) reports on the console; this script checks it.
#
#   bash cross/vm/run.sh aarch64   # the cross-built aarch64 binaries (cross/build.sh, run if missing)
#   bash cross/vm/run.sh x86_64    # the host release binaries (built if missing)
#
# Downloads (Debian packages): the kernel, busybox-static, and QEMU's system emulators, which are
# unpacked rather than installed, so the host's own QEMU packages are left alone; their shared
# libraries are installed with apt. They are kept outside the work tree, in
# $TINYSAM_CACHE (default ~/.cache/tinysam-edge), so a fresh clone on the same machine reuses
# them; of the kernel package only the kernel image and the media driver modules are unpacked.
# The initramfs and the console log go to target/vm/ (under CARGO_TARGET_DIR if set).
set -euo pipefail
ARCH=${1:?usage: run.sh aarch64|x86_64}
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$(dirname "$VM_DIR")")
CACHE=${TINYSAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tinysam-edge}/vm
# Where cargo puts its builds (CARGO_TARGET_DIR and cargo's config honoured).
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}
WORK=$TARGET_DIR/vm
mkdir -p "$CACHE" "$WORK"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
case "$ARCH" in
    aarch64)
        DEB_ARCH=arm64
        BIN_DIR=$TARGET_DIR/aarch64-unknown-linux-gnu/release
        STRIP=aarch64-linux-gnu-strip
        READELF=aarch64-linux-gnu-readelf
        LIB_DIRS=(/usr/aarch64-linux-gnu/lib)
        # The Pi 5's core: tract must pick the SDOT kernels a Pi has, not SVE ones (`-cpu max`).
        QEMU=(qemu-system-aarch64 -M virt -cpu cortex-a76)
        CONSOLE=ttyAMA0
        ;;
    x86_64)
        DEB_ARCH=amd64
        BIN_DIR=$TARGET_DIR/release
        STRIP=strip
        READELF=readelf
        LIB_DIRS=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu)
        QEMU=(qemu-system-x86_64 -M q35 -cpu max)
        CONSOLE=ttyS0
        ;;
    *) echo "unknown architecture $ARCH (aarch64 or x86_64)" >&2; exit 2 ;;
esac

# The binaries first, built here if missing (cargo does nothing when they are up to date), so
# that a failed build stops the test before any download (VM_FETCH_ONLY needs none).
binaries_missing() {
    local bin
    for bin in tinysamd tinysam examples/v4l2_control; do
        [ -x "$BIN_DIR/$bin" ] || return 0
    done
    return 1
}
if [ "${VM_FETCH_ONLY:-0}" != 1 ] && binaries_missing; then
    # VM_NO_BUILD=1: fail at once instead of building.
    if [ "${VM_NO_BUILD:-0}" = 1 ]; then
        echo "missing binaries in $BIN_DIR (tinysamd, tinysam, examples/v4l2_control) and VM_NO_BUILD=1" >&2
        exit 1
    fi
    echo "building the $ARCH binaries the VM runs"
    if [ "$ARCH" = aarch64 ]; then
        bash "$ROOT/cross/build.sh"
    else
        (cd "$ROOT" && cargo build --release --locked --bins --example v4l2_control)
    fi
    if binaries_missing; then
        echo "the build left binaries missing in $BIN_DIR (tinysamd, tinysam, examples/v4l2_control)" >&2
        exit 1
    fi
fi

# apt with its own package lists for one Debian architecture; nothing on the host changes.
private_apt() { # DEB_ARCH apt-get|apt-cache ARGS...
    local arch=$1 tool=$2 dir=$CACHE/apt-$1
    shift 2
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    touch "$dir/status"
    "$tool" -q -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" \
        -o Dir::State::status="$dir/status" -o APT::Architecture="$arch" \
        -o APT::Architectures::="$arch" -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

# Download PACKAGES for DEB_ARCH and unpack them into DIR/root (once); with PATHS (tar
# patterns, after a `--`), only those paths of each package.
fetch() { # DEB_ARCH DIR PACKAGES... [-- PATHS...]
    local arch=$1 dir=$2 packages=() paths=()
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do packages+=("$1"); shift; done
    [ $# -gt 0 ] && shift && paths=("$@")
    local want="${packages[*]} -- ${paths[*]}"
    [ "$(cat "$dir/.done" 2>/dev/null)" = "$want" ] && return 0
    [ -f "$CACHE/apt-$arch/.updated" ] || {
        private_apt "$arch" apt-get update >/dev/null
        touch "$CACHE/apt-$arch/.updated"
    }
    rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root"
    (cd "$dir/debs" && private_apt "$arch" apt-get download "${packages[@]}" >/dev/null)
    for deb in "$dir"/debs/*.deb; do
        if [ ${#paths[@]} -gt 0 ]; then
            # A pattern that matches nothing in one package is fine: another package has it.
            dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir/root" --wildcards "${paths[@]}" 2>/dev/null || true
        else
            dpkg-deb -x "$deb" "$dir/root"
        fi
    done
    echo "$want" >"$dir/.done"
}

# QEMU's system emulators for this host, unpacked; their libraries installed.
HOST_ARCH=$(dpkg --print-architecture)
fetch "$HOST_ARCH" "$CACHE/qemu" qemu-system-arm qemu-system-x86 qemu-system-common qemu-system-data seabios
missing=()
for deb in "$CACHE"/qemu/debs/qemu-system-{arm,x86}_*.deb; do
    for dep in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/([^)]*)//; s/|.*//; s/ //g'); do
        case "$dep" in qemu-* | seabios | ipxe-qemu) continue ;; esac
        dpkg -s "$dep" >/dev/null 2>&1 || missing+=("$dep")
    done
done
for tool in cpio:cpio depmod:kmod; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
QEMU_ROOT=$CACHE/qemu/root
# The x86 emulator loads TCG itself as a module.
export QEMU_MODULE_DIR=$QEMU_ROOT/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)/qemu
QEMU[0]=$QEMU_ROOT/usr/bin/${QEMU[0]}

# The guest's kernel (Debian's current linux-image for the architecture) and busybox.
GUEST=$CACHE/guest-$DEB_ARCH
if [ ! -s "$GUEST/.done" ]; then
    mkdir -p "$CACHE/apt-$DEB_ARCH"
    [ -f "$CACHE/apt-$DEB_ARCH/.updated" ] || {
        private_apt "$DEB_ARCH" apt-get update >/dev/null
        touch "$CACHE/apt-$DEB_ARCH/.updated"
    }
    kernel_pkg=$(private_apt "$DEB_ARCH" apt-cache depends "linux-image-$DEB_ARCH" |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
    # The kernel image and the media drivers (vivid and everything it depends on are under
    # drivers/media), with the lists depmod reads; not the package's other ~4000 modules.
    fetch "$DEB_ARCH" "$GUEST" "$kernel_pkg" busybox-static -- './boot/vmlinuz-*' \
        './lib/modules/*/kernel/drivers/media/*' './lib/modules/*/modules.order' \
        './lib/modules/*/modules.builtin*' './bin/busybox'
fi
KVER=$(basename "$(ls -d "$GUEST"/root/lib/modules/*)")
KERNEL=$GUEST/root/boot/vmlinuz-$KVER
for f in "$KERNEL" "$GUEST/root/bin/busybox"; do
    [ -s "$f" ] || { echo "$f missing from the unpacked packages (delete $GUEST and retry)" >&2; exit 1; }
done

# VM_FETCH_ONLY=1: stop after the downloads (the test command fetches both architectures first,
# then boots the two VMs side by side).
[ "${VM_FETCH_ONLY:-0}" = 1 ] && { echo "$ARCH VM: downloads ready in $CACHE"; exit 0; }

# The initramfs: busybox, init, vivid and its dependencies, our binaries and their libraries,
# the test model.
INITRD_DIR=$WORK/initrd-$ARCH
rm -rf "$INITRD_DIR" && mkdir -p "$INITRD_DIR"/{bin,lib/modules,proc,sys,dev,run,tmp}
cp "$GUEST/root/bin/busybox" "$INITRD_DIR/bin/"
install -m 755 "$VM_DIR/init" "$INITRD_DIR/init"
for bin in tinysamd tinysam examples/v4l2_control; do
    $STRIP -o "$INITRD_DIR/bin/$(basename "$bin")" "$BIN_DIR/$bin"
done
cp -r "$ROOT/tests/fixtures/test_model" "$INITRD_DIR/model"

depmod -b "$GUEST/root" "$KVER"
: >"$INITRD_DIR/lib/modules/order"
while read -r _ path _; do
    name=$(basename "$path")
    cp "$path" "$INITRD_DIR/lib/modules/"
    [ "$name" = vivid.ko ] || echo "$name" >>"$INITRD_DIR/lib/modules/order"
done < <(modprobe -d "$GUEST/root" -S "$KVER" --show-depends vivid | grep '^insmod')

# Shared libraries, found recursively from the binaries' DT_NEEDED entries.
needed() { $READELF -d "$1" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'; }
interp=$($READELF -l "$INITRD_DIR/bin/tinysamd" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')
queue=($(for b in "$INITRD_DIR"/bin/tinysam*; do needed "$b"; done | sort -u))
while [ ${#queue[@]} -gt 0 ]; do
    lib=${queue[0]}
    queue=("${queue[@]:1}")
    [ -e "$INITRD_DIR/lib/$lib" ] && continue
    src=""
    for d in "${LIB_DIRS[@]}"; do [ -e "$d/$lib" ] && src=$d/$lib && break; done
    [ -n "$src" ] || { echo "library $lib not found in ${LIB_DIRS[*]}" >&2; exit 1; }
    cp -L "$src" "$INITRD_DIR/lib/$lib"
    queue+=($(needed "$INITRD_DIR/lib/$lib"))
done
mkdir -p "$INITRD_DIR/$(dirname "$interp")"
[ -e "$INITRD_DIR$interp" ] || cp -L "${LIB_DIRS[0]}/$(basename "$interp")" "$INITRD_DIR$interp"

INITRD=$WORK/initrd-$ARCH.cpio
(cd "$INITRD_DIR" && find . | cpio -o -H newc --quiet) >"$INITRD"
echo "$ARCH VM: kernel $KVER, initramfs $(( $(stat -c %s "$INITRD") / 1048576 )) MiB, modules: $(tr '\n' ' ' <"$INITRD_DIR/lib/modules/order")vivid.ko"

LOG=$WORK/vm-$ARCH.log
start=$(date +%s)
status=0
timeout "${VM_TIMEOUT:-900}" "${QEMU[@]}" -smp 2 -m 2048 -nographic -no-reboot -nic none \
    -L "$QEMU_ROOT/usr/share/qemu" -L "$QEMU_ROOT/usr/share/seabios" \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=$CONSOLE rdinit=/init panic=-1 quiet loglevel=3 FORMATS=${FORMATS:-yuyv,nv12,rgb24}" \
    </dev/null >"$LOG" 2>&1 || status=$?
took=$(( $(date +%s) - start ))
grep -ao 'VMTEST.*' "$LOG" | tr -d '\r' || true
echo "$ARCH VM: $took s (log: $LOG)"
if [ "$status" -ne 0 ]; then
    echo "error: qemu exited with status $status" >&2
    tail -n 30 "$LOG" >&2
    exit 1
fi
if grep -aq 'VMTEST FAIL' "$LOG" || ! grep -aq 'VMTEST done' "$LOG"; then
    echo "error: the $ARCH VM camera test failed; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
fi
