"""Framing, handshake and requests over tinysamd's Unix socket."""

import os
import socket
import struct

import msgpack

MAGIC = b"TSAM"
VERSION = 1
HEADER = struct.Struct("<4sHHI")
MAX_SERVER_BODY = 64 << 20

KIND = {
    "hello": 1,
    "subscribe": 2,
    "unsubscribe": 3,
    "prompt_request": 4,
    "status_request": 5,
    "bye": 6,
    "welcome": 64,
    "subscribed": 65,
    "masks": 66,
    "status": 67,
    "error": 68,
}
KIND_NAME = {v: k for k, v in KIND.items()}


def _default_socket():
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        d = os.environ.get(var)
        if d:
            return os.path.join(d.split(":")[0], "tinysamd.sock")
    return "/tmp/tinysamd-%d.sock" % os.getuid()


DEFAULT_SOCKET = _default_socket()


class ProtocolError(Exception):
    """The server sent bytes that are not a protocol-v1 message."""


class ServerError(Exception):
    """The server answered with an error message."""

    def __init__(self, reply):
        self.code = reply.get("code")
        self.id = reply.get("id")
        self.message = reply.get("message", "")
        super().__init__("%s: %s" % (self.code, self.message))


class Client:
    """A connected, greeted client. Messages are dicts; `kind` says which one.

    Results arrive as ("masks", dict) with keys subscription, request_id, frame_seq,
    capture_ns, width, height, dropped, masks (each mask: prompt, output, score,
    stability, bbox [x, y, w, h], area, rle | bitmap | polygons).
    """

    def __init__(self, path=DEFAULT_SOCKET, name="python", timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        # Bytes received but not yet returned: a timeout in the middle of a message keeps them.
        self._inbox = bytearray()
        self.sock.connect(path)
        self.send("hello", {"min_version": VERSION, "max_version": VERSION, "client": name[:64]})
        kind, body = self.recv()
        if kind == "error":
            raise ServerError(body)
        if kind != "welcome":
            raise ProtocolError("expected welcome, got %s" % kind)
        self.welcome = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.send("bye", {})
        except OSError:
            pass
        self.sock.close()

    def send(self, kind, body):
        payload = msgpack.packb(body, use_bin_type=True)
        self.sock.sendall(HEADER.pack(MAGIC, VERSION, KIND[kind], len(payload)) + payload)

    def _fill(self, n):
        """Receive until the inbox holds at least n bytes (a timeout keeps what arrived)."""
        while len(self._inbox) < n:
            chunk = self.sock.recv(min(n - len(self._inbox), 1 << 20))
            if not chunk:
                raise ConnectionError("tinysamd closed the connection")
            self._inbox += chunk

    def recv(self, timeout=None):
        """Next message as (kind name, dict). A `socket.timeout` loses nothing: the part of a
        message that had arrived stays buffered for the next call."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        self._fill(HEADER.size)
        magic, version, kind, length = HEADER.unpack(bytes(self._inbox[: HEADER.size]))
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("bad header %r v%d" % (magic, version))
        if length > MAX_SERVER_BODY:
            raise ProtocolError("message of %d bytes is over the limit" % length)
        self._fill(HEADER.size + length)
        payload = bytes(self._inbox[HEADER.size : HEADER.size + length])
        del self._inbox[: HEADER.size + length]
        body = msgpack.unpackb(payload, raw=False)
        return KIND_NAME.get(kind, str(kind)), body

    def _wait(self, want, match):
        while True:
            kind, body = self.recv()
            if kind == "error":
                raise ServerError(body)
            if kind == want and match(body):
                return body

    def subscribe(self, sub_id, mode, prompts=(), encoding="rle", max_rate_hz=0.0, multimask=False,
                  frames=False):
        """Start a subscription: mode "everything", "prompts" or "on_demand".

        A prompt is {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]} in frame pixels
        (label 1 foreground, 0 background). Encoding: "rle", "bitmap", "polygon", "bbox".
        With frames=True each result also carries the frame it was computed on, as JPEG bytes
        under "frame_jpeg".
        """
        self.send(
            "subscribe",
            {
                "id": sub_id,
                "mode": mode,
                "prompts": [_prompt(p) for p in prompts],
                "encoding": encoding,
                "max_rate_hz": float(max_rate_hz),
                "multimask": bool(multimask),
                "frames": bool(frames),
            },
        )
        self._wait("subscribed", lambda b: b["id"] == sub_id)

    def unsubscribe(self, sub_id):
        self.send("unsubscribe", {"id": sub_id})
        self._wait("subscribed", lambda b: b["id"] == sub_id)

    def prompt(self, request_id, prompts, frame_seq=None, encoding="rle", multimask=False, frames=False):
        """Segment `prompts` on frame `frame_seq` (None: newest) and wait for the masks.

        Returns the `masks` message: its "masks" answer the prompts the model took, and its
        "refused" (possibly absent) lists the others as {prompt, code, message}; when every
        prompt is refused, ServerError (code "invalid_prompt") is raised instead. With
        frames=True it also carries the frame as JPEG bytes under "frame_jpeg".
        """
        self.send(
            "prompt_request",
            {
                "request_id": request_id,
                "frame_seq": frame_seq,
                "prompts": [_prompt(p) for p in prompts],
                "encoding": encoding,
                "multimask": bool(multimask),
                "frames": bool(frames),
            },
        )
        return self._wait("masks", lambda b: b.get("request_id") == request_id)

    def status(self, request_id=1):
        self.send("status_request", {"request_id": request_id})
        return self._wait("status", lambda b: b["request_id"] == request_id)

    def results(self, count=None):
        """Yield subscription results; errors about a subscription raise ServerError."""
        seen = 0
        while count is None or seen < count:
            kind, body = self.recv()
            if kind == "error":
                raise ServerError(body)
            if kind == "masks":
                seen += 1
                yield body


def _prompt(p):
    out = {"points": [[float(x), float(y), int(label)] for x, y, label in p.get("points", [])]}
    if p.get("box") is not None:
        out["box"] = [float(v) for v in p["box"]]
    return out
