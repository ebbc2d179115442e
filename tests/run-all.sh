#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 clone: installs what it needs, then runs every
# suite and prints a summary: per suite its status, the tests it ran and its seconds, and the
# total. `.ci/run` calls exactly this. tests/TIMINGS.md has the figures.
#
#   bash tests/run-all.sh            # everything
#   SKIP_PYTHON=1 bash tests/run-all.sh   # Rust only (no torch download)
#
# Tools and downloads that outlive a clone (uv and its package cache, cargo-deb, the VM test's
# kernels and emulators) are kept in $TINYSAM_CACHE (default ~/.cache/tinysam-edge) and in
# ~/.cargo/bin: a fresh clone on the same machine finds them, a fresh machine installs them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/models/.venv
export ROOT VENV
export TINYSAM_CACHE=${TINYSAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tinysam-edge}
LOGS=$ROOT/target/test-logs
mkdir -p "$LOGS" "$TINYSAM_CACHE"
declare -a SUMMARY=()
FAILED=0
PASSED_SUITES=0
FAILED_SUITES=0

say() { printf '\n==> %s\n' "$*"; }
T0=$(date +%s)
# Tests a suite's log reports: cargo's and pytest's counts, the VM test's ok lines.
count_tests() { # log
    local cargo pytest vm
    cargo=$(grep -aoE 'test result: [A-Za-z]+\. [0-9]+ passed' "$1" | awk '{s += $4} END {print s + 0}')
    pytest=$(grep -aoE '^[0-9]+ passed' "$1" | awk '{s += $1} END {print s + 0}')
    [ "$pytest" -eq 0 ] && pytest=$(grep -aE '^=+ .*[0-9]+ passed' "$1" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
    vm=$(grep -acE '^VMTEST ok' "$1")
    echo $((cargo + pytest + vm))
}
record() { # name, status, seconds, tests
    SUMMARY+=("$(printf '%-40s %-8s %6s %8s s' "$1" "$2" "${4:--}" "${3:-0}")")
    case "$2" in
        passed) PASSED_SUITES=$((PASSED_SUITES + 1)) ;;
        skipped) ;;
        *) FAILED=1; FAILED_SUITES=$((FAILED_SUITES + 1)) ;;
    esac
}
# Where a suite's output goes.
suite_log() { # name
    echo "$LOGS/$(echo "$1" | tr -c 'A-Za-z0-9\n' '_').log"
}
# Record a finished suite from its exit status, seconds and log (for the test count).
finish_suite() { # name, status, seconds, log
    local tests
    tests=$(count_tests "$4")
    [ "$tests" -eq 0 ] && tests=-
    if [ "$2" -eq 0 ]; then record "$1" passed "$3" "$tests"; else record "$1" FAILED "$3" "$tests"; fi
}
# Every suite runs under a time limit, in its own process group (`timeout` makes one), and
# whatever it leaves running is killed when it ends: a test that fails before stopping a daemon
# it started must not keep a pipe of this script open, or the run waits for CI's own limit.
# The limit is SUITE_LIMIT seconds (default 2400), and never past RUN_LIMIT seconds (default
# 4800) from the start, so that the summary is printed inside CI's 90 minutes.
SUITE_LIMIT=${SUITE_LIMIT:-2400}
RUN_LIMIT=${RUN_LIMIT:-4800}
export -f say
# The seconds the next suite may take; 0 when the run's time is spent.
suite_limit() {
    local left=$((RUN_LIMIT - ($(date +%s) - T0)))
    [ "$left" -lt "$SUITE_LIMIT" ] || left=$SUITE_LIMIT
    [ "$left" -gt 0 ] || left=0
    echo "$left"
}
# Run a command (or a function of this script) limited, its output to a log; prints its status.
limited() { # limit, log, command...
    local limit=$1 log=$2 pid status
    shift 2
    declare -F "$1" >/dev/null && export -f "$1"
    timeout -k 20 "$limit" bash -c '"$@"' _ "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    wait "$pid"
    status=$?
    kill -KILL -- -"$pid" 2>/dev/null
    [ "$status" -eq 124 ] && echo "==> stopped after its limit of $limit s" >>"$log"
    return "$status"
}
run_suite() { # name, command...; returns the command's status
    local name=$1 start log status limit tailer
    shift
    say "$name: $*"
    log=$(suite_log "$name")
    limit=$(suite_limit)
    if [ "$limit" -eq 0 ]; then
        echo "no time left of RUN_LIMIT=$RUN_LIMIT s" | tee "$log"
        record "$name" "NO-TIME" 0
        return 1
    fi
    start=$(date +%s)
    : >"$log"
    tail -n +1 -f "$log" &
    tailer=$!
    limited "$limit" "$log" "$@"
    status=$?
    sleep 0.3
    kill "$tailer" 2>/dev/null
    wait "$tailer" 2>/dev/null
    if [ "$status" -eq 124 ]; then
        echo "==> $name: stopped after its limit of $limit s"
        record "$name" TIMEOUT $(( $(date +%s) - start )) "$(count_tests "$log")"
    else
        finish_suite "$name" "$status" $(( $(date +%s) - start )) "$log"
    fi
    return "$status"
}

