"""The Python client against pycocotools and against a real tinysamd (fixture model)."""

import io
import json
import os
import pathlib
import random
import subprocess
import time

import numpy as np
import pytest

from tinysam_client import Client, ServerError, decode_rle, mask_to_numpy, rle_area

REPO = pathlib.Path(__file__).resolve().parents[3]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def _binary(name):
    path = pathlib.Path(os.environ.get("TINYSAM_BIN_DIR", TARGET / "release")) / name
    if not path.exists():
        pytest.fail("%s not built; run `cargo build --release` first (or set TINYSAM_BIN_DIR)" % path)
    return path


def test_rle_decode_matches_pycocotools():
    from pycocotools import mask as coco

    rng = random.Random(7)
    for _ in range(50):
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        m = np.zeros((h, w), np.uint8)
        for _ in range(rng.randint(0, 5)):
            y0, x0 = rng.randrange(h), rng.randrange(w)
            m[y0 : y0 + rng.randint(1, 20), x0 : x0 + rng.randint(1, 20)] = 1
        counts = coco.encode(np.asfortranarray(m))["counts"].decode()
        got = np.frombuffer(decode_rle(counts, w, h), np.uint8).reshape(h, w)
        assert (got == m).all()
        assert rle_area(counts) == int(m.sum())


def test_rle_decode_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        decode_rle("52", 3, 3)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sock = tmp_path_factory.mktemp("d") / "d.sock"
    proc = subprocess.Popen(
        [
            str(_binary("tinysamd")),
            "--model", str(REPO / "tests/fixtures/test_model"),
            "--source", "synthetic", "--width", "320", "--height", "240", "--fps", "5",
            "--encoder", "fp32", "--decoder", "fp32", "--threads", "1",
            "--socket", str(sock),
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not sock.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("tinysamd did not start: %s" % proc.stderr.read().decode())
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(timeout=5)
    assert not sock.exists()


def test_subscription_results_decode(daemon):
    with Client(str(daemon), name="pytest") as c:
        assert c.welcome["version"] == 1
        c.subscribe(1, "prompts", prompts=[{"points": [[160, 120, 1]]}, {"box": [10, 10, 100, 90]}])
        results = list(c.results(count=3))
        seqs = [r["frame_seq"] for r in results]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        for r in results:
            assert (r["width"], r["height"]) == (320, 240)
            assert [m["prompt"] for m in r["masks"]] == [0, 1]
            for m in r["masks"]:
                pixels = mask_to_numpy(m, r["width"], r["height"])
                assert int(pixels.sum()) == m["area"]


def test_python_and_rust_clients_decode_the_same_mask(daemon):
    with Client(str(daemon), name="pytest-compare") as c:
        status = c.status()
        seq = status["newest_frame"]
        assert seq is not None
        rle = c.prompt(5, [{"points": [[160, 120, 1]]}], frame_seq=seq)
        bitmap = c.prompt(6, [{"points": [[160, 120, 1]]}], frame_seq=seq, encoding="bitmap")
    out = subprocess.run(
        [
            str(_binary("tinysam")), "sub", "--socket", str(daemon), "--once",
            "--frame", str(seq), "--point", "160,120", "--json",
        ],
        capture_output=True, text=True, check=True,
    )
    rust = json.loads(out.stdout.strip().splitlines()[-1])
    w, h = rle["width"], rle["height"]
    ours = mask_to_numpy(rle["masks"][0], w, h)
    theirs = np.frombuffer(decode_rle(rust["masks"][0]["rle"], w, h), np.uint8).reshape(h, w)
    assert rust["frame_seq"] == rle["frame_seq"] == seq
    assert (ours == theirs).all()
    assert (ours == mask_to_numpy(bitmap["masks"][0], w, h)).all()


def test_frames_come_as_jpeg_when_asked(daemon):
    picture = pytest.importorskip("PIL.Image")
    with Client(str(daemon), name="pytest-frames") as c:
        c.subscribe(1, "prompts", prompts=[{"points": [[160, 120, 1]]}], frames=True)
        result = next(iter(c.results(count=1)))
        jpeg = result["frame_jpeg"]
        assert picture.open(io.BytesIO(jpeg)).size == (320, 240)
        seq = result["frame_seq"]
        same = c.prompt(8, [{"points": [[10, 10, 1]]}], frame_seq=seq, frames=True)
        assert same["frame_jpeg"] == jpeg  # one JPEG per frame, whoever asks
        plain = c.prompt(9, [{"points": [[10, 10, 1]]}], frame_seq=seq)
        assert plain.get("frame_jpeg") is None


def test_errors_are_typed(daemon):
    with Client(str(daemon), name="pytest-errors") as c:
        deadline = time.time() + 30
        while (c.status()["oldest_frame"] or 0) < 1:
            assert time.time() < deadline, "the ring never moved past frame 0"
            time.sleep(0.1)
        with pytest.raises(ServerError) as e:
            c.prompt(7, [{"points": [[1, 1, 1]]}], frame_seq=0)
        assert e.value.code == "frame_expired"
        with pytest.raises(ServerError) as e:
            c.subscribe(2, "prompts", prompts=[{"points": [[1, 1, 1]] * 40}])
        assert e.value.code == "invalid_request"
        # The connection is still usable after an error.
        assert c.status(3)["request_id"] == 3


def test_a_timeout_in_the_middle_of_a_message_loses_nothing(tmp_path):
    """A server sends its messages in pieces, each after the client's recv has timed out: the
    boundaries fall inside the header and inside the body."""
    import socket
    import struct
    import threading

    import msgpack

    from tinysam_client.client import HEADER, KIND, MAGIC, VERSION

    def frame(kind, body):
        payload = msgpack.packb(body, use_bin_type=True)
        return HEADER.pack(MAGIC, VERSION, KIND[kind], len(payload)) + payload

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    first = frame("error", {"id": 7, "code": "invalid_request", "message": "x" * 5000})
    second = frame("subscribed", {"id": 9})
    timed_out = threading.Semaphore(0)

    def serve():
        peer, _ = listener.accept()
        head = peer.recv(HEADER.size, socket.MSG_WAITALL)
        peer.recv(struct.unpack("<I", head[8:12])[0], socket.MSG_WAITALL)
        peer.sendall(frame("welcome", {"version": VERSION, "server": "test", "client_id": 1, "limits": {}}))
        for i, piece in enumerate((first[:5], first[5:40], first[40:])):
            if i:
                timed_out.acquire()
            peer.sendall(piece)
        peer.sendall(second)
        timed_out.acquire()
        peer.close()

    server = threading.Thread(target=serve)
    server.start()
    client = Client(path, timeout=10)
    for _ in range(2):
        with pytest.raises(socket.timeout):
            client.recv(timeout=0.03)
        timed_out.release()
    kind, body = client.recv(timeout=10)
    assert (kind, body["id"], len(body["message"])) == ("error", 7, 5000)
    assert client.recv(timeout=10) == ("subscribed", {"id": 9})
    timed_out.release()
    server.join()
    listener.close()
