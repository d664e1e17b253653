"""The node's own process (`main()`, what `ros2 run` and `ros2 launch` start) ending on a signal.

SIGINT (Ctrl-C, launch stopping) and SIGTERM (launch after its timeout, systemd, docker stop) must
end with the shutdown transition on a working context: with `hold_mode: hold_position` the hold
point at the measured position goes out, then the last "shut down" status. With rclpy's own signal
handlers the context was shut down first, and neither could be sent: the controller ran the last
chunk to its end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test.integration.harness import wait_for
from pi0_policy_ros.policy.robots import PROFILES

ALOHA = PROFILES["pi05_aloha"]
JOINT_NAMES = list(ALOHA.joint_names)  # state and actions: joint positions, so a hold point exists
STATE = [round(0.05 * i, 2) for i in range(len(JOINT_NAMES))]
# The tiny random-weight pi0.5 on the ALOHA layout with two of its cameras (the probe's), 0.2 s
# between actions (a 10 s chunk) so that a slow machine's chunks do not expire.
PARAMS = {
    "robot_profile": "pi05_aloha", "model_preset": "pi05_small", "device": "cpu", "cpu_threads": 1,
    "camera_names": ["cam_high", "cam_left_wrist"], "camera_topics": ["cam_a/image_raw", "cam_b/image_raw/compressed"],
    "camera_types": ["raw", "compressed"], "prompt": "pick up the block", "max_observation_age_s": 2.0,
    "max_camera_skew_s": 1.0, "control_rate_hz": 2.0, "profile_action_period_s": 0.2, "hold_mode": "hold_position",
    "diagnostics_period_s": 0.2,
}
START_S = 40.0  # imports, the model built and warmed up on a loaded 2-core machine
EXIT_S = 30.0


def start_node(tmp_path: Path, namespace: str, **params: object) -> subprocess.Popen:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": {**PARAMS, **params}}}))
    command = [sys.executable, "-c", "from pi0_policy_ros.ros.node import main; main()",
               "--ros-args", "-r", f"__ns:={namespace}", "--params-file", str(params_file)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def until(condition, process: subprocess.Popen) -> bool:  # noqa: ANN001
    """Whether `condition()` came true within START_S while the node process ran."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return False


def stop(process: subprocess.Popen, signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the node did not exit within {EXIT_S} s of signal {signum}:\n{output}") from None
    return process.returncode, output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_active_sends_the_hold_point_and_the_last_status(probe, namespace: str, tmp_path: Path,
                                                                         signum: int) -> None:
    probe.joint_override = (JOINT_NAMES, STATE)
    process = start_node(tmp_path, namespace, autostart=True)
    try:
        # A trajectory and a status received: both writers have matched the probe's readers, so what
        # the node sends on its way out can only be missing because it was not sent.
        acting = until(lambda: probe.counts()[0] >= 1 and probe.latest_status() is not None, process)
    finally:
        code, output = stop(process, signum)
    assert acting and code == 0, output
    with probe.lock:
        last = probe.trajectories[-1]
    assert len(last.points) == 1 and list(last.joint_names) == JOINT_NAMES, output
    assert list(last.points[0].positions) == STATE and list(last.points[0].velocities) == [0.0] * len(STATE)
    assert "hold_position: hold point sent at the measured position" in output
    wait_for(lambda: probe.latest_status("shut down"))
    assert "could not be sent" not in output and "may be lost" not in output and "Traceback" not in output, output
