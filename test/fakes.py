"""Test doubles injected through constructors (no monkeypatching).

`FakePolicy` has the real `Policy` surface (`from_config`, `profile`, `infer`, `close`) and
computes its actions deterministically from the observation, so a test can predict every value:
`actions[k, j] = state[j mod state_dim] + (k + 1) * STEP + image_term`, where image_term is the
mean of all image pixels divided by 1000.
"""

from __future__ import annotations

from collections import deque

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from pi0_policy_ros.errors import CheckpointError, ObservationError
from pi0_policy_ros.policy.config import PolicyConfig
from pi0_policy_ros.policy.types import ActionChunk, ChunkGuidance, Observation

STEP = 0.01


@dataclass(frozen=True)
class FakeProfile:
    name: str = "fake"
    camera_slots: Mapping[str, str] = field(default_factory=lambda: {"cam_a": "base_0_rgb",
                                                                     "cam_b": "left_wrist_0_rgb"})
    state_dim: int = 3
    action_dim: int = 3
    action_horizon: int = 10
    action_period_s: float = 0.05
    joint_names: tuple[str, ...] = ()
    action_space: str = "joint_position"
    aloha_gripper_dims: tuple[int, ...] = ()


def expected_actions(profile: FakeProfile, state: np.ndarray, images: Mapping[str, np.ndarray]) -> np.ndarray:
    image_term = sum(float(np.mean(img)) for img in images.values()) / 1000.0 if images else 0.0
    state = np.asarray(state, np.float64)
    base = state[np.arange(profile.action_dim) % profile.state_dim]
    steps = (np.arange(profile.action_horizon, dtype=np.float64) + 1.0)[:, None] * STEP
    return (base[None, :] + steps + image_term).astype(np.float32)


class FakePolicy:
    """Deterministic stand-in for `Policy`.

    A `checkpoint_path` that does not exist raises `CheckpointError`, like a real load would.
    latency_s: sleep per inference, to simulate a slow model.
    """

    def __init__(self, config: PolicyConfig, profile: FakeProfile | None = None, latency_s: float = 0.0) -> None:
        if config.checkpoint_path and not os.path.exists(config.checkpoint_path):
            raise CheckpointError(f"checkpoint_path: expected an existing directory, found {config.checkpoint_path!r}")
        self.config = config
        self.profile = profile or FakeProfile()
        self.latency_s = latency_s
        self.closed = False
        # The latest observations only: a long test (the load test) must not grow with every tick.
        self.calls: deque[Observation] = deque(maxlen=256)
        self.guidance: deque[ChunkGuidance | None] = deque(maxlen=256)  # what each call got (RTC)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PolicyConfig) -> "FakePolicy":
        return cls(config)

    def infer(self, observation: Observation, guidance: ChunkGuidance | None = None) -> ActionChunk:
        if self.closed:
            raise RuntimeError("infer() after close()")
        unknown = sorted(set(observation.images) - set(self.profile.camera_slots))
        if unknown:
            raise ObservationError(f"expected cameras from {sorted(self.profile.camera_slots)}, found {unknown}")
        if observation.state.shape != (self.profile.state_dim,):
            raise ObservationError(f"expected state [{self.profile.state_dim}], found {observation.state.shape}")
        for name, img in observation.images.items():
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ObservationError(f"camera {name!r}: expected uint8 [H, W, 3], found {img.dtype} {img.shape}")
        t0 = time.perf_counter()
        if self.latency_s:
            time.sleep(self.latency_s)
        actions = expected_actions(self.profile, observation.state, observation.images)
        with self._lock:
            self.calls.append(observation)
            self.guidance.append(guidance)
        return ActionChunk(actions=actions, stamp_s=observation.stamp_s, period_s=self.profile.action_period_s,
                           timings_ms={"fake": (time.perf_counter() - t0) * 1e3})

    def close(self) -> None:
        self.closed = True
