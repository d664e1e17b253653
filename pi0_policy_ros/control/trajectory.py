"""Which actions of a chunk to send, and when: the time maths behind the JointTrajectory.

Action k of a chunk is meant for time `stamp_s + k * period_s` (the observation time plus k
action periods). A trajectory published at `now_s` starts when joint_trajectory_controller
receives it (header stamp zero), so point k lies `stamp_s + k * period_s - now_s` seconds ahead.

Rules (Jazzy's controller replaces the running trajectory on every message and interpolates from
the current state to the first point):
- points less than `min_lead_s` ahead are dropped: their time has passed, or is too close for the
  controller to reach smoothly; the node passes one control period;
- `time_from_start` strictly increases (consecutive points are `period_s` apart);
- velocities are finite differences over the whole chunk (central inside, one-sided at the ends),
  taken before dropping so that the first point sent keeps its true slope;
- the last point's velocity is zero (`rest_at_end`): Jazzy's controller rejects a trajectory that
  ends moving (`allow_nonzero_velocity_at_trajectory_end` defaults to false there), and a robot
  that runs to the end of a chunk (a hold with `hold_mode: stop`) must stop there, not coast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pi0_policy_ros.errors import ConfigError, Pi0PolicyError

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class TrajectoryPlan:
    """The points to send.

    first_index: index in the chunk of the first point kept (== horizon when none is).
    times_from_start_s: [K] seconds ahead of the publish time, strictly increasing.
    positions, velocities: [K, A] float64.
    """

    first_index: int
    times_from_start_s: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray

    @property
    def empty(self) -> bool:
        return self.times_from_start_s.size == 0


def finite_difference_velocities(actions: np.ndarray, period_s: float) -> np.ndarray:
    """[H, A] positions -> [H, A] velocities; zeros for a single action."""
    if actions.shape[0] < 2:
        return np.zeros_like(actions, dtype=np.float64)
    return np.gradient(actions.astype(np.float64), period_s, axis=0)


def rest_at_end(velocities: np.ndarray) -> np.ndarray:
    """A copy of [K, A] velocities with the last point's set to zero (see the module docstring)."""
    out = np.array(velocities, dtype=np.float64)
    if out.shape[0]:
        out[-1] = 0.0
    return out


def plan_trajectory(actions: np.ndarray, period_s: float, stamp_s: float, now_s: float,
                    min_lead_s: float) -> TrajectoryPlan:
    """Keep the actions at least `min_lead_s` ahead of `now_s`, with their times and velocities."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
        raise Pi0PolicyError(f"expected actions of shape [H >= 1, A >= 1], found {actions.shape}")
    if not np.all(np.isfinite(actions)):
        bad = np.argwhere(~np.isfinite(actions))[0].tolist()
        raise Pi0PolicyError(f"expected finite actions, found {actions[tuple(bad)]} at [step, dim] {bad}")
    if not (np.isfinite(period_s) and period_s > 0.0):
        raise Pi0PolicyError(f"expected an action period > 0 s, found {period_s!r}")
    if not (np.isfinite(min_lead_s) and min_lead_s >= 0.0):
        raise Pi0PolicyError(f"expected min_lead_s >= 0 s, found {min_lead_s!r}")

    horizon = actions.shape[0]
    # Subtract the large stamps first so the float64 offsets keep sub-microsecond precision.
    ahead_s = (stamp_s - now_s) + np.arange(horizon, dtype=np.float64) * period_s
    kept = np.flatnonzero(ahead_s >= min_lead_s)
    first = int(kept[0]) if kept.size else horizon
    velocities = finite_difference_velocities(actions, period_s)
    return TrajectoryPlan(
        first_index=first,
        times_from_start_s=ahead_s[first:],
        positions=actions[first:].astype(np.float64),
        velocities=rest_at_end(velocities[first:]),
    )


def expired_reason(horizon: int, period_s: float, stamp_s: float, now_s: float, min_lead_s: float) -> str:
    """Why `plan_trajectory` kept nothing, for the hold message."""
    last_ahead_s = stamp_s + (horizon - 1) * period_s - now_s
    return (f"chunk expired: expected its last action >= {min_lead_s:.3f} s ahead, found "
            f"{last_ahead_s:.3f} s (observation {now_s - stamp_s:.3f} s old at publish; "
            f"horizon {horizon} x {period_s:.3f} s)")


def check_control_period(control_period_s: float, horizon: int, period_s: float) -> None:
    """ConfigError when no point of a chunk could ever be sent: every point goes out at least one
    control period ahead (`plan_trajectory`'s min_lead_s in the node), and the last action of a chunk
    lies (horizon - 1) action periods after its observation, less the inference latency. Before
    this check such a rate held every tick with "chunk expired"."""
    if horizon < 2:
        raise ConfigError(f"chunk horizon: expected at least 2 actions, found {horizon}: every point is sent at "
                          "least one control period ahead, and a chunk's first action lies at its observation time")
    last_s = (horizon - 1) * period_s
    # A tick on the grid may be a rounding error past the last action: within the tolerance is on it.
    if control_period_s > last_s + 1e-9:
        raise ConfigError(f"control_rate_hz: expected at least {1.0 / last_s:.4g} Hz for chunks of {horizon} "
                          f"actions {period_s:.4g} s apart (each point is sent at least one control period ahead, "
                          f"and a chunk's last action lies {last_s:.4g} s after its observation), found "
                          f"{1.0 / control_period_s:.4g} Hz (a period of {control_period_s:.4g} s): no chunk could "
                          "ever be sent")


def split_seconds(t_s: float) -> tuple[int, int]:
    """Seconds -> (sec, nanosec) with 0 <= nanosec < 1e9, rounded to the nearest nanosecond."""
    # Split before scaling: t_s * 1e9 would lose the nanoseconds of an epoch stamp (~1.7e18 ns).
    sec = math.floor(t_s)
    nanosec = int(round((t_s - sec) * NS_PER_S))
    if nanosec == NS_PER_S:
        sec, nanosec = sec + 1, 0
    return int(sec), nanosec
