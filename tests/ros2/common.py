"""What the bridge's peer tests share: tinysamd on a still frame, `tinysam sub` as the reference,
the peers' message logs, and the detections and label image a result must become."""

import json
import os
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
BIN = pathlib.Path(os.environ.get("TINYSAM_BIN_DIR", TARGET / "release"))
FRAME = REPO / "tests/fixtures/golden/frame.png"  # 200 x 150
PEER_DIR = pathlib.Path(__file__).parent
WAIT = 120  # seconds for discovery plus the first results on a loaded machine


def binary(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} not built; run `cargo build --release` first (or set TINYSAM_BIN_DIR)")
    return str(path)


class Daemon:
    """tinysamd on the still frame, restartable on the same socket."""

    def __init__(self, directory):
        self.socket = directory / "d.sock"
        self.log = open(directory / "tinysamd.log", "ab")  # noqa: SIM115 (the daemon's stderr while it runs)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [binary("tinysamd"), "--model", str(REPO / "tests/fixtures/test_model"),
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


def spawn(argv, log_path, env=None):
    """A child process whose stderr goes to `log_path`."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"), env=env)


def in_ns(ns, argv, log_path, env=None):
    """A child process in network namespace `ns`."""
    return spawn(["ip", "netns", "exec", ns, *argv], log_path, env)


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def sub(daemon, *args):
    """What `tinysam sub` receives: one JSON result per line. A `--once` request before the
    daemon has encoded a frame (it encodes while it has a subscriber) is asked again."""
    deadline = time.time() + WAIT
    while True:
        out = subprocess.run(
            [binary("tinysam"), "sub", "--socket", str(daemon.socket), "--json", "--encoding", "rle",
             "--timeout", "60", *args],
            check=False, capture_output=True, text=True, timeout=120,
        )
        if out.returncode == 0:
            return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        assert time.time() < deadline, f"tinysam sub {' '.join(args)}: {out.stderr}"
        time.sleep(0.5)


def messages(out, topic, since=0.0):
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


def wait_for(what, condition, procs):
    deadline = time.time() + WAIT
    while True:
        value = condition()
        if value:
            return value
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode} while waiting for {what}"
        assert time.time() < deadline, f"no {what} within {WAIT} s"
        time.sleep(0.1)


def expected_detections(result, class_ids):
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


def published(entry):
    return [{k: d[k] for k in ("id", "class_id", "score", "center", "size")} for d in entry["detections"]]


def expected_labels(result):
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




# The standing prompts of the standing-result tests: two masks on the still frame.
STANDING = ["--point", "100,75", "--box", "20,20,150,120", "--box", "120,30,190,140"]
# What the prompt tests' peers publish: index 0 a NaN box, index 1 a good box, index 2 a box
# outside the 200 x 150 frame; a point; and a message that is not a Detection2DArray at all.
PEER_PROMPTS = ["--boxes", "nan,1,2,3;20,20,150,120;500,500,600,600", "--point", "100,75", "--garbage"]


def check_standing_results(daemon, out, procs):
    """The peer's detections and label images for the STANDING prompts equal what `tinysam sub`
    receives; returns (the detections entries, the expected detections, the label image)."""
    reference = sub(daemon, *STANDING, "--count", "2")
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
    return detections, expected, labels


def check_daemon_restart(daemon, out, procs, expected):
    """The daemon restarts: the bridge reconnects and the peer hears from it again."""
    daemon.stop()
    restarted = time.time()
    daemon.start()
    after = wait_for("detections after the restart",
                     lambda: messages(out, "detections", since=restarted + 0.5)[:1], procs)
    assert published(after[0]) == expected


def check_prompt_answers(daemon, out, procs):
    """The good box and the point of PEER_PROMPTS are answered, with their class ids, under the
    bridge's `--frame-id cam0`."""
    box = expected_detections(sub(daemon, "--once", "--box", "20,20,150,120")[0], ["1"])
    point = expected_detections(sub(daemon, "--once", "--point", "100,75")[0], ["0"])

    def answers():
        seen = [published(e) for e in messages(out, "detections")]
        return seen if box in seen and point in seen else None

    wait_for("answers to the box and point prompts", answers, procs)
    assert all(e["frame_id"] == "cam0" for e in messages(out, "detections"))


def check_bridge_log(tmp_path, status, *, restarts=False, refusals=False):
    """The bridge stopped cleanly, never panicked, connected once (twice across a daemon
    restart) and, after PEER_PROMPTS, logged each refusal."""
    log = (tmp_path / "bridge.log").read_text()
    if restarts:
        assert log.count("connected to tinysamd") == 2, log
    if refusals:
        assert "not all finite numbers" in log, log
        assert "outside the 200x150 frame" in log, log
        assert "unreadable message on ~/prompts" in log, log
    assert "panicked" not in log, log
    assert status == 0, log
    return log
