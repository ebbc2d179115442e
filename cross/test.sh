#!/usr/bin/env bash
# The library and integration tests built for aarch64 (same zig/glibc-2.31 build as the release
# binaries) and run under qemu-aarch64, once as a Cortex-A76 (Pi 5: tract picks the SDOT int8
# kernels) and once as a Cortex-A53 (no dot product: plain NEON kernels).
#
# Left out under emulation, and run natively by tests/run-all.sh: tests that spawn the binaries
# (cli::, tinysamd::: qemu-user cannot exec a second foreign binary without binfmt_misc) and the
# timing-sensitive daemon tests (daemon::, wire::: latency and frame-drop bounds assume real time).
#
# The Cortex-A76 runs everything else. The Cortex-A53 runs what depends on the CPU: kernel
# selection and the int8 kernels (the lib's model:: tests, qmatmul's among them, and kernels::),
# and parity with the recorded tolerances (parity::, everything::). What is left (pixel formats,
# RLE, prompts, protocol, config, bad input) is plain Rust whose result is the same on any
# aarch64 core; it runs on the A76.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cross_setup
cd "$ROOT"
skip=(--skip cli:: --skip tinysamd:: --skip daemon:: --skip wire::)
# libtest filters: a test runs when its path contains any of them.
a53_only=(model:: kernels:: parity:: everything::)
start=$(date +%s)
cargo-zigbuild test --release --locked --target "$ZIG_TARGET" --no-run
echo "aarch64 test build: $(( $(date +%s) - start )) s"
for cpu in ${CPUS:-cortex-a76 cortex-a53}; do
    filters=()
    [ "$cpu" = cortex-a53 ] && filters=("${a53_only[@]}")
    echo "== qemu-aarch64 -cpu $cpu ${filters[*]:-(all)}"
    start=$(date +%s)
    log=$(mktemp)
    status=0
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L $SYSROOT" \
        cargo-zigbuild test --release --locked --target "$ZIG_TARGET" -- "${skip[@]}" --nocapture \
        "${filters[@]}" >"$log" 2>&1 || status=$?
    grep -E '^(test result|aarch64 |failures|---- )|panicked|FAILED' "$log" || true
    [ "$status" -eq 0 ] || tail -n 40 "$log"
    echo "$cpu: $(( $(date +%s) - start )) s"
    [ "$status" -eq 0 ] || exit "$status"
done
