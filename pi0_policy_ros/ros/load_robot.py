"""A robot that floods the policy node with inputs, in its own process: the load test and
`pi0-policy load-bench`.

It publishes every configured camera (one fixed frame each, raw rgb8 or JPEG as the camera's type)
at `camera_rate_hz` and `joint_states` (the node's joint names) at `joint_rate_hz`, stamped with
the wall clock, on an absolute schedule (no drift) for `duration_s`. The messages are built once
and only their stamps change, so the publisher costs little CPU (~0.1 core at 3 x 60 Hz + 1 kHz):
on a small machine it must not compete with the node it loads. Its own process, as on a real
robot: it does not compete for the node's GIL either.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from sensor_msgs.msg import CompressedImage, Image, JointState

from pi0_policy_ros.ros.params import CameraConfig
from pi0_policy_ros.ros.qos import SENSOR_QOS

FRAME_SHAPE = (120, 160)  # as the demo's: small frames need no DDS transport tuning
DISCOVERY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class LoadSpec:
    """What the robot publishes: topics of `cameras` and `joint_states` under `namespace`."""

    cameras: tuple[CameraConfig, ...]
    joint_names: tuple[str, ...]
    namespace: str
    duration_s: float
    camera_rate_hz: float
    joint_rate_hz: float


@dataclass(frozen=True)
class LoadReport:
    """Messages sent; `connected`: every topic had a subscriber before the schedule started."""

    images_sent: int
    joint_states_sent: int
    connected: bool


def _frame_message(camera: CameraConfig, index: int) -> Image | CompressedImage:
    h, w = FRAME_SHAPE
    rgb = ((np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) * (index + 3)) % 251).astype(np.uint8)
    if camera.compressed:
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
        if not ok:
            raise RuntimeError("OpenCV could not encode the load robot's JPEG frame")
        return CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
    return Image(height=h, width=w, encoding="rgb8", step=w * 3, data=rgb.tobytes())


def publish_load(spec: LoadSpec, on_start: Callable[[], None] | None = None) -> LoadReport:
    """Publish for `spec.duration_s` (blocking), with a private rclpy context. on_start: called once
    the subscribers are matched (or discovery timed out), just before the first message."""
    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("load_robot", namespace=spec.namespace, context=context)
    try:
        frames = [_frame_message(camera, i) for i, camera in enumerate(spec.cameras)]
        image_pubs = [node.create_publisher(type(frame), camera.topic, SENSOR_QOS)
                      for frame, camera in zip(frames, spec.cameras)]
        joint_pub = node.create_publisher(JointState, "joint_states", SENSOR_QOS)
        joints = JointState(name=list(spec.joint_names), position=[0.1] * len(spec.joint_names))
        pubs = [*image_pubs, joint_pub]
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while not all(p.get_subscription_count() > 0 for p in pubs) and time.monotonic() < deadline:
            time.sleep(0.05)
        connected = all(p.get_subscription_count() > 0 for p in pubs)
        if on_start is not None:
            on_start()
        start = time.monotonic()
        next_image_s = next_joint_s = start
        images_sent = joints_sent = 0
        while (now := time.monotonic()) < start + spec.duration_s:
            stamp = node.get_clock().now().to_msg()
            if now >= next_joint_s:
                joints.header.stamp = stamp
                joint_pub.publish(joints)
                joints_sent += 1
                next_joint_s += 1.0 / spec.joint_rate_hz
            if now >= next_image_s:
                for frame, pub in zip(frames, image_pubs):
                    frame.header.stamp = stamp
                    pub.publish(frame)
                images_sent += len(frames)
                next_image_s += 1.0 / spec.camera_rate_hz
            time.sleep(max(0.0, min(next_joint_s, next_image_s) - time.monotonic()))
        return LoadReport(images_sent, joints_sent, connected)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)


_STARTED = "started"


def _child_main(spec: LoadSpec, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ended by LoadRobot (finish, stop), as the demo's robot
    results.put(publish_load(spec, on_start=lambda: results.put(_STARTED)))


class LoadRobot:
    """`publish_load` in a spawned child process: start(), wait_started(), then finish() for its report."""

    def __init__(self, spec: LoadSpec) -> None:
        mp = multiprocessing.get_context("spawn")
        self._results = mp.Queue()
        self.process = mp.Process(target=_child_main, args=(spec, self._results), name="load_robot", daemon=True)
        self.spec = spec

    def start(self) -> "LoadRobot":
        self.process.start()
        return self

    def wait_started(self, timeout_s: float = 60.0) -> None:
        """Until the child publishes its first message (spawning and discovery take seconds)."""
        if self._get(timeout_s) != _STARTED:
            raise RuntimeError("the load robot reported before it started")

    def finish(self, timeout_s: float = 30.0) -> LoadReport:
        """Waits for the schedule to end; raises RuntimeError if the child failed."""
        report = self._get(self.spec.duration_s + timeout_s)
        self.process.join(timeout=timeout_s)
        return report

    def _get(self, timeout_s: float) -> Any:
        try:
            return self._results.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"the load robot did not answer within {timeout_s:g} s (exit code "
                               f"{self.process.exitcode})") from None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5.0)

    def pid(self) -> int | None:
        return self.process.pid
