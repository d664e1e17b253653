"""QoS profiles of the node's topics (see notes/ros2.md, A3, for the matching rules).

- Sensors: best effort, depth 5 (rclpy's sensor-data profile). A best-effort reader matches both
  best-effort camera drivers and the reliable joint_state_broadcaster.
- Commands: reliable, volatile, depth 1: joint_trajectory_controller only needs the newest
  trajectory, and a reliable writer matches its SystemDefaults (reliable) reader.
- Action chunk and its stamp: reliable, depth 10, so that consumers can pair them in order.
- Prompt: reliable, volatile, depth 1; a volatile reader also matches transient-local writers.
- Diagnostics: reliable, depth 1, as diagnostic_updater: only the newest status matters. It also
  lets the last status be flushed at exit: a Fast DDS writer of depth 1 asks for acknowledgment
  with every sample (ack in ~6 ms on loopback), a deeper one only at its periodic heartbeat, every
  3 s (measured with rmw_fastrtps in Jazzy). Our own readers (load bench, tests) keep 10
  (DIAGNOSTICS_READER_QOS) so that a busy reader misses none; depth is not part of QoS
  compatibility, so either matches any aggregator.
"""

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

SENSOR_QOS: QoSProfile = qos_profile_sensor_data


def _reliable(depth: int) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


COMMAND_QOS = _reliable(1)
CHUNK_QOS = _reliable(10)
PROMPT_QOS = _reliable(1)
DIAGNOSTICS_QOS = _reliable(1)
DIAGNOSTICS_READER_QOS = _reliable(10)
