"""End-to-end demo: the policy node and a synthetic robot node (its own process), over real DDS.

The robot publishes every configured camera at 30 Hz (moving shapes, JPEG or raw) and
`joint_states` at 100 Hz (slow sinusoids), and measures what comes back: the latency from an
observation's stamp to the arrival of the trajectory computed from it. The observation stamp
comes from `~/action_chunk_stamp`, paired in order with `~/joint_trajectory` (see node.py).
`run_demo` runs the policy node with its own rclpy context (so it can run inside another ROS
program or a test) and the robot in a child process, as on a real robot: the policy's inference
would otherwise starve the robot's publishers of the GIL.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Header
from trajectory_msgs.msg import JointTrajectory

from pi0_policy_ros.control.rate_meter import PERCENTILES
from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.ros import convert
from pi0_policy_ros.ros.node import (NODE_NAME, PolicyFactory, PolicyNode, finish_callbacks,
                                     forward_package_logging, make_executor, spin_until_shutdown,
                                     stop_forwarding_package_logging)
from pi0_policy_ros.ros.params import CameraConfig, load_params_file
from pi0_policy_ros.ros.qos import CHUNK_QOS, COMMAND_QOS, SENSOR_QOS

CAMERA_RATE_HZ = 30.0
JOINT_RATE_HZ = 100.0
IMAGE_SHAPE = (120, 160)  # small frames: no DDS transport tuning needed
JPEG_QUALITY = 85


@dataclass(frozen=True)
class DemoReport:
    """duration_s: time active; chunks: trajectories received; latency: obs stamp -> trajectory received."""

    duration_s: float
    chunks: int
    achieved_rate_hz: float
    target_rate_hz: float
    latency_ms: dict[str, float]

    def summary(self) -> str:
        latency = ", ".join(f"{k} {v:.1f} ms" for k, v in self.latency_ms.items()) or "n/a"
        return (f"{self.chunks} chunks in {self.duration_s:.1f} s: {self.achieved_rate_hz:.2f} Hz "
                f"(target {self.target_rate_hz:.2f} Hz); observation -> trajectory latency: {latency}")


def synthetic_frame(t_s: float, index: int, shape: tuple[int, int] = IMAGE_SHAPE) -> np.ndarray:
    """An RGB frame with a disc and a bar moving at a per-camera phase."""
    h, w = shape
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = (40 + 30 * index, 60, 90)
    phase = t_s * 1.5 + index * 2.1
    center = (int(w / 2 + w / 3 * math.cos(phase)), int(h / 2 + h / 3 * math.sin(phase)))
    cv2.circle(frame, center, max(4, h // 8), (230, 60, 40), -1)
    x = int((t_s * 40 + 30 * index) % w)
    cv2.rectangle(frame, (x, h - h // 5), (min(w - 1, x + w // 8), h - 1), (40, 200, 80), -1)
    return frame


class SyntheticRobot(Node):
    """Cameras at 30 Hz, joint_states at 100 Hz, and the latency of the node's output (its trajectory,
    or its chunk where it publishes no trajectory: `trajectory_actions`) as the robot sees it."""

    def __init__(self, cameras: Sequence[CameraConfig], joint_names: Sequence[str], *, namespace: str = "",
                 policy_node: str = NODE_NAME, context: Context | None = None, trajectory: bool = True) -> None:
        super().__init__("synthetic_robot", namespace=namespace, context=context)
        self._cameras = list(cameras)
        self._joint_names = list(joint_names)
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stamps: collections.deque[float] = collections.deque()
        self._arrivals: collections.deque[float] = collections.deque()
        self.latencies_ms: list[float] = []
        self.arrival_times_s: list[float] = []
        self._camera_pubs = [self.create_publisher(CompressedImage if c.compressed else Image, c.topic, SENSOR_QOS)
                             for c in self._cameras]
        self._joint_pub = self.create_publisher(JointState, "joint_states", 10)
        self.create_subscription(Header, f"{policy_node}/action_chunk_stamp", self._on_stamp, CHUNK_QOS)
        if trajectory:
            self.create_subscription(JointTrajectory, f"{policy_node}/joint_trajectory", self._on_output, COMMAND_QOS)
        else:
            self.create_subscription(Float32MultiArray, f"{policy_node}/action_chunk", self._on_output, CHUNK_QOS)
        self.create_timer(1.0 / CAMERA_RATE_HZ, self._publish_cameras)
        self.create_timer(1.0 / JOINT_RATE_HZ, self._publish_joints)

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _publish_cameras(self) -> None:
        stamp = self.get_clock().now().to_msg()
        t = time.monotonic() - self._t0
        for index, (camera, pub) in enumerate(zip(self._cameras, self._camera_pubs)):
            rgb = synthetic_frame(t, index)
            if camera.compressed:
                ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
            else:
                h, w = rgb.shape[:2]
                msg = Image(height=h, width=w, encoding="rgb8", step=w * 3, data=rgb.tobytes())
            msg.header.stamp = stamp
            msg.header.frame_id = camera.name
            pub.publish(msg)

    def _publish_joints(self) -> None:
        t = time.monotonic() - self._t0
        positions = [0.3 * math.sin(0.5 * t + i) for i in range(len(self._joint_names))]
        msg = JointState(name=self._joint_names, position=positions)
        msg.header.stamp = self.get_clock().now().to_msg()
        self._joint_pub.publish(msg)

    # The n-th stamp belongs to the n-th output; either may arrive first.
    def _on_stamp(self, msg: Header) -> None:
        with self._lock:
            self._stamps.append(convert.stamp_to_seconds(msg.stamp))
            self._pair()

    def _on_output(self, msg: JointTrajectory | Float32MultiArray) -> None:
        with self._lock:
            self._arrivals.append(self._now_s())
            self._pair()

    def _pair(self) -> None:
        while self._stamps and self._arrivals:
            stamp, arrival = self._stamps.popleft(), self._arrivals.popleft()
            self.latencies_ms.append((arrival - stamp) * 1e3)
            self.arrival_times_s.append(arrival)


def _robot_main(cameras: Sequence[CameraConfig], joint_names: Sequence[str], namespace: str, trajectory: bool,
                stop: Any, results: Any) -> None:
    """The robot's own process: the policy's inference must not starve it of the GIL, as on a real robot."""
    # The demo ends this process (the stop event, then terminate()): a Ctrl-C that reaches the whole
    # process group must not end it first, with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = Context()
    rclpy.init(context=context)
    robot = SyntheticRobot(cameras, joint_names, namespace=namespace, context=context, trajectory=trajectory)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(robot)
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.02)
        results.put((list(robot.latencies_ms), list(robot.arrival_times_s)))
    finally:
        executor.shutdown()
        robot.destroy_node()
        rclpy.try_shutdown(context=context)


def run_demo(params_file: str | Path, duration_s: float = 10.0, device: str | None = None,
             policy_factory: PolicyFactory | None = None, namespace: str = "",
             robot_process: bool = True) -> DemoReport:
    """Run the policy node from `params_file` against a synthetic robot for `duration_s` seconds.

    The policy node runs in this process (own rclpy context). robot_process: the robot runs in a
    spawned child process (True, realistic; it takes a few seconds to start publishing) or as a
    second node of this process (False: quick, fine when the policy is cheap, e.g. a fake).
    device: overrides the file's `device` parameter (e.g. "cpu"). policy_factory: as PolicyNode's.
    Raises ConfigError when the node fails to configure (the reason is in the node's log).
    """
    check_params_file(params_file, namespace)
    if not duration_s > 0:
        raise ConfigError(f"duration: expected > 0 s, found {duration_s}")
    if not math.isfinite(duration_s):  # time.sleep's OverflowError, after the node had started
        raise ConfigError(f"duration: expected a finite number of seconds, found {duration_s}")
    context = Context()
    rclpy.init(context=context)
    executor = make_executor(context)
    overrides = [Parameter("device", value=device)] if device else []
    policy_node = PolicyNode(namespace=namespace, context=context, policy_factory=policy_factory,
                             cli_args=["--ros-args", "--params-file", str(params_file)],
                             parameter_overrides=overrides)
    # The policy's own lines (a prompt over the token budget, ...) on /rosout, as the node's main() does,
    # at this process's level (pi0-policy --log-level).
    log_handler = forward_package_logging(policy_node.get_logger(), logging.getLogger().getEffectiveLevel())
    stop_spinning = threading.Event()
    spinner = threading.Thread(target=spin_until_shutdown, args=(executor, stop_spinning), daemon=True)
    mp = multiprocessing.get_context("spawn")
    stop, results = mp.Event(), mp.Queue()
    robot: Any = None  # the child process
    local_robot: SyntheticRobot | None = None
    try:
        executor.add_node(policy_node)
        spinner.start()
        if policy_node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise ConfigError(f"the policy node failed to configure with {params_file} (see its log)")
        config = policy_node.config
        assert config is not None
        if robot_process:
            robot = mp.Process(target=_robot_main, name="synthetic_robot", daemon=True,
                               args=(config.cameras, config.joint_names, namespace,
                                     policy_node.publishes_trajectory, stop, results))
            robot.start()
        else:
            local_robot = SyntheticRobot(config.cameras, config.joint_names, namespace=namespace, context=context,
                                         trajectory=policy_node.publishes_trajectory)
            executor.add_node(local_robot)
        # Time the demo from when the robot and the node see each other: DDS discovery (and the
        # spawned robot's start) take a few seconds that are not the policy's.
        _wait_until_connected(policy_node, timeout_s=30.0)
        if policy_node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise ConfigError("the policy node failed to activate (see its log)")
        start = time.monotonic()
        time.sleep(duration_s)
        policy_node.trigger_deactivate()
        active_s = time.monotonic() - start
        time.sleep(0.2)  # the last messages in flight
        stop.set()
        if local_robot is not None:
            latencies_ms, arrivals_s = local_robot.latencies_ms, local_robot.arrival_times_s
        else:
            latencies_ms, arrivals_s = results.get(timeout=10.0)
        return _report(latencies_ms, arrivals_s, active_s, config.control.control_rate_hz)
    finally:
        stop.set()
        if robot is not None:
            robot.join(timeout=5.0)
            if robot.is_alive():
                robot.terminate()
        # The spinner first: executor.shutdown() destroys what a wait in progress is still using.
        stop_spinning.set()
        if spinner.ident is not None:  # started
            spinner.join(timeout=5.0)
        finish_callbacks(executor, policy_node.get_logger())
        executor.shutdown()
        policy_node._release()
        stop_forwarding_package_logging(log_handler)
        policy_node.destroy_node()
        if local_robot is not None:
            local_robot.destroy_node()
        rclpy.try_shutdown(context=context)


def _wait_until_connected(node: PolicyNode, timeout_s: float) -> None:
    """Until every camera / joint_states subscription of the node has a publisher and the output
    the robot times (the trajectory, else the chunk) a subscriber, or ConfigError after `timeout_s`."""
    inputs = [s.topic_name for s in node.subscriptions if not s.topic_name.endswith("/prompt")]
    output = "/joint_trajectory" if node.publishes_trajectory else "/action_chunk"
    outputs = [p for p in node.publishers if p.topic_name.endswith(output)]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (inputs and all(node.count_publishers(t) > 0 for t in inputs)
                and outputs and all(p.get_subscription_count() > 0 for p in outputs)):
            return
        time.sleep(0.05)
    missing = [t for t in inputs if node.count_publishers(t) == 0]
    counts = [p.get_subscription_count() for p in outputs]
    raise ConfigError(f"the synthetic robot did not connect within {timeout_s:g} s; topics without a "
                      f"publisher: {missing}, {output[1:]} subscribers: {counts}")


def _report(latencies_ms: Sequence[float], arrivals_s: Sequence[float], active_s: float,
            target_rate_hz: float) -> DemoReport:
    latencies = np.asarray(latencies_ms, dtype=np.float64)
    latency = ({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(latencies, PERCENTILES))}
               if latencies.size else {})
    span_s = arrivals_s[-1] - arrivals_s[0] if len(arrivals_s) >= 2 else 0.0
    rate = (len(arrivals_s) - 1) / span_s if span_s > 0 else 0.0
    return DemoReport(duration_s=active_s, chunks=len(arrivals_s), achieved_rate_hz=rate,
                      target_rate_hz=target_rate_hz, latency_ms=latency)


def check_params_file(path: str | Path, namespace: str = "") -> None:
    """ConfigError unless `path` is a parameter file with a block for the node, and only the node's
    parameter names in it: rcl would refuse a missing file with an RCLInvalidROSArgsError traceback
    when the node is created, and silently ignore the rest."""
    if not Path(path).is_file():
        raise ConfigError(f"params file {path}: expected a ROS parameter file, found "
                          f"{'a directory' if Path(path).is_dir() else 'nothing'}")
    load_params_file(path, namespace or "/")


def default_params_file(name: str = "demo.yaml") -> Path:
    """`config/<name>` of a source checkout (editable install), else of the installed ROS package."""
    source = Path(__file__).resolve().parents[2] / "config" / name
    if source.is_file():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("pi0_policy_ros")) / "config" / name
    except (ImportError, LookupError) as exc:
        raise ConfigError(f"cannot find config/{name}: not in {source.parent} and no installed "
                          f"pi0_policy_ros share directory ({exc}); pass --params") from exc


def add_arguments(parser: Any) -> None:
    parser.add_argument("--params", default=None, help="parameter file (default: the package's config/demo.yaml, "
                        "or config/demo_cuda.yaml with --device cuda)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of active control (default: 10)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="override the file's device (cuda: full-size pi0.5 with random weights)")


def run(args: Any) -> int:
    params = Path(args.params) if args.params else default_params_file(
        "demo_cuda.yaml" if args.device == "cuda" else "demo.yaml")
    try:
        report = run_demo(params, duration_s=args.duration, device=args.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.chunks > 0 else 1
