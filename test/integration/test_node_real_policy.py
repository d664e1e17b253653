"""The node with the real `Policy` over DDS: what it publishes equals `Policy.infer` on the same
observation, built independently here. Tiny pi0 with random weights on the pi0 LIBERO profile, so
the state (sent in reversed joint order) feeds both the state token and the delta actions."""

from __future__ import annotations

import threading
import time
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from pi0_policy_ros.policy.policy import Policy
from pi0_policy_ros.policy.types import Observation
from pi0_policy_ros.ros.convert import action_chunk_from_message
from pi0_policy_ros.ros.params import config_from_params
from pi0_policy_ros.ros.qos import CHUNK_QOS, COMMAND_QOS, PROMPT_QOS
from test.integration.harness import duration_s, wait_for

STATE_NAMES = [f"s{i}" for i in range(8)]
ACTION_NAMES = [f"a{i}" for i in range(7)]
STATE = np.linspace(-0.5, 0.5, 8)
AGENT_VIEW = (np.arange(48 * 64 * 3, dtype=np.uint32) % 251).astype(np.uint8).reshape(48, 64, 3)
WRIST = (255 - (np.arange(32 * 40 * 3, dtype=np.uint32) * 7) % 256).astype(np.uint8).reshape(32, 40, 3)
PARAMS = {
    "model_preset": "pi0_small", "robot_profile": "pi0_libero", "device": "cpu", "precision": "float32",
    "cpu_threads": 1, "seed": 3, "prompt": "put the bowl on the plate",
    "camera_names": ["image", "wrist_image"], "camera_types": ["raw", "compressed"],
    "camera_topics": ["agentview/image_raw", "wrist/image_raw/compressed"],
    "joint_names": STATE_NAMES, "action_joint_names": ACTION_NAMES,
    "control_rate_hz": 2.0, "max_observation_age_s": 2.0, "max_camera_skew_s": 1.0,
    # LIBERO's actions are end-effector deltas, kept off ~/joint_trajectory by default; this test
    # checks the trajectory against Policy.infer too.
    "trajectory_actions": "any",
}


class LiberoRobot(Node):
    """Publishes one fixed observation (raw rgb8 + lossless PNG + 8 joints) and records outputs."""

    def __init__(self, namespace: str, wrist: np.ndarray = WRIST) -> None:
        super().__init__("libero_robot", namespace=namespace)
        self.lock = threading.Lock()
        self.trajectories: list[JointTrajectory] = []
        self.chunks: list[Float32MultiArray] = []
        self.image = Image(height=48, width=64, encoding="rgb8", step=64 * 3, data=AGENT_VIEW.tobytes())
        self.wrist = CompressedImage()
        self.set_wrist(wrist)
        self._pubs = (self.create_publisher(Image, "agentview/image_raw", qos_profile_sensor_data),
                      self.create_publisher(CompressedImage, "wrist/image_raw/compressed", qos_profile_sensor_data),
                      self.create_publisher(JointState, "joint_states", 10))
        self.create_subscription(JointTrajectory, "pi0_policy/joint_trajectory", self._store(self.trajectories),
                                 COMMAND_QOS)
        self.create_subscription(Float32MultiArray, "pi0_policy/action_chunk", self._store(self.chunks), CHUNK_QOS)
        self.create_timer(0.05, self._publish)

    def set_wrist(self, image: np.ndarray) -> None:
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
        assert ok
        with self.lock:
            self.wrist = CompressedImage(header=self.wrist.header, format="rgb8; png compressed bgr8", data=png.tobytes())

    def _store(self, sink: list) -> Any:
        def callback(msg: Any) -> None:
            with self.lock:
                sink.append(msg)
        return callback

    def _publish(self) -> None:
        stamp = self.get_clock().now().to_msg()
        with self.lock:
            wrist = self.wrist
        self.image.header.stamp = wrist.header.stamp = stamp
        # Joint order reversed on the wire: the node must map by name.
        joints = JointState(name=STATE_NAMES[::-1], position=STATE[::-1].tolist())
        joints.header.stamp = stamp
        for pub, msg in zip(self._pubs, (self.image, wrist, joints)):
            pub.publish(msg)


@pytest.fixture
def robot(attach, namespace: str):
    return attach(LiberoRobot(namespace))


def test_published_chunk_equals_policy_infer(make_node, robot: LiberoRobot) -> None:
    node = make_node(params=PARAMS, policy_factory=Policy.from_config)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: len(robot.chunks) >= 2 and len(robot.trajectories) >= 2, timeout_s=60.0)
    node.trigger_deactivate()

    policy = Policy.from_config(config_from_params(PARAMS).policy)  # same seed: same random weights
    expected = policy.infer(Observation(images={"image": AGENT_VIEW, "wrist_image": WRIST},
                                        state=STATE.astype(np.float32), prompt=PARAMS["prompt"])).actions
    with robot.lock:
        chunks, trajectories = list(robot.chunks), list(robot.trajectories)
    for chunk in chunks:
        np.testing.assert_allclose(action_chunk_from_message(chunk), expected, rtol=0, atol=1e-5)
    period_s = policy.profile.action_period_s
    for msg in trajectories:
        assert msg.joint_names == ACTION_NAMES
        skipped = expected.shape[0] - len(msg.points)  # points already in the past were dropped
        assert 0 <= skipped < expected.shape[0]
        np.testing.assert_allclose([p.positions for p in msg.points], expected[skipped:], rtol=0, atol=1e-5)
        times = np.array([duration_s(p.time_from_start) for p in msg.points])
        assert times[0] >= 1.0 / PARAMS["control_rate_hz"] - 1e-6
        np.testing.assert_allclose(np.diff(times), period_s, atol=1e-6)