# Suites that run in the background while the next ones run in the foreground (downloads beside
# the builds). Each has its own log and seconds; `join_suite` waits for it, prints its output and
# records it.
declare -A BACKGROUND=()
start_suite() { # name, command...
    local name=$1 log limit
    shift
    log=$(suite_log "$name")
    limit=$(suite_limit)
    say "$name (in the background): $*"
    (
        t=$(date +%s)
        status=0
        if [ "$limit" -gt 0 ]; then
            limited "$limit" "$log" "$@" || status=$?
        else
            echo "no time left of RUN_LIMIT=$RUN_LIMIT s" >"$log"
            status=1
        fi
        echo "$status $(( $(date +%s) - t ))" >"$log.status"
    ) &
    BACKGROUND[$name]=$!
}
join_suite() { # name; returns the suite's status
    local name=$1 log status seconds
    log=$(suite_log "$name")
    wait "${BACKGROUND[$name]}"
    say "$name: output (it ran in the background)"
    cat "$log"
    read -r status seconds <"$log.status"
    if [ "$status" -eq 124 ]; then
        record "$name" TIMEOUT "$seconds" "$(count_tests "$log")"
    else
        finish_suite "$name" "$status" "$seconds" "$log"
    fi
    return "$status"
}

# Suites that run side by side: each in the background with its own log, printed when all are
# done; each keeps its own seconds.
run_parallel() { # "name|command..." ...
    local spec name names=() start=$(date +%s)
    for spec in "$@"; do
        name=${spec%%|*}
        names+=("$name")
        start_suite "$name" bash -c "${spec#*|}"
    done
    for name in "${names[@]}"; do
        join_suite "$name"
    done
    echo "side by side: $(( $(date +%s) - start )) s for ${names[*]}"
}

need_root_apt() { # packages...
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}

# bindgen (for the v4l crate) needs libclang; the mozjpeg crate (still JPEGs) a C compiler.
need_root_apt libclang-dev gcc || { echo "could not install libclang-dev and gcc" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs), then re-run." >&2
    exit 1
fi
# Where cargo puts the release binaries (CARGO_TARGET_DIR and config honoured), for the suites
# that run them.
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN_DIR=$TARGET_DIR/release
export TARGET_DIR BIN_DIR

# uv, once per machine, in its own venv under the cache; its package cache (~/.cache/uv) makes
# the next clone's installs local copies. cross/env.sh finds it on PATH too.
TOOLS=$TINYSAM_CACHE/tools
setup_uv() {
    command -v uv >/dev/null 2>&1 && return 0
    if [ ! -x "$TOOLS/bin/uv" ]; then
        say "installing uv into $TOOLS"
        python3 -m venv "$TOOLS" 2>/dev/null || { need_root_apt python3-venv && python3 -m venv "$TOOLS"; } || return 1
        "$TOOLS/bin/python" -m pip install -q uv || return 1
    fi
    export PATH="$TOOLS/bin:$PATH"
}
setup_uv || { echo "could not install uv" >&2; exit 1; }

setup_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        uv venv -q --python "$(command -v python3)" "$VENV" || return 1
    fi
    say "installing the model toolchain's Python packages (torch brings ~3 GB of CUDA libraries)"
    uv pip install -q --python "$VENV/bin/python" -e "$ROOT/models[dev]" -e "$ROOT/clients/python[dev]" \
        -r "$ROOT/tests/ros2/requirements.txt"
}

# --- Rust ---------------------------------------------------------------------------------
run_suite "rust: fmt" cargo fmt --all -- --check

