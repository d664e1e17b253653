"""Small bags and parameter files for the bag tests, built in temporary directories.

The tiny `pi0_small` model with random weights on the LIBERO profile (2 cameras: one raw rgb8,
one JPEG) keeps an inference well under a second on the CPU; bags last a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pi0_policy_ros.bag.demo import demo_topics, write_demo_bag

JOINTS = [f"joint_{i}" for i in range(8)]
LIBERO_PARAMS: dict[str, Any] = {
    "model_preset": "pi0_small",
    "robot_profile": "libero",
    "device": "cpu",
    "cpu_threads": 1,  # more threads fight the replayer and the executor on a small machine
    "camera_names": ["image", "wrist_image"],
    "camera_types": ["raw", "compressed"],
    "joint_names": JOINTS,
    "action_joint_names": JOINTS[:7],
    "prompt": "pick up the block",
    "control_rate_hz": 5.0,
    "max_observation_age_s": 0.3,
    "max_camera_skew_s": 0.05,
    "diagnostics_period_s": 0.5,
    # LIBERO's actions are end-effector deltas, which the node keeps off ~/joint_trajectory by
    # default; the bag tests check that topic too.
    "trajectory_actions": "any",
}


def write_params(path: Path, **overrides: Any) -> Path:
    """A ROS parameter file for node pi0_policy in any namespace."""
    path.write_text(yaml.safe_dump({"/**/pi0_policy": {"ros__parameters": {**LIBERO_PARAMS, **overrides}}}))
    return path


@pytest.fixture(scope="session")
def bag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bags")


@pytest.fixture(scope="session")
def params_file(bag_dir: Path) -> Path:
    return write_params(bag_dir / "libero.yaml")


@pytest.fixture(scope="session")
def make_bag(bag_dir: Path, params_file: Path) -> Callable[..., Path]:
    """make_bag(name, duration_s=2.0, storage="mcap", distro="jazzy") -> a demo bag for params_file (cached)."""
    made: dict[tuple, Path] = {}

    def make(name: str, duration_s: float = 2.0, storage: str = "mcap", distro: str = "jazzy") -> Path:
        key = (name, duration_s, storage, distro)
        if key not in made:
            out = bag_dir / name
            write_demo_bag(out, demo_topics(params_file=params_file), duration_s=duration_s, storage=storage,
                           distro=distro)
            made[key] = out
        return made[key]

    return make
