"""SafetyFilter: every limit in clamp and reject mode, NaN guard, counters."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pi0_policy_ros.control.safety import SafetyConfig, SafetyFilter

PERIOD_S = 0.1


def make(**kwargs) -> SafetyFilter:
    return SafetyFilter(SafetyConfig(**kwargs), action_dim=3, period_s=PERIOD_S)


def ramp(h: int = 5, slope: float = 0.01) -> np.ndarray:
    return np.tile(np.arange(h, dtype=np.float64)[:, None] * slope, (1, 3))


def test_chunk_inside_every_limit_passes_untouched() -> None:
    f = make(position_lower=(-1,), position_upper=(1,), max_step=(0.05,), max_velocity=(0.5,),
             gripper_dims=(2,), gripper_range=(-1, 1))
    result = f.apply(ramp(), current=np.zeros(3))
    assert not result.rejected and result.reason == ""
    np.testing.assert_allclose(result.actions, ramp(), atol=1e-7)
    assert all(v == 0 for v in f.counters.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_output_always_rejects(bad: float) -> None:
    f = make()
    chunk = ramp()
    chunk[3, 1] = bad
    result = f.apply(chunk)
    assert result.rejected and result.actions is None
    assert "NaN/Inf" in result.reason and "step 3, dim 1" in result.reason
    assert f.reject_counts["nonfinite"] == 1


def test_position_limits_clamp_and_reject() -> None:
    chunk = ramp()
    chunk[2, 0] = 3.0
    clamp = make(position_lower=(-1, -1, -1), position_upper=(1, 2, 2))
    result = clamp.apply(chunk)
    assert result.clamped == ("position",) and result.actions[2, 0] == pytest.approx(1.0)
    assert clamp.clamp_counts["position"] == 1
    reject = make(position_lower=(-1,), position_upper=(1,), position_policy="reject")
    result = reject.apply(chunk)
    assert result.rejected and "dim 0 = 3 at step 2 is outside [-1, 1]" in result.reason


def test_step_limit_rate_limits_from_the_current_position() -> None:
    f = make(max_step=(0.1,))
    chunk = np.full((4, 3), 0.5)  # a jump of 0.5 from the current position 0
    result = f.apply(chunk, current=np.zeros(3))
    assert result.clamped == ("step",)
    np.testing.assert_allclose(result.actions[:, 0], [0.1, 0.2, 0.3, 0.4], atol=1e-6)
    assert np.all(np.abs(np.diff(result.actions, axis=0)) <= 0.1 + 1e-6)


def test_step_limit_reject_mode() -> None:
    f = make(max_step=(0.1,), step_policy="reject")
    result = f.apply(np.full((4, 3), 0.5), current=np.zeros(3))
    assert result.rejected and result.reason == "step: action 0 moves dim 0 by 0.5 in 0.1 s, over the step limit's 0.1"
    assert f.reject_counts["step"] == 1
    # Without the current position the first action has nothing to move from.
    jump = f.apply(np.array([[0.0, 0.0, 0.0], [0.05, 0.0, 0.2]]))
    assert jump.reason == "step: action 1 moves dim 2 by 0.2 in 0.1 s, over the step limit's 0.1"


def test_velocity_limit_uses_the_action_period() -> None:
    f = make(max_velocity=(1.0,))  # 1 unit/s at 0.1 s per action = 0.1 per step
    result = f.apply(np.full((3, 3), 1.0), current=np.zeros(3))
    np.testing.assert_allclose(result.actions[:, 2], [0.1, 0.2, 0.3], atol=1e-6)
    assert result.clamped == ("velocity",)


def test_gripper_range_clamp_and_reject() -> None:
    chunk = ramp()
    chunk[:, 2] = 1.7
    result = make(gripper_dims=(2,), gripper_range=(0.0, 1.0)).apply(chunk)
    assert np.all(result.actions[:, 2] == 1.0) and result.clamped == ("gripper",)
    result = make(gripper_dims=(2,), gripper_range=(0.0, 1.0), gripper_policy="reject").apply(chunk)
    assert result.rejected and "gripper outside [0.0, 1.0]" in result.reason


def test_wrong_shape_is_rejected_not_passed() -> None:
    assert make().apply(np.zeros((5, 2))).rejected


def test_configuration_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="1 or 3 values"):
        make(max_step=(0.1, 0.2))
    with pytest.raises(ValueError, match="position_policy must be one of"):
        make(position_policy="ignore")
    with pytest.raises(ValueError, match="outside the 3 action dims"):
        make(gripper_dims=(5,), gripper_range=(0, 1))
    with pytest.raises(ValueError, match="go together"):
        make(position_lower=(0,))
    with pytest.raises(ValueError, match="position_lower must be ≤ position_upper"):
        make(position_lower=(0, 1, 0), position_upper=(1, 0, 1))
    # Dims are 0-based: dim 3 of a 3-dim action does not exist (it would fail only at the first chunk).
    with pytest.raises(ValueError, match="outside the 3 action dims"):
        make(gripper_dims=(3,), gripper_range=(0, 1))
    # No value is within both (a gripper in metres with radian joint limits, say): every chunk was
    # rejected, or the position clamp sent a gripper value outside its range.
    with pytest.raises(ValueError, match=r"gripper_range \[0, 0.08\] must overlap position_lower / position_upper "
                                         r"on the gripper dims, found dims \[2\] limited to \[\[0.5, 1.5\]\]"):
        make(gripper_dims=(2,), gripper_range=(0, 0.08), position_lower=(-1, -1, 0.5), position_upper=(1, 1, 1.5))
    make(gripper_dims=(2,), gripper_range=(0, 0.8), position_lower=(-1, -1, 0.5), position_upper=(1, 1, 1.5))


@pytest.mark.parametrize("kwargs, pattern", [
    # np.clip with a negative bound moved a still chunk by -0.1 per step: the robot drifted.
    ({"max_step": (-0.1,)}, "max_step must be > 0"),
    ({"max_velocity": (0.5, -1.0, 0.5)}, "max_velocity must be > 0"),
    ({"max_step": (0.0,)}, "max_step must be > 0"),  # would pin the robot where it stands
    ({"max_velocity": (0.5, 0.0, 0.5)}, "max_velocity must be > 0"),
    ({"max_step": (np.nan,)}, "max_step must be numbers, found NaN"),
    ({"position_lower": (np.nan,), "position_upper": (1.0,)}, "position_lower must be numbers"),
    ({"gripper_dims": (2,), "gripper_range": (1.0, 0.0)}, "lower <= upper"),
    # A NaN in any limit, not only the first ones checked: NaN compares false, so it switches the limit off.
    ({"max_velocity": (1.0, np.nan, 1.0)}, "max_velocity must be numbers, found NaN"),
    ({"position_lower": (-1.0,), "position_upper": (np.nan,)}, "position_upper must be numbers"),
    ({"gripper_dims": (2,), "gripper_range": (0.0, np.nan)}, "gripper_range must be numbers"),
    # Gripper settings that would fail only at the first chunk, or on the wrong dim.
    ({"gripper_dims": (2,)}, "gripper_dims and gripper_range go together"),
    ({"gripper_range": (0.0, 1.0)}, "gripper_dims and gripper_range go together"),
    ({"gripper_dims": (2,), "gripper_range": (0.0, 0.5, 1.0)}, r"gripper_range needs \(lower, upper\)"),
    ({"gripper_dims": (-1,), "gripper_range": (0.0, 1.0)}, r"gripper_dims \[-1\] are outside the 3 action dims"),
])
def test_limits_that_cannot_limit_are_refused(kwargs, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make(**kwargs)


def test_limit_start_scales_the_first_segment_to_its_lead_time() -> None:
    # 1 unit/s: 0.1 per 0.1 s action step, 0.05 for a first point only 0.05 s ahead.
    f = make(max_velocity=(1.0,))
    sent = np.array([[0.2] * 3, [0.25] * 3, [0.3] * 3])
    result = f.limit_start(sent, first_lead_s=0.05, reference=np.zeros(3))
    np.testing.assert_allclose(result.actions[:, 0], [0.05, 0.15, 0.25], atol=1e-6)
    assert result.clamped == ("velocity",) and f.clamp_counts["velocity"] == 1
    # Within the scaled allowance, or without a reference: untouched.
    ok = f.limit_start(sent, first_lead_s=0.2, reference=np.full(3, 0.01))
    assert ok.clamped == () and np.array_equal(ok.actions, sent.astype(np.float32))
    assert f.limit_start(sent, 0.05, None).clamped == () and f.clamp_counts["velocity"] == 1
    # A chunk whose `apply` already counted the velocity clamp: clamped, not counted again.
    again = f.limit_start(sent, first_lead_s=0.05, reference=np.zeros(3), counted=("velocity",))
    assert again.clamped == ("velocity",) and f.clamp_counts["velocity"] == 1


def test_a_period_of_zero_is_refused() -> None:
    # Every allowance is scaled by spans / period_s: a zero period made them inf or NaN.
    for period_s in (0.0, -0.1):
        with pytest.raises(ValueError, match="period_s must be > 0"):
            SafetyFilter(SafetyConfig(max_velocity=(1.0,)), action_dim=3, period_s=period_s)


def test_limits_with_equal_bounds_are_allowed_and_pin_the_dim() -> None:
    # lower == upper is a locked joint (or a gripper held at one command), not a configuration error.
    f = make(position_lower=(-1.0, 0.3, -1.0), position_upper=(1.0, 0.3, 1.0),
             gripper_dims=(2,), gripper_range=(0.5, 0.5))
    result = f.apply(np.array([[0.2, 0.0, 0.0], [0.2, 0.9, 1.0]]))
    np.testing.assert_allclose(result.actions, [[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]], atol=1e-7)
    assert result.clamped == ("gripper", "position")


def test_a_chunk_exactly_on_its_limits_is_inside_them() -> None:
    # The limits are inclusive: a chunk that touches them is neither clamped (nor counted) nor rejected.
    chunk = np.array([[-1.0, 1.0, 0.0], [1.0, -1.0, 1.0]])
    limits = {"position_lower": (-1.0,), "position_upper": (1.0,), "gripper_dims": (2,), "gripper_range": (0.0, 1.0)}
    clamp = make(**limits)
    result = clamp.apply(chunk)
    assert not result.rejected and result.clamped == () and all(v == 0 for v in clamp.counters.values())
    np.testing.assert_array_equal(result.actions, chunk)
    reject = make(**limits, position_policy="reject", gripper_policy="reject")
    assert not reject.apply(chunk).rejected and all(v == 0 for v in reject.counters.values())


def test_limit_start_holds_a_first_point_already_due_at_the_reference() -> None:
    # A first point whose time has passed (negative lead) has no time to move in: its allowance is
    # zero, not negative (np.clip with crossed bounds moved it the other way, by the lead).
    f = make(max_velocity=(1.0,))
    sent = np.array([[0.2] * 3, [0.25] * 3, [0.3] * 3])
    result = f.limit_start(sent, first_lead_s=-0.05, reference=np.zeros(3))
    np.testing.assert_allclose(result.actions[:, 0], [0.0, 0.1, 0.2], atol=1e-6)
    # No points to send: nothing to check, nothing rejected.
    empty = f.limit_start(np.zeros((0, 3)), first_lead_s=0.1, reference=np.zeros(3))
    assert not empty.rejected and empty.actions.shape == (0, 3)


def test_limit_start_reject_names_the_segment() -> None:
    f = make(max_step=(0.1,), step_policy="reject")
    result = f.limit_start(np.full((2, 3), 0.3), first_lead_s=0.1, reference=np.zeros(3))
    assert result.rejected and f.reject_counts["step"] == 1
    assert result.reason == "step: point sent 0 moves dim 0 by 0.3 in 0.1 s, over the step limit's 0.1"
    # A later point: its step from the one before it.
    later = f.limit_start(np.array([[0.05] * 3, [0.3] * 3]), first_lead_s=0.1, reference=np.zeros(3))
    assert later.reason == "step: point sent 1 moves dim 0 by 0.25 in 0.1 s, over the step limit's 0.1"


@pytest.mark.parametrize("limits", [{"max_step": (0.1, 0.2, 0.3)}, {"max_velocity": (1.0, 2.0, 3.0)}])
def test_rate_limits_hold_downward_moves_per_dim(limits: dict) -> None:
    # A jump of -0.5 from the current position 0: each dim moves down by at most its own
    # allowance per step (0.1, 0.2, 0.3; the velocity limits times the 0.1 s period) until it
    # reaches the target. Limits only ever tested upward and with one value for every dim would
    # not see a filter that checks one direction or applies dim 0's limit everywhere.
    name = next(iter(limits))[4:]  # "step" or "velocity"
    f = make(**limits)
    result = f.apply(np.full((4, 3), -0.5), current=np.zeros(3))
    assert result.clamped == (name,)
    expected = np.array([[-0.1, -0.2, -0.3], [-0.2, -0.4, -0.5], [-0.3, -0.5, -0.5], [-0.4, -0.5, -0.5]])
    np.testing.assert_allclose(result.actions, expected, atol=1e-6)
    # Within the chunk, without a reference: the drop from step 1 to step 2 is limited the same way.
    chunk = np.array([[0.0] * 3, [0.0] * 3, [-0.5] * 3])
    np.testing.assert_allclose(f.apply(chunk).actions[2], [-0.1, -0.2, -0.3], atol=1e-6)
    reject = make(**limits, **{f"{name}_policy": "reject"})
    assert reject.apply(np.full((4, 3), -0.5), current=np.zeros(3)).rejected
    assert reject.reject_counts[name] == 1


def test_gripper_range_clamps_both_ends_on_the_gripper_dims_only() -> None:
    # A gripper command below its range (an over-squeeze) is as wrong as one above it; the arm
    # dims are in other units and must not be clamped to the gripper's range.
    chunk = np.array([[5.0, -5.0, -0.4], [5.0, -5.0, 0.5], [5.0, -5.0, 1.7]])
    clamp = make(gripper_dims=(2,), gripper_range=(0.0, 1.0))
    result = clamp.apply(chunk)
    assert result.clamped == ("gripper",)
    np.testing.assert_array_equal(result.actions, [[5.0, -5.0, 0.0], [5.0, -5.0, 0.5], [5.0, -5.0, 1.0]])
    below = np.array([[0.0, 0.0, -0.4]])
    reject = make(gripper_dims=(2,), gripper_range=(0.0, 1.0), gripper_policy="reject")
    assert reject.apply(below).rejected and reject.reject_counts["gripper"] == 1


def test_position_limits_clamp_each_dim_to_its_own_bounds_both_ways() -> None:
    f = make(position_lower=(-1, -2, -3), position_upper=(1, 2, 3))
    chunk = np.array([[-1.5, -2.5, 3.5], [0.5, 2.5, -3.5]])
    result = f.apply(chunk)
    assert result.clamped == ("position",)
    np.testing.assert_array_equal(result.actions, [[-1.0, -2.0, 3.0], [0.5, 2.0, -3.0]])
    reject = make(position_lower=(-1, -2, -3), position_upper=(1, 2, 3), position_policy="reject")
    result = reject.apply(np.array([[0.0, -2.5, 0.0]]))
    assert result.rejected and "dim 1 = -2.5 at step 0 is outside [-2, 2]" in result.reason


def test_a_reference_of_the_wrong_length_is_an_error_not_skipped() -> None:
    # A driver that passed its whole state (14 values for 3 action joints) had the first step's
    # check skipped without a word, as for a NaN reading.
    f = make(max_step=(0.1,), max_velocity=(1.0,))
    chunk = np.full((3, 3), 0.5)
    for wrong in (np.zeros(4), np.zeros((1, 3)), np.zeros(0)):
        with pytest.raises(ValueError, match=re.escape(f"current: expected the measured position of the 3 action "
                                                       f"joints, found shape {wrong.shape}")):
            f.apply(chunk, current=wrong)
        with pytest.raises(ValueError, match=re.escape(f"reference: expected the measured position of the 3 action "
                                                       f"joints, found shape {wrong.shape}")):
            f.limit_start(chunk, first_lead_s=0.1, reference=wrong)


def test_a_non_finite_reference_is_ignored_not_propagated() -> None:
    # A NaN in the measured position must not turn the limited chunk into NaN (sent to the
    # robot): without a trustworthy reference only the steps within the chunk are checked.
    f = make(max_step=(0.1,), max_velocity=(1.0,))
    chunk = np.full((3, 3), 0.5)
    for current in (np.array([np.nan, 0.0, 0.0]), np.array([0.0, np.inf, 0.0])):
        result = f.apply(chunk, current=current)
        assert not result.rejected and result.clamped == ()
        np.testing.assert_array_equal(result.actions, chunk.astype(np.float32))
        start = f.limit_start(chunk, first_lead_s=0.1, reference=current)
        assert start.clamped == () and np.all(np.isfinite(start.actions))
        np.testing.assert_array_equal(start.actions, chunk.astype(np.float32))


def test_a_change_just_over_the_limit_is_limited() -> None:
    # The tolerance only absorbs float rounding: 0.5 % over the step limit is over it.
    f = make(max_step=(0.1,))
    result = f.apply(np.full((1, 3), 0.1005), current=np.zeros(3))
    assert result.clamped == ("step",)
    np.testing.assert_allclose(result.actions, np.full((1, 3), 0.1), atol=1e-7)
    assert make(max_step=(0.1,), step_policy="reject").apply(np.full((1, 3), 0.1005), current=np.zeros(3)).rejected


def test_reset_counters_counts_from_zero() -> None:
    f = make(position_lower=(-1,), position_upper=(1,), position_policy="reject")
    chunk = ramp()
    chunk[2, 0] = 3.0
    assert f.apply(chunk).rejected and f.reject_counts["position"] == 1
    f.reset_counters()
    assert set(f.counters) == {f"{kind}.{limit}" for kind in ("clamp", "reject") for limit in f.clamp_counts}
    assert all(v == 0 for v in f.counters.values())
    assert f.apply(chunk).rejected and f.reject_counts["position"] == 1


def test_a_reference_outside_the_position_limits_never_leads_the_chunk_to_end_outside_them() -> None:
    # The step limit rate-limits from the measured position: from one far outside the position
    # limits (a bad measurement) the limited chunk stayed outside them to its end. Reject it.
    f = make(position_lower=(-1,), position_upper=(1,), max_step=(0.1,))
    chunk = np.full((3, 3), 0.5)
    far = np.array([1e6, 0.0, 0.0])
    result = f.apply(chunk, current=far)
    assert result.rejected and f.reject_counts["position"] == 1
    assert "dim 0 = 1e+06 is outside [-1, 1]" in result.reason and "measured position 1e+06" in result.reason
    assert f.limit_start(chunk, first_lead_s=0.1, reference=far).rejected
    # Just outside: the chunk comes back inside at the step limit's pace and goes out.
    near = f.apply(chunk, current=np.array([1.15, 0.0, 0.0]))
    assert not near.rejected and near.clamped == ("step",)
    np.testing.assert_allclose(near.actions[:, 0], [1.05, 0.95, 0.85], atol=1e-6)
    assert f.outside_limits(np.array([1.15, 0.0, 0.0]))[:3] == ("position", 0, 0)
    assert f.outside_limits(near.actions[-1]) is None


def test_min_travel_s_is_the_slowest_dim_under_the_tightest_limit() -> None:
    start, end = np.zeros(3), np.array([0.3, -0.05, 0.0])
    assert make().min_travel_s(start, end) == 0.0  # no rate limit: no minimum
    # 0.1 a step of 0.1 s (1 unit/s) against 2 units/s: the step limit binds, 0.3 takes 0.3 s.
    assert make(max_step=(0.1,), max_velocity=(2.0,)).min_travel_s(start, end) == pytest.approx(0.3)
    # Per dim: dim 1 at 0.01 units/s needs 5 s for its 0.05.
    assert make(max_velocity=(2.0, 0.01, 2.0)).min_travel_s(start, end) == pytest.approx(5.0)
    assert make(max_velocity=(2.0,)).min_travel_s(start, np.array([np.nan, 0.0, 0.0])) == 0.0
    assert make(max_velocity=(2.0,)).min_travel_s(np.array([0.0, np.inf, 0.0]), end) == 0.0


def test_a_reference_too_far_outside_names_what_ends_outside() -> None:
    # The reason read "the point sents end outside the limits" for the points sent.
    f = make(position_lower=(-1.0,), position_upper=(1.0,), max_step=(0.1,))
    chunk = np.zeros((3, 3))
    far = np.array([5.0, 0.0, 0.0])
    assert f.apply(chunk, current=far).reason.startswith("position: the actions end outside the limits")
    start = f.limit_start(chunk, first_lead_s=0.1, reference=far)
    assert start.rejected and start.reason.startswith("position: the points sent end outside the limits"), start.reason


def _rate_limit_row_by_row(actions: np.ndarray, current: np.ndarray | None,
                           max_step: np.ndarray) -> tuple[np.ndarray, tuple[int, int, float] | None]:
    """The rate limiter's definition, one row after the other (how safety._rate_limit was written
    before it found the first row over the limit for all rows at once)."""
    out = actions.copy()
    steps = np.broadcast_to(max_step, out.shape)
    previous, first = current, None
    for k in range(out.shape[0]):
        if previous is not None:
            delta = out[k] - previous
            over = np.abs(delta) > steps[k] * (1 + 1e-9) + 1e-12
            if np.any(over):
                if first is None:
                    dim = int(np.argmax(over))
                    first = (k, dim, abs(float(delta[dim])))
                out[k] = previous + np.clip(delta, -steps[k], steps[k])
        previous = out[k]
    return out, first


@pytest.mark.parametrize("seed", range(40))
def test_rate_limit_equals_its_row_by_row_definition(seed: int) -> None:
    # Chunks inside the limits, over them at some rows (the first, the last, several), and changes a
    # rounding error from the limit; with and without a reference, per-dim and per-row allowances.
    from pi0_policy_ros.control.safety import _rate_limit

    rng = np.random.default_rng(seed)
    horizon, dims = int(rng.integers(1, 60)), int(rng.integers(1, 15))
    allowance = rng.uniform(0.01, 0.1, dims) if seed % 2 else rng.uniform(0.01, 0.1, (horizon, dims))
    steps = rng.uniform(-1.0, 1.0, (horizon, dims)) * np.broadcast_to(allowance, (horizon, dims))
    spikes = rng.random((horizon, dims)) < [0.0, 0.01, 0.1, 0.5][seed % 4]
    steps[spikes] *= rng.uniform(1.0, 20.0, int(spikes.sum()))
    if seed % 5 == 0:
        steps[rng.integers(horizon)] = np.broadcast_to(allowance, (horizon, dims))[0] * (1 + 1e-10)
    current = None if seed % 3 == 0 else rng.uniform(-1.0, 1.0, dims)
    actions = np.cumsum(steps, axis=0) + (0.0 if current is None else current)
    if seed % 7 == 0 and current is not None:
        actions[0] = current + 5.0 * np.broadcast_to(allowance, (horizon, dims))[0]
    limited, first = _rate_limit(actions, current, allowance)
    expected, expected_first = _rate_limit_row_by_row(actions, current, allowance)
    np.testing.assert_array_equal(limited, expected)
    assert first == expected_first
