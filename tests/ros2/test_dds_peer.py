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
import time

import numpy as np
import pytest
from common import (
    PEER_DIR,
    binary,
    expected_detections,
    expected_labels,
    in_ns,
    messages,
    published,
    stop_process,
    sub,
    wait_for,
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
    prompts = ["--point", "100,75", "--box", "20,20,150,120", "--box", "120,30,190,140"]
    bridge = in_ns(netns["bridge"], [binary("tinysam-ros2"), "--socket", str(daemon.socket), *prompts],
                    tmp_path / "bridge.log")
    out = tmp_path / "peer"
    peer = in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out)], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        reference = sub(daemon, *prompts, "--count", "2")
        assert all(r["masks"] == reference[0]["masks"] for r in reference), "the still frame's masks vary"
        expected = expected_detections(reference[0], ["0", "1"])
        assert len(expected) == 2

        detections = wait_for("detections at the peer", lambda: messages(out, "detections")[:3], procs)
        for entry in detections:
            assert entry["frame_id"] == "camera"
            assert abs(entry["stamp"][0] + entry["stamp"][1] * 1e-9 - time.time()) < 60
            assert published(entry) == expected
            assert all(d["theta"] == 0 and d["orientation_w"] == 1 and d["frame_id"] == "camera"
                       for d in entry["detections"])

        images = wait_for("label images at the peer", lambda: messages(out, "masks")[:2], procs)
        labels = expected_labels(reference[0])
        for entry in images:
            assert (entry["width"], entry["height"], entry["step"]) == (200, 150, 400)
            assert (entry["encoding"], entry["is_bigendian"]) == ("mono16", 0)
            got = np.load(out / entry["npy"])
            assert (got == labels).all(), f"label image differs at {int((got != labels).sum())} pixels"

        # The daemon restarts: the bridge reconnects and the peer hears from it again.
        daemon.stop()
        restarted = time.time()
        daemon.start()
        after = wait_for("detections after the restart",
                      lambda: messages(out, "detections", since=restarted + 0.5)[:1], procs)
        assert published(after[0]) == expected
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
    log = (tmp_path / "bridge.log").read_text()
    assert log.count("connected to tinysamd") == 2, log
    assert "panicked" not in log, log
    assert bridge_status == 0, log


def test_prompts_from_a_cyclone_peer_are_answered_and_bad_ones_counted(netns, daemon, tmp_path):
    bridge = in_ns(netns["bridge"], [binary("tinysam-ros2"), "--socket", str(daemon.socket),
                                      "--frame-id", "cam0"], tmp_path / "bridge.log")
    out = tmp_path / "peer"
    # Index 0: a NaN box, index 1: a good box, index 2: a box outside the 200 x 150 frame; a point;
    # and a message that is not a Detection2DArray at all.
    peer = in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out),
                                  "--boxes", "nan,1,2,3;20,20,150,120;500,500,600,600",
                                  "--point", "100,75", "--garbage"], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        box = expected_detections(sub(daemon, "--once", "--box", "20,20,150,120")[0], ["1"])
        point = expected_detections(sub(daemon, "--once", "--point", "100,75")[0], ["0"])

        def answers():
            seen = [published(e) for e in messages(out, "detections")]
            return seen if box in seen and point in seen else None

        wait_for("answers to the box and point prompts", answers, procs)
        assert all(e["frame_id"] == "cam0" for e in messages(out, "detections"))
        assert bridge.poll() is None
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
    log = (tmp_path / "bridge.log").read_text()
    assert "not all finite numbers" in log, log
    assert "outside the 200x150 frame" in log, log
    assert "unreadable message on ~/prompts" in log, log
    assert "panicked" not in log, log
    assert bridge_status == 0, log
