"""`tinysam-ros2` against an independent DDS implementation (Cyclone DDS, `peer.py`).

DDS discovery is multicast, so every DDS participant here runs inside network namespaces this
test creates: the bridge in one, the peer in another, joined by a veth pair (10.231.0.0/24)
with the multicast route on it. Nothing goes to the machine's own interfaces. tinysamd needs
no network (Unix socket) and runs as a plain child process; it reads a still image, so every
frame's masks are the same and the peer's messages can be checked exactly against what
`tinysam sub` receives.

Needs root (for `ip netns`) and the `cyclonedds` wheel (tests/ros2/requirements.txt).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
BIN = pathlib.Path(os.environ.get("TINYSAM_BIN_DIR", TARGET / "release"))
FRAME = REPO / "tests/fixtures/golden/frame.png"  # 200 x 150
PEER = pathlib.Path(__file__).with_name("peer.py")
WAIT = 120  # seconds for discovery plus the first results on a loaded machine


def _binary(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} not built; run `cargo build --release` first (or set TINYSAM_BIN_DIR)")
    return str(path)


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


class Daemon:
    """tinysamd on the still frame, restartable on the same socket."""

    def __init__(self, directory):
        self.socket = directory / "d.sock"
        self.log = open(directory / "tinysamd.log", "ab")  # noqa: SIM115 (the daemon's stderr while it runs)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [_binary("tinysamd"), "--model", str(REPO / "tests/fixtures/test_model"),
             "--source", f"file:{FRAME}", "--fps", "5", "--threads", "1",
             "--stats-interval", "0", "--socket", str(self.socket)],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        deadline = time.time() + 60
        while not self.socket.exists():
            assert self.proc.poll() is None and time.time() < deadline, "tinysamd did not start"
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc.poll() is None:
        d.stop()


def _in_ns(ns, argv, log_path, env=None):
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL,
                            stderr=open(log_path, "ab"), env=env)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _sub(daemon, *args):
    """What `tinysam sub` receives: one JSON result per line. A `--once` request before the
    daemon has encoded a frame (it encodes while it has a subscriber) is asked again."""
    deadline = time.time() + WAIT
    while True:
        out = subprocess.run(
            [_binary("tinysam"), "sub", "--socket", str(daemon.socket), "--json", "--encoding", "rle",
             "--timeout", "60", *args],
            check=False, capture_output=True, text=True, timeout=120,
        )
        if out.returncode == 0:
            return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        assert time.time() < deadline, f"tinysam sub {' '.join(args)}: {out.stderr}"
        time.sleep(0.5)


def _messages(out, topic, since=0.0):
    path = out / "messages.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry["topic"] == topic and entry["t"] >= since:
            entries.append(entry)
    return entries


def _wait(what, condition, procs):
    deadline = time.time() + WAIT
    while True:
        value = condition()
        if value:
            return value
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode} while waiting for {what}"
        assert time.time() < deadline, f"no {what} within {WAIT} s"
        time.sleep(0.1)


def _expected_detections(result, class_ids):
    """Detections as the bridge must publish them for a `tinysam sub` result."""
    out = []
    for i, m in enumerate(result["masks"]):
        x, y, w, h = m["bbox"]
        out.append({
            "id": str(i + 1),
            "class_id": class_ids[m["prompt"]],
            # f32 on the wire, f64 in the message: exactly the same number.
            "score": float(np.float32(m["score"])),
            "center": [x + w / 2, y + h / 2],
            "size": [float(w), float(h)],
        })
    return out


def _published(entry):
    return [{k: d[k] for k in ("id", "class_id", "score", "center", "size")} for d in entry["detections"]]


def _expected_labels(result):
    """The mono16 label image of a result, from its RLE masks (pycocotools, not our decoder)."""
    from pycocotools import mask as coco

    h, w = result["height"], result["width"]
    labels = np.zeros((h, w), np.uint16)
    masks = result["masks"]
    # Highest score wins; ties go to the earlier mask.
    order = sorted(range(len(masks)), key=lambda i: (masks[i]["score"], -i))
    for i in order:
        pixels = coco.decode({"size": [h, w], "counts": masks[i]["rle"].encode()})
        labels[pixels.astype(bool)] = i + 1
    return labels


def test_standing_prompts_reach_a_cyclone_peer_and_survive_a_daemon_restart(netns, daemon, tmp_path):
    prompts = ["--point", "100,75", "--box", "20,20,150,120", "--box", "120,30,190,140"]
    bridge = _in_ns(netns["bridge"], [_binary("tinysam-ros2"), "--socket", str(daemon.socket), *prompts],
                    tmp_path / "bridge.log")
    out = tmp_path / "peer"
    peer = _in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out)], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        reference = _sub(daemon, *prompts, "--count", "2")
        assert all(r["masks"] == reference[0]["masks"] for r in reference), "the still frame's masks vary"
        expected = _expected_detections(reference[0], ["0", "1"])
        assert len(expected) == 2

        detections = _wait("detections at the peer", lambda: _messages(out, "detections")[:3], procs)
        for entry in detections:
            assert entry["frame_id"] == "camera"
            assert abs(entry["stamp"][0] + entry["stamp"][1] * 1e-9 - time.time()) < 60
            assert _published(entry) == expected
            assert all(d["theta"] == 0 and d["orientation_w"] == 1 and d["frame_id"] == "camera"
                       for d in entry["detections"])

        images = _wait("label images at the peer", lambda: _messages(out, "masks")[:2], procs)
        labels = _expected_labels(reference[0])
        for entry in images:
            assert (entry["width"], entry["height"], entry["step"]) == (200, 150, 400)
            assert (entry["encoding"], entry["is_bigendian"]) == ("mono16", 0)
            got = np.load(out / entry["npy"])
            assert (got == labels).all(), f"label image differs at {int((got != labels).sum())} pixels"

        # The daemon restarts: the bridge reconnects and the peer hears from it again.
        daemon.stop()
        restarted = time.time()
        daemon.start()
        after = _wait("detections after the restart",
                      lambda: _messages(out, "detections", since=restarted + 0.5)[:1], procs)
        assert _published(after[0]) == expected
    finally:
        bridge_status = _stop(bridge)
        _stop(peer)
    log = (tmp_path / "bridge.log").read_text()
    assert log.count("connected to tinysamd") == 2, log
    assert "panicked" not in log, log
    assert bridge_status == 0, log


def test_prompts_from_a_cyclone_peer_are_answered_and_bad_ones_counted(netns, daemon, tmp_path):
    bridge = _in_ns(netns["bridge"], [_binary("tinysam-ros2"), "--socket", str(daemon.socket),
                                      "--frame-id", "cam0"], tmp_path / "bridge.log")
    out = tmp_path / "peer"
    # Index 0: a NaN box, index 1: a good box, index 2: a box outside the 200 x 150 frame; a point;
    # and a message that is not a Detection2DArray at all.
    peer = _in_ns(netns["peer"], [sys.executable, str(PEER), "--out", str(out),
                                  "--boxes", "nan,1,2,3;20,20,150,120;500,500,600,600",
                                  "--point", "100,75", "--garbage"], tmp_path / "peer.log")
    procs = {"tinysam-ros2": bridge, "peer": peer}
    try:
        box = _expected_detections(_sub(daemon, "--once", "--box", "20,20,150,120")[0], ["1"])
        point = _expected_detections(_sub(daemon, "--once", "--point", "100,75")[0], ["0"])

        def answers():
            seen = [_published(e) for e in _messages(out, "detections")]
            return seen if box in seen and point in seen else None

        _wait("answers to the box and point prompts", answers, procs)
        assert all(e["frame_id"] == "cam0" for e in _messages(out, "detections"))
        assert bridge.poll() is None
    finally:
        bridge_status = _stop(bridge)
        _stop(peer)
    log = (tmp_path / "bridge.log").read_text()
    assert "not all finite numbers" in log, log
    assert "outside the 200x150 frame" in log, log
    assert "unreadable message on ~/prompts" in log, log
    assert "panicked" not in log, log
    assert bridge_status == 0, log
