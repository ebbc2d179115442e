#!/usr/bin/env bash
# End-to-end benchmark of the daemon (issue: tinysamd): synthetic 640x480 camera at 5 fps, the
# shipped default model, one subscriber with a standing point prompt, 2 threads; INT8 encoder
# (the default) and FP32 encoder side by side. Writes benches/daemon-results.md (committed).
#
#   bash benches/daemon.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
OUT=benches/daemon-results.md
{
    echo "# Daemon end-to-end results"
    echo
    echo "Made by \`bash benches/daemon.sh\` on $(date -u +%Y-%m-%d) (git $(git rev-parse --short HEAD))"
    echo "on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
    echo "Latency is capture timestamp (CLOCK_MONOTONIC) to the subscriber's receipt of the masks;"
    echo "\"model time\" is the encoder's plus the decoder's median; the rest (queue wait for the"
    echo "encoder, preprocessing, mask upsampling, RLE, socket) is the overhead."
    echo
    for enc in int8 fp32; do
        frames=4; [ "$enc" = fp32 ] && frames=8
        echo "## Encoder $enc"
        echo
        ./target/release/tinysam bench --daemon --model models/default --precisions "$enc" \
            --threads 2 --runs "$frames" --daemon-fps 5 2>/dev/null
        echo
    done
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
