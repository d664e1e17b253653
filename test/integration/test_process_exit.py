"""The node's own process (`main()`, what `ros2 run` and `ros2 launch` start) ending on a signal.

SIGINT (Ctrl-C, launch stopping) and SIGTERM (launch after its timeout, systemd, docker stop) must
end with the shutdown transition on a working context: with `hold_mode: hold_position` the hold
point at the measured position goes out, then the last "shut down" status. With rclpy's own signal
handlers the context was shut down first, and neither could be sent: the controller ran the last
chunk to its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test.integration.harness import wait_for
from pi0_policy_ros.policy.robots import PROFILES, state_in_action_units

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
    """The node's process, its output (stdout and stderr) going to `output(tmp_path)`."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": {**PARAMS, **params}}}))
    command = [sys.executable, "-c", "import sys; from pi0_policy_ros.ros.node import main; sys.exit(main())",
               "--ros-args", "-r", f"__ns:={namespace}", "--params-file", str(params_file)]
    with (tmp_path / "node.log").open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def output(tmp_path: Path) -> str:
    return (tmp_path / "node.log").read_text()


def until(condition, process: subprocess.Popen) -> bool:  # noqa: ANN001
    """Whether `condition()` came true within START_S while the node process ran."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return False


def stop(process: subprocess.Popen, signum: int, tmp_path: Path) -> tuple[int, str]:
    """Sends `signum`; the exit code and the whole output once the process has ended."""
    process.send_signal(signum)
    try:
        process.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the node did not exit within {EXIT_S} s of signal {signum}:\n"
                             f"{output(tmp_path)}") from None
    return process.returncode, output(tmp_path)


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]],
                         ids=["SIGINT", "SIGTERM", "SIGINT+SIGTERM"])
def test_a_signal_while_active_sends_the_hold_point_and_the_last_status(probe, namespace: str, tmp_path: Path,
                                                                         signals: list[int]) -> None:
    """One signal, or two back to back (Ctrl-C twice): the second must not cut the shutdown short,
    as a KeyboardInterrupt raised again inside main()'s cleanup could."""
    probe.joint_override = (JOINT_NAMES, STATE)
    process = start_node(tmp_path, namespace, autostart=True)
    try:
        # A trajectory and a status received: both writers have matched the probe's readers, so what
        # the node sends on its way out can only be missing because it was not sent.
        acting = until(lambda: probe.counts()[0] >= 1 and probe.latest_status() is not None, process)
    finally:
        for signum in signals[:-1]:
            process.send_signal(signum)
        code, log = stop(process, signals[-1], tmp_path)
    assert acting and code == 0, log
    with probe.lock:
        last = probe.trajectories[-1]
    assert len(last.points) == 1 and list(last.joint_names) == JOINT_NAMES, log
    # The measured position, ALOHA's grippers as joints (the finger position at 0.3 is the joint at 0.332).
    np.testing.assert_allclose(last.points[0].positions, state_in_action_units(ALOHA, np.array(STATE)), rtol=1e-12)
    assert list(last.points[0].velocities) == [0.0] * len(STATE)
    assert "hold_position: hold point sent at the measured position" in log
    wait_for(lambda: probe.latest_status("shut down"))
    for unwanted in ("could not be sent", "may be lost", "Traceback", "never retrieved", "still running"):
        assert unwanted not in log, log


def blocking_checkpoint(tmp_path: Path) -> Path:
    """An openpi-looking checkpoint directory whose `config.json` is a FIFO: configure's checkpoint
    load blocks reading it (a slow disk, a long load) until the test writes to it."""
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "assets").mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")  # the load fails once it gets there
    os.mkfifo(checkpoint / "config.json")
    return checkpoint


def open_once_read(fifo: Path, process: subprocess.Popen) -> int:
    """The FIFO's write end, once the node has it open for reading (configure is blocked in it)."""
    fd = None

    def reader_is_there() -> bool:
        nonlocal fd
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
        except OSError:
            return False
        return True
    assert until(reader_is_there, process), "the node never opened config.json"
    return fd


WAITING = "exiting: waiting for the running transition (configuring) to end first"


