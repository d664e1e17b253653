"""run_demo: the synthetic robot and the node, with config/demo.yaml and a fake policy of its layout."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test.fakes import FakePolicy, FakeProfile
from test.integration.harness import wait_for
from test.paths import REPO_ROOT
from pi0_policy_ros.ros.demo import run_demo, synthetic_frame

ALOHA_LIKE = FakeProfile(
    name="fake_aloha",
    camera_slots={"cam_high": "base_0_rgb", "cam_left_wrist": "left_wrist_0_rgb",
                  "cam_right_wrist": "right_wrist_0_rgb"},
    state_dim=14, action_dim=14, action_horizon=10, action_period_s=0.05,
    joint_names=tuple(f"joint{i}" for i in range(14)),
)
DEMO = REPO_ROOT / "config" / "demo.yaml"
FAKE = functools.partial(FakePolicy, profile=ALOHA_LIKE)


def test_run_demo_reports_rate_and_latency(executor) -> None:  # executor: rclpy's default context is up too
    report = run_demo(DEMO, duration_s=2.0, device="cpu", policy_factory=FAKE, namespace="/demo_test",
                      robot_process=False)
    assert report.chunks >= 6, report.summary()
    assert 3.0 < report.achieved_rate_hz < 7.0, report.summary()  # demo.yaml: 5 Hz
    assert 0.0 < report.latency_ms["p50"] < 500.0 and set(report.latency_ms) == {"p50", "p90", "p99"}
    assert "Hz" in report.summary()


def _logging_policy(config, profile: FakeProfile) -> FakePolicy:
    # As the tokenizer warns of a prompt over the token budget: the package's Python logging.
    logging.getLogger("pi0_policy_ros.policy.tokenizer").warning("prompt longer than the token budget (test)")
    return FakePolicy(config, profile)


def test_run_demo_sends_the_packages_log_to_rosout(executor, attach) -> None:
    # The demo's node printed the package's warnings bare on stderr ("WARNING pi0_policy_ros.policy.
    # tokenizer: prompt longer than the token budget ..."), not on /rosout, and dropped its INFO lines,
    # as the node's own main() did before it forwarded them (RosLogHandler).
    from rcl_interfaces.msg import Log
    from rclpy.node import Node

    from test.integration.harness import ROSOUT_QOS

    logs: list[str] = []
    listener = attach(Node("rosout_listener"))
    listener.create_subscription(Log, "/rosout", lambda m: m.name == "demo_log.pi0_policy" and logs.append(m.msg),
                                 ROSOUT_QOS)
    # 2 s: the listener must discover the demo's node before it ends (slow on a loaded machine).
    run_demo(DEMO, duration_s=2.0, device="cpu", policy_factory=functools.partial(_logging_policy, profile=ALOHA_LIKE),
             namespace="/demo_log", robot_process=False)
    wait_for(lambda: "prompt longer than the token budget (test)" in logs, describe=lambda: f"/rosout: {logs}")
    package = logging.getLogger("pi0_policy_ros")
    assert not package.handlers and package.propagate  # the demo took its handler away again


def _forwarded_stderr(capfd, level: int | None, info: str, warning: str) -> str:
    """stderr while the package's logging is forwarded to an rclpy logger and the root logger prints too."""
    import rclpy

    from pi0_policy_ros.ros.node import forward_package_logging, stop_forwarding_package_logging

    root = logging.StreamHandler()
    logging.getLogger().addHandler(root)
    handler = forward_package_logging(rclpy.logging.get_logger("print_once"), level)
    try:
        capfd.readouterr()
        logging.getLogger("pi0_policy_ros.policy.policy").info(info)
        logging.getLogger("pi0_policy_ros.policy.tokenizer").warning(warning)
        return capfd.readouterr().err
    finally:
        stop_forwarding_package_logging(handler)
        logging.getLogger().removeHandler(root)


def test_forwarded_package_logging_is_printed_once(capfd) -> None:
    # `pi0-policy demo` configures Python's root logger too (--log-level): each forwarded line was
    # printed twice, by rclpy and by the root's handler, the INFO lines as well.
    err = _forwarded_stderr(capfd, None, "policy ready (test)", "prompt too long (test)")
    assert err.count("policy ready (test)") == 1 and err.count("prompt too long (test)") == 1, err
    assert "[print_once]" in err
    # A command forwards at its own level (pi0-policy --log-level): WARNING keeps INFO lines out.
    err = _forwarded_stderr(capfd, logging.WARNING, "policy ready (quiet)", "prompt too long (loud)")
    assert "policy ready (quiet)" not in err and err.count("prompt too long (loud)") == 1, err
    assert logging.getLogger("pi0_policy_ros").propagate


def test_run_demo_with_the_robot_in_its_own_process() -> None:
    # The spawned robot needs a few seconds to start publishing; the node holds until then.
    report = run_demo(DEMO, duration_s=8.0, device="cpu", policy_factory=FAKE, namespace="/demo_proc")
    assert report.chunks >= 4, report.summary()
    assert report.latency_ms["p50"] > 0.0


def test_synthetic_frames_move() -> None:
    a, b = synthetic_frame(0.0, 0), synthetic_frame(0.5, 0)
    assert a.shape == (120, 160, 3) and a.dtype.name == "uint8"
    assert (a != b).any() and (synthetic_frame(0.0, 1) != a).any()


def test_run_demo_times_the_chunk_where_no_trajectory_goes_out(executor) -> None:
    # Joint velocities stay off ~/joint_trajectory (trajectory_actions); the robot then times
    # ~/action_chunk, and the demo still reports the node's rate.
    from dataclasses import replace

    velocity = functools.partial(FakePolicy, profile=replace(ALOHA_LIKE, action_space="joint_velocity"))
    report = run_demo(DEMO, duration_s=2.0, device="cpu", policy_factory=velocity, namespace="/demo_velocity",
                      robot_process=False)
    assert report.chunks >= 6, report.summary()


def test_ctrl_c_ends_the_demo_and_its_robot_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches the whole process group: `pi0-policy demo` and its spawned robot.
    Each printed a KeyboardInterrupt traceback ("Process synthetic_robot: Traceback ..."). The robot
    is ended by the demo, and the demo says it was interrupted, with the shell's code for it."""
    log_path = tmp_path / "demo.log"
    command = [sys.executable, "-c", "import sys; from pi0_policy_ros.cli import main; sys.exit(main())",
               "demo", "--duration", "60"]
    with log_path.open("w") as log:
        demo = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60.0
        while "activated" not in log_path.read_text() and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "activated" in log_path.read_text(), log_path.read_text()
        os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = demo.wait(timeout=30.0)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    output = log_path.read_text()
    assert code == 130, output
    assert "pi0-policy demo: interrupted" in output, output
    for unwanted in ("Traceback", "KeyboardInterrupt", "never retrieved"):
        assert unwanted not in output, output
