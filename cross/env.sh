# Sourced by cross/build.sh and cross/test.sh: the aarch64 toolchain, installed on first use.
#   - rustup target aarch64-unknown-linux-gnu
#   - zig + cargo-zigbuild from PyPI (in cross/.venv): links against glibc 2.31 stubs, so the
#     binaries run on Jetson JetPack 5 (Ubuntu 20.04, glibc 2.31), Pi OS bookworm (2.36), ...
#   - Debian's qemu-user and the arm64 glibc (libc6-arm64-cross) to run the tests here.
CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$CROSS_DIR")
TARGET=aarch64-unknown-linux-gnu
GLIBC=2.31
ZIG_TARGET=$TARGET.$GLIBC
SYSROOT=/usr/aarch64-linux-gnu

cross_setup() {
    rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
    local missing=()
    # libc6-dev-arm64-cross brings linux-libc-dev-arm64-cross: the arm64 videodev2.h bindgen reads.
    for p in qemu-user libc6-arm64-cross libc6-dev-arm64-cross linux-libc-dev-arm64-cross \
        libgcc-s1-arm64-cross libclang-dev binutils-aarch64-linux-gnu; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    fi
    if [ ! -x "$CROSS_DIR/.venv/bin/cargo-zigbuild" ]; then
        python3 -m venv "$CROSS_DIR/.venv"
        if command -v uv >/dev/null; then
            uv pip install -q --python "$CROSS_DIR/.venv/bin/python" ziglang cargo-zigbuild
        else
            "$CROSS_DIR/.venv/bin/pip" install -q ziglang cargo-zigbuild
        fi
    fi
    export PATH="$CROSS_DIR/.venv/bin:$PATH"
    # bindgen (v4l's videodev2.h bindings) needs arm64 kernel and libc headers, which zig's
    # sysroot does not give libclang: point clang at Debian's arm64 cross headers. (Only .S files
    # are compiled as C-family code besides, and the GLIBC version check in build.sh guards the
    # result.) Set identically for build and test, so nothing rebuilds between them.
    export CPATH="$SYSROOT/include"
}