def test_cameras_resized_in_the_engine(make_node, attach, namespace: str) -> None:
    """camera_height / camera_width: the warm-up and every frame reach the engine at the cameras'
    size, and the chunk equals Policy.infer with the CPU resize. A camera that then sends another
    size holds the node with an error naming the size expected, and nothing is published."""
    wrist = np.ascontiguousarray(AGENT_VIEW[::-1, ::-1])  # the agent view's size, other pixels
    robot = attach(LiberoRobot(namespace, wrist=wrist))
    node = make_node(params=dict(PARAMS, camera_height=48, camera_width=64), policy_factory=Policy.from_config)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.policy.engine.shape.image_hw == (48, 64)
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: len(robot.chunks) >= 1, timeout_s=60.0)

    policy = Policy.from_config(config_from_params(PARAMS).policy)  # resizes on the CPU
    expected = policy.infer(Observation(images={"image": AGENT_VIEW, "wrist_image": wrist},
                                        state=STATE.astype(np.float32), prompt=PARAMS["prompt"])).actions
    with robot.lock:
        first = robot.chunks[0]
    np.testing.assert_allclose(action_chunk_from_message(first), expected, rtol=0, atol=1e-5)

    robot.set_wrist(WRIST)  # 32x40
    reason = "camera 'wrist_image': expected a uint8 RGB image [48, 64, 3]"
    wait_for(lambda: reason in node._monitor.report(0.0).values["last_hold_reason"], timeout_s=30.0)
    with robot.lock:
        published = len(robot.chunks)
    time.sleep(1.2)  # two more ticks at 2 Hz, both held
    with robot.lock:
        assert len(robot.chunks) == published
    node.trigger_deactivate()


def test_rtc_mode_guides_the_next_chunks(make_node, robot: LiberoRobot) -> None:
    """chunk_mode rtc: the policy is built with the guidance in its engine; the first chunk has
    no previous one (plain: equals Policy.infer), the later ones are pulled toward what the
    previous chunk still executes, so they differ from the plain chunk of the same observation."""
    params = dict(PARAMS, chunk_mode="rtc", execute_horizon=3, control_rate_hz=5.0)
    node = make_node(params=params, policy_factory=Policy.from_config)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.policy.engine.rtc_mode == "rtc" and node.policy.config.rtc_mode == "rtc"
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: len(robot.chunks) >= 3, timeout_s=60.0)
    node.trigger_deactivate()

    policy = Policy.from_config(config_from_params(PARAMS).policy)
    expected = policy.infer(Observation(images={"image": AGENT_VIEW, "wrist_image": WRIST},
                                        state=STATE.astype(np.float32), prompt=PARAMS["prompt"])).actions
    with robot.lock:
        chunks = [action_chunk_from_message(c) for c in robot.chunks]
    np.testing.assert_allclose(chunks[0], expected, rtol=0, atol=1e-5)
    for chunk in chunks[1:]:
        assert np.all(np.isfinite(chunk)) and np.abs(chunk - expected).max() > 1e-3


def test_a_blank_prompt_before_configure_holds_instead_of_failing_configure(make_node, robot: LiberoRobot) -> None:
    """A prompt of blanks on ~/prompt (or the parameter) before configure: the policy refuses it
    ("Prompt is required"), as it does '', so the active node must hold until a prompt comes, as
    it does for ''. The warm-up inferred with that prompt, and configure failed on it."""
    prompts = robot.create_publisher(String, "pi0_policy/prompt", PROMPT_QOS)
    node = make_node(params=dict(PARAMS, prompt=""), policy_factory=Policy.from_config)
    wait_for(lambda: prompts.get_subscription_count() >= 1)
    prompts.publish(String(data="   "))
    wait_for(lambda: node._prompt == "   ")
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: "Prompt is required" in node._monitor.report(0.0).values["last_hold_reason"], timeout_s=30.0)
    with robot.lock:
        assert not robot.chunks and not robot.trajectories
    prompts.publish(String(data=PARAMS["prompt"]))
    wait_for(lambda: len(robot.chunks) >= 1, timeout_s=60.0)
    node.trigger_deactivate()


def test_cpu_threads_go_back_at_cleanup_and_after_a_failed_configure(make_node) -> None:
    """cpu_threads is set when the policy is built, process-wide (torch.set_num_threads); 0 leaves
    torch's own count. After a configure with 1, cleanup, cpu_threads 0 and configure again, the
    process kept 1 thread (inference on one core, whatever the machine has), and a configure that
    failed after the policy was built kept them too: what configure sets must go with cleanup."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not the node's value, whatever earlier tests left
    try:
        node = make_node(params=PARAMS, policy_factory=Policy.from_config)  # cpu_threads 1
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert torch.get_num_threads() == 1
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert torch.get_num_threads() == 3
        topics = node.get_parameter("camera_topics").value
        assert node.set_parameters([Parameter("camera_topics", value=["bad topic", topics[1]])])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE  # after the policy was built
        assert torch.get_num_threads() == 3
        assert node.set_parameters([Parameter("camera_topics", value=topics),
                                    Parameter("cpu_threads", value=0)])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
