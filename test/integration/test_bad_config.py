"""Issue 8, configuration and prompt: each bad configuration ends configure in FAILURE with the
reason on /diagnostics ("configure failed: ..."), and the same node configures once it is fixed.
The checkpoint cases load real checkpoint directories (written here from the openpi fixture
weights) with the real `Policy`; the prompt cases run the tiny model with random weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from test.fakes import FakePolicy
from test.integration.harness import wait_for
from test.paths import PI05_FIXTURE
from test.unit.test_policy import write_openpi_dir
from pi0_policy_ros.ros.node import forward_package_logging, load_policy, stop_forwarding_package_logging

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
STATE_NAMES = [f"s{i}" for i in range(8)]
LIBERO = {
    "robot_profile": "pi05_libero", "model_preset": "auto", "device": "cpu", "cpu_threads": 1,
    "camera_names": ["image", "wrist_image"], "camera_topics": ["cam_a/image_raw", "cam_b/image_raw/compressed"],
    "joint_names": STATE_NAMES, "action_joint_names": [f"a{i}" for i in range(7)],
    "prompt": "pick up the block", "max_observation_age_s": 2.0, "max_camera_skew_s": 1.0, "control_rate_hz": 5.0,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_openpi_dir(tmp_path_factory.mktemp("ckpt") / "pi05_libero", PI05_FIXTURE)


def fails_then_fixed(node, probe, reason: str, fix) -> None:
    """configure -> FAILURE with `reason` on /diagnostics; fix(); configure -> SUCCESS."""
    wait_for(lambda: node.count_subscribers("/diagnostics") >= 1)
    time.sleep(0.2)  # the probe's reader matched, so the one failure report reaches it
    assert node.trigger_configure() == FAILURE
    assert node.policy is None and node.config is None
    status = wait_for(lambda: probe.latest_status("configure failed"))
    assert status.level == b"\x02" and reason in status.message, status.message
    assert reason in {kv.key: kv.value for kv in status.values}["configure_error"]
    fix()
    assert node.trigger_configure() == SUCCESS
    assert node.trigger_cleanup() == SUCCESS


def test_checkpoint_shapes_not_matching_the_preset(make_node, probe, checkpoint: Path) -> None:
    node = make_node(params={**LIBERO, "checkpoint_path": str(checkpoint), "model_preset": "pi05"},
                     policy_factory=load_policy)
    fails_then_fixed(node, probe, "the tensors are those of preset 'pi05_small': expected model_preset 'pi05_small'",
                     lambda: node.set_parameters([Parameter("model_preset", value="auto")]))


def test_missing_norm_stats_file(make_node, probe, checkpoint: Path, tmp_path: Path) -> None:
    stats = checkpoint / "assets" / "libero" / "norm_stats.json"
    saved = tmp_path / "norm_stats.json"
    shutil.move(stats, saved)
    try:
        node = make_node(params={**LIBERO, "checkpoint_path": str(checkpoint)}, policy_factory=load_policy)
        fails_then_fixed(node, probe, "norm_stats.json", lambda: shutil.copy(saved, stats))
    finally:
        if not stats.exists():
            shutil.move(saved, stats)


def test_robot_profile_with_other_dims_than_the_stats(make_node, probe, checkpoint: Path) -> None:
    node = make_node(params={**LIBERO, "checkpoint_path": str(checkpoint), "robot_profile": "pi05_aloha"},
                     policy_factory=load_policy)
    fails_then_fixed(node, probe, "'state' norm stats have 8 dims but the robot profile has 14",
                     lambda: node.set_parameters([Parameter("robot_profile", value="pi05_libero")]))


def test_unknown_backend(make_node, probe) -> None:
    node = make_node(params={"backend": "magic"})  # refused at declaration: the process stays up
    fails_then_fixed(node, probe, "backend: expected values from ['torch', 'tensorrt', 'auto', 'eager'], "
                     "found ['magic']", lambda: node.set_parameters([Parameter("backend", value="torch")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(make_node, probe) -> None:
    node = make_node(params={**LIBERO, "model_preset": "pi05_small", "device": "cuda"}, policy_factory=load_policy)
    fails_then_fixed(node, probe, "device 'cuda' requested, but torch",
                     lambda: node.set_parameters([Parameter("device", value="cpu")]))


class OutOfMemoryOnce:
    """A policy factory whose first call raises torch.OutOfMemoryError, as a GPU too small for the
    model would at configure. A fake: nothing is allocated; later calls build a FakePolicy."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, config):  # noqa: ANN001, ANN204
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return FakePolicy(config)


def test_out_of_memory_at_configure(make_node, probe) -> None:
    """Out of memory at configure (a fake: the factory raises torch.OutOfMemoryError) fails the
    transition with the error's type and message; the retry succeeds."""
    factory = OutOfMemoryOnce()
    node = make_node(policy_factory=factory)
    fails_then_fixed(node, probe, "OutOfMemoryError: CUDA out of memory", lambda: None)
    assert factory.calls == 2


