"""launch/pi0_policy.launch.py, checked without `launch` (not installable here): parsed with ast."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types

import pytest

from test.paths import REPO_ROOT
from pi0_policy_ros.errors import ConfigError
from pi0_policy_ros.ros.params import resolve_topic

LAUNCH_FILE = REPO_ROOT / "launch" / "pi0_policy.launch.py"
REQUIRED_ARGUMENTS = {"params_file", "namespace", "use_sim_time", "log_level", "autostart"}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def test_defines_generate_launch_description(tree: ast.Module) -> None:
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)


def test_every_argument_has_a_description(tree: ast.Module) -> None:
    declared = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        name = call.args[0].value if call.args else _keyword(call, "name").value
        description = _keyword(call, "description")
        assert isinstance(description, ast.Constant) and description.value.strip(), name
        declared[name] = call
    assert set(declared) == REQUIRED_ARGUMENTS


def test_default_params_file_exists(tree: ast.Module) -> None:
    (call,) = [c for c in _calls(tree, "DeclareLaunchArgument") if c.args and c.args[0].value == "params_file"]
    parts = [e.value for e in ast.walk(_keyword(call, "default_value")) if isinstance(e, ast.Constant)]
    yaml_name = next(p for p in parts if str(p).endswith(".yaml"))
    assert "config" in parts
    assert (REPO_ROOT / "config" / yaml_name).is_file()


def test_executable_is_a_console_script(tree: ast.Module) -> None:
    (node,) = _calls(tree, "LifecycleNode")
    executable = _keyword(node, "executable").value
    setup = ast.parse((REPO_ROOT / "setup.py").read_text())
    scripts = [c.value for c in ast.walk(setup) if isinstance(c, ast.Constant) and isinstance(c.value, str)
               and "=" in c.value and ":" in c.value]
    targets = {s.split("=")[0].strip(): s.split("=")[1].strip() for s in scripts}
    assert targets.get(executable) == "pi0_policy_ros.ros.node:main"
    assert _keyword(node, "name").value == "pi0_policy"


@pytest.mark.parametrize("name", ["pi05_libero.yaml", "pi05_droid.yaml", "pi0_aloha.yaml", "demo.yaml"])
def test_config_files_exist(name: str) -> None:
    assert (REPO_ROOT / "config" / name).is_file()


# ---- the launch-time check of params_file, run with stand-ins for launch / launch_ros -----------


class _Action:
    """Stand-in for every launch action and description: keeps its arguments."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration(_Action):
    def perform(self, context) -> str:
        return context.launch_configurations[self.args[0]]


