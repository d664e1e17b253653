"""The QoS of every topic of the node, as ros/qos.py and notes/ros2.md (A3) give them, and the
writers they must match. The probe of the other tests uses the same profiles as the node (from
ros/qos.py), so a changed profile still matched it there; here the expectations are written out."""

from __future__ import annotations

from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from test.integration.harness import wait_for

SUCCESS = TransitionCallbackReturn.SUCCESS
BEST_EFFORT, RELIABLE = ReliabilityPolicy.BEST_EFFORT, ReliabilityPolicy.RELIABLE
VOLATILE = DurabilityPolicy.VOLATILE

# topic (relative to the namespace) -> (reliability, durability, depth)
PUBLISHED = {
    "pi0_policy/joint_trajectory": (RELIABLE, VOLATILE, 1),  # the newest command only, never replayed
    "pi0_policy/action_chunk": (RELIABLE, VOLATILE, 10),
    "pi0_policy/action_chunk_stamp": (RELIABLE, VOLATILE, 10),
}
SUBSCRIBED = {
    "cam_a/image_raw": (BEST_EFFORT, VOLATILE, 5),  # sensor data: matches best-effort cameras
    "cam_b/image_raw/compressed": (BEST_EFFORT, VOLATILE, 5),
    "joint_states": (BEST_EFFORT, VOLATILE, 5),  # and the reliable joint_state_broadcaster
    "pi0_policy/prompt": (RELIABLE, VOLATILE, 1),  # volatile: matches volatile and latched writers
}


def _profile(entity) -> tuple:  # noqa: ANN001
    qos = entity.qos_profile
    assert qos.history == HistoryPolicy.KEEP_LAST, entity.topic_name
    return qos.reliability, qos.durability, qos.depth


def test_every_topic_has_its_documented_qos(make_node, namespace: str) -> None:
    node = make_node()
    assert node.trigger_configure() == SUCCESS
    ours = {pub.topic_name: _profile(pub) for pub in node.publishers}
    for topic, expected in PUBLISHED.items():
        assert ours[f"{namespace}/{topic}"] == expected, topic
    assert ours["/diagnostics"] == (RELIABLE, VOLATILE, 1)  # as diagnostic_updater; see ros/qos.py
    subscribed = {sub.topic_name: _profile(sub) for sub in node.subscriptions}
    for topic, expected in SUBSCRIBED.items():
        assert subscribed[f"{namespace}/{topic}"] == expected, topic


def test_a_latched_prompt_and_a_default_qos_controller_match(make_node, probe, attach, namespace: str) -> None:
    """A transient-local prompt publisher (a latched task from a supervisor) reaches the node, and a
    reader with rclpy's default profile (reliable, as joint_trajectory_controller's SystemDefaults)
    receives the trajectories."""
    node = make_node()
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    other = attach(Node("supervisor", namespace=namespace))
    latched = QoSProfile(depth=1, reliability=RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    prompt_pub = other.create_publisher(String, "pi0_policy/prompt", latched)
    received: list[JointTrajectory] = []
    other.create_subscription(JointTrajectory, "pi0_policy/joint_trajectory", received.append, QoSProfile(depth=10))
    wait_for(lambda: prompt_pub.get_subscription_count() == 1)
    prompt_pub.publish(String(data="latched task"))
    wait_for(lambda: node.policy.calls and node.policy.calls[-1].prompt == "latched task")
    wait_for(lambda: len(received) >= 2)


# README's words for each group of topics, and the profile each topic of the group has above.
README_GROUPS = {
    "cameras and `joint_states`": ("cam_a/image_raw", "cam_b/image_raw/compressed", "joint_states"),
    "`~/prompt`": ("pi0_policy/prompt",),
    "`~/joint_trajectory`": ("pi0_policy/joint_trajectory",),
    "`~/action_chunk` and `~/action_chunk_stamp`": ("pi0_policy/action_chunk", "pi0_policy/action_chunk_stamp"),
}


def _words(reliability: ReliabilityPolicy, durability: DurabilityPolicy, depth: int) -> str:
    kind = "best effort" if reliability == BEST_EFFORT else "reliable"
    return f"{kind}, {'volatile' if durability == VOLATILE else 'transient local'}, depth {depth}"


def test_readme_gives_every_topic_its_qos() -> None:
    """An engineer wiring a camera driver, joint_state_broadcaster, a task publisher and a controller
    needs each topic's QoS (a best-effort prompt publisher never reaches the node): README named
    the cameras' sensor-data QoS only."""
    from test.paths import REPO_ROOT

    text = " ".join((REPO_ROOT / "README.md").read_text().split())
    for words, topics in README_GROUPS.items():
        profiles = {{**PUBLISHED, **SUBSCRIBED}[topic] for topic in topics}
        assert len(profiles) == 1, words
        assert f"{words} {_words(*profiles.pop())}" in text, words