# Clippy lints our crate inside the builds the tests need: clippy-driver as the workspace's rustc
# wrapper, which is how `cargo clippy` runs it (over `cargo check`), here over the test builds of
# both targets. The dependencies are compiled once instead of once more for a check build
# (~160 s); the targets `cargo clippy --all-targets` lints are linted (lib, its tests, binaries,
# integration tests, examples), the aarch64-only code too. clippy-driver compiles as rustc does
# except that it skips MIR optimisations (LLVM's are unchanged), which tests do not notice; a
# user's `cargo build --release` has no wrapper. Lints only warn, so that the tests still run,
# and a build suite fails on any warning, as `cargo clippy -- -D warnings` would.
if CLIPPY_DRIVER=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver); then
    export RUSTC_WORKSPACE_WRAPPER=$CLIPPY_DRIVER
else
    echo "clippy-driver not found: rustup component add clippy" >&2
    exit 1
fi
# A command whose output is a cargo build's; fails if it fails or if the build warns.
without_warnings() { # command...
    local log status
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || return "$status"
    # cargo's own count line of a crate's warnings (uv, apt or pip may print other "warning:"s).
    if grep -aE '^warning: `[^`]+` \(.*\) generated [0-9]+ warnings?' "$log"; then
        echo "==> the build warns (above): rustc's and clippy's warnings fail the test command"
        return 1
    fi
}
export -f without_warnings

# Downloads run in the background while the x86 build runs: they wait on the network, the build
# on the CPU. (Not the two builds side by side: each keeps both cores busy, and together they took
# 2 020 s against 857 s for the x86 one alone on the same day, tests/TIMINGS.md.)
# The aarch64 toolchain (rustup target, Debian's cross packages and qemu-user, zig) is fetched in
# the same background job, after the VM downloads: both use the system's apt, which takes one
# process at a time. On a fresh machine that is ~12 s less before the aarch64 build.
fetch_vm_downloads() {
    VM_FETCH_ONLY=1 bash cross/vm/run.sh aarch64 && VM_FETCH_ONLY=1 bash cross/vm/run.sh x86_64 &&
        bash -c 'source cross/env.sh && cross_setup'
}
start_suite "downloads: VM camera, aarch64 toolchain" fetch_vm_downloads
if [ "${SKIP_PYTHON:-0}" != "1" ]; then
    start_suite "python: environment (uv)" setup_python
fi

run_suite "rust: clippy, x86_64 test build" without_warnings cargo test --release --locked --no-run
run_suite "rust: tests (x86_64)" cargo test --release --locked

smoke_default_model() {
    local out
    out=$(mktemp -d)
    # Through cargo, so a CARGO_TARGET_DIR elsewhere works too.
    local tinysam=(cargo run --release --locked --quiet --bin tinysam --)
    "${tinysam[@]}" info --model models/default &&
        "${tinysam[@]}" segment tests/fixtures/golden/frame.png --point 100,75 \
            --model models/default --out "$out/smoke" &&
        test -s "$out/smoke.overlay.png"
}
run_suite "default model smoke" smoke_default_model

