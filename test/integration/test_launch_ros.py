"""The shipped launch file on a real ROS install (launch_testing); skipped where `launch` is missing.

Run with `colcon test --packages-select pi0_policy_ros` or `launch_test test/integration/test_launch_ros.py`
after building. It starts the node with demo.yaml and autostart, then checks that it reaches
`active` and reports on /diagnostics.
"""

import time
import unittest

import pytest

launch_testing = pytest.importorskip("launch_testing")

import launch  # noqa: E402
import launch.actions  # noqa: E402
import launch.launch_description_sources  # noqa: E402
import rclpy  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402


@pytest.mark.launch_test
def generate_test_description():
    share = get_package_share_directory("pi0_policy_ros")
    include = launch.actions.IncludeLaunchDescription(
        launch.launch_description_sources.PythonLaunchDescriptionSource(f"{share}/launch/pi0_policy.launch.py"),
        launch_arguments={"params_file": f"{share}/config/demo.yaml", "namespace": "launch_test",
                          "autostart": "true"}.items())
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()])


class TestPolicyNodeComesUp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("launch_test_probe")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def test_reaches_active_and_reports(self):
        client = self.node.create_client(GetState, "/launch_test/pi0_policy/get_state")
        self.assertTrue(client.wait_for_service(timeout_sec=30.0))
        statuses = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: statuses.extend(m.status), 10)
        deadline = time.monotonic() + 120.0  # the CPU demo model loads and warms up first
        label = ""
        while time.monotonic() < deadline and label != "active":
            future = client.call_async(GetState.Request())
            rclpy.spin_until_future_complete(self.node, future, timeout_sec=5.0)
            label = future.result().current_state.label if future.result() else ""
            rclpy.spin_once(self.node, timeout_sec=0.5)
        self.assertEqual(label, "active")
        end = time.monotonic() + 10.0
        while time.monotonic() < end and not any(s.name == "launch_test/pi0_policy: control" for s in statuses):
            rclpy.spin_once(self.node, timeout_sec=0.2)
        self.assertTrue(any(s.name == "launch_test/pi0_policy: control" for s in statuses))


@launch_testing.post_shutdown_test()
class TestExit(unittest.TestCase):
    def test_exit_code(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
