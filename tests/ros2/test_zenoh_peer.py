"""`tinysam-ros2 --transport zenoh` against an independent rmw_zenoh-style peer (`zenoh_peer.py`:
Eclipse Zenoh's Python binding, keys and type hashes computed there from the `.msg` definitions).

The topology is rmw_zenoh's: a router (rmw_zenohd's role, here `zenoh_peer.py --router`) on
127.0.0.1, the bridge a peer connected to it, the test's peer a client of it. Every session has
multicast scouting off and listens on 127.0.0.1 only, so nothing leaves loopback.

Needs the `eclipse-zenoh` and `cyclonedds` wheels (tests/ros2/requirements.txt) and a bridge built
with the `zenoh` feature (the default).
"""

import json
import socket
import sys
import time

import numpy as np
from common import (
    FRAME,
    PEER_DIR,
    PEER_PROMPTS,
    STANDING,
    binary,
    check_bridge_log,
    check_daemon_restart,
    check_prompt_answers,
    check_standing_results,
    messages,
    spawn,
    stop_process,
    wait_for,
)
from zenoh_peer import type_hash

PEER = PEER_DIR / "zenoh_peer.py"

# The overlay's palette (src/overlay.rs): mask i in colour i (cycled).
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]])


def _overlay_parts(labels):
    """Where the documented overlay differs: each label's interior (half its colour), its edge (a
    4-neighbour with another label, or the frame's border: full colour), and no label."""
    padded = np.pad(labels, 1, constant_values=-1)
    inner = padded[1:-1, 1:-1]
    edge = ((padded[:-2, 1:-1] != inner) | (padded[2:, 1:-1] != inner)
            | (padded[1:-1, :-2] != inner) | (padded[1:-1, 2:] != inner))
    parts = {"none": labels == 0}
    for label in np.unique(labels[labels > 0]):
        parts[f"{label} inside"] = (labels == label) & ~edge
        parts[f"{label} edge"] = (labels == label) & edge
    return {name: mask for name, mask in parts.items() if mask.any()}


def _expected_overlay(frame, labels):
    """The documented overlay: each labelled pixel half its mask's colour, its region's edge in
    full colour."""
    out = frame.astype(np.int32)
    for name, mask in _overlay_parts(labels).items():
        if name != "none":
            color = PALETTE[(int(name.split()[0]) - 1) % len(PALETTE)]
            out[mask] = color if name.endswith("edge") else (out[mask] + color) // 2
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bridge(daemon, endpoint, tmp_path, *args):
    return spawn([binary("tinysam-ros2"), "--socket", str(daemon.socket), "--transport", "zenoh",
                  "--zenoh-router", endpoint, *args], tmp_path / "bridge.log")


def _graph(out):
    try:
        return json.loads((out / "graph.json").read_text())
    except (OSError, ValueError):
        return []


