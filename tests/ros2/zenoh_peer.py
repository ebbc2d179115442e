"""An independent rmw_zenoh-style ROS 2 peer for the bridge's Zenoh tests: Eclipse Zenoh's Python
binding (`eclipse-zenoh`), keys, attachments and type hashes laid out as rmw_zenoh lays them out,
the hashes computed here from the `.msg` definitions (REP-2016), the payloads decoded with the
message types of `peer.py` (Cyclone DDS's IDL classes, used as a CDR codec only).

Two roles:

    python zenoh_peer.py --router tcp/127.0.0.1:PORT
        a Zenoh router (as rmw_zenohd is) listening there, multicast scouting off, until SIGTERM;

    python zenoh_peer.py --connect tcp/127.0.0.1:PORT --out DIR [--boxes ...] [--point x,y] [--garbage]
        a client of that router that subscribes to `tinysam/masks`, `tinysam/detections` and
        `tinysam/overlay/compressed` (its JPEGs saved as overlay-NNN.jpg) with their exact type hashes (as rmw_zenoh's subscribers do) and writes what arrives to
        DIR/messages.jsonl (as peer.py does, plus each message's attachment), the ROS graph's
        liveliness tokens to DIR/graph.json, and once a second publishes the prompts asked for.
"""

import argparse
import hashlib
import json
import struct
import time

import zenoh
from peer import (
    CompressedImage,
    Detection2DArray,
    Header,
    Image,
    Point,
    PointStamped,
    Time,
    TruncatedArray,
    box_detection,
    detections_entry,
    image_entry,
    peer_arguments,
)

# REP-2016 field type ids.
NESTED, UINT8, INT32, UINT32, FLOAT64, STRING = 1, 3, 6, 7, 11, 17
ARRAY, SEQUENCE = 48, 144


def _field(name, type_id, nested="", capacity=0):
    return {"name": name, "type": {"type_id": type_id, "capacity": capacity, "string_capacity": 0,
                                   "nested_type_name": nested}}


# Fields of each type, from the .msg files of ROS 2 Jazzy (vision_msgs 4.x).
TYPES = {
    "builtin_interfaces/msg/Time": [_field("sec", INT32), _field("nanosec", UINT32)],
    "std_msgs/msg/Header": [_field("stamp", NESTED, "builtin_interfaces/msg/Time"), _field("frame_id", STRING)],
    "sensor_msgs/msg/Image": [
        _field("header", NESTED, "std_msgs/msg/Header"), _field("height", UINT32), _field("width", UINT32),
        _field("encoding", STRING), _field("is_bigendian", UINT8), _field("step", UINT32),
        _field("data", UINT8 + SEQUENCE),
    ],
    "sensor_msgs/msg/CompressedImage": [
        _field("header", NESTED, "std_msgs/msg/Header"), _field("format", STRING), _field("data", UINT8 + SEQUENCE),
    ],
    "geometry_msgs/msg/Point": [_field(c, FLOAT64) for c in "xyz"],
    "geometry_msgs/msg/PointStamped": [
        _field("header", NESTED, "std_msgs/msg/Header"), _field("point", NESTED, "geometry_msgs/msg/Point"),
    ],
    "geometry_msgs/msg/Quaternion": [_field(c, FLOAT64) for c in "xyzw"],
    "geometry_msgs/msg/Pose": [
        _field("position", NESTED, "geometry_msgs/msg/Point"),
        _field("orientation", NESTED, "geometry_msgs/msg/Quaternion"),
    ],
    "geometry_msgs/msg/PoseWithCovariance": [
        _field("pose", NESTED, "geometry_msgs/msg/Pose"), _field("covariance", FLOAT64 + ARRAY, capacity=36),
    ],
    "vision_msgs/msg/Point2D": [_field("x", FLOAT64), _field("y", FLOAT64)],
    "vision_msgs/msg/Pose2D": [_field("position", NESTED, "vision_msgs/msg/Point2D"), _field("theta", FLOAT64)],
    "vision_msgs/msg/BoundingBox2D": [
        _field("center", NESTED, "vision_msgs/msg/Pose2D"), _field("size_x", FLOAT64), _field("size_y", FLOAT64),
    ],
    "vision_msgs/msg/ObjectHypothesis": [_field("class_id", STRING), _field("score", FLOAT64)],
    "vision_msgs/msg/ObjectHypothesisWithPose": [
        _field("hypothesis", NESTED, "vision_msgs/msg/ObjectHypothesis"),
        _field("pose", NESTED, "geometry_msgs/msg/PoseWithCovariance"),
    ],
    "vision_msgs/msg/Detection2D": [
        _field("header", NESTED, "std_msgs/msg/Header"),
        _field("results", NESTED + SEQUENCE, "vision_msgs/msg/ObjectHypothesisWithPose"),
        _field("bbox", NESTED, "vision_msgs/msg/BoundingBox2D"), _field("id", STRING),
    ],
    "vision_msgs/msg/Detection2DArray": [
        _field("header", NESTED, "std_msgs/msg/Header"),
        _field("detections", NESTED + SEQUENCE, "vision_msgs/msg/Detection2D"),
    ],
}


