#!/usr/bin/env bash
# Build the .deb (cargo-deb, stripped) from the release binaries already built, then check its
# contents and run the packaged daemon from the extracted tree with the packaged model.
#   bash debian/check.sh [--target aarch64-unknown-linux-gnu]   (cross: contents only)
set -euo pipefail
cd "$(dirname "$0")/.."
# Installed once per machine (~/.cargo/bin), a pinned version so every machine packages alike;
# without its liblzma and ELF-parsing features (C code and crates to compile on every fresh CI
# machine): the check below compresses with the system's gzip. A debug build (`--debug`): it
# compiles in 20 s instead of ~40-80 s on a fresh machine, and packages as fast, since its work is
# copying files and running the system's strip, gzip or xz (tests/TIMINGS.md, 2026-12-05).
command -v cargo-deb >/dev/null ||
    cargo install cargo-deb --version 3.8.0 --locked --quiet --no-default-features --debug
# The check packages with `gzip -1` (`--fast -Z gz --compress-system`): the same files, control
# data and maintainer scripts as a release package (`cargo deb`, xz), but ~3 s to compress the
# default model's 74 MB of incompressible float weights instead of 40-100 s (tests/TIMINGS.md).
deb=$(cargo deb --no-build --strip --fast -Z gz --compress-system "$@" 2>/dev/null | tail -n 1)
echo "built $deb ($(du -h "$deb" | cut -f1))"
contents=$(dpkg-deb -c "$deb")
for f in usr/bin/tinysamd usr/bin/tinysam usr/bin/tinysam-ros2 etc/tinysamd/config.toml \
    lib/systemd/system/tinysamd.service lib/systemd/system/tinysam-ros2.service \
    usr/share/tinysam-edge/model/manifest.json \
    usr/share/tinysam-edge/model/encoder.int8.onnx; do
    # cargo-deb puts units under usr/lib on merged-/usr systems.
    alt=${f/#lib\/systemd/usr/lib/systemd}
    if ! grep -q -e "\./$f\$" -e "\./$alt\$" <<<"$contents"; then
        echo "missing from the package: $f"; exit 1
    fi
done
dpkg-deb -f "$deb" Depends
if [ "$#" -gt 0 ]; then exit 0; fi
root=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
# The packaged config, with the packaged model (its files' SHA-256 are checked) and the test
# pattern in place of the device's camera.
"$root/usr/bin/tinysamd" --config "$root/etc/tinysamd/config.toml" --check-config \
    --model "$root/usr/share/tinysam-edge/model" --source synthetic >/dev/null
# The bridge reads the same file (its [ros2] table and the socket).
"$root/usr/bin/tinysam-ros2" --config "$root/etc/tinysamd/config.toml" --check-config >/dev/null
"$root/usr/bin/tinysamd" --model "$root/usr/share/tinysam-edge/model" --source synthetic \
    --socket "$root/d.sock" --stats-interval 0 2>"$root/log" &
pid=$!
for _ in $(seq 1 600); do [ -S "$root/d.sock" ] && break; sleep 0.1; done
# Captured, then searched: `| grep -q` would close the pipe while the status is still printing.
status=$("$root/usr/bin/tinysam" sub --socket "$root/d.sock" --status)
grep -q '"encoder": "int8"' <<<"$status"
kill -TERM "$pid"; wait "$pid"
echo "packaged daemon ran with the packaged model"
