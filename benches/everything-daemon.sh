#!/usr/bin/env bash
# Issue 18's third target: how long a daemon subscriber to segment-everything waits for its first
# result, against `tinysam segment --everything` on the same frame. Starts tinysamd on a file
# source (the frame looped at FPS frames per second, default model, 2 threads), subscribes with
# `tinysam sub --everything --count 1`, and times it. Writes benches/everything-daemon-results.md.
#
#   bash benches/everything-daemon.sh            # FPS values: 1 and 0.2
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
IMAGE=tests/fixtures/golden/frame.png
[ -f ../shared/images/tinysam-picture2.jpg ] && IMAGE=../shared/images/tinysam-picture2.jpg
OUT=benches/everything-daemon-results.md
SOCK=$(mktemp -u /tmp/tinysam-everything.XXXXXX.sock)
LOG=$(mktemp)
trap 'pkill -f "tinysamd --source file:$IMAGE --socket $SOCK" 2>/dev/null || true; rm -f "$LOG"' EXIT

first_result() { # FPS -> seconds from subscribing to the first everything result
    ./target/release/tinysamd --source "file:$IMAGE" --socket "$SOCK" --threads 2 --fps "$1" \
        >"$LOG" 2>&1 &
    local daemon=$!
    for _ in $(seq 1 60); do grep -q "serving on" "$LOG" && break; sleep 1; done
    local start end
    start=$(date +%s.%N)
    ./target/release/tinysam sub --socket "$SOCK" --everything --count 1 --timeout 600 >/dev/null
    end=$(date +%s.%N)
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    echo "$end - $start" | bc
}

{
    echo "# Segment-everything through the daemon"
    echo
    echo "Made by \`bash benches/everything-daemon.sh\` on $(date -u +%Y-%m-%d) (git $(git rev-parse --short HEAD)),"
    echo "default model (synthetic weights), image \`$IMAGE\` looped by a file source, 2 threads."
    echo
    echo "| what | seconds |"
    echo "|---|---|"
    start=$(date +%s.%N)
    ./target/release/tinysam segment "$IMAGE" --everything --threads 2 --out target/everything-daemon/alone >/dev/null 2>&1
    end=$(date +%s.%N)
    echo "| \`tinysam segment --everything\` alone (load, encode, everything) | $(echo "$end - $start" | bc) |"
    for fps in 1 0.2; do
        echo "| daemon at $fps fps: subscribe to first everything result | $(first_result "$fps") |"
    done
} >"$OUT"
echo "wrote $OUT"
