"""A probe node that plays the robot for integration tests, and a polling helper.

The probe publishes camera images and joint states on a timer and records what the policy node
publishes. Everything goes over DDS on loopback (see test/conftest.py for the domain settings).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Log
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Header, String
from trajectory_msgs.msg import JointTrajectory

from pi0_policy_ros.ros.params import diagnostics_status_name
from pi0_policy_ros.ros.qos import CHUNK_QOS, DIAGNOSTICS_READER_QOS, PROMPT_QOS

JOINTS = ["j0", "j1", "j2"]
# What rcl publishes /rosout with (rcl_qos_profile_rosout_default): a late subscriber still gets the log.
ROSOUT_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# The node's trajectory writer is depth 1 (COMMAND_QOS, as a controller needs only the newest). A
# reader of depth 1 keeps only the newest of two trajectories that arrive before its callback runs:
# a hold point sent a few ms after a chunk's trajectory (a transition waiting on that tick) replaced
# it whenever the probe's callbacks lagged, and a test counting trajectories against chunks saw one
# too few. The probe records every one, as it does the chunks (depth is not part of QoS matching).
TRAJECTORY_READER_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                                   durability=DurabilityPolicy.VOLATILE)
IMAGE_A = (np.arange(6 * 8 * 3, dtype=np.uint8) * 3).reshape(6, 8, 3)  # raw rgb8
IMAGE_B = (255 - np.arange(4 * 5 * 3, dtype=np.uint8) * 7).reshape(4, 5, 3)  # PNG: lossless


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, period_s: float = 0.02,
             describe: Callable[[], str] | None = None) -> Any:
    """predicate()'s first truthy value. The timeout only bounds a failure (a loaded 2-core CI
    machine can stall for seconds); describe() says what was seen instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"condition not met within {timeout_s} s" + (f"; {describe()}" if describe else ""))


def duration_s(d: Any) -> float:
    return d.sec + d.nanosec * 1e-9


def png_image(rgb: np.ndarray) -> CompressedImage:
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return CompressedImage(format="rgb8; png compressed bgr8", data=png.tobytes())


