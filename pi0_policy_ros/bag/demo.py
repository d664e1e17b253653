"""`pi0-policy demo-bag OUT`: a synthetic robot recording for demos and tests.

Each camera of the robot profile publishes at 30 Hz and the joint states at 100 Hz, on the topics
a parameter file gives the node (`--params`), or else on the defaults of the profile: the first
camera raw `sensor_msgs/Image` (rgb8) on `<name>/image_raw`, the others JPEG
`sensor_msgs/CompressedImage` on `<name>/image_raw/compressed`. Frames show shapes that move, so
consecutive images differ; joints follow slow sines. Everything is a function of time only, so
the same arguments give the same bag.

Stamps: the message header holds the capture time, the bag records it a little later (the
transport delay), and the cameras are a few milliseconds apart, as on a robot.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from pi0_policy_ros.bag.inputs import (COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, JOINT_STATE_TYPE, load_params_file,
                                       resolve_topic)
from pi0_policy_ros.bag.record import DISTROS, STORAGES, OutputBag
from pi0_policy_ros.errors import Pi0PolicyError
from pi0_policy_ros.policy.robots import PROFILES, configured_profile
from pi0_policy_ros.ros.params import NodeConfig, check_topic_name, config_from_params, node_namespace

NS_PER_S = 1_000_000_000
CAMERA_RATE_HZ = 30.0
JOINT_RATE_HZ = 100.0
CAMERA_OFFSET_NS = 3_000_000  # camera i is captured i * 3 ms after camera 0
TRANSPORT_DELAY_NS = 1_000_000  # bag time = header stamp + 1 ms
DEFAULT_START_S = 1_700_000_000  # an epoch time, like a real recording
JPEG_QUALITY = 90
MAX_IMAGE_SIDE = 4096  # pixels: 4K cameras fit


@dataclass(frozen=True)
class DemoTopics:
    """The node configuration the bag is made for (resolved: joint names are filled in)."""

    config: NodeConfig
    namespace: str

    def camera_topic(self, index: int) -> str:
        return resolve_topic(self.config.cameras[index].topic, self.namespace)

    @property
    def joint_states_topic(self) -> str:
        return resolve_topic("joint_states", self.namespace)


# Three cameras, as config/demo.yaml (the LIBERO profiles have two).
DEFAULT_PROFILE = "pi05_aloha"


def demo_topics(profile: str | None = None, params_file: str | Path | None = None,
                namespace: str = "/") -> DemoTopics:
    """The node configuration from `params_file`, or the defaults of `profile` (see module doc)."""
    namespace = node_namespace(namespace)  # a bag on topics that ROS refuses could not be played
    if params_file is not None:
        values = load_params_file(params_file, namespace)
        if profile is not None:
            values["robot_profile"] = profile
    else:
        name = profile or DEFAULT_PROFILE
        if name not in PROFILES:
            raise Pi0PolicyError(f"unknown robot profile {name!r}; valid names: {sorted(PROFILES)}")
        robot = PROFILES[name]
        cameras = [camera for camera, _ in robot.camera_slots]
        joints = list(robot.joint_names) if len(robot.joint_names) == robot.state_dim else [
            f"joint_{i}" for i in range(robot.state_dim)]
        actions = list(robot.joint_names) if len(robot.joint_names) == robot.action_dim else [
            f"action_{i}" for i in range(robot.action_dim)]
        values = {"robot_profile": name, "camera_names": cameras,
                  "camera_types": ["raw"] + ["compressed"] * (len(cameras) - 1), "joint_names": joints,
                  "action_joint_names": actions if len(joints) != robot.action_dim else []}
    config = config_from_params(values)
    # Sized as the node's policy sizes it (profile_state_dim, ...: the generic profile); a file that
    # names no profile gets the demo's.
    named = dataclasses.replace(config.policy, robot_profile=values.get("robot_profile") or DEFAULT_PROFILE)
    topics = DemoTopics(config.resolve(configured_profile(named)), namespace)
    for i, camera in enumerate(topics.config.cameras):
        check_topic_name(topics.camera_topic(i), f"camera_topics[{i}] (camera {camera.name!r})")
    return topics


def render_frame(camera_index: int, t_s: float, width: int, height: int) -> np.ndarray:
    """uint8 RGB [height, width, 3]: a per-camera gradient, a circle and a square that move."""
    y, x = np.mgrid[0:height, 0:width]
    hue = (camera_index * 70) % 180
    base = np.empty((height, width, 3), np.uint8)
    base[..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
    base[..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
    base[..., 2] = hue
    frame = base // 2
    phase = 2.0 * math.pi * 0.25 * t_s + camera_index
    cx = int(width / 2 + 0.35 * width * math.cos(phase))
    cy = int(height / 2 + 0.35 * height * math.sin(2.0 * phase))
    radius = max(2, min(width, height) // 6)
    cv2.circle(frame, (cx, cy), radius, (255, 64 + 60 * camera_index % 192, 32), thickness=-1)
    sx = int((0.5 + 0.4 * math.sin(phase * 1.7)) * (width - radius))
    sy = int((0.5 + 0.4 * math.cos(phase * 1.3)) * (height - radius))
    cv2.rectangle(frame, (sx, sy), (sx + radius, sy + radius), (32, 220, 255 - 50 * camera_index % 255), -1)
    return frame


def joint_positions(joint_count: int, t_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities [joint_count] (rad, rad/s): slow sines, one frequency per joint."""
    j = np.arange(joint_count, dtype=np.float64)
    omega = 2.0 * math.pi * (0.2 + 0.05 * j)
    amplitude = 0.3 / (1.0 + 0.1 * j)
    return amplitude * np.sin(omega * t_s + j), amplitude * omega * np.cos(omega * t_s + j)


