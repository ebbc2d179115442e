#!/usr/bin/env bash
# Our f32 product micro-kernels (src/model/ops/gemm.rs) alone: a 4096 x 256 x 256 product in
# tiles of 16 rows, on one core, AVX-512 and AVX2 forms (x86_64 only), three runs each.
# Writes benches/gemm-results.md (committed) with the command.
#
#   bash benches/gemm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/gemm-results.md
CMD=(cargo test --release --locked --quiet --lib gemm_speed -- --ignored --nocapture)
{
    echo "# f32 product micro-kernels"
    echo
    echo "Made by \`bash benches/gemm.sh\` on $(date -u +%Y-%m-%d) (git $(git rev-parse --short HEAD)),"
    echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), one thread."
    echo "One core's f32 peak is 2 FMA x 16 lanes per cycle with AVX-512 (8 with AVX2) at its clock."
    echo
    echo "\`${CMD[*]}\`"
    echo
    echo '```'
    "${CMD[@]}" 2>&1 | grep -E "GMAC/s"
    echo '```'
} >"$OUT"
echo "wrote $OUT"