# The README's run command: tinysamd on the synthetic camera with the default model, and a
# subscriber that must receive masks.
smoke_daemon() {
    local dir pid ok=1
    dir=$(mktemp -d)
    cargo build --release --locked --quiet --bins || return 1
    "$BIN_DIR/tinysamd" --socket "$dir/d.sock" --stats-interval 0 2>"$dir/log" &
    pid=$!
    for _ in $(seq 1 600); do [ -S "$dir/d.sock" ] && break; sleep 0.1; done
    if "$BIN_DIR/tinysam" sub --socket "$dir/d.sock" --point 320,240 --count 1 --timeout 300; then
        ok=0
    fi
    kill -TERM "$pid" && wait "$pid" || ok=1
    [ -e "$dir/d.sock" ] && { echo "socket left behind"; ok=1; }
    [ $ok -eq 0 ] || cat "$dir/log"
    return $ok
}
run_suite "daemon smoke (default model)" smoke_daemon
# --- aarch64 -------------------------------------------------------------------------------
# Joined here, not before the VMs: the aarch64 build needs the toolchain it fetched.
join_suite "downloads: VM camera, aarch64 toolchain"
run_suite "aarch64: clippy, test build" without_warnings bash cross/test.sh --no-run
run_suite "aarch64: tests under qemu (A76, A53)" bash cross/test.sh
run_suite "aarch64: release build (glibc <= 2.31)" bash cross/build.sh
# (No run of `tinysam bench` under qemu: it checked the bench command's arch-independent code on
# aarch64 for ~33 s, and bought back part of what the ROS 2 bridge's middleware costs each
# build, tests/TIMINGS.md. aarch64's kernel choice is checked by the A76/A53 tests and the VM's
# daemon, its encoder and decoder by the parity tests; the README walk runs the bench on x86.)
# A real V4L2 driver (vivid) in a VM: the binaries built above, Debian's kernel, qemu-system TCG.
# The two VMs side by side: each keeps ~1.2 of the 2 cores busy (TCG idles while the guest waits
# for camera frames), so together they take ~2/3 of their sum. Each pixel format is read in one
# of them (a format costs a daemon start and two frames under TCG, 40-55 s of guest time in
# either VM: YUYV and NV12 in aarch64 took 117 ∥ 67 s, NV12 in x86_64 80 ∥ 117 s, tests/TIMINGS.md):
# format negotiation and conversion are the same Rust on both architectures (the conversions are
# also unit tests on both), the faults, the kernel choice and the reopening run in each.
run_parallel "vm camera: aarch64 (vivid)|FORMATS=yuyv bash cross/vm/run.sh aarch64" \
    "vm camera: x86_64 (vivid)|FORMATS=nv12,rgb24 bash cross/vm/run.sh x86_64"

run_suite "debian package (arm64)" bash debian/check.sh --target aarch64-unknown-linux-gnu --variant arm64
run_suite "debian package (amd64)" bash debian/check.sh
run_suite "systemd units" bash systemd/check.sh \
    "$BIN_DIR/tinysamd" "$BIN_DIR/tinysam-ros2"

# --- Python (model toolchain) -------------------------------------------------------------
if [ "${SKIP_PYTHON:-0}" = "1" ]; then
    record "python: models lint (ruff)" skipped
    record "python: models/tests" skipped
    record "python: clients/python" skipped
    record "ros2: DDS peer (Cyclone, netns)" skipped
    record "ros2: Zenoh peer (router on 127.0.0.1)" skipped
elif join_suite "python: environment (uv)"; then
    # Both suites talk to the tinysamd and tinysam binaries built by the Rust tests above (the
    # model toolchain's tests run a distilled checkpoint in `tinysam segment`).
    export TINYSAM_BIN_DIR=$BIN_DIR
    # The model toolchain's lint (ruff pinned in models/pyproject.toml; run from models/ so
    # that tinysam_export counts as first-party in the import order).
    run_suite "python: models lint (ruff)" bash -c "cd '$ROOT/models' && '$VENV/bin/ruff' check ."
    run_suite "python: models/tests" "$VENV/bin/python" -m pytest -q models/tests
    run_suite "python: clients/python" "$VENV/bin/python" -m pytest -q clients/python/tests
    # tinysam-ros2 against Cyclone DDS, each in a network namespace of its own (needs root),
    # and against an rmw_zenoh-style peer through a Zenoh router on 127.0.0.1.
    run_suite "ros2: DDS peer (Cyclone, netns)" "$VENV/bin/python" -m pytest -q tests/ros2/test_dds_peer.py
    run_suite "ros2: Zenoh peer (router on 127.0.0.1)" "$VENV/bin/python" -m pytest -q \
        tests/ros2/test_zenoh_peer.py
fi
# Every command the README shows, run as written (placeholders filled, on the test model) or
# skipped by a named rule; needs the binaries built above (and the Python client, if installed).
if [ -x "$VENV/bin/python" ] && [ "${SKIP_PYTHON:-0}" != "1" ]; then
    run_suite "README walk-through" python3 tests/readme_walk.py --bin-dir "$BIN_DIR" --python "$VENV/bin/python"
else
    run_suite "README walk-through" python3 tests/readme_walk.py --bin-dir "$BIN_DIR"
fi

say "summary"
printf '%-40s %-8s %6s %8s\n' suite status tests seconds
printf '%s\n' "${SUMMARY[@]}"
printf '%-40s %-8s %6s %8s s\n' "total (installs included)" "" "" $(( $(date +%s) - T0 ))
echo "suites: $PASSED_SUITES passed, $FAILED_SUITES failed"
exit $FAILED
