"""The package as a robot builds it: `colcon build` (colcon-ros's ament_python task) into a temporary
workspace, then the installed tree as `ros2 run` and `ros2 launch` use it once the workspace is
sourced: executables in `lib/pi0_policy_ros`, the ament index marker, package.xml, the launch file and
every parameter file in `share/`, and the launch file's default `params_file` among them.

Both layouts are built: the plain one (`setup.py install`, what a robot and a release build use;
scripts go where setup.cfg's [install] says) and `--symlink-install` (`setup.py develop`; [develop]).
Skipped without colcon-core and colcon-ros in this interpreter (requirements-dev.txt pins them).
"""

from __future__ import annotations

import ast
import filecmp
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from test.paths import REPO_ROOT

pytest.importorskip("colcon_core", reason="colcon-core is not installed (pip install -r requirements-dev.txt)")
pytest.importorskip("colcon_ros", reason="colcon-ros (the ament_python build type) is not installed")

from colcon_core.python_install_path import get_python_install_path  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402  (colcon-core requires it)

PACKAGE = "pi0_policy_ros"
EXECUTABLES = ("pi0_policy_node", "pi0-policy")
LAUNCH_FILES = sorted(p.name for p in (REPO_ROOT / "launch").glob("*.launch.py"))
CONFIGS = sorted(p.name for p in (REPO_ROOT / "config").glob("*.yaml"))
SOURCE_MODULES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / PACKAGE).rglob("*.py"))
TIMEOUT_S = 300  # a build takes about 2 s; this is for a loaded 2-core machine
# colcon-ros installs a missing ament index marker or package.xml itself, with this warning: their
# presence alone does not show that setup.py installs them (a plain `pip install` would not).
COLCON_FALLBACK = "doesn't explicitly install"

# Run inside the sourced workspace: where the package is imported from, and what the package's own
# installed-layout lookups resolve to (ament index, the demo's default parameter file).
_REPORT = """
import json, sys
import pi0_policy_ros
from ament_index_python.packages import get_package_share_directory
from pi0_policy_ros.ros.demo import default_params_file
print(json.dumps({"module": pi0_policy_ros.__file__, "share": get_package_share_directory(sys.argv[1]),
                  "demo_params": str(default_params_file("demo.yaml"))}))
"""


@dataclass(frozen=True)
class Workspace:
    root: Path
    symlink: bool
    output: str  # colcon's console output

    @property
    def prefix(self) -> Path:
        return self.root / "install" / PACKAGE

    @property
    def share(self) -> Path:
        return self.prefix / "share" / PACKAGE

    @property
    def site_packages(self) -> Path:
        return Path(get_python_install_path("purelib", {"base": str(self.prefix)}))

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """`command` in a shell that sourced the workspace, as a user does before `ros2 run`."""
        script = '. "$1" && shift && exec "$@"'
        return subprocess.run(["sh", "-c", script, "sh", str(self.root / "install" / "local_setup.sh"), *command],
                              cwd=self.root, env=_environment(self.root), capture_output=True, text=True,
                              timeout=TIMEOUT_S)


def _environment(root: Path) -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH (the installed tree must stand alone) and
    without the user's colcon defaults and mixins (~/.colcon)."""
    env = dict(os.environ, COLCON_HOME=str(root / "colcon_home"))
    env.pop("COLCON_DEFAULTS_FILE", None)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def test_robot_requirements_pin_a_setuptools_colcon_supports() -> None:
    # A robot runs `pip install --user -r requirements.txt` over the apt setuptools that colcon uses
    # (68 on Noble, 59 on Jammy). torch requires a newer one, so pip installs one ahead of it for
    # every Python of that user: unpinned the newest, past colcon-core's < 80, where pip reports the
    # conflict and `colcon build --symlink-install` quietly installs copies.
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-")):
            requirement = Requirement(line)
            pins[requirement.name.lower()] = requirement
    assert "setuptools" in pins, f"requirements.txt pins no setuptools: {sorted(pins)}"
    (version,) = [spec.version for spec in pins["setuptools"].specifier if spec.operator == "=="]
    for dist in ("colcon-core", "torch"):
        specifiers = [r.specifier for r in map(Requirement, metadata.requires(dist) or [])
                      if r.name.lower() == "setuptools" and (r.marker is None or r.marker.evaluate())]
        assert specifiers, f"{dist} no longer requires setuptools: the pin may go"
        assert all(spec.contains(version) for spec in specifiers), f"{dist} requires setuptools {specifiers}"


