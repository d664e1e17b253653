"""The data that crosses the `Policy` boundary: plain numpy, no torch, no ROS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from pi0_policy_ros.errors import ObservationError


@dataclass(frozen=True)
class Observation:
    """One robot observation, as the robot produced it.

    images: camera name -> uint8 RGB image [H, W, 3] (any size, resized with pad; exactly
        camera_height x camera_width when the policy is configured with them).
    state: the robot's own state vector (its own dims, not padded), float.
    prompt: the task instruction; None uses the configured default prompt.
    stamp_s: the observation time in seconds (ROS time of the newest sample used).
    """

    images: Mapping[str, np.ndarray]
    state: np.ndarray
    prompt: str | None = None
    stamp_s: float = 0.0


@dataclass(frozen=True)
class ActionChunk:
    """A chunk of robot actions predicted from one observation.

    actions: [H, robot_action_dim] float32, in the robot's units (unnormalized, absolute).
    stamp_s: the stamp of the observation it was computed from.
    period_s: the time between consecutive actions.
    timings_ms: per-stage wall time of the inference that produced it.
    """

    actions: np.ndarray
    stamp_s: float
    period_s: float
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])


@dataclass(frozen=True)
class ChunkGuidance:
    """Real-time chunking: what the next chunk should continue (`control/scheduler.py` makes it).

    prev_actions: [H, robot_action_dim], robot units: the actions that will be executed at
        `stamp_s + i * period_s` of the new observation if no new chunk arrived.
    delay_steps: d, the actions certainly executed from the previous chunk while inferring.
    mask_end: rows [0, mask_end) of prev_actions continue the previous chunk; the rest is ignored.
    """

    prev_actions: np.ndarray
    delay_steps: int
    mask_end: int


def as_real_array(value: object, expected: str) -> np.ndarray:
    """`value` as a float64 array, or ObservationError "<expected>, found ..." when numpy cannot make
    it one numeric array (a ragged list, a torch tensor that requires grad) or its values are not
    real numbers (strings and objects would fail in the cast, complex ones lose their imaginary part)."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ObservationError(f"{expected}, found {type(value).__name__} that is not one numeric array "
                               f"({exc})") from None
    if raw.dtype.kind not in "biuf":
        raise ObservationError(f"{expected}, found {type(value).__name__} of dtype {raw.dtype}")
    return raw.astype(np.float64)
