"""Load and lifecycle faults (issue 8).

- Load: 3 cameras at 60 Hz and joint_states at 1 kHz from another process into the node, with a
  FakePolicy of 20 ms per inference. The control rate stays within 5 % of the unloaded one, callbacks
  keep up with what they take (receipt delay), queues stay bounded (sensor QoS depth 5: the rest is
  dropped in DDS), and memory levels off. Not the issue's setup: with the tiny model (CPU-bound eager
  inference, ~0.3 s a chunk) on a 2-core machine the same load takes the rate from 3.25 Hz to 1.88 Hz
  (58 %, measured once): the 1 kHz callbacks need most of the second core in Python.
  `PI0_LOAD_TEST_S` sets the loaded phase (default 60 s).
- Lifecycle: deactivate / activate 100 times: RSS and thread count stay flat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from std_msgs.msg import Header

from test.fakes import FakeProfile
from test.integration.harness import wait_for
from test.paths import REPO_ROOT
from pi0_policy_ros.ros.qos import CHUNK_QOS

SUCCESS = TransitionCallbackReturn.SUCCESS
LOAD_S = float(os.environ.get("PI0_LOAD_TEST_S", "60"))
BASELINE_S = 8.0
WARMUP_S = 3.0  # of each phase, not measured
RATE_HZ = 20.0
THREE_CAMERAS = FakeProfile(camera_slots={"cam_a": "base_0_rgb", "cam_b": "left_wrist_0_rgb",
                                          "cam_c": "right_wrist_0_rgb"})
PARAMS = {"camera_names": ["cam_a", "cam_b", "cam_c"], "camera_types": ["raw", "raw", "raw"],
          "control_rate_hz": RATE_HZ, "diagnostics_period_s": 0.5}


def status_value(name: str) -> int:
    """A field of /proc/self/status, in kB for memory or a count for Threads."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/self/status")


class ChunkCounter(Node):
    """Wall times at which chunk stamps arrive."""

    def __init__(self, namespace: str) -> None:
        super().__init__("chunk_counter", namespace=namespace)
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.create_subscription(Header, "pi0_policy/action_chunk_stamp", self._on_stamp, CHUNK_QOS)

    def _on_stamp(self, msg: Header) -> None:
        with self.lock:
            self.arrivals.append(time.monotonic())

    def rate_hz(self, start: float, end: float) -> float:
        with self.lock:
            return sum(start <= t < end for t in self.arrivals) / (end - start)


@pytest.fixture
def counter(attach, namespace: str):
    return attach(ChunkCounter(namespace))


def run_robot(namespace: str, seconds: float, camera_hz: float, joint_hz: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "test.integration.load_robot", namespace, str(seconds),
                             str(camera_hz), str(joint_hz)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)


def finish(robot: subprocess.Popen) -> dict[str, int]:
    out, _ = robot.communicate(timeout=30)
    assert robot.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def diagnostics_of(node) -> dict[str, str]:
    node._publish_diagnostics()  # the report's values, read here rather than over DDS
    return dict(node._monitor.report(node._now_s()).values)


def test_control_rate_holds_under_sensor_load(make_node, counter, namespace: str, record_property) -> None:
    node = make_node(params=PARAMS, profile=THREE_CAMERAS, latency_s=0.02)
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS

    robot = run_robot(namespace, BASELINE_S + 1.0, 15.0, 50.0)  # unloaded: ordinary sensor rates
    wait_for(lambda: counter.arrivals, timeout_s=10.0)
    t0 = time.monotonic() + WARMUP_S
    time.sleep(BASELINE_S - 1.0)
    baseline_hz = counter.rate_hz(t0, time.monotonic())
    finish(robot)

    before = diagnostics_of(node)
    robot = run_robot(namespace, LOAD_S + 1.0, 60.0, 1000.0)
    time.sleep(1.0 + WARMUP_S)
    t1, threads = time.monotonic(), status_value("Threads")
    rss_kb = []  # every 2 s through the loaded phase
    while time.monotonic() < t1 + LOAD_S - WARMUP_S - 0.5:
        rss_kb.append(status_value("VmRSS"))
        time.sleep(2.0)
    loaded_hz = counter.rate_hz(t1, time.monotonic())
    after = diagnostics_of(node)
    sent = finish(robot)

    record_property("baseline_rate_hz", baseline_hz)
    record_property("loaded_rate_hz", loaded_hz)
    print(f"control rate: {baseline_hz:.2f} Hz unloaded, {loaded_hz:.2f} Hz loaded "
          f"({loaded_hz / baseline_hz:.0%}); sent {sent}; receipt delay joint_states p90 "
          f"{after['input_delay_joint_states_p90_ms']} ms, p99 {after['input_delay_joint_states_p99_ms']} ms")
    assert baseline_hz > 0.6 * RATE_HZ, (baseline_hz, before)
    # With Python's default 5 ms switch interval the 1 kHz callbacks starved the control thread (40-78 %
    # of the unloaded rate); the node's `switch_interval_s` (0.2 ms) keeps it at ~100 %.
    assert loaded_hz >= 0.95 * baseline_hz, (loaded_hz, baseline_hz)
    received_joints = int(after["inputs.joint_states"]) - int(before["inputs.joint_states"])
    received_images = sum(int(after[f"inputs.{c}"]) - int(before[f"inputs.{c}"]) for c in THREE_CAMERAS.camera_slots)
    # Sensor QoS keeps the last 5 per topic: what the executor cannot take is dropped in DDS (bounded
    # queues, latest-sample semantics), so count what was taken, not what was sent.
    measured_s = LOAD_S - WARMUP_S - 0.5 + (WARMUP_S + 1.0)
    assert received_joints / measured_s >= 100.0, (received_joints, sent)
    assert received_images / measured_s / 3 >= 20.0, (received_images, sent)
    # Callbacks keep up: a message that is taken waits at most a few control periods to be stored.
    assert float(after["input_delay_joint_states_p90_ms"]) < 150.0, after
    assert float(after["input_delay_cam_a_p90_ms"]) < 150.0, after
    print("RSS MiB every 2 s:", [round(k / 1024, 1) for k in rss_kb])
    # Bounded: only the latest sample of each source is kept, so memory levels off.
    assert rss_kb[-1] - rss_kb[0] < 30_000, rss_kb
    assert rss_kb[-1] - rss_kb[len(rss_kb) // 2] < 5_000, rss_kb
    assert status_value("Threads") <= threads + 1


def test_deactivate_activate_100_times_leaks_nothing(make_node, probe) -> None:
    node = make_node()
    assert node.trigger_configure() == SUCCESS

    def cycle(n: int) -> None:
        for _ in range(n):
            assert node.trigger_activate() == SUCCESS
            assert node.trigger_deactivate() == SUCCESS

    cycle(10)  # warm-up: first-use allocations
    time.sleep(0.2)
    rss_kb, threads = status_value("VmRSS"), status_value("Threads")
    cycle(100)
    time.sleep(0.2)
    assert status_value("Threads") <= threads
    assert status_value("VmRSS") - rss_kb < 4_000, (rss_kb, status_value("VmRSS"))
    assert node.trigger_activate() == SUCCESS  # and it still works
    wait_for(lambda: probe.counts()[0] >= 1)