@pytest.mark.parametrize("params,reason,fixed", [
    ({"safety_position_lower": [0.0, 0.0], "safety_position_upper": [1.0]},
     "safety_position_lower needs 1 or 3 values (one per action dim), found 2", {"safety_position_lower": [0.0]}),
    ({"safety_gripper_dims": [3], "safety_gripper_range": [0.0, 1.0]},
     "safety_gripper_dims [3] are outside the 3 action dims", {"safety_gripper_dims": [2]}),
])
def test_safety_limits_not_fitting_the_action_dims_name_the_parameter(make_node, probe, params, reason: str,
                                                                       fixed) -> None:
    """Checked against the policy's action dims at configure (SafetyFilter, ROS-free): the reason
    named the SafetyConfig field (`position_lower`), not the parameter the user sets."""
    node = make_node(params=params)
    fails_then_fixed(node, probe, reason,
                     lambda: node.set_parameters([Parameter(k, value=v) for k, v in fixed.items()]))


def test_invalid_camera_topic_fails_configure_and_leaves_no_subscription(make_node, probe) -> None:
    """camera_topics[1] is no valid topic name: configure fails when it subscribes to it. The
    subscription already made for cam_a was never destroyed (it was not yet in the list that
    _release() empties): a reader on cam_a's topic stayed for the node's lifetime, one more after
    each failed configure, and with input_poll_period_s 0 it ran the camera callback too."""
    node = make_node(params={"camera_topics": ["cam_a/image_raw", "cam b/image_raw/compressed"]})
    good = Parameter("camera_topics", value=["cam_a/image_raw", "cam_b/image_raw/compressed"])
    fails_then_fixed(node, probe, "camera_topics[1] (camera 'cam_b'): expected a valid ROS topic name, "
                                  "found 'cam b/image_raw/compressed'", lambda: node.set_parameters([good]))
    inputs = [sub.topic_name for sub in node.subscriptions if not sub.topic_name.endswith("/prompt")]
    assert inputs == []  # cleanup left no camera or joint_states reader behind


# ---- prompt (the real tiny model: the prompt goes through its tokenizer) -------------------------

def real_node(make_node, probe, prompt: str):
    probe.joint_override = (STATE_NAMES, [0.1 * i for i in range(8)])
    # 1 s between actions: a chunk outlasts a slow machine's inference (the profile's 0.1 s made
    # chunks expire once CPU inference passed 0.5 s, and the test then saw no chunk).
    node = make_node(params={**LIBERO, "model_preset": "pi05_small", "robot_profile": "pi05_libero",
                             "profile_action_period_s": 1.0, "prompt": prompt}, policy_factory=load_policy)
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    return node


def test_empty_prompt_holds_and_says_a_prompt_is_required(make_node, probe) -> None:
    node = real_node(make_node, probe, "")
    values = wait_for(lambda: (v := probe.latest_values("holding")) and int(v.get("holds.policy_refused", 0)) and v,
                      timeout_s=10.0)
    assert "Prompt is required" in values["last_hold_reason"] and values["prompt.source"] == "none"
    assert values["prompt.text"] == ""
    assert probe.counts() == (0, 0, 0)
    assert node.set_parameters([Parameter("prompt", value="pick up the block")])[0].successful
    wait_for(lambda: probe.counts()[1] >= 1, timeout_s=10.0)
    # The task acted on is shown (an operator could not tell which one ran: ~/prompt leaves the parameter).
    wait_for(lambda: (v := probe.latest_values()) and v.get("prompt.text") == "pick up the block", timeout_s=10.0)


def test_prompt_cleared_while_active_clears_the_configure_time_prompt(make_node, probe) -> None:
    """prompt '' set while active: no prompt, as for a node configured with '' (it holds, "Prompt is
    required"). The policy was built with the configure-time prompt as its default_prompt, so the
    node went on acting on the old task while /diagnostics said prompt.source 'policy default'."""
    node = real_node(make_node, probe, "pick up the block")
    wait_for(lambda: probe.counts()[1] >= 1, timeout_s=10.0)
    assert node.set_parameters([Parameter("prompt", value="")])[0].successful
    values = wait_for(lambda: (v := probe.latest_values("holding")) and int(v.get("holds.policy_refused", 0)) and v,
                      timeout_s=10.0)
    assert "Prompt is required" in values["last_hold_reason"] and values["prompt.source"] == "none"


def test_prompt_longer_than_the_token_budget_is_cut_with_a_warning(make_node, probe) -> None:
    real_node(make_node, probe, "pick up the red block and put it in the box " * 40)
    values = wait_for(lambda: (v := probe.latest_values()) and v.get("prompt.truncated") == "True" and v,
                      timeout_s=10.0)
    assert values["prompt.token_budget"] == "200"
    assert values["prompt.text"] == ("pick up the red block and put it in the box " * 40)[:200] + "…"
    wait_for(lambda: probe.counts()[1] >= 1, timeout_s=10.0)  # it still acts, on the cut prompt


