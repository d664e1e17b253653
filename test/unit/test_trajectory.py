"""control/trajectory.py: which actions are sent, their times and velocities."""

import numpy as np
import pytest

from pi0_policy_ros.control.trajectory import (
    expired_reason,
    finite_difference_velocities,
    plan_trajectory,
    split_seconds,
)
from pi0_policy_ros.errors import Pi0PolicyError

ACTIONS = np.stack([np.arange(10, dtype=np.float64) ** 2, -np.arange(10, dtype=np.float64)], axis=1)  # [10, 2]


def test_no_latency_drops_only_points_inside_the_lead() -> None:
    plan = plan_trajectory(ACTIONS, period_s=0.1, stamp_s=50.0, now_s=50.0, min_lead_s=0.1)
    assert plan.first_index == 1
    np.testing.assert_allclose(plan.times_from_start_s, 0.1 * np.arange(1, 10))
    np.testing.assert_array_equal(plan.positions, ACTIONS[1:])


@pytest.mark.parametrize("latency_s", [0.0, 0.01, 0.099, 0.1, 0.23, 0.5])
@pytest.mark.parametrize("lead_s", [0.02, 0.1])
def test_first_point_at_least_the_lead_ahead_and_strictly_increasing(latency_s: float, lead_s: float) -> None:
    stamp = 1_700_000_000.123
    plan = plan_trajectory(ACTIONS, period_s=0.1, stamp_s=stamp, now_s=stamp + latency_s, min_lead_s=lead_s)
    t = plan.times_from_start_s
    assert t[0] >= lead_s - 1e-9
    assert t[0] < lead_s + 0.1 + 1e-9  # the point before was dropped for being inside the lead
    assert np.all(np.diff(t) > 0)
    np.testing.assert_allclose(np.diff(t), 0.1, atol=1e-6)
    k = plan.first_index
    np.testing.assert_allclose(t, stamp + 0.1 * np.arange(k, 10) - (stamp + latency_s), atol=1e-6)
    np.testing.assert_array_equal(plan.positions, ACTIONS[k:])


def test_velocities_are_finite_differences_of_the_whole_chunk() -> None:
    v = finite_difference_velocities(ACTIONS, 0.1)
    # Central differences inside: d(k^2)/dk = 2k -> 20k per second at 0.1 s; one-sided at the ends.
    np.testing.assert_allclose(v[1:-1, 0], 20 * np.arange(1, 9))
    assert v[0, 0] == pytest.approx(10.0) and v[-1, 0] == pytest.approx(170.0)
    np.testing.assert_allclose(v[:, 1], -10.0)
    # per second of the chunk's own period: twice as fast at 0.05 s per action
    np.testing.assert_allclose(finite_difference_velocities(ACTIONS, 0.05), 2 * v)
    plan = plan_trajectory(ACTIONS, 0.1, 10.0, 10.25, 0.05)
    np.testing.assert_allclose(plan.velocities[:-1], v[plan.first_index:-1])


def test_the_last_point_is_at_rest() -> None:
    # Jazzy's joint_trajectory_controller (allow_nonzero_velocity_at_trajectory_end: false by
    # default) rejected every trajectory of a moving chunk: its last velocity was 170 and -10.
    plan = plan_trajectory(ACTIONS, 0.1, 10.0, 10.25, 0.05)
    np.testing.assert_array_equal(plan.velocities[-1], [0.0, 0.0])
    assert np.all(plan.velocities[0] != 0.0)


def test_single_action_has_zero_velocity() -> None:
    plan = plan_trajectory(np.array([[1.0, 2.0]]), 0.1, 10.0, 9.0, 0.1)
    assert plan.first_index == 0
    np.testing.assert_array_equal(plan.velocities, [[0.0, 0.0]])


def test_everything_expired() -> None:
    plan = plan_trajectory(ACTIONS, 0.1, 10.0, 11.5, 0.1)
    assert plan.empty and plan.first_index == 10 and plan.positions.shape == (0, 2)
    reason = expired_reason(10, 0.1, 10.0, 11.5, 0.1)
    assert "chunk expired" in reason and "1.500 s old" in reason
    assert "found -0.600 s" in reason  # the last action (index 9, at 10.9 s) lay 0.6 s in the past


@pytest.mark.parametrize("actions,period,pattern", [
    (np.zeros((0, 2)), 0.1, r"shape \[H >= 1, A >= 1\]"),
    (np.zeros(3), 0.1, r"shape"),
    (np.array([[0.0, np.nan]]), 0.1, r"finite actions, found nan at \[step, dim\] \[0, 1\]"),
    (np.array([[np.inf]]), 0.1, r"finite"),
    (np.zeros((2, 2)), 0.0, r"period > 0"),
    (np.zeros((2, 2)), float("nan"), r"period > 0"),
])
def test_bad_chunks(actions, period, pattern) -> None:
    with pytest.raises(Pi0PolicyError, match=pattern):
        plan_trajectory(actions, period, 1.0, 1.0, 0.1)


@pytest.mark.parametrize("lead_s", [-0.1, float("nan")])
def test_a_lead_that_would_keep_past_points_is_refused(lead_s: float) -> None:
    # A negative lead would send points whose time has already passed.
    with pytest.raises(Pi0PolicyError, match="min_lead_s >= 0"):
        plan_trajectory(ACTIONS, 0.1, 10.0, 10.25, lead_s)


@pytest.mark.parametrize("t,expected", [(0.0, (0, 0)), (1.5, (1, 500_000_000)), (0.9999999999, (1, 0)),
                                        (2.000000001, (2, 1))])
def test_split_seconds(t: float, expected: tuple[int, int]) -> None:
    assert split_seconds(t) == expected
