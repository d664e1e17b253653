"""config/*.yaml load into a real node through --params-file, namespaced or not."""

from __future__ import annotations

import pytest
from rclpy.lifecycle import TransitionCallbackReturn

from test.fakes import FakePolicy
from test.integration.harness import JOINTS
from test.paths import REPO_ROOT
from pi0_policy_ros.ros.node import PolicyNode
from pi0_policy_ros.ros.params import config_from_params

CONFIGS = sorted((REPO_ROOT / "config").glob("*.yaml"))


@pytest.fixture
def node_from(attach):
    def make(path, namespace: str = "", **kwargs) -> PolicyNode:
        return attach(PolicyNode(namespace=namespace, cli_args=["--ros-args", "--params-file", str(path)], **kwargs))

    return make


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("namespace", ["", "/robot1"])
def test_shipped_config_loads(node_from, path, namespace: str) -> None:
    node = node_from(path, namespace)
    # A value rclpy refuses (an int for a double, ...) falls back to the default and fails configure.
    assert node._bad_overrides == {}
    values = node.parameter_values()
    assert values["camera_names"], "camera_names came from the file"
    config = config_from_params(values)
    assert len(config.cameras) == len(values["camera_names"])
    assert config.policy.robot_profile == values["robot_profile"] != ""


def test_written_params_file_configures_a_node(node_from, tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "pi0_policy:\n  ros__parameters:\n"
        "    camera_names: [cam_a, cam_b]\n    camera_types: [raw, compressed]\n"
        f"    joint_names: {JOINTS}\n    control_rate_hz: 12.5\n    prompt: stack the cups\n    seed: 7\n")
    node = node_from(params, policy_factory=FakePolicy)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.config.control.control_rate_hz == 12.5
    assert node.config.policy.seed == 7 and node.config.policy.default_prompt == "stack the cups"
    assert [c.topic for c in node.config.cameras] == ["cam_a/image_raw", "cam_b/image_raw/compressed"]
    assert node.policy.config.seed == 7