@pytest.fixture
def launch_module(monkeypatch):
    """The launch file imported with minimal `launch` / `launch_ros` modules (not installable here)."""
    names = {
        "launch": ["LaunchContext", "LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "OpaqueFunction", "SetEnvironmentVariable"],
        "launch.substitutions": ["PathJoinSubstitution"],
        "launch_ros": [],
        "launch_ros.actions": ["LifecycleNode"],
        "launch_ros.descriptions": ["ParameterValue"],
        "launch_ros.substitutions": ["FindPackageShare"],
    }
    for module_name, classes in names.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            setattr(module, cls, type(cls, (_Action,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)
    sys.modules["launch.substitutions"].LaunchConfiguration = _LaunchConfiguration
    spec = importlib.util.spec_from_file_location("pi0_policy_launch_under_test", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_launch_checks(module, **configurations: str) -> None:
    """Run the launch description's OpaqueFunctions as launch would, before the node starts."""
    entities = module.generate_launch_description().args[0]
    node_index = next(i for i, e in enumerate(entities) if type(e).__name__ == "LifecycleNode")
    context = types.SimpleNamespace(launch_configurations=dict(configurations))
    for entity in entities[:node_index]:
        if type(entity).__name__ == "OpaqueFunction":
            entity.kwargs["function"](context)


def test_params_file_that_is_not_there_stops_the_launch(launch_module, tmp_path) -> None:
    # launch_ros (Jazzy) only warns "Parameter file path is not a file" and starts the node on its
    # defaults, whose configure then fails on camera_names: the real cause was nowhere to be seen.
    with pytest.raises(ConfigError, match="cannot read it"):
        _run_launch_checks(launch_module, params_file=str(tmp_path / "config" / "robot.yaml"), namespace="")


def test_params_file_for_another_node_name_stops_the_launch(launch_module, tmp_path) -> None:
    # rcl silently drops every block whose node name does not match: the node would run on defaults.
    path = tmp_path / "robot.yaml"
    path.write_text("policy:\n  ros__parameters:\n    camera_names: [image]\n")
    with pytest.raises(ConfigError, match="no block applies to node /pi0_policy"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="")
    path.write_text("/robot1/pi0_policy:\n  ros__parameters:\n    camera_names: [image]\n")
    with pytest.raises(ConfigError, match="no block applies to node /robot2/pi0_policy"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="robot2")
    _run_launch_checks(launch_module, params_file=str(path), namespace="robot1")
    # Under a namespace pushed by an including launch file (PushROSNamespace).
    _run_launch_checks(launch_module, params_file=str(path), namespace="", ros_namespace="/robot1")


def test_params_file_with_a_mistyped_parameter_stops_the_launch(launch_module, tmp_path) -> None:
    # rcl drops a parameter the node does not declare: a typo left it at its default without a word.
    path = tmp_path / "robot.yaml"
    path.write_text("pi0_policy:\n  ros__parameters:\n    camera_names: [image]\n    control_rate_hz: 30.0\n"
                    "    max_observation_age: 0.2\n")
    with pytest.raises(ConfigError, match=r"found 'max_observation_age' \(did you mean 'max_observation_age_s'\?\)"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="")


def test_params_file_with_a_qos_override_stops_the_launch(launch_module, tmp_path) -> None:
    # rclpy declares qos_overrides.* only for the policies an entity's QoSOverridingOptions name, and
    # the node names none: the joint_states subscription stayed best effort, depth 5, without a word.
    path = tmp_path / "robot.yaml"
    path.write_text("/**/pi0_policy:\n  ros__parameters:\n    camera_names: [image]\n    qos_overrides:\n"
                    "      /joint_states:\n        subscription: {reliability: reliable, depth: 50}\n")
    with pytest.raises(ConfigError, match=r"found 'qos_overrides\./joint_states\.subscription\.depth' \(the node "
                                          r"takes no QoS overrides"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="")


_ROBOT_BLOCK = "  ros__parameters:\n    camera_names: [image]\n"


@pytest.mark.parametrize("text,token", [
    ("/robot*/pi0_policy:\n" + _ROBOT_BLOCK, "robot*"),
    ("/**/pi0_*:\n" + _ROBOT_BLOCK, "pi0_*"),
    ("robot*:\n  pi0_policy:\n    ros__parameters:\n      camera_names: [image]\n", "robot*"),
    # A block for other nodes: rcl refuses the whole file, this node's block with it.
    ("/**/pi0_policy:\n" + _ROBOT_BLOCK + "/**/camera_*:\n  ros__parameters:\n    fps: 30\n", "camera_*"),
    # Not names to rmw either: a '-', a leading digit, an empty token.
    ("/robot-1/pi0_policy:\n" + _ROBOT_BLOCK, "robot-1"),
    ("/2d/pi0_policy:\n" + _ROBOT_BLOCK, "2d"),
    ("/robot1//pi0_policy:\n" + _ROBOT_BLOCK, ""),
], ids=["namespace", "node", "nested", "other_node", "dash", "digit", "empty"])
def test_params_file_with_a_node_key_rcl_refuses_stops_the_launch(launch_module, tmp_path, text: str,
                                                                  token: str) -> None:
    # rcl takes `*` and `**` as wildcards only as a whole token of a block's node key and refuses the
    # file for any other token that is not a ROS name ("node name must not contain characters other
    # than alphanumerics or '_'"), so the node failed at start-up; the check let it start.
    path = tmp_path / "robot.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"expected every token of the node key to be '\*', '\*\*' \(whole tokens "
                                          rf"only.*found {re.escape(repr(token))}; rcl refuses the whole file"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="robot1")


def test_params_file_with_whole_token_wildcards_passes_the_launch_check(launch_module, tmp_path) -> None:
    path = tmp_path / "robot.yaml"
    path.write_text("/*/pi0_policy:\n" + _ROBOT_BLOCK + "/robot1/*:\n  ros__parameters:\n    seed: 1\n"
                    "/robot1/**:\n  ros__parameters:\n    cpu_threads: 1\n")
    _run_launch_checks(launch_module, params_file=str(path), namespace="robot1")
    with pytest.raises(ConfigError, match="no block applies to node /fleet/robot1/pi0_policy"):
        _run_launch_checks(launch_module, params_file=str(path), namespace="/fleet/robot1")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("namespace", ["", "robot1", "/fleet/robot1"])
def test_shipped_params_files_pass_the_launch_check(launch_module, path, namespace: str) -> None:
    _run_launch_checks(launch_module, params_file=str(path), namespace=namespace)


@pytest.mark.parametrize("namespace", ["robot1", "/fleet/robot2"])
def test_remappings_stay_in_the_namespace(launch_module, namespace: str) -> None:
    # ros2_control in the robot's namespace publishes <ns>/joint_states and its controller listens
    # on <ns>/joint_trajectory_controller/joint_trajectory. The remaps to /joint_states and
    # /joint_trajectory_controller/joint_trajectory made namespace:=robot1 and namespace:=robot2
    # read one robot's joint states and command one controller.
    (node,) = [e for e in launch_module.generate_launch_description().args[0]
               if type(e).__name__ == "LifecycleNode"]
    targets = {source: resolve_topic(target, namespace) for source, target in node.kwargs["remappings"]}
    assert targets == {"~/joint_trajectory": resolve_topic("joint_trajectory_controller/joint_trajectory", namespace)}
    assert targets["~/joint_trajectory"].startswith("/" + namespace.strip("/") + "/")


def test_remappings_without_a_namespace_are_the_root_topics(launch_module) -> None:
    (node,) = [e for e in launch_module.generate_launch_description().args[0]
               if type(e).__name__ == "LifecycleNode"]
    assert [resolve_topic(target) for _, target in node.kwargs["remappings"]] == [
        "/joint_trajectory_controller/joint_trajectory"]
