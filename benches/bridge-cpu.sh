#!/usr/bin/env bash
# CPU the ROS 2 bridge spends per published frame over Zenoh: tinysamd (fixture model, 1 thread)
# plays a 1280x720 still at 4 fps with a standing point prompt; tinysam-ros2 --transport zenoh
# publishes each result to the rmw_zenoh-style test peer (tests/ros2/zenoh_peer.py) through a
# router on 127.0.0.1. The bridge's user+system ticks over 20 s (after 8 s of warm-up) divided by
# the label images the peer received; then the same with --overlay. Needs models/.venv (the test
# command makes it). Prints the figures; commit them with the command that made them.
#
#   bash benches/bridge-cpu.sh [IMAGE]     (default: ../shared/images/tinysam-picture2.jpg)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-../shared/images/tinysam-picture2.jpg}
PY=$PWD/models/.venv/bin/python
B=$PWD/target/release
cargo build --release --locked --bins >/dev/null 2>&1
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
"$PY" -c "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').resize((1280, 720)).save(sys.argv[2])" \
    "$IMAGE" "$WORK/frame.png"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

run() {
    local d=$WORK/run$1; shift
    mkdir -p "$d"
    "$B/tinysamd" --model tests/fixtures/test_model --source "file:$WORK/frame.png" --fps 4 \
        --threads 1 --socket "$d/d.sock" 2>"$d/d.log" &
    local daemon=$!
    (cd tests/ros2 && exec "$PY" zenoh_peer.py --router "tcp/127.0.0.1:$PORT") 2>"$d/r.log" &
    local router=$!
    (cd tests/ros2 && exec "$PY" zenoh_peer.py --connect "tcp/127.0.0.1:$PORT" --out "$d/peer") 2>"$d/p.log" &
    local peer=$!
    for _ in $(seq 100); do [ -S "$d/d.sock" ] && break; sleep 0.1; done
    "$B/tinysam-ros2" --socket "$d/d.sock" --transport zenoh --zenoh-router "tcp/127.0.0.1:$PORT" \
        --point 300,200 "$@" 2>"$d/b.log" &
    local bridge=$!
    sleep 8
    local t0 n0 t1 n1
    t0=$(awk '{print $14 + $15}' "/proc/$bridge/stat")
    n0=$(grep -c '"masks"' "$d/peer/messages.jsonl" || true)
    sleep 20
    t1=$(awk '{print $14 + $15}' "/proc/$bridge/stat")
    n1=$(grep -c '"masks"' "$d/peer/messages.jsonl" || true)
    kill "$bridge" "$peer" "$router" "$daemon"
    wait "$bridge" "$peer" "$router" "$daemon" 2>/dev/null || true
    local ticks=$((t1 - t0)) frames=$((n1 - n0))
    local hz
    hz=$(getconf CLK_TCK)
    "$PY" -c "import sys; t, n, hz = map(int, sys.argv[1:]); print(f'{t} ticks for {n} frames: {t * 1000 / hz / max(n, 1):.1f} ms CPU per frame')" \
        "$ticks" "$frames" "$hz"
}

echo "bridge over Zenoh, 1280x720, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), git $(git rev-parse --short HEAD)"
echo "label image + detections: $(run 1)"
echo "with --overlay:           $(run 2 --overlay)"
