#!/usr/bin/env bash
# Release tinysamd, tinysam and tinysam-ros2 for aarch64 (Raspberry Pi 4/5, Jetson), runnable on glibc >= 2.31.
#   bash cross/build.sh        -> target/aarch64-unknown-linux-gnu/release/{tinysamd,tinysam,tinysam-ros2}
set -euo pipefail
source "$(dirname "$0")/env.sh"
cross_setup
cd "$ROOT"
start=$(date +%s)
# The VM camera test needs the control example beside the binaries.
cargo-zigbuild zigbuild --release --locked --target "$ZIG_TARGET" --bins --example v4l2_control
echo "built in $(( $(date +%s) - start )) s"
dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/$TARGET/release
for bin in tinysamd tinysam tinysam-ros2; do
    max=$(aarch64-linux-gnu-objdump -T "$dir/$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
    size=$(du -h "$dir/$bin" | cut -f1)
    aarch64-linux-gnu-strip -o "$dir/$bin.stripped" "$dir/$bin"
    stripped=$(stat -c %s "$dir/$bin.stripped")
    echo "$dir/$bin: $(file -b "$dir/$bin" | cut -d, -f1-2), $size ($((stripped / 1048576)) MiB stripped), needs $max"
    if [ "$(printf '%s\n' "GLIBC_$GLIBC" "$max" | sort -V | tail -n 1)" != "GLIBC_$GLIBC" ]; then
        echo "error: $bin needs $max, more than glibc $GLIBC" >&2
        exit 1
    fi
done
