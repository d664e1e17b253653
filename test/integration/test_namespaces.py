"""Two policy nodes in two namespaces on one DDS domain: two robots on one machine, each with the
launch file's remappings, as `ros2 launch ... namespace:=robot1` and `namespace:=robot2` start them."""

from __future__ import annotations

import time
from typing import Any, Callable

import rclpy
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from diagnostic_msgs.msg import DiagnosticArray
from trajectory_msgs.msg import JointTrajectory

from test.fakes import FakePolicy
from test.integration.conftest import BASE_PARAMS
from test.integration.harness import TRAJECTORY_READER_QOS, Probe, wait_for
from pi0_policy_ros.ros.node import PolicyNode
from pi0_policy_ros.ros.params import LAUNCH_REMAPPINGS
from pi0_policy_ros.ros.qos import DIAGNOSTICS_READER_QOS

SUCCESS = TransitionCallbackReturn.SUCCESS
# What a node publishes or subscribes outside its namespace by design.
GLOBAL_TOPICS = {"/diagnostics", "/parameter_events", "/rosout"}


def _launched_node(attach: Callable[[Any], Any], namespace: str) -> PolicyNode:
    remaps = [arg for source, target in LAUNCH_REMAPPINGS for arg in ("-r", f"{source}:={target}")]
    overrides = [Parameter(k, value=v) for k, v in BASE_PARAMS.items()]
    return attach(PolicyNode(namespace=namespace, parameter_overrides=overrides, cli_args=["--ros-args", *remaps],
                             policy_factory=lambda cfg: FakePolicy(cfg)))


def _controller(attach: Callable[[Any], Any], namespace: str) -> list[JointTrajectory]:
    """What joint_trajectory_controller of a ros2_control stack in `namespace` receives."""
    received: list[JointTrajectory] = []
    node = attach(rclpy.create_node("joint_trajectory_controller", namespace=namespace))
    node.create_subscription(JointTrajectory, "joint_trajectory_controller/joint_trajectory", received.append,
                             TRAJECTORY_READER_QOS)
    return received


def test_each_launched_node_acts_only_on_its_own_robot(attach, namespace: str) -> None:
    # The launch file remapped joint_states to /joint_states and the trajectory to
    # /joint_trajectory_controller/joint_trajectory: under namespace:=robot1 and robot2 both nodes
    # read the same joint states and commanded the same controller, and neither reached the
    # controller of a ros2_control stack in its namespace (/robot1/joint_trajectory_controller/...).
    robots = [f"{namespace}_robot1", f"{namespace}_robot2"]
    nodes = [_launched_node(attach, ns) for ns in robots]
    for ns in robots:
        attach(Probe(ns))  # the robot: cameras and joint_states (joint_state_broadcaster) in its namespace
    controllers = [_controller(attach, ns) for ns in robots]
    for node, ns in zip(nodes, robots):
        topics = {s.topic_name for s in node.subscriptions} | {p.topic_name for p in node.publishers}
        assert node.trigger_configure() == SUCCESS
        topics |= {s.topic_name for s in node.subscriptions} | {p.topic_name for p in node.publishers}
        assert {t for t in topics - GLOBAL_TOPICS if not t.startswith(f"{ns}/")} == set()
        assert f"{ns}/joint_trajectory_controller/joint_trajectory" in topics
    for active, idle in ((0, 1), (1, 0)):
        assert nodes[active].trigger_activate() == SUCCESS
        wait_for(lambda: len(controllers[active]) >= 3, describe=lambda: f"{[len(c) for c in controllers]}")
        assert nodes[active].trigger_deactivate() == SUCCESS
        time.sleep(0.2)  # in flight
        assert controllers[idle] == []
        controllers[active].clear()


def test_diagnostics_of_two_robots_have_names_of_their_own(attach, namespace: str) -> None:
    # Both statuses were named `pi0_policy: control`: diagnostic_aggregator and rqt_robot_monitor key
    # statuses by name, so the two robots showed as one entry, whichever reported last.
    robots = [f"{namespace}_robot1", f"{namespace}_robot2"]
    nodes = [_launched_node(attach, ns) for ns in robots]
    statuses: dict[str, str] = {}  # hardware_id -> name
    listener = attach(rclpy.create_node("diagnostics_listener", namespace=namespace))
    listener.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda msg: statuses.update((s.hardware_id, s.name) for s in msg.status),
                                 DIAGNOSTICS_READER_QOS)
    for node in nodes:
        assert node.trigger_configure() == SUCCESS
    fqns = [f"{ns}/pi0_policy" for ns in robots]
    wait_for(lambda: all(f in statuses for f in fqns), describe=lambda: f"{statuses}")
    assert [statuses[f] for f in fqns] == [f"{f.lstrip('/')}: control" for f in fqns]