def test_a_signal_during_configure_waits_for_it_then_shuts_down(probe, namespace: str, tmp_path: Path) -> None:
    """SIGTERM while configure loads: main() released everything at once, under the configure thread,
    which went on with what was freed ("configure failed: RuntimeError: cannot schedule new futures
    after interpreter shutdown", "exception was never retrieved") and no "shut down" status went out.
    The exit must wait for configure to end (here: failing on the broken checkpoint), then shut down."""
    from rcl_interfaces.msg import Log

    checkpoint = blocking_checkpoint(tmp_path)
    process = start_node(tmp_path, namespace, autostart=True, checkpoint_path=str(checkpoint))
    try:
        fd = open_once_read(checkpoint / "config.json", process)
        process.send_signal(signal.SIGTERM)
        # Through /rosout (transient local), not the node's output: it arrives once the node's process
        # has matched this one's readers, which late in a long test session took longer than the
        # node lived, so that its last status went to no reader. Nothing is released before it.
        wait_for(lambda: probe.log_lines(Log.WARN, WAITING), timeout_s=START_S,
                 describe=lambda: f"{probe.summary()}\n{output(tmp_path)}")
        time.sleep(0.5)
        assert process.poll() is None, output(tmp_path)  # still waiting
        os.write(fd, b"{}")
        os.close(fd)
        process.wait(timeout=EXIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = output(tmp_path)
    assert process.returncode == 0, log
    assert "configure failed: cannot read" in log and "as safetensors" in log, log
    wait_for(lambda: probe.latest_status("shut down"), describe=lambda: f"{probe.summary()}\n{log}")
    for unwanted in ("Traceback", "never retrieved", "cannot schedule", "second signal"):
        assert unwanted not in log, log


def test_a_second_signal_during_configure_exits_at_once(probe, namespace: str, tmp_path: Path) -> None:
    """A second signal while the exit waits for configure (Ctrl-C twice, or `ros2 launch`'s SIGTERM
    after its SIGINT): the process ends now, with code 1, although configure is still blocked in
    its load: the interpreter would otherwise wait for that thread at exit."""
    checkpoint = blocking_checkpoint(tmp_path)
    process = start_node(tmp_path, namespace, autostart=True, checkpoint_path=str(checkpoint))
    fd = None
    try:
        fd = open_once_read(checkpoint / "config.json", process)
        process.send_signal(signal.SIGINT)
        assert until(lambda: WAITING in output(tmp_path), process), output(tmp_path)
        code, log = stop(process, signal.SIGTERM, tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if fd is not None:
            os.close(fd)
    assert code == 1, log
    assert "second signal: exiting at once, during configuring" in log, log
    assert "Traceback" not in log, log


def test_signals_until_the_process_is_gone_still_end_in_a_clean_exit(probe, namespace: str, tmp_path: Path) -> None:
    """A supervisor or a user that keeps signalling until the process is gone. Once main() is done,
    only the interpreter's teardown is left, and it puts back the default action of the signals it
    handled: one landing there killed the process after a clean shutdown (-15; seen on the H100)."""
    probe.joint_override = (JOINT_NAMES, STATE)
    process = start_node(tmp_path, namespace, autostart=True)
    try:
        acting = until(lambda: probe.counts()[0] >= 1 and probe.latest_status() is not None, process)
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + EXIT_S
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    log = output(tmp_path)
    assert acting and process.returncode == 0, (process.returncode, log)
    assert "hold_position: hold point sent at the measured position" in log, log
    wait_for(lambda: probe.latest_status("shut down"))
    assert "Traceback" not in log, log


def test_the_policys_log_lines_go_out_through_the_node_logger(probe, namespace: str, tmp_path: Path) -> None:
    """The policy, checkpoint and engine modules log with Python's `logging`. The node's process had
    no handler for it: Python printed only the warnings, bare on stderr and not on /rosout, and dropped
    the INFO lines (the policy loaded, a checkpoint's default horizon, which README says a log line
    reports). They go through the node's logger, at its levels."""
    from rcl_interfaces.msg import Log

    process = start_node(tmp_path, namespace, autostart=True)
    try:
        ready = until(lambda: probe.log_lines(Log.INFO, "policy ready: random weights"), process)
        said = probe.log_lines(Log.INFO, "device cpu: the engine runs the eager reference model")
    finally:
        code, log = stop(process, signal.SIGINT, tmp_path)
    assert ready and said and code == 0, f"{probe.summary()}\n{log}"
    assert "torch CPU threads set to 1" in log, log
