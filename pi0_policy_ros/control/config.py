"""Timing limits of the control loop: plain data, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pi0_policy_ros.errors import ConfigError

# Bounds shared with the ROS parameter descriptors (ros/params.py), so rclpy's range check and
# ours agree.
CONTROL_RATE_RANGE_HZ = (0.1, 200.0)
OBSERVATION_AGE_RANGE_S = (0.001, 10.0)
CAMERA_SKEW_RANGE_S = (0.0, 10.0)
FUTURE_STAMP_RANGE_S = (0.0, 10.0)


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], found {value!r}")


@dataclass(frozen=True)
class ControlConfig:
    """How often to act and how old / misaligned an observation may be.

    control_rate_hz: the target rate of the inference timer; the achieved rate may be lower.
    max_observation_age_s: a snapshot whose oldest sample is older than this is refused (hold).
    max_camera_skew_s: the largest spread of the camera stamps within one snapshot.
    max_future_stamp_s: a sample stamped further than this ahead of our clock is refused; it
        usually means unsynchronised clocks between hosts.
    """

    control_rate_hz: float = 10.0
    max_observation_age_s: float = 0.5
    max_camera_skew_s: float = 0.1
    max_future_stamp_s: float = 0.1

    def __post_init__(self) -> None:
        _check_range("control_rate_hz", self.control_rate_hz, CONTROL_RATE_RANGE_HZ)
        _check_range("max_observation_age_s", self.max_observation_age_s, OBSERVATION_AGE_RANGE_S)
        _check_range("max_camera_skew_s", self.max_camera_skew_s, CAMERA_SKEW_RANGE_S)
        _check_range("max_future_stamp_s", self.max_future_stamp_s, FUTURE_STAMP_RANGE_S)

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.control_rate_hz
