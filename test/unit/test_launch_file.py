"""launch/pi0_policy.launch.py, checked without `launch` (not installable here): parsed with ast."""

from __future__ import annotations

import ast

import pytest

from test.paths import REPO_ROOT

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
