"""The ROS-free core stays ROS-free (ARCHITECTURE.md): checked on the source, with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pi0_policy_ros"
FORBIDDEN = {
    "model": {"rclpy", "transformers", "openpi", "sensor_msgs", "trajectory_msgs"},
    "policy": {"rclpy", "transformers", "openpi", "sensor_msgs", "trajectory_msgs"},
    "engine": {"rclpy", "transformers", "openpi", "sensor_msgs", "trajectory_msgs"},
    "control": {"rclpy", "torch", "sensor_msgs", "trajectory_msgs"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_forbidden_packages(layer: str) -> None:
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"no modules found in {layer}/"
    offences = {str(f.relative_to(PACKAGE)): sorted(_imported_roots(f) & FORBIDDEN[layer]) for f in files}
    assert not {f: bad for f, bad in offences.items() if bad}