class Probe(Node):
    """Robot stand-in: cam_a raw rgb8 (PNG compressed with `png_a`), cam_b PNG compressed,
    joint_states (names in any order)."""

    def __init__(self, namespace: str, policy_node: str = "pi0_policy", rate_hz: float = 50.0,
                 png_a: bool = False) -> None:
        super().__init__("probe", namespace=namespace)
        self.lock = threading.Lock()
        self.state = np.array([0.1, -0.2, 0.3])
        self.state_names = list(JOINTS)  # the order published; positions follow it
        self.cameras_on = {"cam_a": True, "cam_b": True}
        # Tests replace these: the stamp source (default: this node's clock) and a JointState
        # published as given (names, positions) instead of the mapped state.
        self.stamp_fn: Callable[[], Any] | None = None
        self.joint_override: tuple[list[str], list[float]] | None = None
        # Held while publishing and while destroying: a timer callback already dispatched when the
        # test tears the probe down must not publish on destroyed publishers.
        self._publish_lock = threading.Lock()
        self._closed = False
        self.image_a = png_image(IMAGE_A) if png_a else Image(height=6, width=8, encoding="rgb8", step=24,
                                                             data=IMAGE_A.tobytes())
        self.image_b = png_image(IMAGE_B)
        self.trajectories: list[JointTrajectory] = []
        self.chunks: list[Float32MultiArray] = []
        self.stamps: list[Header] = []
        self.diagnostics: list[Any] = []  # DiagnosticStatus of the policy node only
        self._diagnostics_arrays = 0  # every node's, for summary()
        self._last_diagnostics_at: float | None = None
        self.logs: list[Log] = []  # /rosout of the policy node only: its log as an operator's tools see it
        self._pub_a = (self.create_publisher(CompressedImage, "cam_a/image_raw/compressed", qos_profile_sensor_data)
                       if png_a else self.create_publisher(Image, "cam_a/image_raw", qos_profile_sensor_data))
        self._pub_b = self.create_publisher(CompressedImage, "cam_b/image_raw/compressed", qos_profile_sensor_data)
        self._pub_js = self.create_publisher(JointState, "joint_states", 10)
        self.prompt_pub = self.create_publisher(String, f"{policy_node}/prompt", PROMPT_QOS)
        prefix = f"{policy_node}/"
        self.create_subscription(JointTrajectory, prefix + "joint_trajectory", self._store(self.trajectories),
                                 TRAJECTORY_READER_QOS)
        self.create_subscription(Float32MultiArray, prefix + "action_chunk", self._store(self.chunks), CHUNK_QOS)
        self.create_subscription(Header, prefix + "action_chunk_stamp", self._store(self.stamps), CHUNK_QOS)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, DIAGNOSTICS_READER_QOS)
        self.create_subscription(Log, "/rosout", self._on_log, ROSOUT_QOS)
        self._logger_name = ".".join([*namespace.strip("/").split("/"), policy_node]).lstrip(".")
        self._hardware_id = f"{namespace.rstrip('/')}/{policy_node}"
        self._status_name = diagnostics_status_name(self._hardware_id)
        self._timer = self.create_timer(1.0 / rate_hz, self.publish_inputs)

    def _store(self, sink: list) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            with self.lock:
                sink.append(msg)
        return callback

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self.lock:
            self._diagnostics_arrays += 1
            self._last_diagnostics_at = time.monotonic()
            self.diagnostics.extend(s for s in msg.status
                                    if s.name == self._status_name and s.hardware_id == self._hardware_id)

    def _on_log(self, msg: Log) -> None:
        if msg.name == self._logger_name:
            with self.lock:
                self.logs.append(msg)

    def log_lines(self, level: int | None = None, contains: str = "") -> list[str]:
        """The policy node's log messages so far (at `level` if given) that contain `contains`."""
        with self.lock:
            return [m.msg for m in self.logs if (level is None or m.level == level) and contains in m.msg]

    def publish_image_a(self, msg: Image) -> None:
        """One extra cam_a frame, besides the timer's."""
        self._pub_a.publish(msg)

    def destroy_node(self) -> None:
        with self._publish_lock:
            self._closed = True
        super().destroy_node()

    def publish_inputs(self) -> None:
        with self._publish_lock:
            if not self._closed:
                self._publish_inputs()

    def _publish_inputs(self) -> None:
        with self.lock:
            on = dict(self.cameras_on)
            names, state = list(self.state_names), self.state.copy()
            stamp_fn, override = self.stamp_fn, self.joint_override
        stamp = stamp_fn() if stamp_fn is not None else self.get_clock().now().to_msg()
        if on["cam_a"]:
            self.image_a.header.stamp = stamp
            self._pub_a.publish(self.image_a)
        if on["cam_b"]:
            self.image_b.header.stamp = stamp
            self._pub_b.publish(self.image_b)
        order = [JOINTS.index(n) if n in JOINTS else None for n in names]
        positions = [float(state[i]) if i is not None else 42.0 for i in order]
        if override is not None:
            names, positions = override
        msg = JointState(name=names, position=positions)
        msg.header.stamp = stamp
        self._pub_js.publish(msg)

    def publish_joint_state(self, names: list[str], positions: list[float], stamp: Any) -> None:
        """One extra JointState, besides the timer's."""
        msg = JointState(name=names, position=positions)
        msg.header.stamp = stamp
        self._pub_js.publish(msg)

    def counts(self) -> tuple[int, int, int]:
        with self.lock:
            return len(self.trajectories), len(self.chunks), len(self.stamps)

    def latest_values(self, contains: str = "") -> dict[str, str]:
        """The key/values of the latest status whose message contains `contains` ({} if none)."""
        status = self.latest_status(contains)
        return {} if status is None else {kv.key: kv.value for kv in status.values}

    def latest_status(self, contains: str = "") -> Any:
        with self.lock:
            for status in reversed(self.diagnostics):
                if contains in status.message:
                    return status
        return None

    def call(self, srv_type: Any, service: str, request: Any, timeout_s: float = 10.0) -> Any:
        """One call of `service` (the node's parameter services, as `ros2 param` makes them): the response."""
        client = self.create_client(srv_type, service)
        try:
            assert client.wait_for_service(timeout_sec=timeout_s), f"no service {service}"
            future = client.call_async(request)
            return wait_for(lambda: future.done() and future.result(), timeout_s=timeout_s,
                            describe=lambda: f"{service}: no response")
        finally:
            self.destroy_client(client)

    def summary(self) -> str:
        """What the probe has received so far (a failed wait_for's message)."""
        with self.lock:
            last = self._last_diagnostics_at
            ago = "never" if last is None else f"{time.monotonic() - last:.2f} s ago"
            latest = {kv.key: kv.value for kv in self.diagnostics[-1].values} if self.diagnostics else None
            return (f"probe received {len(self.trajectories)} trajectories, {len(self.chunks)} chunks, "
                    f"{len(self.stamps)} stamps, {self._diagnostics_arrays} /diagnostics arrays (last {ago}), "
                    f"{len(self.diagnostics)} statuses of the policy node (latest: {latest}), "
                    f"{len(self.logs)} log lines")

    def clear(self) -> None:
        with self.lock:
            self.trajectories.clear()
            self.chunks.clear()
            self.stamps.clear()
            self.diagnostics.clear()