def _header(store: Any, stamp_ns: int, frame_id: str) -> Any:
    time_type = store.types["builtin_interfaces/msg/Time"]
    header_type = store.types["std_msgs/msg/Header"]
    return header_type(stamp=time_type(sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S), frame_id=frame_id)


def _events(topics: DemoTopics, start_ns: int, duration_s: float) -> Iterator[tuple[int, int, str, str, int]]:
    """(bag time, order, topic, kind, index) of every message, in bag-time order."""
    end_ns = start_ns + int(round(duration_s * NS_PER_S))
    events = []
    for i, _ in enumerate(topics.config.cameras):
        k = 0
        while (stamp := start_ns + i * CAMERA_OFFSET_NS + int(round(k * NS_PER_S / CAMERA_RATE_HZ))) < end_ns:
            events.append((stamp + TRANSPORT_DELAY_NS, i, topics.camera_topic(i), "camera", k))
            k += 1
    k = 0
    while (stamp := start_ns + int(round(k * NS_PER_S / JOINT_RATE_HZ))) < end_ns:
        events.append((stamp + TRANSPORT_DELAY_NS, len(topics.config.cameras), topics.joint_states_topic, "joints", k))
        k += 1
    yield from sorted(events)


def write_demo_bag(out: str | Path, topics: DemoTopics, duration_s: float = 5.0, width: int = 64,
                   height: int = 48, start_s: float = DEFAULT_START_S, storage: str = "mcap",
                   distro: str = "jazzy", overwrite: bool = False) -> int:
    """Write the bag; returns the number of messages."""
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise Pi0PolicyError(f"duration: expected > 0 s, found {duration_s!r}")
    if not (8 <= width <= MAX_IMAGE_SIDE and 8 <= height <= MAX_IMAGE_SIDE):
        # Past a camera's sizes the frames only exhaust memory (a numpy MemoryError traceback).
        raise Pi0PolicyError(f"image size: expected 8x8 to {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, found {width}x{height}")
    # Stamps are builtin_interfaces/Time (int32 seconds); the node refuses a zero stamp as unset.
    last_s = 2**31 - 1
    latest_start_s = last_s - duration_s
    if math.isfinite(start_s) and latest_start_s <= start_s < last_s:  # the start fits, the duration does not
        raise Pi0PolicyError(f"duration: expected at most {last_s - start_s:.0f} s after the start time {start_s:.0f} "
                             f"(a stamp's seconds are an int32: the last is {last_s}), found {duration_s:g} s")
    if not (math.isfinite(start_s) and 0 < start_s < latest_start_s):
        raise Pi0PolicyError(f"start time: expected seconds since the epoch > 0 and < {latest_start_s:.0f} "
                             f"(a stamp's seconds are an int32), found {start_s!r}")
    start_ns = int(round(start_s * NS_PER_S))
    joints = list(topics.config.joint_names)
    with OutputBag(out, storage=storage, distro=distro, overwrite=overwrite) as bag:
        store = bag.store
        for i, camera in enumerate(topics.config.cameras):
            bag.add_topic(topics.camera_topic(i), COMPRESSED_IMAGE_TYPE if camera.compressed else IMAGE_TYPE)
        bag.add_topic(topics.joint_states_topic, JOINT_STATE_TYPE)
        for t_ns, index, topic, kind, k in _events(topics, start_ns, duration_s):
            stamp_ns = t_ns - TRANSPORT_DELAY_NS
            t_s = (stamp_ns - start_ns) / NS_PER_S
            if kind == "joints":
                position, velocity = joint_positions(len(joints), t_s)
                msg = store.types[JOINT_STATE_TYPE](
                    header=_header(store, stamp_ns, "base_link"), name=joints, position=position,
                    velocity=velocity, effort=np.zeros(0, np.float64))
                bag.write_message(topic, JOINT_STATE_TYPE, t_ns, msg)
                continue
            camera = topics.config.cameras[index]
            frame = render_frame(index, t_s, width, height)
            header = _header(store, stamp_ns, f"{camera.name}_optical_frame")
            if camera.compressed:
                ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(frame[:, :, ::-1]),
                                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                assert ok, "OpenCV failed to encode a JPEG"
                msg = store.types[COMPRESSED_IMAGE_TYPE](header=header, format="rgb8; jpeg compressed bgr8",
                                                         data=jpeg.reshape(-1))
                bag.write_message(topic, COMPRESSED_IMAGE_TYPE, t_ns, msg)
            else:
                msg = store.types[IMAGE_TYPE](header=header, height=height, width=width, encoding="rgb8",
                                              is_bigendian=0, step=width * 3, data=frame.reshape(-1))
                bag.write_message(topic, IMAGE_TYPE, t_ns, msg)
        return bag.message_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="the bag directory to write (must not exist unless --overwrite)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of recording (default 5)")
    parser.add_argument("--profile", default=None,
                        help=f"robot profile, one of {sorted(PROFILES)} (default: the params file's, else "
                             f"{DEFAULT_PROFILE}: 3 cameras; libero has 2)")
    parser.add_argument("--params", default=None,
                        help="a node parameter file: write on its camera topics and types and joint names")
    parser.add_argument("--namespace", default="/", help="the node's namespace, for relative topics (default /)")
    parser.add_argument("--width", type=int, default=64, help="image width in pixels (default 64)")
    parser.add_argument("--height", type=int, default=48, help="image height in pixels (default 48)")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="mcap", help="bag storage (default mcap)")
    parser.add_argument("--distro", choices=sorted(DISTROS), default="jazzy",
                        help="message definitions to embed (default jazzy)")
    parser.add_argument("--start-time", type=float, default=DEFAULT_START_S,
                        help=f"first stamp, seconds since the epoch (default {DEFAULT_START_S})")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        topics = demo_topics(args.profile, args.params, args.namespace)
        count = write_demo_bag(args.out, topics, args.duration, args.width, args.height, args.start_time,
                               args.storage, args.distro, args.overwrite)
    except Pi0PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cameras = ", ".join(f"{topics.camera_topic(i)} ({'jpeg' if c.compressed else 'rgb8'})"
                        for i, c in enumerate(topics.config.cameras))
    print(f"wrote {args.out}: {count} messages over {args.duration:g} s; cameras {cameras}; "
          f"joint states {topics.joint_states_topic} ({len(topics.config.joint_names)} joints)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pi0_policy_ros.bag.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