def test_standing_prompts_reach_a_zenoh_peer_with_rmw_zenoh_keys_and_graph(daemon, tmp_path):
    endpoint = f"tcp/127.0.0.1:{_free_port()}"
    # The bridge first: it must wait for a router that is not there yet.
    bridge = _bridge(daemon, endpoint, tmp_path, *STANDING, "--overlay")
    time.sleep(1.0)
    router = spawn([sys.executable, str(PEER), "--router", endpoint], tmp_path / "router.log")
    out = tmp_path / "peer"
    peer = spawn([sys.executable, str(PEER), "--connect", endpoint, "--out", str(out)], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "router": router, "peer": peer}
    try:
        # The peer subscribed with the exact type hashes, as rmw_zenoh does: these arrived because
        # the bridge's keys carry the real ones.
        detections, expected, labels = check_standing_results(daemon, out, procs)
        for entry in detections:
            assert abs(entry["attachment"]["time_ns"] * 1e-9 - time.time()) < 60
        sequences = [e["attachment"]["sequence"] for e in detections]
        assert sequences == sorted(set(sequences)) and sequences[0] >= 1, sequences

        # The overlay: the frame (JPEG from the daemon) with those labels drawn over it.
        from PIL import Image as Picture

        overlays = wait_for("overlays at the peer", lambda: [e for e in messages(out, "overlay") if "file" in e][:2],
                            procs)
        expected_overlay = _expected_overlay(np.asarray(Picture.open(FRAME).convert("RGB")), labels.astype(np.int64))
        for entry in overlays:
            assert (entry["format"], entry["frame_id"]) == ("jpeg", "camera")
            picture = np.asarray(Picture.open(out / entry["file"]).convert("RGB")).astype(np.int32)
            assert picture.shape == (150, 200, 3)
            # Two JPEG generations of a textured frame leave per-pixel errors of ~10 grey levels,
            # and chroma subsampling smears the one-pixel outlines into their neighbours; each
            # part's mean colour survives that (measured: regions within 4, outlines within 11;
            # a palette off by one mask is 19-116 off).
            for name, mask in _overlay_parts(labels).items():
                if mask.sum() < 500:
                    continue  # too few pixels for a mean that JPEG's blocks do not dominate
                error = np.abs(picture[mask].mean(axis=0) - expected_overlay[mask].mean(axis=0)).max()
                bound = 16 if name.endswith("edge") else 5
                assert error < bound, f"overlay, {name}: mean colour off by {error:.1f}"

        # The ROS graph, as `ros2 node list` / `ros2 topic list -t` build it from liveliness tokens.
        def bridge_graph():
            tokens = [t.split("/") for t in _graph(out)]
            node = [t for t in tokens if len(t) == 9 and t[5] == "NN" and t[8] == "tinysam"]
            entities = {(t[5], t[9], t[10], t[11], t[12]) for t in tokens if len(t) == 13}
            return (node, entities) if node and len(entities) >= 5 else None

        node, entities = wait_for("the bridge's liveliness tokens", bridge_graph, procs)
        assert node[0][1] == "0" and node[0][7] == "%", node
        image, detections_type = "sensor_msgs/msg/Image", "vision_msgs/msg/Detection2DArray"
        expect = {
            ("MP", "%tinysam%masks", "sensor_msgs::msg::dds_::Image_", type_hash(image), "2::,1:,:,:,,"),
            ("MP", "%tinysam%detections", "vision_msgs::msg::dds_::Detection2DArray_",
             type_hash(detections_type), "::,10:,:,:,,"),
            ("MS", "%tinysam%prompts", "vision_msgs::msg::dds_::Detection2DArray_",
             type_hash(detections_type), "::,10:,:,:,,"),
            ("MS", "%tinysam%points", "geometry_msgs::msg::dds_::PointStamped_",
             type_hash("geometry_msgs/msg/PointStamped"), "::,10:,:,:,,"),
            ("MP", "%tinysam%overlay%compressed", "sensor_msgs::msg::dds_::CompressedImage_",
             type_hash("sensor_msgs/msg/CompressedImage"), "2::,1:,:,:,,"),
        }
        assert expect <= entities, entities

        check_daemon_restart(daemon, out, procs, expected)
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
        stop_process(router)
    log = check_bridge_log(tmp_path, bridge_status, restarts=True)
    assert "on Zenoh" in log, log


def test_prompts_from_a_zenoh_peer_are_answered_and_bad_ones_counted(daemon, tmp_path):
    endpoint = f"tcp/127.0.0.1:{_free_port()}"
    router = spawn([sys.executable, str(PEER), "--router", endpoint], tmp_path / "router.log")
    bridge = _bridge(daemon, endpoint, tmp_path, "--frame-id", "cam0")
    out = tmp_path / "peer"
    peer = spawn([sys.executable, str(PEER), "--connect", endpoint, "--out", str(out), *PEER_PROMPTS],
                 tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "router": router, "peer": peer}
    try:
        check_prompt_answers(daemon, out, procs)
        assert bridge.poll() is None
    finally:
        bridge_status = stop_process(bridge)
        stop_process(peer)
        stop_process(router)
    check_bridge_log(tmp_path, bridge_status, refusals=True)
