"""A minimal /diagnostics publisher (diagnostic_updater is not on PyPI): one status per report."""

from __future__ import annotations

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from std_msgs.msg import Header

from pi0_policy_ros.control.monitor import HealthReport
from pi0_policy_ros.ros.params import diagnostics_status_name
from pi0_policy_ros.ros.qos import DIAGNOSTICS_QOS

TOPIC = "/diagnostics"


def diagnostic_array(report: HealthReport, name: str, hardware_id: str, stamp: Time) -> DiagnosticArray:
    status = DiagnosticStatus(
        level=bytes([report.level]),
        name=name,
        message=report.message,
        hardware_id=hardware_id,
        values=[KeyValue(key=k, value=v) for k, v in report.values.items()],
    )
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])


class DiagnosticsPublisher:
    """Publishes a `HealthReport` as `<namespace>/<node name>: control` on /diagnostics.

    A plain publisher, not a lifecycle one: a supervisor should see why the node is inactive.
    """

    def __init__(self, node: Node, task: str = "control") -> None:
        self._node = node
        self._name = diagnostics_status_name(node.get_fully_qualified_name(), task)
        self._hardware_id = node.get_fully_qualified_name()
        self.publisher = node.create_publisher(DiagnosticArray, TOPIC, DIAGNOSTICS_QOS)

    def publish(self, report: HealthReport) -> None:
        stamp = self._node.get_clock().now().to_msg()
        self.publisher.publish(diagnostic_array(report, self._name, self._hardware_id, stamp))