@pytest.fixture(scope="module", params=["install", "symlink-install"])
def workspace(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    symlink = request.param == "symlink-install"
    setuptools_major = int(metadata.version("setuptools").split(".")[0])
    if symlink and setuptools_major >= 80:
        # setuptools 80 replaced `develop --editable`; colcon then quietly does a plain install.
        pytest.skip(f"--symlink-install needs setuptools < 80 (colcon-core's pin), found {setuptools_major}")
    root = tmp_path_factory.mktemp(request.param)
    (root / "src").mkdir()
    (root / "src" / PACKAGE).symlink_to(REPO_ROOT, target_is_directory=True)
    # colcon runs setup.py with its own interpreter, which the scripts' shebang then names: this one
    # has rclpy, as /usr/bin/python3 has on a robot.
    command = [sys.executable, "-m", "colcon", "--log-base", "log", "build", "--base-paths", "src",
               "--build-base", "build", "--install-base", "install", *(["--symlink-install"] if symlink else [])]
    proc = subprocess.run(command, cwd=root, env=_environment(root), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout
    return Workspace(root, symlink, proc.stdout)


def test_setup_py_installs_the_marker_and_package_xml(workspace: Workspace) -> None:
    assert COLCON_FALLBACK not in workspace.output, workspace.output
    marker = workspace.prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    assert marker.is_file()
    assert filecmp.cmp(workspace.share / "package.xml", REPO_ROOT / "package.xml", shallow=False)


@pytest.mark.parametrize("kind, names", [("launch", LAUNCH_FILES), ("config", CONFIGS)])
def test_launch_and_config_files_are_in_share(workspace: Workspace, kind: str, names: list[str]) -> None:
    assert names, f"no {kind} files in the checkout"
    installed = sorted(p.name for p in (workspace.share / kind).iterdir())
    assert installed == names
    for name in names:
        assert filecmp.cmp(workspace.share / kind / name, REPO_ROOT / kind / name, shallow=False), name
        if workspace.symlink:
            assert (workspace.share / kind / name).is_symlink(), "colcon fell back to a plain install"


@pytest.mark.parametrize("name", EXECUTABLES)
def test_executables_are_where_ros2_run_looks(workspace: Workspace, name: str) -> None:
    # ros2 run and launch_ros's `executable=` look only in <prefix>/lib/<package>/, never in bin/.
    script = workspace.prefix / "lib" / PACKAGE / name
    assert script.is_file() and os.access(script, os.X_OK), sorted(workspace.prefix.rglob(name))
    assert not (workspace.prefix / "bin").exists()


def test_only_the_package_is_installed(workspace: Workspace) -> None:
    if workspace.symlink:  # an egg-link to the build directory, which links the top-level packages
        (link,) = workspace.site_packages.iterdir()
        assert link.suffix == ".egg-link", link
        egg_info = workspace.root / "build" / PACKAGE / f"{PACKAGE}.egg-info"
        assert (workspace.root / "build" / PACKAGE / PACKAGE).resolve() == REPO_ROOT / PACKAGE
    else:
        (egg_info,) = workspace.site_packages.glob("*.egg-info")
        assert sorted(p.name for p in workspace.site_packages.iterdir()) == sorted([PACKAGE, egg_info.name])
        # A subpackage without __init__.py imports from a checkout but is not installed (find_packages).
        installed = {p.relative_to(workspace.site_packages).as_posix()
                     for p in (workspace.site_packages / PACKAGE).rglob("*.py")}
        missing, extra = sorted(set(SOURCE_MODULES) - installed), sorted(installed - set(SOURCE_MODULES))
        assert not missing, f"not installed: {missing}"
        assert not extra, f"installed, not in the checkout: {extra}"
    assert (egg_info / "top_level.txt").read_text().split() == [PACKAGE]  # not test/, not bench/


def test_node_starts_and_refuses_a_missing_params_file(workspace: Workspace) -> None:
    missing = workspace.root / "robot.yaml"
    proc = workspace.run(str(workspace.prefix / "lib" / PACKAGE / "pi0_policy_node"),
                         "--ros-args", "--params-file", str(missing))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pi0_policy_node: error: cannot start" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_prints_its_usage(workspace: Workspace) -> None:
    proc = workspace.run(str(workspace.prefix / "lib" / PACKAGE / "pi0-policy"), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pi0-policy")


def test_rtc_eval_without_the_checkouts_fixtures_says_what_to_pass(workspace: Workspace) -> None:
    # Its default models are the openpi reference fixtures of test/, which an install does not have.
    if workspace.symlink:
        pytest.skip("--symlink-install imports the checkout, whose fixtures are there")
    proc = workspace.run(str(workspace.prefix / "lib" / PACKAGE / "pi0-policy"), "rtc-eval")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "--fixture-dir" in proc.stderr and "--model pi05" in proc.stderr, proc.stderr


def _launch_default_params_file(launch_file: Path) -> tuple[str, list[str]]:
    """(package, path parts below its share directory) of `params_file`'s default: the launch file
    gives it as PathJoinSubstitution([FindPackageShare(<package>), <str>, ...])."""
    tree = ast.parse(launch_file.read_text(), filename=str(launch_file))
    names = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Constant) for target in node.targets if isinstance(target, ast.Name)}

    def text(node: ast.expr) -> str:
        value = names.get(node.id) if isinstance(node, ast.Name) else getattr(node, "value", None)
        assert isinstance(value, str), ast.dump(node)
        return value

    (declare,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and getattr(node.func, "id", None) == "DeclareLaunchArgument"
                  and node.args and getattr(node.args[0], "value", None) == "params_file"]
    default = next(k.value for k in declare.keywords if k.arg == "default_value")
    assert isinstance(default, ast.Call) and default.func.id == "PathJoinSubstitution", ast.dump(default)
    (find_share, *parts) = default.args[0].elts
    assert isinstance(find_share, ast.Call) and find_share.func.id == "FindPackageShare", ast.dump(find_share)
    return text(find_share.args[0]), [text(part) for part in parts]


def test_installed_lookups_resolve_to_installed_files(workspace: Workspace) -> None:
    package, parts = _launch_default_params_file(workspace.share / "launch" / "pi0_policy.launch.py")
    proc = workspace.run(sys.executable, "-c", _REPORT, package)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # Imported from the workspace (install/, or build/ with its links for --symlink-install).
    assert workspace.root in Path(report["module"]).parents, report["module"]
    # FindPackageShare is ament_index_python's get_package_share_directory.
    assert Path(report["share"]) == workspace.share
    assert Path(report["share"], *parts).is_file(), parts
    demo_params = Path(report["demo_params"])
    assert demo_params.is_file()
    if not workspace.symlink:  # not next to the module any more: found through the ament index
        assert demo_params == workspace.share / "config" / "demo.yaml"
