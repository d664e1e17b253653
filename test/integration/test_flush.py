"""The last messages before a publisher goes (ros/node.py `flush_publisher`).

DDS drops what a deleted writer had not delivered. Cleanup and shutdown destroy the trajectory
publisher right after the hold point, so they first wait (at most FLUSH_TIMEOUT_S) for every
matched reliable subscriber to acknowledge what it sent, and name the topic when one did not.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from rcl_interfaces.msg import Log
from rclpy.lifecycle import TransitionCallbackReturn

from test.integration.harness import wait_for
from pi0_policy_ros.ros.node import FLUSH_TIMEOUT_S

SUCCESS = TransitionCallbackReturn.SUCCESS

# A reliable subscriber in its own process, so that SIGSTOP stalls its DDS threads (a controller
# host that froze) while it stays matched.
SUBSCRIBER = """
import sys
import rclpy
from rclpy.node import Node
from trajectory_msgs.msg import JointTrajectory
from pi0_policy_ros.ros.qos import COMMAND_QOS
rclpy.init()
node = Node("stalled_controller")
node.create_subscription(JointTrajectory, sys.argv[1], lambda msg: None, COMMAND_QOS)
print("ready", flush=True)
rclpy.spin(node)
"""


def test_a_subscriber_that_stops_acknowledging_is_named_when_the_publishers_go(make_node, probe,
                                                                              namespace: str) -> None:
    node = make_node()
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    topic = f"{namespace}/{node.get_name()}/joint_trajectory"
    subscriber = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, topic], stdout=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout is not None and subscriber.stdout.readline().strip() == "ready"
        wait_for(lambda: node.count_subscribers(topic) >= 2, timeout_s=20.0)  # the probe and the subscriber
        subscriber.send_signal(signal.SIGSTOP)
        sent = probe.counts()[0]
        wait_for(lambda: probe.counts()[0] >= sent + 2)  # trajectories the stalled subscriber cannot acknowledge
        assert node.trigger_deactivate() == SUCCESS and node.trigger_cleanup() == SUCCESS
        line = (f"not acknowledged by every subscriber within {FLUSH_TIMEOUT_S:g} s, may be lost: "
                f"the last messages on {topic}")
        warnings = wait_for(lambda: probe.log_lines(Log.WARN, "not acknowledged"))
        assert warnings == [line]  # once, for the trajectory alone (the chunk topics are not waited for)
    finally:
        subscriber.kill()
        subscriber.wait()
