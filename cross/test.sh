#!/usr/bin/env bash
# The library and integration tests built for aarch64 (same zig/glibc-2.31 build as the release
# binaries) and run under qemu-aarch64, once as a Cortex-A76 (Pi 5: tract picks the SDOT int8
# kernels) and once as a Cortex-A53 (no dot product: plain NEON kernels).
#
# Left out under emulation, and run natively by tests/run-all.sh: tests that spawn the binaries
# (cli::, tinysamd::: qemu-user cannot exec a second foreign binary without binfmt_misc) and the
# timing-sensitive daemon tests (daemon::, wire::: latency and frame-drop bounds assume real time).
# Also left out: parity::prepared_plans_leave_nothing_to_build_while_serving, which checks which
# decoder plans the daemon builds at start (bookkeeping that is the same Rust on every
# architecture) by building ~30 of them, one tract optimisation each: 92 s of the Cortex-A76's
# 158 s of integration tests (--report-time, 2026-12-04). On aarch64 the plans are still built
# and served by the VM camera test's daemon (cross/vm), and every decode test builds its own.
# Two more that check Rust with no architecture-specific code, on x86 only (--report-time under
# qemu, 2026-12-04): the two integration tests of everything:: (22 s: the point grid, the
# hierarchical skip rule and the mask cleanup, over decoder outputs that parity:: checks on
# aarch64) and the row gathers' fixture encoders (20 s: a copy op, whose unit test checks the
# gathers bit for bit under qemu too). And the low-rank mask upscaling against the full-rank one
# on the default model (300 s under qemu, 2026-12-04: two decoders of the default model built and
# run 12 times each): the same comparison on the fixture runs here, on the same kernels. And the
# ROS 2 bridge's daemon link against an in-process daemon (socket and thread Rust, timing-bound
# like daemon::; its conversions' unit tests run here). And the split decoder's profile (which
# plans `tinysam bench --profile` runs: plan bookkeeping, like the plans test above).
#
# The Cortex-A76 runs everything else, our kernels for both kinds of core among it: the kernel
# tests run every kernel the CPU supports, and an A76 supports the portable ones as well as the
# SDOT ones. The Cortex-A53 runs what only a core without the dot product shows: which kernels
# are picked (the lib's detection test and kernels::, which run the models and list the kernels
# that ran) and the models' outputs on those kernels, tract's non-dot ones included (parity of
# the INT8 and FP32 encoders and decoders with onnxruntime's recorded outputs).
#
#   bash cross/test.sh            # build, then run under both CPUs
#   bash cross/test.sh --no-run   # build only (tests/run-all.sh builds while the x86 suites run)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cross_setup
cd "$ROOT"
skip=(--skip cli:: --skip tinysamd:: --skip daemon:: --skip wire::
    --skip parity::prepared_plans_leave_nothing_to_build_while_serving
    --skip parity::split_decoder_profile_runs_the_plans_decode_runs
    --skip everything::hierarchical_skips_exactly_the_done_points
    --skip everything::small_region_cleanup_keeps_masks_consistent
    --skip row_gather::tests::the_fixture_encoders_keep_their_embeddings
    --skip low_rank_upscaling_matches_full_rank_on_the_default_model
    --skip ros2::bridge_publishes_answers_refuses_and_reconnects)
# libtest filters: a test runs when its path contains any of them.
a53_only=(kernels:: parity::fp32_matches_onnxruntime parity::int8_matches_onnxruntime
    detection_picks_a_supported_one)
start=$(date +%s)
cargo-zigbuild test --release --locked --target "$ZIG_TARGET" --no-run
echo "aarch64 test build: $(( $(date +%s) - start )) s"
[ "${1:-}" = --no-run ] && exit 0
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