def test_each_prompt_over_the_token_budget_is_logged_once(make_node, probe, capfd: pytest.CaptureFixture) -> None:
    # One long prompt logged two warnings in the node's process (the node's and the tokenizer's,
    # forwarded), and a second long prompt only the node's, which did not say how long it was.
    node = real_node(make_node, probe, "pick up the block")
    handler = forward_package_logging(node.get_logger())
    try:
        capfd.readouterr()
        for prompt in ("pick up the red block " * 60, "put the cup in the basket " * 60):
            assert node.set_parameters([Parameter("prompt", value=prompt)])[0].successful
            wait_for(lambda: probe.counts()[1] >= 1, timeout_s=10.0)
        time.sleep(1.0)  # ticks on the same prompt log nothing more
        lines = [line for line in capfd.readouterr().err.splitlines() if "token" in line and "WARN" in line]
    finally:
        stop_forwarding_package_logging(handler)
    assert len(lines) == 2, lines
    assert all("expected at most 200 tokens" in line and "cut on the right" in line for line in lines), lines
    assert "found 842" in lines[0] and "found 721" in lines[1], lines


def test_an_undeclared_override_is_named_with_the_closest_parameter(make_node) -> None:
    # rclpy drops an override the node does not declare: `control_rate` ran at the default rate.
    node = make_node(params={"control_rate": 2.0})
    assert node.undeclared_overrides.startswith(
        "parameter overrides: expected names of the node's parameters, found 'control_rate' "
        "(did you mean 'control_rate_hz'?)")
    assert node.get_parameter("control_rate_hz").value != 2.0  # what was meant to change did not change
    assert make_node().undeclared_overrides == ""


def test_a_qos_override_is_named_as_ignored(make_node) -> None:
    # The node creates its publishers and subscriptions without QoSOverridingOptions: rclpy declares
    # no qos_overrides.* parameter, and the override left the joint_states QoS as it was.
    node = make_node(params={"qos_overrides./joint_states.subscription.depth": 50})
    assert node.undeclared_overrides.startswith(
        "parameter overrides: expected names of the node's parameters, found "
        "'qos_overrides./joint_states.subscription.depth' (the node takes no QoS overrides")
    assert not node.has_parameter("qos_overrides./joint_states.subscription.depth")


# The console script's call, and `python -m` (which started nothing and exited 0 before the module ran main()).
NODE_COMMANDS = {"main": ["-c", "import sys; from pi0_policy_ros.ros.node import main; sys.exit(main())"],
                 "module": ["-m", "pi0_policy_ros.ros.node"]}


@pytest.mark.parametrize("start", sorted(NODE_COMMANDS))
@pytest.mark.parametrize("content", [None, "pi0_policy:\n  ros__parameters:\n    camera_names: [a\n"],
                         ids=["missing", "not_yaml"])
def test_the_node_process_with_a_bad_params_file_exits_with_one_line(tmp_path: Path, content: str | None,
                                                                     start: str) -> None:
    # rclpy.init raised RCLError with a traceback and exit code 1.
    params = tmp_path / "robot.yaml"
    if content is not None:
        params.write_text(content)
    proc = subprocess.run([sys.executable, *NODE_COMMANDS[start], "--ros-args", "--params-file", str(params)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    # rcl logs its own "Failed to parse global arguments" line first.
    assert output.splitlines()[-1].startswith("pi0_policy_node: error: cannot start: failed to initialize rcl: "
                                              f"Couldn't parse params file: '--params-file {params}'"), output


@pytest.mark.parametrize("remap", [["-r", "__ns:=/robot1"], ["-r", "__node:=left_policy"]], ids=["namespace", "name"])
def test_the_node_process_whose_params_file_has_no_block_for_it_exits_with_one_line(tmp_path: Path,
                                                                                   remap: list[str]) -> None:
    """`ros2 run ... --ros-args -r __ns:=/robot1 --params-file robot.yaml` with a block for /pi0_policy
    only: rcl skips the block without a word, and the node ran on its defaults (another profile, a
    full-size model with random weights). The launch file refuses such a file; so does the node."""
    params = tmp_path / "robot.yaml"
    params.write_text("/pi0_policy:\n  ros__parameters:\n    prompt: pick\n")
    proc = subprocess.run([sys.executable, *NODE_COMMANDS["main"], "--ros-args", *remap, "--params-file",
                           str(params)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    node = "/robot1/pi0_policy" if "__ns" in remap[1] else "/left_policy"
    assert output.strip().splitlines()[-1] == (
        f"pi0_policy_node: error: params file {params}: no block applies to node {node}; found blocks for "
        "['/pi0_policy']: rcl skips them, and the node would run on its defaults"), output
