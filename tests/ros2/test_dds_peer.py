"""`tinysam-ros2` against an independent DDS implementation (Cyclone DDS, `peer.py`).

DDS discovery is multicast, so every DDS participant here runs inside network namespaces this
test creates: the bridge in one, the peer in another, joined by a veth pair (10.231.0.0/24)
with the multicast route on it. Nothing goes to the machine's own interfaces. tinysamd needs
no network (Unix socket) and runs as a plain child process; it reads a still image, so every
frame's masks are the same and the peer's messages can be checked exactly against what
`tinysam sub` receives.

Needs root (for `ip netns`) and the `cyclonedds` wheel (tests/ros2/requirements.txt).
"""

import os
import shutil
import subprocess
import sys

import pytest
from common import (
    PEER_DIR,
    PEER_PROMPTS,
    STANDING,
    binary,
    check_bridge_log,
    check_daemon_restart,
    check_prompt_answers,
    check_standing_results,
    in_ns,
    stop_process,
)

PEER = PEER_DIR / "peer.py"


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns():
    """Two namespaces, `bridge` and `peer`, joined by a veth pair; deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI"):
            pytest.fail("the DDS test needs root and iproute2 (ip netns) in CI")
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = os.getpid() % 100000
    names = {"bridge": f"tsam-b{tag}", "peer": f"tsam-p{tag}"}
    links = {"bridge": f"tsb{tag}", "peer": f"tsp{tag}"}
    addresses = {"bridge": "10.231.0.1/24", "peer": "10.231.0.2/24"}
    for ns in names.values():
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        _ip("netns", "add", ns)
    try:
        _ip("link", "add", links["bridge"], "netns", names["bridge"], "type", "veth",
            "peer", "name", links["peer"], "netns", names["peer"])
        for side, ns in names.items():
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addresses[side], "dev", links[side])
            _ip("-n", ns, "link", "set", links[side], "up")
            # DDS discovery's multicast (239.255.0.1) goes over the veth, nowhere else.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", links[side])
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_standing_prompts_reach_a_cyclone_peer_and_survive_a_daemon_restart(netns, daemon, tmp_path):
    bridge = in_ns(netns["bridge"], [binary("tinysam-ros2"), "--socket", str(daemon.socket), *STANDING],
                   tmp_path / "bridge.log")
    out = tmp_path / "peer"
    peer = in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out)], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        _, expected, _ = check_standing_results(daemon, out, procs)
        check_daemon_restart(daemon, out, procs, expected)
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
    check_bridge_log(tmp_path, bridge_status, restarts=True)


def test_prompts_from_a_cyclone_peer_are_answered_and_bad_ones_counted(netns, daemon, tmp_path):
    bridge = in_ns(netns["bridge"], [binary("tinysam-ros2"), "--socket", str(daemon.socket),
                                      "--frame-id", "cam0"], tmp_path / "bridge.log")
    out = tmp_path / "peer"
    peer = in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out), *PEER_PROMPTS],
                 tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        check_prompt_answers(daemon, out, procs)
        assert bridge.poll() is None
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
    check_bridge_log(tmp_path, bridge_status, refusals=True)