def type_hash(name):
    """RIHS01: SHA-256 of the type description's JSON (json.dumps' separators), with every type
    it refers to, sorted by name."""
    referenced, todo = set(), [name]
    while todo:
        for f in TYPES[todo.pop()]:
            nested = f["type"]["nested_type_name"]
            if nested and nested not in referenced:
                referenced.add(nested)
                todo.append(nested)
    description = {
        "type_description": {"type_name": name, "fields": TYPES[name]},
        "referenced_type_descriptions": [{"type_name": n, "fields": TYPES[n]} for n in sorted(referenced)],
    }
    return "RIHS01_" + hashlib.sha256(json.dumps(description).encode()).hexdigest()


def dds_name(name):
    package, _, base = name.split("/")
    return f"{package}::msg::dds_::{base}_"


def key(domain, topic, name):
    """rmw_zenoh's key of a topic: <domain>/<topic>/<DDS type name>/<hash>."""
    return f"{domain}/{topic.strip('/')}/{dds_name(name)}/{type_hash(name)}"


def _config(mode, **settings):
    config = zenoh.Config()
    config.insert_json5("mode", json.dumps(mode))
    config.insert_json5("scouting/multicast/enabled", "false")
    for k, v in settings.items():
        config.insert_json5(k, json.dumps(v))
    return config


def _attachment(sequence, gid):
    return struct.pack("<qq", sequence, time.time_ns()) + bytes([16]) + gid


def _parse_attachment(sample):
    if sample.attachment is None:
        return None
    raw = sample.attachment.to_bytes()
    if len(raw) != 33 or raw[16] != 16:
        return {"malformed": raw.hex()}
    sequence, stamp = struct.unpack("<qq", raw[:16])
    return {"sequence": sequence, "time_ns": stamp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", help="be a router listening on this endpoint")
    ap.add_argument("--connect", help="the router's endpoint")
    stop = peer_arguments(ap)
    args = ap.parse_args()
    end = time.time() + args.seconds

    if args.router:
        session = zenoh.open(_config("router", **{"listen/endpoints": [args.router]}))
        while not stop and time.time() < end:
            time.sleep(0.1)
        session.close()
        return

    args.out.mkdir(parents=True, exist_ok=True)
    session = None
    while session is None:
        try:
            session = zenoh.open(_config("client", **{"connect/endpoints": [args.connect]}))
        except zenoh.ZError:  # the router is not listening yet
            if stop or time.time() > end:
                raise
            time.sleep(0.2)
    log = open(args.out / "messages.jsonl", "a", buffering=1)  # noqa: SIM115 (open until SIGTERM)
    images = []

    def on_masks(sample):
        entry = image_entry(Image.deserialize(sample.payload.to_bytes()), args.out, len(images))
        entry["attachment"] = _parse_attachment(sample)
        images.append(1)
        log.write(json.dumps(entry) + "\n")

    overlays = []

    def on_overlay(sample):
        m = CompressedImage.deserialize(sample.payload.to_bytes())
        entry = {"topic": "overlay", "t": time.time(), "format": m.format, "frame_id": m.header.frame_id,
                 "attachment": _parse_attachment(sample)}
        if len(overlays) < 20:
            entry["file"] = f"overlay-{len(overlays):03d}.jpg"
            (args.out / entry["file"]).write_bytes(bytes(m.data))
        overlays.append(1)
        log.write(json.dumps(entry) + "\n")

    def on_detections(sample):
        entry = detections_entry(Detection2DArray.deserialize(sample.payload.to_bytes()))
        entry["attachment"] = _parse_attachment(sample)
        log.write(json.dumps(entry) + "\n")

    d = args.domain
    subscribers = [
        session.declare_subscriber(key(d, "/tinysam/masks", "sensor_msgs/msg/Image"), on_masks),
        session.declare_subscriber(key(d, "/tinysam/detections", "vision_msgs/msg/Detection2DArray"), on_detections),
        session.declare_subscriber(key(d, "/tinysam/overlay/compressed", "sensor_msgs/msg/CompressedImage"), on_overlay),
    ]
    prompts_key = key(d, "/tinysam/prompts", "vision_msgs/msg/Detection2DArray")
    prompts = session.declare_publisher(prompts_key)
    points = session.declare_publisher(key(d, "/tinysam/points", "geometry_msgs/msg/PointStamped"))
    gid = hashlib.sha256(str(session.zid()).encode()).digest()[:16]
    boxes = [[float(v) for v in b.split(",")] for b in args.boxes.split(";") if b]
    point = [float(v) for v in args.point.split(",")] if args.point else None
    sequence = 0
    next_publish = 0.0
    while not stop and time.time() < end:
        now = time.time()
        if now >= next_publish:
            next_publish = now + 1.0
            sequence += 1
            header = Header(stamp=Time(sec=int(now), nanosec=0), frame_id="camera")
            if boxes:
                message = Detection2DArray(header=header, detections=[box_detection(*b, header) for b in boxes])
                prompts.put(message.serialize(use_version_2=False), attachment=_attachment(sequence, gid))
            if point:
                message = PointStamped(header=header, point=Point(x=point[0], y=point[1], z=0.0))
                points.put(message.serialize(use_version_2=False), attachment=_attachment(sequence, gid))
            if args.garbage:
                prompts.put(TruncatedArray(header=header).serialize(use_version_2=False),
                            attachment=_attachment(sequence, gid))
            graph = sorted(str(r.ok.key_expr) for r in session.liveliness().get(f"@ros2_lv/{d}/**") if r.ok)
            (args.out / "graph.json.tmp").write_text(json.dumps(graph))
            (args.out / "graph.json.tmp").replace(args.out / "graph.json")
        time.sleep(0.05)
    for s in subscribers:
        s.undeclare()
    session.close()


if __name__ == "__main__":
    main()
