"""An independent ROS 2 peer for the bridge's tests: Eclipse Cyclone DDS (the `cyclonedds` wheel,
which ships the C library), with the ROS 2 message types written here from their `.msg`
definitions, not from our Rust code.

It subscribes to `rt/tinysam/masks` (best effort) and `rt/tinysam/detections` (reliable) and
writes what arrives under --out: one JSON line per message in `messages.jsonl`, label images as
`.npy` files. With --boxes / --point it also publishes prompts on `rt/tinysam/prompts` and
`rt/tinysam/points` once a second; with --garbage, a message on `rt/tinysam/prompts` that is
not a Detection2DArray. Runs until SIGTERM or --seconds.

    python peer.py --out DIR [--boxes "x0,y0,x1,y1;..."] [--point x,y] [--garbage]
"""

import argparse
import json
import math
import pathlib
import signal
import time
from dataclasses import dataclass

import numpy as np
from cyclonedds.core import Policy, Qos
from cyclonedds.domain import DomainParticipant
from cyclonedds.idl import IdlStruct, types
from cyclonedds.pub import DataWriter
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration


@dataclass
class Time(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
    sec: types.int32
    nanosec: types.uint32


@dataclass
class Header(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
    stamp: Time
    frame_id: str


@dataclass
class Image(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
    header: Header
    height: types.uint32
    width: types.uint32
    encoding: str
    is_bigendian: types.uint8
    step: types.uint32
    data: types.sequence[types.uint8]


@dataclass
class CompressedImage(IdlStruct, typename="sensor_msgs::msg::dds_::CompressedImage_"):
    header: Header
    format: str
    data: types.sequence[types.uint8]


@dataclass
class Point(IdlStruct, typename="geometry_msgs::msg::dds_::Point_"):
    x: float
    y: float
    z: float


@dataclass
class Quaternion(IdlStruct, typename="geometry_msgs::msg::dds_::Quaternion_"):
    x: float
    y: float
    z: float
    w: float


@dataclass
class Pose(IdlStruct, typename="geometry_msgs::msg::dds_::Pose_"):
    position: Point
    orientation: Quaternion


@dataclass
class PoseWithCovariance(IdlStruct, typename="geometry_msgs::msg::dds_::PoseWithCovariance_"):
    pose: Pose
    covariance: types.array[float, 36]


@dataclass
class PointStamped(IdlStruct, typename="geometry_msgs::msg::dds_::PointStamped_"):
    header: Header
    point: Point


@dataclass
class Point2D(IdlStruct, typename="vision_msgs::msg::dds_::Point2D_"):
    x: float
    y: float


@dataclass
class Pose2D(IdlStruct, typename="vision_msgs::msg::dds_::Pose2D_"):
    position: Point2D
    theta: float


@dataclass
class BoundingBox2D(IdlStruct, typename="vision_msgs::msg::dds_::BoundingBox2D_"):
    center: Pose2D
    size_x: float
    size_y: float


@dataclass
class ObjectHypothesis(IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesis_"):
    class_id: str
    score: float


@dataclass
class ObjectHypothesisWithPose(IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesisWithPose_"):
    hypothesis: ObjectHypothesis
    pose: PoseWithCovariance


@dataclass
class Detection2D(IdlStruct, typename="vision_msgs::msg::dds_::Detection2D_"):
    header: Header
    results: types.sequence[ObjectHypothesisWithPose]
    bbox: BoundingBox2D
    id: str


@dataclass
class Detection2DArray(IdlStruct, typename="vision_msgs::msg::dds_::Detection2DArray_"):
    header: Header
    detections: types.sequence[Detection2D]


@dataclass
class TruncatedArray(IdlStruct, typename="vision_msgs::msg::dds_::Detection2DArray_"):
    """Not a Detection2DArray: the header alone, so the detections' length is missing."""

    header: Header


def box_detection(x0, y0, x1, y1, header):
    pose = PoseWithCovariance(
        pose=Pose(position=Point(x=0.0, y=0.0, z=0.0), orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=[0.0] * 36,
    )
    return Detection2D(
        header=header,
        results=[ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(class_id="prompt", score=1.0), pose=pose)],
        bbox=BoundingBox2D(
            center=Pose2D(position=Point2D(x=(x0 + x1) / 2, y=(y0 + y1) / 2), theta=0.0),
            size_x=x1 - x0,
            size_y=y1 - y0,
        ),
        id="",
    )


def image_entry(m, out, index):
    """A received label image as a log line; the first 50 are also saved as `.npy` under `out`."""
    entry = {
        "topic": "masks",
        "t": time.time(),
        "stamp": [m.header.stamp.sec, m.header.stamp.nanosec],
        "frame_id": m.header.frame_id,
        "width": m.width,
        "height": m.height,
        "encoding": m.encoding,
        "is_bigendian": m.is_bigendian,
        "step": m.step,
    }
    if index < 50:
        data = np.frombuffer(bytes(m.data), "<u2").reshape(m.height, m.width)
        name = f"masks-{index:03d}.npy"
        np.save(out / name, data)
        entry["npy"] = name
    return entry


def detections_entry(m):
    """A received Detection2DArray as a log line."""
    return {
        "topic": "detections",
        "t": time.time(),
        "stamp": [m.header.stamp.sec, m.header.stamp.nanosec],
        "frame_id": m.header.frame_id,
        "detections": [
            {
                "id": d.id,
                "frame_id": d.header.frame_id,
                "class_id": d.results[0].hypothesis.class_id if d.results else None,
                "score": d.results[0].hypothesis.score if d.results else math.nan,
                "center": [d.bbox.center.position.x, d.bbox.center.position.y],
                "theta": d.bbox.center.theta,
                "size": [d.bbox.size_x, d.bbox.size_y],
                "orientation_w": d.results[0].pose.pose.orientation.w if d.results else None,
            }
            for d in m.detections
        ],
    }


def peer_arguments(ap):
    """The options both peers take; returns a list that becomes non-empty on SIGTERM."""
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--domain", type=int, default=0)
    ap.add_argument("--boxes", default="", help="x0,y0,x1,y1;... (nan allowed: a malformed box)")
    ap.add_argument("--point", default="", help="x,y")
    ap.add_argument("--garbage", action="store_true")
    ap.add_argument("--seconds", type=float, default=600)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    return stop


def main():
    ap = argparse.ArgumentParser()
    stop = peer_arguments(ap)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dp = DomainParticipant(args.domain)
    best_effort = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(1))
    reliable = Qos(Policy.Reliability.Reliable(duration(seconds=1)), Policy.History.KeepLast(10))
    masks = DataReader(dp, Topic(dp, "rt/tinysam/masks", Image), qos=best_effort)
    detections = DataReader(dp, Topic(dp, "rt/tinysam/detections", Detection2DArray), qos=reliable)
    prompts = DataWriter(dp, Topic(dp, "rt/tinysam/prompts", Detection2DArray), qos=reliable)
    points = DataWriter(dp, Topic(dp, "rt/tinysam/points", PointStamped), qos=reliable)
    garbage = None
    if args.garbage:
        # Its own participant: a second type under the same topic name.
        dp2 = DomainParticipant(args.domain)
        garbage = DataWriter(dp2, Topic(dp2, "rt/tinysam/prompts", TruncatedArray), qos=reliable)

    boxes = [[float(v) for v in b.split(",")] for b in args.boxes.split(";") if b]
    point = [float(v) for v in args.point.split(",")] if args.point else None
    log = open(args.out / "messages.jsonl", "a", buffering=1)  # noqa: SIM115 (open until SIGTERM)
    images = 0
    end = time.time() + args.seconds
    next_publish = 0.0
    while not stop and time.time() < end:
        now = time.time()
        if now >= next_publish:
            next_publish = now + 1.0
            header = Header(stamp=Time(sec=int(now), nanosec=0), frame_id="camera")
            if boxes:
                prompts.write(Detection2DArray(header=header, detections=[box_detection(*b, header) for b in boxes]))
            if point:
                points.write(PointStamped(header=header, point=Point(x=point[0], y=point[1], z=0.0)))
            if garbage is not None:
                garbage.write(TruncatedArray(header=header))
        for m in masks.take(N=10):
            if isinstance(m, Image):
                log.write(json.dumps(image_entry(m, args.out, images)) + "\n")
                images += 1
        for m in detections.take(N=10):
            if isinstance(m, Detection2DArray):
                log.write(json.dumps(detections_entry(m)) + "\n")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
